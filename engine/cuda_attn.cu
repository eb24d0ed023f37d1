/*
 * cuda_attn.cu: paged attention, decode and prefill (see cuda_attn.cuh).
 *
 * Block = (query tile, KV head, context split), NW warps: 4, or 8 for
 * tiles of 5-16 rows in small launches (pick_rw). Rows of the tile (token r / G, head r % G)
 * are dealt to warps round-robin: warp w owns rows w, w + NW, ... (RW
 * rows). Per 32-position step: K and V of the step go
 * to shared memory (K rows padded by 2 halves so that lane p reading row p
 * hits bank p), lane p scores position p for the warp's rows, the warp
 * updates each row's running max / sum (online softmax), then multiplies
 * the probabilities (broadcast by shuffle) with V; lane l owns output
 * dimensions 2l + 64j, j < hd/64. That is k_attn (decode, and every
 * tile at hd 256 or with LIGHTMOE_CUDA_ATTN_MMA=0); prefill tiles at hd
 * 64 and 128 run on the tensor cores (k_attn_mma, below), and decode tiles
 * too when LIGHTMOE_CUDA_ATTN_DMMA=1 (k_attn_dec_mma).
 */
#include <stdlib.h>
#include <string.h>

#include "engine/cuda_attn.cuh"
#include "engine/cuda_common.cuh"
#include "engine/cuda_int4_gemm.cuh"
#include "engine/cuda_rope.cuh"

namespace
{

constexpr int P = 32;

/* Positions [p_begin, p_end) of split `split` of a context of ctx: whole
 * P-position steps, as even as they go (both kernels). */
__device__ __forceinline__ void split_span(int ctx, int nsplit, int split, int &p_begin,
                                           int &p_end)
{
    const int nt = (ctx + P - 1) / P, per = (nt + nsplit - 1) / nsplit;
    p_begin = split * per * P;
    p_end = min(ctx, (split + 1) * per * P);
}

template <int RW, int HDP, int NW = 4> constexpr int attn_smem()
{
    return NW * RW * 64 * HDP * 4 + 2 * P * (64 * HDP + 2) * 2;
}

template <int RW, int HDP, bool PIPE, int NW = 4>
__global__ void __launch_bounds__(NW * 32)
    k_attn(cu_attn_shape s, const float *__restrict__ q, const float *__restrict__ qkv,
           cu_qkv_params qp, __half *kc, __half *vc, cu_attn_batch b, float *__restrict__ part,
           __half *__restrict__ out)
{
    CU_TRACE_KERNEL();
    /* kc, vc: neither const nor restrict, read through L2 (__ldcg): with
     * qkv (decode), one block of the launch writes the new token's slot
     * and reads it back */
    constexpr int HD = 64 * HDP, KS = HD + 2, NT = NW * 32;
    extern __shared__ __align__(16) uint8_t smem[];
    float *q_s = reinterpret_cast<float *>(smem);                     /* [NW RW][HD] */
    __half *k_s = reinterpret_cast<__half *>(smem + NW * RW * HD * 4); /* [P][KS] */
    __half *v_s = k_s + P * KS;                                       /* [P][KS] */

    /* early (decode with qkv, steps pipelined): the first step's K/V loads
     * go out before the dependency wait. The batch description is the
     * step's upload (before every kernel); the cache holds every earlier
     * position, and the new one, which this launch writes, is taken from
     * registers (below), never from those loads. */
    const bool early = PIPE && qkv && b.early;
    if (!early) {
        cu_pdl_wait();
        cu_pdl_trigger();
    }
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int2 td = b.tiles[blockIdx.x];
    const int t0 = td.x, tcount = td.y;
    const int G = s.nq / s.nkv, R = tcount * G;
    const int seq = b.tok_seq[t0];
    const int ctx = b.tok_pos[t0 + tcount - 1] + 1;
    int p_begin, p_end;
    split_span(ctx, b.nsplit, split, p_begin, p_end);
    const float scale = rsqrtf((float)HD);

    if (!qkv) {
        for (int idx = tid; idx < NW * RW * HD; idx += NT) {
            const int r = idx / HD, d = idx % HD;
            float v = 0.f;
            if (r < R) v = q[((size_t)(t0 + r / G) * s.nq + kvh * G + r % G) * HD + d] * scale;
            q_s[idx] = v;
        }
    }
    /* decode with qkv: the q heads and the new k, v are made inside the
     * first step of the loop, while its K/V loads are in flight */
    const int npos = qkv ? b.tok_pos[t0] : -1;
    float nk1[HDP] = {}, nk2[HDP] = {}; /* warps 0 / 1 of the block owning npos: new k / v */
    int rpos[RW];
    float m[RW], l[RW];
    float2 o[RW][HDP];
#pragma unroll
    for (int i = 0; i < RW; i++) {
        const int r = warp + NW * i;
        rpos[i] = r < R ? b.tok_pos[t0 + r / G] : -1;
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int j = 0; j < HDP; j++)
            o[i][j] = make_float2(0.f, 0.f);
    }

    constexpr int NPC = P * HD / 8 / NT; /* 16-byte pieces per thread */
    uint4 kv[NPC], vv[NPC];
    /* K and V of the step at p0, into registers */
    auto load_step = [&](int p0) {
#pragma unroll
        for (int u = 0; u < NPC; u++) {
            const int idx = tid + NT * u;
            const int p = idx / (HD / 8), piece = idx % (HD / 8), pp = p0 + p;
            kv[u] = vv[u] = make_uint4(0, 0, 0, 0);
            if (pp < p_end) {
                const int blk = b.block_table[(size_t)seq * b.max_blocks + pp / b.block_size];
                const size_t off =
                    (((size_t)blk * b.block_size + pp % b.block_size) * s.nkv + kvh) * HD +
                    piece * 8;
                kv[u] = __ldcg(reinterpret_cast<const uint4 *>(kc + off));
                vv[u] = __ldcg(reinterpret_cast<const uint4 *>(vc + off));
            }
        }
    };
    /* PIPE: the next step's loads are issued as soon as this step's K/V are
     * in shared memory, so that they are in flight while this step is
     * computed (long contexts: a split is a chain of steps) */
    if (PIPE && p_begin < p_end)
        load_step(p_begin);
    if (early) {
        cu_pdl_wait();
        cu_pdl_trigger();
    }
    for (int p0 = p_begin; p0 < p_end; p0 += P) {
        __syncthreads(); /* q_s written / previous K,V consumed */
        if (!PIPE)
            load_step(p0);
        if (qkv && p0 == p_begin) { /* decode: q heads of this KV head, new k, v */
            const int nh = s.nq + 2 * s.nkv;
            const float *row = qkv + (size_t)t0 * nh * HD;
#pragma unroll
            for (int i = 0; i < RW; i++) {
                const int r = warp + NW * i;
                float x1[4], x2[4];
                if (r < R)
                    cu_qkv_head(row, kvh * G + r, HD, qp, qp.q_norm, true, npos, lane, x1, x2);
#pragma unroll
                for (int j = 0; j < HDP; j++) {
                    q_s[r * HD + lane + 32 * j] = r < R ? x1[j] * scale : 0.f;
                    q_s[r * HD + lane + 32 * j + HD / 2] = r < R ? x2[j] * scale : 0.f;
                }
            }
            if (npos >= p_begin && npos < p_end && warp < 2) {
                /* the split holding the new position: its k (warp 0), v (warp 1)
                 * to the cache for later steps; this step takes them from
                 * registers (below), not from the cache */
                const int blk = b.block_table[(size_t)seq * b.max_blocks + npos / b.block_size];
                const size_t slot = (size_t)blk * b.block_size + npos % b.block_size;
                float x1[4], x2[4];
                cu_qkv_head(row, (warp ? s.nq + s.nkv : s.nq) + kvh, HD, qp,
                            warp ? NULL : qp.k_norm, !warp, npos, lane, x1, x2);
                __half *d = (warp ? vc : kc) + (slot * s.nkv + kvh) * HD;
#pragma unroll
                for (int j = 0; j < HDP; j++) {
                    d[lane + 32 * j] = __float2half(nk1[j] = x1[j]);
                    d[lane + 32 * j + HD / 2] = __float2half(nk2[j] = x2[j]);
                }
            }
            cu_trace_mark(0);
        }
#pragma unroll
        for (int u = 0; u < NPC; u++) {
            const int idx = tid + NT * u;
            const int p = idx / (HD / 8), piece = idx % (HD / 8);
            uint32_t *kd = reinterpret_cast<uint32_t *>(k_s + p * KS + piece * 8);
            uint32_t *vd = reinterpret_cast<uint32_t *>(v_s + p * KS + piece * 8);
            kd[0] = kv[u].x;
            kd[1] = kv[u].y;
            kd[2] = kv[u].z;
            kd[3] = kv[u].w;
            vd[0] = vv[u].x;
            vd[1] = vv[u].y;
            vd[2] = vv[u].z;
            vd[3] = vv[u].w;
        }
        if (qkv && npos >= p0 && npos < p0 + P && npos < p_end) { /* uniform */
            __syncthreads();
            if (warp < 2) {
                __half *d = (warp ? v_s : k_s) + (npos - p0) * KS;
#pragma unroll
                for (int j = 0; j < HDP; j++) {
                    d[lane + 32 * j] = __float2half(nk1[j]);
                    d[lane + 32 * j + HD / 2] = __float2half(nk2[j]);
                }
            }
        }
        __syncthreads();
        if (p0 == p_begin) cu_trace_mark(1);
        if (PIPE && p0 + P < p_end)
            load_step(p0 + P);

        float sc[RW];
#pragma unroll
        for (int i = 0; i < RW; i++)
            sc[i] = 0.f;
        const half2 *kr = reinterpret_cast<const half2 *>(k_s + lane * KS);
#pragma unroll 4
        for (int d2 = 0; d2 < HD / 2; d2++) {
            const float2 kf = __half22float2(kr[d2]);
#pragma unroll
            for (int i = 0; i < RW; i++) {
                const float2 qf = reinterpret_cast<const float2 *>(q_s + (warp + NW * i) * HD)[d2];
                sc[i] += qf.x * kf.x + qf.y * kf.y;
            }
        }
        const int pp = p0 + lane;
        float pr[RW];
#pragma unroll
        for (int i = 0; i < RW; i++) {
            const bool ok = pp < p_end && pp <= rpos[i];
            const float v = ok ? sc[i] : -INFINITY;
            const float mn = fmaxf(m[i], warp_max(v));
            float alpha = 1.f;
            if (mn == -INFINITY) {
                pr[i] = 0.f;
            } else {
                pr[i] = ok ? __expf(v - mn) : 0.f;
                alpha = __expf(m[i] - mn); /* 0 when m was -inf */
            }
            l[i] = l[i] * alpha + warp_sum(pr[i]);
            m[i] = mn;
#pragma unroll
            for (int j = 0; j < HDP; j++) {
                o[i][j].x *= alpha;
                o[i][j].y *= alpha;
            }
        }
        if (p0 == p_begin) cu_trace_mark(2);
#pragma unroll 4
        for (int p = 0; p < P; p++) {
            float2 vf[HDP];
#pragma unroll
            for (int j = 0; j < HDP; j++)
                vf[j] =
                    __half22float2(reinterpret_cast<const half2 *>(v_s + p * KS)[lane + 32 * j]);
#pragma unroll
            for (int i = 0; i < RW; i++) {
                const float w = __shfl_sync(0xffffffffu, pr[i], p);
#pragma unroll
                for (int j = 0; j < HDP; j++) {
                    o[i][j].x += w * vf[j].x;
                    o[i][j].y += w * vf[j].y;
                }
            }
        }
        if (p0 == p_begin) cu_trace_mark(3);
    }

