/*
 * cuda_norm.cuh: embedding gather and RMSNorm on the GPU.
 *
 * The residual stream is fp32 [T][H]; RMSNorm reads it (optionally only the
 * rows listed, for the final norm of the logit rows) and writes the
 * normalised rows as fp16 (input of the INT4/fp16 products) and, if asked,
 * as fp32 (input of the fp32 router), exactly as transformers' RMSNorm:
 * x * rsqrt(mean(x^2) + eps) * w, all in fp32.
 */
#ifndef LIGHTMOE_CUDA_NORM_CUH
#define LIGHTMOE_CUDA_NORM_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "engine/err.h"

#ifdef __cplusplus
extern "C" {
#endif

/* x[t][:] = emb[tokens[t]][:] (fp16 table -> fp32 rows). */
int cu_embed(const __half *emb, int H, const int32_t *tokens, int T, float *x, cudaStream_t st,
             lm_err *err);

/* Row i of out = rmsnorm(x[rows ? rows[i] : i]) * w, for i < n. out_h and
 * out_f may be NULL (not both). */
int cu_rmsnorm(const float *x, int H, const int32_t *rows, int n, const float *w, float eps,
               __half *out_h, float *out_f, cudaStream_t st, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
