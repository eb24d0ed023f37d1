/*
 * fake_harness.h: what the tests over the fake backend share: the
 * vocabulary and context of their fake model, a small scheduler config,
 * the end-of-test idle checks (no KV block used, no protocol error, the
 * device's sampling used where the backend offers it) and
 * the comparison of a request's output with fake_reference().
 */
#ifndef TESTS_SCHED_FAKE_HARNESS_H
#define TESTS_SCHED_FAKE_HARNESS_H

#include "tests/sched/fake_backend.h"
#include "tests/sched/harness.h"

#define VOCAB 61
#define CTX 512

static inline void base_config(sched_config *c)
{
    sched_config_default(c);
    c->block_size = 4;
    c->kv_bytes = (size_t)256 * 4 * 1024; /* 256 blocks of 4 tokens at 1 KiB/token */
    c->max_running = 8;
    c->max_queue = 64;
    c->max_step_tokens = 64;
    c->min_step_tokens = 8;
    c->prefill_chunk = 16;
    c->target_itl_ms = 0;
    c->idle_tick_ms = 5;
}

static inline sched *start(fake_backend *fb, const sched_config *cfg)
{
    sched *s = NULL;
    lm_err err = {0};
    int rc = sched_create(&fb->base, cfg, &s, &err);
    CHECK(rc == 0, "sched_create: %d %s", rc, err.msg);
    return s;
}

/* The end-of-test checks on a scheduler that is idle. */
static inline void check_idle(sched *s, fake_backend *fb, const char *where)
{
    sched_stats st;
    for (int i = 0; i < 200; i++) { /* stats are published after the step */
        sched_get_stats(s, &st);
        if (!st.running && !st.waiting && !st.kv_blocks_used)
            break;
        h_sleep_ms(1);
    }
    CHECK(st.running == 0 && st.waiting == 0, "%s: running %d waiting %d", where, st.running,
          st.waiting);
    CHECK(st.kv_blocks_used == 0, "%s: %d KV blocks still used (leak)", where, st.kv_blocks_used);
    CHECK(st.kv_blocks_cached <= st.kv_blocks_total, "%s: cached %d of %d", where,
          st.kv_blocks_cached, st.kv_blocks_total);
    CHECK(fb->protocol_errors == 0, "%s: backend: %s", where, fb->first_error);
    CHECK(!fb->device_sampling || fb->pick_forwards > 0, "%s: no step sampled on the device",
          where);
}

static inline void fill_prompt(int32_t *p, int32_t n, uint64_t seed)
{
    for (int32_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (int32_t)((seed >> 33) % VOCAB);
    }
}

static inline void check_output(const fake_backend *fb, rec *r, const sched_request *q,
                                const char *what)
{
    int32_t ref[CTX];
    int32_t n = fake_reference(fb, q->prompt, q->n_prompt, q->max_tokens, &q->sampling,
                               q->stop_ids, q->n_stop_ids, ref);
    int same = r->n == n;
    for (int32_t i = 0; same && i < n; i++)
        same = r->tokens[i] == ref[i];
    int32_t k = 0;
    while (k < n && k < r->n && r->tokens[k] == ref[k])
        k++;
    CHECK(same, "%s (id %llu): %d tokens, reference %d, first difference at %d", what,
          (unsigned long long)r->id, r->n, n, k);
    CHECK(r->n_finished_events == 1 && r->n_after_finish == 0,
          "%s: %d FINISHED events, %d events after", what, r->n_finished_events,
          r->n_after_finish);
    CHECK(r->completion_tokens == r->n, "%s: completion_tokens %d, got %d tokens", what,
          r->completion_tokens, r->n);
    CHECK(r->prompt_tokens == q->n_prompt, "%s: prompt_tokens %d", what, r->prompt_tokens);
}

/* A test program's named tests: every one, or the one argv[1] names, each
 * with its "name: ok|FAILED" line. Returns main's status (2: no such name). */
typedef struct h_named_test {
    const char *name;
    void (*fn)(void);
} h_named_test;

static inline int h_run_named(const char *prog, const h_named_test *t, size_t n, int argc,
                              char **argv)
{
    int ran = 0;
    for (size_t i = 0; i < n; i++) {
        if (argc > 1 && strcmp(argv[1], t[i].name))
            continue;
        h_n_finished = 0;
        int before = failures;
        t[i].fn();
        printf("%s: %s\n", t[i].name, failures == before ? "ok" : "FAILED");
        ran++;
    }
    if (!ran) {
        fprintf(stderr, "%s: no test named '%s'\n", prog, argc > 1 ? argv[1] : "");
        return 2;
    }
    return failures ? 1 : 0;
}

#endif
