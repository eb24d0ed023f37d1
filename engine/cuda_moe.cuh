/*
 * cuda_moe.cuh: Mixture-of-Experts routing, grouping and combining on the
 * GPU, so that a MoE block needs no host round trip.
 *
 *   route:   router logits [T][ldl] (fp32; column E, if has_shared, is the
 *            shared-expert gate logit) -> softmax over E, top-k, optional
 *            renormalisation of the k weights, sigmoid of the shared gate.
 *            Equal to mixtral's "top-k logits then softmax" when renorm.
 *   group:   the T*k (token, slot) entries sorted by expert: offsets[E+1],
 *            entry token, entry expert, entry weight, pos[t*k+j] = entry
 *            of slot j of token t, and the work items of `tile` entries
 *            that cu_int4_matmul walks (at most max_items, see
 *            cu_moe_max_items). One block; order inside an expert may vary
 *            between runs, results do not (every row is computed alone).
 *            Route + group of at most 32 entries (decode) runs on a warp a
 *            token, its plan built by warp 0 in slot order, no atomics.
 *   combine: resid[t] += sum_j w[e] y[e] over the entries e = pos[t*k+j]
 *            of token t (+ sg[t] * ys[t]); the sum is taken in slot order,
 *            so it is deterministic.
 *
 * Limits: E <= 1024, k <= 32.
 */
#ifndef LIGHTMOE_CUDA_MOE_CUH
#define LIGHTMOE_CUDA_MOE_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "engine/cuda_int4_gemm.cuh"
#include "engine/err.h"

typedef struct cu_moe_plan {
    int32_t *offsets;    /* [E+1] */
    int32_t *ent_token;  /* [T*k] */
    int32_t *ent_expert; /* [T*k] */
    float *ent_weight;   /* [T*k] */
    int32_t *pos;        /* [T*k] */
    int2 *items;         /* [max_items] */
    int32_t *n_items;    /* [1] */
    int32_t *topk_ids;   /* [T*k] scratch */
    float *topk_w;       /* [T*k] scratch */
} cu_moe_plan;

