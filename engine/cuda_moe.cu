/*
 * cuda_moe.cu: routing, grouping by expert and combining (see
 * cuda_moe.cuh). Routing is one warp per token; grouping is one block of
 * 1024 threads (counts with shared atomics, a scan, scatter); combining is
 * one block per token.
 */
#include "engine/cuda_common.cuh"
#include "engine/cuda_moe.cuh"

namespace {

constexpr int MAX_K = 32;

/* Route token t (one warp): softmax over E, top-k by arg-max rounds (ties:
 * lowest id), optional renormalisation, shared-gate sigmoid. */
__device__ void route_token(const float *__restrict__ logits, int ldl, int t, int E, int k,
                            int renorm, int has_shared, int32_t *__restrict__ ids,
                            float *__restrict__ wts, float *__restrict__ sg)
{
    const int lane = threadIdx.x & 31;
    const float *l = logits + (size_t)t * ldl;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32)
        mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32)
        sum += expf(l[e] - mx);
    sum = warp_sum(sum);
    int taken[MAX_K];
    float tw[MAX_K];
    float wsum = 0.f;
    for (int j = 0; j < k; j++) {
        float best = -INFINITY;
        int bid = 0x7fffffff;
        for (int e = lane; e < E; e += 32) {
            bool used = false;
            for (int q = 0; q < j; q++)
                used |= taken[q] == e;
            const float v = l[e];
            if (!used && (v > best || (v == best && e < bid))) {
                best = v;
                bid = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bid, o);
            if (ob > best || (ob == best && oi < bid)) {
                best = ob;
                bid = oi;
            }
        }
        if (bid >= E) /* only NaN logits left: any unused expert keeps indices valid */
            for (bid = 0; bid < E; bid++) {
                bool used = false;
                for (int q = 0; q < j; q++)
                    used |= taken[q] == bid;
                if (!used)
                    break;
            }
        taken[j] = bid;
        tw[j] = expf(best - mx) / sum;
        wsum += tw[j];
    }
    if (lane == 0) {
        for (int j = 0; j < k; j++) {
            ids[t * k + j] = taken[j];
            wts[t * k + j] = renorm ? tw[j] / wsum : tw[j];
        }
        if (has_shared)
            sg[t] = 1.f / (1.f + expf(-l[E]));
    }
}

__global__ void k_moe_route(const float *__restrict__ logits, int ldl, int T, int E, int k,
                            int renorm, int has_shared, int32_t *__restrict__ ids,
                            float *__restrict__ wts, float *__restrict__ sg)
{
    const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (t < T)
        route_token(logits, ldl, t, E, k, renorm, has_shared, ids, wts, sg);
}

/* counts -> offsets and items (thread 0; E and the item count are small)
 * -> scatter of the entries. Called by a whole block. */
