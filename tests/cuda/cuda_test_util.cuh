/*
 * cuda_test_util.cuh: what the CUDA test programs share: the random inputs,
 * the error measure (compare), INT4 matrices and their CPU product, one
 * forward step of a few pieces, and the synthetic model shapes.
 */
#ifndef LIGHTMOE_TESTS_CUDA_TEST_UTIL_CUH
#define LIGHTMOE_TESTS_CUDA_TEST_UTIL_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <array>
#include <vector>

#include "engine/cuda_attn.cuh"
#include "engine/cuda_int4_gemm.cuh"
#include "engine/cuda_model.h"
#include "engine/cuda_moe.cuh"
#include "engine/cuda_norm.cuh"
#include "engine/cuda_rope.cuh"
#include "engine/cuda_mega.cuh"
#include "engine/cuda_synth.h"

using std::vector;

inline int g_fail = 0;
inline uint64_t g_rng = 88172645463325252ULL;
inline uint32_t rnd() { g_rng ^= g_rng << 13; g_rng ^= g_rng >> 7; g_rng ^= g_rng << 17; return (uint32_t)g_rng; }
inline float urand() { return (float)(rnd() >> 8) * (2.0f / 16777216.0f) - 1.0f; } /* [-1,1) */
inline float h2f(uint16_t b) { __half_raw r; r.x = b; return __half2float(__half(r)); }
inline uint16_t f2h(float f) { __half h = __float2half(f); return ((__half_raw)h).x; }
inline float round16(float f) { return h2f(f2h(f)); }

#define CK(x) \
    do { \
        cudaError_t e_ = (x); \
        if (e_ != cudaSuccess) { \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1); \
        } \
    } while (0)
