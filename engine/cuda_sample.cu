/*
 * cuda_sample.cu: the GPU's twin of sample_pick (see cuda_sample.cuh and
 * engine/sample.h for the rule). Every float operation that decides a set
 * or a token is written as an _rn intrinsic, so that nvcc cannot contract
 * it into a fused multiply-add that the CPU (-ffp-contract=off) does not
 * make.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>

#include "engine/cuda_common.cuh"
#include "engine/cuda_sample.cuh"

namespace {

typedef unsigned long long u64;

constexpr int SN = 512;      /* threads a block */
constexpr int SW = SN / 32;  /* warps */
constexpr int NH = SW / 2;   /* histogram copies: one per pair of warps */
constexpr int SU = 8;        /* loads in flight a thread in a pass */
constexpr int MAXTOP = 32;   /* >= SAMPLE_MAX_LOGPROBS */

struct smem_t {
    unsigned cnt[NH][256];
    u64 mass[NH][256];
    double dred[SW];
    u64 ured[SW];
    float fred[SW];
    int ired[SW];
    u64 bu[2];
    int bi[2];
    int top_n;
    int top_id[MAXTOP];
    float top_l[MAXTOP];
};

/* sample.c's exp_le0, operation by operation */
__device__ __forceinline__ float s_exp_le0(float x)
{
    const float xc = x < -87.0f ? -87.0f : x;
    const float fi = floorf(__fadd_rn(__fmul_rn(xc, 1.44269504088896341f), 0.5f));
    const float r = __fadd_rn(__fsub_rn(xc, __fmul_rn(fi, 0.693359375f)), __fmul_rn(fi, 2.12194440e-4f));
    float q = 1.9875691500e-4f;
    q = __fadd_rn(__fmul_rn(q, r), 1.3981999507e-3f);
    q = __fadd_rn(__fmul_rn(q, r), 8.3334519073e-3f);
    q = __fadd_rn(__fmul_rn(q, r), 4.1665795894e-2f);
    q = __fadd_rn(__fmul_rn(q, r), 1.6666665459e-1f);
    q = __fadd_rn(__fmul_rn(q, r), 5.0000001201e-1f);
    const float y = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(q, r), r), r), 1.0f);
    const float sc = __int_as_float(((int)fi + 127) << 23);
    return x < -87.0f ? 0.0f : __fmul_rn(y, sc);
}

/* a token's draw weight trunc(e * 2^S) (exact: a power of two) */
__device__ __forceinline__ u64 s_weight(float e, double scale)
{
    return __double2ull_rz(__dmul_rn((double)e, scale));
}

/* (draw >> 11) * m / 2^53 */
__device__ __forceinline__ u64 s_draw_point(u64 draw, u64 m)
{
    const u64 a = draw >> 11;
    return (__umul64hi(a, m) << 11) | ((a * m) >> 53);
}

/* float -> unsigned key in the order of the values (-0 as +0; no NaN) */
__device__ __forceinline__ unsigned s_order_key(float x)
{
    const unsigned u = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <class T> __device__ __forceinline__ T s_warp_sum(T v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* A block sum in a fixed order (deterministic), through buf[SW] of shared
 * memory; ends with a barrier. */
template <class T> __device__ T s_block_sum(T v, T *buf)
{
    v = s_warp_sum(v);
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
    __syncthreads();
    T r = 0;
    for (int w = 0; w < SW; w++)
        r += buf[w];
    __syncthreads();
    return r;
}

/* the largest value and the lowest index holding it; the lowest bad index */
__device__ void s_block_max(float &mx, int &arg, int &bad, smem_t &s)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, mx, o);
        const int a2 = __shfl_xor_sync(0xffffffffu, arg, o);
        const int b2 = __shfl_xor_sync(0xffffffffu, bad, o);
        if (m2 > mx || (m2 == mx && a2 < arg)) {
            mx = m2;
            arg = a2;
        }
        bad = min(bad, b2);
    }
    const int w = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
        s.fred[w] = mx;
        s.ired[w] = arg;
    }
    __syncthreads();
    mx = s.fred[0];
    arg = s.ired[0];
    for (int i = 1; i < SW; i++)
        if (s.fred[i] > mx || (s.fred[i] == mx && s.ired[i] < arg)) {
            mx = s.fred[i];
            arg = s.ired[i];
        }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s.ired[w] = bad;
    __syncthreads();
    for (int i = 0; i < SW; i++)
        bad = min(bad, s.ired[i]);
    __syncthreads();
}

