/*
 * cuda_int4_gemm.cuh: INT4 x fp16 matrix products on the GPU, dense and
 * grouped by expert, in the engine's INT4 layout (engine/int4.h).
 *
 * Y[i][n] = sum_k W_e[n][k] * A[a_row(i)][k] for every "entry" i of a list
 * grouped by expert e. A dense layer is the special case of one expert and
 * the identity list. Three kernels compute the same function:
 *   - gemv (cuda_int4_gemv.cu): 1-4 rows (decode at batch 1-4); one team of
 *     lanes per 4 weight rows, 16-byte weight loads, dequantisation in
 *     registers, A reused across the 4 rows;
 *   - mma8 (cuda_int4_mma.cu): 5-16 rows (decode at batch 5-16); items
 *     of up to 8 rows, 16 weight rows a block as the A operand of
 *     mma.sync m16n8k16 straight from registers, the rows of A as its B;
 *   - mma (cuda_int4_mma.cu): many rows (prefill, large batches); tiles of
 *     BM rows x 128 outputs, cp.async 3-stage pipeline, weights dequantised
 *     from shared memory straight into mma.sync m16n8k16 B fragments.
 * cu_int4_matmul picks one from the row count known on the host.
 *
 * Act-order (perm) is applied by the caller (cu_gather_rows) before the
 * product: the kernels read A in packed-column order.
 *
 * Numerics: the mma kernels dequantise a weight as (q - zero) * scale in
 * fp16 (one rounding, relative 2^-11) and accumulate in fp32; the gemv
 * kernels (1-4 tokens, and the attention's fused output projection) keep
 * (q - zero) / 64 exact in fp16, sum 8 products with A in fp16 and add
 * them into fp32 times 64 x scale. Expected relative error of a row against
 * an fp64 reference: ~1e-3 (tests/cuda bound it at 1e-2 of the row norm).
 *
 * Work lists (grouped case, built on the GPU by cuda_moe): offsets[E+1]
 * delimit each expert's entries; items[y] = (expert, first entry) of the
 * y-th tile of `tile` entries; *n_items tiles exist, max_items bound the
 * grid so that the launch does not depend on data (CUDA-graph friendly).
 */
#ifndef LIGHTMOE_CUDA_INT4_GEMM_CUH
#define LIGHTMOE_CUDA_INT4_GEMM_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "engine/err.h"

/* E experts of identical shape stored back to back (E = 1 for dense). */
typedef struct cu_int4_weights {
    int32_t n, k, group, n_experts;
    const uint8_t *qs;      /* [E][n][k/2] */
    const __half *scales;   /* [E][n][k/group] */
    const uint8_t *zeros;   /* [E][n][k/group] */
} cu_int4_weights;

/* Which rows of A each expert multiplies, and where results go. */
typedef struct cu_gemm_rows {
    int32_t n_rows;          /* dense: rows of A and Y; grouped: entries */
    const int32_t *offsets;  /* [E+1] or NULL (dense) */
    const int2 *items;       /* [max_items] (expert, first entry) or NULL */
    const int32_t *n_items;  /* device count of items */
    int32_t max_items;
    int32_t tile;            /* entries per item the list was built for */
    const int32_t *a_rows;   /* [entries] row of A for entry i, NULL = i */
    const float *row_scale;  /* [entries] multiplier of Y row i, or NULL */
    int32_t plan_ready;      /* grouped: items, n_items and offsets (one grouping kernel
                              * writes all three) were written two or more launches before
                              * this product, so the one-token kernel may read them (and
                              * load the weights they name) before its dependency wait */
    const int32_t *out_rows; /* [entries] row of Y for entry i (CU_OUT_F32_ADD), NULL = i */
    /* One-token gemv only (tile 1, dense, CU_OUT_F32): when x_f32 is set, A
     * is not read; every block computes A = fp16(rmsnorm(x_f32[i]) * x_norm)
     * itself (sum of squares in fp32, as cu_rmsnorm), so that the norm
     * needs no launch of its own. K % 4 == 0, 256 <= K <= 8192. */
    const float *x_f32;
    const float *x_norm;
    float x_eps;
    /* Grouped one-token gemv only: if pf.qs, each block asks L2 for its share
     * (by blockIdx.x) of expert e's matrix in pf (the next product's weights)
     * once its own first loads are issued. Hint only: results never change. */
    cu_int4_weights pf;
    /* One-token expert products only (tile 1, no items): if route is set,
     * every block routes the token itself from route, its router logits
     * (E + has_shared floats, as cu_moe_route_token), and entry i is the
     * token's i-th choice (n_rows = k), so that no routing launch is
     * needed. route_scale: Y row i is scaled by that choice's weight.
     * route_sg, if set, receives the shared expert's gate (block 0, after
     * the dependency wait). route_ready: the logits were written two or
     * more launches back, so the block may route (and load the expert's
     * weights) before its dependency wait. With a row stride lda of 0,
     * every entry reads A's one row; with ldo 0 (CU_OUT_F32_ADD), every
     * entry adds into Y's one row. */
    const float *route;
    float *route_sg;
    int32_t route_e, route_k, route_renorm, route_shared, route_scale, route_ready;
} cu_gemm_rows;

typedef enum cu_out_mode {
    CU_OUT_F32 = 0,      /* Y[i][n] = v (float)            */
    CU_OUT_F32_ACC = 1,  /* Y[i][n] += v (float)           */
    CU_OUT_SILU_F16 = 2, /* rows (2j, 2j+1) = (gate, up): Y[i][j] = silu(g) * u (half) */
    CU_OUT_F32_ADD = 3,  /* Y[out_row(i)][n] += v, atomically (float; the order of the
                          * additions is not fixed); gemv only */
} cu_out_mode;

