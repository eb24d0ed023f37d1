/*
 * test_sched_fake.c: the scheduler over the fake backend (fake_backend.h),
 * whose outputs are a checkable function of each sequence's tokens.
 *
 *   test_sched_fake NAME   runs one test (ctest registers each), no NAME = all.
 *
 * Every test ends by checking that the KV cache is back to nothing used
 * and that the backend saw no protocol error.
 */
#include <stdatomic.h>

#include "tests/sched/fake_harness.h"

/* >= 0 (the *_device tests): the fake backends of prefix, preempt and trace
 * sample on the device with room for this many penalty entries a step. */
static int32_t device_room = -1;

static fake_backend *fake_new(int32_t ctx, double a_us, double b_us)
{
    fake_backend *fb = fake_backend_create(VOCAB, ctx, a_us, b_us);
    if (fb && device_room >= 0) {
        fb->device_sampling = 1;
        fb->max_penalties = device_room;
    }
    return fb;
}

/* ---- basic: one request, greedy and sampled ------------------------------ */

static void test_basic(void)
{
    fake_backend *fb = fake_backend_create(VOCAB, CTX, 0, 0);
    sched_config cfg;
    base_config(&cfg);
    sched *s = start(fb, &cfg);
    int32_t prompt[37];
    fill_prompt(prompt, 37, 1);
    rec r[2];
    sched_request q[2];
    for (int i = 0; i < 2; i++) {
        rec_init(&r[i], 64);
        h_request(&q[i], prompt, 37, 20, &r[i]);
    }
    q[1].sampling.temperature = 1.0f;
    q[1].sampling.seed = 7;
    q[1].sampling.logprobs = 3;
    for (int i = 0; i < 2; i++) {
        lm_err err = {0};
        CHECK(sched_submit(s, &q[i], &r[i].id, &err) == 0, "submit: %s", err.msg);
    }
    CHECK(r[1].id == r[0].id + 1, "ids not consecutive");
    CHECK(h_wait_finished(2, 10), "not finished");
    for (int i = 0; i < 2; i++) {
        check_output(fb, &r[i], &q[i], i ? "sampled" : "greedy");
        CHECK(r[i].finish == SCHED_FINISH_LENGTH, "finish %d", r[i].finish);
    }
    check_idle(s, fb, "basic");
    sched_stats st;
    sched_get_stats(s, &st);
    CHECK(st.finished == 2 && st.tokens_generated == 40, "finished %llu tokens %llu",
          (unsigned long long)st.finished, (unsigned long long)st.tokens_generated);
    CHECK(st.steps > 0 && st.preemptions == 0 && st.cancelled == 0, "stats");
    sched_destroy(s);
    backend_destroy(&fb->base);
    for (int i = 0; i < 2; i++)
        rec_free(&r[i]);
}

/* ---- invalid requests and configs ----------------------------------------- */

static int events_seen;
static void count_event(void *user, const sched_event *ev)
{
    events_seen++;
}

static void expect_submit(sched *s, const sched_request *q, int code, const char *needle)
{
    lm_err err = {0};
    uint64_t id = 0;
    int rc = sched_submit(s, q, &id, &err);
    CHECK(rc == code, "expected %d, got %d (%s)", code, rc, err.msg);
    CHECK(strstr(err.msg, needle) != NULL, "message '%s' lacks '%s'", err.msg, needle);
}

