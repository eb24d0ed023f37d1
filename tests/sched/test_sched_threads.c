/*
 * test_sched_threads.c: host sampling on several threads
 * (sched_config.sample_threads, on ops_cpu.h's cpu_pool), over the fake
 * backend.
 *
 *   test_sched_threads NAME   runs one test (ctest registers each), no NAME = all.
 *
 *   same       40 batched requests (greedy, every filter and penalty,
 *              logprobs, stop ids): with sample_threads 1, 2, 4 and 0
 *              (automatic) the outputs equal fake_reference's and the whole
 *              event log (ids, tokens, logprobs, finishes, in delivery
 *              order) equals the engine thread's alone; the parallel path
 *              ran (sched_stats.sample_parallel_steps) and pool threads
 *              picked rows; steps too small to share stay serial; device
 *              sampling's fallback steps share their rows too, its device
 *              steps never;
 *   error      a NaN or all -inf row in a shared step fails its request
 *              alone, with the message and events of the serial path;
 *   cancel     a cancel from a callback in the middle of a shared step's
 *              delivery (same events as the serial path), cancels from
 *              another thread while steps sample, destroy with work in
 *              flight;
 *   lifecycle  the thread count resolved and bounded, bad values refused,
 *              200 create/destroy cycles (idle and busy) leave no thread
 *              behind (and, under ASan, no memory).
 *
 * The scheduler's first idle tick is held until every request is queued,
 * so that all runs of one test plan the same steps and their event logs
 * can be compared entry by entry.
 */
#include <dirent.h>
#include <stdatomic.h>
#include <unistd.h>

#include "tests/sched/fake_harness.h"

/* The fake model's vocabulary here: a row costs microseconds to make and
 * pick, so that pool threads do get rows, and a step shares its rows from
 * 4 rows on (SCHED_SAMPLE_LOGITS_PER_THREAD for 2 threads; VOCAB's 61
 * tokens would need 135). */
enum { TV = 2048 };

/* ---- the event log -------------------------------------------------------- */

typedef struct logged {
    uint64_t id;
    sched_event_type type;
    sample_result tok;
    sched_finish finish;
    int32_t completion_tokens;
    char message[160];
} logged;

enum { LOG_CAP = 16384 };
static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;
static logged *g_log;
static int g_n_log;

/* A cancel made from the callback: when request `on_id` gets its
 * `at_token`-th token, cancel ids[0, n). */
static struct {
    sched *s;
    uint64_t on_id;
    int32_t at_token;
    uint64_t ids[4];
    int n;
} g_hook;

static void log_event(void *user, const sched_event *ev)
{
    rec *r = user;
    pthread_mutex_lock(&g_log_mu);
    if (g_n_log < LOG_CAP) {
        logged *l = &g_log[g_n_log++];
        memset(l, 0, sizeof *l);
        l->id = ev->id;
        l->type = ev->type;
        if (ev->type == SCHED_EVENT_TOKEN)
            l->tok = ev->tok;
        l->finish = ev->finish;
        l->completion_tokens = ev->completion_tokens;
        if (ev->message)
            snprintf(l->message, sizeof l->message, "%s", ev->message);
    }
    pthread_mutex_unlock(&g_log_mu);
    rec_on_event(r, ev);
    if (ev->type == SCHED_EVENT_TOKEN && g_hook.s && ev->id == g_hook.on_id &&
        rec_count(r) == g_hook.at_token)
        for (int i = 0; i < g_hook.n; i++)
            CHECK(sched_cancel(g_hook.s, g_hook.ids[i]) == 0, "cancel of %llu from a callback",
                  (unsigned long long)g_hook.ids[i]);
}

