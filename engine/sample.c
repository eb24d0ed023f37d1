/*
 * sample.c: the sampler (see sample.h for the contract and the order of
 * operations).
 *
 * Scratch layout (sample_scratch_bytes(vocab), carved in this order, each
 * piece 64-byte aligned):
 *   counts  int32 [vocab]  occurrences of each id in `output`
 *   seen    uint8 [vocab]  id occurs in prompt or output
 *   cand    int32 [vocab]  candidate ids for the filters
 *   prob    float [vocab]  candidate probabilities, parallel to cand
 * counts/seen are cleared by sample_pick itself (only when a penalty is
 * on), so the caller's scratch needs no initialisation and may be shared
 * by any number of requests on one thread.
 *
 * Filters run on a candidate list sorted by probability descending (ties:
 * lower id first, so results never depend on the sort's stability). top_p
 * without top_k first drops every token with p < (1 - top_p) / vocab: those
 * tokens together hold less than 1 - top_p of the mass, so the nucleus lies
 * entirely in what remains and the sort only sees a handful of ids for
 * peaked distributions.
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
    return align64(v * sizeof(int32_t)) + align64(v) + align64(v * sizeof(int32_t)) +
           align64(v * sizeof(float)) + 64;
}

typedef struct scratch_view {
    int32_t *counts;
    uint8_t *seen;
    int32_t *cand;
    float *prob;
} scratch_view;

static scratch_view scratch_carve(void *scratch, int32_t vocab)
{
    size_t v = (size_t)vocab;
    uintptr_t p = ((uintptr_t)scratch + 63) & ~(uintptr_t)63;
    scratch_view sv;
    sv.counts = (int32_t *)p;
    p += align64(v * sizeof(int32_t));
    sv.seen = (uint8_t *)p;
    p += align64(v);
    sv.cand = (int32_t *)p;
    p += align64(v * sizeof(int32_t));
    sv.prob = (float *)p;
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

static void apply_penalties(float *logits, int32_t p_vocab, const sample_params *p,
                            const int32_t *prompt, int32_t n_prompt, const int32_t *output,
                            int32_t n_output, scratch_view *sv)
{
    int rep = p->repetition_penalty != 1.0f;
    int pres = p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
    if (rep && n_prompt + n_output > 0) memset(sv->seen, 0, (size_t)p_vocab);
    if (pres && n_output > 0) memset(sv->counts, 0, (size_t)p_vocab * sizeof(int32_t));
    if (rep) {
        /* each id once, even if it appears many times */
        for (int pass = 0; pass < 2; pass++) {
            const int32_t *ids = pass ? output : prompt;
            int32_t n = pass ? n_output : n_prompt;
            for (int32_t i = 0; i < n; i++) {
                int32_t t = ids[i];
                if (sv->seen[t]) continue;
                sv->seen[t] = 1;
                float l = logits[t];
                logits[t] = l > 0.0f ? l / p->repetition_penalty : l * p->repetition_penalty;
            }
        }
    }
    if (pres) {
        for (int32_t i = 0; i < n_output; i++)
            sv->counts[output[i]]++;
        for (int32_t i = 0; i < n_output; i++) {
            int32_t t = output[i];
            int32_t c = sv->counts[t];
            if (c == 0) continue; /* already applied for this id */
            logits[t] -= p->frequency_penalty * (float)c + p->presence_penalty;
            sv->counts[t] = 0;
        }
    }
}

/* ---- helpers ------------------------------------------------------------ */

/* Candidate order: probability descending, then id ascending. */
static void cand_sort(int32_t *cand, float *prob, int32_t n);

static int cand_before(float pa, int32_t ia, float pb, int32_t ib)
{
    return pa > pb || (pa == pb && ia < ib);
}