    if (b.counters && b.nsplit == 1) { /* nothing to merge: normalise and store */
#pragma unroll
        for (int i = 0; i < RW; i++) {
            const int r = warp + NW * i;
            if (r >= R) continue;
            const size_t row = (size_t)(t0 + r / G) * s.nq + kvh * G + r % G;
            const float inv = 1.f / l[i];
#pragma unroll
            for (int j = 0; j < HDP; j++)
                reinterpret_cast<half2 *>(out + row * HD)[lane + 32 * j] =
                    __floats2half2_rn(o[i][j].x * inv, o[i][j].y * inv);
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < RW; i++) {
        const int r = warp + NW * i;
        if (r >= R) continue;
        const size_t row = (size_t)(t0 + r / G) * s.nq + kvh * G + r % G;
        float *dst = part + (row * b.nsplit + split) * (HD + 2);
#pragma unroll
        for (int j = 0; j < HDP; j++)
            reinterpret_cast<float2 *>(dst)[lane + 32 * j] = o[i][j];
        if (lane == 0) {
            dst[HD] = m[i];
            dst[HD + 1] = l[i];
        }
    }
    if (!b.counters)
        return;
    /* the last split block of this (tile, KV head) merges: every block
     * fences its partial results before counting itself in */
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        int32_t *cnt = b.counters + (size_t)blockIdx.x * s.nkv + kvh;
        const int prev = atomicAdd(cnt, 1);
        s_last = prev == b.nsplit - 1;
        if (s_last)
            *cnt = 0; /* ready for the next launch */
    }
    __syncthreads();
    if (!s_last)
        return;
    __threadfence();
    /* weights of each (row, split) into shared memory (a warp per row,
     * lane = split; the K/V area is free now), then every thread takes
     * (row, pair of dimensions) outputs with the splits' loads unrolled */
    float *w_s = reinterpret_cast<float *>(k_s); /* [R][32] */
    for (int r = warp; r < R; r += NW) {
        const size_t row = (size_t)(t0 + r / G) * s.nq + kvh * G + r % G;
        const float *p = part + row * b.nsplit * (HD + 2);
        const float ms = lane < b.nsplit ? __ldcg(p + lane * (HD + 2) + HD) : -INFINITY;
        const float M = warp_max(ms);
        const float w = ms == -INFINITY ? 0.f : __expf(ms - M);
        const float L = warp_sum(lane < b.nsplit ? w * __ldcg(p + lane * (HD + 2) + HD + 1) : 0.f);
        w_s[r * 32 + lane] = w / L;
    }
    __syncthreads();
    for (int idx = tid; idx < R * (HD / 2); idx += NT) {
        const int r = idx / (HD / 2), d2 = idx % (HD / 2);
        const size_t row = (size_t)(t0 + r / G) * s.nq + kvh * G + r % G;
        const float2 *p = reinterpret_cast<const float2 *>(part + row * b.nsplit * (HD + 2)) + d2;
        float2 acc = make_float2(0.f, 0.f);
#pragma unroll 8
        for (int sp = 0; sp < b.nsplit; sp++) {
            const float ws = w_s[r * 32 + sp];
            const float2 v = __ldcg(p + sp * ((HD + 2) / 2));
            acc.x += ws * v.x;
            acc.y += ws * v.y;
        }
        reinterpret_cast<half2 *>(out + row * HD)[d2] = __floats2half2_rn(acc.x, acc.y);
    }
}

/* Warp 0 of a merging block: the splits' weights exp(m_s - M) of one row
 * (nsplit partial results of hd + 2 floats at p) into s_w, 1 / (sum of
 * weight * l_s) into *s_inv. Splits that saw no position (max -inf) weigh 0.
 * Lane l takes splits l, l + 32, ...; each split's max and sum are loaded
 * together (one L2 round trip, issued with whatever the caller loaded just
 * before), and the sums are taken in that order. */
__device__ __forceinline__ void merge_weights(const float *p, int nsplit, int hd, float *s_w,
                                              float *s_inv)
{
    constexpr int J = CU_ATTN_MAX_SPLIT / 32;
    const int lane = threadIdx.x & 31;
    float ms[J], ls[J], mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < J; j++) {
        const int sp = lane + 32 * j;
        ms[j] = -INFINITY;
        ls[j] = 0.f;
        if (sp < nsplit) {
            ms[j] = p[sp * (hd + 2) + hd];
            ls[j] = p[sp * (hd + 2) + hd + 1];
        }
        mx = fmaxf(mx, ms[j]);
    }
    const float M = warp_max(mx);
    float l = 0.f;
#pragma unroll
    for (int j = 0; j < J; j++) {
        const int sp = lane + 32 * j;
        if (sp < nsplit) {
            const float w = ms[j] == -INFINITY ? 0.f : __expf(ms[j] - M);
            s_w[sp] = w;
            l += w * ls[j];
        }
    }
    const float L = warp_sum(l);
    if (lane == 0) *s_inv = 1.f / L;
}
/* Dimension d of the merged row, before the 1 / sum (the splits' loads unrolled). */
__device__ __forceinline__ float merge_dim(const float *p, int nsplit, int hd, const float *s_w,
                                           int d)
{
    float acc = 0.f;
#pragma unroll 8
    for (int sp = 0; sp < nsplit; sp++) {
        const float ws = s_w[sp];
        if (ws != 0.f) acc += ws * p[sp * (hd + 2) + d];
    }
    return acc;
}

/* One block of 128 threads per (token, head) row: warp 0 turns the
 * splits' (max, sum) into weights (lane s holds splits s, s + 32, ...),
 * then every thread takes output dimensions and sums the splits with all
 * loads unrolled (a warp per row looping over splits was a chain of
 * dependent L2 reads). Splits that saw no position (max -inf) are skipped.
 * Up to CU_ATTN_MAX_SPLIT splits: long contexts at small batch. */
