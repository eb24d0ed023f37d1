/*
 * cache_hooks.c: serve's cache hooks over cache/cache.h (see cache_hooks.h).
 *
 * Single flight: a lookup that misses on a request allowed to store (mode
 * use) joins the flight of its key. The leader is remembered by its
 * serve_request pointer (unique while the request lives); its answer is
 * stored and then published to the followers by the writer thread (so that
 * a request arriving between the two finds either the flight or the stored
 * entry), and the `finish` hook publishes a failure when the leader ends
 * without an answer (cancelled, deadline, engine error, refused), after
 * which each follower computes by itself. Followers wait on the RPC thread
 * that called lookup, at most until their own deadline. Because a waiting
 * follower holds an RPC thread, at most rpc_threads - 1 followers wait at
 * once: the last thread always stays free for health checks and other
 * prompts (without the bound, identical requests could occupy every RPC
 * thread and the server would stop answering until the leader finished).
 * A follower past the bound computes by itself; its answer is identical
 * (only deterministic requests are cached) and its store is harmless.
 *
 * Writer: the store hook runs on the engine thread and must not block; it
 * encodes the answer and queues it (bounded: when full the answer is not
 * stored, only published). One writer thread performs the stores.
 *
 * Not cached: sampled requests without a seed (cache.h's policy). Requests
 * asking for logprobs are cached with them (the number asked is part of
 * the key); an entry without them never answers such a request.
 */
#include "daemon/cache_hooks.h"

#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/log.h"

/* serve_chunk and cache_chunk are the same pair: answers pass through unconverted. */
_Static_assert(sizeof(serve_chunk) == sizeof(cache_chunk) &&
                   offsetof(serve_chunk, len) == offsetof(cache_chunk, text_len) &&
                   offsetof(serve_chunk, n_tokens) == offsetof(cache_chunk, n_tokens),
               "serve_chunk and cache_chunk must share their layout");

#define QUEUE_MAX 1024
#define LEADER_BUCKETS 64

typedef struct leader {
    const serve_request *req;
    cache_flight *f;
    struct leader *next;
} leader;

typedef struct wjob {
    cache_key key;
    uint8_t *val;               /* encoded answer */
    size_t n;
    cache_flight *f;            /* publish after the store; may be NULL */
    struct wjob *next;
} wjob;

typedef struct hooks_state {
    cache *c;
    char fp[65];
    int32_t timeout_ms;
    pthread_mutex_t mu;         /* leaders and queue */
    pthread_cond_t cv;
    leader *leaders[LEADER_BUCKETS];
    wjob *head, *tail;
    int queued, stop;
    int waiters, max_waiters;   /* followers waiting now / at most (under mu) */
    pthread_t writer;
} hooks_state;

static hooks_state *H; /* the installed state (one per process), for metrics */

static unsigned leader_bucket(const serve_request *r)
{
    return (unsigned)(((uintptr_t)r >> 4) % LEADER_BUCKETS);
}

static void on_state(void *user, cache_state s, const char *why)
{
    if (s == CACHE_STATE_DOWN)
        log_warn("cache: backend unavailable (%s): answering from the model until it is back",
                 why);
    else
        log_info("cache: backend available again (%s)", why);
}

/* Key and policy of a request; -1 when the request is never cached here. */
static int make_key(hooks_state *h, const serve_cache_key *sk, cache_key *k)
{
    const serve_request *r = sk->req;
    cache_request cr;
    memset(&cr, 0, sizeof cr);
    cr.model_fp = h->fp;
    cr.prompt = sk->prompt_ids;
    cr.n_prompt = sk->n_prompt;
    cr.max_tokens = sk->max_tokens;
    cr.sampling = &r->sampling;
    cr.seed_fixed = r->has_seed;
    cr.stop = r->stop;
    cr.n_stop = r->n_stop;
    cr.mode = (cache_mode)r->cache_mode;
    cr.ttl_s = r->cache_ttl_seconds;
    return cache_key_make(h->c, &cr, k, NULL) ? -1 : 0;
}

