/*
 * gptq_int.h: internals of gptq.c shared with the CUDA GPTQ path
 * (gptq_cuda.cu), so both paths use the very same group parameters,
 * rounding, packing and column preparation. Not a public contract.
 * Threads: pure functions on caller-owned arrays.
 */
#ifndef LIGHTMOE_GPTQ_INT_H
#define LIGHTMOE_GPTQ_INT_H

#include "engine/gptq.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gptq_qparam {
    float scale;        /* fp16-representable */
    uint16_t scale16;
    int zero;           /* 1..15 asym (v1 stores zero-1 in 4 bits), 8 sym */
} gptq_qparam;

typedef struct gptq_diag_idx {
    double d;
    int32_t i;
} gptq_diag_idx;

gptq_qparam gptq_int_find_params(const double *x, size_t stride, int32_t len, int sym);
int gptq_int_quant_one(double w, const gptq_qparam *p);
float gptq_int_dequant_one(int q, const gptq_qparam *p);
void gptq_int_pack_q(gptq_result *r, int32_t row, int32_t col, int q);
void gptq_int_pack_group(gptq_result *r, int32_t grp, int32_t row, const gptq_qparam *p);
int gptq_int_result_alloc(gptq_result *r, int32_t n, int32_t k, int32_t group, lm_err *err);
/* h, u [k][k], wp [n][k], perm [k], di [k]: on return h = permuted H with
 * dead diagonals 1, wp = permuted W with dead columns 0; returns mean diag. */
double gptq_int_prepare(const float *w, const gptq_hessian *hs, int act_order, int32_t n,
                        int32_t k, double *h, double *u, double *wp, int32_t *perm,
                        gptq_diag_idx *di);

#ifdef __cplusplus
}
#endif
#endif
