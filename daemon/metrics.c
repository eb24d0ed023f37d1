/*
 * metrics.c: counters, histograms and the Prometheus text endpoint (see
 * metrics.h). Counters are atomics; each histogram has its own small lock
 * (observations are a few per token, far from contended at these rates).
 */
#include "daemon/metrics.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "daemon/cache_hooks.h"
#include "daemon/status.h"

static const char *const method_names[] = {"Generate", "Complete", "Tokenize", "GetModelInfo",
                                           "InvalidateCache", "Health.Check", "Health.Watch",
                                           "Reflection", "unknown"};
#define N_METHODS (int)(sizeof method_names / sizeof *method_names)
#define N_CODES 17

static _Atomic uint64_t requests[N_METHODS][N_CODES];
static _Atomic uint64_t gen_tokens, prompt_tokens, cache_hits, cache_misses, cache_stores;

typedef struct histogram {
    const char *name, *help;
    int n;
    const double *bounds;
    uint64_t counts[32];
    double sum;
    uint64_t total;
    pthread_mutex_t mu;
} histogram;

static const double latency_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                        0.25,  0.5,    1,     2.5,  5,     10,   30};
static const double batch_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256};

static histogram h_ttft = {"lightmoe_time_to_first_token_seconds",
                           "Time from request arrival to its first generated token",
                           14, latency_bounds, {0}, 0, 0, PTHREAD_MUTEX_INITIALIZER};
static histogram h_itl = {"lightmoe_inter_token_latency_seconds",
                          "Time between consecutive tokens of a request",
                          14, latency_bounds, {0}, 0, 0, PTHREAD_MUTEX_INITIALIZER};
static histogram h_batch = {"lightmoe_batch_size", "Sequences in each engine step", 9,
                            batch_bounds, {0}, 0, 0, PTHREAD_MUTEX_INITIALIZER};

static void observe(histogram *h, double v)
{
    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < h->n; i++)
        if (v <= h->bounds[i])
            h->counts[i]++;
    h->sum += v;
    h->total++;
    pthread_mutex_unlock(&h->mu);
}

void metrics_observe_ttft(double s) { observe(&h_ttft, s); }
void metrics_observe_itl(double s) { observe(&h_itl, s); }
void metrics_observe_batch(int n) { observe(&h_batch, n); }

void metrics_count_request(const char *method, int code)
{
    int m = N_METHODS - 1;
    for (int i = 0; i < N_METHODS; i++)
        if (!strcmp(method, method_names[i]))
            m = i;
    if (code < 0 || code >= N_CODES)
        code = 2;
    atomic_fetch_add(&requests[m][code], 1);
}

uint64_t metrics_requests_total(void)
{
    uint64_t t = 0;
    for (int m = 0; m < 2; m++) /* Generate + Complete */
        for (int c = 0; c < N_CODES; c++)
            t += atomic_load(&requests[m][c]);
    return t;
}

void metrics_add_tokens(int64_t prompt, int64_t generated)
{
    atomic_fetch_add(&prompt_tokens, (uint64_t)prompt);
    atomic_fetch_add(&gen_tokens, (uint64_t)generated);
}

void metrics_count_cache(int hit)
{
    atomic_fetch_add(hit ? &cache_hits : &cache_misses, 1);
}

void metrics_count_cache_store(void)
{
    atomic_fetch_add(&cache_stores, 1);
}

/* tokens/s over a 10 s window of 1 s samples of the generated-token counter. */
#define WINDOW 10
static pthread_mutex_t rate_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t samples[WINDOW + 1];
static int n_samples;
static double rate;

void metrics_tick(void)
{
    pthread_mutex_lock(&rate_mu);
    if (n_samples == WINDOW + 1) {
        memmove(samples, samples + 1, WINDOW * sizeof *samples);
        n_samples--;
    }
    samples[n_samples++] = atomic_load(&gen_tokens);
    rate = n_samples > 1 ? (double)(samples[n_samples - 1] - samples[0]) / (n_samples - 1) : 0;
    pthread_mutex_unlock(&rate_mu);
}

