/*
 * bench_sched.c: the scheduler under offered load.
 *
 * Poisson arrivals at each given rate for --duration seconds; prompts and
 * output lengths drawn uniformly from ranges; greedy, ignore_eos (so every
 * request produces exactly its max_tokens). For each (rate, mode) it prints
 * one markdown table row: completed requests, output tokens/s, inter-token
 * latency p50/p95/p99 (gaps between consecutive tokens of one request),
 * time to first token p50/p95, requests refused as overloaded, the mean
 * step budget the controller chose.
 *
 * Modes (--modes, comma list): `adaptive` (target --target ms, budget in
 * [--min-budget, --max-budget]) and `fixed:N` (budget N tokens per step,
 * batch limit min(max_running, N), controller off).
 *
 * Backends: --model DIR (a hub folder, e.g. from `lightmoe synth`) on the
 * CPU backend (the model is loaded once; each run opens a fresh backend,
 * whose KV cache is sized for that run); or --sim A,B: a simulated device that
 * sleeps A + B * tokens milliseconds per step (for looking at the
 * controller alone; its numbers are not engine performance).
 *
 *   bench_sched --model DIR --rates 2,4,8 --duration 10 --modes adaptive,fixed:512,fixed:32
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/sched.h"

#include "engine/backends.h"
#include "engine/model.h"

/* ---- simulated device ---------------------------------------------------- */

typedef struct sim_backend {
    backend base;
    double a_ms, b_ms;
    int32_t vocab;
} sim_backend;

static int sim_kv_init(backend *b, int32_t bs, int32_t n, lm_err *err)
{
    return 0;
}
static int sim_kv_copy(backend *b, int32_t s, int32_t d, lm_err *err)
{
    return 0;
}
static int sim_forward(backend *b, const backend_batch *bt, lm_err *err)
{
    sim_backend *sb = (sim_backend *)b;
    for (int32_t r = 0; r < bt->n_logits; r++)
        for (int32_t v = 0; v < sb->vocab; v++)
            bt->logits[(size_t)r * sb->vocab + v] = (float)((v * 7 + bt->n_tokens) % 13);
    double ms = sb->a_ms + sb->b_ms * bt->n_tokens;
    struct timespec ts = {(time_t)(ms / 1e3), (long)(fmod(ms, 1e3) * 1e6)};
    nanosleep(&ts, NULL);
    return 0;
}
static void sim_info(const backend *b, backend_info *ret)
{
    const sim_backend *sb = (const sim_backend *)b;
    *ret = (backend_info){.name = "sim", .vocab = sb->vocab, .max_context = 4096,
                          .tensor_parallel = 1, .kv_bytes_per_token = 1024};
}
static void sim_destroy(backend *b)
{
    free(b);
}
static const backend_ops sim_ops = {sim_kv_init, sim_kv_copy, sim_forward, sim_info,
                                    sim_destroy};

/* ---- recording ---------------------------------------------------------------- */

typedef struct req {
    int64_t t_submit, t_last, t_first;
    int32_t n;
    int done;
} req;

typedef struct run {
    pthread_mutex_t mu;
    double *itl;                /* [cap_itl] ms */
    size_t n_itl, cap_itl;
    double *ttft;               /* [n_req] ms */
    size_t n_ttft;
    int64_t tokens, done;
    int64_t t_last_token;
} run;

static run R;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void on_event(void *user, const sched_event *ev)
{
    req *q = user;
    int64_t t = now_ns();
    pthread_mutex_lock(&R.mu);
    if (ev->type == SCHED_EVENT_TOKEN) {
        if (q->n == 0) {
            q->t_first = t;
            R.ttft[R.n_ttft++] = (double)(t - q->t_submit) / 1e6;
        } else if (R.n_itl < R.cap_itl) {
            R.itl[R.n_itl++] = (double)(t - q->t_last) / 1e6;
        }
        q->t_last = t;
        q->n++;
        R.tokens++;
        R.t_last_token = t;
    } else {
        q->done = 1;
        R.done++;
    }
    pthread_mutex_unlock(&R.mu);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, size_t n, double p)
{
    if (!n)
        return NAN;
    return v[(size_t)(p * (double)(n - 1))];
}

/* ---- options ----------------------------------------------------------------- */

typedef struct opts {
    const char *model;
    double sim_a, sim_b;
    int sim;
    double rates[16];
    int n_rates;
    double duration;
    char modes[256];
    double target;
    int32_t min_budget, max_budget, max_running, chunk;
    int32_t prompt_min, prompt_max, gen_min, gen_max;
    int32_t shared_prefix;      /* tokens of a common prefix on every prompt */
    uint64_t seed;
    int threads;
} opts;

static uint64_t rng_state;
static double urand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