__global__ void __launch_bounds__(128)
    k_attn_merge(int hd, int nsplit, const float *__restrict__ part, __half *__restrict__ out)
{
    CU_TRACE_KERNEL();
    __shared__ float s_w[CU_ATTN_MAX_SPLIT];
    __shared__ float s_inv;
    cu_pdl_wait();
    cu_pdl_trigger();
    const size_t row = blockIdx.x;
    const float *p = part + row * nsplit * (hd + 2);
    if (threadIdx.x < 32)
        merge_weights(p, nsplit, hd, s_w, &s_inv);
    __syncthreads();
    const float inv = s_inv;
    for (int d = threadIdx.x; d < hd; d += blockDim.x)
        out[row * hd + d] = __float2half(merge_dim(p, nsplit, hd, s_w, d) * inv);
}

/* The merge and the o_proj product in one launch (decode, cu_attn_qkv_o).
 * Block (slice of 128 output rows, part row = token * nq + head): the
 * block's weights (its rows, the head's HD inputs: LPR = HD / 32 lanes a
 * row, one 16-byte chunk each) are loaded before the dependency wait; then
 * the head's splits are merged as k_attn_merge does (rounded to fp16, as
 * the merge kernel's output is), and each row's dot product over the head
 * is added into x[token][row] atomically: x += W_o[:, head] o_head, summed
 * over heads in no fixed order. */
/* RT (one token, cu_attn_merge_o_route): block (slice s, head h) also adds
 * into ro.u (copy h mod nc) the router's pre-norm dot products of its rows
 * e (ceil(rows / slices) <= 16 a slice; 8 lanes a row) over what it owns:
 * M[e][head h's inputs] . o_head + sum over x's slice j of head h (H / nq
 * entries) of wr[e][j] nw[j] x[j]. Over all blocks: u[e] = sum_j wr[e][j]
 * nw[j] (x[j] + (W_o o)[j]), the MLP norm's 1/rms left out (the route
 * kernel has it). Before the wait: the M, wr, nw and x slices to shared
 * memory (cp.async) and the x part (x is the residual before this layer's
 * o_proj, which with RT no launch writes until this one is done, o_proj
 * adding into a buffer of its own, and whose last writer finished before
 * the attention launch was let go); after o_proj, the M part. */
template <int HD, bool PF, bool RT>
__global__ void __launch_bounds__(128)
    k_attn_merge_o(int nq, int nsplit, const float *__restrict__ part, cu_int4_weights w,
                   float *__restrict__ x, int ldx, cu_route_o ro)
{
    CU_TRACE_KERNEL();
    constexpr int LPR = HD / 32, RP = 128 / LPR; /* lanes a row, rows a pass */
    __shared__ float s_w[CU_ATTN_MAX_SPLIT];
    __shared__ float s_inv;
    __shared__ __align__(16) __half s_o[HD];
    extern __shared__ __align__(16) float s_rt[]; /* RT: [eps][HD + 8] M, [eps][jh + 8] wr,
                                                   * [jh] nw, [jh] x */
    const int prow = blockIdx.y, t = prow / nq, h = prow % nq;
    const int K = w.k, G = w.k / w.group, ch = threadIdx.x % LPR;
    const int kin = h * HD + ch * 32; /* the lane's first input */
    /* RT: rows e0 .. e0 + ne - 1; M rows HD + 8 floats apart, wr rows jh + 8
     * (8 lanes a row read without bank conflicts) */
    int e0 = 0, ne = 0, jh = 0;
    float *sm = s_rt, *swr = s_rt;
    if constexpr (RT) {
        const int eps = (ro.rows + gridDim.x - 1) / gridDim.x;
        e0 = blockIdx.x * eps;
        ne = max(0, min(eps, ro.rows - e0));
        jh = w.n / nq;
        swr = s_rt + eps * (HD + 8);
        float *sg = swr + eps * (jh + 8), *sx = sg + jh;
        for (int i = threadIdx.x; i < ne * (HD / 4); i += 128) {
            const int el = i / (HD / 4), c = i % (HD / 4);
            cp_async16(sm + el * (HD + 8) + 4 * c, ro.m + (size_t)(e0 + el) * K + h * HD + 4 * c,
                       true);
        }
        for (int i = threadIdx.x; i < ne * (jh / 4); i += 128) {
            const int el = i / (jh / 4), c = i % (jh / 4);
            cp_async16(swr + el * (jh + 8) + 4 * c, ro.wr + (size_t)(e0 + el) * w.n + h * jh + 4 * c,
                       true);
        }
        for (int i = threadIdx.x; i < jh / 4; i += 128) {
            cp_async16(sg + 4 * i, ro.nw + h * jh + 4 * i, true);
            if (ro.x_ready)
                cp_async16(sx + 4 * i, ro.x + h * jh + 4 * i, true);
        }
        cp_async_commit();
    }
    uint4 wv[LPR];
    half2 s2[LPR], z2[LPR];
#pragma unroll
    for (int ps = 0; ps < LPR; ps++) {
        const int n = min(blockIdx.x * 128 + ps * RP + (int)threadIdx.x / LPR, w.n - 1);
        wv[ps] = __ldg(reinterpret_cast<const uint4 *>(w.qs + (size_t)n * (K / 2) + kin / 2));
        s2[ps] = __half2half2(w.scales[(size_t)n * G + kin / w.group]);
        z2[ps] = int4_zero2(w.zeros[(size_t)n * G + kin / w.group]);
    }
    /* RT: row el = tid / 8 of the block's router rows, lane sub = tid % 8 of
     * its 8; the x part before the wait, summed over the 8 lanes */
    const int el = threadIdx.x >> 3, sub = threadIdx.x & 7;
    float xpart = 0.f;
    auto x_part = [&]() {
        cp_async_wait<0>();
        __syncthreads(); /* every thread's copies */
        if (el < ne) {
            const float *sg = swr + ((ro.rows + gridDim.x - 1) / gridDim.x) * (jh + 8), *sx = sg + jh;
            for (int j = sub; j < jh; j += 8)
                xpart += swr[el * (jh + 8) + j] * sg[j] * sx[j];
        }
    };
    if constexpr (RT)
        if (ro.x_ready) x_part();
    cu_pdl_wait();
    cu_pdl_trigger();
    if constexpr (RT)
        if (!ro.x_ready) { /* x after the wait (LIGHTMOE_CUDA_EARLY=0) */
            float *sx = swr + ((ro.rows + gridDim.x - 1) / gridDim.x) * (jh + 8) + jh;
            for (int i = threadIdx.x; i < jh / 4; i += 128)
                cp_async16(sx + 4 * i, ro.x + h * jh + 4 * i, true);
            cp_async_commit();
            x_part();
        }
    const float *p = part + (size_t)prow * nsplit * (HD + 2);
    if constexpr (PF) {
        /* one L2 round trip after the wait: every thread's values of its
         * dimensions d = tid + 128 j of the first NPF splits, and warp 0's
         * (max, sum) of every split (merge_weights), are loaded together;
         * the sums are merge_weights' and merge_dim's, in their order (so
         * the same bits). -2 to -3% a step at batch 1 on the H100, -4% at
         * 4096 positions (qwen3-30b-a3b; docs/PERF.md, round 11). */
        constexpr int DPT = HD > 128 ? HD / 128 : 1, NPF = 32 / DPT;
        float v[DPT][NPF];
#pragma unroll
        for (int j = 0; j < DPT; j++) {
            const int d = threadIdx.x + 128 * j;
#pragma unroll
            for (int sp = 0; sp < NPF; sp++)
                v[j][sp] = d < HD && sp < nsplit ? p[sp * (HD + 2) + d] : 0.f;
        }
        if (threadIdx.x < 32)
            merge_weights(p, nsplit, HD, s_w, &s_inv);
        __syncthreads();
        const float inv = s_inv;
#pragma unroll
        for (int j = 0; j < DPT; j++) {
            const int d = threadIdx.x + 128 * j;
            if (d >= HD) continue;
            float acc = 0.f;
#pragma unroll
            for (int sp = 0; sp < NPF; sp++) {
                const float ws = sp < nsplit ? s_w[sp] : 0.f;
                if (ws != 0.f) acc += ws * v[j][sp];
            }
#pragma unroll 8
            for (int sp = NPF; sp < nsplit; sp++) {
                const float ws = s_w[sp];
                if (ws != 0.f) acc += ws * p[sp * (HD + 2) + d];
            }
            s_o[d] = __float2half(acc * inv);
        }
    } else {
        if (threadIdx.x < 32)
            merge_weights(p, nsplit, HD, s_w, &s_inv);
        __syncthreads();
        const float inv = s_inv;
        for (int d = threadIdx.x; d < HD; d += 128)
            s_o[d] = __float2half(merge_dim(p, nsplit, HD, s_w, d) * inv);
    }
    __syncthreads();
    uint32_t xp[4][4]; /* the lane's 32 inputs as int4_dot8 wants them */
#pragma unroll
    for (int q = 0; q < 4; q++)
        int4_xpairs(*reinterpret_cast<const uint4 *>(s_o + ch * 32 + q * 8), xp[q]);
#pragma unroll
    for (int ps = 0; ps < LPR; ps++) {
        /* the gemv's arithmetic (k_int4_gemv's compute): (q - zero) / 64,
         * 64 x the scale once a word into the fp32 sum */
        float acc = 0.f;
        half2 zlo, zhi;
        int4_zoff(z2[ps], &zlo, &zhi);
        const float sj = 64.f * __low2float(s2[ps]);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const uint32_t word = q == 0 ? wv[ps].x : q == 1 ? wv[ps].y : q == 2 ? wv[ps].z : wv[ps].w;
            half2 wd[4];
            int4_unpack8(word, zlo, zhi, wd);
            acc = fmaf(int4_dot8(wd, xp[q]), sj, acc);
        }
#pragma unroll
        for (int o = LPR / 2; o > 0; o >>= 1)
            acc += __shfl_xor_sync(0xffffffffu, acc, o, LPR);
        const int n = blockIdx.x * 128 + ps * RP + (int)threadIdx.x / LPR;
        if (ch == 0 && n < w.n)
            atomicAdd(x + (size_t)t * ldx + n, acc);
    }
    if constexpr (RT) { /* s_o is published (above) */
        float acc = xpart;
        if (el < ne)
#pragma unroll 4
            for (int i = sub; i < HD; i += 8)
                acc += sm[el * (HD + 8) + i] * __half2float(s_o[i]);
        acc += __shfl_xor_sync(0xffffffffu, acc, 4);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        if (el < ne && sub == 0)
            atomicAdd(ro.u + (size_t)(h % ro.nc) * ro.rows + e0 + el, acc);
    }
}