static void test_invalid(void)
{
    fake_backend *fb = fake_backend_create(VOCAB, 64, 0, 0);
    sched_config cfg;
    base_config(&cfg);
    cfg.kv_bytes = (size_t)8 * 4 * 1024; /* 8 blocks of 4 = 32 tokens */
    sched *s = start(fb, &cfg);
    int32_t prompt[80] = {0};
    sched_request q;
    memset(&q, 0, sizeof q);
    q.prompt = prompt;
    q.n_prompt = 10;
    q.max_tokens = 5;
    sample_params_default(&q.sampling);
    q.on_event = count_event;

    sched_request b = q;
    b.n_prompt = 0;
    expect_submit(s, &b, -EINVAL, "empty prompt");
    b = q;
    b.prompt = NULL;
    expect_submit(s, &b, -EINVAL, "empty prompt");
    b = q;
    b.max_tokens = 0;
    expect_submit(s, &b, -EINVAL, "max_tokens");
    b = q;
    b.n_prompt = 60;
    expect_submit(s, &b, -EINVAL, "exceeds the model's context of 64");
    b = q;
    b.n_prompt = 30;
    expect_submit(s, &b, -EINVAL, "the whole cache has 8");
    b = q;
    b.on_event = NULL;
    expect_submit(s, &b, -EINVAL, "on_event");
    b = q;
    b.sampling.temperature = -1;
    expect_submit(s, &b, -EINVAL, "temperature");
    b = q;
    b.n_stop_ids = 2;
    expect_submit(s, &b, -EINVAL, "stop_ids");
    prompt[3] = VOCAB;
    expect_submit(s, &q, -EINVAL, "outside the vocabulary");
    prompt[3] = -1;
    expect_submit(s, &q, -EINVAL, "outside the vocabulary");
    prompt[3] = 0;
    h_sleep_ms(20);
    CHECK(events_seen == 0, "%d events for refused requests", events_seen);
    check_idle(s, fb, "invalid");
    CHECK(sched_cancel(s, 12345) == -ENOENT, "cancel of an unknown id");
    sched_destroy(s);
    sched_destroy(NULL);

    /* Bad configurations. */
    sched_config c;
    lm_err err = {0};
    static const char *needles[] = {"block_size",    "max_running",    "min_step_tokens",
                                    "max_step_tokens", "prefill_chunk", "holds no block",
                                    "kv_fraction",   "eos_ids"};
    for (int i = 0; i < 8; i++) {
        base_config(&c);
        switch (i) {
        case 0: c.block_size = 0; break;
        case 1: c.max_running = 0; break;
        case 2: c.min_step_tokens = 100; break;
        case 3: c.max_step_tokens = 0; break;
        case 4: c.prefill_chunk = 0; break;
        case 5: c.kv_bytes = 100; break;
        case 6: c.kv_bytes = 0; c.kv_fraction = 2; break;
        case 7: c.n_eos_ids = 2; break;
        }
        sched *bad = NULL;
        int rc = sched_create(&fb->base, &c, &bad, &err);
        CHECK(rc == -EINVAL || rc == -ENOMEM, "config %d accepted (%d)", i, rc);
        CHECK(strstr(err.msg, needles[i]) != NULL, "config %d: '%s' lacks '%s'", i, err.msg,
              needles[i]);
    }
    CHECK(sched_create(NULL, &c, &s, &err) == -EINVAL, "NULL backend accepted");
    backend_destroy(&fb->base);

    /* Sizing from a fraction of free device memory. */
    fb = fake_backend_create(VOCAB, 64, 0, 0);
    fb->device_memory_free = (size_t)100 * 4 * 1024;
    base_config(&c);
    c.kv_bytes = 0;
    c.kv_fraction = 0.5;
    s = start(fb, &c);
    sched_stats st;
    sched_get_stats(s, &st);
    CHECK(st.kv_blocks_total == 50, "kv_fraction 0.5 of 100 blocks gave %d", st.kv_blocks_total);
    sched_destroy(s);
    backend_destroy(&fb->base);
}

/* ---- prefix reuse ----------------------------------------------------------- */

