/*
 * model.h: a loaded model: configuration plus every weight, in host memory.
 *
 * model_load reads a hub folder (config.json, generation_config.json,
 * model.safetensors or model-XXXXX-of-YYYYY.safetensors + index.json),
 * validates every file and every tensor the architecture needs (name, dtype,
 * shape), and builds the structs below. Errors name the file, the tensor
 * and what is wrong.
 *
 * Weight representation:
 *  - 16/32-bit matrices (`linear` of kind LINEAR_DENSE) point straight into
 *    the read-only safetensors mapping, in their file dtype (F32, F16, BF16),
 *    row-major [n][k] exactly as nn.Linear stores weight (out x in).
 *  - GPTQ INT4 matrices (LINEAR_INT4) are repacked once at load into the
 *    engine's layout (engine/int4.h), stay 4-bit, and are owned by the model.
 *    Act-order (g_idx) is expressed by int4_matrix.perm.
 *  - With model_load_options.quantize_int4, 16-bit expert/attention/MLP
 *    linears are quantized at load (round to nearest, asymmetric, one fp16
 *    scale and 4-bit zero per group) into LINEAR_INT4; router gates, the
 *    shared-expert gate, norms, embeddings and lm_head stay 16-bit.
 *  - Vectors (norm weights, biases) are converted to float32 at load.
 *
 * Shapes use the config: H = hidden, D = head_dim, Hq = n_heads * D,
 * Hkv = n_kv_heads * D, E = n_experts, I = moe_intermediate (mixtral:
 * intermediate), S = shared_intermediate, F = intermediate (dense layers).
 *
 * Ownership: the model owns everything it points to (mappings, repacked
 * INT4 arrays, float vectors); all pointers are valid until model_free.
 * Read-only after load: any number of threads and backends may share it.
 */
#ifndef LIGHTMOE_MODEL_H
#define LIGHTMOE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/config.h"
#include "engine/err.h"
#include "engine/int4.h"
#include "engine/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum linear_kind {
    LINEAR_DENSE = 0,           /* dtype/w */
    LINEAR_INT4 = 1,            /* q */
} linear_kind;

/* y[n] = sum_k W[n][k] x[k] (+ bias[n]). */
typedef struct linear {
    linear_kind kind;
    int32_t n;                  /* outputs */
    int32_t k;                  /* inputs */
    st_dtype dtype;             /* DENSE: ST_F32, ST_F16 or ST_BF16 */
    const void *w;              /* DENSE: [n][k] row-major, in dtype */
    int4_matrix q;              /* INT4: engine layout (q.n == n, q.k == k) */
    const float *bias;          /* [n] or NULL (for INT4 also in q.bias) */
} linear;

/* A SwiGLU MLP: down(silu(gate x) * up x). */
typedef struct mlp_weights {
    linear gate;                /* [width][H] */
    linear up;                  /* [width][H] */
    linear down;                /* [H][width] */
} mlp_weights;

typedef struct layer_weights {
    const float *attn_norm;     /* [H] input_layernorm */
    const float *ffn_norm;      /* [H] post_attention_layernorm */
    linear q;                   /* [Hq][H], bias [Hq] if cfg.qkv_bias */
    linear k;                   /* [Hkv][H] */
    linear v;                   /* [Hkv][H] */
    linear o;                   /* [H][Hq], bias if cfg.o_bias */
    const float *q_norm;        /* [D] qwen3_moe, else NULL */
    const float *k_norm;        /* [D] qwen3_moe, else NULL */
    int is_moe;                 /* cfg.layer_moe[i] */
    mlp_weights mlp;            /* !is_moe: dense MLP, width F */
    linear router;              /* is_moe: [E][H], always DENSE */
    mlp_weights *experts;       /* is_moe: [E], width I */
    int has_shared;             /* qwen2_moe */
    mlp_weights shared;         /* width S */
    linear shared_gate;         /* [1][H], always DENSE; y = sigmoid(.) * shared(x) */
} layer_weights;

typedef struct model_storage model_storage; /* private: mappings and owned arrays */

typedef struct model {
    model_config cfg;
    char *dir;                  /* the folder it was loaded from */
    linear embed;               /* [V][H] DENSE; row t is token t's embedding */
    const float *final_norm;    /* [H] model.norm */
    linear lm_head;             /* [V][H] DENSE; tied: the same data as embed */
    layer_weights *layers;      /* [n_layers] */
    int int4;                   /* 1 if any linear is LINEAR_INT4 */
    int32_t int4_group;         /* their group size (GPTQ group or the load option) */
    model_storage *storage;
} model;

typedef struct model_load_options {
    int quantize_int4;          /* quantize 16-bit linears to INT4 at load (RTN, asym) */
    int32_t group;              /* group size for quantize_int4 (128) */
} model_load_options;

void model_load_options_default(model_load_options *opt);

/* Load DIR (see above). opt may be NULL (defaults). */
int model_load(const char *dir, const model_load_options *opt, model **ret, lm_err *err);

/* Free everything; NULL and half-built models are fine. */
void model_free(model *m);

/* Bytes of weight data of one linear (dense: n*k*dtype; INT4: int4_matrix_bytes). */
size_t linear_bytes(const linear *l);

/* Weight bytes read per token in a decode step: attention, router, top_k
 * experts, shared expert, dense MLPs, lm_head and one embedding row. */
size_t model_active_bytes(const model *m);

/* Quantize a float row-major [n][k] matrix to INT4 (round to nearest,
 * asymmetric per group: scale = (max - min) / 15 rounded to fp16, zero =
 * round(-min / scale) clamped to 0..15, q = clamp(round(w / scale) + zero)).
 * Writes qs [n][k/2], scales [n][k/group], zeros [n][k/group] (caller
 * allocated, int4.h sizes). k % group == 0, group % 32 == 0 required. */
int int4_quantize_rtn(const float *w, int32_t n, int32_t k, int32_t group, uint8_t *qs,
                      uint16_t *scales, uint8_t *zeros, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