/* ---- prefill on the tensor cores ------------------------------------------------ */

/* Block = (tile of up to 64 query rows, KV head, split), 4 warps; warp w
 * owns rows 16w .. 16w + 15 of the tile (rows as in k_attn: token r / G,
 * head r % G). Per step of MP positions: K and V go to shared memory by
 * cp.async (the next step's copies fly while this one is computed);
 * S = Q K^T and O += P V are mma.sync m16n8k16 (fp16 inputs, fp32
 * accumulators) with operands from ldmatrix; the online softmax stays in
 * registers (FlashAttention-2). A lane holds rows g = lane / 4 and g + 8
 * of its warp, and of those positions / dimensions 8j + 2 (lane % 4), +1.
 * Q is scaled by 1/sqrt(hd) in fp32 and rounded to fp16; P is rounded to
 * fp16 for the second product. Tiles are taken last first: in a prompt
 * the last tiles see the longest contexts. */
constexpr int MP = 64;

template <int HD> constexpr int mma_smem()
{
    return 5 * MP * (HD + 8) * 2; /* Q, K twice, V twice; rows padded by 8 halves */
}

__device__ __forceinline__ uint32_t pack_half2(float a, float b)
{
    const half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t *>(&h);
}

/* One step's online softmax in an m16 tile (k_attn_mma, k_attn_dec_mma):
 * a lane holds rows a = g and b = g + 8 of NJ n8 tiles of scores sc (-inf
 * where masked), and mx_a, mx_b its own maxima of them. The quad's maxima
 * are taken, sc becomes exp(sc - new max) (a row with no position yet
 * subtracts 0: every p is 0), the running maxima m, the lane's parts of the
 * sums l and the NT accumulator tiles o are rescaled. */
template <int NJ, int NT>
__device__ __forceinline__ void mma_softmax_step(float (&sc)[NJ][4], float mx_a, float mx_b,
                                                 float &m_a, float &m_b, float &l_a, float &l_b,
                                                 float (&o)[NT][4])
{
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    const float ua = mn_a == -INFINITY ? 0.f : mn_a, ub = mn_b == -INFINITY ? 0.f : mn_b;
    const float al_a = __expf(m_a - ua), al_b = __expf(m_b - ub); /* 0 from -inf */
    m_a = mn_a;
    m_b = mn_b;
    float sa = 0.f, sb = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            sc[j][e] = __expf(sc[j][e] - ua);
            sc[j][2 + e] = __expf(sc[j][2 + e] - ub);
            sa += sc[j][e];
            sb += sc[j][2 + e];
        }
    l_a = l_a * al_a + sa; /* this lane's part; the quad's sum at the end */
    l_b = l_b * al_b + sb;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        o[n][0] *= al_a;
        o[n][1] *= al_a;
        o[n][2] *= al_b;
        o[n][3] *= al_b;
    }
}

/* O += P V for one step: P (the NJ score tiles of mma_softmax_step, in the
 * accumulator layout) as the A operand in fp16, V (positions x HD, rows ST
 * halves apart) from shared memory through ldmatrix.trans. */
template <int NJ, int HD, int ST>
__device__ __forceinline__ void mma_pv_step(const float (&sc)[NJ][4], float (&o)[HD / 8][4],
                                            const __half *vb, int mi, int mr)
{
#pragma unroll
    for (int k2 = 0; k2 < NJ / 2; k2++) {
        uint32_t pf[4]; /* P as the A operand: the accumulator layout, in fp16 */
        pf[0] = pack_half2(sc[2 * k2][0], sc[2 * k2][1]);
        pf[1] = pack_half2(sc[2 * k2][2], sc[2 * k2][3]);
        pf[2] = pack_half2(sc[2 * k2 + 1][0], sc[2 * k2 + 1][1]);
        pf[3] = pack_half2(sc[2 * k2 + 1][2], sc[2 * k2 + 1][3]);
#pragma unroll
        for (int dj = 0; dj < HD / 16; dj++) {
            /* positions 16 k2 + (0..7 | 8..15), dims 16 dj + (0..7 | 8..15) */
            uint32_t vf[4];
            ldsm_x4_t(vf, vb + (16 * k2 + 8 * (mi & 1) + mr) * ST + 16 * dj + 8 * (mi >> 1));
            mma_16816(o[2 * dj], pf, vf[0], vf[1]);
            mma_16816(o[2 * dj + 1], pf, vf[2], vf[3]);
        }
    }
}