static void test_prefix(void)
{
    fake_backend *fb = fake_new(CTX, 0, 0);
    sched_config cfg;
    base_config(&cfg);
    sched *s = start(fb, &cfg);
    int32_t a[40], b[40];
    fill_prompt(a, 40, 3);
    memcpy(b, a, sizeof b);
    b[30] = (b[30] + 1) % VOCAB; /* shares 30 tokens = 7 full blocks of 4 */
    rec r[3];
    sched_request q[3];
    rec_init(&r[0], 32);
    h_request(&q[0], a, 40, 10, &r[0]);
    rec_init(&r[1], 32);
    h_request(&q[1], a, 40, 10, &r[1]);
    rec_init(&r[2], 32);
    h_request(&q[2], b, 40, 10, &r[2]);
    for (int i = 0; i < 3; i++) {
        CHECK(sched_submit(s, &q[i], &r[i].id, NULL) == 0, "submit");
        CHECK(h_wait_finished(i + 1, 10), "not finished");
    }
    for (int i = 0; i < 3; i++)
        check_output(fb, &r[i], &q[i], "prefix");
    CHECK(r[0].cached_prompt_tokens == 0, "first run reused %d", r[0].cached_prompt_tokens);
    /* Same prompt: all full blocks but the one holding the last token. */
    CHECK(r[1].cached_prompt_tokens == 36, "same prompt reused %d, want 36",
          r[1].cached_prompt_tokens);
    CHECK(r[2].cached_prompt_tokens == 28, "shared prefix reused %d, want 28",
          r[2].cached_prompt_tokens);
    sched_stats st;
    sched_get_stats(s, &st);
    CHECK(st.prefix_tokens_reused == 64, "prefix_tokens_reused %llu",
          (unsigned long long)st.prefix_tokens_reused);
    CHECK(st.prompt_tokens_computed == 120 - 64, "prompt_tokens_computed %llu",
          (unsigned long long)st.prompt_tokens_computed);
    check_idle(s, fb, "prefix");
    CHECK(st.kv_blocks_cached > 0, "nothing kept in the prefix cache");
    sched_destroy(s);

    /* prefix_cache off: nothing reused, same outputs. */
    fake_backend *fb2 = fake_new(CTX, 0, 0);
    cfg.prefix_cache = 0;
    s = start(fb2, &cfg);
    h_n_finished = 0;
    rec r2;
    rec_init(&r2, 32);
    q[1].user = &r2;
    CHECK(sched_submit(s, &q[1], &r2.id, NULL) == 0, "submit");
    CHECK(h_wait_finished(1, 10), "not finished");
    check_output(fb2, &r2, &q[1], "no prefix cache");
    CHECK(r2.cached_prompt_tokens == 0, "reused with prefix_cache off");
    sched_get_stats(s, &st);
    CHECK(st.kv_blocks_cached == 0, "cached blocks with prefix_cache off");
    check_idle(s, fb2, "prefix off");
    sched_destroy(s);
    backend_destroy(&fb->base);
    backend_destroy(&fb2->base);
    for (int i = 0; i < 3; i++)
        rec_free(&r[i]);
    rec_free(&r2);
}

/* ---- forced preemption ------------------------------------------------------- */

static void test_preempt(void)
{
    /* 24 blocks of 4 = 96 tokens; three requests of 20 + 40 = 60 tokens each:
     * at most one fits fully, so decoding preempts the newer ones. */
    for (int pc = 0; pc < 2; pc++) {
        fake_backend *fb = fake_new(CTX, 0, 0);
        sched_config cfg;
        base_config(&cfg);
        cfg.kv_bytes = (size_t)24 * 4 * 1024;
        cfg.prefix_cache = pc;
        sched *s = start(fb, &cfg);
        h_n_finished = 0;
        enum { N = 3 };
        int32_t prompt[N][20];
        rec r[N];
        sched_request q[N];
        for (int i = 0; i < N; i++) {
            fill_prompt(prompt[i], 20, 100 + i);
            rec_init(&r[i], 64);
            h_request(&q[i], prompt[i], 20, 40, &r[i]);
            q[i].sampling.temperature = i == 1 ? 0.8f : 0; /* RNG must survive preemption */
            q[i].sampling.seed = 99;
            q[i].sampling.repetition_penalty = i == 2 ? 1.3f : 1;
        }
        /* The first request's first step waits at the gate until all are
         * queued, so that they run together whatever the timing. */
        atomic_store(&fb->gate_closed, 1);
        for (int i = 0; i < N; i++)
            CHECK(sched_submit(s, &q[i], &r[i].id, NULL) == 0, "submit");
        h_sleep_ms(5);
        atomic_store(&fb->gate_closed, 0);
        CHECK(h_wait_finished(N, 20), "not finished");
        for (int i = 0; i < N; i++)
            check_output(fb, &r[i], &q[i], "preempted");
        sched_stats st;
        sched_get_stats(s, &st);
        CHECK(st.preemptions > 0, "no preemption happened (prefix_cache %d)", pc);
        printf("preempt (prefix_cache %d): %llu preemptions, %llu prompt tokens computed, %llu "
               "reused\n",
               pc, (unsigned long long)st.preemptions,
               (unsigned long long)st.prompt_tokens_computed,
               (unsigned long long)st.prefix_tokens_reused);
        check_idle(s, fb, "preempt");
        sched_destroy(s);
        backend_destroy(&fb->base);
        for (int i = 0; i < N; i++)
            rec_free(&r[i]);
    }
}