static backend *open_backend(const opts *o, lm_err *err)
{
    if (o->sim) {
        sim_backend *sb = calloc(1, sizeof *sb);
        sb->base.ops = &sim_ops;
        sb->a_ms = o->sim_a;
        sb->b_ms = o->sim_b;
        sb->vocab = 1000;
        return &sb->base;
    }
    static model *m; /* loaded once, shared by every run's backend */
    if (!m && model_load(o->model, NULL, &m, err) < 0)
        return NULL;
    backend_options bo;
    backend_options_default(&bo);
    bo.threads = o->threads;
    bo.max_tokens = o->max_budget > 256 ? o->max_budget : 256;
    backend *be = NULL;
    if (backend_open(m, &bo, &be, err) < 0)
        return NULL;
    return be;
}

/* One run at one rate and one mode; prints a table row. */
static int bench_one(const opts *o, double rate, const char *mode)
{
    lm_err err = {0};
    backend *be = open_backend(o, &err);
    if (!be) {
        fprintf(stderr, "bench_sched: %s\n", err.msg);
        return -1;
    }
    backend_info info;
    backend_get_info(be, &info);
    sched_config cfg;
    sched_config_default(&cfg);
    cfg.max_running = o->max_running;
    cfg.max_queue = 100000;
    cfg.prefill_chunk = o->chunk;
    cfg.min_step_tokens = o->min_budget;
    cfg.max_step_tokens = o->max_budget;
    cfg.kv_bytes = (size_t)o->max_running * (o->prompt_max + o->gen_max) * info.kv_bytes_per_token;
    if (!strcmp(mode, "adaptive")) {
        cfg.target_itl_ms = o->target;
    } else if (!strncmp(mode, "fixed:", 6)) {
        cfg.target_itl_ms = 0;
        cfg.max_step_tokens = atoi(mode + 6);
        cfg.min_step_tokens = 1;
    } else {
        fprintf(stderr, "bench_sched: unknown mode '%s'\n", mode);
        backend_destroy(be);
        return -1;
    }
    sched *s = NULL;
    if (sched_create(be, &cfg, &s, &err) < 0) {
        fprintf(stderr, "bench_sched: %s\n", err.msg);
        backend_destroy(be);
        return -1;
    }

    /* The trace: arrival times and lengths, drawn before the run. */
    rng_state = o->seed * 2654435761u + 1;
    int32_t max_req = (int32_t)(rate * o->duration * 2 + 16);
    req *reqs = calloc((size_t)max_req, sizeof *reqs);
    int32_t *prompt = malloc((size_t)o->prompt_max * sizeof *prompt);
    R.cap_itl = (size_t)max_req * (size_t)o->gen_max;
    R.itl = malloc(R.cap_itl * sizeof *R.itl);
    R.ttft = malloc((size_t)max_req * sizeof *R.ttft);
    R.n_itl = R.n_ttft = 0;
    R.tokens = R.done = 0;
    int32_t n_sub = 0, n_refused = 0;
    double budget_sum = 0;
    int64_t budget_n = 0;
    int64_t t0 = now_ns(), t_end = t0 + (int64_t)(o->duration * 1e9);
    double t_next = 0;
    for (;;) {
        t_next += -log(1 - urand()) / rate;
        int64_t at = t0 + (int64_t)(t_next * 1e9);
        if (at >= t_end || n_sub >= max_req)
            break;
        int32_t np = o->prompt_min + (int32_t)(urand() * (o->prompt_max - o->prompt_min + 1));
        int32_t ng = o->gen_min + (int32_t)(urand() * (o->gen_max - o->gen_min + 1));
        for (int32_t i = 0; i < np; i++)
            prompt[i] = i < o->shared_prefix ? (i * 31 + 7) % info.vocab
                                              : (int32_t)(urand() * info.vocab);
        for (;;) { /* sleep until the arrival, sampling the budget meanwhile */
            int64_t now = now_ns();
            if (now >= at)
                break;
            int64_t d = at - now < 2000000 ? at - now : 2000000;
            struct timespec ts = {0, (long)d};
            nanosleep(&ts, NULL);
            sched_stats st;
            sched_get_stats(s, &st);
            budget_sum += st.step_token_budget;
            budget_n++;
        }
        req *q = &reqs[n_sub];
        sched_request rq = {.prompt = prompt, .n_prompt = np, .max_tokens = ng,
                            .ignore_eos = 1, .on_event = on_event, .user = q};
        sample_params_default(&rq.sampling);
        q->t_submit = now_ns();
        if (sched_submit(s, &rq, NULL, &err) < 0)
            n_refused++;
        else
            n_sub++;
    }
    /* Drain: the load stops; wait for everything accepted. */
    for (;;) {
        pthread_mutex_lock(&R.mu);
        int64_t done = R.done;
        pthread_mutex_unlock(&R.mu);
        if (done >= n_sub)
            break;
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    double wall = (double)(R.t_last_token - t0) / 1e9;
    sched_stats st;
    sched_get_stats(s, &st);
    sched_destroy(s);
    backend_destroy(be);

    qsort(R.itl, R.n_itl, sizeof *R.itl, cmp_double);
    qsort(R.ttft, R.n_ttft, sizeof *R.ttft, cmp_double);
    printf("| %-5.1f | %-12s | %5d | %7.1f | %6.1f | %6.1f | %6.1f | %7.0f | %7.0f | %4d | %6.0f "
           "| %llu |\n",
           rate, mode, n_sub, (double)R.tokens / wall, pct(R.itl, R.n_itl, 0.5),
           pct(R.itl, R.n_itl, 0.95), pct(R.itl, R.n_itl, 0.99), pct(R.ttft, R.n_ttft, 0.5),
           pct(R.ttft, R.n_ttft, 0.95), n_refused, budget_n ? budget_sum / budget_n : NAN,
           (unsigned long long)st.preemptions);
    fflush(stdout);
    free(reqs);
    free(prompt);
    free(R.itl);
    free(R.ttft);
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bench_sched (--model DIR | --sim A_MS,B_MS) [--rates R1,R2,..] [--duration S]\n"
            "       [--modes adaptive,fixed:N,..] [--target MS] [--min-budget N] [--max-budget N]\n"
            "       [--max-running N] [--chunk N] [--prompt MIN:MAX] [--gen MIN:MAX]\n"
            "       [--shared-prefix N] [--threads N] [--seed N]\n");
}

