/*
 * config.h: the model configuration, parsed from a hub folder's config.json
 * (+ generation_config.json), for the architectures the engine implements.
 *
 * Architectures (config.json model_type): qwen2_moe, qwen3_moe, mixtral.
 * Both spellings found on the hub are accepted: rope_parameters.rope_theta
 * (transformers 5) or rope_theta; num_local_experts or num_experts; head_dim
 * explicit, null or absent (then hidden_size / num_attention_heads).
 *
 * Refused with -ENOTSUP and a message naming the field and value, never
 * silently ignored: an unknown model_type, a rope type other than "default"
 * (rope_scaling / rope_parameters.rope_type), an active sliding window, an
 * activation other than silu, a quantization method other than GPTQ 4-bit
 * with checkpoint_format "gptq". Missing required fields are -EINVAL naming
 * the field.
 *
 * model_config is plain data (no pointers), so it can be copied freely.
 */
#ifndef LIGHTMOE_CONFIG_H
#define LIGHTMOE_CONFIG_H

#include <stdint.h>

#include "engine/err.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MODEL_MAX_LAYERS 256
#define MODEL_MAX_EOS 8

typedef enum model_arch {
    MODEL_ARCH_QWEN2_MOE = 1,
    MODEL_ARCH_QWEN3_MOE,
    MODEL_ARCH_MIXTRAL,
} model_arch;

typedef struct model_quant_config {
    int gptq;                   /* 1 when quantization_config.quant_method == "gptq" */
    int32_t bits;               /* 4 */
    int32_t group_size;         /* -1 in the file means "whole K": stored here as 0 */
    int sym;
    int desc_act;
    char checkpoint_format[16]; /* "gptq" */
} model_quant_config;

typedef struct model_config {
    model_arch arch;
    char model_type[32];
    int32_t vocab;              /* vocab_size: rows of embed_tokens and lm_head */
    int32_t hidden;             /* hidden_size */
    int32_t n_layers;           /* num_hidden_layers */
    int32_t n_heads;            /* num_attention_heads */
    int32_t n_kv_heads;         /* num_key_value_heads (GQA) */
    int32_t head_dim;
    int32_t intermediate;       /* intermediate_size: dense MLP layers (mixtral: expert width) */
    int32_t moe_intermediate;   /* per-expert width */
    int32_t shared_intermediate;/* qwen2_moe shared expert width, 0 = none */
    int32_t n_experts;
    int32_t top_k;              /* num_experts_per_tok */
    int norm_topk_prob;         /* renormalise the top-k weights to sum 1 (mixtral: always) */
    int qkv_bias;               /* q/k/v projections have biases */
    int o_bias;                 /* o_proj has a bias (qwen3 attention_bias) */
    int qk_norm;                /* qwen3: RMSNorm over head_dim on q and k before RoPE */
    int tie_embeddings;         /* lm_head shares embed_tokens */
    float rms_eps;
    float rope_theta;
    int32_t max_position;       /* max_position_embeddings */
    uint8_t layer_moe[MODEL_MAX_LAYERS]; /* 1: sparse MoE block, 0: dense MLP */
    int32_t bos_id;             /* -1 if none */
    int32_t n_eos;
    int32_t eos_ids[MODEL_MAX_EOS];
    model_quant_config quant;
} model_config;

/* Parse DIR/config.json and, if present, DIR/generation_config.json (whose
 * eos_token_id, an int or a list, wins over config.json's). */
int config_load(const char *dir, model_config *ret, lm_err *err);

/* Same from JSON text (generation_json may be NULL); `what` names the
 * source in messages. */
int config_parse(const char *config_json, const char *generation_json, const char *what,
                 model_config *ret, lm_err *err);

const char *config_arch_name(model_arch a);

#ifdef __cplusplus
}
#endif
#endif
