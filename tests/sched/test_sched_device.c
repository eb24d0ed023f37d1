/*
 * test_sched_device.c: the scheduler with sampling on the device
 * (backend_info.device_sampling), over the fake backend, which then makes
 * each pick itself from the penalty list and draw the scheduler sends.
 *
 *   test_sched_device NAME   runs one test (ctest registers each), no NAME = all.
 *
 *   same      requests of every sampling kind, batched, several seeds: the
 *             outputs equal fake_reference's (sample_pick on the host) and
 *             those of the same run without device sampling;
 *   fallback  steps whose penalty lists exceed max_penalties sample on the
 *             host, without a draw taken first: the outputs are the same;
 *             a row whose list bound exceeds the room but whose list fits
 *             stays on the device;
 *   error     a NaN or all -inf row fails its request alone, with the host
 *             sampler's message, on either path.
 *
 * Every run ends with the idle checks (no KV block used, no protocol
 * error seen by the fake backend).
 */
#include <stdatomic.h>

#include "tests/sched/fake_harness.h"

/* How a run's fake backend is set, and what it saw. */
typedef struct dev_run {
    int device;                 /* the backend reports device sampling */
    int32_t max_penalties;
    int32_t poison_pos, poison_token; /* see fake_backend.h; poison_pos -1 = off */
    int64_t pick_forwards, logit_forwards;
    int32_t max_penalties_seen;
} dev_run;

static dev_run run_opts(int device, int32_t max_penalties)
{
    return (dev_run){.device = device, .max_penalties = max_penalties, .poison_pos = -1};
}

/*
 * Run requests q[0, n) to the end over a fresh fake backend set from o,
 * recording into r[0, n) (initialised here; the caller frees them). The
 * first step waits at the gate until every request is queued, so that they
 * run batched.
 */
static void run_set(dev_run *o, int n, sched_request *q, rec *r, const char *what)
{
    fake_backend *fb = fake_backend_create(VOCAB, CTX, 0, 0);
    fb->device_sampling = o->device;
    fb->max_penalties = o->max_penalties;
    fb->poison_pos = o->poison_pos;
    fb->poison_token = o->poison_token;
    sched_config cfg;
    base_config(&cfg);
    cfg.max_running = 16;
    sched *s = start(fb, &cfg);
    h_n_finished = 0;
    atomic_store(&fb->gate_closed, 1);
    for (int i = 0; i < n; i++) {
        rec_init(&r[i], 128);
        q[i].user = &r[i];
        lm_err err = {0};
        CHECK(sched_submit(s, &q[i], &r[i].id, &err) == 0, "%s: submit %d: %s", what, i,
              err.msg);
    }
    h_sleep_ms(5);
    atomic_store(&fb->gate_closed, 0);
    CHECK(h_wait_finished(n, 20), "%s: %d of %d finished", what, h_n_finished, n);
    check_idle(s, fb, what);
    sched_destroy(s);
    o->pick_forwards = fb->pick_forwards;
    o->logit_forwards = fb->logit_forwards;
    o->max_penalties_seen = fb->max_penalties_seen;
    backend_destroy(&fb->base);
}

/* Two runs of the same requests gave the same tokens and the same end. */
static void check_same(const rec *a, const rec *b, int n, const char *what)
{
    for (int i = 0; i < n; i++) {
        int same = a[i].n == b[i].n && a[i].finish == b[i].finish &&
                   !memcmp(a[i].tokens, b[i].tokens, sizeof(int32_t) * (size_t)a[i].n);
        CHECK(same, "%s: request %d differs between the paths (%d vs %d tokens)", what, i,
              a[i].n, b[i].n);
    }
}

static void free_recs(rec *r, int n)
{
    for (int i = 0; i < n; i++)
        rec_free(&r[i]);
}

/* ---- same: device picks = host picks ----------------------------------------- */

enum { NSET = 12, SET_PROMPT = 48 };

/* Twelve requests: greedy, every filter, every penalty, alone and together;
 * prompts of 5..38 tokens; seeds from `seed`. */
static void make_set(sched_request *q, int32_t prompts[][SET_PROMPT], uint64_t seed)
{
    for (int i = 0; i < NSET; i++) {
        int32_t n = 5 + 3 * i;
        fill_prompt(prompts[i], n, seed * 31 + (uint64_t)i);
        h_request(&q[i], prompts[i], n, 16 + (i % 4) * 4, NULL);
        sample_params *p = &q[i].sampling;
        p->seed = seed + (uint64_t)i;
        switch (i) {
        case 0: break; /* greedy */
        case 1: p->repetition_penalty = 1.3f; break;
        case 2: p->temperature = 1.0f; break;
        case 3: p->temperature = 0.7f; p->top_k = 10; break;
        case 4: p->temperature = 1.2f; p->top_p = 0.8f; break;
        case 5: p->temperature = 1.0f; p->min_p = 0.1f; break;
        case 6: p->temperature = 0.9f; p->repetition_penalty = 1.2f; break;
        case 7: p->temperature = 1.0f; p->presence_penalty = 0.5f; break;
        case 8: p->temperature = 1.0f; p->frequency_penalty = 0.7f; break;
        case 9:
            p->temperature = 0.8f;
            p->top_k = 20;
            p->top_p = 0.9f;
            p->min_p = 0.05f;
            p->repetition_penalty = 1.1f;
            p->presence_penalty = 0.3f;
            p->frequency_penalty = 0.2f;
            p->logprobs = 5;
            break;
        case 10: p->presence_penalty = 1.5f; p->frequency_penalty = 1.0f; break; /* greedy */
        case 11: p->temperature = 1.5f; p->repetition_penalty = 0.8f; break;
        }
    }
}

