/*
 * bench_sched_sample.c: a scheduler step's host sampling with 1 vs N
 * threads (sched_config.sample_threads).
 *
 *   bench_sched_sample [--vocab N] [--batch N] [--threads 1,2] [--steps N] [--reps N]
 *                      [--setting greedy|t1|top_p|top_k|penalties] [--crossover]
 *
 * Steps mode (default): a simulated device whose forward copies one
 * language-model-like row (bench_sample's: a body in [-3, 3), one token in
 * 1024 raised by 14) into every logits row, nothing else; --batch requests
 * of 8 prompt tokens decode together (all in one step: the batch stays
 * whole to the end). After each step the engine thread's on_tick reads the
 * step's sample-and-deliver time (sched_stats.last_sample_ms); steps with
 * all --batch rows count. Per thread count: median, best and 90th
 * percentile over --reps runs of --steps steps, thread counts alternating
 * run by run (a shared machine's noise falls on all of them alike).
 *
 * --crossover: the sampling pool (ops_cpu.h's cpu_pool) alone, picks of 1 to 32 rows (each a fresh copy
 * of the row, then sample_pick) on 1 thread vs 2, at vocabularies of 384
 * to --vocab: where sharing a step starts to pay.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/sample.h"
#include "engine/sched.h"
#include "engine/ops_cpu.h"

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* bench_sample's row: a broad body and one token in 1024 raised by 14. */
static float *make_row(int32_t V)
{
    float *src = malloc(sizeof(float) * (size_t)V);
    uint32_t x = 12345;
    for (int32_t i = 0; src && i < V; i++) {
        x = x * 1664525u + 1013904223u;
        const float u = (float)(x >> 8) / 16777216.0f;
        src[i] = 6.0f * u - 3.0f + ((x & 1023) == 7 ? 14.0f : 0.0f);
    }
    return src;
}

/* ---- simulated device: every logits row is the same row ------------------------ */

typedef struct copy_backend {
    backend base;
    int32_t vocab;
    const float *src;           /* [vocab] */
} copy_backend;

static int cb_kv_init(backend *b, int32_t bs, int32_t n, lm_err *err)
{
    return 0;
}
static int cb_kv_copy(backend *b, int32_t s, int32_t d, lm_err *err)
{
    return 0;
}
static int cb_forward(backend *b, const backend_batch *bt, lm_err *err)
{
    const copy_backend *cb = (const copy_backend *)b;
    for (int32_t r = 0; r < bt->n_logits; r++)
        memcpy(bt->logits + (size_t)r * cb->vocab, cb->src, sizeof(float) * (size_t)cb->vocab);
    return 0;
}
static void cb_info(const backend *b, backend_info *ret)
{
    const copy_backend *cb = (const copy_backend *)b;
    *ret = (backend_info){.name = "copy", .vocab = cb->vocab, .max_context = 4096,
                          .tensor_parallel = 1, .kv_bytes_per_token = 64};
}
static void cb_destroy(backend *b)
{
}
static const backend_ops cb_ops = {cb_kv_init, cb_kv_copy, cb_forward, cb_info, cb_destroy};

/* ---- steps mode ------------------------------------------------------------------ */

static _Atomic(sched *) g_sched;
static int32_t g_batch;
static double *g_ms;            /* [cap] sample ms of the full steps */
static int g_n_ms, g_cap_ms;
static uint64_t g_tokens_seen;
static atomic_int g_finished;

static void on_tick(void *user)
{
    sched *s = atomic_load(&g_sched);
    if (!s)
        return;
    sched_stats st;
    sched_get_stats(s, &st);
    if (st.tokens_generated - g_tokens_seen == (uint64_t)g_batch && g_n_ms < g_cap_ms)
        g_ms[g_n_ms++] = st.last_sample_ms;
    g_tokens_seen = st.tokens_generated;
}

static void on_event(void *user, const sched_event *ev)
{
    if (ev->type == SCHED_EVENT_FINISHED)
        atomic_fetch_add(&g_finished, 1);
}

static void set_params(sample_params *p, const char *setting, uint64_t seed)
{
    sample_params_default(p);
    p->seed = seed;
    if (!strcmp(setting, "t1")) {
        p->temperature = 1.0f;
    } else if (!strcmp(setting, "top_p")) {
        p->temperature = 0.7f;
        p->top_p = 0.9f;
    } else if (!strcmp(setting, "top_k")) {
        p->temperature = 0.7f;
        p->top_k = 50;
        p->top_p = 0.9f;
    } else if (!strcmp(setting, "penalties")) {
        p->temperature = 0.7f;
        p->top_p = 0.9f;
        p->min_p = 0.05f;
        p->repetition_penalty = 1.1f;
        p->logprobs = 5;
    }
}