double metrics_tokens_per_second(void)
{
    pthread_mutex_lock(&rate_mu);
    double r = rate;
    pthread_mutex_unlock(&rate_mu);
    return r;
}

/* ---- text format ------------------------------------------------------------ */

typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;

static void put(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(sbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0)
            return;
        if (b->p && b->n + (size_t)k < b->cap) {
            b->n += (size_t)k;
            return;
        }
        size_t nc = (b->cap ? b->cap * 2 : 8192) + (size_t)k;
        char *q = realloc(b->p, nc);
        if (!q)
            return;
        b->p = q;
        b->cap = nc;
    }
}

static void put_hist(sbuf *b, histogram *h)
{
    pthread_mutex_lock(&h->mu);
    put(b, "# HELP %s %s\n# TYPE %s histogram\n", h->name, h->help, h->name);
    for (int i = 0; i < h->n; i++)
        put(b, "%s_bucket{le=\"%g\"} %llu\n", h->name, h->bounds[i],
            (unsigned long long)h->counts[i]);
    put(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9g\n%s_count %llu\n", h->name,
        (unsigned long long)h->total, h->name, h->sum, h->name, (unsigned long long)h->total);
    pthread_mutex_unlock(&h->mu);
}

static void (*gauge_fn)(void *, metrics_gauges *);
static void *gauge_user;

void metrics_set_gauge_source(void (*fn)(void *, metrics_gauges *), void *user)
{
    gauge_fn = fn;
    gauge_user = user;
}

static void put_counter(sbuf *b, const char *name, const char *help, uint64_t v)
{
    put(b, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name,
        (unsigned long long)v);
}

static void put_gauge(sbuf *b, const char *name, const char *help, double v)
{
    put(b, "# HELP %s %s\n# TYPE %s gauge\n%s %.9g\n", name, help, name, name, v);
}

static char *render(size_t *ret_len)
{
    sbuf b = {0};
    put(&b, "# HELP lightmoe_requests_total RPCs finished, by method and status code\n"
            "# TYPE lightmoe_requests_total counter\n");
    for (int m = 0; m < N_METHODS; m++)
        for (int c = 0; c < N_CODES; c++) {
            uint64_t v = atomic_load(&requests[m][c]);
            if (v || (c == 0 && m < 2))
                put(&b, "lightmoe_requests_total{method=\"%s\",code=\"%s\"} %llu\n",
                    method_names[m], st_code_name(c), (unsigned long long)v);
        }
    put_hist(&b, &h_ttft);
    put_hist(&b, &h_itl);
    put_hist(&b, &h_batch);
    put_counter(&b, "lightmoe_generated_tokens_total", "Tokens generated", atomic_load(&gen_tokens));
    put_counter(&b, "lightmoe_prompt_tokens_total", "Prompt tokens of finished requests",
                atomic_load(&prompt_tokens));
    put_gauge(&b, "lightmoe_tokens_per_second", "Generated tokens per second (10 s window)",
              metrics_tokens_per_second());
    put_counter(&b, "lightmoe_cache_hits_total", "Exact-answer cache hits", atomic_load(&cache_hits));
    put_counter(&b, "lightmoe_cache_misses_total", "Exact-answer cache misses",
                atomic_load(&cache_misses));
    put_counter(&b, "lightmoe_cache_stores_total", "Answers stored in the exact-answer cache",
                atomic_load(&cache_stores));
    char *cache_text = cache_hooks_metrics_text(); /* backend state, errors, bytes, latency */
    if (cache_text) {
        put(&b, "%s", cache_text);
        free(cache_text);
    }
    metrics_gauges g;
    memset(&g, 0, sizeof g);
    if (gauge_fn)
        gauge_fn(gauge_user, &g);
    put_gauge(&b, "lightmoe_serving", "1 while health is SERVING", g.serving);
    put_gauge(&b, "lightmoe_active_streams", "Generate/Complete calls in progress",
              g.active_streams);
    put_gauge(&b, "lightmoe_queue_depth", "Requests waiting for the batch", g.sched.waiting);
    put_gauge(&b, "lightmoe_running_sequences", "Sequences in the running batch", g.sched.running);
    put_gauge(&b, "lightmoe_kv_blocks_used", "KV cache blocks in use", g.sched.kv_blocks_used);
    put_gauge(&b, "lightmoe_kv_blocks_total", "KV cache blocks", g.sched.kv_blocks_total);
    put_counter(&b, "lightmoe_preemptions_total", "Sequences preempted for lack of KV blocks",
                g.sched.preemptions);
    put_counter(&b, "lightmoe_engine_steps_total", "Engine steps run", g.sched.steps);
    put_counter(&b, "lightmoe_sequences_cancelled_total", "Sequences cancelled in the engine",
                g.sched.cancelled);
    put_gauge(&b, "lightmoe_sample_threads", "Threads that pick tokens on the host",
              g.sched.sample_threads);
    put_counter(&b, "lightmoe_sample_shared_steps_total",
                "Engine steps whose host picks were shared among threads",
                g.sched.sample_parallel_steps);
    put_counter(&b, "lightmoe_sample_rows_helped_total",
                "Logits rows picked by a sampling thread other than the engine thread",
                g.sched.sample_rows_helped);
    put(&b, "# HELP lightmoe_sample_seconds_total Time engine steps spent picking and delivering "
            "tokens\n# TYPE lightmoe_sample_seconds_total counter\n"
            "lightmoe_sample_seconds_total %.9g\n",
        g.sched.sample_ms_total / 1e3);
    *ret_len = b.n;
    return b.p;
}

