// Clip-scale-sum and Gaussian noise. The noise is Philox-4x32-10 keyed by the
// seed, counter = Philox block index (stream position / 4), followed by
// Box-Muller; the same algorithm as src/philox.rs, so the CPU reproduces the
// GPU's stream to a few ulp (logf/sincosf and the host's ln/sin_cos may differ
// in the last bits). This truncated draw (|z| <= 6.8) is for the kernel
// benchmarks and tests; training noise is the exact discrete Gaussian drawn on
// the host. Each thread owns the (up to) four output columns of one Philox
// block.

#define THREADS 256

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k)
{
    const unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const unsigned int W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k.x += W0;
            k.y += W1;
        }
        const unsigned int hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        const unsigned int hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

__device__ __forceinline__ void box_muller(unsigned int a, unsigned int b, float* z0, float* z1)
{
    const float u = __fmaf_rn(__uint2float_rn(a), 2.3283064365386963e-10f, 1.1641532182693481e-10f);
    const float v = __uint2float_rn(b >> 8) * 5.9604644775390625e-08f;
    const float r = sqrtf(-2.0f * logf(u));
    const float theta = __fmul_rn(6.2831853071795865f, v);
    float s, c;
    sincosf(theta, &s, &c);
    *z0 = __fmul_rn(r, c);
    *z1 = __fmul_rn(r, s);
}

__device__ __forceinline__ void gaussian_block(unsigned int seed_lo, unsigned int seed_hi,
                                               unsigned long long block, float z[4])
{
    const uint4 x = philox4x32_10(
        make_uint4((unsigned int)block, (unsigned int)(block >> 32), 0u, 0u),
        make_uint2(seed_lo, seed_hi));
    box_muller(x.x, x.y, &z[0], &z[1]);
    box_muller(x.z, x.w, &z[2], &z[3]);
}

// out[p] = ((sum_i f_i x[i, p]) + std * z(offset + p)) * scale, the noise term
// only when with_noise != 0. Rows are summed in index order without fused
// multiply-adds, the exact operations of the CPU backend, so the sums agree
// bit for bit.
extern "C" __global__ void __launch_bounds__(THREADS) clip_sum_noise(
    const float* __restrict__ x, const float* __restrict__ factors, int rows, long long cols,
    float* __restrict__ out, float noise_std, float scale,
    unsigned int seed_lo, unsigned int seed_hi, unsigned long long offset, int with_noise)
{
    const long long lead = (long long)(offset & 3ull);
    const unsigned long long first_block = offset >> 2;
    const long long groups = (lead + cols + 3) / 4;
    const bool aligned = lead == 0 && (cols & 3) == 0;
    for (long long g = (long long)blockIdx.x * THREADS + threadIdx.x; g < groups;
         g += (long long)gridDim.x * THREADS) {
        const long long p0 = g * 4 - lead;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (aligned) {
            for (int i = 0; i < rows; ++i) {
                const float f = __ldg(factors + i);
                const float4 v = __ldg(reinterpret_cast<const float4*>(x + (long long)i * cols + p0));
                acc[0] = __fadd_rn(acc[0], __fmul_rn(f, v.x));
                acc[1] = __fadd_rn(acc[1], __fmul_rn(f, v.y));
                acc[2] = __fadd_rn(acc[2], __fmul_rn(f, v.z));
                acc[3] = __fadd_rn(acc[3], __fmul_rn(f, v.w));
            }
        } else {
            for (int i = 0; i < rows; ++i) {
                const float f = __ldg(factors + i);
                const float* xr = x + (long long)i * cols;
#pragma unroll
                for (int l = 0; l < 4; ++l) {
                    const long long p = p0 + l;
                    if (p >= 0 && p < cols) acc[l] = __fadd_rn(acc[l], __fmul_rn(f, __ldg(xr + p)));
                }
            }
        }
        if (with_noise) {
            float z[4];
            gaussian_block(seed_lo, seed_hi, first_block + (unsigned long long)g, z);
#pragma unroll
            for (int l = 0; l < 4; ++l) acc[l] = __fmul_rn(__fadd_rn(acc[l], __fmul_rn(noise_std, z[l])), scale);
        }
        if (aligned) {
            *reinterpret_cast<float4*>(out + p0) = make_float4(acc[0], acc[1], acc[2], acc[3]);
        } else {
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                const long long p = p0 + l;
                if (p >= 0 && p < cols) out[p] = acc[l];
            }
        }
    }
}

// In place: x[p] = (x[p] + std * z(offset + p)) * scale.
extern "C" __global__ void __launch_bounds__(THREADS) add_noise(
    float* __restrict__ x, long long cols, float noise_std, float scale,
    unsigned int seed_lo, unsigned int seed_hi, unsigned long long offset)
{
    const long long lead = (long long)(offset & 3ull);
    const unsigned long long first_block = offset >> 2;
    const long long groups = (lead + cols + 3) / 4;
    for (long long g = (long long)blockIdx.x * THREADS + threadIdx.x; g < groups;
         g += (long long)gridDim.x * THREADS) {
        const long long p0 = g * 4 - lead;
        float z[4];
        gaussian_block(seed_lo, seed_hi, first_block + (unsigned long long)g, z);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const long long p = p0 + l;
            if (p >= 0 && p < cols) x[p] = __fmul_rn(__fadd_rn(x[p], __fmul_rn(noise_std, z[l])), scale);
        }
    }
}