/* One run: batch requests, steps decode steps; appends to g_ms. */
static int run_steps(copy_backend *cb, int32_t threads, int32_t steps, const char *setting,
                     uint64_t seed)
{
    sched_config cfg;
    sched_config_default(&cfg);
    cfg.max_running = g_batch;
    cfg.max_queue = g_batch;
    cfg.max_step_tokens = 8 * g_batch;
    cfg.prefill_chunk = 8;
    cfg.target_itl_ms = 0;
    cfg.kv_bytes = (size_t)g_batch * (8 + steps + 1) * 64 * 2;
    cfg.sample_threads = threads;
    cfg.on_tick = on_tick;
    cfg.idle_tick_ms = 1;
    sched *s = NULL;
    lm_err err = {0};
    if (sched_create(&cb->base, &cfg, &s, &err) < 0) {
        fprintf(stderr, "bench_sched_sample: %s\n", err.msg);
        return -1;
    }
    g_tokens_seen = 0;
    atomic_store(&g_finished, 0);
    atomic_store(&g_sched, s);
    int32_t prompt[8];
    for (int32_t i = 0; i < g_batch; i++) {
        for (int k = 0; k < 8; k++)
            prompt[k] = (int32_t)((i * 131 + k * 7919) % cb->vocab);
        sched_request q = {.prompt = prompt, .n_prompt = 8, .max_tokens = steps + 1,
                           .ignore_eos = 1, .on_event = on_event};
        set_params(&q.sampling, setting, seed + (uint64_t)i);
        if (sched_submit(s, &q, NULL, &err) < 0) {
            fprintf(stderr, "bench_sched_sample: %s\n", err.msg);
            sched_destroy(s);
            return -1;
        }
    }
    while (atomic_load(&g_finished) < g_batch) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    sched_stats st;
    sched_get_stats(s, &st);
    atomic_store(&g_sched, NULL);
    sched_destroy(s);
    return st.sample_threads;
}

static int parse_list(const char *s, int32_t *out, int max)
{
    int n = 0;
    for (const char *p = s; *p && n < max;) {
        out[n++] = atoi(p);
        p = strchr(p, ',');
        if (!p)
            break;
        p++;
    }
    return n;
}

/* ---- crossover mode ----------------------------------------------------------------- */

enum { CROSS_MAX_ROWS = 32 };

typedef struct cross_ctx {
    int32_t vocab;
    const float *src;
    float *rows;                /* [CROSS_MAX_ROWS][vocab] */
    sample_params p;
    sample_rng rng[CROSS_MAX_ROWS];
    cpu_pool *pool;
} cross_ctx;

static void cross_row(void *ctx, int64_t b, int64_t e, int thread)
{
    cross_ctx *c = ctx;
    size_t floats;
    void *scratch = cpu_pool_scratch(c->pool, thread, &floats);
    for (int64_t r = b; r < e; r++) {
        float *row = c->rows + (size_t)r * c->vocab;
        memcpy(row, c->src, sizeof(float) * (size_t)c->vocab);
        sample_result res;
        sample_pick(row, c->vocab, &c->p, &c->rng[r], NULL, 0, NULL, 0, scratch, &res, NULL);
    }
}