static const char *finish_name(int32_t f) { return f == 2 ? "length" : "stop"; }
static int32_t finish_code(const char *s) { return s && !strcmp(s, "length") ? 2 : 1; }

static void fill_answer(const cache_entry *e, serve_answer *ans)
{
    memset(ans, 0, sizeof *ans);
    ans->text = e->text;
    ans->len = e->text_len;
    ans->token_ids = e->tokens;
    ans->n_tokens = e->n_tokens;
    ans->finish_reason = finish_name(e->finish);
    ans->prompt_tokens = e->prompt_tokens;
    ans->completion_tokens = e->completion_tokens;
    ans->chunks = (const serve_chunk *)e->chunks;
    ans->n_chunks = e->n_chunks;
    ans->logprobs = e->logprobs;
    ans->priv = (void *)e;
}

static int hook_lookup(void *user, const serve_cache_key *sk, int64_t deadline_ns,
                       serve_answer *ret)
{
    hooks_state *h = user;
    cache_key k;
    if (make_key(h, sk, &k) || !k.lookup)
        return 0;
    cache_entry *e = NULL;
    if (cache_get(h->c, &k, deadline_ns, &e) == 1) {
        if (sk->req->sampling.logprobs > 0 && !e->logprobs) {
            cache_entry_free(e); /* cannot happen (the key differs); never answer without them */
        } else {
            fill_answer(e, ret);
            return 1;
        }
    }
    if (!k.store)
        return 0; /* no_store: compute alone, nobody waits for it */
    cache_flight *f;
    int role = cache_flight_join(h->c, &k, &f);
    if (role == CACHE_FLIGHT_LEADER) {
        leader *l = malloc(sizeof *l);
        if (!l) {
            cache_flight_publish(h->c, f, NULL);
            return 0;
        }
        l->req = sk->req;
        l->f = f;
        pthread_mutex_lock(&h->mu);
        unsigned b = leader_bucket(sk->req);
        l->next = h->leaders[b];
        h->leaders[b] = l;
        pthread_mutex_unlock(&h->mu);
        return 0;
    }
    if (role != CACHE_FLIGHT_FOLLOWER)
        return 0;
    pthread_mutex_lock(&h->mu);
    int may_wait = h->waiters < h->max_waiters;
    if (may_wait)
        h->waiters++;
    pthread_mutex_unlock(&h->mu);
    /* Past the bound: take the result only if it is already there (a
     * deadline in the past never blocks and releases our reference). */
    int rc = cache_flight_wait(h->c, f, may_wait ? deadline_ns : 1, &e);
    if (may_wait) {
        pthread_mutex_lock(&h->mu);
        h->waiters--;
        pthread_mutex_unlock(&h->mu);
    }
    if (rc == 0) {
        if (sk->req->sampling.logprobs > 0 && !e->logprobs) {
            cache_entry_free(e);
            return 0;
        }
        fill_answer(e, ret);
        return 1;
    }
    return 0; /* leader failed or our deadline came: compute (the engine reports the deadline) */
}

static void hook_release(void *user, serve_answer *ans)
{
    cache_entry_free(ans->priv);
    ans->priv = NULL;
}

/* Remove and return the flight led by req (NULL if none). */
static cache_flight *take_leader(hooks_state *h, const serve_request *req)
{
    cache_flight *f = NULL;
    pthread_mutex_lock(&h->mu);
    for (leader **pp = &h->leaders[leader_bucket(req)]; *pp; pp = &(*pp)->next) {
        if ((*pp)->req == req) {
            leader *l = *pp;
            *pp = l->next;
            f = l->f;
            free(l);
            break;
        }
    }
    pthread_mutex_unlock(&h->mu);
    return f;
}

