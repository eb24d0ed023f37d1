/*
 * cuda_model.h: a MoE decoder held on one GPU, and its forward pass.
 *
 * cu_model describes weights already in device memory (who filled them:
 * backend_cuda from an engine model, or a benchmark with random weights);
 * it owns nothing: the filler frees. cu_state owns everything a step needs
 * (stream, cuBLAS handle, activations and scratch sized for max_tokens,
 * the paged KV cache, pinned staging for the batch description), all
 * allocated at creation / kv_init, so cu_forward allocates nothing.
 *
 * Layer computation (qwen2_moe / qwen3_moe / mixtral, as transformers):
 *   x += o(attn(rope(norm_qk(qkv(rms(x)) + b))))
 *   h  = rms(x); x += sum_j w_j down_e(silu(gate_e h) * up_e h)
 *                   (+ sigmoid(g . h) shared(h))
 * Residual stream fp32; products take fp16 inputs and accumulate in fp32;
 * router in fp32; KV cache fp16.
 *
 * Matrices with gate and up are stored interleaved by rows (row 2j =
 * gate j, row 2j+1 = up j) so that SiLU(gate) * up fuses into the product.
 * q, k, v are one matrix of (nq + 2 nkv) hd rows.
 *
 * Tensor parallelism: cu_options.comm (see there); with it cu_forward
 * writes batch->logits on rank 0 only, and cu_forward_device leaves this
 * rank's vocabulary slice of the logits on the device.
 *
 * Threads: one thread at a time per cu_state (the engine thread; for
 * tensor parallelism, the rank's thread).
 */
#ifndef LIGHTMOE_CUDA_MODEL_H
#define LIGHTMOE_CUDA_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/backend.h"
#include "engine/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cu_wkind { CU_W_NONE = 0, CU_W_F16 = 1, CU_W_INT4 = 2 } cu_wkind;

/* A linear layer, or n_experts of them of one shape stored back to back. */
typedef struct cu_linear {
    cu_wkind kind;
    int32_t n, k, group, n_experts;
    const uint16_t *w16;     /* F16: [E][n][k] fp16 */
    const uint8_t *qs;       /* INT4 (engine/int4.h): [E][n][k/2] */
    const uint16_t *scales;  /* [E][n][k/group] fp16 */
    const uint8_t *zeros;    /* [E][n][k/group] */
    const int32_t *perm;     /* [E][k] or NULL */
} cu_linear;

typedef struct cu_layer {
    const float *attn_norm, *mlp_norm; /* [H] */
    cu_linear qkv;                     /* (nq + 2 nkv) hd x H */
    const float *qkv_bias;             /* [(nq + 2 nkv) hd] or NULL */
    const float *q_norm, *k_norm;      /* [hd] or NULL */
    cu_linear o;                       /* H x nq hd */
    int32_t moe;                       /* 1: MoE block, 0: dense MLP in gate_up/down */
    const float *router;               /* [E + has_shared][H] fp32; last row: shared gate */
    cu_linear gate_up;                 /* [E][2I][H] interleaved, or dense [2I][H] */
    cu_linear down;                    /* [E][H][I] or dense */
    cu_linear sh_gate_up, sh_down;     /* shared expert, kind NONE if absent */
} cu_layer;

typedef struct cu_model {
    int32_t n_layers, hidden, nq, nkv, head_dim, vocab, max_ctx;
    int32_t n_experts, top_k, renorm, has_shared;
    int32_t inter_max;                 /* max intermediate width of any MLP (experts, dense, shared) */
    float eps, rope_theta;
    const uint16_t *embed;             /* [vocab][H] fp16 */
    const float *final_norm;           /* [H] */
    cu_linear lm_head;                 /* F16 [vocab][H] (or INT4) */
    const cu_layer *layers;            /* host array [n_layers] */
} cu_model;

