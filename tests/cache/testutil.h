/*
 * testutil.h: tiny helpers shared by the cache tests: CHECK, a request
 * builder and a deterministic "engine" (compute) whose answer depends on
 * the prompt and the sampling parameters, so that a wrong hit is visible.
 */
#ifndef LIGHTMOE_TEST_CACHE_UTIL_H
#define LIGHTMOE_TEST_CACHE_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache/cache.h"

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

#define CHECK_MSG(cond, ...)                                                     \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                        \
            fputc('\n', stderr);                                                 \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

static inline void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, 0);
}

/* A request's inputs kept together (arrays inside, so copies are safe). */
typedef struct treq {
    char fp[32];
    int32_t prompt[64];
    int32_t n_prompt;
    sample_params sp;
    int32_t max_tokens;
    cache_mode mode;
    uint32_t ttl_s;
} treq;

static inline void treq_init(treq *t, const char *fp, int seed_tokens, int32_t n_prompt)
{
    memset(t, 0, sizeof *t);
    snprintf(t->fp, sizeof t->fp, "%s", fp);
    t->n_prompt = n_prompt;
    for (int32_t i = 0; i < n_prompt; i++)
        t->prompt[i] = seed_tokens * 1000 + i;
    t->sp.top_p = 1.0f; /* greedy, filters off (as sample_params_default) */
    t->sp.repetition_penalty = 1.0f;
    t->max_tokens = 16;
}

static inline int treq_key(const cache *c, const treq *t, cache_key *k)
{
    cache_request r;
    memset(&r, 0, sizeof r);
    r.model_fp = t->fp;
    r.prompt = t->prompt;
    r.n_prompt = t->n_prompt;
    r.max_tokens = t->max_tokens;
    r.sampling = &t->sp;
    r.mode = t->mode;
    r.ttl_s = t->ttl_s;
    lm_err e;
    lm_err_clear(&e);
    int rc = cache_key_make(c, &r, k, &e);
    if (rc)
        fprintf(stderr, "key: %s\n", e.msg);
    return rc;
}

/* The fake engine: answer from prompt and parameters. Buffers in *st. */
typedef struct tanswer {
    char text[128];
    int32_t tokens[8];
    cache_entry e;
} tanswer;

static inline void compute(const treq *t, tanswer *a)
{
    long sum = 0;
    for (int32_t i = 0; i < t->n_prompt; i++)
        sum += t->prompt[i];
    snprintf(a->text, sizeof a->text, "ans %s %ld t=%.2f k=%d max=%d", t->fp, sum,
             (double)t->sp.temperature, t->sp.top_k, t->max_tokens);
    for (int i = 0; i < 8; i++)
        a->tokens[i] = (int32_t)((sum + i) % 50000);
    memset(&a->e, 0, sizeof a->e);
    a->e.text = a->text;
    a->e.text_len = strlen(a->text);
    a->e.tokens = a->tokens;
    a->e.n_tokens = 8;
    a->e.prompt = t->prompt;
    a->e.n_prompt = t->n_prompt;
    a->e.finish = 2;
    a->e.prompt_tokens = t->n_prompt;
    a->e.completion_tokens = 8;
}

static inline int same_answer(const cache_entry *e, const tanswer *a)
{
    return e->text_len == a->e.text_len && !memcmp(e->text, a->text, e->text_len) &&
           e->n_tokens == 8 && !memcmp(e->tokens, a->tokens, sizeof a->tokens) &&
           e->finish == 2 && e->completion_tokens == 8;
}

static inline int64_t ms_from_now(int ms) { return cache_now_ns() + (int64_t)ms * 1000000; }

/* get -> compute -> put, as the daemon does; returns 1 on a hit. */
static inline int serve(cache *c, const treq *t, int64_t deadline_ns)
{
    cache_key k;
    CHECK(treq_key(c, t, &k) == 0);
    cache_entry *e = NULL;
    tanswer a;
    compute(t, &a);
    if (cache_get(c, &k, deadline_ns, &e) == 1) {
        CHECK_MSG(same_answer(e, &a), "wrong cached answer '%s' for '%s'", e->text, a.text);
        cache_entry_free(e);
        return 1;
    }
    cache_put(c, &k, &a.e, deadline_ns);
    return 0;
}

static inline void test_invalidate(cache *c)
{
    /* prefix_tokens is 4 in make(): test L >= N and L < N. */
    treq a, b, o;
    treq_init(&a, "inv-m", 3, 10);
    b = a;
    b.prompt[6] = 1; /* shares the first 6 tokens with a */
    treq_init(&o, "inv-other", 3, 10);
    CHECK(serve(c, &a, 0) == 0 && serve(c, &b, 0) == 0 && serve(c, &o, 0) == 0);
    uint64_t n;
    lm_err e;
    /* Prefix of 8 tokens: only a. */
    CHECK(cache_invalidate(c, "inv-m", a.prompt, 8, ms_from_now(2000), &n, &e) == 0 && n == 1);
    CHECK(serve(c, &b, 0) == 1 && serve(c, &o, 0) == 1);
    CHECK(serve(c, &a, 0) == 0);
    /* Prefix of 2 tokens (< N): both a and b, not the other model. */
    CHECK(cache_invalidate(c, "inv-m", a.prompt, 2, ms_from_now(2000), &n, &e) == 0 && n == 2);
    CHECK(serve(c, &o, 0) == 1);
    CHECK(serve(c, &a, 0) == 0 && serve(c, &b, 0) == 0);
    /* Whole model. */
    CHECK(cache_invalidate(c, "inv-m", NULL, 0, ms_from_now(2000), &n, &e) == 0 && n == 2);
    CHECK(serve(c, &o, 0) == 1);
    CHECK(cache_invalidate(c, "inv-other", NULL, 0, ms_from_now(2000), &n, &e) == 0 && n == 1);
    /* One entry by its key. */
    cache_key k;
    CHECK(serve(c, &a, 0) == 0 && serve(c, &b, 0) == 0 && treq_key(c, &a, &k) == 0);
    CHECK(cache_delete(c, &k, ms_from_now(2000), &e) == 1);
    CHECK(cache_delete(c, &k, ms_from_now(2000), &e) == 0);
    CHECK(serve(c, &b, 0) == 1 && serve(c, &a, 0) == 0);
}

#endif
