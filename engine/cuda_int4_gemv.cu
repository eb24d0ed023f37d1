/*
 * cuda_int4_gemv.cu: the decode-path INT4 product (few rows per expert),
 * the path chooser cu_int4_matmul, and the act-order gather.
 *
 * Layout of the work: a "team" of TPR lanes (8, 16 or 32, chosen so that a
 * row's K/32 chunks keep the team busy) owns 4 consecutive weight rows; a
 * lane loads one 16-byte chunk (32 nibbles, one group) of each of the 4
 * rows per step, so 4 independent 16-byte loads are in flight per lane,
 * and the 32 matching A values of each token (4 x 16 bytes, L1-resident)
 * are reused for the 4 rows. Up to MT tokens share each dequantised
 * weight. Partial sums are reduced across the team with shuffles; the
 * 4 rows of a team make 2 (gate, up) pairs, so SiLU(gate) * up is fused.
 * A block is 128 threads; grid = (row blocks, work items).
 */
#include <stdlib.h>

#include "engine/cuda_common.cuh"
#include "engine/cuda_int4_gemm.cuh"
#include "engine/cuda_moe.cuh"

#ifndef CU_GEMV_ILP_DEFAULT
#define CU_GEMV_ILP_DEFAULT 2
#endif

namespace {

/* NORM (MT 1, dense, CU_OUT_F32 only): A is rmsnorm(r.x_f32 row) * r.x_norm,
 * made by each block in dynamic shared memory (K halves, then the K norm
 * weights, then 32 floats of scratch: 6K + 128 bytes) right after the
 * dependency wait, while the first chunks' weight loads are in flight. */
/* STAGE (MT 1, NCH 2, one step a lane: K <= 2 * 32 * TPR, no NORM; the
 * launcher checks K): the weight chunks go to dynamic shared memory by
 * cp.async ([rows of the block][K/32] x 16 bytes; a lane reads back only
 * what it copied) instead of registers: 64 registers instead of 111-113,
 * so 8 blocks fit an SM instead of 4 (a qwen3 token's 768 gate_up blocks in
 * one wave; the next launch's blocks beside the down product's). Two copy
 * groups: the first chunk is computed while the second's copies fly. The
 * same weights, scales and zeros (cp.async.cg bypasses L1 where __ldg goes
 * through it), the same arithmetic in the same order (compute_x is
 * compute with A loaded ahead): the same bits. The launch bound of 8 blocks an SM
 * holds it at 63 registers (with 6 ptxas took 80; on sm_90a the SiLU
 * variants spill 4 bytes, none on sm_80); the register kernels have
 * none. */
template <int MT, int TPR, int MODE, int NCH, bool NORM = false, bool STAGE = false>
__global__ void __launch_bounds__(128, STAGE ? 8 : 0)
    k_int4_gemv(cu_int4_weights w, cu_gemm_rows r, const __half *__restrict__ a, int lda,
                void *__restrict__ out, int ldo)
{
    CU_TRACE_KERNEL();
    /* NORM: A row, norm weights, block_sum's scratch; STAGE: the weight chunks */
    extern __shared__ uint4 s_dyn[];
    /* Dense products read only weights before the previous kernel is done
     * (programmatic dependent launch): the first chunks' loads are issued,
     * then the wait. Grouped ones need the work list first, unless it was
     * made before the previous kernel (plan_ready: the down product);
     * products that route the token themselves, unless the logits were
     * (route_ready). row_scale and out_rows are read only after the wait. */
    const bool routes = MT == 1 && r.route; /* refused by cu_int4_gemv at other tiles */
    const bool pre = (!r.items || r.plan_ready) && !r.a_rows && (!routes || r.route_ready);
    bool waited = !pre;
    if (!pre) {
        cu_pdl_wait();
        cu_pdl_trigger();
    }
    int e, start, end;
    if (!cu_item_lookup(r, blockIdx.y, MT, &e, &start, &end)) {
        cu_pdl_wait(); /* no-op if done: every block waits (see cuda_common.cuh) */
        return; /* uniform over the block */
    }
    /* route: warp 0 routes the token (the k choices and weights, then the
     * shared expert's gate); entry `start` is the block's choice */
    __shared__ int32_t s_rid[32];
    __shared__ float s_rw[33];
    float route_w = 1.f;
    if (routes) { /* uniform over the block */
        if (threadIdx.x < 32)
            cu_moe_route_token(r.route, 0, 0, r.route_e, r.route_k, r.route_renorm,
                               r.route_shared, s_rid, s_rw, s_rw + 32);
        __syncthreads();
        e = s_rid[start];
        route_w = s_rw[start];
    }
    const int team = threadIdx.x / TPR, tl = threadIdx.x % TPR;
    const int row0 = (blockIdx.x * (128 / TPR) + team) * 4;
    const int n = w.n, K = w.k, G = w.k / w.group;
    const int C = K / 32;
    const size_t rowbytes = (size_t)K / 2;
    const uint8_t *qs = w.qs + (size_t)e * n * rowbytes;
    const __half *sc = w.scales + (size_t)e * n * G;
    const uint8_t *zp = w.zeros + (size_t)e * n * G;
    const int cnt = end - start;
    const __half *s_a = reinterpret_cast<const __half *>(s_dyn);
    /* NORM: the norm's weights are static, so they are copied to shared
     * memory (after A's K halves) before the wait; after it, x's sum of
     * squares, then A into shared memory */
    if constexpr (NORM) {
        float *s_nw = reinterpret_cast<float *>(s_dyn) + K / 2;
        for (int i = threadIdx.x; i < K / 4; i += 128)
            cp_async16(s_nw + 4 * i, r.x_norm + 4 * i, true);
        cp_async_commit();
    }
    auto norm_in = [&]() {
        if constexpr (NORM) {
            const float4 *x4 = reinterpret_cast<const float4 *>(r.x_f32 + (size_t)start * K);
            const float4 *g4 = reinterpret_cast<const float4 *>(s_dyn) + K / 8;
            float ss = 0.f;
            for (int i = threadIdx.x; i < K / 4; i += 128) {
                const float4 v = x4[i];
                ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
            cp_async_wait<0>(); /* block_sum's barriers publish the copies */
            float *s_part = reinterpret_cast<float *>(s_dyn) + K / 2 + K; /* 32 floats */
            const float inv = rsqrtf(block_sum(ss, s_part) / (float)K + r.x_eps);
            __half2 *sa = reinterpret_cast<__half2 *>(s_dyn);
            for (int i = threadIdx.x; i < K / 4; i += 128) {
                const float4 v = x4[i], g = g4[i];
                sa[2 * i] = __floats2half2_rn(g.x * (v.x * inv), g.y * (v.y * inv));
                sa[2 * i + 1] = __floats2half2_rn(g.z * (v.z * inv), g.w * (v.w * inv));
            }
            __syncthreads();
        }
    };

    /* the block's share of expert e's next matrix (r.pf), to L2 (grouped
     * gate_up only, so that no other product's code changes) */
    auto l2_prefetch = [&]() {
        if constexpr (MODE != CU_OUT_SILU_F16)
            return;
        if (!r.pf.qs || !(r.items || routes))
            return;
        const size_t G = (size_t)r.pf.n * (r.pf.k / r.pf.group);
        const size_t nb[3] = {(size_t)r.pf.n * (r.pf.k / 2), 2 * G, G};
        const uint8_t *base[3] = {r.pf.qs + (size_t)e * nb[0],
                                  reinterpret_cast<const uint8_t *>(r.pf.scales) + (size_t)e * nb[1],
                                  r.pf.zeros + (size_t)e * nb[2]};
#pragma unroll
        for (int t = 0; t < 3; t++) {
            const size_t share = (nb[t] + gridDim.x - 1) / gridDim.x;
            const size_t lo = blockIdx.x * share, hi = min(nb[t], lo + share);
            for (size_t o = lo + 128 * threadIdx.x; o < hi; o += 128 * 128)
                asm volatile("prefetch.global.L2 [%0];" ::"l"(base[t] + o));
        }
    };

    const __half *arow[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) {
        int i = start + (m < cnt ? m : 0);
        int ar = r.a_rows ? r.a_rows[i] : i;
        arow[m] = a + (size_t)ar * lda;
    }
    int rr[4];
#pragma unroll
    for (int j = 0; j < 4; j++)
        rr[j] = min(row0 + j, n - 1); /* clamped: tail rows compute garbage, never stored */

    float acc[4][MT];
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int m = 0; m < MT; m++)
            acc[j][m] = 0.f;

    auto load = [&](int c, uint4 wv[4], half2 s2[4], half2 z2[4]) {
        const int grp = (c * 32) / w.group;
#pragma unroll
        for (int j = 0; j < 4; j++)
            wv[j] = __ldg(reinterpret_cast<const uint4 *>(qs + (size_t)rr[j] * rowbytes) + c);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            s2[j] = __half2half2(sc[(size_t)rr[j] * G + grp]);
            z2[j] = int4_zero2(zp[(size_t)rr[j] * G + grp]);
        }
    };
    /* The staged kernel's A for chunk c: four 16-byte loads at once. A is
     * read with ordinary loads (__ldca), not __ldg: ptxas takes
     * ld.global.nc for data that cannot change while the kernel runs, and
     * moved such loads of A above griddepcontrol.wait, where the previous
     * kernel may still be writing A (seen in the SASS). */
    auto load_x = [&](int c, uint4 xv[4]) {
#pragma unroll
        for (int q = 0; q < 4; q++)
            xv[q] = __ldca(reinterpret_cast<const uint4 *>(arow[0] + c * 32 + q * 8));
    };
    /* a chunk's int4_unpack8 offsets and 64 x scale, for each of the 4 rows */
    auto unpack_consts = [](const half2 s2[4], const half2 z2[4], half2 zlo[4], half2 zhi[4],
                            float sj[4]) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int4_zoff(z2[j], &zlo[j], &zhi[j]);
            sj[j] = 64.f * __low2float(s2[j]); /* int4_unpack8's 1/64 */
        }
    };
    /* Register kernels: chunk c's weights as (q - zero) / 64 (int4_unpack8,
     * exact in fp16), A's 8 inputs loaded right before their use, each
     * word's 8 products summed 4 a half in fp16, then into the fp32 sum
     * times 64 x the row's scale (a chunk is in one group): for every token
     * the staged kernel's arithmetic in its order, so a token's rows have
     * the same bits at every tile of the same lanes a row (a request alone
     * and in a batch of 2-4; not at K >= 4096, where one token takes teams
     * of 64 (LIGHTMOE_CUDA_GEMV_T64) and more take 32, nor with
     * LIGHTMOE_CUDA_GEMV_ILP=4; there the fp32 sums' order differs). */
    auto compute = [&](int c, const uint4 wv[4], const half2 s2[4], const half2 z2[4]) {
        half2 zlo[4], zhi[4];
        float sj[4];
        unpack_consts(s2, z2, zlo, zhi, sj);
#pragma unroll
        for (int q = 0; q < 4; q++) { /* 8 inputs k = c*32 + 8q .. +7 */
            half2 wd[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t word = (q == 0) ? wv[j].x : (q == 1) ? wv[j].y : (q == 2) ? wv[j].z : wv[j].w;
                int4_unpack8(word, zlo[j], zhi[j], wd[j]);
            }
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < cnt) {
                    uint4 xv = NORM ? *reinterpret_cast<const uint4 *>(s_a + c * 32 + q * 8)
                                    : __ldg(reinterpret_cast<const uint4 *>(arow[m] + c * 32 + q * 8));
                    uint32_t xp[4];
                    int4_xpairs(xv, xp);
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        acc[j][m] = fmaf(int4_dot8(wd[j], xp), sj[j], acc[j][m]);
                }
            }
        }
    };
    /* The staged kernel (one token): compute's arithmetic in its order (the
     * same bits), with the chunk's A loaded ahead (xv, load_x). */
    auto compute_x = [&](int c, const uint4 wv[4], const half2 s2[4], const half2 z2[4],
                         const uint4 xv[4]) {
        half2 zlo[4], zhi[4];
        float sj[4];
        unpack_consts(s2, z2, zlo, zhi, sj);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            uint32_t xp[4];
            int4_xpairs(xv[q], xp);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t word = (q == 0) ? wv[j].x : (q == 1) ? wv[j].y : (q == 2) ? wv[j].z : wv[j].w;
                half2 wd[4];
                int4_unpack8(word, zlo[j], zhi[j], wd);
                acc[j][0] = fmaf(int4_dot8(wd, xp), sj[j], acc[j][0]);
            }
        }
    };
    if constexpr (STAGE) { /* one step: c = tl and tl + TPR (launcher: C <= 2 * TPR) */
        static_assert(MT == 1 && NCH == 2 && !NORM, "staged gemv: one token, two chunks a lane");
        uint4 *s_w = s_dyn + (size_t)(team * 4) * C; /* the team's 4 rows */
        const int c = tl;
        half2 sa[4], za[4], sb[4], zb[4];
        const bool one = c < C, two = c + TPR < C;
        auto stage = [&](int cc, half2 s2[4], half2 z2[4]) {
            const int grp = (cc * 32) / w.group;
#pragma unroll
            for (int j = 0; j < 4; j++)
                cp_async16(s_w + (size_t)j * C + cc,
                           reinterpret_cast<const uint4 *>(qs + (size_t)rr[j] * rowbytes) + cc, true);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                s2[j] = __half2half2(sc[(size_t)rr[j] * G + grp]);
                z2[j] = int4_zero2(zp[(size_t)rr[j] * G + grp]);
            }
        };
        /* two copy groups, so that the first chunk is computed while the
         * second's copies are still coming (an empty group is complete) */
        if (one)
            stage(c, sa, za);
        cp_async_commit();
        if (two)
            stage(c + TPR, sb, zb);
        cp_async_commit();
        if (one)
            l2_prefetch();
        if (!waited) {
            cu_pdl_wait();
            cu_pdl_trigger();
            waited = true;
            cu_trace_mark(0);
        }
        /* A's inputs for a chunk before its weights are in: the first's
         * after the dependency wait (A may be the previous kernel's
         * output), the second's after the first is computed (registers) */
        uint4 xa[4], xb[4];
        if (one)
            load_x(c, xa);
        cp_async_wait<1>(); /* the lane's own copies: no barrier needed */
        if (one) {
            uint4 wv[4];
#pragma unroll
            for (int j = 0; j < 4; j++)
                wv[j] = s_w[(size_t)j * C + c];
            compute_x(c, wv, sa, za, xa);
        }
        if (two)
            load_x(c + TPR, xb);
        cp_async_wait<0>();
        if (two) {
            uint4 wv[4];
#pragma unroll
            for (int j = 0; j < 4; j++)
                wv[j] = s_w[(size_t)j * C + c + TPR];
            compute_x(c + TPR, wv, sb, zb, xb);
        }
    } else if constexpr (NCH == 2) {
        /* NCH chunks per step, every chunk's loads issued before any is
         * used: 4 * NCH independent 16-byte weight loads in flight per
         * lane. NCH 2 keeps the loop as it was measured (docs/PERF.md). */
        for (int c = tl; c < C; c += 2 * TPR) {
            uint4 wa[4], wb[4];
            half2 sa[4], za[4], sb[4], zb[4];
            const bool two = c + TPR < C;
            load(c, wa, sa, za);
            if (two)
                load(c + TPR, wb, sb, zb);
            if (c == tl) /* the first step */
                l2_prefetch();
            if (!waited) { /* every lane gets here in the first step (C >= TPR) */
                cu_pdl_wait();
                cu_pdl_trigger();
                waited = true;
                norm_in();
                cu_trace_mark(0);
            }
            compute(c, wa, sa, za);
            if (two)
                compute(c + TPR, wb, sb, zb);
        }
    } else {
        for (int c = tl; c < C; c += NCH * TPR) {
            uint4 wv[NCH][4];
            half2 s2[NCH][4], z2[NCH][4];
#pragma unroll
            for (int u = 0; u < NCH; u++)
                if (c + u * TPR < C)
                    load(c + u * TPR, wv[u], s2[u], z2[u]);
            if (c == tl)
                l2_prefetch();
            if (!waited) { /* every lane gets here in the first step (C >= TPR) */
                cu_pdl_wait();
                cu_pdl_trigger();
                waited = true;
                norm_in();
                cu_trace_mark(0);
            }
#pragma unroll
            for (int u = 0; u < NCH; u++)
                if (c + u * TPR < C)
                    compute(c + u * TPR, wv[u], s2[u], z2[u]);
        }
    }
    if (!waited) {
        cu_pdl_wait();
        cu_pdl_trigger();
    }
    cu_trace_mark(1);
    /* the shared expert's gate, after the wait: the previous layer's readers are done */
    if (routes && r.route_sg && r.route_shared && blockIdx.x == 0 && blockIdx.y == 0 &&
        threadIdx.x == 0)
        *r.route_sg = s_rw[32];
    constexpr int W = TPR < 32 ? TPR : 32; /* shuffle width */
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int m = 0; m < MT; m++) {
            float v = acc[j][m];
#pragma unroll
            for (int o = W / 2; o > 0; o >>= 1)
                v += __shfl_xor_sync(0xffffffffu, v, o, W);
            acc[j][m] = v;
        }
    if constexpr (TPR == 64) { /* a team is two warps: the second's sums via shared memory */
        __shared__ float s_acc[2][4][MT];
        const int warp = threadIdx.x / 32;
        if ((warp & 1) && (threadIdx.x & 31) == 0)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int m = 0; m < MT; m++)
                    s_acc[warp / 2][j][m] = acc[j][m];
        __syncthreads();
        if (tl == 0)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int m = 0; m < MT; m++)
                    acc[j][m] += s_acc[warp / 2][j][m];
    }
    cu_trace_mark(2);
    if (tl != 0)
        return;
