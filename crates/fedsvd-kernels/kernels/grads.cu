// Per-example LoRA gradients out_i = A_i^T B_i (A_i: tokens x m, B_i: tokens x n,
// row-major) with the squared Frobenius norm of each output tile fused in.
// One block of 128 threads computes a TM x TN tile of one example; each thread
// owns 8 consecutive output rows of one column. The per-tile squared norms go
// to `partial[example * tiles + tile]` and are summed in a fixed order by
// `reduce_partials` (norms.cu), so results do not depend on scheduling.

#define THREADS 128
#define TK 32
#define RPT 8

template <int TN, int TM>
__device__ __forceinline__ void per_example_grads_tile(
    const float* __restrict__ a, const float* __restrict__ b,
    int tokens, int m, int n,
    float* __restrict__ out, long long out_row_stride, long long out_offset,
    float* __restrict__ partial)
{
    __shared__ __align__(16) float As[TK][TM];
    __shared__ float Bs[TK][TN];
    __shared__ float red[THREADS];

    const int tid = threadIdx.x;
    const int tx = tid % TN;
    const int ty = tid / TN;
    const int n0 = blockIdx.x * TN;
    const int m0 = blockIdx.y * TM;
    const long long ex = blockIdx.z;
    const float* ai = a + ex * (long long)tokens * m;
    const float* bi = b + ex * (long long)tokens * n;

    float acc[RPT];
#pragma unroll
    for (int j = 0; j < RPT; ++j) acc[j] = 0.0f;

    for (int k0 = 0; k0 < tokens; k0 += TK) {
#pragma unroll
        for (int s = 0; s < (TK * TM) / THREADS; ++s) {
            const int e = tid + THREADS * s;
            const int kk = e / TM;
            const int mm = e % TM;
            const int t = k0 + kk;
            const int col = m0 + mm;
            As[kk][mm] = (t < tokens && col < m) ? ai[(long long)t * m + col] : 0.0f;
        }
#pragma unroll
        for (int s = 0; s < (TK * TN + THREADS - 1) / THREADS; ++s) {
            const int e = tid + THREADS * s;
            if (e < TK * TN) {
                const int kk = e / TN;
                const int nn = e % TN;
                const int t = k0 + kk;
                const int col = n0 + nn;
                Bs[kk][nn] = (t < tokens && col < n) ? bi[(long long)t * n + col] : 0.0f;
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; ++kk) {
            const float bv = Bs[kk][tx];
            const float4 a0 = *reinterpret_cast<const float4*>(&As[kk][ty * RPT]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[kk][ty * RPT + 4]);
            acc[0] = fmaf(a0.x, bv, acc[0]);
            acc[1] = fmaf(a0.y, bv, acc[1]);
            acc[2] = fmaf(a0.z, bv, acc[2]);
            acc[3] = fmaf(a0.w, bv, acc[3]);
            acc[4] = fmaf(a1.x, bv, acc[4]);
            acc[5] = fmaf(a1.y, bv, acc[5]);
            acc[6] = fmaf(a1.z, bv, acc[6]);
            acc[7] = fmaf(a1.w, bv, acc[7]);
        }
        __syncthreads();
    }

    float sq = 0.0f;
    const int col = n0 + tx;
    float* oi = out + ex * out_row_stride + out_offset;
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
        const int row = m0 + ty * RPT + j;
        if (row < m && col < n) {
            oi[(long long)row * n + col] = acc[j];
            sq = fmaf(acc[j], acc[j], sq);
        }
    }
    red[tid] = sq;
    __syncthreads();
#pragma unroll
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    if (tid == 0) {
        const long long tiles = (long long)gridDim.x * gridDim.y;
        partial[ex * tiles + (long long)blockIdx.y * gridDim.x + blockIdx.x] = red[0];
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) per_example_grads_n8(
    const float* __restrict__ a, const float* __restrict__ b, int tokens, int m, int n,
    float* __restrict__ out, long long out_row_stride, long long out_offset,
    float* __restrict__ partial)
{
    per_example_grads_tile<8, 128>(a, b, tokens, m, n, out, out_row_stride, out_offset, partial);
}

extern "C" __global__ void __launch_bounds__(THREADS) per_example_grads_n16(
    const float* __restrict__ a, const float* __restrict__ b, int tokens, int m, int n,
    float* __restrict__ out, long long out_row_stride, long long out_offset,
    float* __restrict__ partial)
{
    per_example_grads_tile<16, 64>(a, b, tokens, m, n, out, out_row_stride, out_offset, partial);
}

extern "C" __global__ void __launch_bounds__(THREADS) per_example_grads_n32(
    const float* __restrict__ a, const float* __restrict__ b, int tokens, int m, int n,
    float* __restrict__ out, long long out_row_stride, long long out_offset,
    float* __restrict__ partial)
{
    per_example_grads_tile<32, 32>(a, b, tokens, m, n, out, out_row_stride, out_offset, partial);
}