static void test_same(void)
{
    static const uint64_t seeds[] = {1, 1000, 77777};
    fake_backend *ref = fake_backend_create(VOCAB, CTX, 0, 0); /* for fake_reference */
    for (size_t k = 0; k < sizeof seeds / sizeof seeds[0]; k++) {
        int32_t prompts[NSET][SET_PROMPT];
        sched_request q[NSET];
        rec dev[NSET], host[NSET];
        make_set(q, prompts, seeds[k]);
        dev_run od = run_opts(1, 4096), oh = run_opts(0, 0);
        run_set(&od, NSET, q, dev, "same, device");
        run_set(&oh, NSET, q, host, "same, host");
        for (int i = 0; i < NSET; i++) {
            check_output(ref, &dev[i], &q[i], "same, device");
            check_output(ref, &host[i], &q[i], "same, host");
        }
        check_same(dev, host, NSET, "same");
        CHECK(od.pick_forwards > 0 && od.logit_forwards == 0,
              "device run: %lld forwards with picks, %lld with logits",
              (long long)od.pick_forwards, (long long)od.logit_forwards);
        CHECK(od.max_penalties_seen > 0, "device run sent no penalty entry");
        CHECK(oh.pick_forwards == 0 && oh.logit_forwards > 0, "host run: %lld with picks",
              (long long)oh.pick_forwards);
        printf("same (seed %llu): %lld steps picked on the device, up to %d penalty entries\n",
               (unsigned long long)seeds[k], (long long)od.pick_forwards, od.max_penalties_seen);
        free_recs(dev, NSET);
        free_recs(host, NSET);
    }
    backend_destroy(&ref->base);
}

/* ---- fallback: lists over max_penalties ---------------------------------------- */

static void test_fallback(void)
{
    fake_backend *ref = fake_backend_create(VOCAB, CTX, 0, 0);

    /*
     * The twelve requests, under a room that holds all of their lists, some
     * steps' lists, one row's list or none. Sampled requests without
     * penalties come first (lowest ids: their rows precede the long lists),
     * so a draw taken before the step falls back shows in their outputs.
     * The host run is the yardstick.
     */
    static const int32_t rooms[] = {0, 8, 40, 4096};
    int32_t prompts[NSET][SET_PROMPT];
    sched_request q[NSET];
    make_set(q, prompts, 5);
    /* request 0 sampled without penalties, and longest: alone at the end */
    q[0].sampling.temperature = 1.0f;
    q[0].max_tokens = 60;
    rec host[NSET];
    dev_run oh = run_opts(0, 0);
    run_set(&oh, NSET, q, host, "fallback, host");
    for (size_t k = 0; k < sizeof rooms / sizeof rooms[0]; k++) {
        rec dev[NSET];
        dev_run od = run_opts(1, rooms[k]);
        char what[64];
        snprintf(what, sizeof what, "fallback, max_penalties %d", rooms[k]);
        run_set(&od, NSET, q, dev, what);
        for (int i = 0; i < NSET; i++)
            check_output(ref, &dev[i], &q[i], what);
        check_same(dev, host, NSET, what);
        CHECK(od.max_penalties_seen <= rooms[k], "%s: a step sent %d entries", what,
              od.max_penalties_seen);
        if (rooms[k] < 4096)
            CHECK(od.logit_forwards > 0 && od.pick_forwards > 0,
                  "%s: %lld steps on the host, %lld on the device (want both)", what,
                  (long long)od.logit_forwards, (long long)od.pick_forwards);
        else
            CHECK(od.logit_forwards == 0, "%s: %lld steps fell back", what,
                  (long long)od.logit_forwards);
        printf("fallback (max_penalties %d): %lld steps on the host, %lld on the device\n",
               rooms[k], (long long)od.logit_forwards, (long long)od.pick_forwards);
        free_recs(dev, NSET);
    }
    free_recs(host, NSET);

    /*
     * Two requests whose prompts repeat three ids: the bound of each list
     * (min(vocab, prompt + output) = 61) exceeds a room of 30, the lists
     * themselves (at most 3 + 12 entries each) fit together: no fallback.
     */
    int32_t p2[2][60];
    sched_request q2[2];
    rec r2[2];
    for (int i = 0; i < 2; i++) {
        for (int t = 0; t < 60; t++)
            p2[i][t] = 1 + 3 * i + (t * 7 + t / 5) % 3;
        h_request(&q2[i], p2[i], 60, 12, NULL);
        q2[i].sampling.temperature = 1.0f;
        q2[i].sampling.seed = 40 + (uint64_t)i;
        q2[i].sampling.repetition_penalty = 1.4f;
        q2[i].sampling.frequency_penalty = 0.3f;
    }
    dev_run ob = run_opts(1, 30);
    run_set(&ob, 2, q2, r2, "fallback, bound over the room");
    for (int i = 0; i < 2; i++)
        check_output(ref, &r2[i], &q2[i], "fallback, bound over the room");
    CHECK(ob.logit_forwards == 0 && ob.pick_forwards > 0,
          "lists that fit fell back: %lld steps on the host", (long long)ob.logit_forwards);
    CHECK(ob.max_penalties_seen > 3 && ob.max_penalties_seen <= 30, "%d entries in a step",
          ob.max_penalties_seen);
    free_recs(r2, 2);
    backend_destroy(&ref->base);
}