#pragma unroll
    for (int m = 0; m < MT; m++) {
        if (m >= cnt)
            break;
        const int i = start + m;
        const float rs = r.row_scale ? r.row_scale[i] : routes && r.route_scale ? route_w : 1.f;
        if (MODE == CU_OUT_SILU_F16) {
            __half *o = static_cast<__half *>(out) + (size_t)i * ldo;
#pragma unroll
            for (int j = 0; j < 4; j += 2)
                if (row0 + j + 1 < n)
                    o[(row0 + j) / 2] = __float2half(cu_silu(acc[j][m]) * acc[j + 1][m] * rs);
        } else {
            const int orow = MODE == CU_OUT_F32_ADD && r.out_rows ? r.out_rows[i] : i;
            float *o = static_cast<float *>(out) + (size_t)orow * ldo;
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (row0 + j < n) {
                    if (MODE == CU_OUT_F32_ADD)
                        atomicAdd(o + row0 + j, acc[j][m] * rs);
                    else if (MODE == CU_OUT_F32_ACC)
                        o[row0 + j] += acc[j][m] * rs;
                    else
                        o[row0 + j] = acc[j][m] * rs;
                }
        }
    }
}

/* Grouped one-token products whose lanes copy at most two chunks a row
 * (K <= 64 * TPR) stage their weights through shared memory (the STAGE
 * kernel above). On unless LIGHTMOE_CUDA_GEMV_STAGE=0 (read once; tests
 * switch it with cu_int4_gemv_set_stage). Measured on the H100
 * (docs/PERF.md, round 15): a qwen3-30b-a3b step at batch 1 and 512
 * positions 3.5% faster, mostly because the next layer's qkv blocks find
 * room beside the down product's (64 registers) and load early;
 * qwen1.5-moe-a2.7b and 4096 positions within +-1%. */