/* The two logs are the same, entry by entry; else say where they part. */
static void check_logs(const logged *a, int na, const logged *b, int nb, const char *what)
{
    int i = 0;
    for (; i < na && i < nb; i++) {
        const logged *x = &a[i], *y = &b[i];
        int same = x->id == y->id && x->type == y->type && x->finish == y->finish &&
                   x->completion_tokens == y->completion_tokens &&
                   !strcmp(x->message, y->message) && x->tok.token == y->tok.token &&
                   !memcmp(&x->tok.logprob, &y->tok.logprob, sizeof(float)) &&
                   x->tok.n_top == y->tok.n_top;
        for (int32_t k = 0; same && k < x->tok.n_top; k++)
            same = x->tok.top_ids[k] == y->tok.top_ids[k] &&
                   !memcmp(&x->tok.top_logprobs[k], &y->tok.top_logprobs[k], sizeof(float));
        if (!same)
            break;
    }
    CHECK(i == na && na == nb,
          "%s: event logs part at entry %d of %d/%d (id %llu type %d token %d vs id %llu type "
          "%d token %d)",
          what, i, na, nb, i < na ? (unsigned long long)a[i].id : 0ull, i < na ? a[i].type : 0,
          i < na ? a[i].tok.token : 0, i < nb ? (unsigned long long)b[i].id : 0ull,
          i < nb ? b[i].type : 0, i < nb ? b[i].tok.token : 0);
}

/* ---- one run of a batch --------------------------------------------------- */

/* Held first idle tick (see the top): 1 = hold the next tick, 2 = held. */
static atomic_int g_hold;

static void hold_tick(void *user)
{
    int want = 1;
    if (!atomic_compare_exchange_strong(&g_hold, &want, 2))
        return;
    while (atomic_load(&g_hold) == 2)
        h_sleep_ms(0.2);
}

typedef struct trun {
    int32_t threads;            /* sample_threads */
    int device;                 /* the fake backend samples on the device ... */
    int32_t room;               /* ... with this max_penalties */
    int32_t poison_pos, poison_token; /* fake_backend.h; poison_pos -1 = off */
    /* what the run saw */
    sched_stats st;
    int64_t pick_forwards, logit_forwards;
    logged *log;
    int n_log;
} trun;

static trun trun_opts(int32_t threads)
{
    return (trun){.threads = threads, .poison_pos = -1};
}

static void batch_config(sched_config *c, int32_t threads)
{
    base_config(c);
    c->max_running = 64;
    c->max_queue = 256;
    c->max_step_tokens = 512;
    c->prefill_chunk = 32;
    c->kv_bytes = (size_t)2048 * 4 * 1024; /* 2048 blocks of 4 tokens */
    c->sample_threads = threads;
    c->on_tick = hold_tick;
    c->idle_tick_ms = 1;
}

/* Wait until the stats count n finished requests (they are published
 * after the step whose callbacks the caller saw). */
static void wait_stats(sched *s, uint64_t n, sched_stats *ret)
{
    for (int i = 0; i < 5000; i++) {
        sched_get_stats(s, ret);
        if (ret->finished >= n)
            return;
        h_sleep_ms(1);
    }
}

/*
 * Run q[0, n) to the end on a fresh fake backend set from o, all queued
 * before the first step; r[0, n) are initialised here (the caller frees
 * them, and o->log).
 */
static void run_batch(trun *o, int n, sched_request *q, rec *r, const char *what)
{
    fake_backend *fb = fake_backend_create(TV, CTX, 0, 0);
    fb->device_sampling = o->device;
    fb->max_penalties = o->room;
    fb->poison_pos = o->poison_pos;
    fb->poison_token = o->poison_token;
    sched_config cfg;
    batch_config(&cfg, o->threads);
    atomic_store(&g_hold, 1);
    sched *s = start(fb, &cfg);
    while (atomic_load(&g_hold) != 2)
        h_sleep_ms(0.2);
    g_hook.s = s;
    g_n_log = 0;
    h_n_finished = 0;
    for (int i = 0; i < n; i++) {
        rec_init(&r[i], 256);
        q[i].user = &r[i];
        q[i].on_event = log_event;
        lm_err err = {0};
        CHECK(sched_submit(s, &q[i], &r[i].id, &err) == 0, "%s: submit %d: %s", what, i,
              err.msg);
    }
    atomic_store(&g_hold, 0);
    CHECK(h_wait_finished(n, 120), "%s: %d of %d finished", what, h_n_finished, n);
    check_idle(s, fb, what);
    wait_stats(s, (uint64_t)n, &o->st);
    sched_destroy(s);
    g_hook.s = NULL;
    o->pick_forwards = fb->pick_forwards;
    o->logit_forwards = fb->logit_forwards;
    backend_destroy(&fb->base);
    pthread_mutex_lock(&g_log_mu);
    o->n_log = g_n_log;
    o->log = malloc(sizeof *o->log * (size_t)(g_n_log ? g_n_log : 1));
    memcpy(o->log, g_log, sizeof *o->log * (size_t)g_n_log);
    pthread_mutex_unlock(&g_log_mu);
}