/* ---- cancel ------------------------------------------------------------------ */

static void test_cancel(void)
{
    fake_backend *fb = fake_backend_create(VOCAB, CTX, 2000, 0); /* 2 ms a step */
    sched_config cfg;
    base_config(&cfg);
    cfg.max_running = 1;
    sched *s = start(fb, &cfg);
    int32_t prompt[10];
    fill_prompt(prompt, 10, 5);
    rec r[3];
    sched_request q[3];
    for (int i = 0; i < 3; i++) {
        rec_init(&r[i], 500);
        h_request(&q[i], prompt, 10, 400, &r[i]);
        CHECK(sched_submit(s, &q[i], &r[i].id, NULL) == 0, "submit");
    }
    while (rec_count(&r[0]) < 3)
        h_sleep_ms(1);
    /* r[1] is waiting (max_running 1): cancelled without ever running. */
    CHECK(sched_cancel(s, r[1].id) == 0, "cancel waiting");
    CHECK(sched_cancel(s, r[0].id) == 0, "cancel running");
    int32_t at_cancel = rec_count(&r[0]);
    CHECK(h_wait_finished(2, 5), "cancelled requests did not finish");
    CHECK(r[0].finish == SCHED_FINISH_CANCELLED && r[1].finish == SCHED_FINISH_CANCELLED,
          "finish %d %d", r[0].finish, r[1].finish);
    CHECK(r[0].n <= at_cancel + 1, "%d tokens after cancel (more than one step)",
          r[0].n - at_cancel);
    CHECK(r[1].n == 0, "waiting request produced %d tokens", r[1].n);
    CHECK(sched_cancel(s, r[0].id) == -ENOENT, "cancel of a finished id");
    /* r[2] runs to the end. */
    CHECK(h_wait_finished(3, 10), "last request did not finish");
    check_output(fb, &r[2], &q[2], "after cancels");
    /* the stats are published after the step whose callbacks the wait saw */
    sched_stats st;
    for (int tries = 0; tries < 2000; tries++) {
        sched_get_stats(s, &st);
        if (st.finished >= 3)
            break;
        h_sleep_ms(1);
    }
    CHECK(st.cancelled == 2 && st.finished == 3, "cancelled %llu finished %llu",
          (unsigned long long)st.cancelled, (unsigned long long)st.finished);
    check_idle(s, fb, "cancel");
    sched_destroy(s);
    backend_destroy(&fb->base);
    for (int i = 0; i < 3; i++)
        rec_free(&r[i]);
}

/* ---- deadline ------------------------------------------------------------------ */

static void test_deadline(void)
{
    fake_backend *fb = fake_backend_create(VOCAB, CTX, 1000, 0);
    sched_config cfg;
    base_config(&cfg);
    sched *s = start(fb, &cfg);
    int32_t prompt[10];
    fill_prompt(prompt, 10, 6);
    rec r[2];
    sched_request q[2];
    rec_init(&r[0], 500);
    h_request(&q[0], prompt, 10, 400, &r[0]);
    q[0].deadline_ns = h_now_ns() + 30 * 1000000LL;
    rec_init(&r[1], 500);
    h_request(&q[1], prompt, 10, 400, &r[1]);
    q[1].deadline_ns = h_now_ns() - 1; /* already expired */
    for (int i = 0; i < 2; i++)
        CHECK(sched_submit(s, &q[i], &r[i].id, NULL) == 0, "submit");
    CHECK(h_wait_finished(2, 5), "deadline requests did not finish");
    for (int i = 0; i < 2; i++) {
        CHECK(r[i].finish == SCHED_FINISH_DEADLINE, "%d: finish %d", i, r[i].finish);
        int64_t late_ms = (r[i].t_finish - q[i].deadline_ns) / 1000000;
        CHECK(late_ms < 200, "%d: finished %lld ms after the deadline", i, (long long)late_ms);
    }
    CHECK(r[0].n > 0 && r[0].n < 400, "deadline request produced %d tokens", r[0].n);
    CHECK(r[1].n == 0, "expired request produced %d tokens", r[1].n);
    check_idle(s, fb, "deadline");
    sched_destroy(s);
    backend_destroy(&fb->base);
    rec_free(&r[0]);
    rec_free(&r[1]);
}

/* ---- overload ------------------------------------------------------------------- */

