/*
 * cuda_moe.cu: routing, grouping by expert and combining (see
 * cuda_moe.cuh). Routing is one warp per token; grouping is one block of
 * 1024 threads (counts with shared atomics, a scan, scatter); combining is
 * one block per token.
 */
#include "engine/cuda_common.cuh"
#include "engine/cuda_moe.cuh"

namespace
{

constexpr int MAX_K = 32;

__global__ void k_moe_route(const float *__restrict__ logits, int ldl, int T, int E, int k,
                            int renorm, int has_shared, int32_t *__restrict__ ids,
                            float *__restrict__ wts, float *__restrict__ sg)
{
    CU_TRACE_KERNEL();
    cu_pdl_wait();
    cu_pdl_trigger();
    const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (t < T) cu_moe_route_token(logits, ldl, t, E, k, renorm, has_shared, ids, wts, sg);
}

/* counts -> offsets and items (thread 0; E and the item count are small)
 * -> scatter of the entries. Called by a whole block. */
__device__ void group_entries(const int32_t *__restrict__ ids, const float *__restrict__ wts, int n,
                              int k, int E, int tile, const cu_moe_plan &p, int *s_mem)
{
    /* s_mem: cnt[E], base[E], then two scan arrays of blockDim ints */
    int *cnt = s_mem, *base = s_mem + E, *sa = s_mem + 2 * E, *sb = sa + blockDim.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        cnt[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        atomicAdd(&cnt[ids[i]], 1);
    __syncthreads();
    /* inclusive scans of the counts (va) and of the tiles per expert (vb):
     * shuffles inside each warp, then over the warp totals (E <= blockDim,
     * checked by the launcher; blockDim a multiple of 32) */
    const int e = threadIdx.x, lane = e & 31, wid = e >> 5;
    const int c = e < E ? cnt[e] : 0;
    const int ni = (c + tile - 1) / tile;
    int va = c, vb = ni;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        const int ta = __shfl_up_sync(0xffffffffu, va, d), tb = __shfl_up_sync(0xffffffffu, vb, d);
        if (lane >= d) {
            va += ta;
            vb += tb;
        }
    }
    if (lane == 31) {
        sa[wid] = va;
        sb[wid] = vb;
    }
    __syncthreads();
    if (wid == 0) {
        const int nw = blockDim.x / 32;
        int xa = lane < nw ? sa[lane] : 0, xb = lane < nw ? sb[lane] : 0;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
            const int ta = __shfl_up_sync(0xffffffffu, xa, d),
                      tb = __shfl_up_sync(0xffffffffu, xb, d);
            if (lane >= d) {
                xa += ta;
                xb += tb;
            }
        }
        sa[lane] = xa;
        sb[lane] = xb;
    }
    __syncthreads();
    if (wid > 0) {
        va += sa[wid - 1];
        vb += sb[wid - 1];
    }
    if (e < E) {
        const int off = va - c, it = vb - ni;
        p.offsets[e] = off;
        base[e] = off;
        for (int q = 0; q < ni; q++)
            p.items[it + q] = make_int2(e, off + q * tile);
        if (e == E - 1) {
            p.offsets[E] = va;
            *p.n_items = vb;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int e = ids[i];
        const int at = atomicAdd(&base[e], 1);
        p.ent_token[at] = i / k;
        p.ent_expert[at] = e;
        p.ent_weight[at] = wts[i];
        p.pos[i] = at;
    }
}

__global__ void __launch_bounds__(1024)
    k_moe_group(const int32_t *__restrict__ ids, const float *__restrict__ wts, int n, int k, int E,
                int tile, cu_moe_plan p)
{
    CU_TRACE_KERNEL();
    extern __shared__ int s_mem[];
    cu_pdl_wait();
    cu_pdl_trigger();
    group_entries(ids, wts, n, k, E, tile, p, s_mem);
}

/* Routing of T tokens (warp per token) then grouping, in one block: one
 * launch instead of two for decode-sized batches. */
__global__ void __launch_bounds__(1024)
    k_moe_route_group(const float *__restrict__ logits, int ldl, int T, int E, int k, int renorm,
                      int has_shared, int tile, int32_t *ids, float *wts, float *sg, cu_moe_plan p)
{
    CU_TRACE_KERNEL();
    extern __shared__ int s_mem[];
    cu_pdl_wait();
    cu_pdl_trigger();
    for (int t = threadIdx.x / 32; t < T; t += blockDim.x / 32)
        cu_moe_route_token(logits, ldl, t, E, k, renorm, has_shared, ids, wts, sg);
    __syncthreads(); /* the block's global writes are visible to the block after this */
    group_entries(ids, wts, T * k, k, E, tile, p, s_mem);
}

/* The plan of n <= 32 entries (entry i's expert and weight in s_e[i], s_w[i]),
 * by one warp with entry i in lane i, no atomics: the entry's slot is
 * (entries of lower experts) + (earlier entries of its expert), so an
 * expert's entries keep their slot order; the first entry of an expert
 * writes its work items. */
__device__ __forceinline__ void plan_warp(const int *s_e, const float *s_w, int n, int k, int E,
                                          int tile, const cu_moe_plan &p)
{
    const int lane = threadIdx.x & 31;
    __shared__ int s_ni[32];
    const bool act = lane < n;
    const int em = act ? s_e[lane] : 0x7fffffff;
    int lt = 0, before = 0, cnt = 0;
    for (int j = 0; j < n; j++) {
        const int ej = s_e[j];
        lt += ej < em;
        before += ej == em && j < lane;
        cnt += ej == em;
    }
    const int at = lt + before;
    if (act) {
        p.pos[lane] = at;
        p.ent_token[at] = lane / k;
        p.ent_expert[at] = em;
        p.ent_weight[at] = s_w[lane];
    }
    cu_trace_mark(1);
    const int ni = act && before == 0 ? (cnt + tile - 1) / tile : 0; /* an expert's first entry */
    s_ni[lane] = ni;
    __syncwarp();
    int ib = 0; /* items of the lower experts */
    for (int j = 0; j < n; j++)
        ib += s_e[j] < em ? s_ni[j] : 0;
    for (int q = 0; q < ni; q++)
        p.items[ib + q] = make_int2(em, lt + q * tile);
    int total = ni;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        total += __shfl_xor_sync(0xffffffffu, total, o);
    if (lane == 0) *p.n_items = total;
    cu_trace_mark(2);
    for (int e = lane; e <= E; e += 32) {
        int c = 0;
        for (int j = 0; j < n; j++)
            c += s_e[j] < e;
        p.offsets[e] = c;
    }
}

/* Routing and grouping of at most 32 entries (T * k <= 32: decode):
 * warp t routes token t with its logits in registers (cu_moe_route_warp<NP>,
 * E <= 32 NP), then warp 0 builds the plan with entry i in lane i and no
 * atomics: the entry's slot is (entries of lower experts) + (earlier
 * entries of its expert), so an expert's entries keep their slot order;
 * the first entry of an expert writes its work items. The same plan as
 * k_moe_route_group, whose order inside an expert may vary. */
template <int NP>
__global__ void __launch_bounds__(1024)
    k_moe_route_group_warp(const float *__restrict__ logits, int ldl, int T, int E, int k,
                           int renorm, int has_shared, int tile, int32_t *__restrict__ ids,
                           float *__restrict__ wts, float *__restrict__ sg, cu_moe_plan p)
{
    CU_TRACE_KERNEL();
    __shared__ int s_e[32];
    __shared__ float s_w[32];
    cu_pdl_wait();
    cu_pdl_trigger();
    const int t = threadIdx.x >> 5, lane = threadIdx.x & 31, n = T * k;
    {
        int id;
        float w;
        cu_moe_route_token<NP>(logits, ldl, t, E, k, renorm, has_shared, ids, wts, sg, &id, &w);
        if (lane < k) {
            s_e[t * k + lane] = id;
            s_w[t * k + lane] = w;
        }
    }
    cu_trace_mark(0);
    __syncthreads();
    if (t != 0) return;
    plan_warp(s_e, s_w, n, k, E, tile, p);
}

/* One token's routing and plan with the block in parallel (decode at batch
 * 1; LIGHTMOE_CUDA_ROUTE_RANK=0 takes the warp kernel instead): the same
 * choices, weights and plan as k_moe_route_group_warp, bit for bit,
 * without its k dependent arg-max rounds and its serial plan loops. On the
 * H100 (round 20) route + group took 5.6 us a qwen3 layer against 7.1, and
 * a step 1.4-2.5% less (qwen1.5: within noise).
 * - The logits go to shared memory. Each expert's rank is a count of the
 *   experts that precede it in the warp kernel's order of choice: numbers
 *   by value, larger first (-0 equal to +0), the lower id first among
 *   equal values; then NaNs by id. P = blockDim / E32 threads share an
 *   expert's count, their partial counts summed with shuffles.
 * - Warp 0 forms the softmax's maximum and sum exactly as
 *   cu_moe_route_warp does (lane l over l, l + 32, ..., then the same
 *   shuffle trees), so the sums are the same bits; the expert of rank j
 *   goes to lane j, with weight expf(v - max) / sum (v as the warp kernel
 *   decodes it: +0 for -0, -inf for a NaN), renormalised over the same
 *   shuffle tree.
 * - The plan: one token's k experts are distinct, so an entry's slot is the
 *   number of chosen experts of lower id, an expert's one item starts
 *   there, and offsets[e] counts the chosen ids below e: what plan_warp
 *   computes for n = k distinct experts. */
__device__ __forceinline__ bool route_precedes(float vj, int j, float ve, int e)
{
    const bool nj = vj != vj, ne = ve != ve;
    if (nj != ne) return ne; /* numbers before NaNs */
    if (nj) return j < e;
    return vj > ve || (vj == ve && j < e);
}

__global__ void __launch_bounds__(1024)
    k_moe_route_group_rank(const float *__restrict__ logits, int E, int k, int renorm,
                           int has_shared, int32_t *__restrict__ ids, float *__restrict__ wts,
                           float *__restrict__ sg, cu_moe_plan p)
{
    CU_TRACE_KERNEL();
    extern __shared__ float s_l[]; /* [E] */
    __shared__ int s_id[MAX_K];
    __shared__ float s_v[MAX_K];
    cu_pdl_wait();
    cu_pdl_trigger();
    const int tid = threadIdx.x, lane = tid & 31;
    for (int e = tid; e < E; e += blockDim.x)
        s_l[e] = logits[e];
    __syncthreads();
    /* ranks: P threads an expert (P a power of two <= 32, consecutive lanes) */
    const int E32 = (E + 31) & ~31;
    int P = 1;
    while (P < 32 && P * 2 * E32 <= (int)blockDim.x)
        P *= 2;
    for (int e0 = 0; e0 < E32; e0 += blockDim.x / P) {
        const int e = e0 + tid / P, part = tid % P;
        const float ve = e < E ? s_l[e] : 0.f;
        int c = 0;
        if (e < E)
            for (int j = part; j < E; j += P)
                c += route_precedes(s_l[j], j, ve, e);
        for (int o = P / 2; o > 0; o >>= 1)
            c += __shfl_xor_sync(0xffffffffu, c, o, P);
        if (e < E && part == 0 && c < k) {
            s_id[c] = e;
            s_v[c] = ve != ve ? -INFINITY : ve + 0.f;
        }
    }
    cu_trace_mark(0);
    float mx = -INFINITY, sum = 0.f;
    if (tid < 32) { /* cu_moe_route_warp's maximum and sum, the same trees */
        const int nper = (E + 31) / 32;
        for (int i = 0; i < nper; i++) {
            const int e = lane + 32 * i;
            if (e < E) mx = fmaxf(mx, s_l[e]);
        }
        mx = warp_max(mx);
        for (int i = 0; i < nper; i++) {
            const int e = lane + 32 * i;
            if (e < E) sum += expf(s_l[e] - mx);
        }
        sum = warp_sum(sum);
    }
    __syncthreads(); /* s_id, s_v */
    if (tid < 32) {
        const int my_id = lane < k ? s_id[lane] : 0;
        const float my_w = lane < k ? expf(s_v[lane] - mx) / sum : 0.f;
        const float wsum = warp_sum(lane < k ? my_w : 0.f);
        const float w = renorm ? my_w / wsum : my_w;
        if (lane < k) {
            ids[lane] = my_id;
            wts[lane] = w;
            /* the plan: slot = chosen experts of lower id */
            int at = 0;
            for (int j = 0; j < k; j++)
                at += s_id[j] < my_id;
            p.pos[lane] = at;
            p.ent_token[at] = 0;
            p.ent_expert[at] = my_id;
            p.ent_weight[at] = w;
            p.items[at] = make_int2(my_id, at);
        }
        if (lane == 0) {
            *p.n_items = k;
            if (has_shared) sg[0] = 1.f / (1.f + expf(-logits[E]));
        }
    }
    cu_trace_mark(1);
    for (int e = tid; e <= E; e += blockDim.x) {
        int c = 0;
        for (int j = 0; j < k; j++)
            c += s_id[j] < e;
        p.offsets[e] = c;
    }
}

__global__ void __launch_bounds__(1024)
    k_moe_combine(float *__restrict__ resid, int H, int k, const float *__restrict__ y,
                  const int32_t *__restrict__ pos, const float *__restrict__ ew,
                  const float *__restrict__ ys, const float *__restrict__ sg,
                  const float *__restrict__ nw, float eps, __half *__restrict__ xn)
{
    CU_TRACE_KERNEL();
    __shared__ float s_part[32];
    __shared__ int s_pos[MAX_K];
    __shared__ float s_wt[MAX_K];
    cu_pdl_wait();
    cu_pdl_trigger();
    const int t = blockIdx.x;
    /* the token's k entries and weights, once, in shared memory (register
     * arrays of MAX_K made this kernel spill: 23 us for one token) */
    if ((int)threadIdx.x < k) {
        const int p = pos[t * k + threadIdx.x];
        s_pos[threadIdx.x] = p;
        s_wt[threadIdx.x] = ew[p];
    }
    __syncthreads();
    const float g = ys ? sg[t] : 0.f;
    float ss = 0.f;
    float *xr = resid + (size_t)t * H;
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
        float v = 0.f;
#pragma unroll 8
        for (int j = 0; j < k; j++) /* unrolled: the loads are issued together; slot order */
            v += s_wt[j] * y[(size_t)s_pos[j] * H + h];
        if (ys) v += g * ys[(size_t)t * H + h];
        const float x = xr[h] + v;
        xr[h] = x;
        ss += x * x;
    }
    if (!nw) return;
    /* the next layer's input RMSNorm on the row just finished */
    const float inv = rsqrtf(block_sum(ss, s_part) / (float)H + eps);
    for (int h = threadIdx.x; h < H; h += blockDim.x)
        xn[(size_t)t * H + h] = __float2half(nw[h] * (xr[h] * inv));
}