static int g_stage = -1;
static long g_staged; /* launches of the staged kernel (tests) */
static int gemv_stage(void)
{
    return cu_env_switch(&g_stage, "LIGHTMOE_CUDA_GEMV_STAGE");
}

/* One launch of k_int4_gemv<MT, TPR, mode, NCH, no NORM, STAGE>. */
template <int MT, int TPR, int NCH, bool STAGE>
cudaError_t launch_modes(dim3 grid, size_t smem, const cu_int4_weights *w, const cu_gemm_rows *r,
                         const __half *a, int lda, void *out, int ldo, cu_out_mode mode,
                         cudaStream_t st)
{
    switch (mode) {
    case CU_OUT_F32:
        return cu_launch(k_int4_gemv<MT, TPR, CU_OUT_F32, NCH, false, STAGE>, grid, 128, smem, st,
                         *w, *r, a, lda, out, ldo);
    case CU_OUT_F32_ACC:
        return cu_launch(k_int4_gemv<MT, TPR, CU_OUT_F32_ACC, NCH, false, STAGE>, grid, 128, smem,
                         st, *w, *r, a, lda, out, ldo);
    case CU_OUT_SILU_F16:
        return cu_launch(k_int4_gemv<MT, TPR, CU_OUT_SILU_F16, NCH, false, STAGE>, grid, 128, smem,
                         st, *w, *r, a, lda, out, ldo);
    case CU_OUT_F32_ADD:
        return cu_launch(k_int4_gemv<MT, TPR, CU_OUT_F32_ADD, NCH, false, STAGE>, grid, 128, smem,
                         st, *w, *r, a, lda, out, ldo);
    }
    return cudaErrorInvalidValue;
}