static void test_overload(void)
{
    fake_backend *fb = fake_backend_create(VOCAB, CTX, 2000, 0);
    sched_config cfg;
    base_config(&cfg);
    cfg.max_running = 1;
    cfg.max_queue = 3;
    sched *s = start(fb, &cfg);
    int32_t prompt[8];
    fill_prompt(prompt, 8, 8);
    enum { N = 12 };
    rec r[N];
    sched_request q[N];
    int accepted = 0, overloaded = 0;
    for (int i = 0; i < N; i++) {
        rec_init(&r[i], 64);
        h_request(&q[i], prompt, 8, 30, &r[i]);
        lm_err err = {0};
        int rc = sched_submit(s, &q[i], &r[i].id, &err);
        if (rc == 0) {
            accepted++;
        } else {
            CHECK(rc == -EAGAIN, "rc %d: %s", rc, err.msg);
            CHECK(strstr(err.msg, "overloaded") != NULL, "message: %s", err.msg);
            r[i].id = 0;
            overloaded++;
        }
    }
    /* One may already be running; max_queue more wait. */
    CHECK(accepted >= 3 && accepted <= 4, "accepted %d with max_queue 3, max_running 1",
          accepted);
    CHECK(overloaded == N - accepted, "overloaded %d", overloaded);
    CHECK(h_wait_finished(accepted, 10), "accepted requests did not finish");
    h_sleep_ms(10);
    for (int i = 0; i < N; i++) {
        if (r[i].id)
            check_output(fb, &r[i], &q[i], "overload accepted");
        else
            CHECK(r[i].n == 0 && !r[i].finished, "refused request got events");
    }
    /* Room again once drained. */
    rec extra;
    rec_init(&extra, 64);
    sched_request eq;
    h_request(&eq, prompt, 8, 5, &extra);
    CHECK(sched_submit(s, &eq, &extra.id, NULL) == 0, "submit after draining");
    CHECK(h_wait_finished(accepted + 1, 10), "not finished");
    check_idle(s, fb, "overload");
    sched_destroy(s);
    backend_destroy(&fb->base);
    for (int i = 0; i < N; i++)
        rec_free(&r[i]);
    rec_free(&extra);
}

/* ---- starvation --------------------------------------------------------------- */

/*
 * A long request arrives behind four running ones and in front of a steady
 * stream of short ones, with a KV cache so small that it needs nearly all
 * of it. Skipping it for the short requests (which always fit) would
 * starve it; FCFS admission must get it through while the stream is still
 * arriving. The stream is paced in scheduler steps (one new short request
 * per step), not in wall-clock time, so that a loaded machine that slows
 * the engine thread does not change what is being tested.
 */
static void wait_next_step(sched *s, uint64_t after)
{
    sched_stats st;
    int64_t give_up = h_now_ns() + 5000000000LL;
    for (;;) {
        sched_get_stats(s, &st);
        if (st.steps > after || (st.waiting == 0 && st.running == 0) || h_now_ns() > give_up)
            return;
        h_sleep_ms(0.05);
    }
}

static void test_starvation(void)
{
    fake_backend *fb = fake_backend_create(VOCAB, CTX, 200, 5);
    sched_config cfg;
    base_config(&cfg);
    cfg.kv_bytes = (size_t)40 * 4 * 1024; /* 40 blocks = 160 tokens */
    cfg.max_running = 6;
    cfg.max_queue = 1000;
    sched *s = start(fb, &cfg);
    enum { N_SHORT = 120 };
    int32_t lp[120], sp[N_SHORT][6];
    fill_prompt(lp, 120, 9);
    rec lr, sr[N_SHORT];
    sched_request lq, sq[N_SHORT];
    for (int i = 0; i < N_SHORT; i++) {
        fill_prompt(sp[i], 6, 1000 + i);
        rec_init(&sr[i], 16);
        h_request(&sq[i], sp[i], 6, 10, &sr[i]);
    }
    for (int i = 0; i < 4; i++)
        CHECK(sched_submit(s, &sq[i], &sr[i].id, NULL) == 0, "submit");
    rec_init(&lr, 32);
    h_request(&lq, lp, 120, 20, &lr);
    CHECK(sched_submit(s, &lq, &lr.id, NULL) == 0, "submit long");
    int long_done_at = -1;
    for (int i = 4; i < N_SHORT; i++) {
        sched_stats st;
        sched_get_stats(s, &st);
        CHECK(sched_submit(s, &sq[i], &sr[i].id, NULL) == 0, "submit short %d", i);
        if (long_done_at < 0 && rec_finished(&lr))
            long_done_at = i;
        wait_next_step(s, st.steps);
    }
    CHECK(h_wait_finished(N_SHORT + 1, 20), "not all finished");
    check_output(fb, &lr, &lq, "long request");
    for (int i = 0; i < N_SHORT; i++)
        check_output(fb, &sr[i], &sq[i], "short request");
    printf("starvation: long request done while submitting short request %d of %d\n",
           long_done_at, N_SHORT);
    CHECK(long_done_at >= 0 && long_done_at < N_SHORT / 2,
          "the long request finished only after the stream (at %d)", long_done_at);
    check_idle(s, fb, "starvation");
    sched_destroy(s);
    backend_destroy(&fb->base);
    rec_free(&lr);
    for (int i = 0; i < N_SHORT; i++)
        rec_free(&sr[i]);
}

