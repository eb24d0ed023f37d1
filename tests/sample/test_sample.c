/*
 * test_sample.c: the sampler (engine/sample.h) checked against its
 * contract. Distributions are checked statistically with fixed seeds:
 * filters must never let a token outside their set through over many
 * draws, and frequencies inside the set must match the renormalised
 * probabilities within a chi-square bound (p = 0.001). Fixed seeds make
 * the test deterministic; the bounds are the ones a correct sampler passes
 * for all but 1 seed in 1000, so a wrong renormalisation fails it.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sample.h"

#include "tests/check_msg.h"

static void *scratch_for(int32_t vocab)
{
    /* deliberately not zeroed: the sampler must not rely on it */
    size_t n = sample_scratch_bytes(vocab);
    unsigned char *s = malloc(n);
    memset(s, 0xA5, n);
    return s;
}

/* logits = log(probs): softmax gives probs back exactly (up to rounding). */
static void logits_from_probs(float *logits, const double *probs, int32_t n)
{
    for (int32_t i = 0; i < n; i++)
        logits[i] = probs[i] > 0 ? (float)log(probs[i]) : -INFINITY;
}

/* Draw `draws` tokens; counts[vocab]. Returns 0 or the first error code. */
static int draw_many(const double *probs, int32_t vocab, const sample_params *p, uint64_t seed,
                     int draws, long *counts)
{
    sample_rng rng;
    sample_rng_seed(&rng, seed);
    void *scratch = scratch_for(vocab);
    float *logits = malloc(sizeof(float) * (size_t)vocab);
    memset(counts, 0, sizeof(long) * (size_t)vocab);
    int rc = 0;
    for (int d = 0; d < draws && !rc; d++) {
        logits_from_probs(logits, probs, vocab);
        sample_result r;
        lm_err err = {0};
        rc = sample_pick(logits, vocab, p, &rng, NULL, 0, NULL, 0, scratch, &r, &err);
        if (rc)
            fprintf(stderr, "sample_pick: %s\n", err.msg);
        else
            counts[r.token]++;
    }
    free(logits);
    free(scratch);
    return rc;
}

/* Chi-square of counts over the tokens in `allowed` against probs
 * renormalised over that set. */
static double chi_square(const long *counts, const double *probs, const int *allowed, int32_t vocab,
                         long total)
{
    double mass = 0;
    for (int32_t i = 0; i < vocab; i++)
        if (allowed[i]) mass += probs[i];
    double chi = 0;
    for (int32_t i = 0; i < vocab; i++) {
        if (!allowed[i]) continue;
        double e = (double)total * probs[i] / mass;
        chi += ((double)counts[i] - e) * ((double)counts[i] - e) / e;
    }
    return chi;
}

/* chi-square critical values at p = 0.001 for df = 1..6 */
static const double CHI_001[] = {0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46};

static void expect_bad(const sample_params *p, const char *field)
{
    lm_err err = {0};
    int rc = sample_params_check(p, &err);
    CHECK(rc == -EINVAL, "%s: expected -EINVAL, got %d", field, rc);
    CHECK(strstr(err.msg, field) != NULL, "message '%s' does not name %s", err.msg, field);
}

static void test_params(void)
{
    sample_params p;
    sample_params_default(&p);
    lm_err err = {0};
    CHECK(sample_params_check(&p, &err) == 0, "defaults rejected: %s", err.msg);
    CHECK(p.temperature == 0 && p.top_p == 1 && p.top_k == 0 && p.min_p == 0 &&
              p.repetition_penalty == 1 && p.presence_penalty == 0 && p.frequency_penalty == 0 &&
              p.logprobs == 0,
          "defaults not greedy with filters off");
    sample_params q;
#define BAD(field_, value_)                                                                        \
    do {                                                                                           \
        q = p;                                                                                     \
        q.field_ = value_;                                                                         \
        expect_bad(&q, #field_);                                                                   \
    } while (0)
    BAD(temperature, -0.5f);
    BAD(temperature, NAN);
    BAD(temperature, INFINITY);
    BAD(top_k, -1);
    BAD(top_p, 0.0f);
    BAD(top_p, 1.5f);
    BAD(top_p, NAN);
    BAD(min_p, -0.1f);
    BAD(min_p, 1.1f);
    BAD(repetition_penalty, 0.0f);
    BAD(repetition_penalty, -1.0f);
    BAD(presence_penalty, 2.5f);
    BAD(frequency_penalty, -2.5f);
    BAD(logprobs, -1);
    BAD(logprobs, SAMPLE_MAX_LOGPROBS + 1);
#undef BAD
    /* sample_pick refuses bad params too, with the same message */
    float logits[3] = {0, 1, 2};
    void *scratch = scratch_for(3);
    sample_result r;
    q = p;
    q.top_p = 2;
    int rc = sample_pick(logits, 3, &q, NULL, NULL, 0, NULL, 0, scratch, &r, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "top_p"), "sample_pick accepted top_p 2: %s", err.msg);
    /* ids outside the vocabulary, NaN logits, all -inf */
    int32_t badid = 7;
    rc = sample_pick(logits, 3, &p, NULL, &badid, 1, NULL, 0, scratch, &r, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "prompt token 7"), "bad prompt id: %d %s", rc, err.msg);
    rc = sample_pick(logits, 3, &p, NULL, NULL, 0, &badid, 1, scratch, &r, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "output token 7"), "bad output id: %d %s", rc, err.msg);
    logits[1] = NAN;
    rc = sample_pick(logits, 3, &p, NULL, NULL, 0, NULL, 0, scratch, &r, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "token 1"), "NaN logit: %d %s", rc, err.msg);
    logits[0] = logits[1] = logits[2] = -INFINITY;
    rc = sample_pick(logits, 3, &p, NULL, NULL, 0, NULL, 0, scratch, &r, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "-inf"), "all -inf: %d %s", rc, err.msg);
    q = p;
    q.temperature = 1;
    logits[0] = logits[1] = logits[2] = 0;
    rc = sample_pick(logits, 3, &q, NULL, NULL, 0, NULL, 0, scratch, &r, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "rng"), "no rng: %d %s", rc, err.msg);
    free(scratch);
}