/* One token, after the merge + o_proj launch that left the router's
 * pre-norm dot products in u (cu_attn_merge_o with a cu_route_o): x += o
 * (o then zeroed), the MLP norm's 1/rms of the new x, xn = fp16(nw * x *
 * inv), the logits inv * (sum of u's nc copies) (u then zeroed; also
 * written to logits), then warp 0 routes and plans as
 * k_moe_route_group_warp does (the same code). Block of 256 threads;
 * H <= 8192, H % 4 == 0. */
constexpr int NR_THREADS = 256, NR_XV = 8;
template <int NP>
__global__ void __launch_bounds__(NR_THREADS)
    k_moe_norm_route(float *__restrict__ x, float *__restrict__ o, int H,
                     const float *__restrict__ nw, float eps, float *__restrict__ u, int nc,
                     int rows, float *__restrict__ logits, __half *__restrict__ xn, int E, int k,
                     int renorm, int has_shared, int tile, int32_t *__restrict__ ids,
                     float *__restrict__ wts, float *__restrict__ sg, cu_moe_plan p)
{
    CU_TRACE_KERNEL();
    __shared__ float s_part[32];
    __shared__ float s_l[32 * NP + 1];
    __shared__ int s_e[32];
    __shared__ float s_w[32];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    float4 g[NR_XV];
#pragma unroll
    for (int v = 0; v < NR_XV; v++) { /* weights: before the wait */
        const int i = tid + NR_THREADS * v;
        if (4 * i < H) g[v] = reinterpret_cast<const float4 *>(nw)[i];
    }
    cu_pdl_wait();
    cu_pdl_trigger();
    /* every load of the launch in one round: x and o (a thread's float4s),
     * then each logit row's nc sums (a thread a row), into s_l until the
     * norm's 1/rms is known; the sums' buffer zeroed by their reader */
    float4 xv[NR_XV];
#pragma unroll
    for (int v = 0; v < NR_XV; v++) {
        const int i = tid + NR_THREADS * v;
        if (4 * i < H) {
            const float4 a = reinterpret_cast<const float4 *>(x)[i];
            const float4 b = reinterpret_cast<const float4 *>(o)[i];
            xv[v] = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
        }
    }
    for (int e = tid; e < rows; e += NR_THREADS) {
        float uv[CU_ROUTE_O_MAX_NC];
#pragma unroll
        for (int c = 0; c < CU_ROUTE_O_MAX_NC; c++)
            uv[c] = c < nc ? u[(size_t)c * rows + e] : 0.f;
        float v = 0.f;
#pragma unroll
        for (int c = 0; c < CU_ROUTE_O_MAX_NC; c++)
            if (c < nc) {
                v += uv[c];
                u[(size_t)c * rows + e] = 0.f; /* for the next layer's merge + o_proj */
            }
        s_l[e] = v;
    }
    float ss = 0.f;
#pragma unroll
    for (int v = 0; v < NR_XV; v++) {
        const int i = tid + NR_THREADS * v;
        if (4 * i < H) {
            const float4 c = xv[v];
            reinterpret_cast<float4 *>(x)[i] = c;
            reinterpret_cast<float4 *>(o)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
            ss += c.x * c.x + c.y * c.y + c.z * c.z + c.w * c.w;
        }
    }
    const float inv = rsqrtf(block_sum(ss, s_part) / (float)H + eps);
#pragma unroll
    for (int v = 0; v < NR_XV; v++) {
        const int i = tid + NR_THREADS * v;
        if (4 * i < H) {
            __half2 *d = reinterpret_cast<__half2 *>(xn) + 2 * i;
            d[0] = __floats2half2_rn(g[v].x * (xv[v].x * inv), g[v].y * (xv[v].y * inv));
            d[1] = __floats2half2_rn(g[v].z * (xv[v].z * inv), g[v].w * (xv[v].w * inv));
        }
    }
    if (warp != 0) return; /* block_sum's barriers published s_l */
    for (int e = lane; e < rows; e += 32) {
        const float l = s_l[e] * inv;
        s_l[e] = l;
        logits[e] = l;
    }
    __syncwarp();
    int id;
    float w;
    cu_moe_route_token<NP>(s_l, rows, 0, E, k, renorm, has_shared, ids, wts, sg, &id, &w);
    if (lane < k) {
        s_e[lane] = id;
        s_w[lane] = w;
    }
    cu_trace_mark(0);
    __syncwarp();
    plan_warp(s_e, s_w, k, k, E, tile, p);
}