/* Quickselect: rearrange so the k best (cand_before order) are first. */
static void cand_select(int32_t *cand, float *prob, int32_t n, int32_t k)
{
    int32_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        float pp = prob[mid];
        int32_t pi = cand[mid];
        int32_t i = lo, j = hi;
        while (i <= j) {
            while (cand_before(prob[i], cand[i], pp, pi))
                i++;
            while (cand_before(pp, pi, prob[j], cand[j]))
                j--;
            if (i <= j) {
                float tp = prob[i];
                prob[i] = prob[j];
                prob[j] = tp;
                int32_t ti = cand[i];
                cand[i] = cand[j];
                cand[j] = ti;
                i++;
                j--;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
}

/* Heap sort (no allocation, O(n log n) worst case, deterministic). */
static void sift_down(int32_t *cand, float *prob, int32_t root, int32_t n)
{
    for (;;) {
        int32_t child = 2 * root + 1;
        if (child >= n) return;
        /* heap property: a parent comes before (is better than) its children */
        if (child + 1 < n &&
            cand_before(prob[child + 1], cand[child + 1], prob[child], cand[child]))
            child++;
        if (!cand_before(prob[child], cand[child], prob[root], cand[root])) return;
        float tp = prob[root];
        prob[root] = prob[child];
        prob[child] = tp;
        int32_t ti = cand[root];
        cand[root] = cand[child];
        cand[child] = ti;
        root = child;
    }
}

static void cand_sort(int32_t *cand, float *prob, int32_t n)
{
    /* heap sort with the best at the root leaves the array worst first */
    for (int32_t i = n / 2 - 1; i >= 0; i--)
        sift_down(cand, prob, i, n);
    for (int32_t end = n - 1; end > 0; end--) {
        float tp = prob[0];
        prob[0] = prob[end];
        prob[end] = tp;
        int32_t ti = cand[0];
        cand[0] = cand[end];
        cand[end] = ti;
        sift_down(cand, prob, 0, end);
    }
    for (int32_t i = 0, j = n - 1; i < j; i++, j--) {
        float tp = prob[i];
        prob[i] = prob[j];
        prob[j] = tp;
        int32_t ti = cand[i];
        cand[i] = cand[j];
        cand[j] = ti;
    }
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
    if (p->temperature > 0.0f && !rng)
        return lm_err_set(err, -EINVAL, "sample_pick: temperature %g needs an rng",
                          (double)p->temperature);
    if (n_prompt < 0 || n_output < 0 || (n_prompt && !prompt) || (n_output && !output))
        return lm_err_set(err, -EINVAL, "sample_pick: bad prompt/output id lists");
    if ((rc = check_ids(prompt, n_prompt, vocab, "prompt", err)) ||
        (rc = check_ids(output, n_output, vocab, "output", err)))
        return rc;

    scratch_view sv = scratch_carve(scratch, vocab);
    apply_penalties(logits, vocab, p, prompt, n_prompt, output, n_output, &sv);

    /* max and validity; NaN or +inf is a backend bug reported as an error */
    float mx = -INFINITY;
    int32_t arg = -1;
    for (int32_t t = 0; t < vocab; t++) {
        float l = logits[t];
        if (isnan(l) || l == INFINITY)
            return lm_err_set(err, -EINVAL, "sample_pick: logit of token %d is %g", t, (double)l);
        if (l > mx) {
            mx = l;
            arg = t;
        }
    }
    if (arg < 0) return lm_err_set(err, -EINVAL, "sample_pick: every logit is -inf");

    if (p->temperature > 0.0f && p->temperature != 1.0f) {
        float inv = 1.0f / p->temperature;
        for (int32_t t = 0; t < vocab; t++)
            logits[t] *= inv;
        mx *= inv;
    }
    /* log-sum-exp of the (penalised, tempered) distribution */
    double sum = 0.0;
    for (int32_t t = 0; t < vocab; t++)
        sum += exp((double)logits[t] - (double)mx);
    double lse = (double)mx + log(sum);

    memset(ret, 0, sizeof *ret);
    int32_t tok;
    if (p->temperature == 0.0f) {
        tok = arg; /* first maximum: lowest id on ties */
    } else {
        /* candidates with their probabilities under the full softmax */
        int32_t n = 0;
        double thr = 0.0;
        if (p->top_k == 0 && p->top_p < 1.0f) thr = (1.0 - (double)p->top_p) / (double)vocab;
        for (int32_t t = 0; t < vocab; t++) {
            double pr = exp((double)logits[t] - lse);
            if (pr > 0.0 && pr >= thr) {
                sv.cand[n] = t;
                sv.prob[n] = (float)pr;
                n++;
            }
        }
        if (n == 0) { /* every probability underflowed but the max: keep it */
            sv.cand[0] = arg;
            sv.prob[0] = 1.0f;
            n = 1;
        }
        int filtering = p->top_k > 0 || p->top_p < 1.0f || p->min_p > 0.0f;
        if (filtering) {
            if (p->top_k > 0 && p->top_k < n) {
                cand_select(sv.cand, sv.prob, n, p->top_k);
                n = p->top_k;
            }
            cand_sort(sv.cand, sv.prob, n);
            if (p->top_p < 1.0f) {
                /* nucleus over the mass left after top_k (renormalised) */
                double mass = 0.0;
                for (int32_t i = 0; i < n; i++)
                    mass += sv.prob[i];
                double cum = 0.0, target = (double)p->top_p * mass;
                int32_t keep = n;
                for (int32_t i = 0; i < n; i++) {
                    cum += sv.prob[i];
                    if (cum >= target) {
                        keep = i + 1;
                        break;
                    }
                }
                n = keep;
            }
            if (p->min_p > 0.0f) {
                float floor_p = p->min_p * sv.prob[0];
                int32_t keep = 1;
                while (keep < n && sv.prob[keep] >= floor_p)
                    keep++;
                n = keep;
            }
        }
        double mass = 0.0;
        for (int32_t i = 0; i < n; i++)
            mass += sv.prob[i];
        double u = sample_rng_uniform(rng) * mass;
        tok = sv.cand[n - 1];
        double cum = 0.0;
        for (int32_t i = 0; i < n; i++) {
            cum += sv.prob[i];
            if (u < cum) {
                tok = sv.cand[i];
                break;
            }
        }
    }
    ret->token = tok;
    ret->logprob = (float)((double)logits[tok] - lse);
    fill_top(logits, vocab, lse, p->logprobs, ret);
    return 0;
}
