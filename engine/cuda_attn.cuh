/*
 * cuda_attn.cuh: attention over the paged KV cache, and the batch layout
 * the attention kernels share with cuda_rope (qkv post-processing).
 *
 * KV cache of one layer: K and V each fp16 [n_blocks][block_size][nkv][hd];
 * token at position p of a sequence lives in block block_table[seq][p / bs],
 * slot p % bs (engine/backend.h). The new tokens' K/V are written by
 * cu_qkv_post before attention reads them, or at decode by the attention
 * launch itself (cu_attn_qkv, cuda_rope.cuh).
 *
 * Attention (cu_attn): a block takes one "tile" of up to bq consecutive
 * query tokens of one sequence and one KV head (so G = nq/nkv query heads
 * share every K/V load: GQA), streams the context 32 positions at a time
 * through shared memory with an online softmax (no T x T matrix, FlashAttention
 * style), causal per query row. The context may be split over nsplit blocks
 * (flash-decoding: long contexts at small batch keep every SM busy); the
 * splits' (max, sum, unnormalised output) are merged by a second kernel,
 * or, when the batch carries counters, by the last block of each (tile,
 * KV head) to finish (fence + counter; it resets its counter to zero, so
 * the counters stay zero between launches and a graph can replay them).
 * Supported: hd in {64, 128, 256}, bq * G <= 64, nsplit <= CU_ATTN_MAX_SPLIT
 * (CU_ATTN_MAX_SPLIT_OWN with counters).
 *
 * Tiles of several tokens (prefill) at hd 64 or 128 run on the tensor
 * cores instead (k_attn_mma: 64 positions a step, mma.sync,
 * FlashAttention-2) unless LIGHTMOE_CUDA_ATTN_MMA=0; its splits are always
 * merged by the merge kernel and the counters are left as they are.
 * Decode tiles with the q/k/v post-processing (cu_attn_qkv) at hd 64 or
 * 128 and G <= 16 run on the tensor cores too (k_attn_dec_mma: the 16-row
 * q tile of a KV head against 32-position K/V tiles, a split's steps dealt
 * to 4 warps) when LIGHTMOE_CUDA_ATTN_DMMA=1 and the batch has no counters.
 */
#ifndef LIGHTMOE_CUDA_ATTN_CUH
#define LIGHTMOE_CUDA_ATTN_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "engine/err.h"

#define CU_ATTN_MAX_SPLIT 256    /* splits merged by the merge kernel */
#define CU_ATTN_MAX_SPLIT_OWN 32 /* by the attention's last block (counters): a lane each */

typedef struct cu_attn_batch {
    int32_t T;                  /* query tokens */
    const int32_t *tok_seq;     /* [T] piece of each token (row of block_table) */
    const int32_t *tok_pos;     /* [T] position of each token */
    const int32_t *block_table; /* [n_seqs][max_blocks] */
    int32_t max_blocks;
    int32_t block_size;
    const int2 *tiles;          /* [n_tiles] (first token, count <= bq), same piece */
    int32_t n_tiles;
    int32_t bq;
    int32_t nsplit;             /* context splits per tile (>= 1) */
    int32_t *counters;          /* [n_tiles * nkv] zeroed, or NULL: see cu_attn */
    int32_t early;              /* cu_attn_qkv: the first step's K/V loads before the
                                 * dependency wait (cu_early_loads) */
} cu_attn_batch;

typedef struct cu_attn_shape {
    int32_t nq, nkv, hd;
} cu_attn_shape;

/* One-token steps: the merge + o_proj launch also makes the MoE router's
 * dot products (cu_attn_merge_o_route, cuda_rope.cuh; the route kernel
 * cu_moe_norm_route finishes them). With x the residual before o_proj and
 * o = W_o attention, the router's logits are inv * sum_j wr[e][j] nw[j]
 * (x[j] + o[j]) (inv: the MLP norm's 1/rms of x + o); the launch adds into
 * u[e] the part x gives and m[e] . attention, m = (wr * nw) W_o made once
 * at load (cu_route_o_matrix, cuda_moe.cuh), so that no launch reads the
 * router's rows after o_proj. Rows: the experts, and the shared expert's
 * gate if any. */
#define CU_ROUTE_O_ROWS_PER_SLICE 16 /* router rows a slice of 128 o_proj rows, at most */
typedef struct cu_route_o {
    const float *m;  /* [rows][nq * hd] fp32 */
    const float *wr; /* [rows][H] the router's rows, fp32 */
    const float *nw; /* [H] the MLP norm's weights */
    const float *x;  /* [H] the residual before o_proj (not written by the launch) */
    float *u;        /* [nc][rows], zero before the launch: head h adds into copy h % nc */
    int32_t rows, nc;
    int32_t x_ready; /* x is read before the dependency wait: its last writer is at least
                      * two launches back and every launch between waits before it lets
                      * the next one start (cu_early_loads); 0: after the wait */
} cu_route_o;

#ifdef __cplusplus
extern "C" {
#endif

/* Tests and measurements: 1 (the default, unless LIGHTMOE_CUDA_ATTN_PIPE=0)
 * issues each 32-position step's K/V loads while the previous step is
 * computed (tiles of up to 16 rows), 0 loads each step after the last.
 * Returns the setting it replaces. */
int cu_attn_set_pipe(int on);

/* Tests and measurements: 1 (the default, unless LIGHTMOE_CUDA_ATTN_MMA=0)
 * runs prefill tiles (bq > 1, hd 64 or 128, q given) on the tensor cores:
 * mma.sync with fp16 q and probabilities, fp32 accumulators; 0 keeps them
 * on k_attn. Returns the setting it replaces. */
int cu_attn_set_mma(int on);

/* Tests and measurements: 1 (0 is the default, unless
 * LIGHTMOE_CUDA_ATTN_DMMA=1) runs decode tiles with q/k/v post-processing
 * (cu_attn_qkv, cu_attn_qkv_o; no counters, hd 64 or 128, at most 16 query
 * heads a KV head) on the tensor cores: fp16 q and probabilities, fp32
 * accumulators, a split's steps dealt to 4 warps; 0 keeps them on k_attn.
 * Returns the setting it replaces. */
int cu_attn_set_dmma(int on);

/* Tests and measurements: 1 (the default, unless LIGHTMOE_CUDA_ATTN_W8=0)
 * runs k_attn tiles of 5-16 query rows in blocks of 8 warps (a warp 1 or
 * 2 rows) when the launch has at most 320 blocks, 0 always in 4 warps of
 * 2-4 rows. Returns the setting it replaces. */
int cu_attn_set_w8(int on);

/* Tests and measurements: 1 (the default, unless LIGHTMOE_CUDA_MERGE_PF=0)
 * makes cu_attn_merge_o load the splits' values of its dimensions together
 * with their (max, sum), one L2 round trip after its wait instead of two;
 * the same sums in the same order. Returns the setting it replaces. */
int cu_attn_set_merge_pf(int on);

/* Floats of split scratch cu_attn needs for this batch. */
size_t cu_attn_scratch_floats(const cu_attn_shape *s, int n_tiles, int bq, int nsplit);

/* out[t][h*hd + d] (fp16) = softmax(q k^T / sqrt(hd)) v for each query
 * token t, head h; q fp32 [T][nq][hd]; part: scratch of
 * cu_attn_scratch_floats floats. */
int cu_attn(const cu_attn_shape *s, const float *q, const __half *kc, const __half *vc,
            const cu_attn_batch *b, float *part, __half *out, cudaStream_t st, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