static void free_run(trun *o, rec *r, int n)
{
    free(o->log);
    o->log = NULL;
    for (int i = 0; i < n; i++)
        rec_free(&r[i]);
}

static int32_t auto_threads(int32_t max_running)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int32_t n = cpus < 1 ? 1 : cpus > 8 ? 8 : (int32_t)cpus;
    return n < max_running ? n : max_running;
}

/* ---- same: every thread count gives the serial path's events ------------------- */

enum { NREQ = 40, MAXP = 48 };

/* Forty requests: prompts of 5..44 tokens, ten sampling kinds (greedy, every
 * filter, every penalty, logprobs), every seventh with a stop id that its
 * reference reaches after a few tokens. */
static void make_requests(sched_request *q, int32_t prompts[][MAXP], int32_t *stops,
                          uint64_t seed)
{
    fake_backend *ref = fake_backend_create(TV, CTX, 0, 0);
    for (int i = 0; i < NREQ; i++) {
        int32_t n = 5 + (i * 11) % 40;
        fill_prompt(prompts[i], n, seed * 97 + (uint64_t)i);
        h_request(&q[i], prompts[i], n, 20 + (i * 7) % 25, NULL);
        sample_params *p = &q[i].sampling;
        p->seed = seed + (uint64_t)i;
        switch (i % 10) {
        case 0: break; /* greedy */
        case 1: p->temperature = 1.0f; break;
        case 2: p->temperature = 0.7f; p->top_k = 20; break;
        case 3: p->temperature = 1.2f; p->top_p = 0.8f; p->logprobs = 2; break;
        case 4: p->temperature = 1.0f; p->min_p = 0.1f; break;
        case 5: p->repetition_penalty = 1.3f; break; /* greedy */
        case 6: p->temperature = 0.9f; p->repetition_penalty = 1.2f; p->logprobs = 3; break;
        case 7: p->temperature = 1.0f; p->presence_penalty = 0.5f; break;
        case 8: p->temperature = 1.0f; p->frequency_penalty = 0.7f; break;
        case 9:
            p->temperature = 0.8f;
            p->top_k = 40;
            p->top_p = 0.9f;
            p->min_p = 0.05f;
            p->repetition_penalty = 1.1f;
            p->presence_penalty = 0.3f;
            p->frequency_penalty = 0.2f;
            p->logprobs = 5;
            break;
        }
        if (i % 7 == 3) {
            int32_t out[CTX];
            int32_t got = fake_reference(ref, q[i].prompt, n, q[i].max_tokens, p, NULL, 0, out);
            stops[i] = out[got > 6 ? 6 : got - 1];
            q[i].stop_ids = &stops[i];
            q[i].n_stop_ids = 1;
        }
    }
    backend_destroy(&ref->base);
}

static void check_outputs(rec *r, const sched_request *q, int n, const char *what)
{
    fake_backend *ref = fake_backend_create(TV, CTX, 0, 0);
    for (int i = 0; i < n; i++)
        check_output(ref, &r[i], &q[i], what);
    backend_destroy(&ref->base);
}