template <int HD>
__global__ void __launch_bounds__(128)
    k_attn_mma(cu_attn_shape s, const float *__restrict__ q, const __half *kc, const __half *vc,
               cu_attn_batch b, float *__restrict__ part, __half *__restrict__ out)
{
    CU_TRACE_KERNEL();
    constexpr int ST = HD + 8, KT = HD / 16, NT = HD / 8, PPR = HD / 8;
    extern __shared__ __align__(16) uint8_t smem[];
    __half *q_s = reinterpret_cast<__half *>(smem); /* [MP][ST] */
    __half *k_s = q_s + MP * ST;                    /* [2][MP][ST] */
    __half *v_s = k_s + 2 * MP * ST;                /* [2][MP][ST] */
    cu_pdl_wait();
    cu_pdl_trigger();
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int mi = lane >> 3, mr = lane & 7; /* ldmatrix: this lane's matrix and row */
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int2 td = b.tiles[b.n_tiles - 1 - (int)blockIdx.x];
    const int t0 = td.x, tcount = td.y;
    const int G = s.nq / s.nkv, R = tcount * G;
    const int seq = b.tok_seq[t0];
    const int ctx = b.tok_pos[t0 + tcount - 1] + 1;
    int p_begin, p_end;
    split_span(ctx, b.nsplit, split, p_begin, p_end);
    const float scale = rsqrtf((float)HD);

    for (int idx = tid; idx < MP * HD / 2; idx += 128) {
        const int r = idx / (HD / 2), d2 = idx % (HD / 2);
        float2 v = make_float2(0.f, 0.f);
        if (r < R)
            v = reinterpret_cast<const float2 *>(
                q + ((size_t)(t0 + r / G) * s.nq + kvh * G + r % G) * HD)[d2];
        reinterpret_cast<half2 *>(q_s + r * ST)[d2] = __floats2half2_rn(v.x * scale, v.y * scale);
    }
    /* K and V of positions [p0, p0 + MP) into buffer buf (zeros past p_end) */
    auto load = [&](int p0, int buf) {
        __half *kd = k_s + buf * MP * ST, *vd = v_s + buf * MP * ST;
#pragma unroll
        for (int u = 0; u < MP * PPR / 128; u++) {
            const int idx = tid + 128 * u, p = idx / PPR, piece = idx % PPR, pp = p0 + p;
            const bool ok = pp < p_end;
            size_t off = 0;
            if (ok) {
                const int blk = b.block_table[(size_t)seq * b.max_blocks + pp / b.block_size];
                off = (((size_t)blk * b.block_size + pp % b.block_size) * s.nkv + kvh) * HD +
                      piece * 8;
            }
            cp_async16(kd + p * ST + piece * 8, kc + off, ok);
            cp_async16(vd + p * ST + piece * 8, vc + off, ok);
        }
    };
    const int nsteps = p_begin < p_end ? (p_end - p_begin + MP - 1) / MP : 0;
    if (nsteps > 0)
        load(p_begin, 0);
    cp_async_commit();

    const int ra = warp * 16 + g, rb = ra + 8;
    const int pa = ra < R ? b.tok_pos[t0 + ra / G] : -1, pb = rb < R ? b.tok_pos[t0 + rb / G] : -1;
    const int wmax = __reduce_max_sync(0xffffffffu, max(pa, pb)); /* the warp's last position */
    __syncthreads(); /* q_s */
    uint32_t qf[KT][4];
#pragma unroll
    for (int kk = 0; kk < KT; kk++)
        ldsm_x4(qf[kk], q_s + (warp * 16 + 8 * (mi & 1) + mr) * ST + 16 * kk + 8 * (mi >> 1));

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
    for (int i = 0; i < nsteps; i++) {
        const int p0 = p_begin + i * MP, buf = i & 1;
        if (i + 1 < nsteps)
            load(p0 + MP, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads(); /* this step's K, V in shared memory */
        if (p0 <= wmax) {
            const __half *kb = k_s + buf * MP * ST, *vb = v_s + buf * MP * ST;
            float sc[MP / 8][4];
#pragma unroll
            for (int j = 0; j < MP / 8; j++)
                sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
            for (int j2 = 0; j2 < MP / 16; j2++)
#pragma unroll
                for (int kk = 0; kk < KT; kk++) {
                    /* positions 16 j2 + (0..7 | 8..15), dims 16 kk + (0..7 | 8..15) */
                    uint32_t kf[4];
                    ldsm_x4(kf, kb + (16 * j2 + 8 * (mi >> 1) + mr) * ST + 16 * kk + 8 * (mi & 1));
                    mma_16816(sc[2 * j2], qf[kk], kf[0], kf[1]);
                    mma_16816(sc[2 * j2 + 1], qf[kk], kf[2], kf[3]);
                }
            float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
            for (int j = 0; j < MP / 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int p = p0 + 8 * j + 2 * t4 + e;
                    if (p > pa || p >= p_end) sc[j][e] = -INFINITY;
                    if (p > pb || p >= p_end) sc[j][2 + e] = -INFINITY;
                    mx_a = fmaxf(mx_a, sc[j][e]);
                    mx_b = fmaxf(mx_b, sc[j][2 + e]);
                }
            mma_softmax_step(sc, mx_a, mx_b, m_a, m_b, l_a, l_b, o);
            mma_pv_step<MP / 8, HD, ST>(sc, o, vb, mi, mr);
        }
        __syncthreads(); /* this buffer read before the next step's copies into it */
    }
    cp_async_wait<0>();
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = h ? rb : ra;
        if (r >= R) continue;
        const size_t row = (size_t)(t0 + r / G) * s.nq + kvh * G + r % G;
        const float l = h ? l_b : l_a, m = h ? m_b : m_a;
        if (b.nsplit == 1) { /* every row saw position 0: l > 0 */
            const float inv = 1.f / l;
#pragma unroll
            for (int n = 0; n < NT; n++)
                reinterpret_cast<half2 *>(out + row * HD)[4 * n + t4] =
                    __floats2half2_rn(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
        } else {
            float *dst = part + (row * b.nsplit + split) * (HD + 2);
#pragma unroll
            for (int n = 0; n < NT; n++)
                reinterpret_cast<float2 *>(dst)[4 * n + t4] =
                    make_float2(o[n][2 * h], o[n][2 * h + 1]);
            if (t4 == 0) {
                dst[HD] = m;
                dst[HD + 1] = l;
            }
        }
    }
}

/* ---- decode on the tensor cores ---------------------------------------------------- */

/* Decode with q/k/v post-processing (cu_attn_qkv, one token a tile, no
 * counters), hd 64 or 128, G <= 16 query heads a KV head: the work of
 * k_attn with the two products on the tensor cores. Block = (token, KV
 * head, split), 4 warps. The G q heads (cu_qkv_head, as k_attn) are one
 * 16-row fp16 tile in shared memory (rows past G zero; q scaled by
 * 1/sqrt(hd) in fp32, then rounded, as k_attn_mma does). The split's
 * 32-position steps are dealt to the warps (warp w: steps w, w + 4, ...),
 * each warp with its own K/V tiles (cp.async, the first before the
 * dependency wait when early), its own online softmax and its own
 * accumulators: S = Q K^T and O += P V are mma.sync m16n8k16 with fp32
 * accumulators, P rounded to fp16 (k_attn_mma's code at 32 positions).
 * Warps that had steps are merged through shared memory into the split's
 * partial result (sum, max, total), which the merge kernel or merge + o_proj
 * takes as it takes k_attn's. The new position's k and v: warps 0 and 1
 * of the block holding it write them into the cache and into a staging row
 * that replaces whatever the tile's copy read from that slot. Off by
 * default (attn_dmma): measured on the H100 (docs/PERF.md, round 14), one
 * step's S and softmax take 1.5-2 us of warp 0 at batch 1, no less than
 * k_attn's 8 warps, and a product on zeros before them changed nothing. */
constexpr int DP = 32; /* positions a step (as k_attn's P: the same splits) */
template <int HD> constexpr int dmma_st()
{
    return HD + 8; /* tile rows padded by 8 halves: ldmatrix without bank conflicts */
}
template <int HD> constexpr int dmma_smem()
{
    /* q tile, 4 warps' K and V tiles, the new k and v (fp16) */
    return (16 * dmma_st<HD>() + 4 * 2 * DP * dmma_st<HD>() + 2 * HD) * 2;
}

template <int HD>
__global__ void __launch_bounds__(128)
    k_attn_dec_mma(cu_attn_shape s, const float *__restrict__ qkv, cu_qkv_params qp, __half *kc,
                   __half *vc, cu_attn_batch b, float *__restrict__ part)
{
    CU_TRACE_KERNEL();
    constexpr int ST = dmma_st<HD>(), KT = HD / 16, NT = HD / 8, PPR = HD / 8;
    static_assert(HD / 2 <= 4 * 32, "cu_qkv_head holds at most 4 pairs a lane");
    extern __shared__ __align__(16) uint8_t smem[];
    __half *q_s = reinterpret_cast<__half *>(smem); /* [16][ST] */
    __half *t_s = q_s + 16 * ST;                    /* [4 warps][K, V][DP][ST] */
    __half *n_s = t_s + 4 * 2 * DP * ST;            /* [k, v][HD]: the new position */
    const bool early = b.early != 0;
    if (!early) {
        cu_pdl_wait();
        cu_pdl_trigger();
    }
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int mi = lane >> 3, mr = lane & 7; /* ldmatrix: this lane's matrix and row */
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int t0 = b.tiles[blockIdx.x].x;
    const int G = s.nq / s.nkv;
    const int seq = b.tok_seq[t0], npos = b.tok_pos[t0], ctx = npos + 1;
    int p_begin, p_end;
    split_span(ctx, b.nsplit, split, p_begin, p_end);
    const int nsteps = p_begin < p_end ? (p_end - p_begin + DP - 1) / DP : 0;
    __half *k_w = t_s + warp * 2 * DP * ST, *v_w = k_w + DP * ST; /* this warp's tiles */

    /* K and V of positions [p0, p0 + DP) into this warp's tiles (zeros past p_end) */
    auto load = [&](int p0) {
#pragma unroll
        for (int u = 0; u < DP * PPR / 32; u++) {
            const int idx = lane + 32 * u, p = idx / PPR, piece = idx % PPR, pp = p0 + p;
            const bool ok = pp < p_end;
            size_t off = 0;
            if (ok) {
                const int blk = b.block_table[(size_t)seq * b.max_blocks + pp / b.block_size];
                off = (((size_t)blk * b.block_size + pp % b.block_size) * s.nkv + kvh) * HD +
                      piece * 8;
            }
            cp_async16(k_w + p * ST + piece * 8, kc + off, ok);
            cp_async16(v_w + p * ST + piece * 8, vc + off, ok);
        }
        cp_async_commit();
    };
    if (warp < nsteps)
        load(p_begin + warp * DP);
    if (early) {
        cu_pdl_wait();
        cu_pdl_trigger();
    }

    /* the q heads of this KV head (rows G..15 zero; warp w: rows w, w + 4,
     * ...), the new k (warp 0) and v (warp 1): every row's loads first */
    const float scale = rsqrtf((float)HD);
    const float *row = qkv + (size_t)t0 * (s.nq + 2 * s.nkv) * HD;
    const bool owner = npos >= p_begin && npos < p_end; /* uniform over the block */
    float x1[5][4] = {}, x2[5][4] = {}; /* [4]: the new k or v */
#pragma unroll
    for (int i = 0; i < 4; i++)
        if (warp + 4 * i < G)
            cu_qkv_head_load(row, kvh * G + warp + 4 * i, HD, qp, lane, x1[i], x2[i]);
    if (owner && warp < 2)
        cu_qkv_head_load(row, (warp ? s.nq + s.nkv : s.nq) + kvh, HD, qp, lane, x1[4], x2[4]);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int r = warp + 4 * i;
        if (r < G)
            cu_qkv_head_finish(HD, qp, qp.q_norm, true, npos, lane, x1[i], x2[i]);
#pragma unroll
        for (int j = 0; j < HD / 64; j++) {
            q_s[r * ST + lane + 32 * j] = __float2half(x1[i][j] * scale);
            q_s[r * ST + lane + 32 * j + HD / 2] = __float2half(x2[i][j] * scale);
        }
    }
    if (owner && warp < 2) {
        /* into the cache for later steps, and into n_s for this one (the
         * tile's copy of that slot is replaced) */
        const int blk = b.block_table[(size_t)seq * b.max_blocks + npos / b.block_size];
        const size_t slot = (size_t)blk * b.block_size + npos % b.block_size;
        cu_qkv_head_finish(HD, qp, warp ? NULL : qp.k_norm, !warp, npos, lane, x1[4], x2[4]);
        __half *d = (warp ? vc : kc) + (slot * s.nkv + kvh) * HD, *ns = n_s + warp * HD;
#pragma unroll
        for (int j = 0; j < HD / 64; j++) {
            d[lane + 32 * j] = ns[lane + 32 * j] = __float2half(x1[4][j]);
            d[lane + 32 * j + HD / 2] = ns[lane + 32 * j + HD / 2] = __float2half(x2[4][j]);
        }
    }
    cu_trace_mark(0);
    __syncthreads(); /* q_s, n_s */

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
    for (int step = warp; step < nsteps; step += 4) {
        const int p0 = p_begin + step * DP;
        if (step != warp)
            load(p0);
        cp_async_wait<0>();
        __syncwarp();
        if (owner && npos >= p0 && npos < p0 + DP) { /* uniform over the warp */
            const int pr = npos - p0;
            for (int i = lane; i < 2 * PPR; i += 32) {
                const int kv = i / PPR, piece = i % PPR;
                *reinterpret_cast<uint4 *>((kv ? v_w : k_w) + pr * ST + piece * 8) =
                    *reinterpret_cast<const uint4 *>(n_s + kv * HD + piece * 8);
            }
            __syncwarp();
        }
        if (step == warp) cu_trace_mark(1);
        float sc[DP / 8][4];
#pragma unroll
        for (int j = 0; j < DP / 8; j++)
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
        /* a loop over the dims (q's fragments from shared memory each time):
         * short code after the wait */
#pragma unroll 2
        for (int kk = 0; kk < KT; kk++) {
            uint32_t qf[4];
            ldsm_x4(qf, q_s + (8 * (mi & 1) + mr) * ST + 16 * kk + 8 * (mi >> 1));
#pragma unroll
            for (int j2 = 0; j2 < DP / 16; j2++) {
                /* positions 16 j2 + (0..7 | 8..15), dims 16 kk + (0..7 | 8..15) */
                uint32_t kf[4];
                ldsm_x4(kf, k_w + (16 * j2 + 8 * (mi >> 1) + mr) * ST + 16 * kk + 8 * (mi & 1));
                mma_16816(sc[2 * j2], qf, kf[0], kf[1]);
                mma_16816(sc[2 * j2 + 1], qf, kf[2], kf[3]);
            }
        }
        float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
        for (int j = 0; j < DP / 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                if (p0 + 8 * j + 2 * t4 + e >= p_end) sc[j][e] = sc[j][2 + e] = -INFINITY;
                mx_a = fmaxf(mx_a, sc[j][e]);
                mx_b = fmaxf(mx_b, sc[j][2 + e]);
            }
        mma_softmax_step(sc, mx_a, mx_b, m_a, m_b, l_a, l_b, o); /* a step has a position */
        if (step == warp) cu_trace_mark(2);
        mma_pv_step<DP / 8, HD, ST>(sc, o, v_w, mi, mr);
        __syncwarp(); /* the tiles read before the next step's copies into them */
        if (step == warp) cu_trace_mark(3);
    }
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);

    const size_t row0 = (size_t)t0 * s.nq + kvh * G; /* part row of q head 0 of this KV head */
    if (nsteps <= 1) { /* warp 0 holds the split (or nothing: max -inf, sum 0) */
        if (warp != 0) return;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = g + 8 * h;
            if (r >= G) continue;
            float *dst = part + ((row0 + r) * b.nsplit + split) * (HD + 2);
#pragma unroll
            for (int n = 0; n < NT; n++)
                reinterpret_cast<float2 *>(dst)[4 * n + t4] =
                    make_float2(o[n][2 * h], o[n][2 * h + 1]);
            if (t4 == 0) {
                dst[HD] = h ? m_b : m_a;
                dst[HD + 1] = h ? l_b : l_a;
            }
        }
        return;
    }
    /* several warps had steps: their (max, sum, accumulators) through shared
     * memory (the tiles are free once every warp is past its last step) */
    const int nw = nsteps < 4 ? nsteps : 4;
    __syncthreads();
    float *o_s = reinterpret_cast<float *>(t_s); /* [4][16][HD] */
    float *ml_s = o_s + 4 * 16 * HD;              /* [4][16][2] */
    if (warp < nw) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = g + 8 * h;
            float *d = o_s + (warp * 16 + r) * HD;