static void test_rng(void)
{
    sample_rng a, b, c;
    sample_rng_seed(&a, 42);
    sample_rng_seed(&b, 42);
    sample_rng_seed(&c, 43);
    int same_c = 0;
    for (int i = 0; i < 1000; i++) {
        uint64_t x = sample_rng_next(&a), y = sample_rng_next(&b), z = sample_rng_next(&c);
        CHECK(x == y, "same seed diverged at %d", i);
        same_c += x == z;
    }
    CHECK(same_c == 0, "seeds 42 and 43 gave %d equal outputs", same_c);
    double mean = 0;
    for (int i = 0; i < 100000; i++) {
        double u = sample_rng_uniform(&a);
        CHECK(u >= 0 && u < 1, "uniform %g outside [0,1)", u);
        mean += u;
    }
    mean /= 100000;
    /* sd of the mean = 1/sqrt(12 * 1e5) ~ 0.0009; 5 sd */
    CHECK(fabs(mean - 0.5) < 0.0046, "uniform mean %g", mean);
}

static void test_greedy(void)
{
    sample_params p;
    sample_params_default(&p);
    void *scratch = scratch_for(6);
    float logits[6] = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f, -INFINITY};
    sample_result r;
    lm_err err = {0};
    /* filters are ignored at temperature 0, and no rng is needed */
    p.top_k = 1;
    p.top_p = 0.1f;
    p.min_p = 0.9f;
    int rc = sample_pick(logits, 6, &p, NULL, NULL, 0, NULL, 0, scratch, &r, &err);
    CHECK(rc == 0 && r.token == 1, "greedy tie: rc %d token %d (want lowest id 1)", rc, r.token);
    /* logprob of the unscaled distribution */
    double lse = 0;
    for (int i = 0; i < 5; i++)
        lse += exp((double)logits[i]);
    lse = log(lse);
    CHECK(fabs(r.logprob - (3.0 - lse)) < 1e-5, "greedy logprob %g want %g", r.logprob, 3.0 - lse);
    free(scratch);
}

static void test_same_seed(void)
{
    enum { V = 50 };
    double probs[V];
    double s = 0;
    for (int i = 0; i < V; i++)
        s += probs[i] = 1.0 / (1 + i);
    for (int i = 0; i < V; i++)
        probs[i] /= s;
    sample_params p;
    sample_params_default(&p);
    p.temperature = 0.8f;
    p.top_p = 0.9f;
    void *scratch = scratch_for(V);
    int32_t seq[3][64];
    uint64_t seeds[3] = {7, 7, 8};
    for (int k = 0; k < 3; k++) {
        sample_rng rng;
        sample_rng_seed(&rng, seeds[k]);
        for (int i = 0; i < 64; i++) {
            float logits[V];
            logits_from_probs(logits, probs, V);
            sample_result r;
            int rc = sample_pick(logits, V, &p, &rng, NULL, 0, seq[k], i, scratch, &r, NULL);
            CHECK(rc == 0, "pick failed");
            seq[k][i] = r.token;
        }
    }
    CHECK(memcmp(seq[0], seq[1], sizeof seq[0]) == 0, "same seed, different sequences");
    CHECK(memcmp(seq[0], seq[2], sizeof seq[0]) != 0, "seeds 7 and 8 gave the same 64 tokens");
    free(scratch);
}

