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

__global__ void k_moe_route(const float *__restrict__ logits, int ldl, int T, int E, int k,
                            int renorm, int has_shared, int32_t *__restrict__ ids,
                            float *__restrict__ wts, float *__restrict__ sg)
{
    const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (t >= T)
        return;
    const float *l = logits + (size_t)t * ldl;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32)
        mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32)
        sum += expf(l[e] - mx);
    sum = warp_sum(sum);
    /* k rounds of arg-max over the logits not yet taken (ties: lowest id) */
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

/* counts -> offsets and items (thread 0; E and the item count are small)
 * -> scatter of the entries. */
__global__ void __launch_bounds__(1024)
    k_moe_group(const int32_t *__restrict__ ids, const float *__restrict__ wts, int n, int k,
                 int E, int tile, cu_moe_plan p)
{
    extern __shared__ int s_mem[];
    int *cnt = s_mem, *base = s_mem + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        cnt[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        atomicAdd(&cnt[ids[i]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int off = 0, items = 0;
        for (int e = 0; e < E; e++) {
            p.offsets[e] = off;
            base[e] = off;
            for (int s = 0; s < cnt[e]; s += tile)
                p.items[items++] = make_int2(e, off + s);
            off += cnt[e];
        }
        p.offsets[E] = off;
        *p.n_items = items;
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

__global__ void k_moe_combine(float *__restrict__ resid, int H, int k, const float *__restrict__ y,
                              const int32_t *__restrict__ pos, const float *__restrict__ ew,
                              const float *__restrict__ ys, const float *__restrict__ sg)
{
    const int t = blockIdx.x;
    int pj[MAX_K];
    float wj[MAX_K];
    for (int j = 0; j < k; j++) {
        pj[j] = pos[t * k + j];
        wj[j] = ew[pj[j]];
    }
    const float g = ys ? sg[t] : 0.f;
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
        float v = 0.f;
        for (int j = 0; j < k; j++)
            v += wj[j] * y[(size_t)pj[j] * H + h];
        if (ys)
            v += g * ys[(size_t)t * H + h];
        resid[(size_t)t * H + h] += v;
    }
}

} // namespace

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
    if (T <= 0)
        return 0;
    k_moe_group<<<1, 1024, 2 * E * sizeof(int), st>>>(ids, wts, T * k, k, E, tile, *plan);
    CUDA_LAUNCH_CHECK(err, "moe group launch");
    return 0;
}

extern "C" int cu_moe_combine(float *resid, int H, int T, int k, const float *y,
                              const int32_t *pos, const float *ew, const float *ys,
                              const float *sg, cudaStream_t st, lm_err *err)
{
    if (T <= 0)
        return 0;
    k_moe_combine<<<T, 256, 0, st>>>(resid, H, k, y, pos, ew, ys, sg);
    CUDA_LAUNCH_CHECK(err, "moe combine launch");
    return 0;
}
