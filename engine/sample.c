/*
 * sample.c: the sampler (see sample.h for the contract, the order of
 * operations and the exact rule of a draw).
 *
 * Scratch layout (sample_scratch_bytes(vocab), carved in this order, each
 * piece 64-byte aligned):
 *   slot    int32 [vocab]  penalty list index + 1 of each id (0: none)
 *   flag    uint8 [vocab]  kept ids of a large filtered set (the draw's walk)
 *   e       float [vocab]  exp(logit - max logit): unnormalised probabilities
 *   cand    int32 [vocab]  candidate ids for the filters
 *   prob    float [vocab]  their e values, parallel to cand
 *   pen     sample_penalty [vocab]  sample_pick's penalty list
 * Each piece is cleared by the step that uses it, so the caller's scratch
 * needs no initialisation and may be shared by any number of requests on
 * one thread.
 *
 * Cost: one pass for the maximum, one vectorisable exp pass (a Cephes-style
 * expf, ~1 ulp) for the log-sum-exp that every result's logprob needs, and
 * for sampling O(vocab) expected more: top_k is a quickselect, top_p a
 * quickselect-like partition that stops at the smallest set holding top_p
 * of the weight, min_p a compaction, then a walk of the kept ids in id
 * order. Nothing is sorted but a small kept set's ids.
 *
 * Weights are integers (sample.h): the sets and the token do not depend on
 * the order in which weights are added, which is what lets a device
 * (engine/cuda_sample.cu) make the same pick with parallel sums.
 *
 * Floating point here must not be contracted into fused multiply-adds
 * (engine/CMakeLists.txt compiles this file with -ffp-contract=off): the
 * device repeats exp_le0 operation by operation.
 */
#include "engine/sample.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void sample_params_default(sample_params *p)
{
    memset(p, 0, sizeof *p);
    p->temperature = 0.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->repetition_penalty = 1.0f;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->seed = 0;
    p->logprobs = 0;
}

int sample_params_check(const sample_params *p, lm_err *err)
{
    if (!p) return lm_err_set(err, -EINVAL, "sampling parameters missing");
    if (!isfinite(p->temperature) || p->temperature < 0.0f || p->temperature > 100.0f)
        return lm_err_set(err, -EINVAL, "temperature %g out of range [0, 100]",
                          (double)p->temperature);
    if (p->top_k < 0)
        return lm_err_set(err, -EINVAL, "top_k %d out of range (0 = off, or > 0)", p->top_k);
    if (!isfinite(p->top_p) || p->top_p <= 0.0f || p->top_p > 1.0f)
        return lm_err_set(err, -EINVAL, "top_p %g out of range (0, 1]", (double)p->top_p);
    if (!isfinite(p->min_p) || p->min_p < 0.0f || p->min_p > 1.0f)
        return lm_err_set(err, -EINVAL, "min_p %g out of range [0, 1]", (double)p->min_p);
    if (!isfinite(p->repetition_penalty) || p->repetition_penalty <= 0.0f ||
        p->repetition_penalty > 10.0f)
        return lm_err_set(err, -EINVAL, "repetition_penalty %g out of range (0, 10]",
                          (double)p->repetition_penalty);
    if (!isfinite(p->presence_penalty) || p->presence_penalty < -2.0f || p->presence_penalty > 2.0f)
        return lm_err_set(err, -EINVAL, "presence_penalty %g out of range [-2, 2]",
                          (double)p->presence_penalty);
    if (!isfinite(p->frequency_penalty) || p->frequency_penalty < -2.0f ||
        p->frequency_penalty > 2.0f)
        return lm_err_set(err, -EINVAL, "frequency_penalty %g out of range [-2, 2]",
                          (double)p->frequency_penalty);
    if (p->logprobs < 0 || p->logprobs > SAMPLE_MAX_LOGPROBS)
        return lm_err_set(err, -EINVAL, "logprobs %d out of range [0, %d]", p->logprobs,
                          SAMPLE_MAX_LOGPROBS);
    return 0;
}