#pragma unroll
            for (int n = 0; n < NT; n++)
                reinterpret_cast<float2 *>(d)[4 * n + t4] = make_float2(o[n][2 * h], o[n][2 * h + 1]);
            if (t4 == 0) {
                ml_s[(warp * 16 + r) * 2] = h ? m_b : m_a;
                ml_s[(warp * 16 + r) * 2 + 1] = h ? l_b : l_a;
            }
        }
    }
    __syncthreads();
    for (int idx = tid; idx < G * HD; idx += 128) {
        const int r = idx / HD, d = idx % HD;
        float M = -INFINITY;
        for (int w = 0; w < nw; w++)
            M = fmaxf(M, ml_s[(w * 16 + r) * 2]);
        float acc = 0.f, L = 0.f;
        for (int w = 0; w < nw; w++) { /* every warp < nw had a step: finite maxima */
            const float wt = __expf(ml_s[(w * 16 + r) * 2] - M);
            acc += wt * o_s[(w * 16 + r) * HD + d];
            L += wt * ml_s[(w * 16 + r) * 2 + 1];
        }
        float *dst = part + ((row0 + r) * b.nsplit + split) * (HD + 2);
        dst[d] = acc;
        if (d == 0) {
            dst[HD] = M;
            dst[HD + 1] = L;
        }
    }
}

struct attn_in {
    const float *q, *qkv; /* one of them */
    cu_qkv_params qp;
    __half *kc, *vc;
    bool no_merge; /* the caller merges (cu_attn_qkv_o) */
};

/* LIGHTMOE_CUDA_ATTN_PIPE=0: no step in flight during the compute of the
 * previous one (read once; tests switch it with cu_attn_set_pipe) */
static int g_pipe = -1;
static int attn_pipe(void)
{
    return cu_env_switch(&g_pipe, "LIGHTMOE_CUDA_ATTN_PIPE");
}

/* Tiles of 5-16 rows in 8-warp blocks (pick_rw) unless
 * LIGHTMOE_CUDA_ATTN_W8=0 (read once; tests switch it with cu_attn_set_w8) */
static int g_w8 = -1;
static int attn_w8(void)
{
    return cu_env_switch(&g_w8, "LIGHTMOE_CUDA_ATTN_W8");
}

/* Merge + o_proj loads the splits' values with their (max, sum)
 * (k_attn_merge_o<HD, true>) unless LIGHTMOE_CUDA_MERGE_PF=0 (read once;
 * tests switch it with cu_attn_set_merge_pf) */
static int g_merge_pf = -1;
static int merge_pf(void)
{
    return cu_env_switch(&g_merge_pf, "LIGHTMOE_CUDA_MERGE_PF");
}

/* Prefill tiles on the tensor cores (k_attn_mma) unless
 * LIGHTMOE_CUDA_ATTN_MMA=0 (read once; tests switch it with
 * cu_attn_set_mma) */
static int g_mma = -1;
static int attn_mma(void)
{
    return cu_env_switch(&g_mma, "LIGHTMOE_CUDA_ATTN_MMA");
}