static void test_same(void)
{
    int32_t prompts[NREQ][MAXP], stops[NREQ];
    sched_request q[NREQ];
    make_requests(q, prompts, stops, 21);
    int n_stopped = 0;

    rec serial_r[NREQ];
    trun serial = trun_opts(1);
    run_batch(&serial, NREQ, q, serial_r, "same, 1 thread");
    check_outputs(serial_r, q, NREQ, "same, 1 thread");
    for (int i = 0; i < NREQ; i++)
        n_stopped += serial_r[i].finish == SCHED_FINISH_STOP;
    CHECK(n_stopped >= NREQ / 7, "%d requests stopped at their stop id", n_stopped);
    CHECK(serial.st.sample_threads == 1 && serial.st.sample_parallel_steps == 0 &&
              serial.st.sample_rows_helped == 0,
          "sample_threads 1: %d threads, %llu shared steps", serial.st.sample_threads,
          (unsigned long long)serial.st.sample_parallel_steps);
    printf("same, 1 thread: %llu steps, sampling %.2f ms in all\n",
           (unsigned long long)serial.st.steps, serial.st.sample_ms_total);

    static const int32_t threads[] = {2, 4, 0};
    uint64_t helped = 0;
    for (size_t k = 0; k < sizeof threads / sizeof threads[0]; k++) {
        char what[64];
        snprintf(what, sizeof what, "same, sample_threads %d", threads[k]);
        rec r[NREQ];
        trun o = trun_opts(threads[k]);
        run_batch(&o, NREQ, q, r, what);
        check_outputs(r, q, NREQ, what);
        check_logs(o.log, o.n_log, serial.log, serial.n_log, what);
        const int32_t want = threads[k] ? threads[k] : auto_threads(64);
        CHECK(o.st.sample_threads == want, "%s: %d threads, want %d", what, o.st.sample_threads,
              want);
        CHECK(want == 1 || o.st.sample_parallel_steps > 0,
              "%s: no step sampled on several threads (%llu steps)", what,
              (unsigned long long)o.st.steps);
        CHECK(o.st.steps == serial.st.steps && o.st.tokens_generated == serial.st.tokens_generated,
              "%s: %llu steps and %llu tokens, serial %llu and %llu", what,
              (unsigned long long)o.st.steps, (unsigned long long)o.st.tokens_generated,
              (unsigned long long)serial.st.steps, (unsigned long long)serial.st.tokens_generated);
        helped += o.st.sample_rows_helped;
        printf("%s (%d threads): %llu steps, %llu shared, %llu rows picked off the engine thread, "
               "sampling %.2f ms in all\n",
               what, o.st.sample_threads, (unsigned long long)o.st.steps,
               (unsigned long long)o.st.sample_parallel_steps,
               (unsigned long long)o.st.sample_rows_helped, o.st.sample_ms_total);
        free_run(&o, r, NREQ);
    }
    CHECK(helped > 0, "no row was ever picked by a pool thread");

    /* Three requests: no step has the logits for two threads (3 x TV <
     * 2 x SCHED_SAMPLE_LOGITS_PER_THREAD), every step stays serial. */
    {
        rec r[3];
        trun o = trun_opts(4);
        run_batch(&o, 3, q, r, "same, 3 requests, 4 threads");
        check_outputs(r, q, 3, "same, 3 requests, 4 threads");
        CHECK(o.st.sample_threads == 4 && o.st.sample_parallel_steps == 0,
              "3 requests: %d threads, %llu of %llu steps shared", o.st.sample_threads,
              (unsigned long long)o.st.sample_parallel_steps, (unsigned long long)o.st.steps);
        free_run(&o, r, 3);
    }

    /*
     * Device sampling with room for 8 penalty entries: steps with a
     * penalised row fall back to the host and share their rows, the others
     * are picked on the device. Penalised requests stop early (max_tokens
     * 6), so the last steps are all device steps. Then with room for every
     * list: no step falls back, none uses the pool.
     */
    sched_request qd[NREQ];
    memcpy(qd, q, sizeof qd);
    for (int i = 0; i < NREQ; i++)
        if (qd[i].sampling.repetition_penalty != 1.0f || qd[i].sampling.presence_penalty ||
            qd[i].sampling.frequency_penalty) {
            qd[i].max_tokens = 6;
            qd[i].n_stop_ids = 0;
        }
    rec rd1[NREQ], rd4[NREQ], rda[NREQ];
    trun d1 = trun_opts(1), d4 = trun_opts(4), da = trun_opts(4);
    d1.device = d4.device = da.device = 1;
    d1.room = d4.room = 8;
    da.room = 1 << 20;
    run_batch(&d1, NREQ, qd, rd1, "same, device room 8, 1 thread");
    run_batch(&d4, NREQ, qd, rd4, "same, device room 8, 4 threads");
    run_batch(&da, NREQ, qd, rda, "same, device, 4 threads");
    check_outputs(rd1, qd, NREQ, "same, device room 8, 1 thread");
    check_outputs(rd4, qd, NREQ, "same, device room 8, 4 threads");
    check_outputs(rda, qd, NREQ, "same, device, 4 threads");
    check_logs(d4.log, d4.n_log, d1.log, d1.n_log, "same, device room 8, 4 vs 1 thread");
    CHECK(d4.logit_forwards > 0 && d4.pick_forwards > 0,
          "device room 8: %lld steps fell back, %lld picked on the device (want both)",
          (long long)d4.logit_forwards, (long long)d4.pick_forwards);
    CHECK(d4.st.sample_parallel_steps > 0, "device room 8: no fallback step was shared");
    CHECK(d1.st.sample_parallel_steps == 0, "device room 8, 1 thread: shared steps");
    CHECK(da.logit_forwards == 0 && da.st.sample_parallel_steps == 0,
          "device with room: %lld steps fell back, %llu shared", (long long)da.logit_forwards,
          (unsigned long long)da.st.sample_parallel_steps);
    printf("same, device room 8: %lld steps on the host (%llu shared), %lld on the device\n",
           (long long)d4.logit_forwards, (unsigned long long)d4.st.sample_parallel_steps,
           (long long)d4.pick_forwards);
    free_run(&d1, rd1, NREQ);
    free_run(&d4, rd4, NREQ);
    free_run(&da, rda, NREQ);
    free_run(&serial, serial_r, NREQ);
}