typedef struct cu_options {
    int32_t max_tokens;   /* most tokens in one forward (default 2048) */
    int32_t max_logits;   /* most logit rows in one forward (default max_tokens) */
    int32_t path;         /* 0 auto, 1 force the gemv kernel, 2 force the mma kernel (never
                           * cuBLAS for INT4), 3 dense INT4 layers dequantised to fp16 +
                           * cuBLAS at every size (auto: from 512 rows on) */
    int32_t portable;     /* 1: never use Hopper-only code (there is none yet: same kernels) */
    int32_t graphs;       /* 1: replay decode steps (one token per piece) as CUDA graphs,
                           * captured per (tokens, logit rows, table stride); INT4 experts */
    /* Tensor parallelism (engine/tp_shard.h): the model is rank comm->rank's
     * shard (nq, nkv, widths per rank; embed and lm_head hold vocabulary rows
     * [vocab_begin, vocab_begin + lm_head.n) of vocab), and the step adds one
     * all-reduce after the embedding lookup, after attention and after the
     * MoE/MLP block, and gathers the logits at vocab_stride columns per rank
     * (cuda_tp.cuh). NULL: the whole model, no collectives. */
    struct comm *comm;
    int32_t vocab_begin, vocab_stride;
} cu_options;

typedef struct cu_state cu_state;

int cu_state_create(const cu_model *m, const cu_options *o, cu_state **ret, lm_err *err);
int cu_state_kv_init(cu_state *s, int32_t block_size, int32_t n_blocks, lm_err *err);
int cu_state_kv_copy(cu_state *s, int32_t src, int32_t dst, lm_err *err);
/* One step (engine/backend.h semantics); logits land in batch->logits. */
int cu_forward(cu_state *s, const backend_batch *batch, lm_err *err);
/* Like cu_forward but leaves the logits on the device (benchmarks). */
int cu_forward_device(cu_state *s, const backend_batch *batch, lm_err *err);
size_t cu_state_kv_bytes_per_token(const cu_state *s);
/* Benchmarks: count (layer, expert) pairs that received tokens, summed over
 * the MoE layers of the steps run since the last read. Counting adds a
 * launch a layer (not chained to its neighbours: keep it out of timed
 * steps); switching it on or off drops the captured decode graphs. */
int cu_state_count_experts(cu_state *s, int on, lm_err *err);
long cu_state_read_experts(cu_state *s);
/* Benchmarks: time every launch group with events (disables graphs);
 * report writes "op ms (share), ..." of the steps since the last report. */
int cu_state_profile(cu_state *s, int on, lm_err *err);
int cu_state_profile_report(cu_state *s, char *buf, size_t size);
size_t cu_state_free_bytes(const cu_state *s);
/* penalty entries a step when this state samples on the device
 * (backend_batch.picks; cuda_sample.cuh), 0 when it does not */
int cu_state_sample_cap(const cu_state *s);
/* Tests: decode-step CUDA graphs captured so far (0 when graphs are off
 * or s is NULL). */
int cu_state_graph_count(const cu_state *s);
/* Tests: products launched folded (unless LIGHTMOE_CUDA_FOLD=0 at
 * creation: qkv normalising its input, down products adding into the
 * residual; unless LIGHTMOE_CUDA_MERGE_O=0: the attention merge doing
 * o_proj) since creation; a captured graph counts once. */
long cu_state_folds(const cu_state *s);
/* Tests: MoE blocks launched without a routing kernel (the fold on and
 * LIGHTMOE_CUDA_FOLD_ROUTE=1 at creation: the experts' products route the
 * token themselves) since creation, as above. */
long cu_state_routed(const cu_state *s);
/* Tests: MoE blocks whose router's dot products the merge + o_proj launch
 * made (one-token steps, LIGHTMOE_CUDA_ROUTE_O=1 at creation;
 * cu_route_o in cuda_attn.cuh) since creation, as above. */
long cu_state_routed_o(const cu_state *s);
/* 1 if one-token steps run as one persistent kernel (cuda_mega.cuh);
 * else 0, and *why (if why) says why not. */
int cu_state_mega(const cu_state *s, const char **why);
/* Benchmarks (LIGHTMOE_CUDA_MEGA_PROF=1 when the KV cache was set up): the
 * last one-token step's time in each phase and at each barrier, averaged
 * over the layers, as text; 0 if there is none. Synchronises. */
int cu_state_mega_report(cu_state *s, char *buf, size_t size);
void cu_state_destroy(cu_state *s);

#ifdef __cplusplus
}
#endif
#endif
