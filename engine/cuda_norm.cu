/*
 * cuda_norm.cu: embedding gather and RMSNorm (see cuda_norm.cuh). One
 * block of 256 threads per row; the sum of squares is reduced in fp32.
 */
#include "engine/cuda_common.cuh"
#include "engine/cuda_norm.cuh"

namespace
{

__global__ void k_embed(const __half *__restrict__ emb, int H, const int32_t *__restrict__ tok,
                        float *__restrict__ x)
{
    CU_TRACE_KERNEL();
    cu_pdl_wait();
    cu_pdl_trigger();
    const int t = blockIdx.x;
    const __half *src = emb + (size_t)tok[t] * H;
    for (int h = threadIdx.x; h < H; h += blockDim.x)
        x[(size_t)t * H + h] = __half2float(src[h]);
}

__global__ void k_rmsnorm(const float *__restrict__ x, int H, const int32_t *__restrict__ rows,
                          const float *__restrict__ w, float eps, __half *__restrict__ oh,
                          float *__restrict__ of)
{
    CU_TRACE_KERNEL();
    __shared__ float s_part[32];
    cu_pdl_wait();
    cu_pdl_trigger();
    const int i = blockIdx.x;
    const float *xr = x + (size_t)(rows ? rows[i] : i) * H;
    float ss = 0.f;
    for (int h = threadIdx.x; h < H; h += blockDim.x)
        ss += xr[h] * xr[h];
    const float inv = rsqrtf(block_sum(ss, s_part) / (float)H + eps);
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
        const float v = w[h] * (xr[h] * inv);
        if (oh) oh[(size_t)i * H + h] = __float2half(v);
        if (of) of[(size_t)i * H + h] = v;
    }
}

} // namespace

extern "C" int cu_embed(const __half *emb, int H, const int32_t *tokens, int T, float *x,
                        cudaStream_t st, lm_err *err)
{
    if (T <= 0) return 0;
    CU_LAUNCH(err, "embed launch", k_embed, T, 256, 0, st, emb, H, tokens, x);
    return 0;
}

extern "C" int cu_rmsnorm(const float *x, int H, const int32_t *rows, int n, const float *w,
                          float eps, __half *out_h, float *out_f, cudaStream_t st, lm_err *err)
{
    if (n <= 0) return 0;
    CU_LAUNCH(err, "rmsnorm launch", k_rmsnorm, n, H >= 2048 ? 1024 : 256, 0, st, x, H, rows, w,
              eps, out_h, out_f);
    return 0;
}
