/*
 * gptq_cuda_stub.c: gptq_cuda_quantize for builds without CUDA (the real
 * one is gptq_cuda.cu). Says plainly that there is no GPU path.
 */
#include "engine/gptq_cuda.h"

#include <string.h>

#ifndef LIGHTMOE_HAVE_CUDA
int gptq_cuda_hessian_add(gptq_hessian *h, const float *x, int64_t rows, int64_t ld,
                          lm_err *err)
{
    (void)h, (void)x, (void)rows, (void)ld;
    return lm_err_set(err, -ENODEV,
                      "gptq: this build has no CUDA support (configure with -DLIGHTMOE_CUDA=ON "
                      "for --device cuda)");
}

int gptq_cuda_quantize(const float *w, int32_t n, int32_t k, const gptq_hessian *h,
                       const gptq_params *p, gptq_result *ret, lm_err *err)
{
    (void)w, (void)n, (void)k, (void)h, (void)p;
    memset(ret, 0, sizeof *ret);
    return lm_err_set(err, -ENODEV,
                      "gptq: this build has no CUDA support (configure with -DLIGHTMOE_CUDA=ON "
                      "for --device cuda)");
}
#else
typedef int gptq_cuda_stub_unused; /* ISO C: no empty translation unit */
#endif