typedef enum cu_gemm_path {
    CU_GEMM_AUTO = 0,
    CU_GEMM_GEMV = 1,
    CU_GEMM_MMA = 2,
    CU_GEMM_MMA8 = 3, /* tests and measurements: the few-token kernel, items of 8 */
} cu_gemm_path;

#ifdef __cplusplus
extern "C" {
#endif

/* The entries-per-tile a call with at most `max_rows_per_expert` rows per
 * expert and `avg_rows` rows per expert on average will use; the grouping
 * kernel builds its item list for this tile. */
int cu_int4_tile_for(int max_rows_per_expert, int avg_rows, cu_gemm_path path);

/* Y = W A over the list; out is float* or __half* by mode, row stride ldo
 * elements. A is fp16 [rows][lda], lda % 8 == 0. Asynchronous on stream. */
int cu_int4_matmul(const cu_int4_weights *w, const cu_gemm_rows *rows, const __half *a, int lda,
                   void *out, int ldo, cu_out_mode mode, cu_gemm_path path,
                   cudaStream_t stream, lm_err *err);

/* Launchers of the two kernels (tile must match rows->tile when grouped). */
int cu_int4_gemv(const cu_int4_weights *w, const cu_gemm_rows *rows, const __half *a, int lda,
                 void *out, int ldo, cu_out_mode mode, int tile, cudaStream_t stream, lm_err *err);
int cu_int4_mma(const cu_int4_weights *w, const cu_gemm_rows *rows, const __half *a, int lda,
                void *out, int ldo, cu_out_mode mode, int tile, cudaStream_t stream, lm_err *err);

/* The checks every launcher above makes: K and the group multiples of 32,
 * K of the group, n > 0, lda % 8 == 0, an even n for the fused SiLU; who
 * names the launcher in the message. */
int cu_int4_check(const cu_int4_weights *w, int lda, cu_out_mode mode, const char *who,
                  lm_err *err);

/* The few-token product on the tensor cores (items of up to 8 rows of A,
 * 16 weight rows a block; every output mode; not the normalising input
 * nor routing in the product). cu_int4_matmul takes it for tile 8: path
 * CU_GEMM_MMA8, or the automatic path for 5 (LIGHTMOE_CUDA_MMA8_MIN, 2..16)
 * to 16 rows an expert (unless LIGHTMOE_CUDA_MMA8=0). */
int cu_int4_mma8(const cu_int4_weights *w, const cu_gemm_rows *rows, const __half *a, int lda,
                 void *out, int ldo, cu_out_mode mode, cudaStream_t stream, lm_err *err);
/* Tests and measurements: the automatic path's use of cu_int4_mma8 (1, the
 * default unless LIGHTMOE_CUDA_MMA8=0) or not (0). Returns the setting it
 * replaces. */
int cu_int4_set_mma8(int on);

/* out[n][k] (fp16, row-major) = the weights of expert 0 of w dequantised
 * exactly as the mma kernels do ((q - zero) * scale, one fp16 rounding;
 * the gemv kernels keep (q - zero) / 64 exact and scale their sums); for
 * prefill through cuBLAS (cuda_forward.cu). Waits for the previous kernel
 * before writing (dependent launch). */
int cu_int4_dequant(const cu_int4_weights *w, __half *out, cudaStream_t stream, lm_err *err);

/* Tests and measurements: chunks each lane of the one-token gemv loads per
 * step, 2 or 4 (4 for every product), 5 (4 for grouped products only);
 * the default is LIGHTMOE_CUDA_GEMV_ILP or the build's choice. */
void cu_int4_gemv_set_ilp(int chunks);
/* Tests and measurements: grouped one-token products (work list, no
 * routing in the product, at most two chunks a lane and row) stage their
 * weights through shared memory (1, the default unless
 * LIGHTMOE_CUDA_GEMV_STAGE=0) or hold them in registers (0); the same bits
 * either way. Returns the setting it replaces. */
int cu_int4_gemv_set_stage(int on);
/* Tests: how many launches took the staged kernel so far (all threads). */
long cu_int4_gemv_staged_launches(void);
/* Tests and measurements: teams of 64 lanes for one-token products with K
 * >= 4096 (1, the default unless LIGHTMOE_CUDA_GEMV_T64=0) or of 32 (0).
 * Returns the setting it replaces. */
int cu_int4_gemv_set_t64(int on);

/* out[i][j] = x[rows[i]][perm ? perm[e(i)][j] : j] as fp16: gathers and
 * permutes A for act-order layers (e(i) = ent_expert[i], or 0 if NULL). */
int cu_gather_rows(const __half *x, int ldx, const int32_t *rows, int n_rows, int k,
                   const int32_t *perm, const int32_t *ent_expert, __half *out,
                   cudaStream_t stream, lm_err *err);

#ifdef __cplusplus
}
#endif

#ifdef __CUDACC__
/* Block y of a launch -> (expert, first entry, end entry); false if the
 * block has no work (grouped lists shorter than the grid). */
__device__ __forceinline__ bool cu_item_lookup(const cu_gemm_rows &r, int y, int tile, int *e,
                                               int *start, int *end)
{
    if (!r.items) {
        *e = 0;
        *start = y * tile;
        *end = min(r.n_rows, *start + tile);
        return *start < r.n_rows;
    }
    /* both loads at once: y < max_items (the grid) is inside the list;
     * an entry past n_items is stale and not used */
    const int2 it = r.items[y];
    if (y >= *r.n_items)
        return false;
    *e = it.x;
    *start = it.y;
    *end = min(r.offsets[it.x + 1], it.y + tile);
    return true;
}
#endif
#endif
