/*
 * ops_cpu_int.h: what ops_cpu.c shares with its ISA-specific kernel files
 * (ops_cpu_avx512.c). Not a contract: only these two files include it.
 *
 * op_linear splits the output rows of one call over the pool; each task
 * gets a lin_ctx (read only) and a range of rows, and writes y[t][r] for
 * every token row t < m of its rows.
 */
#ifndef LIGHTMOE_OPS_CPU_INT_H
#define LIGHTMOE_OPS_CPU_INT_H

#include "engine/half.h"
#include "engine/ops_cpu.h"

typedef struct lin_ctx {
    cpu_pool *p;
    const linear *W;
    const float *x;       /* [m][ldx]; for INT4, in the kernel's arranged order */
    int32_t ldx, m;
    float *y;             /* [m][ldy] */
    int32_t ldy;
} lin_ctx;

/* Element i of a dense weight array of type d, as float (the scalar path
 * and the vector kernels' column tails). */
static inline float ops_dense_elem(st_dtype d, const void *p, size_t i)
{
    switch (d) {
    case ST_F32: return ((const float *)p)[i];
    case ST_F16: return fp16_to_float(((const uint16_t *)p)[i]);
    case ST_BF16: return bf16_to_float(((const uint16_t *)p)[i]);
    default: return 0.f;
    }
}

/* Dense tiles of NR rows starting at r0, at column j: prefetch the same
 * 64-byte line of the next tile's rows into L1 and of the tile after into
 * L2; the hardware prefetchers lose track of a tile's short interleaved row
 * streams (fp16 rows stream 14.5 -> 22 GB/s per core). Call once per line. */
static inline __attribute__((always_inline)) void
ops_prefetch_dense_rows(const linear *W, st_dtype dt, int32_t r0, int NR, int32_t j)
{
    size_t es = dt == ST_F32 ? 4 : 2;
    for (int i = 0; i < NR; i++) {
        const char *w = (const char *)W->w;
        __builtin_prefetch(w + ((size_t)(r0 + NR + i) * (size_t)W->k + (size_t)j) * es, 0, 3);
        __builtin_prefetch(w + ((size_t)(r0 + 2 * NR + i) * (size_t)W->k + (size_t)j) * es, 0, 2);
    }
}

/* ---- AVX-512 kernels (ops_cpu_avx512.c), compiled with target attributes
 * and called only when ops_avx512_supported() says the CPU and the OS
 * support AVX-512 F/BW/VL/DQ. */
int ops_avx512_supported(void);

/* Copy the m rows of x (stride ldx) into dst ([m][k]) in the order the
 * AVX-512 INT4 kernel reads them, with act-order's permutation folded in. */
void ops_avx512_arrange_int4(const int4_matrix *q, const float *x, int32_t ldx, int32_t m,
                             float *dst);

/* cpu_task_fn over output rows for INT4 (x arranged as above) and dense weights. */
void ops_avx512_linear_task(void *vc, int64_t b, int64_t e, int thread);

#endif