#define OK(x) \
    do { \
        lm_err e_ = {0, ""}; \
        int rc_ = (x); \
        if (rc_ == 0) \
            rc_ = cudaDeviceSynchronize() == cudaSuccess ? 0 : -EIO; \
        if (rc_) { \
            fprintf(stderr, "%s:%d: %s failed: %d %s\n", __FILE__, __LINE__, #x, rc_, e_.msg); \
            exit(1); \
        } \
    } while (0)
#define ERRP (&e_)

template <class T> inline T *dev(const vector<T> &h)
{
    T *d;
    CK(cudaMalloc(&d, h.size() * sizeof(T) + 16));
    CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <class T> inline vector<T> host(const T *d, size_t n)
{
    vector<T> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

/* Compare rows x cols; NaN anywhere (e.g. an unwritten poisoned output) fails. */
inline void compare(const char *what, const float *got, const double *ref, int rows, int cols,
                    double bound)
{
    double num = 0, den = 0, worst_row = 0;
    int bad_nan = 0;
    for (int r = 0; r < rows; r++) {
        double rn = 0, rd = 0;
        for (int c = 0; c < cols; c++) {
            const double g = got[(size_t)r * cols + c], f = ref[(size_t)r * cols + c];
            if (!isfinite(g))
                bad_nan++;
            rn += (g - f) * (g - f);
            rd += f * f;
        }
        num += rn;
        den += rd;
        const double rr = sqrt(rn) / (sqrt(rd) + 1e-30);
        if (rd > 0 && rr > worst_row)
            worst_row = rr;
    }
    const double rel = sqrt(num) / (sqrt(den) + 1e-30);
    const bool pass = !bad_nan && rel <= bound && worst_row <= 1e-2;
    printf("%-4s %-58s rel %.2e (bound %.0e) worst row %.2e%s\n", pass ? "ok" : "FAIL", what, rel,
           bound, worst_row, bad_nan ? " NON-FINITE" : "");
    if (!pass)
        g_fail = 1;
}

inline void expect_einval(const char *what, int rc, const lm_err &e)
{
    const bool ok = rc == -EINVAL && e.msg[0];
    printf("%-4s %s refused (%s)\n", ok ? "ok" : "FAIL", what, e.msg);
    if (!ok)
        g_fail = 1;
}

/* ---- INT4 products ------------------------------------------------------------- */

struct qmat {
    int n, k, g, E;
    vector<uint8_t> qs, z;
    vector<uint16_t> sc;
    vector<int32_t> perm; /* [E][k] or empty */
    float w(int e, int r, int j) const /* packed column j */
    {
        const uint8_t b = qs[((size_t)e * n + r) * (k / 2) + j / 2];
        const int q = (j & 1) ? b >> 4 : b & 15;
        const size_t gi = ((size_t)e * n + r) * (k / g) + j / g;
        return h2f(sc[gi]) * (float)(q - z[gi]);
    }
};

inline qmat make_qmat(int n, int k, int g, int E, bool perm)
{
    qmat m{n, k, g, E, {}, {}, {}, {}};
    m.qs.resize((size_t)E * n * k / 2);
    for (auto &b : m.qs)
        b = (uint8_t)rnd();
    const size_t gc = (size_t)E * n * (k / g);
    m.z.resize(gc);
    m.sc.resize(gc);
    for (size_t i = 0; i < gc; i++) {
        m.z[i] = (uint8_t)(rnd() % 16);
        m.sc[i] = f2h((1.0f + 0.5f * urand()) / (4.6f * sqrtf((float)k)));
    }
    if (perm) {
        /* act-order: a permutation whose groups are contiguous after it */
        m.perm.resize((size_t)E * k);
        for (int e = 0; e < E; e++) {
            vector<int32_t> p(k);
            for (int j = 0; j < k; j++)
                p[j] = j;
            for (int j = k - 1; j > 0; j--)
                std::swap(p[j], p[rnd() % (j + 1)]);
            std::copy(p.begin(), p.end(), m.perm.begin() + (size_t)e * k);
        }
    }
    return m;
}

struct dq {
    cu_int4_weights w;
    int32_t *perm;
};
inline dq upload(const qmat &m)
{
    dq d;
    d.w.n = m.n;
    d.w.k = m.k;
    d.w.group = m.g;
    d.w.n_experts = m.E;
    d.w.qs = dev(m.qs);
    d.w.scales = (const __half *)dev(m.sc);
    d.w.zeros = dev(m.z);
    d.perm = m.perm.empty() ? nullptr : dev(m.perm);
    return d;
}
inline void release(dq &d)
{
    cudaFree((void *)d.w.qs);
    cudaFree((void *)d.w.scales);
    cudaFree((void *)d.w.zeros);
    cudaFree(d.perm);
}

/* ref[i][n] of expert e(i) for A row a(i) (x values already fp16-rounded). */
inline void ref_int4(const qmat &m, const vector<float> &x, int lda, int rows,
                     const vector<int> &arow, const vector<int> &ent_e, cu_out_mode mode,
                     const vector<double> &acc_init, vector<double> &out)
{
    const int cols = mode == CU_OUT_SILU_F16 ? m.n / 2 : m.n;
    out.assign((size_t)rows * cols, 0);
    vector<double> y(m.n);
    for (int i = 0; i < rows; i++) {
        const int e = ent_e.empty() ? 0 : ent_e[i];
        const float *xr = &x[(size_t)arow[i] * lda];
        for (int r = 0; r < m.n; r++) {
            double s = 0;
            for (int j = 0; j < m.k; j++)
                s += (double)m.w(e, r, j) * xr[m.perm.empty() ? j : m.perm[(size_t)e * m.k + j]];
            y[r] = s;
        }
        for (int c = 0; c < cols; c++) {
            if (mode == CU_OUT_SILU_F16) {
                const double g = y[2 * c], u = y[2 * c + 1];
                out[(size_t)i * cols + c] = g / (1 + exp(-g)) * u;
            } else {
                out[(size_t)i * cols + c] = y[c] + (mode == CU_OUT_F32_ACC ? acc_init[(size_t)i * cols + c] : 0);
            }
        }
    }
}

/* The CPU's routing of one token's logits l[E]: the k experts of the
 * largest logits (ties to the lowest id, as the GPU) and their softmax
 * probabilities over all E, renormalised over the k if renorm. */
inline void ref_route(const float *l, int E, int k, int renorm, vector<int> &ids,
                      vector<double> &p)
{
    vector<int> order(E);
    for (int e = 0; e < E; e++)
        order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b]; });
    double mx = l[order[0]], sum = 0, ksum = 0;
    for (int e = 0; e < E; e++)
        sum += exp(l[e] - mx);
    ids.assign(order.begin(), order.begin() + k);
    p.resize(k);
    for (int j = 0; j < k; j++)
        ksum += p[j] = exp(l[order[j]] - mx) / sum;
    if (renorm)
        for (auto &v : p)
            v /= ksum;
}

/* A grouping plan for T tokens of k choices over E experts on the device
 * (ids, w: unused by the helpers, for the callers). */
struct plan_dev {
    cu_moe_plan p;
    int32_t *ids;
    float *w;
};
inline plan_dev make_plan(int T, int k, int E)
{
    plan_dev d;
    CK(cudaMalloc(&d.p.offsets, (E + 1) * 4));
    CK(cudaMalloc(&d.p.ent_token, T * k * 4));
    CK(cudaMalloc(&d.p.ent_expert, T * k * 4));
    CK(cudaMalloc(&d.p.ent_weight, T * k * 4));
    CK(cudaMalloc(&d.p.pos, T * k * 4));
    CK(cudaMalloc(&d.p.items, (T * k + E) * 8));
    CK(cudaMalloc(&d.p.n_items, 4));
    d.p.topk_ids = nullptr;
    d.p.topk_w = nullptr;
    return d;
}
/* k distinct experts of E for each of T tokens, at random (partial
 * Fisher-Yates a token) */