/* m[r][i] = sum_j (wr[r][j] nw[j]) w16[j][i] (fp32; w16 fp16 [H][K]): block
 * (128 columns, 8 rows), thread = column. Load time only. */
__global__ void __launch_bounds__(128)
    k_route_o_matrix(const __half *__restrict__ w16, int H, int K, const float *__restrict__ wr,
                     const float *__restrict__ nw, int rows, float *__restrict__ m)
{
    const int i = blockIdx.x * 128 + threadIdx.x, r0 = blockIdx.y * 8;
    float acc[8] = {};
    for (int j = 0; j < H; j++) {
        const float w = i < K ? __half2float(w16[(size_t)j * K + i]) : 0.f;
#pragma unroll
        for (int r = 0; r < 8; r++)
            if (r0 + r < rows)
                acc[r] += wr[(size_t)(r0 + r) * H + j] * nw[j] * w;
    }
    if (i < K)
#pragma unroll
        for (int r = 0; r < 8; r++)
            if (r0 + r < rows)
                m[(size_t)(r0 + r) * K + i] = acc[r];
}

/* Router logits for few tokens: one block of 128 threads per expert row,
 * so that the row (H floats) is read in one round of 16-byte loads, every
 * token against it. With nw the MLP input norm is fused: the same pass sums
 * x^2 per token (every block, from L2), the logits are inv[t] * sum_h
 * (w[r][h] nw[h]) x[t][h], and block r writes its slice of the fp16
 * normalised rows xn (the experts' input). */