/* ---- error: a row that cannot be sampled --------------------------------------- */

static void test_error(void)
{
    fake_backend *ref = fake_backend_create(VOCAB, CTX, 0, 0);
    /* A (prompt 8) reaches position 12 at its sixth pick: 5 tokens, then
     * the error; B and C (prompts 20) never make a row there. */
    enum { N = 3, POS = 12 };
    int32_t pa[8], pb[20], pc[20];
    fill_prompt(pa, 8, 11);
    fill_prompt(pb, 20, 12);
    fill_prompt(pc, 20, 13);
    sched_request q[N];
    h_request(&q[0], pa, 8, 20, NULL);
    q[0].sampling.temperature = 1.0f;
    q[0].sampling.seed = 3;
    q[0].sampling.repetition_penalty = 1.1f; /* so that max_penalties 0 falls back */
    h_request(&q[1], pb, 20, 20, NULL);
    h_request(&q[2], pc, 20, 20, NULL);
    q[2].sampling.temperature = 0.9f;
    q[2].sampling.seed = 4;
    q[2].sampling.top_k = 12;
    int32_t want[CTX];
    int32_t n_want = fake_reference(ref, pa, 8, POS - 8 + 1, &q[0].sampling, NULL, 0, want);
    CHECK(n_want == POS - 8 + 1, "reference of A: %d tokens", n_want);

    for (int kind = 0; kind < 2; kind++) {
        char host_msg[256] = "";
        /* host; device; device with every step of A falling back */
        for (int path = 0; path < 3; path++) {
            dev_run o = run_opts(path > 0, path == 1 ? 4096 : 0);
            o.poison_pos = POS;
            o.poison_token = kind ? -1 : 7;
            char what[64];
            snprintf(what, sizeof what, "error (%s), %s", kind ? "-inf" : "NaN",
                     path == 0 ? "host" : path == 1 ? "device" : "device fallback");
            rec r[N];
            run_set(&o, N, q, r, what);
            CHECK(r[0].finish == SCHED_FINISH_ERROR, "%s: A finished with %d", what,
                  r[0].finish);
            CHECK(r[0].n == n_want && !memcmp(r[0].tokens, want, sizeof(int32_t) * (size_t)n_want),
                  "%s: A delivered %d tokens, want the reference's first %d", what, r[0].n,
                  n_want);
            const char *needle = kind ? "sample_pick: every logit is -inf"
                                      : "sample_pick: logit of token 7 is ";
            CHECK(strstr(r[0].message, needle) == r[0].message &&
                      (kind || strstr(r[0].message, "nan")),
                  "%s: message '%s'", what, r[0].message);
            if (path == 0)
                snprintf(host_msg, sizeof host_msg, "%s", r[0].message);
            else
                CHECK(!strcmp(r[0].message, host_msg), "%s: message '%s', host path's '%s'",
                      what, r[0].message, host_msg);
            for (int i = 1; i < N; i++) {
                CHECK(r[i].finish == SCHED_FINISH_LENGTH, "%s: request %d finished with %d (%s)",
                      what, i, r[i].finish, r[i].message);
                check_output(ref, &r[i], &q[i], what);
            }
            if (path == 1)
                CHECK(o.pick_forwards > 0 && o.logit_forwards == 0,
                      "%s: %lld steps fell back", what, (long long)o.logit_forwards);
            if (path == 2)
                CHECK(o.logit_forwards > 0, "%s: no step fell back", what);
            free_recs(r, N);
        }
    }
    backend_destroy(&ref->base);
}

static const h_named_test tests[] = {
    {"same", test_same},
    {"fallback", test_fallback},
    {"error", test_error},
};

int main(int argc, char **argv)
{
    return h_run_named("test_sched_device", tests, sizeof tests / sizeof tests[0], argc, argv);
}