/* ---- random arrival trace -------------------------------------------------------- */

/*
 * 160 requests arrive with random gaps; prompts are random or extend one
 * of four shared "system prompts"; lengths, max_tokens, sampling and stop
 * ids vary; the KV cache is small enough that preemption happens; the
 * adaptive controller is on. Everything must finish with the reference
 * output, nothing may leak, and the counters must add up.
 */
static void test_trace(void)
{
    fake_backend *fb = fake_new(CTX, 150, 8);
    sched_config cfg;
    base_config(&cfg);
    cfg.kv_bytes = (size_t)50 * 4 * 1024; /* 50 blocks = 200 tokens */
    cfg.max_running = 10;
    cfg.max_queue = 1000;
    cfg.max_step_tokens = 48;
    cfg.min_step_tokens = 4;
    cfg.prefill_chunk = 12;
    cfg.target_itl_ms = 0.4; /* below the cost of a full step: the budget moves */
    int32_t eos = 5;
    cfg.eos_ids = &eos;
    cfg.n_eos_ids = 1;
    sched *s = start(fb, &cfg);
    enum { N = 160, MAXP = 90 };
    static int32_t prompts[N][MAXP], sys[4][60];
    static rec r[N];
    static sched_request q[N];
    static int32_t stops[N][2];
    for (int k = 0; k < 4; k++)
        fill_prompt(sys[k], 60, 500 + k);
    uint64_t seed = 4242;
#define RND(n) ((seed = seed * 6364136223846793005ull + 1442695040888963407ull), \
                (int32_t)((seed >> 33) % (uint64_t)(n)))
    int64_t sum_prompt = 0;
    for (int i = 0; i < N; i++) {
        int32_t n = 1 + RND(MAXP);
        fill_prompt(prompts[i], n, 7000 + i);
        if (RND(2)) { /* shared prefix */
            int k = RND(4);
            int32_t m = n < 60 ? n : 60;
            memcpy(prompts[i], sys[k], (size_t)m * sizeof(int32_t));
        }
        rec_init(&r[i], 128);
        h_request(&q[i], prompts[i], n, 1 + RND(40), &r[i]);
        if (RND(3) == 0) {
            q[i].sampling.temperature = 0.7f;
            q[i].sampling.top_k = 20;
            q[i].sampling.seed = (uint64_t)i;
        }
        if (RND(4) == 0) {
            stops[i][0] = RND(VOCAB);
            stops[i][1] = RND(VOCAB);
            q[i].stop_ids = stops[i];
            q[i].n_stop_ids = 2;
        }
        sum_prompt += n;
    }
    h_n_finished = 0;
    for (int i = 0; i < N; i++) {
        lm_err err = {0};
        int rc = sched_submit(s, &q[i], &r[i].id, &err);
        CHECK(rc == 0, "submit %d: %s", i, err.msg);
        if (RND(4) == 0)
            h_sleep_ms(RND(6));
    }
    CHECK(h_wait_finished(N, 60), "trace: only %d of %d finished", h_n_finished, N);
    int64_t sum_out = 0;
    int stopped = 0;
    for (int i = 0; i < N; i++) {
        /* The reference stops at EOS as the scheduler does. */
        int32_t st[3] = {eos, 0, 0};
        int32_t nst = 1;
        for (int k = 0; k < q[i].n_stop_ids; k++)
            st[nst++] = q[i].stop_ids[k];
        sched_request rq = q[i];
        rq.stop_ids = st;
        rq.n_stop_ids = nst;
        check_output(fb, &r[i], &rq, "trace");
        sum_out += r[i].n;
        stopped += r[i].finish == SCHED_FINISH_STOP;
        CHECK(r[i].finish == SCHED_FINISH_STOP || r[i].finish == SCHED_FINISH_LENGTH,
              "finish %d: %s", r[i].finish, r[i].message);
    }
    sched_stats st;
    check_idle(s, fb, "trace");
    sched_get_stats(s, &st);
    printf("trace: %llu steps, %llu preemptions, %lld prompt tokens, %llu computed, %llu "
           "reused, %d stopped early, budget %d, limit %d, max step %d tokens / %d seqs\n",
           (unsigned long long)st.steps, (unsigned long long)st.preemptions,
           (long long)sum_prompt, (unsigned long long)st.prompt_tokens_computed,
           (unsigned long long)st.prefix_tokens_reused, stopped, st.step_token_budget,
           st.batch_limit, fb->max_step_tokens_seen, fb->max_step_seqs_seen);
    CHECK(st.finished == N && st.cancelled == 0, "finished %llu", (unsigned long long)st.finished);
    CHECK((int64_t)st.tokens_generated == sum_out, "tokens_generated %llu, delivered %lld",
          (unsigned long long)st.tokens_generated, (long long)sum_out);
    CHECK(st.preemptions > 0, "trace never preempted: cache too large for the test");
    CHECK(st.prefix_tokens_reused > 0, "trace never reused a prefix");
    /* Every prompt token was computed or served from the prefix cache at
     * least once (more with preemption: resumes recompute). */
    CHECK((int64_t)(st.prompt_tokens_computed + st.prefix_tokens_reused) >= sum_prompt,
          "prompt tokens: %llu computed + %llu reused < %lld",
          (unsigned long long)st.prompt_tokens_computed,
          (unsigned long long)st.prefix_tokens_reused, (long long)sum_prompt);
    CHECK(st.steps == (uint64_t)fb->forwards, "steps %llu, forwards %lld",
          (unsigned long long)st.steps, (long long)fb->forwards);
    CHECK(fb->max_step_tokens_seen <= cfg.max_step_tokens, "step of %d tokens",
          fb->max_step_tokens_seen);
    CHECK(fb->max_step_seqs_seen <= cfg.max_running, "step of %d sequences",
          fb->max_step_seqs_seen);
    CHECK(st.step_token_budget >= cfg.min_step_tokens &&
              st.step_token_budget <= cfg.max_step_tokens,
          "budget %d", st.step_token_budget);
    sched_destroy(s);
    backend_destroy(&fb->base);
    for (int i = 0; i < N; i++)
        rec_free(&r[i]);