static void test_plain_distribution(void)
{
    double probs[3] = {0.5, 0.3, 0.2};
    long counts[3];
    sample_params p;
    sample_params_default(&p);
    p.temperature = 1.0f;
    const int N = 30000;
    CHECK(draw_many(probs, 3, &p, 1234, N, counts) == 0, "draws failed");
    int all[3] = {1, 1, 1};
    double chi = chi_square(counts, probs, all, 3, N);
    CHECK(chi < CHI_001[2], "3-token chi-square %g >= %g (counts %ld %ld %ld)", chi, CHI_001[2],
          counts[0], counts[1], counts[2]);
    /* a sampler that ignores the distribution must fail the same bound */
    double wrong[3] = {1.0 / 3, 1.0 / 3, 1.0 / 3};
    double chi_wrong = chi_square(counts, wrong, all, 3, N);
    CHECK(chi_wrong > CHI_001[2], "chi-square cannot tell uniform from the truth (%g)", chi_wrong);
}

static void test_temperature(void)
{
    double probs[3] = {0.5, 0.3, 0.2};
    long counts[3];
    sample_params p;
    sample_params_default(&p);
    const int N = 30000;
    int all[3] = {1, 1, 1};
    /* temperature T: p_i^(1/T) renormalised */
    float temps[2] = {0.5f, 2.0f};
    for (int k = 0; k < 2; k++) {
        p.temperature = temps[k];
        double tp[3], s = 0;
        for (int i = 0; i < 3; i++)
            s += tp[i] = pow(probs[i], 1.0 / temps[k]);
        for (int i = 0; i < 3; i++)
            tp[i] /= s;
        CHECK(draw_many(probs, 3, &p, 99 + (uint64_t)k, N, counts) == 0, "draws failed");
        double chi = chi_square(counts, tp, all, 3, N);
        CHECK(chi < CHI_001[2], "T=%g chi-square %g (counts %ld %ld %ld)", (double)temps[k], chi,
              counts[0], counts[1], counts[2]);
    }
    /* logits are scaled in place and logprobs follow the tempered softmax */
    float logits[3];
    logits_from_probs(logits, probs, 3);
    float orig0 = logits[0];
    p.temperature = 0.5f;
    p.logprobs = 3;
    sample_rng rng;
    sample_rng_seed(&rng, 1);
    void *scratch = scratch_for(3);
    sample_result r;
    CHECK(sample_pick(logits, 3, &p, &rng, NULL, 0, NULL, 0, scratch, &r, NULL) == 0, "pick");
    CHECK(fabsf(logits[0] - orig0 / 0.5f) < 1e-6f, "logits not tempered in place");
    double s = 0.25 + 0.09 + 0.04;
    CHECK(r.n_top == 3 && r.top_ids[0] == 0 && r.top_ids[1] == 1 && r.top_ids[2] == 2,
          "top ids order");
    CHECK(fabs(r.top_logprobs[0] - log(0.25 / s)) < 1e-5 &&
              fabs(r.top_logprobs[2] - log(0.04 / s)) < 1e-5,
          "tempered logprobs %g %g", r.top_logprobs[0], r.top_logprobs[2]);
    free(scratch);
}

/* Filtered draws: never outside `allowed`, frequencies match inside. */
static void check_filter(const char *name, const double *probs, int32_t vocab,
                         const sample_params *p, const int *allowed, uint64_t seed)
{
    const int N = 20000;
    long *counts = malloc(sizeof(long) * (size_t)vocab);
    CHECK(draw_many(probs, vocab, p, seed, N, counts) == 0, "%s: draws failed", name);
    int df = -1;
    for (int32_t i = 0; i < vocab; i++) {
        if (allowed[i]) {
            df++;
            CHECK(counts[i] > 0, "%s: allowed token %d never drawn", name, i);
        } else {
            CHECK(counts[i] == 0, "%s: token %d outside the set drawn %ld times", name, i,
                  counts[i]);
        }
    }
    if (df >= 1 && df <= 6) {
        double chi = chi_square(counts, probs, allowed, vocab, N);
        CHECK(chi < CHI_001[df], "%s: chi-square %g >= %g", name, chi, CHI_001[df]);
    }
    free(counts);
}

