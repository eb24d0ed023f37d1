/*
 * cuda_synth.h: a cu_model of a given shape with random weights made
 * directly in GPU memory, for kernel tests (batched == unbatched) and for
 * benchmarks of real model shapes (qwen3-30b-a3b, qwen1.5-moe-a2.7b) that
 * would take minutes to write, read and upload as checkpoint files.
 *
 * Weights are uniform random, scaled by 1/sqrt(fan-in) so activations stay
 * O(1) through the layers; INT4 groups get random scales and zero 8
 * (symmetric GPTQ). The model owns its device memory: free it with
 * cu_synth_free.
 */
#ifndef LIGHTMOE_CUDA_SYNTH_H
#define LIGHTMOE_CUDA_SYNTH_H

#include <stdint.h>

#include "engine/cuda_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cu_synth_config {
    const char *name;
    int32_t n_layers, hidden, nq, nkv, head_dim, vocab, max_ctx;
    int32_t n_experts, top_k, renorm, moe_inter, shared_inter;
    int32_t group;     /* INT4 group size */
    int32_t qk_norm, qkv_bias;
    int32_t int4;      /* 1: INT4 experts and attention; 0: fp16 everywhere */
    float rope_theta;
} cu_synth_config;

/* The shapes of the published configs (weights random). */
extern const cu_synth_config cu_synth_qwen3_30b_a3b;
extern const cu_synth_config cu_synth_qwen15_moe_a27b;

int cu_synth_create(const cu_synth_config *c, uint64_t seed, cu_model **ret, lm_err *err);
void cu_synth_free(cu_model *m);
/* Bytes of weights of one expert / all attention matrices / lm_head. */
size_t cu_linear_bytes(const cu_linear *l);

#ifdef __cplusplus
}
#endif
#endif