/* ---- error: a bad row in a shared step ------------------------------------------ */

static void test_error(void)
{
    /* A (prompt 8) makes a row at position 12 at its sixth pick; the 32
     * others (prompts of 14..29) make none there. */
    enum { N = 33, POS = 12 };
    int32_t prompts[N][32];
    sched_request q[N];
    for (int i = 0; i < N; i++) {
        int32_t n = i ? 14 + (i % 16) : 8;
        fill_prompt(prompts[i], n, 500 + (uint64_t)i);
        h_request(&q[i], prompts[i], n, i ? 16 : 20, NULL);
        q[i].sampling.seed = 9 + (uint64_t)i;
        if (i % 3 != 1)
            q[i].sampling.temperature = 0.9f;
        if (i % 4 == 0)
            q[i].sampling.repetition_penalty = 1.1f;
    }
    fake_backend *ref = fake_backend_create(TV, CTX, 0, 0);
    int32_t want[CTX];
    int32_t n_want = fake_reference(ref, q[0].prompt, 8, POS - 8 + 1, &q[0].sampling, NULL, 0,
                                    want);
    backend_destroy(&ref->base);
    for (int kind = 0; kind < 2; kind++) {
        trun runs[2] = {trun_opts(1), trun_opts(4)};
        rec r[2][N];
        for (int k = 0; k < 2; k++) {
            char what[64];
            snprintf(what, sizeof what, "error (%s), %d threads", kind ? "-inf" : "NaN",
                     runs[k].threads);
            runs[k].poison_pos = POS;
            runs[k].poison_token = kind ? -1 : 7;
            run_batch(&runs[k], N, q, r[k], what);
            CHECK(r[k][0].finish == SCHED_FINISH_ERROR, "%s: A finished with %d", what,
                  r[k][0].finish);
            CHECK(r[k][0].n == n_want &&
                      !memcmp(r[k][0].tokens, want, sizeof(int32_t) * (size_t)n_want),
                  "%s: A delivered %d tokens, want the reference's first %d", what, r[k][0].n,
                  n_want);
            const char *needle =
                kind ? "sample_pick: every logit is -inf" : "sample_pick: logit of token 7 is ";
            CHECK(strstr(r[k][0].message, needle) == r[k][0].message, "%s: message '%s'", what,
                  r[k][0].message);
            for (int i = 1; i < N; i++)
                CHECK(r[k][i].finish == SCHED_FINISH_LENGTH, "%s: request %d finished with %d",
                      what, i, r[k][i].finish);
            check_outputs(r[k] + 1, q + 1, N - 1, what);
        }
        CHECK(!strcmp(r[0][0].message, r[1][0].message), "messages differ: '%s' and '%s'",
              r[0][0].message, r[1][0].message);
        check_logs(runs[1].log, runs[1].n_log, runs[0].log, runs[0].n_log,
                   kind ? "error (-inf)" : "error (NaN)");
        CHECK(runs[1].st.sample_parallel_steps > 0, "no shared step");
        for (int k = 0; k < 2; k++)
            free_run(&runs[k], r[k], N);
    }
}