constexpr int ROUTER_MT = 16;
__global__ void __launch_bounds__(128)
    k_router(const float *__restrict__ x, int T, int H, const float *__restrict__ nw, float eps,
             const float *__restrict__ w, int rows, float *__restrict__ out,
             __half *__restrict__ xn, int early)
{
    CU_TRACE_KERNEL();
    __shared__ float s_red[4][2 * ROUTER_MT];
    __shared__ float s_inv[ROUTER_MT];
    const int r = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int n4 = H / 4;
    float dot[ROUTER_MT], ss[ROUTER_MT];
#pragma unroll
    for (int t = 0; t < ROUTER_MT; t++)
        dot[t] = ss[t] = 0.f;
    const float4 *wr = reinterpret_cast<const float4 *>(w + (size_t)r * H);
    const float4 *nr = reinterpret_cast<const float4 *>(nw);
    /* RU pieces of the row a thread, loaded at once; the first round's
     * before the dependency wait when early (weights: nothing earlier
     * writes them), so that they are in flight while o_proj finishes */
    constexpr int RU = 4;
    float4 wa[RU];
    auto load_w = [&](int i0) {
#pragma unroll
        for (int u = 0; u < RU; u++) {
            const int i = i0 + threadIdx.x + 128 * u;
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
            if (i < n4) {
                a = wr[i];
                if (nw) {
                    const float4 g = nr[i];
                    a.x *= g.x;
                    a.y *= g.y;
                    a.z *= g.z;
                    a.w *= g.w;
                }
            }
            wa[u] = a;
        }
    };
    if (early)
        load_w(0);
    cu_pdl_wait();
    cu_pdl_trigger();
    for (int i0 = 0; i0 < n4; i0 += 128 * RU) {
        if (i0 || !early)
            load_w(i0);
#pragma unroll
        for (int u = 0; u < RU; u++) {
            const int i = i0 + threadIdx.x + 128 * u;
            if (i >= n4)
                break;
            const float4 a = wa[u];
#pragma unroll
            for (int t = 0; t < ROUTER_MT; t++)
                if (t < T) {
                    const float4 b = reinterpret_cast<const float4 *>(x + (size_t)t * H)[i];
                    dot[t] += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
                    ss[t] += b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
                }
        }
    }
    cu_trace_mark(0);
#pragma unroll
    for (int t = 0; t < ROUTER_MT; t++)
        if (t < T) {
            const float d = warp_sum(dot[t]), q = warp_sum(ss[t]);
            if (lane == 0) {
                s_red[warp][2 * t] = d;
                s_red[warp][2 * t + 1] = q;
            }
        }
    __syncthreads();
    if ((int)threadIdx.x < T) {
        const int t = threadIdx.x;
        const float d = s_red[0][2 * t] + s_red[1][2 * t] + s_red[2][2 * t] + s_red[3][2 * t];
        const float q =
            s_red[0][2 * t + 1] + s_red[1][2 * t + 1] + s_red[2][2 * t + 1] + s_red[3][2 * t + 1];
        const float inv = nw ? rsqrtf(q / (float)H + eps) : 1.f;
        s_inv[t] = inv;
        out[(size_t)t * rows + r] = nw ? d * inv : d;
    }
    cu_trace_mark(1);
    if (!nw) return;
    __syncthreads();
    const int chunk = (H + rows - 1) / rows, h0 = r * chunk;
    for (int idx = threadIdx.x; idx < chunk * T; idx += 128) {
        const int t = idx / chunk, h = h0 + idx % chunk;
        if (h < H) xn[(size_t)t * H + h] = __float2half(nw[h] * (x[(size_t)t * H + h] * s_inv[t]));
    }
}

} // namespace