inline vector<int32_t> rand_choices(int T, int k, int E)
{
    vector<int32_t> ids((size_t)T * k);
    for (int t = 0; t < T; t++) {
        vector<int> p(E);
        for (int e = 0; e < E; e++)
            p[e] = e;
        for (int j = 0; j < k; j++) {
            std::swap(p[j], p[j + rnd() % (E - j)]);
            ids[(size_t)t * k + j] = p[j];
        }
    }
    return ids;
}
/* A grouped product's rows from a plan of n entries over E experts built
 * for tile (everything else zero: A's rows in entry order, no scales) */
inline cu_gemm_rows grouped_rows(const cu_moe_plan &p, int n, int E, int tile)
{
    cu_gemm_rows r;
    memset(&r, 0, sizeof(r));
    r.n_rows = n;
    r.offsets = p.offsets;
    r.items = p.items;
    r.n_items = p.n_items;
    r.max_items = cu_moe_max_items(n, E, tile);
    r.tile = tile;
    return r;
}
inline void free_plan(plan_dev &d)
{
    void *p[] = {d.p.offsets, d.p.ent_token, d.p.ent_expert, d.p.ent_weight,
                 d.p.pos,     d.p.items,     d.p.n_items};
    for (void *x : p)
        cudaFree(x);
}

inline vector<float> rand_act(size_t n, float amp)
{
    vector<float> x(n);
    for (auto &v : x)
        v = round16(amp * urand());
    return x;
}
inline __half *dev_half(const vector<float> &x)
{
    vector<uint16_t> h(x.size());
    for (size_t i = 0; i < x.size(); i++)
        h[i] = f2h(x[i]);
    return (__half *)dev(h);
}

/* One forward step of the pieces toks (piece q from position prior[q], its
 * table blk0[q], blk0[q] + 1, ...); logits of every token. */
inline int try_seqs(cu_state *s, const cu_model *m, const vector<vector<int>> &toks,
                    const vector<int> &prior, const vector<int> &blk0, int max_blocks,
                    vector<float> &logits, lm_err *err)
{
    backend_batch b;
    vector<int32_t> tokens, seq_start = {0}, start_pos, bt, rows;
    for (size_t q = 0; q < toks.size(); q++) {
        for (int t : toks[q])
            tokens.push_back(t);
        seq_start.push_back((int)tokens.size());
        start_pos.push_back(prior[q]);
        for (int j = 0; j < max_blocks; j++)
            bt.push_back(blk0[q] + j);
    }
    for (size_t i = 0; i < tokens.size(); i++)
        rows.push_back((int)i);
    logits.assign(rows.size() * (size_t)m->vocab, 0.f);
    b.n_seqs = (int)toks.size();
    b.n_tokens = (int)tokens.size();
    b.tokens = tokens.data();
    b.seq_start = seq_start.data();
    b.start_pos = start_pos.data();
    b.block_table = bt.data();
    b.max_blocks = max_blocks;
    b.n_logits = (int)rows.size();
    b.logit_rows = rows.data();
    b.logits = logits.data();
    return cu_forward(s, &b, err);
}

inline vector<float> run_seqs(cu_state *s, const cu_model *m, const vector<vector<int>> &toks,
                              const vector<int> &prior, const vector<int> &blk0, int max_blocks)
{
    vector<float> logits;
    OK(try_seqs(s, m, toks, prior, blk0, max_blocks, logits, ERRP));
    return logits;
}

/* ---- synthetic model shapes (forward, fold and mega tests) ---- */

/* qwen2_moe-like: hd 64, 2 query heads a KV head, shared expert, q/k/v bias */
inline const cu_synth_config g_q2 = {"qwen2-like", 2, 256, 4, 2, 64, 512, 1024, 8, 2, 0,
                                     160, 384, 32, 0, 1, 1, 10000.f};
/* qwen3_moe-like: hd 128, 8 query heads a KV head, top-8 of 16, q/k norm, group 64 */
inline const cu_synth_config g_q3 = {"qwen3-like", 3, 512, 16, 2, 128, 1000, 4096, 16, 8, 1,
                                     128, 0, 64, 1, 0, 1, 1000000.f};
/* mixtral-like: 4 query heads a KV head, top-2 of 8, widths off the team sizes */
inline const cu_synth_config g_mx = {"mixtral-like", 2, 384, 8, 2, 128, 700, 2048, 8, 2, 1,
                                     224, 0, 32, 0, 0, 1, 1000000.f};

/* A prompt, then one-token steps (decode graphs on, so replays too), with
 * the folds off and on: logits within 1e-2 of each other (fp16 rounding of
 * the normalised input and the order of fp32 sums differ); the folded
 * state must have launched folded products, the other none. */
/* test_cuda_fold.cu */
void test_fold_kernels();
void test_fold();
/* test_cuda_forward.cu */
void test_forward();
void test_mega();
/* test_cuda_sample.cu */
void test_sample(bool full); /* false: small rows only (sanitizers) */

#endif
