/*
 * cuda_rope.cuh: the step between the q/k/v projection and attention:
 * bias add, per-head RMSNorm of q and k (qwen3_moe), rotary embedding
 * (rotate-half form of transformers, angle = pos * inv_freq[i] in fp32),
 * q out as fp32 and k, v written into their paged KV-cache slots (fp16).
 */
#ifndef LIGHTMOE_CUDA_ROPE_CUH
#define LIGHTMOE_CUDA_ROPE_CUH

#include "engine/cuda_attn.cuh"
#include "engine/cuda_int4_gemm.cuh"

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

/* Decode steps (one token per tile, b->bq == 1): cu_qkv_post and cu_attn
 * in one launch. Each attention block processes the q heads it needs
 * itself; the block whose context split holds the new position writes the
 * token's k and v for its KV head into the cache before it reads its
 * positions (no other block reads that slot). Same results as the two
 * calls (the same per-head code, cu_qkv_head). */
int cu_attn_qkv(const cu_attn_shape *s, const float *qkv, const cu_qkv_params *p, __half *kc,
                __half *vc, const cu_attn_batch *b, float *part, __half *out, cudaStream_t st,
                lm_err *err);

/* cu_attn_qkv, then the splits' merge and the o_proj product in one launch
 * (cu_attn_merge_o) instead of the merge kernel and a product: x[t] +=
 * wo (n x nq*hd, INT4) o[t], atomically (the heads' sums in no fixed
 * order). Needs b->counters NULL. wo NULL (measurements only): the
 * attention's launch alone, its splits left unmerged in part. */
int cu_attn_qkv_o(const cu_attn_shape *s, const float *qkv, const cu_qkv_params *p, __half *kc,
                  __half *vc, const cu_attn_batch *b, float *part, const cu_int4_weights *wo,
                  float *x, int ldx, cudaStream_t st, lm_err *err);
/* The merge of cu_attn's nsplit partial results per (token, head) row of
 * part, rounded to fp16 as the merge kernel's output, times wo, added into
 * x (rows ldx apart) atomically. */
int cu_attn_merge_o(const cu_attn_shape *s, int T, int nsplit, const float *part,
                    const cu_int4_weights *wo, float *x, int ldx, cudaStream_t st, lm_err *err);
/* One token: cu_attn_merge_o into o (wo->n floats, zero before: the heads'
 * products are added into it, not into the residual ro->x), and the
 * router's dot products into ro->u (cu_route_o, cuda_attn.cuh). Needs
 * wo->n a multiple of nq with wo->n / nq a multiple of 4 and at most 128,
 * ro->rows <= CU_ROUTE_O_ROWS_PER_SLICE * ceil(wo->n / 128). */
int cu_attn_merge_o_route(const cu_attn_shape *s, int nsplit, const float *part,
                          const cu_int4_weights *wo, float *o, const cu_route_o *ro,
                          cudaStream_t st, lm_err *err);
/* cu_attn_qkv, then cu_attn_merge_o_route (b->T 1). */
int cu_attn_qkv_o_route(const cu_attn_shape *s, const float *qkv, const cu_qkv_params *p,
                        __half *kc, __half *vc, const cu_attn_batch *b, float *part,
                        const cu_int4_weights *wo, float *o, const cu_route_o *ro,
                        cudaStream_t st, lm_err *err);

#ifdef __cplusplus
}
#endif

#ifdef __CUDACC__
#include "engine/cuda_common.cuh"
/* One warp, head hh of one token's qkv row: lane owns the rotary pairs
 * (i, i + hd/2), i = lane + 32 j; x1/x2 get bias added, the head's RMSNorm
 * (nw, if not NULL) and the rotation at pos (if rope). hd <= 256. In two
 * halves, so that a warp can have several heads' loads in flight:
 * cu_qkv_head_load (the values and the bias), cu_qkv_head_finish (the
 * rest); cu_qkv_head is the two. */
__device__ __forceinline__ void cu_qkv_head_load(const float *row, int hh, int hd,
                                                 const cu_qkv_params &p, int lane, float x1[4],
                                                 float x2[4])
{
    const int half = hd / 2;
    const int np = half / 32 > 0 ? half / 32 : 1;
    /* loops unrolled to 4 (hd <= 256) so that x1, x2 stay in registers */
#pragma unroll
    for (int j = 0; j < 4; j++) {
        if (j >= np) break;
        const int i = lane + 32 * j;
        x1[j] = x2[j] = 0.f;
        if (i < half) {
            x1[j] = row[hh * hd + i] + (p.bias ? p.bias[hh * hd + i] : 0.f);
            x2[j] = row[hh * hd + i + half] + (p.bias ? p.bias[hh * hd + i + half] : 0.f);
        }
    }
}
__device__ __forceinline__ void cu_qkv_head_finish(int hd, const cu_qkv_params &p,
                                                   const float *nw, bool rope, int pos, int lane,
                                                   float x1[4], float x2[4])
{
    const int half = hd / 2;
    const int np = half / 32 > 0 ? half / 32 : 1;
    if (nw) {
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (j >= np) break;
            ss += x1[j] * x1[j] + x2[j] * x2[j];
        }
        ss = warp_sum(ss);
        const float inv = rsqrtf(ss / (float)hd + p.eps);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (j >= np) break;
            const int i = lane + 32 * j;
            if (i < half) {
                x1[j] = nw[i] * (x1[j] * inv);
                x2[j] = nw[i + half] * (x2[j] * inv);
            }
        }
    }
    if (rope)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (j >= np) break;
            const int i = lane + 32 * j;
            if (i >= half) continue;
            float sn, cs;
            sincosf((float)pos * p.inv_freq[i], &sn, &cs);
            const float y1 = x1[j] * cs - x2[j] * sn, y2 = x2[j] * cs + x1[j] * sn;
            x1[j] = y1;
            x2[j] = y2;
        }
}
__device__ __forceinline__ void cu_qkv_head(const float *row, int hh, int hd,
                                            const cu_qkv_params &p, const float *nw, bool rope,
                                            int pos, int lane, float x1[4], float x2[4])
{
    cu_qkv_head_load(row, hh, hd, p, lane, x1, x2);
    cu_qkv_head_finish(hd, p, nw, rope, pos, lane, x1, x2);
}
#endif
#endif
