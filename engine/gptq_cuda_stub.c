/*
 * gptq_cuda_stub.c: the gptq_cuda.h functions for builds without CUDA (the
 * real ones are in gptq_cuda.cu; engine/CMakeLists.txt compiles exactly one
 * of the two). Each says plainly that there is no GPU path.
 */
#include "engine/gptq_cuda.h"

#include <string.h>

static int no_cuda(lm_err *err)
{
    return lm_err_set(err, -ENODEV,
                      "gptq: this build has no CUDA support (configure with -DLIGHTMOE_CUDA=ON "
                      "for --device cuda)");
}

int gptq_cuda_hessian_add(gptq_hessian *h, const float *x, int64_t rows, int64_t ld,
                          lm_err *err)
{
    (void)h, (void)x, (void)rows, (void)ld;
    return no_cuda(err);
}

int gptq_cuda_quantize(const float *w, int32_t n, int32_t k, const gptq_hessian *h,
                       const gptq_params *p, gptq_result *ret, lm_err *err)
{
    (void)w, (void)n, (void)k, (void)h, (void)p;
    memset(ret, 0, sizeof *ret);
    return no_cuda(err);
}