/* ---- xoshiro256** seeded through splitmix64 (the authors' recommendation) */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void sample_rng_seed(sample_rng *rng, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        rng->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t sample_rng_next(sample_rng *rng)
{
    uint64_t *s = rng->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double sample_rng_uniform(sample_rng *rng)
{
    /* top 53 bits: every double in [0, 1) on a 2^-53 grid */
    return (double)(sample_rng_next(rng) >> 11) * 0x1.0p-53;
}

/* ---- scratch ----------------------------------------------------------- */

static size_t align64(size_t n)
{
    return (n + 63) & ~(size_t)63;
}

size_t sample_scratch_bytes(int32_t vocab)
{
    if (vocab <= 0) return 0;
    size_t v = (size_t)vocab;
    return align64(v * sizeof(int32_t)) + align64(v) + align64(v * sizeof(float)) +
           align64(v * sizeof(int32_t)) + align64(v * sizeof(float)) +
           align64(v * sizeof(sample_penalty)) + 64 + 64;
}

/* The scratch's first 64 bytes: `slot` is all zero while magic and vocab
 * say so (sample_penalty_list clears only the slots it set, so that a
 * list costs O(its ids), not a pass over the vocabulary). */
#define SLOTS_CLEAN 0x6c6d6f65736c6f74ull
typedef struct scratch_head {
    uint64_t magic;
    int64_t vocab;
} scratch_head;

typedef struct scratch_view {
    scratch_head *head;
    int32_t *slot;
    uint8_t *flag;
    float *e;
    int32_t *cand;
    float *prob;
    sample_penalty *pen;
} scratch_view;

static scratch_view scratch_carve(void *scratch, int32_t vocab)
{
    size_t v = (size_t)vocab;
    uintptr_t p = ((uintptr_t)scratch + 63) & ~(uintptr_t)63;
    scratch_view sv;
    sv.head = (scratch_head *)p;
    p += 64;
    sv.slot = (int32_t *)p;
    p += align64(v * sizeof(int32_t));
    sv.flag = (uint8_t *)p;
    p += align64(v);
    sv.e = (float *)p;
    p += align64(v * sizeof(float));
    sv.cand = (int32_t *)p;
    p += align64(v * sizeof(int32_t));
    sv.prob = (float *)p;
    p += align64(v * sizeof(float));
    sv.pen = (sample_penalty *)p;
    return sv;
}

/* ---- penalties ---------------------------------------------------------- */

static int check_ids(const int32_t *ids, int32_t n, int32_t vocab, const char *what, lm_err *err)
{
    for (int32_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            return lm_err_set(err, -EINVAL, "%s token %d at position %d outside vocabulary [0, %d)",
                              what, ids[i], i, vocab);
    return 0;
}

int32_t sample_penalty_list_bound(const sample_params *p, int32_t n_prompt, int32_t n_output,
                                  int32_t vocab)
{
    if (!sample_has_penalties(p)) return 0;
    const int64_t n = (int64_t)n_output + (p->repetition_penalty != 1.0f ? n_prompt : 0);
    return (int32_t)(n < vocab ? n : vocab);
}

int sample_pick_error(lm_err *err, int32_t bad_token, float bad_value)
{
    if (bad_token >= 0)
        return lm_err_set(err, -EINVAL, "sample_pick: logit of token %d is %g", bad_token,
                          (double)bad_value);
    return lm_err_set(err, -EINVAL, "sample_pick: every logit is -inf");
}

int sample_draws(const sample_params *p)
{
    return p->temperature >= SAMPLE_MIN_TEMPERATURE;
}

int sample_has_penalties(const sample_params *p)
{
    return p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f ||
           p->frequency_penalty != 0.0f;
}

int32_t sample_penalty_list(const sample_params *p, const int32_t *prompt, int32_t n_prompt,
                            const int32_t *output, int32_t n_output, int32_t vocab, void *scratch,
                            sample_penalty *out)
{
    const int rep = p->repetition_penalty != 1.0f;
    if (!sample_has_penalties(p) || n_output + (rep ? n_prompt : 0) == 0) return 0;
    scratch_view sv = scratch_carve(scratch, vocab);
    if (sv.head->magic != SLOTS_CLEAN || sv.head->vocab != vocab) {
        memset(sv.slot, 0, (size_t)vocab * sizeof(int32_t));
        sv.head->magic = SLOTS_CLEAN;
        sv.head->vocab = vocab;
    }
    int32_t n = 0;
    for (int pass = rep ? 0 : 1; pass < 2; pass++) {
        const int32_t *ids = pass ? output : prompt;
        const int32_t m = pass ? n_output : n_prompt;
        for (int32_t i = 0; i < m; i++) {
            const int32_t t = ids[i];
            if (!sv.slot[t]) {
                out[n].id = t;
                out[n].count = 0;
                sv.slot[t] = ++n;
            }
            if (pass) out[sv.slot[t] - 1].count++;
        }
    }
    for (int32_t i = 0; i < n; i++) /* clean again for the next list */
        sv.slot[out[i].id] = 0;
    return n;
}

void sample_apply_penalties(float *logits, const sample_params *p, const sample_penalty *pen,
                            int32_t n)
{
    const int rep = p->repetition_penalty != 1.0f;
    const int pres = p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
    for (int32_t i = 0; i < n; i++) {
        float l = logits[pen[i].id];
        if (rep) l = l > 0.0f ? l / p->repetition_penalty : l * p->repetition_penalty;
        if (pres && pen[i].count > 0)
            l -= p->frequency_penalty * (float)pen[i].count + p->presence_penalty;
        logits[pen[i].id] = l;
    }
}

int sample_fixed_shift(int32_t vocab)
{
    int c = 0;
    while (c < 31 && ((int64_t)1 << c) < (int64_t)vocab)
        c++;
    return 62 - c;
}

/* A token's draw weight: trunc(e * 2^shift) (exact: a power of two; below
 * 2^62, so the signed conversion, one instruction, is exact too) */
static inline uint64_t fx_weight(float e, double scale)
{
    return (uint64_t)(int64_t)((double)e * scale);
}

/* The weights of e[0, n) summed (e <= 1, so a weight is at most 2^shift):
 * in doubles, four lanes, truncated as (x + 2^52) - 2^52 stepped down where
 * that rounded up; a block weighs at most 2^53 (512 weights up to 2^44, a
 * vocabulary of 2^17 or more; fewer below), so its double sum is exact, and
 * blocks add as integers. Shifts above 51 (vocabularies up to 2^11) sum
 * one weight at a time. */
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int64_t v4s __attribute__((vector_size(32)));

static uint64_t fx_total(const float *e, int32_t n, double scale)
{
    const v4d one = {1.0, 1.0, 1.0, 1.0};
    /* a block weighs at most len * scale: at most 2^53 for exact sums */
    const int32_t len = scale <= 0x1p44 ? 512 : scale <= 0x1p51 ? (int32_t)(0x1p53 / scale) : 0;
    uint64_t total = 0;
    int32_t t = 0;
    while (len >= 4 && t + 4 <= n) {
        const int32_t end = t + len <= n ? t + len : n - (n - t) % 4;
        v4d acc = {0, 0, 0, 0};
        for (; t < end; t += 4) {
            v4f f;
            memcpy(&f, e + t, sizeof f);
            const v4d x = __builtin_convertvector(f, v4d) * scale;
            v4d r = (x + 0x1p52) - 0x1p52;
            r -= (v4d)((r > x) & (v4s)one); /* 1.0 where that rounded up (a bit mask) */
            acc += r;
        }
        total += (uint64_t)(int64_t)(acc[0] + acc[1] + acc[2] + acc[3]);
    }
    for (; t < n; t++)
        total += fx_weight(e[t], scale);
    return total;
}

/* fx_total of each block of 1024 of e[0, n) into blk (n / 1024 + 1
 * entries); returns their sum */
#define FX_BLOCK 1024
static uint64_t fx_blocks(const float *e, int32_t n, double scale, uint64_t *blk)
{
    uint64_t total = 0;
    for (int32_t b = 0; b * FX_BLOCK < n; b++) {
        const int32_t len = n - b * FX_BLOCK < FX_BLOCK ? n - b * FX_BLOCK : FX_BLOCK;
        blk[b] = fx_total(e + (size_t)b * FX_BLOCK, len, scale);
        total += blk[b];
    }
    return total;
}

/* The first t of [0, n) whose running weight exceeds u (u below the
 * total): the block holding the crossing from fx_blocks' sums, then its
 * ids walked */
static int32_t fx_walk(const float *e, int32_t n, const uint64_t *blk, uint64_t u, double scale)
{
    uint64_t cum = 0;
    int32_t b = 0;
    while ((b + 1) * FX_BLOCK < n && cum + blk[b] <= u)
        cum += blk[b++];
    int32_t t = b * FX_BLOCK;
    for (; t < n - 1; t++) {
        cum += fx_weight(e[t], scale);
        if (cum > u) break;
    }
    return t;
}

/* The least float e with fx_weight(e) >= w (w < 2^53): the candidates'
 * weight floor as a float compare */
static float fx_floor(uint64_t w, int shift)
{
    const double d = ldexp((double)w, -shift);
    float f = (float)d;
    if ((double)f < d) f = nextafterf(f, INFINITY);
    return f;
}

/* (draw >> 11) * m / 2^53, below m: the 128-bit product from 32-bit halves */
static inline uint64_t draw_point(uint64_t draw, uint64_t m)
{
    const uint64_t a = draw >> 11;
    const uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = m & 0xffffffffu, b1 = m >> 32;
    const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    const uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
    const uint64_t lo = (mid << 32) | (p00 & 0xffffffffu);
    const uint64_t hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
    return (hi << 11) | (lo >> 53);
}

/* ---- helpers ------------------------------------------------------------ */

/* exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-6
 * polynomial, ~1 ulp); below -87 the result is 0, so masked (-inf) logits
 * get probability exactly 0. Branch-free so that loops over it vectorise. */
static inline float exp_le0(float x)
{
    float xc = x < -87.0f ? -87.0f : x;
    float fi = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - fi * 0.693359375f + fi * 2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    float y = q * r * r + r + 1.0f;
    union {
        float f;
        int32_t i;
    } sc;
    sc.i = ((int32_t)fi + 127) << 23;
    return x < -87.0f ? 0.0f : y * sc.f;
}

float sample_exp_le0(float x)
{
    return exp_le0(x);
}

/* 8-lane vectors (GCC/Clang vector extensions; AVX2 with the engine's
 * -march, plain lowering elsewhere) for the two passes over the vocabulary
 * that every pick makes. The lane code is exp_le0 and the max, lane by lane. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f v8f_load(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v8f exp_le0_v8(v8f x)
{
    const v8f lo = {-87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f};
    v8i under = x < lo;
    v8f xc = (v8f)((under & (v8i)lo) | (~under & (v8i)x));
    v8f t = xc * 1.44269504088896341f + 0.5f;
    v8i ti = __builtin_convertvector(t, v8i); /* truncation */
    v8f tf = __builtin_convertvector(ti, v8f);
    ti += (v8i)(tf > t); /* -1 where truncation rounded up: floor */
    v8f fi = __builtin_convertvector(ti, v8f);
    v8f r = xc - fi * 0.693359375f + fi * 2.12194440e-4f;
    v8f q = r * 1.9875691500e-4f + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    v8f y = q * r * r + r + 1.0f;
    v8f sc = (v8f)((ti + 127) << 23);
    return (v8f)(~under & (v8i)(y * sc));
}

/* e[t] = exp(logits[t] - mx); returns the sum (blocks of 512 summed in
 * float lanes, blocks in double). */
static double exp_pass(const float *logits, float mx, int32_t vocab, float *e)
{
    double sum = 0.0;
    int32_t t = 0;
    while (t + 8 <= vocab) {
        v8f acc = {0};
        int32_t end = t + 512 <= vocab ? t + 512 : vocab - (vocab - t) % 8;
        for (; t < end; t += 8) {
            v8f v = exp_le0_v8(v8f_load(logits + t) - mx);
            memcpy(e + t, &v, sizeof v);
            acc += v;
        }
        for (int k = 0; k < 8; k++)
            sum += acc[k];
    }
    for (; t < vocab; t++) {
        e[t] = exp_le0(logits[t] - mx);
        sum += e[t];
    }
    return sum;
}

/* Largest logit, and whether any is NaN or +inf. */
static float max_pass(const float *logits, int32_t vocab, int *ret_bad)
{
    const v8f pinf = {INFINITY, INFINITY, INFINITY, INFINITY,
                      INFINITY, INFINITY, INFINITY, INFINITY};
    v8f m = -pinf;
    v8i bad8 = {0};
    int32_t t = 0;
    for (; t + 8 <= vocab; t += 8) {
        v8f l = v8f_load(logits + t);
        bad8 |= (l != l) | (l == pinf);
        v8i gt = l > m;
        m = (v8f)((gt & (v8i)l) | (~gt & (v8i)m));
    }
    float mx = -INFINITY;
    int bad = 0;
    for (int k = 0; k < 8; k++) {
        bad |= bad8[k] != 0;
        mx = m[k] > mx ? m[k] : mx;
    }
    for (; t < vocab; t++) {
        float l = logits[t];
        bad |= (l != l) | (l == INFINITY);
        mx = l > mx ? l : mx;
    }
    *ret_bad = bad;
    return mx;
}

/* Candidate order: probability descending, then id ascending. */
static inline int cand_before(float pa, int32_t ia, float pb, int32_t ib)
{
    return pa > pb || (pa == pb && ia < ib);
}

static inline void cand_swap(int32_t *cand, float *prob, int32_t i, int32_t j)
{
    float tp = prob[i];
    prob[i] = prob[j];
    prob[j] = tp;
    int32_t ti = cand[i];
    cand[i] = cand[j];
    cand[j] = ti;
}

/* Lomuto partition of [lo, hi) around the median of three: returns m with
 * [lo, m) before the pivot, the pivot at m, (m, hi) after it. */
static int32_t cand_partition(int32_t *cand, float *prob, int32_t lo, int32_t hi)
{
    int32_t mid = lo + (hi - lo) / 2, last = hi - 1;
    /* median of three into `last` */
    if (cand_before(prob[mid], cand[mid], prob[lo], cand[lo])) cand_swap(cand, prob, mid, lo);
    if (cand_before(prob[last], cand[last], prob[lo], cand[lo])) cand_swap(cand, prob, last, lo);
    if (cand_before(prob[mid], cand[mid], prob[last], cand[last])) cand_swap(cand, prob, mid, last);
    float pp = prob[last];
    int32_t pi = cand[last];
    int32_t m = lo;
    for (int32_t i = lo; i < last; i++)
        if (cand_before(prob[i], cand[i], pp, pi)) cand_swap(cand, prob, i, m++);
    cand_swap(cand, prob, m, last);
    return m;
}

/* Rearrange so that the k best candidates come first (any order). */
static void cand_select(int32_t *cand, float *prob, int32_t n, int32_t k)
{
    int32_t lo = 0, hi = n;
    while (hi - lo > 1) {
        int32_t m = cand_partition(cand, prob, lo, hi);
        if (m == k || m + 1 == k) return;
        if (m > k)
            hi = m;
        else
            lo = m + 1;
    }
}

/*
 * Nucleus: rearrange so that the shortest non-empty best-first prefix whose
 * weight reaches `target` (>= 1) comes first (any order within it);
 * returns its length, or n when the whole list weighs less. Expected
 * O(n): each round keeps only the side where the boundary lies. Integer
 * weights: the answer is the prefix of sample.h's rule, exactly.
 */
static int32_t cand_nucleus(int32_t *cand, float *prob, int32_t n, uint64_t target, double scale)
{
    int32_t lo = 0, hi = n;
    uint64_t acc = 0; /* weight of [0, lo), all in the nucleus; below target */
    while (hi - lo > 1) {
        int32_t m = cand_partition(cand, prob, lo, hi);
        uint64_t upper = 0;
        for (int32_t i = lo; i < m; i++)
            upper += fx_weight(prob[i], scale);
        const uint64_t pivot = fx_weight(prob[m], scale);
        if (acc + upper >= target) {
            hi = m; /* the boundary is before the pivot */
        } else if (acc + upper + pivot >= target) {
            return m + 1;
        } else {
            acc += upper + pivot;
            lo = m + 1;
        }
    }
    /* one item left in [lo, hi): with it the prefix reaches the target, or
     * nothing does (then keep everything) */
    if (hi > lo && acc + fx_weight(prob[lo], scale) >= target) return lo + 1;
    return n;
}

static int cmp_id(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* The kept ids cand[0, n) in id order: the first whose running weight
 * exceeds u (n >= 1, u below their total weight). Small sets are sorted;
 * large ones are marked in `flag` and the vocabulary walked. */
static int32_t draw_in_order(int32_t *cand, int32_t n, const float *e, int32_t vocab, uint8_t *flag,
                             uint64_t u, double scale)
{
    uint64_t cum = 0;
    if (n <= 4096) {
        qsort(cand, (size_t)n, sizeof *cand, cmp_id);
        for (int32_t i = 0; i < n; i++) {
            cum += fx_weight(e[cand[i]], scale);
            if (cum > u) return cand[i];
        }
        return cand[n - 1]; /* not reached: u is below the total */
    }
    memset(flag, 0, (size_t)vocab);
    for (int32_t i = 0; i < n; i++)
        flag[cand[i]] = 1;
    int32_t last = cand[0];
    for (int32_t t = 0; t < vocab; t++)
        if (flag[t]) {
            last = t;
            cum += fx_weight(e[t], scale);
            if (cum > u) return t;
        }
    return last; /* not reached */
}

/* Top-n log-probabilities over the full distribution (insertion into a
 * small sorted array: O(vocab * n) worst case, O(vocab) typically). */
static void fill_top(const float *logits, int32_t vocab, double lse, int32_t n, sample_result *r)
{
    r->n_top = 0;
    if (n <= 0) return;
    int32_t cnt = 0;
    for (int32_t t = 0; t < vocab; t++) {
        float l = logits[t];
        if (cnt == n && !(l > logits[r->top_ids[cnt - 1]])) continue;
        int32_t pos = cnt < n ? cnt : n - 1;
        while (pos > 0 && l > logits[r->top_ids[pos - 1]]) {
            r->top_ids[pos] = r->top_ids[pos - 1];
            pos--;
        }
        r->top_ids[pos] = t;
        if (cnt < n) cnt++;
    }
    r->n_top = cnt;
    for (int32_t i = 0; i < cnt; i++)
        r->top_logprobs[i] = (float)((double)logits[r->top_ids[i]] - lse);
}

/* ---- sample_pick -------------------------------------------------------- */

int sample_pick(float *logits, int32_t vocab, const sample_params *p, sample_rng *rng,
                const int32_t *prompt, int32_t n_prompt, const int32_t *output, int32_t n_output,
                void *scratch, sample_result *ret, lm_err *err)
{
    if (!logits || vocab <= 0 || !p || !scratch || !ret)
        return lm_err_set(err, -EINVAL, "sample_pick: missing logits, params, scratch or result");
    int rc = sample_params_check(p, err);
    if (rc) return rc;
    if (sample_draws(p) && !rng)
        return lm_err_set(err, -EINVAL, "sample_pick: temperature %g needs an rng",
                          (double)p->temperature);
    if (n_prompt < 0 || n_output < 0 || (n_prompt && !prompt) || (n_output && !output))
        return lm_err_set(err, -EINVAL, "sample_pick: bad prompt/output id lists");
    if ((rc = check_ids(prompt, n_prompt, vocab, "prompt", err)) ||
        (rc = check_ids(output, n_output, vocab, "output", err)))
        return rc;
    scratch_view sv = scratch_carve(scratch, vocab);
    int32_t n_pen = sample_penalty_list(p, prompt, n_prompt, output, n_output, vocab, scratch, sv.pen);
    sample_apply_penalties(logits, p, sv.pen, n_pen);
    uint64_t draw = sample_draws(p) ? sample_rng_next(rng) : 0;
    return sample_pick_drawn(logits, vocab, p, draw, scratch, ret, err);
}

int sample_pick_drawn(float *logits, int32_t vocab, const sample_params *p, uint64_t draw,
                      void *scratch, sample_result *ret, lm_err *err)
{
    if (!logits || vocab <= 0 || !p || !scratch || !ret)
        return lm_err_set(err, -EINVAL, "sample_pick: missing logits, params, scratch or result");
    int rc = sample_params_check(p, err);
    if (rc) return rc;
    scratch_view sv = scratch_carve(scratch, vocab);

    /* max and validity (branch-free so it vectorises); NaN or +inf is a
     * backend bug reported as an error */
    int bad;
    float mx = max_pass(logits, vocab, &bad);
    if (bad)
        for (int32_t t = 0; t < vocab; t++)
            if (isnan(logits[t]) || logits[t] == INFINITY)
                return sample_pick_error(err, t, logits[t]);
    if (mx == -INFINITY) return sample_pick_error(err, -1, -INFINITY);
    int32_t arg = 0; /* first maximum: lowest id on ties */
    while (logits[arg] != mx)
        arg++;

    const int hot = sample_draws(p);
    if (hot && p->temperature != 1.0f) {
        float inv = 1.0f / p->temperature;
        for (int32_t t = 0; t < vocab; t++)
            logits[t] *= inv;
        mx = logits[arg];
        if (mx == INFINITY) /* a logit near FLT_MAX: nothing to draw from */
            return sample_pick_error(err, arg, mx);
    }
    /* e = exp(logits - max) (e[arg] = 1) and the log-sum-exp */
    double sum = exp_pass(logits, mx, vocab, sv.e);
    double lse = (double)mx + log(sum);

    memset(ret, 0, sizeof *ret);
    int32_t tok = arg; /* greedy: first maximum, i.e. lowest id on ties */
    if (hot) {
        const int shift = sample_fixed_shift(vocab);
        const double scale = ldexp(1.0, shift);
        /* every token's weight; the plain draw's block sums (in `cand`, unused
         * there) */
        uint64_t *blk = (uint64_t *)(void *)sv.cand;
        int filtering = p->top_k > 0 || p->top_p < 1.0f || p->min_p > 0.0f;
        /* needed by the plain draw and by top_p alone */
        const uint64_t total = !filtering || (p->top_k == 0 && p->top_p < 1.0f)
                                   ? fx_blocks(sv.e, vocab, scale, blk)
                                   : 0;
        if (!filtering) {
            /* plain draw over the whole vocabulary, in id order */
            tok = fx_walk(sv.e, vocab, blk, draw_point(draw, total), scale);
        } else {
            /* candidates: weight > 0; with top_p alone, tokens below a weight
             * of (total - target) / vocab together weigh less than
             * total - target, so the nucleus lies above them */
            uint64_t target = 0, floor_w = 1;
            if (p->top_k == 0 && p->top_p < 1.0f) {
                target = (uint64_t)((double)p->top_p * (double)total);
                if (target < 1) target = 1;
                if ((total - target) / (uint64_t)vocab > floor_w)
                    floor_w = (total - target) / (uint64_t)vocab;
            }
            int32_t n = 0;
            const float e_floor = fx_floor(floor_w, shift); /* weight >= floor_w */
            for (int32_t t = 0; t < vocab; t++)
                if (sv.e[t] >= e_floor) {
                    sv.cand[n] = t;
                    sv.prob[n] = sv.e[t];
                    n++;
                }
            if (p->top_k > 0 && p->top_k < n) {
                cand_select(sv.cand, sv.prob, n, p->top_k);
                n = p->top_k;
            }
            if (p->top_p < 1.0f) {
                if (p->top_k > 0) { /* the nucleus of what top_k kept */
                    uint64_t kept = 0;
                    for (int32_t i = 0; i < n; i++)
                        kept += fx_weight(sv.prob[i], scale);
                    target = (uint64_t)((double)p->top_p * (double)kept);
                    if (target < 1) target = 1;
                }
                n = cand_nucleus(sv.cand, sv.prob, n, target, scale);
            }
            if (p->min_p > 0.0f) {
                /* p >= min_p * p_max, i.e. e >= min_p (e of the mode is 1) */
                int32_t k = 0;
                for (int32_t i = 0; i < n; i++)
                    if (sv.prob[i] >= p->min_p) {
                        sv.cand[k] = sv.cand[i];
                        sv.prob[k] = sv.prob[i];
                        k++;
                    }
                n = k;
            }
            uint64_t kept = 0;
            for (int32_t i = 0; i < n; i++)
                kept += fx_weight(sv.prob[i], scale);
            /* n >= 1: the mode (weight 2^S) survives every filter */
            tok = draw_in_order(sv.cand, n, sv.e, vocab, sv.flag, draw_point(draw, kept), scale);
        }
    }
    ret->token = tok;
    ret->logprob = (float)((double)logits[tok] - lse);
    fill_top(logits, vocab, lse, p->logprobs, ret);
    return 0;
}