#undef RND
}

/* ---- on_tick --------------------------------------------------------------------- */

static atomic_int ticks;
static void on_tick(void *user)
{
    atomic_fetch_add(&ticks, 1);
}

static void test_tick(void)
{
    fake_backend *fb = fake_backend_create(VOCAB, CTX, 0, 0);
    sched_config cfg;
    base_config(&cfg);
    cfg.on_tick = on_tick;
    cfg.idle_tick_ms = 5;
    sched *s = start(fb, &cfg);
    /* Idle ticks must keep coming; wait for four of them with a bound far
     * above 4 x 5 ms so that a loaded machine cannot fail the test. */
    for (int i = 0; i < 1000 && atomic_load(&ticks) < 4; i++)
        h_sleep_ms(5);
    int idle = atomic_load(&ticks);
    CHECK(idle >= 4, "only %d ticks in 5 s idle at 5 ms", idle);
    int32_t prompt[4] = {1, 2, 3, 4};
    rec r;
    sched_request q;
    rec_init(&r, 64);
    h_request(&q, prompt, 4, 50, &r);
    atomic_store(&ticks, 0);
    CHECK(sched_submit(s, &q, &r.id, NULL) == 0, "submit");
    CHECK(h_wait_finished(1, 5), "not finished");
    sched_stats st;
    sched_get_stats(s, &st);
    /* The tick after the last step may still be running when FINISHED has
     * been delivered: join the engine thread before counting. */
    sched_destroy(s);
    CHECK((uint64_t)atomic_load(&ticks) >= st.steps, "%d ticks for %llu steps",
          atomic_load(&ticks), (unsigned long long)st.steps);
    backend_destroy(&fb->base);
    rec_free(&r);
}