extern "C" int cu_router_norm(const float *x, int T, int H, const float *norm_w, float eps,
                              const float *w, int rows, float *out, __half *xn, cudaStream_t st,
                              lm_err *err)
{
    if (T < 1 || T > ROUTER_MT || H % 4 || rows < 1)
        return lm_err_set(err, -EINVAL,
                          "router: %d tokens (1..%d), hidden %d (multiple of 4), %d rows", T,
                          ROUTER_MT, H, rows);
    if (norm_w && !xn) return lm_err_set(err, -EINVAL, "router: fused norm without an output");
    if (((uintptr_t)x | (uintptr_t)w | (uintptr_t)norm_w) & 15)
        return lm_err_set(err, -EINVAL, "router: inputs not 16-byte aligned");
    CU_LAUNCH(err, "router launch", k_router, rows, 128, 0, st, x, T, H, norm_w, eps, w, rows, out,
              xn, cu_early_loads());
    return 0;
}

extern "C" int cu_router_logits(const float *x, int T, int H, const float *w, int rows, float *out,
                                cudaStream_t st, lm_err *err)
{
    return cu_router_norm(x, T, H, NULL, 0.f, w, rows, out, NULL, st, err);
}

extern "C" int cu_moe_max_items(int n_entries, int n_experts, int tile)
{
    const int active = n_entries < n_experts ? n_entries : n_experts;
    return (n_entries + active * (tile - 1)) / tile;
}