static void hook_store(void *user, const serve_cache_key *sk, const serve_answer *ans,
                       uint32_t ttl_seconds)
{
    hooks_state *h = user;
    cache_flight *f = take_leader(h, sk->req);
    cache_key k;
    cache_entry e = {.text = ans->text, .text_len = ans->len, .tokens = ans->token_ids,
                     .n_tokens = ans->n_tokens, .prompt = sk->prompt_ids,
                     .n_prompt = sk->n_prompt, .finish = finish_code(ans->finish_reason),
                     .prompt_tokens = ans->prompt_tokens,
                     .completion_tokens = ans->completion_tokens,
                     .chunks = (const cache_chunk *)ans->chunks,
                     .n_chunks = ans->chunks ? ans->n_chunks : 0,
                     .logprobs = ans->logprobs};
    uint8_t *val = NULL;
    size_t n = 0;
    int ok = make_key(h, sk, &k) == 0 && k.store && cache_entry_encode(&e, &val, &n) == 0;
    wjob *j = ok ? malloc(sizeof *j) : NULL;
    pthread_mutex_lock(&h->mu);
    if (j && h->queued < QUEUE_MAX && !h->stop) {
        j->key = k;
        j->val = val;
        j->n = n;
        j->f = f;
        j->next = NULL;
        if (h->tail)
            h->tail->next = j;
        else
            h->head = j;
        h->tail = j;
        h->queued++;
        pthread_cond_signal(&h->cv);
        pthread_mutex_unlock(&h->mu);
        return;
    }
    pthread_mutex_unlock(&h->mu);
    /* Not stored (policy, overload): the followers still get the answer. */
    free(j);
    free(val);
    if (f)
        cache_flight_publish(h->c, f, ok ? &e : NULL);
}

static void hook_finish(void *user, const serve_request *req)
{
    hooks_state *h = user;
    cache_flight *f = take_leader(h, req);
    if (f)
        cache_flight_publish(h->c, f, NULL);
}

static void *writer_main(void *p)
{
    hooks_state *h = p;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (!h->head && !h->stop)
            pthread_cond_wait(&h->cv, &h->mu);
        wjob *j = h->head;
        if (!j)
            break; /* stop with an empty queue */
        h->head = j->next;
        if (!h->head)
            h->tail = NULL;
        h->queued--;
        pthread_mutex_unlock(&h->mu);
        cache_entry *e = NULL;
        if (cache_entry_decode(j->val, j->n, &e, NULL) == 0) {
            /* A store has no caller waiting: bound it by timeout_ms only. */
            cache_put(h->c, &j->key, e, 0);
        }
        if (j->f)
            cache_flight_publish(h->c, j->f, e);
        cache_entry_free(e);
        free(j->val);
        free(j);
        pthread_mutex_lock(&h->mu);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

static int64_t deadline_after_ms(int64_t ms) { return cache_now_ns() + ms * 1000000; }

static int64_t hook_invalidate(void *user, const serve_cache_key *sk, char *msg, size_t msglen)
{
    hooks_state *h = user;
    lm_err err = {0};
    int64_t dl = deadline_after_ms(10000);
    if (!sk) {
        uint64_t n = 0;
        int rc = cache_invalidate(h->c, h->fp, NULL, 0, dl, &n, &err);
        if (rc) {
            snprintf(msg, msglen, "%s", err.msg);
            return rc;
        }
        log_info("cache: invalidated %llu entries of this model", (unsigned long long)n);
        return (int64_t)n;
    }
    cache_key k;
    /* The entry this request would hit, whatever its cache_mode says. */
    serve_request r = *sk->req;
    r.cache_mode = SERVE_CACHE_USE;
    serve_cache_key sk2 = *sk;
    sk2.req = &r;
    if (make_key(h, &sk2, &k)) {
        snprintf(msg, msglen, "cache key: bad request");
        return -EINVAL;
    }
    int rc = cache_delete(h->c, &k, dl, &err);
    if (rc < 0) {
        snprintf(msg, msglen, "%s", err.msg);
        return rc;
    }
    return rc;
}

static int64_t hook_invalidate_prefix(void *user, const int32_t *ids, int32_t n, char *msg,
                                      size_t msglen)
{
    hooks_state *h = user;
    lm_err err = {0};
    uint64_t removed = 0;
    int rc = cache_invalidate(h->c, h->fp, ids, n, deadline_after_ms(10000), &removed, &err);
    if (rc) {
        snprintf(msg, msglen, "%s", err.msg);
        return rc;
    }
    log_info("cache: invalidated %llu entries whose prompt starts with the %d given tokens",
             (unsigned long long)removed, n);
    return (int64_t)removed;
}

static void hook_destroy(void *user)
{
    hooks_state *h = user;
    pthread_mutex_lock(&h->mu);
    h->stop = 1;
    pthread_cond_signal(&h->cv);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->writer, NULL);
    for (int b = 0; b < LEADER_BUCKETS; b++) {
        for (leader *l = h->leaders[b], *nx; l; l = nx) {
            nx = l->next;
            cache_flight_publish(h->c, l->f, NULL);
            free(l);
        }
    }
    if (H == h)
        H = NULL;
    cache_destroy(h->c);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv);
    free(h);
}