static void test_filters(void)
{
    /* sorted by id for readability; token 3 is the largest */
    double probs[8] = {0.20, 0.05, 0.10, 0.30, 0.15, 0.12, 0.05, 0.03};
    sample_params p;
    sample_params_default(&p);
    p.temperature = 1.0f;

    sample_params q = p;
    q.top_k = 3; /* 3 (0.30), 0 (0.20), 4 (0.15) */
    int k3[8] = {1, 0, 0, 1, 1, 0, 0, 0};
    check_filter("top_k=3", probs, 8, &q, k3, 11);

    q = p;
    q.top_p = 0.6f; /* 0.30 + 0.20 = 0.50 < 0.6, + 0.15 = 0.65 >= 0.6 */
    check_filter("top_p=0.6", probs, 8, &q, k3, 12);

    q = p;
    q.top_p = 0.45f; /* crossed by 0.30 + 0.20: the crossing token is kept, no more */
    int p045[8] = {1, 0, 0, 1, 0, 0, 0, 0};
    check_filter("top_p=0.45", probs, 8, &q, p045, 13);

    q = p;
    q.top_p = 0.1f; /* the top token alone */
    int top1[8] = {0, 0, 0, 1, 0, 0, 0, 0};
    check_filter("top_p=0.1", probs, 8, &q, top1, 14);

    q = p;
    q.min_p = 0.35f; /* floor 0.105: 3, 0, 4, 5 (0.12) but not 2 (0.10) */
    int m035[8] = {1, 0, 0, 1, 1, 1, 0, 0};
    check_filter("min_p=0.35", probs, 8, &q, m035, 15);

    q = p;
    q.top_k = 4;     /* 3, 0, 4, 5 with mass 0.77 */
    q.top_p = 0.75f; /* of the renormalised: 0.30/.77=.39, +.26=.65, +.19=.84 -> 3, 0, 4 */
    check_filter("top_k=4,top_p=0.75", probs, 8, &q, k3, 16);

    q = p;
    q.top_k = 100; /* larger than the vocabulary: no filter */
    int all[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    check_filter("top_k=100", probs, 8, &q, all, 17);

    q = p;
    q.top_k = 1; /* at temperature > 0 still the argmax only */
    check_filter("top_k=1", probs, 8, &q, top1, 18);
}

/* Large vocabulary: the nucleus pre-filter must not change the set. */
static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void test_large_vocab_top_p(void)
{
    enum { V = 16000 };
    double *probs = malloc(sizeof(double) * V);
    double *sorted = malloc(sizeof(double) * V);
    sample_rng g;
    sample_rng_seed(&g, 5);
    double s = 0;
    for (int i = 0; i < V; i++) {
        /* heavy-tailed: a few large, many tiny */
        double u = sample_rng_uniform(&g);
        probs[i] = exp(12.0 * u * u * u);
        s += probs[i];
    }
    for (int i = 0; i < V; i++)
        sorted[i] = probs[i] /= s;
    qsort(sorted, V, sizeof(double), cmp_desc);
    double cum = 0, cutoff = 0;
    for (int i = 0; i < V; i++) {
        cum += sorted[i];
        if (cum >= 0.8) {
            cutoff = sorted[i];
            break;
        }
    }
    sample_params p;
    sample_params_default(&p);
    p.temperature = 1.0f;
    p.top_p = 0.8f;
    long *counts = malloc(sizeof(long) * V);
    CHECK(draw_many(probs, V, &p, 21, 1500, counts) == 0, "draws");
    long outside = 0;
    for (int i = 0; i < V; i++)
        if (probs[i] < cutoff * 0.999999) outside += counts[i];
    CHECK(outside == 0, "large vocab top_p: %ld draws outside the nucleus", outside);
    /* top_k over the large vocabulary: only the k most probable */
    p.top_p = 1.0f;
    p.top_k = 100;
    double kth = sorted[99];
    CHECK(draw_many(probs, V, &p, 22, 1500, counts) == 0, "draws");
    outside = 0;
    for (int i = 0; i < V; i++)
        if (probs[i] < kth * 0.999999) outside += counts[i];
    CHECK(outside == 0, "large vocab top_k: %ld draws outside the top 100", outside);

    /* a flat distribution: the nucleus is most of the vocabulary */
    s = 0;
    for (int i = 0; i < V; i++)
        s += probs[i] = 1.0 + 0.5 * sample_rng_uniform(&g);
    for (int i = 0; i < V; i++)
        probs[i] /= s;
    memcpy(sorted, probs, sizeof(double) * V);
    qsort(sorted, V, sizeof(double), cmp_desc);
    cum = 0;
    for (int i = 0; i < V; i++) {
        cum += sorted[i];
        if (cum >= 0.5) {
            cutoff = sorted[i];
            break;
        }
    }
    p.top_k = 0;
    p.top_p = 0.5f;
    CHECK(draw_many(probs, V, &p, 23, 1500, counts) == 0, "draws");
    outside = 0;
    for (int i = 0; i < V; i++)
        if (probs[i] < cutoff * 0.9999) outside += counts[i];
    CHECK(outside == 0, "flat top_p: %ld draws outside the nucleus", outside);
    free(probs);
    free(sorted);
    free(counts);
}

static void test_penalties(void)
{
    sample_params p;
    sample_params_default(&p);
    void *scratch = scratch_for(5);
    sample_result r;
    lm_err err = {0};

    /* repetition: divide positive, multiply negative, once per id */
    float l1[5] = {2.0f, -2.0f, 1.0f, 0.5f, 0.0f};
    int32_t prompt[3] = {0, 1, 0};
    int32_t out[2] = {3, 3};
    p.repetition_penalty = 2.0f;
    CHECK(sample_pick(l1, 5, &p, NULL, prompt, 3, out, 2, scratch, &r, &err) == 0, "%s", err.msg);
    CHECK(l1[0] == 1.0f && l1[1] == -4.0f && l1[2] == 1.0f && l1[3] == 0.25f && l1[4] == 0.0f,
          "repetition: %g %g %g %g %g", l1[0], l1[1], l1[2], l1[3], l1[4]);
    CHECK(r.token == 0, "repetition greedy: token %d, want 0 (tie 1.0 with id 2)", r.token);

    /* presence and frequency: output ids only, frequency times the count */
    float l2[5] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    int32_t out2[4] = {2, 2, 0, 2};
    sample_params_default(&p);
    p.presence_penalty = 0.25f;
    p.frequency_penalty = 0.5f;
    CHECK(sample_pick(l2, 5, &p, NULL, prompt, 3, out2, 4, scratch, &r, &err) == 0, "%s", err.msg);
    CHECK(l2[0] == 0.25f && l2[1] == 1.0f && l2[2] == -0.75f && l2[3] == 1.0f && l2[4] == 1.0f,
          "presence/frequency: %g %g %g %g %g", l2[0], l2[1], l2[2], l2[3], l2[4]);
    CHECK(r.token == 1, "after penalties greedy picks 1, got %d", r.token);

    /* negative presence penalty encourages repetition */
    float l3[5] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    sample_params_default(&p);
    p.presence_penalty = -1.0f;
    CHECK(sample_pick(l3, 5, &p, NULL, NULL, 0, out2, 4, scratch, &r, &err) == 0, "%s", err.msg);
    CHECK(r.token == 0 && l3[0] == 2.0f && l3[2] == 2.0f, "negative presence: token %d", r.token);

    /* scratch reused across calls must not leak counts between them */
    float l4[5] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    sample_params_default(&p);
    p.frequency_penalty = 1.0f;
    int32_t out4[1] = {4};
    CHECK(sample_pick(l4, 5, &p, NULL, NULL, 0, out4, 1, scratch, &r, &err) == 0, "%s", err.msg);
    CHECK(l4[0] == 1.0f && l4[2] == 1.0f && l4[4] == 0.0f, "frequency leak: %g %g %g", l4[0], l4[2],
          l4[4]);
    free(scratch);
}

static void test_logprobs(void)
{
    enum { V = 30 };
    float logits[V];
    sample_rng g;
    sample_rng_seed(&g, 77);
    for (int i = 0; i < V; i++)
        logits[i] = (float)(sample_rng_uniform(&g) * 8 - 4);
    double lse = 0;
    for (int i = 0; i < V; i++)
        lse += exp((double)logits[i]);
    lse = log(lse);
    float copy[V];
    memcpy(copy, logits, sizeof copy);
    sample_params p;
    sample_params_default(&p);
    p.temperature = 1.0f;
    p.top_k = 2; /* filters do not change the reported logprobs */
    p.logprobs = SAMPLE_MAX_LOGPROBS;
    sample_rng rng;
    sample_rng_seed(&rng, 3);
    void *scratch = scratch_for(V);
    sample_result r;
    CHECK(sample_pick(logits, V, &p, &rng, NULL, 0, NULL, 0, scratch, &r, NULL) == 0, "pick");
    CHECK(r.n_top == SAMPLE_MAX_LOGPROBS, "n_top %d", r.n_top);
    CHECK(fabs(r.logprob - (copy[r.token] - lse)) < 1e-5, "chosen logprob %g", r.logprob);
    for (int i = 0; i < r.n_top; i++) {
        int id = r.top_ids[i];
        CHECK(fabs(r.top_logprobs[i] - (copy[id] - lse)) < 1e-5, "top %d logprob", i);
        if (i > 0) CHECK(r.top_logprobs[i] <= r.top_logprobs[i - 1], "top not sorted at %d", i);
        /* nothing outside the list beats its last entry */
    }
    int beaten = 0;
    for (int t = 0; t < V; t++) {
        int in = 0;
        for (int i = 0; i < r.n_top; i++)
            in |= r.top_ids[i] == t;
        if (!in && copy[t] > copy[r.top_ids[r.n_top - 1]]) beaten++;
    }
    CHECK(beaten == 0, "%d tokens outside the top list beat it", beaten);
    free(scratch);
}

/* ---- the exact rule of sample.h, written the slow, obvious way ---------- */

static const float *g_rank_e; /* qsort's context */

static int rank_cmp(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (g_rank_e[x] != g_rank_e[y]) return g_rank_e[x] > g_rank_e[y] ? -1 : 1;
    return (x > y) - (x < y);
}

static int id_cmp(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* sample.h's rule on logits after the penalties: sort everything, cut the
 * prefixes, draw with a 128-bit product */
static int32_t rule_pick(const float *in, int32_t V, const sample_params *p, uint64_t draw)
{
    float *l = malloc(sizeof(float) * (size_t)V), *e = malloc(sizeof(float) * (size_t)V);
    int32_t *ord = malloc(sizeof(int32_t) * (size_t)V);
    uint64_t *w = malloc(sizeof(uint64_t) * (size_t)V);
    memcpy(l, in, sizeof(float) * (size_t)V);
    int32_t arg = 0;
    for (int32_t t = 1; t < V; t++)
        if (l[t] > l[arg]) arg = t;
    int32_t tok = arg;
    if (p->temperature > 0.0f) {
        if (p->temperature != 1.0f) {
            const float inv = 1.0f / p->temperature;
            for (int32_t t = 0; t < V; t++)
                l[t] *= inv;
        }
        const float mx = l[arg];
        const double scale = ldexp(1.0, sample_fixed_shift(V));
        int32_t n = 0;
        for (int32_t t = 0; t < V; t++) {
            e[t] = sample_exp_le0(l[t] - mx);
            w[t] = (uint64_t)((double)e[t] * scale);
            if (w[t] > 0) ord[n++] = t;
        }
        g_rank_e = e;
        qsort(ord, (size_t)n, sizeof *ord, rank_cmp);
        if (p->top_k > 0 && p->top_k < n) n = p->top_k;
        if (p->top_p < 1.0f) {
            uint64_t m1 = 0, acc = 0;
            for (int32_t i = 0; i < n; i++)
                m1 += w[ord[i]];
            uint64_t target = (uint64_t)((double)p->top_p * (double)m1);
            if (target < 1) target = 1;
            int32_t j = 0;
            while (j < n) {
                acc += w[ord[j++]];
                if (acc >= target) break;
            }
            n = j;
        }
        int32_t k = 0;
        for (int32_t i = 0; i < n; i++)
            if (!(p->min_p > 0.0f) || e[ord[i]] >= p->min_p) ord[k++] = ord[i];
        n = k;
        qsort(ord, (size_t)n, sizeof *ord, id_cmp);
        uint64_t m = 0, cum = 0;
        for (int32_t i = 0; i < n; i++)
            m += w[ord[i]];
        const uint64_t u = (uint64_t)(((unsigned __int128)(draw >> 11) * m) >> 53);
        tok = -1;
        for (int32_t i = 0; i < n && tok < 0; i++)
            if ((cum += w[ord[i]]) > u) tok = ord[i];
    }
    free(l);
    free(e);
    free(ord);
    free(w);
    return tok;
}

/* sample_pick against the rule above, and against its own pieces
 * (penalty list, penalties, sample_pick_drawn), on random logits of
 * several shapes: ties, -inf, a flat and a peaked row; every filter
 * alone and together; near-boundary draws (all-ones and zero bits). */
static void test_exact_rule(void)
{
    const int32_t vocabs[] = {1, 2, 7, 100, 5000, 50000, 70001};
    sample_rng g;
    sample_rng_seed(&g, 2026);
    int cases = 0, mismatches = 0, piece_mismatches = 0;
    for (size_t vi = 0; vi < sizeof vocabs / sizeof vocabs[0]; vi++) {
        const int32_t V = vocabs[vi];
        float *logits = malloc(sizeof(float) * (size_t)V), *a = malloc(sizeof(float) * (size_t)V),
              *b = malloc(sizeof(float) * (size_t)V);
        void *scratch = scratch_for(V);
        sample_penalty *pen = malloc(sizeof(sample_penalty) * (size_t)V);
        for (int rep = 0; rep < 40; rep++) {
            const int shape = rep % 4;
            for (int32_t t = 0; t < V; t++) {
                const double u = sample_rng_uniform(&g);
                if (shape == 0) logits[t] = (float)(u * 20 - 10);
                else if (shape == 1) logits[t] = (float)(int)(u * 6); /* many ties */
                else if (shape == 2) logits[t] = (float)(u * 0.01); /* flat */
                else logits[t] = u < 0.1 && t != V / 2 ? -INFINITY : (float)(30 * u * u * u); /* peaked, -inf */
            }
            sample_params p;
            sample_params_default(&p);
            const float temps[] = {0.0f, 0.7f, 1.0f, 1.6f};
            p.temperature = temps[rep % 4 == 3 ? 1 : (rep / 4) % 4];
            p.top_k = (rep / 2) % 3 == 0 ? 0 : (int32_t)(1 + sample_rng_next(&g) % 50);
            p.top_p = (rep / 3) % 2 ? (float)(0.05 + 0.9 * sample_rng_uniform(&g)) : 1.0f;
            p.min_p = (rep / 5) % 3 == 1 ? (float)(0.3 * sample_rng_uniform(&g)) : 0.0f;
            if (rep % 7 == 3) p.top_p = 1e-30f; /* target below one weight unit */
            uint64_t draw = sample_rng_next(&g);
            if (rep % 11 == 5) draw = ~(uint64_t)0;
            if (rep % 11 == 6) draw = 0;
            /* whole pick (through an rng whose next output is `draw`: replay) */
            int32_t prompt[6], out[5];
            for (int i = 0; i < 6; i++)
                prompt[i] = (int32_t)(sample_rng_next(&g) % (uint64_t)V);
            for (int i = 0; i < 5; i++)
                out[i] = (int32_t)(sample_rng_next(&g) % (uint64_t)V);
            if (rep % 3 == 1) {
                p.repetition_penalty = 1.3f;
                p.frequency_penalty = 0.4f;
                p.presence_penalty = -0.2f;
            }
            sample_rng r1, r2;
            sample_rng_seed(&r1, (uint64_t)rep);
            r2 = r1;
            const uint64_t d = sample_rng_next(&r2);
            memcpy(a, logits, sizeof(float) * (size_t)V);
            memcpy(b, logits, sizeof(float) * (size_t)V);
            sample_result ra, rb;
            lm_err err = {0};
            CHECK(sample_pick(a, V, &p, &r1, prompt, 6, out, 5, scratch, &ra, &err) == 0,
                  "pick: %s", err.msg);
            const int32_t n = sample_penalty_list(&p, prompt, 6, out, 5, V, scratch, pen);
            sample_apply_penalties(b, &p, pen, n);
            float *after = malloc(sizeof(float) * (size_t)V);
            memcpy(after, b, sizeof(float) * (size_t)V);
            CHECK(sample_pick_drawn(b, V, &p, p.temperature > 0 ? d : 0, scratch, &rb, &err) == 0,
                  "pick_drawn: %s", err.msg);
            piece_mismatches += ra.token != rb.token || memcmp(a, b, sizeof(float) * (size_t)V);
            /* the rule, with the test's own draw */
            memcpy(b, after, sizeof(float) * (size_t)V);
            CHECK(sample_pick_drawn(b, V, &p, draw, scratch, &rb, &err) == 0, "drawn: %s", err.msg);
            const int32_t want = rule_pick(after, V, &p, draw);
            if (rb.token != want) {
                if (mismatches < 5)
                    fprintf(stderr,
                            "V %d case %d: T %g top_k %d top_p %g min_p %g draw %016llx: "
                            "sampler %d, rule %d\n",
                            V, rep, (double)p.temperature, p.top_k, (double)p.top_p,
                            (double)p.min_p, (unsigned long long)draw, rb.token, want);
                mismatches++;
            }
            free(after);
            cases++;
        }
        free(logits);
        free(a);
        free(b);
        free(pen);
        free(scratch);
    }
    CHECK(mismatches == 0, "%d of %d picks differ from sample.h's rule", mismatches, cases);
    CHECK(piece_mismatches == 0, "%d of %d picks differ from their pieces", piece_mismatches,
          cases);
}

/* Plain draws placed exactly on weight boundaries (the first draw that
 * selects each next token), on rows whose exact total exceeds a double's
 * 2^53 within a block: the sampler's block sums must still be exact.
 * Vocabularies 50000 (shift 46) and 1003 (shift 52). */
static void test_boundary_draws(void)
{
    const int32_t vocabs[] = {50000, 1003};
    int checked = 0, mismatches = 0;
    for (int vi = 0; vi < 2; vi++) {
        const int32_t V = vocabs[vi];
        float *l = malloc(sizeof(float) * (size_t)V), *row = malloc(sizeof(float) * (size_t)V);
        uint64_t *w = malloc(sizeof(uint64_t) * (size_t)V);
        for (int32_t t = 0; t < V; t++) /* e = 1 for most of the first 512, odd low bits */
            l[t] = t >= 512 ? -30.0f : t % 5 ? 0.0f : -20.0f - 0.001f * (float)t;
        const double scale = ldexp(1.0, sample_fixed_shift(V));
        unsigned __int128 m = 0;
        for (int32_t t = 0; t < V; t++) {
            w[t] = (uint64_t)((double)sample_exp_le0(l[t]) * scale);
            m += w[t];
        }
        sample_params p;
        sample_params_default(&p);
        p.temperature = 1.0f;
        void *scratch = scratch_for(V);
        unsigned __int128 cum = 0;
        for (int32_t k = 0; k < V && checked < 400 * (vi + 1); k++) {
            cum += w[k];
            if (!w[k]) continue;
            /* the least draw whose point reaches cum: the token after k */
            const unsigned __int128 a = ((cum << 53) + m - 1) / m;
            if (a >> 53) break;
            const uint64_t draw = (uint64_t)a << 11;
            memcpy(row, l, sizeof(float) * (size_t)V);
            sample_result r;
            lm_err err = {0};
            CHECK(sample_pick_drawn(row, V, &p, draw, scratch, &r, &err) == 0, "%s", err.msg);
            mismatches += r.token != rule_pick(l, V, &p, draw);
            checked++;
        }
        free(l);
        free(row);
        free(w);
        free(scratch);
    }
    CHECK(checked > 100 && mismatches == 0, "%d of %d boundary draws differ from sample.h's rule",
          mismatches, checked);
}

/* The penalty list: each id once, output counts; prompt ids only with a
 * repetition penalty; empty without penalties. */
static void test_penalty_list(void)
{
    void *scratch = scratch_for(10);
    sample_penalty pen[10];
    sample_params p;
    sample_params_default(&p);
    const int32_t prompt[4] = {3, 5, 3, 9}, out[5] = {5, 1, 5, 5, 7};
    CHECK(sample_penalty_list(&p, prompt, 4, out, 5, 10, scratch, pen) == 0, "no penalties");
    p.repetition_penalty = 1.5f;
    int32_t n = sample_penalty_list(&p, prompt, 4, out, 5, 10, scratch, pen);
    CHECK(n == 5, "repetition: %d entries, want 5", n);
    const int32_t want_id[5] = {3, 5, 9, 1, 7}, want_c[5] = {0, 3, 0, 1, 1};
    for (int i = 0; i < n && i < 5; i++)
        CHECK(pen[i].id == want_id[i] && pen[i].count == want_c[i], "entry %d: id %d count %d", i,
              pen[i].id, pen[i].count);
    sample_params_default(&p);
    p.presence_penalty = 0.5f;
    n = sample_penalty_list(&p, prompt, 4, out, 5, 10, scratch, pen);
    CHECK(n == 3 && pen[0].id == 5 && pen[0].count == 3 && pen[1].id == 1 && pen[2].id == 7,
          "presence: %d entries (first id %d count %d)", n, pen[0].id, pen[0].count);
    /* the bound: output ids, plus the prompt's with a repetition penalty, at most the vocabulary */
    CHECK(sample_penalty_list_bound(&p, 4, 5, 10) == 5, "presence bound %d",
          sample_penalty_list_bound(&p, 4, 5, 10));
    p.repetition_penalty = 1.2f;
    CHECK(sample_penalty_list_bound(&p, 4, 5, 10) == 9 && sample_penalty_list_bound(&p, 40, 5, 10) == 10,
          "repetition bound %d / %d", sample_penalty_list_bound(&p, 4, 5, 10),
          sample_penalty_list_bound(&p, 40, 5, 10));
    sample_params_default(&p);
    CHECK(sample_penalty_list_bound(&p, 4, 5, 10) == 0, "no penalties, bound %d",
          sample_penalty_list_bound(&p, 4, 5, 10));
    lm_err err = {0};
    CHECK(sample_pick_error(&err, 7, NAN) == -EINVAL && strstr(err.msg, "logit of token 7 is"),
          "error text: %s", err.msg);
    CHECK(sample_pick_error(&err, -1, -INFINITY) == -EINVAL && strstr(err.msg, "every logit is -inf"),
          "error text: %s", err.msg);
    /* below SAMPLE_MIN_TEMPERATURE: greedy, no draw taken, logits untouched */
    {
        float l[4] = {1.0f, 3.0f, 3.0f, -2.0f};
        sample_params q;
        sample_params_default(&q);
        q.temperature = 1e-6f;
        sample_rng r1, r2;
        sample_rng_seed(&r1, 9);
        r2 = r1;
        sample_result res;
        void *sc = scratch_for(4);
        CHECK(sample_pick(l, 4, &q, &r1, NULL, 0, NULL, 0, sc, &res, &err) == 0 && res.token == 1 &&
                  l[1] == 3.0f && sample_rng_next(&r1) == sample_rng_next(&r2) && !sample_draws(&q),
              "temperature 1e-6: token %d, logit %g", res.token, (double)l[1]);
        /* a logit that the temperature makes infinite: refused, naming it */
        float big[3] = {1.0f, 3e38f, 2.0f};
        q.temperature = 0.5f;
        CHECK(sample_pick(big, 3, &q, &r1, NULL, 0, NULL, 0, sc, &res, &err) == -EINVAL &&
                  strstr(err.msg, "logit of token 1 is inf"),
              "overflow after the temperature: %s", err.msg);
        free(sc);
    }
    CHECK(sample_fixed_shift(1) == 62 && sample_fixed_shift(2) == 61 &&
              sample_fixed_shift(151936) == 44 && sample_fixed_shift(131072) == 45,
          "fixed shift: %d %d %d %d", sample_fixed_shift(1), sample_fixed_shift(2),
          sample_fixed_shift(151936), sample_fixed_shift(131072));
    free(scratch);
}

int main(void)
{
    test_params();
    test_rng();
    test_greedy();
    test_same_seed();
    test_plain_distribution();
    test_temperature();
    test_filters();
    test_large_vocab_top_p();
    test_penalties();
    test_logprobs();
    test_penalty_list();
    test_exact_rule();
    test_boundary_draws();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("sample: all checks passed\n");
    return 0;
}