extern "C" int cu_moe_route(const float *logits, int ldl, int T, int E, int k, int renorm,
                            int has_shared, int32_t *ids, float *wts, float *sg, cudaStream_t st,
                            lm_err *err)
{
    if (k < 1 || k > MAX_K || k > E || E > 1024)
        return lm_err_set(err, -EINVAL, "moe route: unsupported experts %d top-k %d", E, k);
    if (T <= 0) return 0;
    CU_LAUNCH(err, "moe route launch", k_moe_route, cuda_div_up(T, 4), 128, 0, st, logits, ldl, T,
              E, k, renorm, has_shared, ids, wts, sg);
    return 0;
}

extern "C" int cu_moe_group(const int32_t *ids, const float *wts, int T, int k, int E, int tile,
                            const cu_moe_plan *plan, cudaStream_t st, lm_err *err)
{
    if (E < 1 || E > 1024 || tile < 1)
        return lm_err_set(err, -EINVAL, "moe group: %d experts (max 1024), tile %d", E, tile);
    if (T <= 0) return 0;
    CU_LAUNCH(err, "moe group launch", k_moe_group, 1, 1024, (2 * E + 2 * 1024) * sizeof(int), st,
              ids, wts, T * k, k, E, tile, *plan);
    return 0;
}

extern "C" int cu_moe_combine_norm(float *resid, int H, int T, int k, const float *y,
                                   const int32_t *pos, const float *ew, const float *ys,
                                   const float *sg, const float *norm_w, float eps, __half *xn,
                                   cudaStream_t st, lm_err *err)
{
    if (T <= 0) return 0;
    /* a whole row per block: 1024 threads for wide rows (T is small at decode) */
    CU_LAUNCH(err, "moe combine launch", k_moe_combine, T, H >= 2048 ? 1024 : 256, 0, st, resid, H,
              k, y, pos, ew, ys, sg, norm_w, eps, xn);
    return 0;
}