template <int MT, int TPR, int NCH>
int launch_gemv_mode(const cu_int4_weights *w, const cu_gemm_rows *r, const __half *a, int lda,
                     void *out, int ldo, cu_out_mode mode, cudaStream_t st)
{
    const int rows_per_block = (128 / TPR) * 4;
    const int gy = r->items ? r->max_items : cuda_div_up(r->n_rows, MT);
    dim3 grid(cuda_div_up(w->n, rows_per_block), gy);
    if (gy == 0)
        return 0;
    cudaError_t e = cudaSuccess;
    if constexpr (MT == 1) {
        if (r->x_f32) { /* checked by cu_int4_gemv: dense, CU_OUT_F32 */
            const size_t smem = (size_t)w->k * 6 + 32 * sizeof(float);
            if (smem > 48 * 1024)
                e = cudaFuncSetAttribute(k_int4_gemv<1, TPR, CU_OUT_F32, NCH, true>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
            if (e == cudaSuccess)
                e = cu_launch(k_int4_gemv<1, TPR, CU_OUT_F32, NCH, true>, grid, 128, smem, st, *w,
                              *r, a, lda, out, ldo);
            if (e != cudaSuccess)
                cudaGetLastError();
            return e == cudaSuccess ? 0 : (int)e;
        }
    }
    const bool stage = MT == 1 && NCH == 2 && gemv_stage() && r->items && !r->route &&
                       w->k / 32 <= 2 * TPR;
    if constexpr (MT == 1 && NCH == 2) {
        if (stage) {
            const size_t smem = (size_t)rows_per_block * (w->k / 32) * 16; /* <= 16 KB */
            e = launch_modes<1, TPR, 2, true>(grid, smem, w, r, a, lda, out, ldo, mode, st);
            if (e == cudaSuccess)
                __atomic_add_fetch(&g_staged, 1, __ATOMIC_RELAXED);
        }
    }
    if (!stage)
        e = launch_modes<MT, TPR, NCH, false>(grid, 0, w, r, a, lda, out, ldo, mode, st);
    if (e != cudaSuccess)
        cudaGetLastError(); /* e is reported by the caller; clear it here */
    return e == cudaSuccess ? 0 : (int)e;
}

/* Chunks loaded per step by one lane (LIGHTMOE_CUDA_GEMV_ILP, read once):
 * 2, or 4 for one-token products (every product, or "4g": grouped
 * ones only). 4 chunks a lane with a team of K/128 lanes means fewer,
 * wider blocks: the 8 experts' gate_up of a qwen3 token (768 blocks of
 * 16 rows at 2) fit one wave (384 blocks of 32 rows). */
static int g_ilp = -1; /* 2, 4 (all), 5 (grouped only) */
static int gemv_ilp(void)
{
    int v = __atomic_load_n(&g_ilp, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *e = getenv("LIGHTMOE_CUDA_GEMV_ILP");
        v = CU_GEMV_ILP_DEFAULT;
        if (e && e[0] == '2')
            v = 2;
        else if (e && e[0] == '4')
            v = e[1] == 'g' ? 5 : 4;
        __atomic_store_n(&g_ilp, v, __ATOMIC_RELAXED);
    }
    return v;
}

/* One-token products with K >= 4096 (128+ chunks): teams of 64 lanes (two
 * warps), so that a lane loads once and there are twice the blocks
 * (LIGHTMOE_CUDA_GEMV_T64=0: teams of 32, each lane loading twice). */
static int g_t64 = -1;
static int gemv_t64(void)
{
    return cu_env_switch(&g_t64, "LIGHTMOE_CUDA_GEMV_T64");
}

template <int MT>
int launch_gemv_tpr(const cu_int4_weights *w, const cu_gemm_rows *r, const __half *a, int lda,
                    void *out, int ldo, cu_out_mode mode, cudaStream_t st)
{
    const int chunks = w->k / 32;
    if (MT == 1 && chunks >= 128 && gemv_ilp() == 2 && gemv_t64())
        return launch_gemv_mode<1, 64, 2>(w, r, a, lda, out, ldo, mode, st);
    if (MT == 1) {
        const int ilp = gemv_ilp();
        if (ilp == 4 || (ilp == 5 && (r->items || r->route))) {
            if (chunks > 64)
                return launch_gemv_mode<1, 32, 4>(w, r, a, lda, out, ldo, mode, st);
            if (chunks > 32)
                return launch_gemv_mode<1, 16, 4>(w, r, a, lda, out, ldo, mode, st);
            return launch_gemv_mode<1, 8, 4>(w, r, a, lda, out, ldo, mode, st);
        }
    }
    if (chunks >= 32)
        return launch_gemv_mode<MT, 32, 2>(w, r, a, lda, out, ldo, mode, st);
    if (chunks >= 16)
        return launch_gemv_mode<MT, 16, 2>(w, r, a, lda, out, ldo, mode, st);
    return launch_gemv_mode<MT, 8, 2>(w, r, a, lda, out, ldo, mode, st);
}

__global__ void k_gather_rows(const __half *__restrict__ x, int ldx, const int32_t *__restrict__ rows,
                              int k, const int32_t *__restrict__ perm,
                              const int32_t *__restrict__ ent_expert, __half *__restrict__ out)
{
    CU_TRACE_KERNEL();
    cu_pdl_wait();
    cu_pdl_trigger();
    const int i = blockIdx.x;
    const int src = rows ? rows[i] : i;
    const int32_t *p = perm ? perm + (size_t)(ent_expert ? ent_expert[i] : 0) * k : nullptr;
    for (int j = threadIdx.x; j < k; j += blockDim.x)
        out[(size_t)i * k + j] = x[(size_t)src * ldx + (p ? p[j] : j)];
}

/* One thread per 8 weights (one 32-bit word of nibbles k0..k7, k0 in the
 * low bits): the same (q - zero) * scale in fp16 as the mma kernels use, written
 * as 8 consecutive halves. Waits first: the workspace it overwrites may
 * still be read by the previous product. */
__global__ void k_int4_dequant(cu_int4_weights w, __half *__restrict__ out)
{
    CU_TRACE_KERNEL();
    cu_pdl_wait();
    cu_pdl_trigger();
    const size_t words = (size_t)w.n * (w.k / 8);
    const int G = w.k / w.group;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < words;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / (w.k / 8);
        const int kk = (int)(i % (w.k / 8)) * 8, grp = kk / w.group;
        const uint32_t word = __ldg(reinterpret_cast<const uint32_t *>(w.qs + row * (w.k / 2) + kk / 2));
        half2 d[4];
        int4_dequant8(word, int4_zero2(w.zeros[row * G + grp]), __half2half2(w.scales[row * G + grp]), d);
        /* d[i] = (k_i, k_{i+4}) */
        uint4 v;
        v.x = prmt(*reinterpret_cast<uint32_t *>(&d[0]), *reinterpret_cast<uint32_t *>(&d[1]), 0x5410);
        v.y = prmt(*reinterpret_cast<uint32_t *>(&d[2]), *reinterpret_cast<uint32_t *>(&d[3]), 0x5410);
        v.z = prmt(*reinterpret_cast<uint32_t *>(&d[0]), *reinterpret_cast<uint32_t *>(&d[1]), 0x7632);
        v.w = prmt(*reinterpret_cast<uint32_t *>(&d[2]), *reinterpret_cast<uint32_t *>(&d[3]), 0x7632);
        *reinterpret_cast<uint4 *>(out + row * w.k + kk) = v;
    }
}

} // namespace