#ifdef __cplusplus
extern "C" {
#endif

/* Upper bound of the number of work items for T*k entries, E experts. */
int cu_moe_max_items(int n_entries, int n_experts, int tile);

int cu_moe_route(const float *logits, int ldl, int T, int E, int k, int renorm, int has_shared,
                 int32_t *topk_ids, float *topk_w, float *shared_gate, cudaStream_t st,
                 lm_err *err);
int cu_moe_group(const int32_t *topk_ids, const float *topk_w, int T, int k, int E, int tile,
                 const cu_moe_plan *plan, cudaStream_t st, lm_err *err);
int cu_moe_combine(float *resid, int H, int T, int k, const float *y, const int32_t *pos,
                   const float *ent_weight, const float *ys, const float *sg, cudaStream_t st,
                   lm_err *err);

/* combine, then (if norm_w) xn[t] = rmsnorm(resid[t]) * norm_w as fp16:
 * the next layer's input norm fused into the same pass. */
int cu_moe_combine_norm(float *resid, int H, int T, int k, const float *y, const int32_t *pos,
                        const float *ent_weight, const float *ys, const float *sg,
                        const float *norm_w, float eps, __half *xn, cudaStream_t st, lm_err *err);
/* out[t][r] = x[t] . w[r] for T <= 16 tokens (fp32), H % 4 == 0. */
int cu_router_logits(const float *x, int T, int H, const float *w, int rows, float *out,
                     cudaStream_t st, lm_err *err);
/* The MLP input norm and the router in one launch (T <= 16, H % 4 == 0):
 * xn[t] = rmsnorm(x[t]) * norm_w as fp16 (as cu_rmsnorm), out[t][r] =
 * (rmsnorm(x[t]) * norm_w) . w[r] in fp32 (rows of H floats). norm_w NULL:
 * out = x . w (cu_router_logits), xn untouched. */
int cu_router_norm(const float *x, int T, int H, const float *norm_w, float eps, const float *w,
                   int rows, float *out, __half *xn, cudaStream_t st, lm_err *err);
/* route + group in one single-block launch (small T). At most 32 entries
 * (T * k <= 32) take a kernel of a warp a token whose plan keeps an
 * expert's entries in slot order, unless LIGHTMOE_CUDA_ROUTE_WARP=0 or
 * cu_moe_set_route_warp(0) (tests; returns the setting it replaces). */
int cu_moe_set_route_warp(int on);
/* One-token steps route and plan with every thread of a block (ranks by
 * counting) instead of one warp's k rounds: the same choices, weights and
 * plan, bit for bit. LIGHTMOE_CUDA_ROUTE_RANK=0 takes the warp kernel;
 * cu_moe_set_route_rank (tests) returns the setting it replaces. */
int cu_moe_set_route_rank(int on);
int cu_moe_route_group(const float *logits, int ldl, int T, int E, int k, int renorm,
                       int has_shared, int tile, int32_t *topk_ids, float *topk_w,
                       float *shared_gate, const cu_moe_plan *plan, cudaStream_t st,
                       lm_err *err);

/* The router through o_proj (cu_route_o, cuda_attn.cuh), made once at
 * load: m[r][i] = sum_j wr[r][j] nw[j] W_o[j][i] in fp32 (rows x wo->k),
 * W_o dequantised to fp16 into tmp (wo->n * wo->k halves) first. */
int cu_route_o_matrix(const cu_int4_weights *wo, const float *wr, const float *nw, int rows,
                      float *m, __half *tmp, cudaStream_t st, lm_err *err);
/* One token, after cu_attn_merge_o_route: x += o, then o = 0; inv = the
 * MLP norm's 1/rms of x (eps); xn = fp16(nw * x * inv) (the experts'
 * input); logits[r] = inv * (u[0][r] + ... + u[nc-1][r]), then u = 0
 * (ready for the next layer's merge); then route + group as
 * cu_moe_route_group's warp kernel (the same code: the same choices and
 * plan from the same logits). rows = E + has_shared; nc <= CU_ROUTE_O_MAX_NC;
 * H % 4 == 0, H <= 8192, k <= 32, E <= 1024. */
#define CU_ROUTE_O_MAX_NC 4 /* copies of the router's sums, at most */
int cu_moe_norm_route(float *x, float *o, int H, const float *nw, float eps, float *u, int nc,
                      int rows, float *logits, __half *xn, int E, int k, int renorm,
                      int has_shared, int tile, int32_t *topk_ids, float *topk_w,
                      float *shared_gate, const cu_moe_plan *plan, cudaStream_t st,
                      lm_err *err);

#ifdef __cplusplus
}
#endif

#ifdef __CUDACC__
#include "engine/cuda_common.cuh"
/* Route one token (one warp): softmax over E, top-k by arg-max rounds
 * (ties: lowest id), optional renormalisation. Lane l owns experts l,
 * l+32, ...; a bit mask per lane marks the ones taken (no per-round scan of
 * the taken list). Lane j < k gets the j-th choice in *id and its weight
 * (renormalised if renorm) in *w. NP > 0 (E <= 32 NP): the lane's logits
 * are loaded once into registers (one L2 round trip) and each round's
 * arg-max is two warp reductions (redux.sync) instead of five rounds of
 * shuffles; NP = 0 (any E <= 1024): the logits are read from l as needed.
 * Both give the same choices and the same weights, bit for bit: the same
 * candidates, the same comparisons (the rounds' maximum as an order-
 * preserving key of the value, -0 as +0; among equal values the lowest id;
 * NaN never chosen while a number is left), the same sums in the same order. */