/* ---- cancel ---------------------------------------------------------------------- */

/* Is r's output a prefix of q's reference? */
static int is_prefix(const fake_backend *ref, rec *r, const sched_request *q)
{
    int32_t out[CTX];
    int32_t n = fake_reference(ref, q->prompt, q->n_prompt, q->max_tokens, &q->sampling,
                               q->stop_ids, q->n_stop_ids, out);
    return r->n <= n && !memcmp(r->tokens, out, sizeof(int32_t) * (size_t)r->n);
}

typedef struct canceller {
    sched *s;
    rec *r;
    int n;
    int32_t at_cancel[NREQ];
} canceller;

/* Cancel every other request, one every half millisecond, while the
 * engine thread samples; note what each had received. */
static void *cancel_main(void *arg)
{
    canceller *c = arg;
    for (int i = 0; i < c->n; i += 2) {
        h_sleep_ms(0.5);
        sched_cancel(c->s, c->r[i].id);
        c->at_cancel[i] = rec_count(&c->r[i]);
    }
    return NULL;
}

static void test_cancel(void)
{
    int32_t prompts[NREQ][MAXP], stops[NREQ];
    sched_request q[NREQ];
    make_requests(q, prompts, stops, 77);

    /* From a callback: when request 20 gets its 5th token, cancel 10 and
     * 30, whose rows of that step come before and after its own: every
     * row was picked before the first was delivered on the shared path,
     * the cancel takes effect at the next step on both. The same events
     * on every path. */
    g_hook.on_id = 20;
    g_hook.at_token = 5;
    g_hook.ids[0] = 10;
    g_hook.ids[1] = 30;
    g_hook.n = 2;
    rec r1[NREQ], r4[NREQ];
    trun o1 = trun_opts(1), o4 = trun_opts(4);
    run_batch(&o1, NREQ, q, r1, "cancel from a callback, 1 thread");
    run_batch(&o4, NREQ, q, r4, "cancel from a callback, 4 threads");
    g_hook.n = 0;
    check_logs(o4.log, o4.n_log, o1.log, o1.n_log, "cancel from a callback");
    CHECK(o4.st.sample_parallel_steps > 0, "cancel from a callback: no shared step");
    fake_backend *ref = fake_backend_create(TV, CTX, 0, 0);
    for (int i = 0; i < NREQ; i++) {
        if (i == 9 || i == 29) {
            CHECK(r4[i].finish == SCHED_FINISH_CANCELLED && r4[i].n_finished_events == 1,
                  "request %d: finish %d, %d FINISHED events", i + 1, r4[i].finish,
                  r4[i].n_finished_events);
            CHECK(is_prefix(ref, &r4[i], &q[i]), "request %d: not a prefix of its reference",
                  i + 1);
        } else {
            check_output(ref, &r4[i], &q[i], "cancel from a callback");
        }
    }
    CHECK(o4.st.cancelled == 2, "%llu cancelled", (unsigned long long)o4.st.cancelled);
    printf("cancel from a callback: requests 10 and 30 ended after %d and %d tokens\n", r4[9].n,
           r4[29].n);
    free_run(&o1, r1, NREQ);
    free_run(&o4, r4, NREQ);

    /* From another thread while steps sample (a large vocabulary: most of
     * a step is sampling), then a destroy with work in flight. */
    enum { BIG_V = 8192 };
    fake_backend *big_ref = fake_backend_create(BIG_V, CTX, 0, 0);
    for (int round = 0; round < 2; round++) {
        const char *what = round ? "destroy while sampling" : "cancel while sampling";
        fake_backend *fb = fake_backend_create(BIG_V, CTX, 0, 0);
        sched_config cfg;
        batch_config(&cfg, 4);
        cfg.on_tick = NULL;
        sched *s = start(fb, &cfg);
        rec r[NREQ];
        h_n_finished = 0;
        for (int i = 0; i < NREQ; i++) {
            rec_init(&r[i], 256);
            q[i].user = &r[i];
            q[i].on_event = rec_on_event;
            q[i].max_tokens = 80;
            q[i].n_stop_ids = 0;
            CHECK(sched_submit(s, &q[i], &r[i].id, NULL) == 0, "%s: submit", what);
        }
        while (rec_count(&r[NREQ - 1]) < 2)
            h_sleep_ms(0.2);
        canceller c = {.s = s, .r = r, .n = round ? 0 : NREQ};
        pthread_t th;
        pthread_create(&th, NULL, cancel_main, &c);
        pthread_join(th, NULL);
        sched_stats st;
        if (round == 0) {
            CHECK(h_wait_finished(NREQ, 120), "%s: %d of %d finished", what, h_n_finished, NREQ);
            check_idle(s, fb, what);
            wait_stats(s, NREQ, &st);
            sched_destroy(s);
        } else {
            sched_get_stats(s, &st);
            sched_destroy(s);
            CHECK(h_n_finished == NREQ, "%s: %d of %d got FINISHED", what, h_n_finished, NREQ);
        }
        int cancelled = 0;
        for (int i = 0; i < NREQ; i++) {
            CHECK(r[i].n_finished_events == 1 && r[i].n_after_finish == 0,
                  "%s: request %d: %d FINISHED events, %d after", what, i, r[i].n_finished_events,
                  r[i].n_after_finish);
            CHECK(is_prefix(big_ref, &r[i], &q[i]), "%s: request %d is not its reference's prefix",
                  what, i);
            cancelled += r[i].finish == SCHED_FINISH_CANCELLED;
            if (round == 0 && i % 2 == 0)
                CHECK((r[i].finish == SCHED_FINISH_CANCELLED && r[i].n <= c.at_cancel[i] + 1) ||
                          (r[i].finish == SCHED_FINISH_LENGTH && r[i].n == q[i].max_tokens),
                      "%s: request %d: finish %d with %d tokens, %d at the cancel", what, i,
                      r[i].finish, r[i].n, c.at_cancel[i]);
            if (round == 0 && i % 2 == 1)
                check_output(big_ref, &r[i], &q[i], what);
        }
        if (round == 0)
            CHECK(st.cancelled == (uint64_t)cancelled && cancelled > 0,
                  "%s: stats say %llu cancelled, the events %d", what,
                  (unsigned long long)st.cancelled, cancelled);
        printf("%s: %d cancelled, %llu shared steps, %llu rows off the engine thread\n", what,
               cancelled, (unsigned long long)st.sample_parallel_steps,
               (unsigned long long)st.sample_rows_helped);
        backend_destroy(&fb->base);
        for (int i = 0; i < NREQ; i++)
            rec_free(&r[i]);
    }
    backend_destroy(&big_ref->base);
    backend_destroy(&ref->base);
}