extern "C" void cu_int4_gemv_set_ilp(int chunks)
{
    __atomic_store_n(&g_ilp, chunks, __ATOMIC_RELAXED);
}

extern "C" int cu_int4_gemv_set_stage(int on)
{
    return cu_env_switch_set(&g_stage, "LIGHTMOE_CUDA_GEMV_STAGE", on);
}

extern "C" long cu_int4_gemv_staged_launches(void)
{
    return __atomic_load_n(&g_staged, __ATOMIC_RELAXED);
}

extern "C" int cu_int4_gemv_set_t64(int on)
{
    return cu_env_switch_set(&g_t64, "LIGHTMOE_CUDA_GEMV_T64", on);
}

extern "C" int cu_int4_dequant(const cu_int4_weights *w, __half *out, cudaStream_t st, lm_err *err)
{
    if (w->k % 32 || w->group % 32 || w->k % w->group || w->n <= 0)
        return lm_err_set(err, -EINVAL, "int4 dequant: bad shape n=%d k=%d group=%d", w->n, w->k,
                          w->group);
    const size_t words = (size_t)w->n * (w->k / 8);
    const unsigned blocks = (unsigned)(words < 256u * 132 * 8 ? cuda_div_up((int)words, 256) : 132 * 8);
    CU_LAUNCH(err, "int4 dequant launch", k_int4_dequant, blocks, 256, 0, st, *w, out);
    return 0;
}