__device__ void group_entries(const int32_t *__restrict__ ids, const float *__restrict__ wts,
                              int n, int k, int E, int tile, const cu_moe_plan &p, int *s_mem)
{
    /* s_mem: cnt[E], base[E], then two scan arrays of blockDim ints */
    int *cnt = s_mem, *base = s_mem + E, *sa = s_mem + 2 * E, *sb = sa + blockDim.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        cnt[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        atomicAdd(&cnt[ids[i]], 1);
    __syncthreads();
    /* inclusive scans (Hillis-Steele) of the counts and of the tiles per expert;
     * E <= blockDim (checked by the launcher) */
    const int e = threadIdx.x;
    const int c = e < E ? cnt[e] : 0;
    const int ni = (c + tile - 1) / tile;
    sa[e] = c;
    sb[e] = ni;
    __syncthreads();
    for (int d = 1; d < (int)blockDim.x; d *= 2) {
        const int va = e >= d ? sa[e - d] : 0, vb = e >= d ? sb[e - d] : 0;
        __syncthreads();
        sa[e] += va;
        sb[e] += vb;
        __syncthreads();
    }
    if (e < E) {
        const int off = sa[e] - c, it = sb[e] - ni;
        p.offsets[e] = off;
        base[e] = off;
        for (int q = 0; q < ni; q++)
            p.items[it + q] = make_int2(e, off + q * tile);
        if (e == E - 1) {
            p.offsets[E] = sa[e];
            *p.n_items = sb[e];
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
    k_moe_group(const int32_t *__restrict__ ids, const float *__restrict__ wts, int n, int k,
                int E, int tile, cu_moe_plan p)
{
    extern __shared__ int s_mem[];
    group_entries(ids, wts, n, k, E, tile, p, s_mem);
}

/* Routing of T tokens (warp per token) then grouping, in one block: one
 * launch instead of two for decode-sized batches. */
__global__ void __launch_bounds__(1024)
    k_moe_route_group(const float *__restrict__ logits, int ldl, int T, int E, int k, int renorm,
                      int has_shared, int tile, int32_t *ids, float *wts, float *sg,
                      cu_moe_plan p)
{
    extern __shared__ int s_mem[];
    for (int t = threadIdx.x / 32; t < T; t += blockDim.x / 32)
        route_token(logits, ldl, t, E, k, renorm, has_shared, ids, wts, sg);
    __syncthreads(); /* the block's global writes are visible to the block after this */
    group_entries(ids, wts, T * k, k, E, tile, p, s_mem);
}

__global__ void __launch_bounds__(256) k_moe_combine(float *__restrict__ resid, int H, int k, const float *__restrict__ y,
                              const int32_t *__restrict__ pos, const float *__restrict__ ew,
                              const float *__restrict__ ys, const float *__restrict__ sg,
                              const float *__restrict__ nw, float eps, __half *__restrict__ xn)
{
    __shared__ float s_part[32];
    const int t = blockIdx.x;
    int pj[MAX_K];
    float wj[MAX_K];
#pragma unroll
    for (int j = 0; j < MAX_K; j++)
        if (j < k) {
            pj[j] = pos[t * k + j];
            wj[j] = ew[pj[j]];
        }
    const float g = ys ? sg[t] : 0.f;
    float ss = 0.f;
    float *xr = resid + (size_t)t * H;
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
        float v = 0.f;
#pragma unroll
        for (int j = 0; j < MAX_K; j++) /* unrolled: the k loads are issued together */
            if (j < k)
                v += wj[j] * y[(size_t)pj[j] * H + h];
        if (ys)
            v += g * ys[(size_t)t * H + h];
        const float x = xr[h] + v;
        xr[h] = x;
        ss += x * x;
    }
    if (!nw)
        return;
    /* the next layer's input RMSNorm on the row just finished */
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0)
        s_part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? s_part[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0)
            s_part[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(s_part[0] / (float)H + eps);
    for (int h = threadIdx.x; h < H; h += blockDim.x)
        xn[(size_t)t * H + h] = __float2half(nw[h] * (xr[h] * inv));
}

/* Router logits for few tokens: one warp per expert row (fp32 weights read
 * once with 16-byte loads), every token against it. */
__global__ void k_router(const float *__restrict__ x, int T, int H, const float *__restrict__ w,
                         int rows, float *__restrict__ out)
{
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (r >= rows)
        return;
    float acc[16];
#pragma unroll
    for (int t = 0; t < 16; t++)
        acc[t] = 0.f;
    const float4 *wr = reinterpret_cast<const float4 *>(w + (size_t)r * H);
    for (int i = lane; i < H / 4; i += 32) {
        const float4 a = wr[i];
#pragma unroll
        for (int t = 0; t < 16; t++)
            if (t < T) {
                const float4 b = reinterpret_cast<const float4 *>(x + (size_t)t * H)[i];
                acc[t] += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
            }
    }
#pragma unroll
    for (int t = 0; t < 16; t++)
        if (t < T) {
            const float v = warp_sum(acc[t]);
            if (lane == 0)
                out[(size_t)t * rows + r] = v;
        }
}

} // namespace

extern "C" int cu_router_logits(const float *x, int T, int H, const float *w, int rows, float *out,
                                cudaStream_t st, lm_err *err)
{
    if (T < 1 || T > 16 || H % 4)
        return lm_err_set(err, -EINVAL, "router: %d tokens (1..16), hidden %d (multiple of 4)", T, H);
    k_router<<<cuda_div_up(rows, 4), 128, 0, st>>>(x, T, H, w, rows, out);
    CUDA_LAUNCH_CHECK(err, "router launch");
    return 0;
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
    if (T <= 0)
        return 0;
    k_moe_route<<<cuda_div_up(T, 4), 128, 0, st>>>(logits, ldl, T, E, k, renorm, has_shared, ids,
                                                    wts, sg);
    CUDA_LAUNCH_CHECK(err, "moe route launch");
    return 0;
}

extern "C" int cu_moe_group(const int32_t *ids, const float *wts, int T, int k, int E, int tile,
                            const cu_moe_plan *plan, cudaStream_t st, lm_err *err)
{
    if (E < 1 || E > 1024 || tile < 1)
        return lm_err_set(err, -EINVAL, "moe group: %d experts (max 1024), tile %d", E, tile);
    if (T <= 0)
        return 0;
    k_moe_group<<<1, 1024, (2 * E + 2 * 1024) * sizeof(int), st>>>(ids, wts, T * k, k, E, tile, *plan);
    CUDA_LAUNCH_CHECK(err, "moe group launch");
    return 0;
}

extern "C" int cu_moe_combine_norm(float *resid, int H, int T, int k, const float *y,
                                   const int32_t *pos, const float *ew, const float *ys,
                                   const float *sg, const float *norm_w, float eps, __half *xn,
                                   cudaStream_t st, lm_err *err)
{
    if (T <= 0)
        return 0;
    k_moe_combine<<<T, 256, 0, st>>>(resid, H, k, y, pos, ew, ys, sg, norm_w, eps, xn);
    CUDA_LAUNCH_CHECK(err, "moe combine launch");
    return 0;
}

extern "C" int cu_moe_combine(float *resid, int H, int T, int k, const float *y,
                              const int32_t *pos, const float *ew, const float *ys,
                              const float *sg, cudaStream_t st, lm_err *err)
{
    return cu_moe_combine_norm(resid, H, T, k, y, pos, ew, ys, sg, NULL, 0.f, NULL, st, err);
}

extern "C" int cu_moe_route_group(const float *logits, int ldl, int T, int E, int k, int renorm,
                                  int has_shared, int tile, int32_t *ids, float *wts, float *sg,
                                  const cu_moe_plan *plan, cudaStream_t st, lm_err *err)
{
    if (k < 1 || k > MAX_K || k > E || E > 1024)
        return lm_err_set(err, -EINVAL, "moe route: unsupported experts %d top-k %d", E, k);
    if (T <= 0)
        return 0;
    k_moe_route_group<<<1, 1024, (2 * E + 2 * 1024) * sizeof(int), st>>>(logits, ldl, T, E, k, renorm,
                                                             has_shared, tile, ids, wts, sg, *plan);
    CUDA_LAUNCH_CHECK(err, "moe route+group launch");
    return 0;
}