/* ---- backend error ---------------------------------------------------------------- */

static void test_error(void)
{
    fake_backend *fb = fake_backend_create(VOCAB, CTX, 0, 0);
    sched_config cfg;
    base_config(&cfg);
    sched *s = start(fb, &cfg);
    int32_t prompt[6] = {1, 2, 3, 4, 5, 6};
    rec r[2];
    sched_request q[2];
    fb->fail_forwards = 1; /* before any submit: the engine thread is idle */
    rec_init(&r[0], 64);
    h_request(&q[0], prompt, 6, 10, &r[0]);
    CHECK(sched_submit(s, &q[0], &r[0].id, NULL) == 0, "submit");
    CHECK(h_wait_finished(1, 5), "not finished");
    CHECK(r[0].finish == SCHED_FINISH_ERROR, "finish %d", r[0].finish);
    CHECK(strstr(r[0].message, "injected failure") != NULL, "message '%s'", r[0].message);
    /* The scheduler goes on. */
    rec_init(&r[1], 64);
    h_request(&q[1], prompt, 6, 10, &r[1]);
    CHECK(sched_submit(s, &q[1], &r[1].id, NULL) == 0, "submit");
    CHECK(h_wait_finished(2, 5), "not finished");
    check_output(fb, &r[1], &q[1], "after an error");
    check_idle(s, fb, "error");
    sched_destroy(s);
    backend_destroy(&fb->base);
    rec_free(&r[0]);
    rec_free(&r[1]);
}

/* ---- shutdown with work in flight ------------------------------------------------ */

static void test_shutdown(void)
{
    fake_backend *fb = fake_backend_create(VOCAB, CTX, 1000, 0);
    sched_config cfg;
    base_config(&cfg);
    cfg.max_running = 2;
    sched *s = start(fb, &cfg);
    int32_t prompt[6] = {1, 2, 3, 4, 5, 6};
    enum { N = 5 };
    rec r[N];
    sched_request q[N];
    for (int i = 0; i < N; i++) {
        rec_init(&r[i], 500);
        h_request(&q[i], prompt, 6, 400, &r[i]);
        CHECK(sched_submit(s, &q[i], &r[i].id, NULL) == 0, "submit");
    }
    while (rec_count(&r[0]) < 2)
        h_sleep_ms(1);
    sched_destroy(s);
    CHECK(h_n_finished == N, "%d of %d got FINISHED at shutdown", h_n_finished, N);
    for (int i = 0; i < N; i++) {
        CHECK(r[i].finish == SCHED_FINISH_CANCELLED, "%d: finish %d", i, r[i].finish);
        CHECK(r[i].n_finished_events == 1, "%d: %d FINISHED events", i, r[i].n_finished_events);
        rec_free(&r[i]);
    }
    backend_destroy(&fb->base);
}

/* ---- the same over a backend that samples on the device ----------------------- */

static void test_prefix_device(void)
{
    device_room = 4096;
    test_prefix();
    device_room = -1;
}

/* Request 2's repetition penalty lists never fit 8 entries: the steps it
 * has a row in sample on the host, the others on the device. */
static void test_preempt_device(void)
{
    device_room = 8;
    test_preempt();
    device_room = -1;
}

static void test_trace_device(void)
{
    device_room = 0;
    test_trace();
    device_room = -1;
}

static const h_named_test tests[] = {
    {"basic", test_basic},       {"invalid", test_invalid},   {"prefix", test_prefix},
    {"preempt", test_preempt},   {"cancel", test_cancel},     {"deadline", test_deadline},
    {"overload", test_overload}, {"starvation", test_starvation}, {"trace", test_trace},
    {"tick", test_tick},         {"error", test_error},       {"shutdown", test_shutdown},
    {"prefix_device", test_prefix_device}, {"preempt_device", test_preempt_device},
    {"trace_device", test_trace_device},
};

int main(int argc, char **argv)
{
    return h_run_named("test_sched_fake", tests, sizeof tests / sizeof tests[0], argc, argv);
}
