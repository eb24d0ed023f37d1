/*
 * synth.h: synthesize a checkpoint folder in the hub layout with random
 * (seeded, deterministic) weights: config.json with the published shapes
 * of a preset, generation_config.json, model.safetensors or shards +
 * model.safetensors.index.json, and a small byte-level BPE tokenizer
 * (tokenizer.json, tokenizer_config.json with a ChatML chat template,
 * chat_template.jinja).
 *
 * Weights are written by streaming (safetensors_writer fill callbacks), so
 * a multi-GB preset never exists in memory. With gptq, every linear except
 * the router and the shared-expert gate is written in the GPTQ v1 layout
 * (qweight, qzeros = zero - 1, fp16 scales, g_idx; optionally act-order
 * and asymmetric zeros), the rest in fp16; otherwise everything is bf16.
 *
 * Scaling: embeddings N(0, 1), linears N(0, 1/sqrt(K)) (GPTQ: uniform 4-bit
 * codes with scales chosen to give that spread), norms near 1, lm_head
 * N(0, 3/sqrt(H)), so hidden states stay O(1) and logits are peaked.
 */
#ifndef LIGHTMOE_SYNTH_H
#define LIGHTMOE_SYNTH_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

typedef struct synth_options {
    const char *arch;           /* qwen2_moe, qwen3_moe, mixtral */
    const char *preset;         /* tiny, qwen1.5-moe-a2.7b, qwen3-30b-a3b, mixtral-8x7b */
    int gptq;                   /* write GPTQ INT4 linears */
    int32_t group;              /* GPTQ group size (0: 128) */
    int act_order;              /* GPTQ desc_act: random g_idx permutation */
    int asym;                   /* GPTQ asymmetric zeros (sym = false) */
    uint64_t seed;
    size_t shard_bytes;         /* max bytes per shard (0: 2 GiB; tiny presets: one file) */
    int32_t layers;             /* override num_hidden_layers (0: preset's) */
} synth_options;

void synth_options_default(synth_options *o);

/* Write the folder (created if missing; existing files overwritten). */
int synth_write(const char *outdir, const synth_options *o, lm_err *err);

/* Write only tokenizer.json, tokenizer_config.json and chat_template.jinja
 * for a vocabulary of `vocab` ids (specials take the last three ids). */
int synth_write_tokenizer(const char *outdir, int32_t vocab, lm_err *err);

#endif