/* Decode (with q/k/v post-processing, no counters) at hd 64 and 128 on the
 * tensor cores (k_attn_dec_mma) when LIGHTMOE_CUDA_ATTN_DMMA=1 (read once;
 * tests switch it with cu_attn_set_dmma). Off by default: on the H100 a
 * step was 0-6% slower at 512 and 4096 positions and 6% slower at 16384,
 * 9-11% faster at 8192 and 32768 (qwen3-30b-a3b, batch 1), and its fp16 q
 * and probabilities move the gptq fixture's router near-tie to the other
 * side (docs/PERF.md, round 14). Its loads before the wait follow the
 * batch's early flag, not LIGHTMOE_CUDA_ATTN_PIPE (a warp's next step is
 * loaded after its current one). */
static int g_dmma = -1;
static int attn_dmma(void)
{
    return cu_env_switch_off(&g_dmma, "LIGHTMOE_CUDA_ATTN_DMMA");
}

template <int HD>
int launch_attn_dec_mma(const cu_attn_shape *s, const attn_in &in, const cu_attn_batch *b,
                        float *part, cudaStream_t st, lm_err *err)
{
    constexpr int smem = dmma_smem<HD>();
    CUDA_TRY(err, cudaFuncSetAttribute(k_attn_dec_mma<HD>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    dim3 grid(b->n_tiles, s->nkv, b->nsplit);
    CU_LAUNCH(err, "attention (decode, mma) launch", k_attn_dec_mma<HD>, grid, 128, smem, st,
              *s, in.qkv, in.qp, in.kc, in.vc, *b, part);
    return 0;
}

template <int HD>
int launch_attn_mma(const cu_attn_shape *s, const attn_in &in, const cu_attn_batch *b,
                    float *part, __half *out, cudaStream_t st, lm_err *err)
{
    constexpr int smem = mma_smem<HD>();
    CUDA_TRY(err, cudaFuncSetAttribute(k_attn_mma<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       smem));
    dim3 grid(b->n_tiles, s->nkv, b->nsplit);
    CU_LAUNCH(err, "attention (mma) launch", k_attn_mma<HD>, grid, 128, smem, st, *s, in.q,
              (const __half *)in.kc, (const __half *)in.vc, *b, part, out);
    return 0;
}

template <int RW, int HDP, int NW = 4>
int launch_attn(const cu_attn_shape *s, const attn_in &in, const cu_attn_batch *b, float *part,
                __half *out, cudaStream_t st, lm_err *err)
{
    constexpr int smem = attn_smem<RW, HDP, NW>();
    dim3 grid(b->n_tiles, s->nkv, b->nsplit);
    if constexpr (RW <= 4) { /* registers: the larger tiles keep one step in flight */
        if (attn_pipe()) {
            CUDA_TRY(err, cudaFuncSetAttribute(k_attn<RW, HDP, true, NW>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            CU_LAUNCH(err, "attention launch", (k_attn<RW, HDP, true, NW>), grid, NW * 32, smem,
                      st, *s, in.q, in.qkv, in.qp, in.kc, in.vc, *b, part, out);
            return 0;
        }
    }
    CUDA_TRY(err, cudaFuncSetAttribute(k_attn<RW, HDP, false, NW>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CU_LAUNCH(err, "attention launch", (k_attn<RW, HDP, false, NW>), grid, NW * 32, smem, st, *s,
              in.q, in.qkv, in.qp, in.kc, in.vc, *b, part, out);
    return 0;
}

/* R query rows a tile: RW = rows a warp. In launches of at most
 * W8_MAX_BLOCKS blocks (qwen3-30b-a3b's decode at batch 1 up to 4096
 * positions), tiles of 5-16 rows (qwen3's 8 query heads a KV head) run in
 * blocks of 8 warps, a warp's rows (and so the chain of its instructions
 * a step) halved: -1.5% a step at 512 positions, -2.6% at 4096 on the
 * H100. In larger ones the halved rows a warp cost more K reads from
 * shared memory than the latency they save (+3% at 32768 positions, +2.5%
 * at batch 32, +12% at 128; docs/PERF.md, round 11).
 * LIGHTMOE_CUDA_ATTN_W8=0 keeps every tile in 4 warps. */
constexpr long W8_MAX_BLOCKS = 320;
template <int HDP>
int pick_rw(int R, const cu_attn_shape *s, const attn_in &in, const cu_attn_batch *b,
            float *part, __half *out, cudaStream_t st, lm_err *err)
{
    if (R > 4 && R <= 16 && (long)b->n_tiles * s->nkv * b->nsplit <= W8_MAX_BLOCKS &&
        attn_w8()) {
        if (R <= 8) return launch_attn<1, HDP, 8>(s, in, b, part, out, st, err);
        return launch_attn<2, HDP, 8>(s, in, b, part, out, st, err);
    }
    const int rw = (R + 3) / 4;
    if (rw <= 1) return launch_attn<1, HDP>(s, in, b, part, out, st, err);
    if (rw <= 2) return launch_attn<2, HDP>(s, in, b, part, out, st, err);
    if (rw <= 4) return launch_attn<4, HDP>(s, in, b, part, out, st, err);
    if (rw <= 8) return launch_attn<8, HDP>(s, in, b, part, out, st, err);
    return launch_attn<16, HDP>(s, in, b, part, out, st, err);
}

} // namespace

extern "C" int cu_attn_set_pipe(int on)
{
    return cu_env_switch_set(&g_pipe, "LIGHTMOE_CUDA_ATTN_PIPE", on);
}

extern "C" int cu_attn_set_dmma(int on)
{
    return cu_env_switch_off_set(&g_dmma, "LIGHTMOE_CUDA_ATTN_DMMA", on);
}

extern "C" int cu_attn_set_w8(int on)
{
    return cu_env_switch_set(&g_w8, "LIGHTMOE_CUDA_ATTN_W8", on);
}

extern "C" int cu_attn_set_merge_pf(int on)
{
    return cu_env_switch_set(&g_merge_pf, "LIGHTMOE_CUDA_MERGE_PF", on);
}

extern "C" int cu_attn_set_mma(int on)
{
    return cu_env_switch_set(&g_mma, "LIGHTMOE_CUDA_ATTN_MMA", on);
}

extern "C" size_t cu_attn_scratch_floats(const cu_attn_shape *s, int n_tiles, int bq, int nsplit)
{
    return (size_t)n_tiles * bq * s->nq * nsplit * (s->hd + 2);
}

static int attn_run(const cu_attn_shape *s, const attn_in &in, const cu_attn_batch *b,
                    float *part, __half *out, cudaStream_t st, lm_err *err)
{
    if (s->hd != 64 && s->hd != 128 && s->hd != 256)
        return lm_err_set(err, -EINVAL, "attention: head_dim %d not in {64,128,256}", s->hd);
    if (s->nkv <= 0 || s->nq % s->nkv)
        return lm_err_set(err, -EINVAL, "attention: %d query heads not a multiple of %d KV heads",
                          s->nq, s->nkv);
    const int R = b->bq * (s->nq / s->nkv);
    if (R > 64 || b->nsplit < 1)
        return lm_err_set(err, -EINVAL, "attention: tile of %d rows (max 64), %d splits", R,
                          b->nsplit);
    if (b->n_tiles <= 0) return 0;
    if (b->nsplit > CU_ATTN_MAX_SPLIT || (b->counters && b->nsplit > CU_ATTN_MAX_SPLIT_OWN))
        return lm_err_set(err, -EINVAL, "attention: %d splits (max %d; %d when merged by the "
                          "attention blocks)", b->nsplit, CU_ATTN_MAX_SPLIT,
                          CU_ATTN_MAX_SPLIT_OWN);
    int rc;
    if (!in.qkv && b->bq > 1 && (s->hd == 64 || s->hd == 128) && attn_mma()) {
        /* prefill tiles: one split is written out whole, several are
         * merged by the merge kernel (the counters stay untouched at 0) */
        rc = s->hd == 64 ? launch_attn_mma<64>(s, in, b, part, out, st, err)
                         : launch_attn_mma<128>(s, in, b, part, out, st, err);
        if (rc || b->nsplit == 1) return rc;
    } else if (in.qkv && !b->counters && (s->hd == 64 || s->hd == 128) &&
               s->nq / s->nkv <= 16 && attn_dmma()) {
        /* decode tiles on the tensor cores: always partial results */
        rc = s->hd == 64 ? launch_attn_dec_mma<64>(s, in, b, part, st, err)
                         : launch_attn_dec_mma<128>(s, in, b, part, st, err);
        if (rc || in.no_merge) return rc;
    } else {
        if (s->hd == 64)
            rc = pick_rw<1>(R, s, in, b, part, out, st, err);
        else if (s->hd == 128)
            rc = pick_rw<2>(R, s, in, b, part, out, st, err);
        else
            rc = pick_rw<4>(R, s, in, b, part, out, st, err);
        if (rc || b->counters || in.no_merge) return rc; /* merged by the attention blocks */
    }
    /* every query row of every tile: rows are token * nq + head, dense in T */
    const int rows = b->T * s->nq;
    CU_LAUNCH(err, "attention merge launch", k_attn_merge, rows, 128, 0, st, (int)s->hd,
              (int)b->nsplit, (const float *)part, out);
    return 0;
}

extern "C" int cu_attn(const cu_attn_shape *s, const float *q, const __half *kc, const __half *vc,
                       const cu_attn_batch *b, float *part, __half *out, cudaStream_t st,
                       lm_err *err)
{
    attn_in in;
    memset(&in, 0, sizeof(in));
    in.q = q;
    in.kc = const_cast<__half *>(kc); /* not written without qkv */
    in.vc = const_cast<__half *>(vc);
    return attn_run(s, in, b, part, out, st, err);
}

static attn_in qkv_in(const float *qkv, const cu_qkv_params *p, __half *kc, __half *vc)
{
    attn_in in;
    memset(&in, 0, sizeof(in));
    in.qkv = qkv;
    in.qp = *p;
    in.kc = kc;
    in.vc = vc;
    return in;
}

static int merge_o_check(const cu_attn_shape *s, int nsplit, const cu_int4_weights *wo, int ldx,
                         lm_err *err)
{
    if (wo->k != s->nq * s->hd || wo->group % 32 || wo->k % wo->group || wo->n < 1 ||
        ldx < wo->n || nsplit < 1 || nsplit > CU_ATTN_MAX_SPLIT)
        return lm_err_set(err, -EINVAL,
                          "attention merge with o_proj: weights %d x %d (group %d) for %d heads "
                          "of %d, %d splits (1..%d)", wo->n, wo->k, wo->group, s->nq, s->hd,
                          nsplit, CU_ATTN_MAX_SPLIT);
    return 0;
}

/* the router's part of cu_attn_merge_o_route: what the kernel assumes */
static int route_o_check(const cu_attn_shape *s, const cu_int4_weights *wo, const cu_route_o *ro,
                         lm_err *err)
{
    const int slices = cuda_div_up(wo->n, 128);
    const int jh = s->nq > 0 ? wo->n / s->nq : 0;
    if (!ro->m || !ro->wr || !ro->nw || !ro->x || !ro->u || ro->rows < 1 || ro->nc < 1 ||
        ro->rows > CU_ROUTE_O_ROWS_PER_SLICE * slices || wo->n % s->nq || jh % 4 || jh > 128 ||
        (((uintptr_t)ro->m | (uintptr_t)ro->wr | (uintptr_t)ro->nw | (uintptr_t)ro->x) & 15))
        return lm_err_set(err, -EINVAL,
                          "attention merge with o_proj and router: %d router rows (1..%d for "
                          "hidden %d), %d copies, hidden %d over %d heads (a multiple of 4, at "
                          "most 128 a head), inputs given and 16-byte aligned", ro->rows,
                          CU_ROUTE_O_ROWS_PER_SLICE * slices, wo->n, ro->nc, wo->n, s->nq);
    return 0;
}

template <int HD>
static void (*merge_o_kernel(bool pf, bool rt))(int, int, const float *, cu_int4_weights, float *,
                                                int, cu_route_o)
{
    return rt ? (pf ? k_attn_merge_o<HD, true, true> : k_attn_merge_o<HD, false, true>)
              : (pf ? k_attn_merge_o<HD, true, false> : k_attn_merge_o<HD, false, false>);
}

static int merge_o_launch(const cu_attn_shape *s, int T, int nsplit, const float *part,
                          const cu_int4_weights *wo, float *x, int ldx, const cu_route_o *ro,
                          cudaStream_t st, lm_err *err)
{
    int rc = merge_o_check(s, nsplit, wo, ldx, err);
    if (rc) return rc;
    if (ro && (rc = route_o_check(s, wo, ro, err))) return rc;
    if (ro && T != 1)
        return lm_err_set(err, -EINVAL, "attention merge with o_proj and router: %d tokens (1)", T);
    if (T <= 0) return 0;
    const bool pf = merge_pf(), rt = ro != nullptr;
    void (*k)(int, int, const float *, cu_int4_weights, float *, int, cu_route_o) =
        s->hd == 64    ? merge_o_kernel<64>(pf, rt)
        : s->hd == 128 ? merge_o_kernel<128>(pf, rt)
        : s->hd == 256 ? merge_o_kernel<256>(pf, rt)
                       : nullptr;
    if (!k)
        return lm_err_set(err, -EINVAL, "attention merge with o_proj: head_dim %d", s->hd);
    const dim3 grid((unsigned)cuda_div_up(wo->n, 128), (unsigned)(T * s->nq));
    cu_route_o r;
    memset(&r, 0, sizeof(r));
    size_t smem = 0;
    if (ro) {
        r = *ro;
        const int eps = cuda_div_up(r.rows, (int)grid.x), jh = wo->n / s->nq;
        smem = ((size_t)eps * (s->hd + 8) + (size_t)eps * (jh + 8) + 2 * jh) * sizeof(float);
    }
    CU_LAUNCH(err, "attention merge + o_proj launch", k, grid, 128, smem, st, (int)s->nq, nsplit,
              part, *wo, x, ldx, r);
    return 0;
}

extern "C" int cu_attn_merge_o(const cu_attn_shape *s, int T, int nsplit, const float *part,
                               const cu_int4_weights *wo, float *x, int ldx, cudaStream_t st,
                               lm_err *err)
{
    return merge_o_launch(s, T, nsplit, part, wo, x, ldx, nullptr, st, err);
}

extern "C" int cu_attn_merge_o_route(const cu_attn_shape *s, int nsplit, const float *part,
                                     const cu_int4_weights *wo, float *o, const cu_route_o *ro,
                                     cudaStream_t st, lm_err *err)
{
    if (!ro) return lm_err_set(err, -EINVAL, "attention merge with o_proj and router: no router");
    return merge_o_launch(s, 1, nsplit, part, wo, o, wo->n, ro, st, err);
}

static int qkv_o(const cu_attn_shape *s, const float *qkv, const cu_qkv_params *p, __half *kc,
                 __half *vc, const cu_attn_batch *b, float *part, const cu_int4_weights *wo,
                 float *x, int ldx, const cu_route_o *ro, cudaStream_t st, lm_err *err)
{
    if (b->bq != 1 || b->n_tiles != b->T || b->counters || (ro && b->T != 1))
        return lm_err_set(err, -EINVAL,
                          "attention with o_proj: decode only, merged by the merge kernel (%d "
                          "tiles of %d tokens for %d tokens%s%s)", b->n_tiles, b->bq, b->T,
                          b->counters ? ", counters set" : "",
                          ro ? ", with the router one token" : "");
    /* before anything runs */
    int rc = wo ? merge_o_check(s, b->nsplit, wo, ldx, err) : 0;
    if (rc || (wo && ro && (rc = route_o_check(s, wo, ro, err)))) return rc;
    attn_in in = qkv_in(qkv, p, kc, vc);
    in.no_merge = true;
    rc = attn_run(s, in, b, part, nullptr, st, err);
    if (rc || b->n_tiles <= 0 || !wo) return rc;
    return merge_o_launch(s, b->T, b->nsplit, part, wo, x, ldx, ro, st, err);
}

extern "C" int cu_attn_qkv_o(const cu_attn_shape *s, const float *qkv, const cu_qkv_params *p,
                             __half *kc, __half *vc, const cu_attn_batch *b, float *part,
                             const cu_int4_weights *wo, float *x, int ldx, cudaStream_t st,
                             lm_err *err)
{
    return qkv_o(s, qkv, p, kc, vc, b, part, wo, x, ldx, nullptr, st, err);
}

extern "C" int cu_attn_qkv_o_route(const cu_attn_shape *s, const float *qkv,
                                   const cu_qkv_params *p, __half *kc, __half *vc,
                                   const cu_attn_batch *b, float *part, const cu_int4_weights *wo,
                                   float *o, const cu_route_o *ro, cudaStream_t st, lm_err *err)
{
    if (!ro || !wo)
        return lm_err_set(err, -EINVAL, "attention with o_proj and router: %s missing",
                          ro ? "o_proj" : "the router");
    return qkv_o(s, qkv, p, kc, vc, b, part, wo, o, wo->n, ro, st, err);
}

extern "C" int cu_attn_qkv(const cu_attn_shape *s, const float *qkv, const cu_qkv_params *p,
                           __half *kc, __half *vc, const cu_attn_batch *b, float *part,
                           __half *out, cudaStream_t st, lm_err *err)
{
    if (b->bq != 1 || b->n_tiles != b->T)
        return lm_err_set(err, -EINVAL,
                          "attention with qkv: decode only (%d tiles of %d tokens for %d tokens)",
                          b->n_tiles, b->bq, b->T);
    return attn_run(s, qkv_in(qkv, p, kc, vc), b, part, out, st, err);
}