extern "C" int cu_int4_check(const cu_int4_weights *w, int lda, cu_out_mode mode,
                             const char *who, lm_err *err)
{
    if (w->k % 32 || w->group % 32 || w->k % w->group || w->n <= 0)
        return lm_err_set(err, -EINVAL, "int4 %s: bad shape n=%d k=%d group=%d", who, w->n, w->k,
                          w->group);
    if (lda % 8)
        return lm_err_set(err, -EINVAL, "int4 %s: lda %d not a multiple of 8", who, lda);
    if (mode == CU_OUT_SILU_F16 && w->n % 2)
        return lm_err_set(err, -EINVAL, "int4 %s: fused SiLU needs an even row count", who);
    return 0;
}

extern "C" int cu_int4_gemv(const cu_int4_weights *w, const cu_gemm_rows *r, const __half *a,
                            int lda, void *out, int ldo, cu_out_mode mode, int tile,
                            cudaStream_t st, lm_err *err)
{
    int rc = cu_int4_check(w, lda, mode, "matmul", err);
    if (rc)
        return rc;
    if (r->x_f32) {
        if (tile != 1 || mode != CU_OUT_F32 || r->items || r->a_rows || !r->x_norm)
            return lm_err_set(err, -EINVAL,
                              "int4 gemv: the normalising input needs one token, a dense layer "
                              "and plain fp32 output (tile %d, mode %d)", tile, (int)mode);
        if (w->k % 4 || w->k < 256 || w->k > 8192 ||
            (((uintptr_t)r->x_f32 | (uintptr_t)r->x_norm) & 15))
            return lm_err_set(err, -EINVAL,
                              "int4 gemv: the normalising input needs K %% 4 == 0, 256 <= K <= "
                              "8192 and 16-byte aligned rows (K %d)", w->k);
    }
    if (r->route && (tile != 1 || r->items || r->a_rows || r->x_f32 || r->route_k < 1 ||
                     r->route_k > 32 || r->route_k > r->route_e || r->route_e > 1024 ||
                     r->n_rows != r->route_k))
        return lm_err_set(err, -EINVAL,
                          "int4 gemv: routing in the product needs one token (tile %d), no work "
                          "list, k <= 32 entries (%d of %d, %d experts)",
                          tile, r->n_rows, r->route_k, r->route_e);
    switch (tile) {
    case 1: rc = launch_gemv_tpr<1>(w, r, a, lda, out, ldo, mode, st); break;
    case 2: rc = launch_gemv_tpr<2>(w, r, a, lda, out, ldo, mode, st); break;
    case 4: rc = launch_gemv_tpr<4>(w, r, a, lda, out, ldo, mode, st); break;
    case 8: rc = launch_gemv_tpr<8>(w, r, a, lda, out, ldo, mode, st); break;
    default: return lm_err_set(err, -EINVAL, "int4 gemv: tile %d not in {1,2,4,8}", tile);
    }
    if (rc > 0)
        return cuda_err(err, (cudaError_t)rc, "int4 gemv launch");
    CUDA_LAUNCH_CHECK(err, "int4 gemv launch");
    return rc;
}

