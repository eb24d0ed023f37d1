/*
 * cuda_mega.cuh: a whole one-token decode step (every layer, up to the
 * final norm) in one persistent kernel.
 *
 * Why: at batch 1 a layer of the ordinary path is a chain of 8-9 small
 * kernels, each paying its launch, a DRAM latency it cannot hide and a
 * tail (docs/PERF.md, CUDA rounds 1-6). Here one block per SM runs every
 * layer; the phases of a layer are separated by grid barriers. A block's
 * share of a phase's weights is a few contiguous ranges (whole rows of
 * each piece), which it asks into L2 (bulk prefetch) one or two phases
 * before it uses them: the weight stream keeps going while blocks
 * compute, wait at barriers or run attention; the experts' as soon as
 * the routing is known. The phases of a layer:
 *   QKV    rms(x) (every block, from L2) -> its rows of the qkv product
 *   ATT    (KV head, run of 32-position steps) units: bias, q/k norm and
 *          rope of the heads it needs, the new k/v into the cache, online
 *          softmax; units of one KV head merged by the last to finish
 *   O      x += o(att)
 *   ROUTER rms(x) -> router logits (fp32, a row a block) and the shared
 *          expert's gate/up rows
 *   GU     top-k (every block, from the logits) -> the k experts' gate/up
 *          rows, SiLU(gate) * up
 *   DOWN   x += sum_j w_j down_j(h_j) (+ sigmoid(g) shared_down(h_s)): the
 *          block's rows of each expert's product, summed in expert order
 * A product's rows are split evenly over the blocks; inside a block a
 * team of TS lanes owns a row, each lane up to CB 32-weight chunks a
 * round (16-byte loads, dequantised in registers as (q - zero) * scale;
 * sums over 8 inputs in fp16, then fp32), in one small
 * non-inlined loop for every phase. Results are deterministic: every sum
 * has a fixed order.
 *
 * Cross-block data (x, qkv, att, logits, h, split partials) is read with
 * L2 loads (__ldcg) after a barrier (fence, counter, acquire); weights
 * with __ldg. A barrier waits at most timeout_cycles (2 s by default,
 * LIGHTMOE_CUDA_MEGA_TIMEOUT seconds: raise it under compute-sanitizer),
 * then sets *fail and every block leaves: the host reports the step as
 * failed (cu_forward).
 *
 * Supported (cu_mega_supported): every layer a MoE block; attention,
 * expert and shared-expert matrices INT4 without act-order; head_dim 64
 * or 128; nq / nkv a power of two <= 16; hidden <= 8192; top_k + shared
 * <= 12. Tensor parallelism and steps of more than one token use the
 * ordinary path.
 */
#ifndef LIGHTMOE_CUDA_MEGA_CUH
#define LIGHTMOE_CUDA_MEGA_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/cuda_int4_gemm.cuh"
#include "engine/cuda_model.h"
#include "engine/err.h"

typedef struct cu_mega_layer {
    const float *attn_norm, *mlp_norm; /* [H] */
    const float *router;               /* [E + has_shared][H] fp32 */
    const float *qkv_bias, *q_norm, *k_norm;
    cu_int4_weights qkv, o, gate_up, down;
    cu_int4_weights sh_gate_up, sh_down; /* n == 0: no shared expert */
    __half *kc, *vc;                     /* this layer's KV cache */
} cu_mega_layer;

typedef struct cu_mega_args {
    const cu_mega_layer *layers; /* device array [n_layers] */
    int32_t n_layers, H, nq, nkv, hd, E, k, renorm, has_shared, I, sI;
    float eps;
    const float *inv_freq;       /* [hd/2] */
    const __half *embed;         /* [vocab][H] */
    const int32_t *tok, *pos;    /* the step's token and its position */
    const int32_t *block_table;  /* its block table row */
    int32_t block_size;
    float *x;                    /* [H] residual stream (written here) */
    float *qkv;                  /* [(nq + 2 nkv) hd] */
    float *part;                 /* [nkv * max_units * G * (hd + 2)] */
    float *rlog;                 /* [E + 1] */
    __half *att;                 /* [nq hd] */
    __half *h;                   /* [k I + sI] */
    int32_t *attn_cnt;           /* [nkv], zero between launches */
    uint32_t *bar;               /* zeroed before every launch */
    int32_t *fail;               /* set to 1 if a barrier timed out */
    int32_t *active;             /* benchmarks: routed experts counter, or NULL */
    int32_t max_units;           /* attention units per KV head (part's capacity) */
    int64_t timeout_cycles;      /* a barrier's longest wait (clock64 cycles) */
    int32_t variant;             /* measurements: LIGHTMOE_CUDA_MEGA_V */
    long long *prof;             /* benchmarks: block 0's clock64 at the 12 phase edges of
                                  * every layer ([n_layers][12]: start, end of QKV, ATT, O,
                                  * ROUTER, GU, DOWN), or NULL */
} cu_mega_args;

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if the kernel can run this model; else 0 and why (a sentence). */
int cu_mega_supported(const cu_model *m, char *why, size_t n);

/* Grid (one block per SM) and dynamic shared memory for a; fails with
 * -ENOTSUP if a block does not fit an SM. Sets a->timeout_cycles and
 * applies the test settings below (a->max_units). */
int cu_mega_setup(cu_mega_args *a, int sms, int *grid, size_t *smem, lm_err *err);

/* Tests, for states set up afterwards: at most max_units attention units
 * per KV head (0: no cap), and a grid of `grid` blocks (0: one per SM;
 * more than fit the card makes the barriers time out). */
void cu_mega_set_test(int max_units, int grid);

/* Zeroes a->bar, then launches (no dependent launch: every SM must be free). */
int cu_mega_launch(const cu_mega_args *a, int grid, size_t smem, cudaStream_t st, lm_err *err);

/* The switch cu_state_create reads (LIGHTMOE_CUDA_MEGA=1 turns it on);
 * cu_mega_set returns the setting it replaces. */
int cu_mega_enabled(void);
int cu_mega_set(int on);

#ifdef __cplusplus
}
#endif
#endif