extern "C" int cu_moe_combine(float *resid, int H, int T, int k, const float *y, const int32_t *pos,
                              const float *ew, const float *ys, const float *sg, cudaStream_t st,
                              lm_err *err)
{
    return cu_moe_combine_norm(resid, H, T, k, y, pos, ew, ys, sg, NULL, 0.f, NULL, st, err);
}

/* LIGHTMOE_CUDA_ROUTE_WARP=0: decode steps route and group with the
 * block kernel (tests, measurements) */
static int g_route_warp = -1;
static int route_warp(void)
{
    return cu_env_switch(&g_route_warp, "LIGHTMOE_CUDA_ROUTE_WARP");
}
extern "C" int cu_moe_set_route_warp(int on)
{
    return cu_env_switch_set(&g_route_warp, "LIGHTMOE_CUDA_ROUTE_WARP", on);
}

/* LIGHTMOE_CUDA_ROUTE_RANK=0: one-token decode steps route and plan with
 * the warp kernel instead of k_moe_route_group_rank (tests, measurements;
 * the same results bit for bit) */
static int g_route_rank = -1;
static int route_rank(void)
{
    return cu_env_switch(&g_route_rank, "LIGHTMOE_CUDA_ROUTE_RANK");
}
extern "C" int cu_moe_set_route_rank(int on)
{
    return cu_env_switch_set(&g_route_rank, "LIGHTMOE_CUDA_ROUTE_RANK", on);
}

extern "C" int cu_moe_route_group(const float *logits, int ldl, int T, int E, int k, int renorm,
                                  int has_shared, int tile, int32_t *ids, float *wts, float *sg,
                                  const cu_moe_plan *plan, cudaStream_t st, lm_err *err)
{
    if (k < 1 || k > MAX_K || k > E || E > 1024)
        return lm_err_set(err, -EINVAL, "moe route: unsupported experts %d top-k %d", E, k);
    if (T <= 0) return 0;
    if (T == 1 && route_warp() && route_rank()) { /* the block, in parallel */
        int nt = ((E + 31) & ~31) * 8; /* 8 threads an expert, up to 128 experts */
        nt = nt > 1024 ? 1024 : nt;
        CU_LAUNCH(err, "moe route+group launch", k_moe_route_group_rank, 1, nt, E * sizeof(float),
                  st, logits, E, k, renorm, has_shared, ids, wts, sg, *plan);
        return 0;
    }
    if (T * k <= 32 && route_warp()) { /* a warp a token, the plan by warp 0 */
        const int nper = (E + 31) / 32;
        const int np = nper <= 1 ? 1 : nper <= 2 ? 2 : nper <= 4 ? 4 : nper <= 8 ? 8 : nper <= 16 ? 16 : 32;
        void (*kern)(const float *, int, int, int, int, int, int, int, int32_t *, float *, float *,
                     cu_moe_plan) = np == 1   ? k_moe_route_group_warp<1>
                                    : np == 2 ? k_moe_route_group_warp<2>
                                    : np == 4 ? k_moe_route_group_warp<4>
                                    : np == 8 ? k_moe_route_group_warp<8>
                                    : np == 16 ? k_moe_route_group_warp<16>
                                               : k_moe_route_group_warp<32>;
        CU_LAUNCH(err, "moe route+group launch", kern, 1, 32 * T, 0, st, logits, ldl, T, E, k,
                  renorm, has_shared, tile, ids, wts, sg, *plan);
        return 0;
    }
    /* one warp per token and one thread per expert, nothing more: a block of
     * 1024 threads for one token paid its syncs for nothing */
    int nt = 32 * T > E ? 32 * T : (E + 31) / 32 * 32;
    nt = nt < 128 ? 128 : nt > 1024 ? 1024 : nt;
    CU_LAUNCH(err, "moe route+group launch", k_moe_route_group, 1, nt,
              (2 * E + 2 * nt) * sizeof(int), st, logits, ldl, T, E, k, renorm, has_shared, tile,
              ids, wts, sg, *plan);
    return 0;
}