/* quad q of a row: ids 4q .. 4q + 3 (16-byte loads when VEC: V % 4 == 0 and
 * the row 16-byte aligned; else the ids past V read as 0, never used) */
template <bool VEC> __device__ __forceinline__ float4 s_quad(const float *p, int q, int V)
{
    if (VEC)
        return __ldcg(reinterpret_cast<const float4 *>(p) + q);
    const int t = 4 * q;
    return make_float4(t < V ? __ldcg(p + t) : 0.0f, t + 1 < V ? __ldcg(p + t + 1) : 0.0f,
                       t + 2 < V ? __ldcg(p + t + 2) : 0.0f, t + 3 < V ? __ldcg(p + t + 3) : 0.0f);
}

__device__ __forceinline__ float s_at(const float4 &v, int i)
{
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

/*
 * Every t of [0, V) with its value p[t]: f(t, value); SU quads in flight a
 * thread, consecutive threads on consecutive quads.
 */
template <bool VEC, class F> __device__ __forceinline__ void s_pass(const float *p, int V, F f)
{
    const int NQ = (V + 3) / 4;
    for (int base = 0; base < NQ; base += SN * SU) {
        float4 v[SU];
#pragma unroll
        for (int u = 0; u < SU; u++) {
            const int q = base + u * SN + (int)threadIdx.x;
            v[u] = q < NQ ? s_quad<VEC>(p, q, V) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < SU; u++) {
            const int q = base + u * SN + (int)threadIdx.x;
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (q < NQ && 4 * q + i < V) f(4 * q + i, s_at(v[u], i));
        }
    }
}

/*
 * The first t in id order whose running weight exceeds u (u below the
 * total weight; -1 otherwise): each warp sums a contiguous range of quads,
 * the warp whose range holds the crossing walks it 32 * SU quads a round
 * (a scan of the lanes' quad sums). w(t, p[t]).
 */
template <bool VEC, class W> __device__ int s_find_first(const float *p, int V, u64 u, W w, smem_t &s)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int NQ = (V + 3) / 4, RQ = (NQ + SW - 1) / SW, lo = warp * RQ, hi = min(NQ, lo + RQ);
    auto quad_w = [&](int q, const float4 &v, u64 wi[4]) {
        u64 t4 = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            wi[i] = q < hi && 4 * q + i < V ? w(4 * q + i, s_at(v, i)) : 0;
            t4 += wi[i];
        }
        return t4;
    };
    u64 sum = 0;
    for (int b = lo; b < hi; b += 32 * SU) {
        float4 v[SU];
#pragma unroll
        for (int k = 0; k < SU; k++) {
            const int q = b + k * 32 + lane;
            v[k] = q < hi ? s_quad<VEC>(p, q, V) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int k = 0; k < SU; k++) {
            u64 wi[4];
            sum += quad_w(b + k * 32 + lane, v[k], wi);
        }
    }
    sum = s_warp_sum(sum);
    if (lane == 0) s.ured[warp] = sum;
    if (threadIdx.x == 0) s.bi[1] = -1;
    __syncthreads();
    u64 carry = 0;
    for (int i = 0; i < warp; i++)
        carry += s.ured[i];
    if (carry <= u && u < carry + s.ured[warp]) { /* exactly one warp */
        bool found = false;
        for (int b = lo; b < hi && !found; b += 32 * SU) {
            float4 v[SU];
#pragma unroll
            for (int k = 0; k < SU; k++) {
                const int q = b + k * 32 + lane;
                v[k] = q < hi ? s_quad<VEC>(p, q, V) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int k = 0; k < SU; k++) {
                if (found) break; /* uniform */
                const int q = b + k * 32 + lane;
                u64 wi[4];
                const u64 mine = quad_w(q, v[k], wi);
                u64 x = mine;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const u64 y = __shfl_up_sync(0xffffffffu, x, o);
                    if (lane >= o) x += y;
                }
                const unsigned hit = __ballot_sync(0xffffffffu, carry + x > u);
                if (hit) {
                    if (lane == __ffs(hit) - 1) {
                        u64 c = carry + x - mine;
                        int i = 0;
                        for (; i < 3; i++)
                            if ((c += wi[i]) > u) break;
                        s.bi[1] = 4 * q + i;
                    }
                    found = true;
                } else {
                    carry += __shfl_sync(0xffffffffu, x, 31);
                }
            }
        }
    }
    __syncthreads();
    const int r = s.bi[1];
    __syncthreads();
    return r;
}

