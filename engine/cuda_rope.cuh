/*
 * cuda_rope.cuh: the step between the q/k/v projection and attention:
 * bias add, per-head RMSNorm of q and k (qwen3_moe), rotary embedding
 * (rotate-half form of transformers, angle = pos * inv_freq[i] in fp32),
 * q out as fp32 and k, v written into their paged KV-cache slots (fp16).
 */
#ifndef LIGHTMOE_CUDA_ROPE_CUH
#define LIGHTMOE_CUDA_ROPE_CUH

#include "engine/cuda_attn.cuh"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cu_qkv_params {
    const float *bias;     /* [(nq + 2 nkv) hd] or NULL */
    const float *q_norm;   /* [hd] or NULL */
    const float *k_norm;   /* [hd] or NULL */
    float eps;
    const float *inv_freq; /* [hd/2] */
} cu_qkv_params;

/* qkv fp32 [T][(nq + 2 nkv) hd] (q heads, then k heads, then v heads). */
int cu_qkv_post(const cu_attn_shape *s, const float *qkv, const cu_qkv_params *p,
                const cu_attn_batch *b, __half *kc, __half *vc, float *q_out, cudaStream_t st,
                lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
