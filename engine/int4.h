/*
 * int4.h: the engine's INT4 weight layout, declared once for C and CUDA.
 *
 * A linear layer y = W x with N outputs and K inputs is stored row by row
 * (one row per output), 4-bit values packed along K, with one fp16 scale and
 * one 4-bit zero point per (output, group of `group` consecutive inputs):
 *
 *   qs     uint8  [N][K/2]        byte j of row n: k = 2j in the low nibble,
 *                                 k = 2j+1 in the high nibble; values 0..15
 *   scales uint16 [N][K/group]    IEEE fp16 bit patterns
 *   zeros  uint8  [N][K/group]    the real zero point 0..16 (GPTQ's stored
 *                                 qzeros + 1, so a stored 15 gives 16: read
 *                                 it as a whole byte; 8 for symmetric)
 *   perm   int32  [K] or NULL     act-order: packed column j multiplies input
 *                                 x[perm[j]]; NULL means identity
 *   bias   float  [N] or NULL
 *
 *   W[n][perm[j]] = fp16_to_float(scales[n][j/group]) * (q(n, j) - zeros[n][j/group])
 *
 * The dequantised value is computed in float32 exactly as written above
 * (scale times the integer difference), which is also how transformers
 * dequantises a GPTQ layer; kernels on every backend keep that order.
 *
 * Why row-major by output: a decode step is a matrix-vector product, and a
 * contiguous row of K/2 bytes is what both a CPU core (SIMD along K) and a
 * GPU warp (16-byte loads along K, one warp per few rows) read fastest;
 * column-parallel tensor parallelism splits rows and row-parallel splits K
 * at group boundaries, both without repacking.
 *
 * Invariants (checked by int4_matrix_check): K % 32 == 0 so that a row is a
 * whole number of 16-byte vectors; group % 32 == 0 and K % group == 0; every
 * group, after the act-order permutation, is contiguous.
 *
 * The same struct describes host memory (CPU backend) and device memory
 * (CUDA backend: all pointers are device pointers); it owns nothing.
 */
#ifndef LIGHTMOE_INT4_H
#define LIGHTMOE_INT4_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INT4_K_ALIGN 32    /* K and group are multiples of this */

typedef struct int4_matrix {
    int32_t n;             /* outputs (rows) */
    int32_t k;             /* inputs (packed along a row) */
    int32_t group;         /* inputs per scale/zero group */
    const uint8_t *qs;     /* [n][k/2] */
    const uint16_t *scales;/* [n][k/group] fp16 */
    const uint8_t *zeros;  /* [n][k/group] 0..16 */
    const int32_t *perm;   /* [k] or NULL */
    const float *bias;     /* [n] or NULL */
} int4_matrix;

/* Bytes of each array for an n x k matrix with the given group. */
static inline size_t int4_qs_bytes(int32_t n, int32_t k) { return (size_t)n * (size_t)(k / 2); }
static inline size_t int4_group_count(int32_t n, int32_t k, int32_t group)
{
    return (size_t)n * (size_t)(k / group);
}
/* Total bytes of weight data (qs + scales + zeros), the figure memory and
 * bandwidth arithmetic use. */
static inline size_t int4_matrix_bytes(int32_t n, int32_t k, int32_t group)
{
    return int4_qs_bytes(n, k) + int4_group_count(n, k, group) * 3u;
}

/* The 4-bit value at row n, packed column j. */
static inline int int4_get(const int4_matrix *m, int32_t n, int32_t j)
{
    uint8_t b = m->qs[(size_t)n * (size_t)(m->k / 2) + (size_t)(j / 2)];
    return (j & 1) ? (b >> 4) : (b & 15);
}

#ifdef __cplusplus
static_assert(sizeof(uint16_t) == 2, "fp16 scales are 2 bytes");
#else
_Static_assert(sizeof(uint16_t) == 2, "fp16 scales are 2 bytes");
#endif

#ifdef __cplusplus
}
#endif
#endif