/*
 * Radix select, descending, over the t with in(t, p[t]): the key
 * key(p[t]) of the boundary element, where the count (MASS false) or the
 * weight wt(p[t]) (MASS true) of the elements with a larger key plus the
 * boundary's bin first reaches `need` (<= the total). Returns the key,
 * and the count and weight of the elements strictly above it (both, in
 * either mode: top_k's weight is what top_p cuts from).
 */
template <bool VEC, bool MASS, class In, class Key, class Wt>
__device__ unsigned s_select(const float *p, int V, u64 need, In in, Key key, Wt wt, u64 &above_c,
                             u64 &above_m, smem_t &s)
{
    unsigned prefix = 0, pmask = 0;
    u64 ac = 0, am = 0;
    const int h = (threadIdx.x >> 6) % NH;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < NH * 256; i += SN) {
            (&s.cnt[0][0])[i] = 0;
            (&s.mass[0][0])[i] = 0;
        }
        __syncthreads();
        s_pass<VEC>(p, V, [&](int t, float x) {
            const unsigned k = key(x);
            if ((k & pmask) != prefix || !in(t, x)) return;
            const unsigned b = (k >> shift) & 255u;
            atomicAdd(&s.cnt[h][b], 1u);
            atomicAdd(&s.mass[h][b], wt(x)); /* above_m is used after count selects too */
        });
        __syncthreads();
        if (threadIdx.x < 256) {
            unsigned c = 0;
            u64 m = 0;
            for (int i = 0; i < NH; i++) {
                c += s.cnt[i][threadIdx.x];
                m += s.mass[i][threadIdx.x];
            }
            s.cnt[0][threadIdx.x] = c;
            s.mass[0][threadIdx.x] = m;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int b = 255;
            for (; b > 0; b--) {
                const u64 c = s.cnt[0][b], m = s.mass[0][b];
                if (MASS ? am + m >= need : ac + c >= need) break;
                ac += c;
                am += m;
            }
            s.bu[0] = ac;
            s.bu[1] = am;
            s.bi[0] = b;
        }
        __syncthreads();
        ac = s.bu[0];
        am = s.bu[1];
        prefix |= (unsigned)s.bi[0] << shift;
        pmask |= 0xffu << shift;
        __syncthreads();
    }
    above_c = ac;
    above_m = am;
    return prefix;
}

__device__ __forceinline__ unsigned s_ekey(float e)
{
    return __float_as_uint(e); /* e >= +0: the bits are in order */
}

/* in the best-first prefix ending at (value v, id b) */
__device__ __forceinline__ bool s_before(float e, int t, float v, int b)
{
    return e > v || (e == v && t <= b);
}

