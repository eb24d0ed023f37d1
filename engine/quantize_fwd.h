/*
 * quantize_fwd.h: a checkpoint's tensors and a float32 layer-level forward
 * over whole causal sequences, for calibration (quantize.c).
 *
 * Why a separate forward from the serving backends: GPTQ needs every
 * Linear's inputs for all calibration tokens at once (to accumulate its
 * Hessian), needs to swap a layer's weights for their quantized values
 * mid-layer (true-sequential: q/k/v, then o, then gate/up, then down), and
 * must hold only one decoder layer in float at a time. So the unit here is
 * one layer applied to a [tokens][hidden] block of `n_seq` sequences of
 * `seq_len` tokens (positions 0..seq_len-1, causal attention without a KV
 * cache), with BLAS matrix products. It computes what transformers computes
 * (float32, eager): tests compare its full-model logits with the fixtures'
 * reference logits.
 *
 * Supported: qwen2_moe (shared expert + sigmoid gate, qkv bias), qwen3_moe
 * (q/k RMSNorm), mixtral (block_sparse_moe, w1/w2/w3), and dense MLP
 * layers (treated as one expert that every token uses with weight 1).
 *
 * Ownership: qfwd_model owns its open shards (mmapped, read-only) and the
 * config; a qfwd_layer owns its float copies. Not thread-safe.
 */
#ifndef LIGHTMOE_QUANTIZE_FWD_H
#define LIGHTMOE_QUANTIZE_FWD_H

#include <stddef.h>
#include <stdint.h>

#include "engine/config.h"
#include "engine/err.h"
#include "engine/safetensors.h"

#define QFWD_NAME_MAX 192

typedef struct qfwd_model {
    model_config cfg;
    int allow_gptq;             /* decode GPTQ Linears to float (reference use);
                                 * 0: an already quantized Linear is an error */
    int n_files;
    safetensors_file **files;
} qfwd_model;

/* Open DIR: config.json and model.safetensors or the shards listed in
 * model.safetensors.index.json. allow_gptq starts 0; set it after opening
 * to run a GPTQ checkpoint on its dequantized weights. */
int qfwd_model_open(const char *dir, qfwd_model *ret, lm_err *err);
void qfwd_model_close(qfwd_model *m);
/* The tensor named `name` in any shard, NULL when absent. */
const safetensors_tensor *qfwd_model_find(const qfwd_model *m, const char *name);
/* Float copy of a BF16/F16/F32 tensor whose element count must be `numel`;
 * *ret is malloc'd (caller frees). */
int qfwd_tensor_float(const qfwd_model *m, const char *name, int64_t numel, float **ret,
                      lm_err *err);

/* One Linear in float: y = W x (+ b). */
typedef struct qfwd_linear {
    int32_t n, k;               /* outputs, inputs */
    float *w;                   /* [n][k] */
    float *b;                   /* [n] or NULL */
    char name[QFWD_NAME_MAX];   /* checkpoint prefix, "model.layers.0.self_attn.q_proj" */
} qfwd_linear;

typedef struct qfwd_layer {
    int32_t index;
    float *in_norm, *post_norm; /* [hidden] */
    float *q_norm, *k_norm;     /* [head_dim] or NULL */
    qfwd_linear q, k, v, o;
    int32_t n_experts;          /* 1 for a dense MLP layer (router NULL) */
    float *router;              /* [n_experts][hidden] or NULL */
    char router_name[QFWD_NAME_MAX];
    qfwd_linear *gate, *up, *down; /* [n_experts] */
    int has_shared;
    qfwd_linear sgate, sup, sdown;
    float *shared_gate;         /* [hidden] or NULL (qwen2_moe shared_expert_gate) */
} qfwd_layer;

int qfwd_layer_load(const qfwd_model *m, int32_t index, qfwd_layer *ret, lm_err *err);
void qfwd_layer_free(qfwd_layer *l);

/* Names of every tensor of the layer that quantization turns into 4 bits
 * (the Linear weights above, router and shared-expert gate excluded). */
int qfwd_layer_linears(qfwd_layer *l, qfwd_linear **ret, int32_t max);

/* y[T][n] = x[T][k] W^T (+ b). */
void qfwd_linear_apply(const qfwd_linear *l, const float *x, int64_t t, float *y);

/* out[T][hidden] = rmsnorm(x) * w. */
void qfwd_rmsnorm(const float *x, const float *w, int64_t t, int32_t d, float eps, float *out);

/* Attention of layer l on xn (already normed) [T][hidden], T = n_seq *
 * seq_len. Writes the o_proj input to ret_o_in [T][n_heads*head_dim] and, if
 * out is not NULL, the o_proj output to out [T][hidden]. */
int qfwd_attention(const qfwd_model *m, const qfwd_layer *l, const float *xn, int32_t n_seq,
                   int32_t seq_len, float *ret_o_in, float *out, lm_err *err);

/* Routing of xn [T][hidden]: for each token its top_k experts and weights
 * (as the architecture defines them); dense layers: expert 0, weight 1. */
int qfwd_route(const qfwd_model *m, const qfwd_layer *l, const float *xn, int64_t t,
               int32_t *ret_expert /* [T][top_k] */, float *ret_weight /* [T][top_k] */);

/* h[T][width] = silu(x gate^T) * (x up^T): the down projection's input. */
void qfwd_mlp_hidden(const qfwd_linear *gate, const qfwd_linear *up, const float *x, int64_t t,
                     float *h);

/* The MoE (or dense MLP) block output for xn, added into acc [T][hidden]. */
int qfwd_moe_add(const qfwd_model *m, const qfwd_layer *l, const float *xn, int64_t t, float *acc,
                 lm_err *err);

/* Whole decoder layer: h [T][hidden] updated in place. */
int qfwd_layer_forward(const qfwd_model *m, const qfwd_layer *l, float *h, int32_t n_seq,
                       int32_t seq_len, lm_err *err);

/* Embedding lookup: h[T][hidden] for tokens[T]. */
int qfwd_embed(const qfwd_model *m, const int32_t *tokens, int64_t t, float *h, lm_err *err);

/* Final norm + lm_head: logits [T][vocab] from h [T][hidden]. */
int qfwd_logits(const qfwd_model *m, const float *h, int64_t t, float *logits, lm_err *err);

#endif
