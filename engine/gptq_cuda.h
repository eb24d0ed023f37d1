/*
 * gptq_cuda.h: GPTQ of one Linear with the heavy parts on a CUDA GPU.
 *
 * Same algorithm, inputs and output as gptq_quantize (gptq.h): the
 * Hessian sums X^T X can be accumulated by cuBLAS (gptq_cuda_hessian_add),
 * Hessian's Cholesky factorizations and inverse run in cuSOLVER (double),
 * the lazy-batch error update after each block of columns in cuBLAS
 * (Dgemm); the column-by-column loop inside a block runs on the host over
 * the block copied back, with the same group parameters, rounding and
 * packing code as the CPU path (gptq_int.h). RTN needs no GPU and is done
 * by gptq_quantize. Results match the CPU path up to float rounding.
 *
 * Without a CUDA build (LIGHTMOE_HAVE_CUDA unset) or without a device the
 * function returns -ENODEV with a message saying so.
 * Threads: uses the current CUDA device; one call at a time per thread.
 */
#ifndef LIGHTMOE_GPTQ_CUDA_H
#define LIGHTMOE_GPTQ_CUDA_H

#include "engine/gptq.h"

#ifdef __cplusplus
extern "C" {
#endif

/* gptq_hessian_add on the GPU (cuBLAS Dsyrk over the inputs converted to
 * double, in chunks): adds `rows` inputs x (row-major, stride ld) into h.
 * Same sums as the CPU up to summation order. -ENODEV without a device. */
int gptq_cuda_hessian_add(gptq_hessian *h, const float *x, int64_t rows, int64_t ld,
                          lm_err *err);

int gptq_cuda_quantize(const float *w, int32_t n, int32_t k, const gptq_hessian *h,
                       const gptq_params *p, gptq_result *ret, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