int cache_hooks_stats(cache_stats *ret)
{
    hooks_state *h = H;
    if (!h)
        return 0;
    cache_get_stats(h->c, ret);
    return 1;
}

char *cache_hooks_metrics_text(void)
{
    cache_stats st;
    if (!cache_hooks_stats(&st))
        return NULL;
    size_t cap = 4096;
    char *out = malloc(cap);
    if (!out)
        return NULL;
    size_t n = 0;
#define EMIT(...) n += (size_t)snprintf(out + n, n < cap ? cap - n : 0, __VA_ARGS__)
#define COUNTER(name, help, v)                                                              \
    EMIT("# HELP lightmoe_cache_" name " " help "\n# TYPE lightmoe_cache_" name               \
         " counter\nlightmoe_cache_" name " %llu\n", (unsigned long long)(v))
#define GAUGE(name, help, v)                                                                \
    EMIT("# HELP lightmoe_cache_" name " " help "\n# TYPE lightmoe_cache_" name               \
         " gauge\nlightmoe_cache_" name " %.9g\n", (double)(v))
    GAUGE("up", "1 while the cache backend answers (0: Redis down, requests go to the model)",
          st.state == CACHE_STATE_OK);
    EMIT("# HELP lightmoe_cache_lookups_total Lookups that reached the cache, by result\n"
         "# TYPE lightmoe_cache_lookups_total counter\n"
         "lightmoe_cache_lookups_total{result=\"hit\"} %llu\n"
         "lightmoe_cache_lookups_total{result=\"miss\"} %llu\n",
         (unsigned long long)st.hits, (unsigned long long)st.misses);
    COUNTER("errors_total", "Backend failures (each a miss or a lost store)", st.errors);
    COUNTER("timeouts_total", "Backend operations cut by timeout or deadline", st.timeouts);
    COUNTER("corrupt_total", "Stored values that failed to decode (treated as misses)",
            st.corrupt);
    COUNTER("unavailable_total", "Operations skipped at once while the backend is down",
            st.unavailable);
    COUNTER("read_bytes_total", "Bytes of values read", st.bytes_read);
    COUNTER("written_bytes_total", "Bytes of values stored", st.bytes_written);
    EMIT("# HELP lightmoe_cache_lookup_seconds Time of lookups that reached the backend\n"
         "# TYPE lightmoe_cache_lookup_seconds summary\n"
         "lightmoe_cache_lookup_seconds_sum %.9g\nlightmoe_cache_lookup_seconds_count %llu\n",
         (double)st.get_ns_sum * 1e-9, (unsigned long long)st.get_count);
    EMIT("# HELP lightmoe_cache_store_seconds Time of stores that reached the backend\n"
         "# TYPE lightmoe_cache_store_seconds summary\n"
         "lightmoe_cache_store_seconds_sum %.9g\nlightmoe_cache_store_seconds_count %llu\n",
         (double)st.put_ns_sum * 1e-9, (unsigned long long)st.put_count);
    COUNTER("single_flight_waits_total", "Requests that waited for an identical one",
            st.flight_followers);
    COUNTER("state_changes_total", "Backend up/down changes", st.state_changes);
    COUNTER("invalidated_total", "Entries removed by InvalidateCache", st.invalidated);
    GAUGE("memory_bytes", "Bytes held by the in-process cache", st.mem_bytes);
    GAUGE("entries", "Entries in the in-process cache", st.mem_entries);
    COUNTER("evictions_total", "Entries evicted from the in-process cache", st.mem_evictions);
#undef EMIT
#undef COUNTER
#undef GAUGE
    if (n >= cap) { /* cannot happen with 4 KiB; never send a cut line */
        free(out);
        return NULL;
    }
    return out;
}