/* The automatic path takes cu_int4_mma8 (tile 8) for MMA8_MIN to 16 rows
 * (an expert then has at most two items of 8) unless LIGHTMOE_CUDA_MMA8=0
 * (read once; tests switch it with cu_int4_set_mma8). Measured on the H100
 * (docs/PERF.md, round 12): 8-row products 2-3x faster than the mma
 * kernel's 16-row tiles; decode steps at batch 8 -24 to -29%, at 16 -7 to
 * -16%. From 32 rows on, experts that draw many tokens would re-read their
 * weights for every 8, and the 16-64-row tiles are kept. At one row the
 * gemv is faster. From 2 rows on (LIGHTMOE_CUDA_MMA8_MIN=2) batches 2-4
 * gain 5-26% too, but the default stays at 5: the one-row gemv (a
 * sequence alone) and mma8 (fp32 sums) round differently, and in
 * `verify --batch` on qwen2moe-tiny-gptq (3 prompts) that flips the
 * fixture's known near-tied router choice (prompt 0, row 27: batched !=
 * alone). */
static int g_mma8 = -1;
static int mma8_on(void)
{
    return cu_env_switch(&g_mma8, "LIGHTMOE_CUDA_MMA8");
}

/* the fewest rows the automatic path gives cu_int4_mma8: 2..16, 5 unless
 * LIGHTMOE_CUDA_MMA8_MIN (read once) */