extern "C" int cu_route_o_matrix(const cu_int4_weights *wo, const float *wr, const float *nw,
                                 int rows, float *m, __half *tmp, cudaStream_t st, lm_err *err)
{
    if (rows < 1 || !wr || !nw || !m || !tmp)
        return lm_err_set(err, -EINVAL, "router through o_proj: %d rows, inputs %s", rows,
                          wr && nw && m && tmp ? "given" : "missing");
    int rc = cu_int4_dequant(wo, tmp, st, err);
    if (rc) return rc;
    const dim3 grid((unsigned)cuda_div_up(wo->k, 128), (unsigned)cuda_div_up(rows, 8));
    k_route_o_matrix<<<grid, 128, 0, st>>>(tmp, wo->n, wo->k, wr, nw, rows, m);
    CUDA_LAUNCH_CHECK(err, "router through o_proj: matrix launch");
    return 0;
}

extern "C" int cu_moe_norm_route(float *x, float *o, int H, const float *nw, float eps, float *u,
                                 int nc, int rows, float *logits, __half *xn, int E, int k,
                                 int renorm, int has_shared, int tile, int32_t *ids, float *wts,
                                 float *sg, const cu_moe_plan *plan, cudaStream_t st, lm_err *err)
{
    if (k < 1 || k > MAX_K || k > E || E > 1024 || rows != E + (has_shared ? 1 : 0) || nc < 1 ||
        nc > CU_ROUTE_O_MAX_NC || H < 4 || H % 4 || H > 4 * NR_THREADS * NR_XV || tile < 1)
        return lm_err_set(err, -EINVAL,
                          "moe norm + route: %d experts (max 1024), top-k %d (1..%d), %d logit "
                          "rows, %d copies (1..%d), hidden %d (a multiple of 4, at most %d), "
                          "tile %d", E, k, MAX_K, rows, nc, CU_ROUTE_O_MAX_NC, H,
                          4 * NR_THREADS * NR_XV, tile);
    if (((uintptr_t)x | (uintptr_t)o | (uintptr_t)nw | (uintptr_t)xn) & 15)
        return lm_err_set(err, -EINVAL, "moe norm + route: rows not 16-byte aligned");
    const int nper = (E + 31) / 32;
    const int np = nper <= 1 ? 1 : nper <= 2 ? 2 : nper <= 4 ? 4 : nper <= 8 ? 8 : nper <= 16 ? 16 : 32;
    void (*kern)(float *, float *, int, const float *, float, float *, int, int, float *,
                 __half *, int, int, int, int, int, int32_t *, float *, float *, cu_moe_plan) =
        np == 1    ? k_moe_norm_route<1>
        : np == 2  ? k_moe_norm_route<2>
        : np == 4  ? k_moe_norm_route<4>
        : np == 8  ? k_moe_norm_route<8>
        : np == 16 ? k_moe_norm_route<16>
                   : k_moe_norm_route<32>;
    CU_LAUNCH(err, "moe norm + route launch", kern, 1, NR_THREADS, 0, st, x, o, H, nw, eps, u, nc,
              rows, logits, xn, E, k, renorm, has_shared, tile, ids, wts, sg, *plan);
    return 0;
}