template <bool VEC>
__global__ void __launch_bounds__(SN)
    k_sample(float *logits, int ldl, int V, int n, const cu_pick *__restrict__ picks,
             const sample_penalty *__restrict__ pen, float *e_all, double scale,
             backend_pick_out *out)
{
    __shared__ smem_t s;
    const int tid = threadIdx.x;
    float *e = e_all + (size_t)blockIdx.x * V;
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        float *l = logits + (size_t)row * ldl;
        const cu_pick pk = picks[row];
        backend_pick_out *o = out + row;
        /* the penalties: each listed id once (sample_apply_penalties) */
        const bool rep = pk.rep != 1.0f, pres = pk.pres != 0.0f || pk.freq != 0.0f;
        for (int i = tid; i < pk.n_pen; i += SN) {
            const sample_penalty q = pen[pk.pen_begin + i];
            float x = l[q.id];
            if (rep) x = x > 0.0f ? __fdiv_rn(x, pk.rep) : __fmul_rn(x, pk.rep);
            if (pres && q.count > 0)
                x = __fsub_rn(x, __fadd_rn(__fmul_rn(pk.freq, (float)q.count), pk.pres));
            l[q.id] = x;
        }
        __syncthreads();
        /* the maximum, its first index, the first NaN / +inf */
        float mx = -INFINITY;
        int arg = INT_MAX, bad = INT_MAX;
        s_pass<VEC>(l, V, [&](int t, float x) {
            if (x != x || x == INFINITY) bad = min(bad, t);
            if (x > mx) { /* t ascends in a thread: its first maximum */
                mx = x;
                arg = t;
            }
        });
        s_block_max(mx, arg, bad, s);
        if (bad != INT_MAX || mx == -INFINITY) { /* uniform */
            if (tid == 0) {
                backend_pick_out r = {};
                r.status = -EINVAL;
                r.r.token = -1;
                r.bad_token = bad != INT_MAX ? bad : -1;
                r.bad_value = bad != INT_MAX ? l[bad] : -INFINITY;
                *o = r;
            }
            __syncthreads();
            continue;
        }
        /* the temperature (in place, as sample_pick: the maximum scaled is
         * logits[arg] scaled), e, the log-sum-exp's sum, the total weight */
        const bool hot = pk.temperature > 0.0f, tempered = hot && pk.temperature != 1.0f;
        const float inv = pk.inv_t;
        if (tempered) {
            mx = __fmul_rn(mx, inv);
            if (mx == INFINITY) { /* a logit near FLT_MAX (sample_pick_drawn's error); uniform */
                for (int t = tid; t < V; t += SN)
                    l[t] = __fmul_rn(l[t], inv);
                if (tid == 0) {
                    backend_pick_out r = {};
                    r.status = -EINVAL;
                    r.r.token = -1;
                    r.bad_token = arg;
                    r.bad_value = mx;
                    *o = r;
                }
                __syncthreads();
                continue;
            }
        }
        double sum = 0.0;
        u64 tot = 0, c0 = 0;
        s_pass<VEC>(l, V, [&](int t, float x) {
            if (tempered) {
                x = __fmul_rn(x, inv);
                l[t] = x;
            }
            const float ev = s_exp_le0(__fsub_rn(x, mx));
            e[t] = ev;
            sum += (double)ev;
            const u64 w = s_weight(ev, scale);
            tot += w;
            c0 += w > 0;
        });
        sum = s_block_sum(sum, s.dred); /* its barriers publish e */
        tot = s_block_sum(tot, s.ured);
        c0 = s_block_sum(c0, s.ured);
        const double lse = (double)mx + log(sum);
        auto wt = [&](float x) { return s_weight(x, scale); };
        auto ekey = [](float x) { return s_ekey(x); };
        auto okey = [](float x) { return s_order_key(x); };
        int tok = arg;
        if (hot) {
            const bool filtering = pk.top_k > 0 || pk.top_p < 1.0f || pk.min_p > 0.0f;
            if (!filtering) {
                tok = s_find_first<VEC>(e, V, s_draw_point(pk.draw, tot),
                                   [&](int, float x) { return wt(x); }, s);
            } else {
                auto pos = [&](int, float x) { return wt(x) > 0; };
                /* top_k: (v1, b1) ends the first top_k */
                bool has1 = false, has2 = false;
                float v1 = 0.0f, v2 = 0.0f;
                int b1 = 0, b2 = 0;
                u64 m1 = tot, ac, am;
                if (pk.top_k > 0 && (u64)pk.top_k < c0) {
                    const unsigned k1 = s_select<VEC, false>(e, V, (u64)pk.top_k, pos, ekey, wt, ac, am, s);
                    v1 = __uint_as_float(k1);
                    const u64 j = (u64)pk.top_k - ac;
                    b1 = s_find_first<VEC>(e, V, j - 1,
                                      [&](int, float x) { return (u64)(x == v1 && wt(x) > 0); }, s);
                    m1 = am + j * wt(v1);
                    has1 = true;
                }
                auto in1 = [&](int t, float x) {
                    return wt(x) > 0 && (!has1 || s_before(x, t, v1, b1));
                };
                if (pk.top_p < 1.0f) {
                    u64 target = __double2ull_rz(__dmul_rn((double)pk.top_p, __ull2double_rn(m1)));
                    if (target < 1) target = 1;
                    const unsigned k2 = s_select<VEC, true>(e, V, target, in1, ekey, wt, ac, am, s);
                    v2 = __uint_as_float(k2);
                    const u64 f = wt(v2), j = (target - am + f - 1) / f;
                    b2 = s_find_first<VEC>(e, V, j - 1,
                                      [&](int t, float x) { return (u64)(x == v2 && in1(t, x)); }, s);
                    has2 = true;
                }
                const float min_p = pk.min_p;
                auto kept = [&](int t, float x) -> u64 {
                    return in1(t, x) && (!has2 || s_before(x, t, v2, b2)) &&
                                   (!(min_p > 0.0f) || x >= min_p)
                               ? wt(x)
                               : 0;
                };
                u64 m3 = 0;
                s_pass<VEC>(e, V, [&](int t, float x) { m3 += kept(t, x); });
                m3 = s_block_sum(m3, s.ured);
                tok = s_find_first<VEC>(e, V, s_draw_point(pk.draw, m3), kept, s);
            }
        }
        if (tok < 0) /* not reached (u is below the total; tested against the CPU): no stray read */
            tok = arg;
        /* the top logprobs: the first n of (logit descending, id ascending) */
        const int ntop = min(pk.logprobs, V);
        if (tid == 0) s.top_n = 0;
        __syncthreads();
        if (ntop > 0) {
            u64 ac, am;
            auto all = [](int, float) { return true; };
            auto none = [](float) { return (u64)0; };
            const unsigned kb = s_select<VEC, false>(l, V, (u64)ntop, all, okey, none, ac, am, s);
            const u64 j = (u64)ntop - ac;
            const int bb = s_find_first<VEC>(l, V, j - 1,
                                        [&](int, float x) { return (u64)(s_order_key(x) == kb); }, s);
            s_pass<VEC>(l, V, [&](int t, float x) {
                const unsigned k = s_order_key(x);
                if (k > kb || (k == kb && t <= bb)) {
                    const int i = atomicAdd(&s.top_n, 1);
                    if (i < MAXTOP) {
                        s.top_id[i] = t;
                        s.top_l[i] = x;
                    }
                }
            });
            __syncthreads();
        }
        if (tid == 0) {
            backend_pick_out r = {};
            const int nt = min(s.top_n, ntop);
            for (int i = 1; i < nt; i++) { /* insertion: logit descending, id ascending */
                const int id = s.top_id[i];
                const float x = s.top_l[i];
                int k = i;
                while (k > 0 && (s.top_l[k - 1] < x || (s.top_l[k - 1] == x && s.top_id[k - 1] > id))) {
                    s.top_id[k] = s.top_id[k - 1];
                    s.top_l[k] = s.top_l[k - 1];
                    k--;
                }
                s.top_id[k] = id;
                s.top_l[k] = x;
            }
            r.r.token = tok;
            r.r.logprob = (float)((double)l[tok] - lse);
            r.r.n_top = nt;
            for (int i = 0; i < nt; i++) {
                r.r.top_ids[i] = s.top_id[i];
                r.r.top_logprobs[i] = (float)((double)s.top_l[i] - lse);
            }
            *o = r;
        }
        __syncthreads();
    }
}

} // namespace