static int g_mma8_min = -1;
static int mma8_min(void)
{
    int v = __atomic_load_n(&g_mma8_min, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *e = getenv("LIGHTMOE_CUDA_MMA8_MIN");
        v = e ? atoi(e) : 5;
        v = v < 2 ? 2 : v > 16 ? 16 : v;
        __atomic_store_n(&g_mma8_min, v, __ATOMIC_RELAXED);
    }
    return v;
}

extern "C" int cu_int4_set_mma8(int on)
{
    return cu_env_switch_set(&g_mma8, "LIGHTMOE_CUDA_MMA8", on);
}

extern "C" int cu_int4_tile_for(int max_rows, int avg_rows, cu_gemm_path path)
{
    if (path == CU_GEMM_MMA8 || (path == CU_GEMM_AUTO && max_rows >= mma8_min() &&
                                 max_rows <= 16 && mma8_on()))
        return 8;
    /* (without mma8) gemv up to 4 rows: measured on the H100 (docs/PERF.md),
     * the split-K mma kernel is faster from 8 rows on (13.2 vs 17.8 us, qkv
     * 5120x2048) and the gemv twice as fast at 1 row (6.7 vs 13.1 us) */
    if (path == CU_GEMM_GEMV || (path == CU_GEMM_AUTO && max_rows <= 4)) {
        int t = 1;
        while (t < max_rows && t < 8)
            t *= 2;
        return t;
    }
    if (avg_rows <= 16)
        return 16;
    if (avg_rows <= 32)
        return 32;
    return 64;
}

extern "C" int cu_int4_matmul(const cu_int4_weights *w, const cu_gemm_rows *r, const __half *a,
                              int lda, void *out, int ldo, cu_out_mode mode, cu_gemm_path path,
                              cudaStream_t st, lm_err *err)
{
    /* routing in the product: entries of one token, one row an expert */
    const int rows = r->route ? 1 : r->n_rows;
    int tile = r->items ? r->tile : cu_int4_tile_for(rows, rows, path);
    /* tile 8 on the automatic path comes from cu_int4_tile_for's mma8 rule */
    if (tile == 8 && (path == CU_GEMM_MMA8 || path == CU_GEMM_AUTO) && !r->route && !r->x_f32)
        return cu_int4_mma8(w, r, a, lda, out, ldo, mode, st, err);
    if (tile <= 8)
        return cu_int4_gemv(w, r, a, lda, out, ldo, mode, tile, st, err);
    return cu_int4_mma(w, r, a, lda, out, ldo, mode, tile, st, err);
}

extern "C" int cu_gather_rows(const __half *x, int ldx, const int32_t *rows, int n_rows, int k,
                              const int32_t *perm, const int32_t *ent_expert, __half *out,
                              cudaStream_t st, lm_err *err)
{
    if (n_rows <= 0)
        return 0;
    CU_LAUNCH(err, "gather rows launch", k_gather_rows, n_rows, 256, 0, st, x, ldx, rows, k, perm,
              ent_expert, out);
    return 0;
}
