/*
 * quantize.h: a 16-bit checkpoint -> a GPTQ 4-bit checkpoint (v1 layout),
 * the engine of `lightmoe quantize`.
 *
 * Procedure (GPTQ, true-sequential, as AutoGPTQ does it for MoE models):
 * the calibration sequences are embedded, then for each decoder layer in
 * turn (only that layer is held in float):
 *   1. attention input (after input_layernorm) -> one Hessian shared by
 *      q/k/v -> quantize q, k, v;
 *   2. attention rerun with the quantized q/k/v -> o_proj's input Hessian ->
 *      quantize o;
 *   3. residual + post_attention_layernorm; the 16-bit router picks each
 *      token's experts; each expert's gate/up Hessian comes from the tokens
 *      routed to it; quantize gate and up; its down Hessian from
 *      silu(gate x) * up x through the quantized gate/up; quantize down;
 *      the shared expert (qwen2_moe) sees every token;
 *   4. the layer's output through the quantized weights becomes the next
 *      layer's input (errors of earlier layers are seen by later ones).
 * Expert fallback: an expert that receives fewer than min_expert_tokens
 * calibration tokens is calibrated on all calibration tokens of the layer
 * instead (as if every token were routed to it, unweighted): its Hessian
 * then describes the distribution of the block's input, which is what the
 * expert will see, instead of a rank-deficient estimate from a handful of
 * tokens. The count of such experts is reported per layer.
 *
 * Stays 16-bit (copied unchanged): embeddings, lm_head, norms, q/k norms,
 * router gates, shared_expert_gate, biases. Written to out_dir:
 * model.safetensors (or model-0000i-of-0000n.safetensors + index when above
 * max_shard_bytes), config.json with quantization_config, quantize_config.json,
 * and the tokenizer / template / generation config files of the source.
 *
 * Held-out sequences (n_heldout) run through the same pipeline but never
 * enter a Hessian; on them each Linear's ||W X - Q X||^2 is measured for
 * the chosen method and for RTN, summed per layer and reported.
 *
 * Ownership: opts and the token array belong to the caller; nothing is
 * kept after quantize_run returns. Callbacks run on the calling thread.
 */
#ifndef LIGHTMOE_QUANTIZE_H
#define LIGHTMOE_QUANTIZE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "engine/gptq.h"

#define QUANTIZE_DEFAULT_MIN_EXPERT_TOKENS 256
#define QUANTIZE_DEFAULT_SHARD_BYTES ((size_t)4 << 30)

typedef struct quantize_progress {
    int32_t layer, n_layers;    /* layer being processed, 0-based */
    const char *stage;          /* "attention", "experts", "shared expert", "writing" */
    int32_t item, n_items;      /* expert i of n within the stage, else 0/0 */
    double elapsed_s, eta_s;    /* eta < 0: unknown yet */
} quantize_progress;

typedef struct quantize_layer_stats {
    int32_t layer;
    int32_t n_linears;
    double err_method;          /* sum ||W X - Q X||^2 on held-out inputs, chosen method */
    double err_rtn;             /* same for RTN of the same weights */
    double ref;                 /* sum ||W X||^2 (for relative numbers) */
    int32_t n_fallback_experts; /* experts calibrated on all tokens */
    int64_t min_expert_tokens;  /* fewest calibration tokens any expert received */
    int32_t worse_linears;      /* Linears where the method's error > RTN's */
} quantize_layer_stats;

typedef struct quantize_opts {
    const char *model_dir;      /* bf16 / fp16 checkpoint (hub layout) */
    const char *out_dir;        /* created if missing; files overwritten */
    gptq_params gptq;           /* method, group, sym, act_order, percdamp */
    const int32_t *tokens;      /* [(n_calib + n_heldout) * seq_len] or NULL (RTN only) */
    int32_t n_calib, n_heldout, seq_len;
    int32_t min_expert_tokens;  /* 0: QUANTIZE_DEFAULT_MIN_EXPERT_TOKENS */
    size_t max_shard_bytes;     /* 0: QUANTIZE_DEFAULT_SHARD_BYTES */
    void (*on_progress)(void *user, const quantize_progress *p);
    void (*on_layer)(void *user, const quantize_layer_stats *s);
    /* Each quantized Linear as it is done: its checkpoint prefix and the
     * dequantized weight [n][k] the written file decodes to (valid during
     * the call only). For tests and tools that check the output. */
    void (*on_linear)(void *user, const char *name, const float *deq, int32_t n, int32_t k);
    void *user;
    int gptq_cuda;              /* 1: GPTQ of each Linear on the GPU (gptq_cuda.h) */
} quantize_opts;

/* Totals of a finished run (bytes of tensor data as written). */
typedef struct quantize_summary {
    size_t bytes_out;           /* all tensors of the output */
    size_t bytes_in;            /* all tensors of the source */
    size_t bytes_linear_out;    /* qweight + qzeros + scales + g_idx */
    size_t bytes_linear_in;     /* the same Linears' 16-bit weights */
    int32_t n_linears;
    int32_t n_shards;
} quantize_summary;

/* Check that model_dir can be quantized with opts (architecture known, not
 * already quantized, group divides every Linear's K and is a multiple of
 * 32, enough calibration for GPTQ) without doing the work. */
int quantize_check(const quantize_opts *o, lm_err *err);

int quantize_run(const quantize_opts *o, quantize_summary *ret, lm_err *err);

#endif