static int crossover(int32_t big_v, int reps, const char *setting)
{
    const int32_t vocabs[] = {384, 1024, 4096, 16384, big_v};
    const int32_t rows[] = {1, 2, 3, 4, 6, 8, 16, 32};
    printf("| vocabulary | rows | 1 thread us | 2 threads us | ratio |\n|---|---|---|---|---|\n");
    double *t1 = malloc(sizeof(double) * (size_t)reps), *t2 = malloc(sizeof(double) * (size_t)reps);
    for (size_t k = 0; k < sizeof vocabs / sizeof vocabs[0]; k++) {
        const int32_t V = vocabs[k];
        cross_ctx c = {.vocab = V, .src = make_row(V)};
        c.rows = malloc(sizeof(float) * CROSS_MAX_ROWS * (size_t)V);
        set_params(&c.p, setting, 1);
        for (int i = 0; i < CROSS_MAX_ROWS; i++)
            sample_rng_seed(&c.rng[i], (uint64_t)i + 1);
        lm_err err = {0};
        if (!c.src || !c.rows || cpu_pool_create(2, &c.pool, &err) < 0 ||
            cpu_pool_reserve(c.pool, (sample_scratch_bytes(V) + 3) / 4, &err) < 0) {
            fprintf(stderr, "bench_sched_sample: %s\n", err.msg[0] ? err.msg : "out of memory");
            return 1;
        }
        for (size_t j = 0; j < sizeof rows / sizeof rows[0]; j++) {
            const int32_t n = rows[j];
            for (int r = 0; r < reps; r++) {
                int64_t a = now_ns();
                cpu_pool_run(c.pool, cross_row, &c, n, n); /* one chunk: the caller alone */
                int64_t b = now_ns();
                cpu_pool_run(c.pool, cross_row, &c, n, 1);
                int64_t e = now_ns();
                t1[r] = (double)(b - a) / 1e3;
                t2[r] = (double)(e - b) / 1e3;
            }
            qsort(t1, (size_t)reps, sizeof *t1, cmp_d);
            qsort(t2, (size_t)reps, sizeof *t2, cmp_d);
            printf("| %d | %d | %.1f | %.1f | %.2f |\n", V, n, t1[reps / 2], t2[reps / 2],
                   t2[reps / 2] / t1[reps / 2]);
        }
        cpu_pool_destroy(c.pool);
        free((void *)c.src);
        free(c.rows);
    }
    free(t1);
    free(t2);
    return 0;
}

int main(int argc, char **argv)
{
    int32_t V = 151936, steps = 20, threads[8] = {1, 2};
    int n_threads = 2, reps = 3, cross = 0;
    const char *setting = "top_p";
    g_batch = 128;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--crossover")) {
            cross = 1;
            continue;
        }
        if (!v)
            goto usage;
        if (!strcmp(a, "--vocab"))
            V = atoi(v);
        else if (!strcmp(a, "--batch"))
            g_batch = atoi(v);
        else if (!strcmp(a, "--steps"))
            steps = atoi(v);
        else if (!strcmp(a, "--reps"))
            reps = atoi(v);
        else if (!strcmp(a, "--threads"))
            n_threads = parse_list(v, threads, 8);
        else if (!strcmp(a, "--setting"))
            setting = v;
        else
            goto usage;
        i++;
    }
    if (V < 2 || g_batch < 1 || steps < 1 || reps < 1 || n_threads < 1)
        goto usage;
    if (cross)
        return crossover(V, reps < 11 ? 51 : reps, setting);

    copy_backend cb = {.base.ops = &cb_ops, .vocab = V, .src = make_row(V)};
    g_cap_ms = reps * steps + 16;
    double *ms[8];
    int n_ms[8] = {0}, resolved[8] = {0};
    for (int t = 0; t < n_threads; t++)
        ms[t] = malloc(sizeof(double) * (size_t)g_cap_ms);
    g_ms = malloc(sizeof(double) * (size_t)g_cap_ms);
    if (!cb.src || !g_ms)
        return 1;
    for (int r = 0; r < reps; r++)
        for (int t = 0; t < n_threads; t++) {
            g_n_ms = 0;
            resolved[t] = run_steps(&cb, threads[t], steps, setting, 1000 * (uint64_t)r);
            if (resolved[t] < 0)
                return 1;
            memcpy(ms[t] + n_ms[t], g_ms, sizeof(double) * (size_t)g_n_ms);
            n_ms[t] += g_n_ms;
        }
    printf("step sampling at batch %d, vocabulary %d, setting %s: %d runs of %d steps per "
           "thread count\n\n",
           g_batch, V, setting, reps, steps);
    printf("| sample_threads | threads | steps | median ms | best ms | p90 ms | vs 1st |\n"
           "|---|---|---|---|---|---|---|\n");
    double base = 0;
    for (int t = 0; t < n_threads; t++) {
        qsort(ms[t], (size_t)n_ms[t], sizeof(double), cmp_d);
        const double med = n_ms[t] ? ms[t][n_ms[t] / 2] : 0;
        if (t == 0)
            base = med;
        printf("| %d | %d | %d | %.1f | %.1f | %.1f | %.2fx |\n", threads[t], resolved[t],
               n_ms[t], med, n_ms[t] ? ms[t][0] : 0, n_ms[t] ? ms[t][(n_ms[t] * 9) / 10] : 0,
               med > 0 ? base / med : 0);
        free(ms[t]);
    }
    free(g_ms);
    free((void *)cb.src);
    return 0;
usage:
    fprintf(stderr, "usage: bench_sched_sample [--vocab N] [--batch N] [--threads 1,2] "
                    "[--steps N] [--reps N] [--setting greedy|t1|top_p|top_k|penalties] "
                    "[--crossover]\n");
    return 2;
}