/* ---- lifecycle --------------------------------------------------------------------- */

static int count_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static void test_lifecycle(void)
{
    fake_backend *fb = fake_backend_create(TV, CTX, 0, 0);
    sched_config cfg;
    lm_err err = {0};
    sched *s = NULL;

    /* the count, resolved and bounded */
    static const struct {
        int32_t threads, max_running, want;
    } counts[] = {{1, 64, 1}, {3, 64, 3}, {8, 6, 6}, {8, 1, 1}, {256, 512, 256}, {0, 1, 1}};
    for (size_t k = 0; k < sizeof counts / sizeof counts[0]; k++) {
        batch_config(&cfg, counts[k].threads);
        cfg.on_tick = NULL;
        cfg.max_running = counts[k].max_running;
        fake_backend *f = fake_backend_create(TV, CTX, 0, 0);
        s = start(f, &cfg);
        sched_stats st;
        sched_get_stats(s, &st);
        CHECK(st.sample_threads == counts[k].want,
              "sample_threads %d, max_running %d: %d threads, want %d", counts[k].threads,
              counts[k].max_running, st.sample_threads, counts[k].want);
        sched_destroy(s);
        backend_destroy(&f->base);
    }
    batch_config(&cfg, 0);
    cfg.on_tick = NULL;
    fake_backend *f = fake_backend_create(TV, CTX, 0, 0);
    s = start(f, &cfg);
    sched_stats st;
    sched_get_stats(s, &st);
    CHECK(st.sample_threads == auto_threads(64), "automatic: %d threads, want %d",
          st.sample_threads, auto_threads(64));
    sched_destroy(s);
    backend_destroy(&f->base);

    /* bad values */
    static const int32_t bad[] = {-1, SCHED_MAX_SAMPLE_THREADS + 1};
    for (size_t k = 0; k < 2; k++) {
        batch_config(&cfg, bad[k]);
        s = NULL;
        int rc = sched_create(&fb->base, &cfg, &s, &err);
        CHECK(rc == -EINVAL && !s && strstr(err.msg, "sample_threads"),
              "sample_threads %d: %d '%s'", bad[k], rc, err.msg);
    }
    backend_destroy(&fb->base);

    /* 200 cycles, every fourth with requests in flight at destroy */
    const int before = count_threads();
    int32_t prompt[12];
    fill_prompt(prompt, 12, 3);
    for (int it = 0; it < 200; it++) {
        fb = fake_backend_create(TV, CTX, 0, 0);
        batch_config(&cfg, 1 + it % 8);
        cfg.on_tick = NULL;
        s = start(fb, &cfg);
        if (it % 4 == 0) {
            rec r[16];
            sched_request q[16];
            h_n_finished = 0;
            for (int i = 0; i < 16; i++) {
                rec_init(&r[i], 64);
                h_request(&q[i], prompt, 12, 40, &r[i]);
                q[i].sampling.temperature = 1.0f;
                q[i].sampling.seed = (uint64_t)i;
                CHECK(sched_submit(s, &q[i], &r[i].id, NULL) == 0, "cycle %d: submit", it);
            }
            if (it % 8 == 0)
                while (rec_count(&r[15]) < 1)
                    h_sleep_ms(0.1);
            sched_destroy(s);
            CHECK(h_n_finished == 16, "cycle %d: %d of 16 got FINISHED", it, h_n_finished);
            for (int i = 0; i < 16; i++)
                rec_free(&r[i]);
        } else {
            sched_destroy(s);
        }
        backend_destroy(&fb->base);
    }
    const int after = count_threads();
    CHECK(before > 0 && after == before, "threads: %d before 200 create/destroy cycles, %d after",
          before, after);
    printf("lifecycle: %d threads before and %d after 200 cycles\n", before, after);
}

static const h_named_test tests[] = {
    {"same", test_same},
    {"error", test_error},
    {"cancel", test_cancel},
    {"lifecycle", test_lifecycle},
};

int main(int argc, char **argv)
{
    g_log = calloc(LOG_CAP, sizeof *g_log);
    if (!g_log)
        return 1;
    int rc = h_run_named("test_sched_threads", tests, sizeof tests / sizeof tests[0], argc, argv);
    free(g_log);
    return rc;
}