int cache_hooks_install(serve *s, const daemon_config *cfg, char *err, size_t errlen)
{
    lm_err e = {0};
    cache_url u;
    if (cache_url_parse(cfg->cache_url, &u, &e)) {
        snprintf(err, errlen, "cache_url: %s", e.msg);
        return -EINVAL;
    }
    if (u.kind == CACHE_BACKEND_OFF) {
        serve_set_cache_hooks(s, NULL);
        log_info("cache: off");
        return 0;
    }
    cache_config cc;
    cache_config_default(&cc);
    cc.url = cfg->cache_url;
    cc.prefix = cfg->cache_prefix;
    cc.ttl_s = (uint32_t)cfg->cache_ttl_seconds;
    cc.max_ttl_s = (uint32_t)cfg->cache_max_ttl_seconds;
    cc.max_value_bytes = (size_t)cfg->cache_max_value_bytes;
    cc.memory_bytes = (size_t)cfg->cache_max_mb << 20;
    cc.timeout_ms = (int32_t)cfg->cache_timeout_ms;
    cc.on_state = on_state;
    hooks_state *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, errlen, "cache: out of memory");
        return -ENOMEM;
    }
    int rc = cache_fingerprint_dir(cfg->model, NULL, h->fp, &e);
    if (!rc)
        rc = cache_create(&cc, &h->c, &e);
    if (rc) {
        snprintf(err, errlen, "cache: %s", e.msg);
        free(h);
        return rc;
    }
    h->max_waiters = (int)cfg->rpc_threads - 1;
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    if (pthread_create(&h->writer, NULL, writer_main, h)) {
        snprintf(err, errlen, "cache: cannot start the writer thread");
        cache_destroy(h->c);
        pthread_mutex_destroy(&h->mu);
        pthread_cond_destroy(&h->cv);
        free(h);
        return -EAGAIN;
    }
    serve_cache_hooks hk = {
        .user = h,
        .lookup = hook_lookup,
        .release = hook_release,
        .store = hook_store,
        .invalidate = hook_invalidate,
        .destroy = hook_destroy,
        .finish = hook_finish,
        .invalidate_prefix = hook_invalidate_prefix,
    };
    H = h;
    serve_set_cache_hooks(s, &hk);
    if (u.kind == CACHE_BACKEND_MEMORY)
        log_info("cache: in-process, %lld MiB, ttl %lld s, model fingerprint %.16s",
                 (long long)cfg->cache_max_mb, (long long)cfg->cache_ttl_seconds, h->fp);
    else if (u.kind == CACHE_BACKEND_REDIS)
        log_info("cache: redis %s:%d db %d%s%s, ttl %lld s, timeout %lld ms, model fingerprint "
                 "%.16s", u.host, u.port, u.db, u.user[0] ? " user " : "",
                 u.user[0] ? u.user : (u.password[0] ? " (password)" : ""),
                 (long long)cfg->cache_ttl_seconds, (long long)cfg->cache_timeout_ms, h->fp);
    else
        log_info("cache: redis unix socket %s db %d, ttl %lld s, model fingerprint %.16s", u.path,
                 u.db, (long long)cfg->cache_ttl_seconds, h->fp);
    return 0;
}