int main(int argc, char **argv)
{
    opts o = {.duration = 10, .target = 50, .min_budget = 8, .max_budget = 512,
              .max_running = 32, .chunk = 256, .prompt_min = 16, .prompt_max = 256,
              .gen_min = 16, .gen_max = 64, .seed = 1, .threads = 0};
    snprintf(o.modes, sizeof o.modes, "adaptive,fixed:512,fixed:32");
    o.rates[0] = 1;
    o.n_rates = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage();
            return 2;
        }
        i++;
        if (!strcmp(a, "--model")) {
            o.model = v;
        } else if (!strcmp(a, "--sim")) {
            o.sim = sscanf(v, "%lf,%lf", &o.sim_a, &o.sim_b) == 2;
            if (!o.sim) {
                usage();
                return 2;
            }
        } else if (!strcmp(a, "--rates")) {
            o.n_rates = 0;
            for (char *p = (char *)v; *p && o.n_rates < 16;) {
                o.rates[o.n_rates++] = strtod(p, &p);
                if (*p == ',')
                    p++;
                else if (*p)
                    break;
            }
        } else if (!strcmp(a, "--duration")) {
            o.duration = atof(v);
        } else if (!strcmp(a, "--modes")) {
            snprintf(o.modes, sizeof o.modes, "%s", v);
        } else if (!strcmp(a, "--target")) {
            o.target = atof(v);
        } else if (!strcmp(a, "--min-budget")) {
            o.min_budget = atoi(v);
        } else if (!strcmp(a, "--max-budget")) {
            o.max_budget = atoi(v);
        } else if (!strcmp(a, "--max-running")) {
            o.max_running = atoi(v);
        } else if (!strcmp(a, "--chunk")) {
            o.chunk = atoi(v);
        } else if (!strcmp(a, "--prompt")) {
            sscanf(v, "%d:%d", &o.prompt_min, &o.prompt_max);
        } else if (!strcmp(a, "--gen")) {
            sscanf(v, "%d:%d", &o.gen_min, &o.gen_max);
        } else if (!strcmp(a, "--shared-prefix")) {
            o.shared_prefix = atoi(v);
        } else if (!strcmp(a, "--threads")) {
            o.threads = atoi(v);
        } else if (!strcmp(a, "--seed")) {
            o.seed = strtoull(v, NULL, 10);
        } else {
            usage();
            return 2;
        }
    }
    if ((!o.model && !o.sim) || o.prompt_min < 1 || o.prompt_max < o.prompt_min ||
        o.gen_min < 1 || o.gen_max < o.gen_min || o.duration <= 0) {
        usage();
        return 2;
    }
    pthread_mutex_init(&R.mu, NULL);
    printf("| rate/s | mode | reqs | out tok/s | ITL p50 ms | ITL p95 | ITL p99 | TTFT p50 ms "
           "| TTFT p95 | refused | mean budget | preempt |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (int r = 0; r < o.n_rates; r++) {
        char modes[256];
        snprintf(modes, sizeof modes, "%s", o.modes);
        for (char *save = NULL, *m = strtok_r(modes, ",", &save); m;
             m = strtok_r(NULL, ",", &save))
            if (bench_one(&o, o.rates[r], m) < 0)
                return 1;
    }
    return 0;
}