template <int NP>
__device__ __forceinline__ void cu_moe_route_warp(const float *__restrict__ l, int E, int k,
                                                  int renorm, int *id, float *w)
{
    constexpr int NR = NP > 0 ? NP : 1;
    const int lane = threadIdx.x & 31;
    const int nper = NP > 0 ? NP : (E + 31) / 32; /* <= 32: E <= 1024 */
    float reg[NR];
    if constexpr (NP > 0) {
#pragma unroll
        for (int i = 0; i < NP; i++) {
            const int e = lane + 32 * i;
            reg[i] = e < E ? l[e] : 0.f;
        }
    }
    auto val = [&](int i) -> float {
        if constexpr (NP > 0)
            return reg[i];
        else
            return l[lane + 32 * i];
    };
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < nper; i++) {
        const int e = lane + 32 * i;
        if (e < E) mx = fmaxf(mx, val(i));
    }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < nper; i++) {
        const int e = lane + 32 * i;
        if (e < E) sum += expf(val(i) - mx);
    }
    sum = warp_sum(sum);
    uint32_t used = 0; /* bit i: expert lane + 32 i taken */
    int my_id = 0;
    float my_w = 0.f;
    for (int j = 0; j < k; j++) {
        float best = -INFINITY;
        int bid = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < nper; i++) {
            const int e = lane + 32 * i;
            if (e < E && !((used >> i) & 1u)) {
                const float v = val(i);
                if (v > best || (v == best && e < bid)) {
                    best = v;
                    bid = e;
                }
            }
        }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
        if constexpr (NP > 0) {
            /* the largest value (an order-preserving key; -0 counts as +0,
             * as the comparisons do), then the lowest id holding it */
            const uint32_t u = __float_as_uint(best + 0.f);
            const uint32_t key = (u & 0x80000000u) ? ~u : u | 0x80000000u;
            const uint32_t kmax = __reduce_max_sync(0xffffffffu, key);
            bid = (int)__reduce_min_sync(0xffffffffu, key == kmax ? (uint32_t)bid : 0x7fffffffu);
            const uint32_t ub = (kmax & 0x80000000u) ? kmax & 0x7fffffffu : ~kmax;
            best = __uint_as_float(ub);
        } else
#endif
        {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ob = __shfl_xor_sync(0xffffffffu, best, o);
                const int oi = __shfl_xor_sync(0xffffffffu, bid, o);
                if (ob > best || (ob == best && oi < bid)) {
                    best = ob;
                    bid = oi;
                }
            }
        }
        if (bid >= E) { /* only NaN logits left: the lowest unused expert keeps indices valid */
            int cand = 0x7fffffff;
            for (int i = 0; i < nper; i++) {
                const int e = lane + 32 * i;
                if (e < E && !((used >> i) & 1u)) {
                    cand = e;
                    break;
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
                cand = min(cand, __shfl_xor_sync(0xffffffffu, cand, o));
            bid = cand;
        }
        if ((bid & 31) == lane) used |= 1u << (bid >> 5);
        if (lane == j) {
            my_id = bid;
            my_w = expf(best - mx) / sum;
        }
    }
    const float wsum = warp_sum(lane < k ? my_w : 0.f);
    *id = my_id;
    *w = renorm ? my_w / wsum : my_w;
}

/* Route token t (one warp; cuda_moe.cu, cuda_int4_gemv.cu and
 * cuda_mega.cu): cu_moe_route_warp<NP>, the k results written by k lanes at
 * once, and the shared-gate sigmoid; lane j < k also gets its choice in
 * *id and *w. */
template <int NP = 0>
__device__ __forceinline__ void cu_moe_route_token(const float *__restrict__ logits, int ldl,
                                                   int t, int E, int k, int renorm,
                                                   int has_shared, int32_t *__restrict__ ids,
                                                   float *__restrict__ wts,
                                                   float *__restrict__ sg, int *idp = nullptr,
                                                   float *wp = nullptr)
{
    const int lane = threadIdx.x & 31;
    const float *l = logits + (size_t)t * ldl;
    int id;
    float w;
    cu_moe_route_warp<NP>(l, E, k, renorm, &id, &w);
    if (idp) *idp = id;
    if (wp) *wp = w;
    if (lane < k) {
        ids[t * k + lane] = id;
        wts[t * k + lane] = w;
    }
    if (lane == 0 && has_shared) sg[t] = 1.f / (1.f + expf(-l[E]));
}
#endif
#endif