extern "C" void cu_pick_from(const backend_pick *bp, cu_pick *out)
{
    const sample_params *p = bp->p;
    const bool hot = sample_draws(p); /* else greedy, as sample_pick_drawn */
    out->temperature = hot ? p->temperature : 0.0f;
    out->inv_t = hot ? 1.0f / p->temperature : 0.0f;
    out->top_p = p->top_p;
    out->min_p = p->min_p;
    out->rep = p->repetition_penalty;
    out->pres = p->presence_penalty;
    out->freq = p->frequency_penalty;
    out->top_k = p->top_k;
    out->logprobs = p->logprobs;
    out->pen_begin = bp->pen_begin;
    out->n_pen = bp->n_pen;
    out->draw = bp->draw;
}

extern "C" int cu_sample(float *logits, int ldl, int V, int n, const cu_pick *picks,
                         const sample_penalty *pen, float *e, backend_pick_out *out,
                         cudaStream_t st, lm_err *err)
{
    if (n <= 0)
        return 0;
    if (V <= 0 || ldl < V || !logits || !picks || !e || !out)
        return lm_err_set(err, -EINVAL, "cu_sample: bad rows (V %d, stride %d, %d rows)", V, ldl, n);
    const double scale = ldexp(1.0, sample_fixed_shift(V));
    const int blocks = n < CU_SAMPLE_BLOCKS ? n : CU_SAMPLE_BLOCKS;
    const bool vec = V % 4 == 0 && ldl % 4 == 0 && ((uintptr_t)logits & 15) == 0 &&
                     ((uintptr_t)e & 15) == 0;
    if (vec)
        k_sample<true><<<blocks, SN, 0, st>>>(logits, ldl, V, n, picks, pen, e, scale, out);
    else
        k_sample<false><<<blocks, SN, 0, st>>>(logits, ldl, V, n, picks, pen, e, scale, out);
    CUDA_LAUNCH_CHECK(err, "sampling launch");
    return 0;
}
