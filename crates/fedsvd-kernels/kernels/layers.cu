// Transformer layer kernels of a training step: embedding gather fused with
// LayerNorm, LayerNorm forward and backward, bias + GELU (erf form), masked
// scaled softmax forward and backward, LoRA dropout masks (ChaCha8, the
// derivation of fedsvd-model), per-example cross-entropy, and the f32 -> bf16
// gather of the cuBLAS bf16 GEMMs' inputs. Every reduction runs in a fixed order
// (warp butterflies, per-chunk partials added in index order): no atomics,
// so results are bit-reproducible run to run. src/layers_cpu.rs holds the
// reference of each kernel.

#define WARP 32
#define ROW_THREADS 128
#define EW_THREADS 256
#define COL_THREADS 256
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---------------------------------------------------------------------------
// LayerNorm. One warp per row; a lane touches the same columns in every pass,
// so rows written in one pass are read back by the same thread.

// y may be xr (the embedding kernel normalises in place), so neither is
// __restrict__.
__device__ __forceinline__ void layer_norm_row(float* y, const float* xr, int h,
                                               const float* __restrict__ gamma,
                                               const float* __restrict__ beta, float eps,
                                               float* mean_out, float* rstd_out, int lane)
{
    float s = 0.0f;
    for (int j = lane; j < h; j += WARP) s += xr[j];
    const float mean = warp_sum(s) / (float)h;
    float v = 0.0f;
    for (int j = lane; j < h; j += WARP) {
        const float d = xr[j] - mean;
        v += d * d;
    }
    const float var = warp_sum(v) / (float)h;
    const float r = 1.0f / sqrtf(var + eps);
    for (int j = lane; j < h; j += WARP) y[j] = (xr[j] - mean) * r * gamma[j] + beta[j];
    if (lane == 0) {
        *mean_out = mean;
        *rstd_out = r;
    }
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS) layer_norm_fwd(
    const float* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
    int rows, int h, float eps, float* __restrict__ y, float* __restrict__ mean,
    float* __restrict__ rstd)
{
    const int row = blockIdx.x * (ROW_THREADS / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const long long o = (long long)row * h;
    layer_norm_row(y + o, x + o, h, gamma, beta, eps, mean + row, rstd + row, lane);
}

// out[row] = LayerNorm(word[ids[row]] + type[types[row]] + pos[row % seq]).
// The sum is written to out first, then normalised in place.
extern "C" __global__ void __launch_bounds__(ROW_THREADS) embed_layer_norm(
    const unsigned int* __restrict__ ids, const unsigned int* __restrict__ types,
    const float* __restrict__ word, const float* __restrict__ pos,
    const float* __restrict__ type_emb, const float* __restrict__ gamma,
    const float* __restrict__ beta, int rows, int seq, int h, float eps,
    float* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd)
{
    const int row = blockIdx.x * (ROW_THREADS / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const float* we = word + (long long)ids[row] * h;
    const float* te = type_emb + (long long)types[row] * h;
    const float* pe = pos + (long long)(row % seq) * h;
    float* o = out + (long long)row * h;
    for (int j = lane; j < h; j += WARP) o[j] = (we[j] + te[j]) + pe[j];
    layer_norm_row(o, o, h, gamma, beta, eps, mean + row, rstd + row, lane);
}

// dx = rstd * (dy*g - mean(dy*g) - xhat * mean(dy*g*xhat)), xhat = (x - mean) * rstd.
extern "C" __global__ void __launch_bounds__(ROW_THREADS) layer_norm_bwd_dx(
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ rstd, const float* __restrict__ gamma, int rows, int h,
    float* __restrict__ dx)
{
    const int row = blockIdx.x * (ROW_THREADS / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const long long o = (long long)row * h;
    const float mu = mean[row], r = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = lane; j < h; j += WARP) {
        const float dg = dy[o + j] * gamma[j];
        s1 += dg;
        s2 += dg * ((x[o + j] - mu) * r);
    }
    const float m1 = warp_sum(s1) / (float)h;
    const float m2 = warp_sum(s2) / (float)h;
    for (int j = lane; j < h; j += WARP) {
        const float xh = (x[o + j] - mu) * r;
        dx[o + j] = r * (dy[o + j] * gamma[j] - m1 - xh * m2);
    }
}

// Column partial sums of dy*xhat and dy over a chunk of rows: partial row
// blockIdx.y. The rows of a chunk are added in index order.
extern "C" __global__ void __launch_bounds__(COL_THREADS) layer_norm_bwd_params_partial(
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ rstd, int rows, int h, int chunk, float* __restrict__ pg,
    float* __restrict__ pb)
{
    const int c = blockIdx.x * COL_THREADS + threadIdx.x;
    if (c >= h) return;
    const int r0 = blockIdx.y * chunk;
    const int r1 = min(rows, r0 + chunk);
    float sg = 0.0f, sb = 0.0f;
    for (int r = r0; r < r1; ++r) {
        const long long o = (long long)r * h + c;
        const float d = dy[o];
        sg += d * ((x[o] - mean[r]) * rstd[r]);
        sb += d;
    }
    pg[(long long)blockIdx.y * h + c] = sg;
    pb[(long long)blockIdx.y * h + c] = sb;
}

// out[c] = sum over p in index order of partial[p * cols + c].
extern "C" __global__ void __launch_bounds__(COL_THREADS) sum_partial_columns(
    const float* __restrict__ partial, int parts, int cols, float* __restrict__ out)
{
    const int c = blockIdx.x * COL_THREADS + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int p = 0; p < parts; ++p) s += partial[(long long)p * cols + c];
    out[c] = s;
}

// ---------------------------------------------------------------------------
// GELU, erf form: gelu(v) = v * Phi(v), erf by Abramowitz & Stegun 7.1.26 (the
// approximation fedsvd-model uses, absolute error below 1.5e-7).

__device__ __forceinline__ float erf_as(float x, float* gauss)
{
    const float ax = fabsf(x);
    const float t = 1.0f / (1.0f + 0.3275911f * ax);
    const float poly =
        t * (0.2548296f + t * (-0.28449674f + t * (1.4214137f + t * (-1.4531521f + t * 1.0614054f))));
    const float g = expf(-ax * ax);
    *gauss = g;
    return copysignf(1.0f - poly * g, x);
}

extern "C" __global__ void __launch_bounds__(EW_THREADS) bias_gelu_fwd(
    const float* __restrict__ x, const float* __restrict__ bias, long long n, int cols,
    float* __restrict__ y)
{
    for (long long i = (long long)blockIdx.x * EW_THREADS + threadIdx.x; i < n;
         i += (long long)gridDim.x * EW_THREADS) {
        const float v = x[i] + bias[i % cols];
        float g;
        const float e = erf_as(v * 0.70710677f, &g);
        y[i] = v * (0.5f * (1.0f + e));
    }
}

// dx = dy * (Phi(v) + v * phi(v)), v = x + bias.
extern "C" __global__ void __launch_bounds__(EW_THREADS) bias_gelu_bwd(
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ bias,
    long long n, int cols, float* __restrict__ dx)
{
    for (long long i = (long long)blockIdx.x * EW_THREADS + threadIdx.x; i < n;
         i += (long long)gridDim.x * EW_THREADS) {
        const float v = x[i] + bias[i % cols];
        float g;
        const float e = erf_as(v * 0.70710677f, &g);
        const float d = 0.5f * (1.0f + e) + v * 0.3989423f * g;
        dx[i] = dy[i] * d;
    }
}

// ---------------------------------------------------------------------------
// Masked scaled softmax over rows of k_len keys. Row r belongs to example
// r / rows_per_example; key j is kept when key_mask[example * k_len + j] != 0.
// Masked keys get probability 0; a row whose keys are all masked is all 0.

extern "C" __global__ void __launch_bounds__(ROW_THREADS) masked_softmax_fwd(
    const float* __restrict__ s, const float* __restrict__ key_mask, int rows,
    int rows_per_example, int k_len, float scale, float* __restrict__ p)
{
    const int row = blockIdx.x * (ROW_THREADS / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const long long o = (long long)row * k_len;
    const float* m = key_mask + (long long)(row / rows_per_example) * k_len;
    float mx = NEG_INF;
    for (int j = lane; j < k_len; j += WARP)
        if (m[j] != 0.0f) mx = fmaxf(mx, s[o + j] * scale);
    mx = warp_max(mx);
    if (mx == NEG_INF) {
        for (int j = lane; j < k_len; j += WARP) p[o + j] = 0.0f;
        return;
    }
    float sum = 0.0f;
    for (int j = lane; j < k_len; j += WARP) {
        const float e = m[j] != 0.0f ? expf(s[o + j] * scale - mx) : 0.0f;
        p[o + j] = e;
        sum += e;
    }
    const float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j < k_len; j += WARP) p[o + j] *= inv;
}

// ds = scale * p * (dp - sum_j dp_j p_j).
extern "C" __global__ void __launch_bounds__(ROW_THREADS) masked_softmax_bwd(
    const float* __restrict__ dp, const float* __restrict__ p, int rows, int k_len, float scale,
    float* __restrict__ ds)
{
    const int row = blockIdx.x * (ROW_THREADS / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const long long o = (long long)row * k_len;
    float dot = 0.0f;
    for (int j = lane; j < k_len; j += WARP) dot += dp[o + j] * p[o + j];
    dot = warp_sum(dot);
    for (int j = lane; j < k_len; j += WARP) ds[o + j] = p[o + j] * (dp[o + j] - dot) * scale;
}

// ---------------------------------------------------------------------------
// Dropout masks, bit for bit those of fedsvd-model: example i of the batch
// (global index first + i) and adapter `stream` draw from
// ChaCha8Rng::seed_from_u64(mix(seed ^ mix((stream << 32) | example))),
// one u32 per element e (word e of the keystream); the element is dropped
// (0) when (w >> 8) * 2^-24 < p and kept (`keep` = 1/(1-p)) otherwise. Each
// thread produces the 16 elements of one ChaCha block.

__device__ __forceinline__ unsigned long long splitmix(unsigned long long z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ unsigned int pcg32(unsigned long long* state)
{
    *state = *state * 6364136223846793005ull + 11634580027462260723ull;
    const unsigned long long s = *state;
    const unsigned int xs = (unsigned int)(((s >> 18) ^ s) >> 27);
    const unsigned int rot = (unsigned int)(s >> 59);
    return (xs >> rot) | (xs << ((32u - rot) & 31u));
}

#define QR(a, b, c, d)                                                                             \
    a += b; d ^= a; d = (d << 16) | (d >> 16);                                                     \
    c += d; b ^= c; b = (b << 12) | (b >> 20);                                                     \
    a += b; d ^= a; d = (d << 8) | (d >> 24);                                                      \
    c += d; b ^= c; b = (b << 7) | (b >> 25);

extern "C" __global__ void __launch_bounds__(EW_THREADS) dropout_mask(
    float* __restrict__ out, long long per_example, unsigned long long seed, unsigned int stream,
    unsigned long long first, float p, float keep)
{
    const long long block = (long long)blockIdx.x * EW_THREADS + threadIdx.x;
    const long long e0 = block * 16;
    if (e0 >= per_example) return;
    const unsigned long long example = first + blockIdx.y;
    unsigned long long state =
        splitmix(seed ^ splitmix(((unsigned long long)stream << 32) | example));
    unsigned int k[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) k[i] = pcg32(&state);
    unsigned int in[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                           k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7],
                           (unsigned int)block, (unsigned int)((unsigned long long)block >> 32), 0u, 0u};
    unsigned int x[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) x[i] = in[i];
#pragma unroll
    for (int round = 0; round < 4; ++round) {
        QR(x[0], x[4], x[8], x[12]);
        QR(x[1], x[5], x[9], x[13]);
        QR(x[2], x[6], x[10], x[14]);
        QR(x[3], x[7], x[11], x[15]);
        QR(x[0], x[5], x[10], x[15]);
        QR(x[1], x[6], x[11], x[12]);
        QR(x[2], x[7], x[8], x[13]);
        QR(x[3], x[4], x[9], x[14]);
    }
    float* o = out + (long long)blockIdx.y * per_example;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const long long e = e0 + i;
        if (e < per_example) {
            const unsigned int w = x[i] + in[i];
            const float u = (float)(w >> 8) * 5.9604644775390625e-08f;
            o[e] = u < p ? 0.0f : keep;
        }
    }
}

// ---------------------------------------------------------------------------
// Per-example cross-entropy: loss[i] = logsumexp(z_i) - z_i[label_i] and
// dz_i = softmax(z_i) - onehot(label_i). One warp per example.

extern "C" __global__ void __launch_bounds__(ROW_THREADS) cross_entropy_fwd_bwd(
    const float* __restrict__ z, const unsigned int* __restrict__ labels, int rows, int classes,
    float* __restrict__ loss, float* __restrict__ dz)
{
    const int row = blockIdx.x * (ROW_THREADS / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const long long o = (long long)row * classes;
    float mx = NEG_INF;
    for (int j = lane; j < classes; j += WARP) mx = fmaxf(mx, z[o + j]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < classes; j += WARP) sum += expf(z[o + j] - mx);
    const float lse = mx + logf(warp_sum(sum));
    const unsigned int label = labels[row];
    for (int j = lane; j < classes; j += WARP)
        dz[o + j] = expf(z[o + j] - lse) - ((unsigned int)j == label ? 1.0f : 0.0f);
    if (lane == 0) loss[row] = lse - z[o + label];
}

// ---------------------------------------------------------------------------
// f32 -> bf16, round to nearest even (NaN stays a quiet NaN), as half::bf16::from_f32.

__device__ __forceinline__ unsigned short bf16_rne(float v)
{
    const unsigned int b = __float_as_uint(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((b >> 16) | 0x0040u);
    return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// Gathers and rounds what one GEMM input's products read: `count` matrices of
// rows x cols, matrix p at x + offset + p * stride, row r a further r * ld,
// into y packed (matrix after matrix, rows cols apart). A product reading one
// head's columns of a packed QKV matrix thus converts those columns only.
extern "C" __global__ void __launch_bounds__(EW_THREADS) f32_to_bf16_gather(
    const float* __restrict__ x, long long offset, long long ld, long long stride,
    long long rows, long long cols, long long count, unsigned short* __restrict__ y)
{
    const long long per = rows * cols;
    const long long n = per * count;
    for (long long i = (long long)blockIdx.x * EW_THREADS + threadIdx.x; i < n;
         i += (long long)gridDim.x * EW_THREADS) {
        const long long p = i / per;
        const long long e = i - p * per;
        const long long r = e / cols;
        y[i] = bf16_rne(x[offset + p * stride + r * ld + (e - r * cols)]);
    }
}
