/*
 * gptq.h: 4-bit weight quantization of one Linear layer, GPTQ and RTN,
 * producing the standard GPTQ v1 checkpoint layout.
 *
 * GPTQ (Frantar et al. 2022) quantizes the columns (inputs) of W one at a
 * time and spreads each column's rounding error over the columns not yet
 * quantized, weighted by the inverse Hessian of the layer's reconstruction
 * loss ||W X - Q X||^2, H = 2/n X X^T over the n calibration inputs x (rows
 * of X^T). This module holds only the math; which inputs feed which layer
 * is the business of quantize.c.
 *
 * Conventions (those of PyTorch / AutoGPTQ):
 *   W      float [n_out][k]  a Linear's weight, y = W x
 *   X rows float [rows][k]   the Linear's inputs, one token per row
 *
 * The algorithm follows AutoGPTQ's fasterquant: dead inputs (diag(H) = 0)
 * get H_ii = 1 and W[:, i] = 0; optional act-order permutes the columns by
 * diag(H) descending; H += percdamp * mean(diag(H)) * I; Hinv = the upper
 * Cholesky factor of H^-1; columns are processed in blocks of `blocksize`
 * with the error fed back inside the block and one lazy (BLAS) update of
 * the remaining columns after each block. Scale and zero of a group are
 * chosen (min/max including 0, AutoGPTQ's find_params) from the current,
 * error-updated weights when the group's first column is reached in
 * processing order ("static_groups" off). Two deliberate refinements,
 * both invisible in the file format: (1) the scale is rounded to fp16
 * before quantizing, so the reported Q is exactly what the file decodes
 * to; (2) if H + damp I is not positive definite, damping is multiplied
 * by 10 and retried (up to 5 times) instead of failing.
 *
 * Output layout (GPTQ v1, "checkpoint_format": "gptq"), K inputs, N outputs,
 * group size g, see ../shared/fixtures/README.md:
 *   qweight int32 [K/8][N]  (k, n) at bits 4*(k%8) of qweight[k/8][n]
 *   qzeros  int32 [K/g][N/8] (grp, n) at bits 4*(n%8), holds zero - 1
 *   scales  fp16  [K/g][N]
 *   g_idx   int32 [K]       group of input k (k/g without act-order)
 *   W(k, n) = scales[g_idx[k]][n] * (q(k, n) - (stored_zero + 1))
 *
 * Ownership: a gptq_hessian and a gptq_result own their arrays; free them
 * with gptq_hessian_free / gptq_result_free (both accept zeroed structs).
 * Threads: no shared state; calls on distinct objects may run concurrently.
 */
#ifndef LIGHTMOE_GPTQ_H
#define LIGHTMOE_GPTQ_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

/* Running sum S = sum over inputs x of x x^T, in double; H = 2 S / n. */
typedef struct gptq_hessian {
    int32_t k;      /* inputs of the Linear */
    int64_t n;      /* inputs accumulated so far */
    double *s;      /* [k][k], upper triangle (j >= i) valid */
} gptq_hessian;

int gptq_hessian_init(gptq_hessian *h, int32_t k, lm_err *err);
/* Add `rows` inputs x (row-major [rows][k], row stride `ld` floats). */
void gptq_hessian_add(gptq_hessian *h, const float *x, int64_t rows, int64_t ld);
/* Add another accumulator's inputs (same k) into h. */
void gptq_hessian_merge(gptq_hessian *h, const gptq_hessian *other);
void gptq_hessian_free(gptq_hessian *h);

typedef enum gptq_method {
    GPTQ_METHOD_RTN = 0,    /* round to nearest, per group, no Hessian */
    GPTQ_METHOD_GPTQ = 1,
} gptq_method;

typedef struct gptq_params {
    gptq_method method;
    int32_t group;          /* inputs per scale/zero group; must divide K */
    int sym;                /* 1: zero = 8, symmetric range; 0: asymmetric */
    int act_order;          /* GPTQ only: desc_act */
    double percdamp;        /* dampening as a fraction of mean diag(H); 0.01 */
    int32_t blocksize;      /* lazy-batch width; rounded up to a multiple of group; 128 */
} gptq_params;

/* Defaults: GPTQ, group 128, sym, no act-order, percdamp 0.01, blocksize 128. */
void gptq_params_default(gptq_params *p);

typedef struct gptq_result {
    int32_t n, k, group;
    int32_t *qweight;       /* [k/8][n] */
    int32_t *qzeros;        /* [k/group][n/8] */
    uint16_t *scales;       /* [k/group][n] fp16 bits */
    int32_t *g_idx;         /* [k] */
    float *deq;             /* [n][k]: the dequantized weight the file decodes to */
    double damp_used;       /* final damping (absolute) for GPTQ, 0 for RTN */
} gptq_result;

/*
 * Quantize w (float [n][k], row-major, untouched) to 4 bits. For GPTQ, h
 * must hold at least one input with h->k == k; for RTN h is ignored and
 * may be NULL. Requires n % 8 == 0, k % 8 == 0, k % group == 0.
 * On success fills *ret (owned by the caller); on failure *ret is zeroed.
 */
int gptq_quantize(const float *w, int32_t n, int32_t k, const gptq_hessian *h,
                  const gptq_params *p, gptq_result *ret, lm_err *err);
void gptq_result_free(gptq_result *r);

/*
 * Decode a v1 layout back to float [n][k] (exactly the formula above, in
 * float32). Arrays as in gptq_result. g_idx may be NULL (then k/group).
 * Returns -EINVAL if a g_idx entry is out of range.
 */
int gptq_unpack(const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
                const int32_t *g_idx, int32_t n, int32_t k, int32_t group, float *ret_w,
                lm_err *err);

/* sum over rows of ||(A - B) x||^2 for x in X rows: the layer
 * reconstruction error of weight B against A on inputs X ([rows][k]). */
double gptq_recon_error(const float *a, const float *b, int32_t n, int32_t k, const float *x,
                        int64_t rows);

/* IEEE half <-> float, round to nearest even (no dependence on F16C). */
uint16_t gptq_fp16_from_float(float f);
float gptq_fp16_to_float(uint16_t h);

#endif