static struct MHD_Daemon *mhd;

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **con_cls)
{
    struct MHD_Response *resp;
    enum MHD_Result r;
    if (strcmp(method, "GET") && strcmp(method, "HEAD")) {
        static const char msg[] = "only GET\n";
        resp = MHD_create_response_from_buffer(sizeof msg - 1, (void *)msg, MHD_RESPMEM_PERSISTENT);
        r = MHD_queue_response(conn, MHD_HTTP_METHOD_NOT_ALLOWED, resp);
    } else if (strcmp(url, "/metrics") && strcmp(url, "/")) {
        static const char msg[] = "not found: metrics are at /metrics\n";
        resp = MHD_create_response_from_buffer(sizeof msg - 1, (void *)msg, MHD_RESPMEM_PERSISTENT);
        r = MHD_queue_response(conn, MHD_HTTP_NOT_FOUND, resp);
    } else {
        size_t n = 0;
        char *text = render(&n);
        resp = MHD_create_response_from_buffer(n, text ? text : (char *)"", text ? MHD_RESPMEM_MUST_FREE
                                                                         : MHD_RESPMEM_PERSISTENT);
        MHD_add_response_header(resp, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
        r = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    }
    MHD_destroy_response(resp);
    return r;
}

int metrics_start(const char *addr, int *ret_port, char *errbuf, size_t errlen)
{
    char host[256];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof host) {
        snprintf(errbuf, errlen, "metrics_listen: '%s' is not HOST:PORT", addr);
        return -EINVAL;
    }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = 0;
    char *h = host;
    if (h[0] == '[') { /* [v6]:port */
        h++;
        h[strlen(h) - 1] = 0;
    }
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
    int e = getaddrinfo(h[0] ? h : NULL, colon + 1, &hints, &ai);
    if (e) {
        snprintf(errbuf, errlen, "metrics_listen: '%s': %s", addr, gai_strerror(e));
        return -EINVAL;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    mhd = MHD_start_daemon(flags, 0, NULL, NULL, handle, NULL, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                           MHD_OPTION_CONNECTION_LIMIT, (unsigned)64,
                           MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!mhd) {
        snprintf(errbuf, errlen, "metrics_listen: cannot listen on '%s' (in use or no permission)",
                 addr);
        return -EADDRINUSE;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(mhd, MHD_DAEMON_INFO_BIND_PORT);
    *ret_port = info ? info->port : 0;
    return 0;
}

void metrics_stop(void)
{
    if (mhd)
        MHD_stop_daemon(mhd);
    mhd = NULL;
}
