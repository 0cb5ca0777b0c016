// Squared L2 norms of the rows of a matrix (row r is the cols elements
// starting at x + r * row_stride), in two deterministic passes: each block
// reduces one chunk of one row to a partial sum, then `reduce_partials` adds
// each row's partials in index order in double precision.

#define THREADS 256

extern "C" __global__ void __launch_bounds__(THREADS) row_sq_norms_partial(
    const float* __restrict__ x, long long cols, long long row_stride, long long chunk,
    float* __restrict__ partial)
{
    __shared__ float red[THREADS];
    const long long row = blockIdx.y;
    const long long c0 = (long long)blockIdx.x * chunk;
    const long long c1 = min(cols, c0 + chunk);
    const float* xr = x + row * row_stride;
    float s = 0.0f;
    for (long long c = c0 + threadIdx.x; c < c1; c += THREADS) {
        const float v = __ldg(xr + c);
        s = fmaf(v, v, s);
    }
    red[threadIdx.x] = s;
    __syncthreads();
#pragma unroll
    for (int k = THREADS / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[row * gridDim.x + blockIdx.x] = red[0];
}

extern "C" __global__ void reduce_partials(
    const float* __restrict__ partial, int rows, int parts, float* __restrict__ out)
{
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    double s = 0.0;
    for (int p = 0; p < parts; ++p) s += (double)partial[(long long)row * parts + p];
    out[row] = (float)s;
}
