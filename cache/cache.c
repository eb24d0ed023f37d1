/*
 * cache.c: the cache front end: configuration, keys and policy, lookups and
 * stores with their counters, single flight, invalidation (see cache.h).
 *
 * Counters are relaxed atomics (read as a snapshot that may be a few
 * operations apart between fields). The state is an atomic too; the
 * callback fires only for the thread whose exchange changed it, so a change
 * is reported once however many threads see it.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache/cache_internal.h"

#define FLIGHT_BUCKETS 64

struct cache_flight {
    struct cache_flight *next;  /* bucket chain, while pending */
    int refs;                   /* leader + followers holding it (under fl_mu) */
    int state;                  /* 0 pending, 1 done, 2 failed */
    uint8_t *val;               /* encoded result when done */
    size_t n_val;
    cache_flight_waiter *waiters; /* parked followers (cache_flight_park), while pending */
    char key[CACHE_KEY_MAX];
};

struct cache {
    cache_config cfg;
    char prefix[CACHE_PREFIX_MAX + 1];
    cache_url url;
    cache_backend *be;          /* NULL when off */
    _Atomic int state;
    pthread_mutex_t fl_mu;
    pthread_cond_t fl_cv;       /* CLOCK_MONOTONIC; broadcast on every publish */
    cache_flight *flights[FLIGHT_BUCKETS];
    _Atomic uint64_t hits, misses, errors, timeouts, corrupt, unavailable, stores,
        store_skipped, bypassed, bytes_read, bytes_written, get_ns, get_n, put_ns, put_n,
        fl_leaders, fl_followers, fl_failed, invalidated, state_changes, evictions;
};

#define INC(c, f, v) atomic_fetch_add_explicit(&(c)->f, (v), memory_order_relaxed)
#define LOAD(c, f) atomic_load_explicit(&(c)->f, memory_order_relaxed)

int64_t cache_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

const char *cache_state_name(cache_state s) { return s == CACHE_STATE_OK ? "ok" : "down"; }

const char *cache_backend_name(cache_backend_kind k)
{
    switch (k) {
    case CACHE_BACKEND_OFF: return "off";
    case CACHE_BACKEND_MEMORY: return "memory";
    case CACHE_BACKEND_REDIS: return "redis";
    case CACHE_BACKEND_REDIS_UNIX: return "redis-unix";
    }
    return "?";
}

void cache_config_default(cache_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->url = "memory";
    cfg->prefix = "lightmoe:";
    cfg->ttl_s = 3600;
    cfg->max_ttl_s = 86400;
    cfg->max_value_bytes = 1 << 20;
    cfg->memory_bytes = 64u << 20;
    cfg->pool_size = 4;
    cfg->timeout_ms = 50;
    cfg->backoff_min_ms = 100;
    cfg->backoff_max_ms = 5000;
    cfg->prefix_tokens = 16;
}

void cache_report_state(cache *c, cache_state s, const char *why)
{
    int old = atomic_exchange(&c->state, (int)s);
    if (old == (int)s)
        return;
    INC(c, state_changes, 1);
    if (c->cfg.on_state)
        c->cfg.on_state(c->cfg.state_user, s, why);
}

void cache_count_unavailable(cache *c) { INC(c, unavailable, 1); }
void cache_count_evictions(cache *c, uint64_t n) { INC(c, evictions, n); }

int cache_create(const cache_config *cfg_in, cache **ret, lm_err *err)
{
    cache_config cfg = *cfg_in;
    if (!cfg.prefix)
        cfg.prefix = "";
    if (strlen(cfg.prefix) > CACHE_PREFIX_MAX)
        return lm_err_set(err, -EINVAL, "cache prefix longer than %d bytes", CACHE_PREFIX_MAX);
    for (const char *p = cfg.prefix; *p; p++)
        if ((unsigned char)*p <= ' ' || *p == 0x7f)
            return lm_err_set(err, -EINVAL, "cache prefix '%s': control or space characters",
                              cfg.prefix);
    if (cfg.max_ttl_s && cfg.ttl_s > cfg.max_ttl_s)
        return lm_err_set(err, -EINVAL, "cache ttl %u s is over max ttl %u s", cfg.ttl_s,
                          cfg.max_ttl_s);
    if (cfg.pool_size < 1 || cfg.pool_size > 64)
        return lm_err_set(err, -EINVAL, "cache pool size %d not in 1..64", cfg.pool_size);
    if (cfg.timeout_ms < 1 || cfg.backoff_min_ms < 1 || cfg.backoff_max_ms < cfg.backoff_min_ms)
        return lm_err_set(err, -EINVAL,
                          "cache timeouts: timeout_ms %d, backoff %d..%d ms must be >= 1 and "
                          "ordered", cfg.timeout_ms, cfg.backoff_min_ms, cfg.backoff_max_ms);
    if (cfg.prefix_tokens < 1 || cfg.prefix_tokens > 4096)
        return lm_err_set(err, -EINVAL, "cache prefix_tokens %d not in 1..4096",
                          cfg.prefix_tokens);
    if (cfg.max_value_bytes < 64)
        return lm_err_set(err, -EINVAL, "cache max value size %zu bytes is too small",
                          cfg.max_value_bytes);
    cache *c = calloc(1, sizeof *c);
    if (!c)
        return lm_err_set(err, -ENOMEM, "cache: out of memory");
    int rc = cache_url_parse(cfg.url, &c->url, err);
    if (rc) {
        free(c);
        return rc;
    }
    snprintf(c->prefix, sizeof c->prefix, "%s", cfg.prefix);
    cfg.prefix = c->prefix;
    cfg.url = NULL; /* not kept: c->url holds the parsed form */
    c->cfg = cfg;
    pthread_mutex_init(&c->fl_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->fl_cv, &ca);
    pthread_condattr_destroy(&ca);
    switch (c->url.kind) {
    case CACHE_BACKEND_OFF: rc = 0; break;
    case CACHE_BACKEND_MEMORY: rc = cache_mem_create(c, &cfg, &c->be, err); break;
    default: {
        struct sigaction sa;
        if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
            signal(SIGPIPE, SIG_IGN);
        rc = cache_redis_create(c, &cfg, &c->url, &c->be, err);
    }
    }
    if (rc) {
        pthread_mutex_destroy(&c->fl_mu);
        pthread_cond_destroy(&c->fl_cv);
        free(c);
        return rc;
    }
    *ret = c;
    return 0;
}

void cache_destroy(cache *c)
{
    if (!c)
        return;
    if (c->be)
        c->be->ops->destroy(c->be);
    pthread_mutex_destroy(&c->fl_mu);
    pthread_cond_destroy(&c->fl_cv);
    free(c);
}

/* ---- keys ------------------------------------------------------------------ */

static void h_u32(cache_hash *h, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    cache_hash_update(h, b, 4);
}

static void h_u64(cache_hash *h, uint64_t v)
{
    h_u32(h, (uint32_t)v);
    h_u32(h, (uint32_t)(v >> 32));
}

/* Floats by bit pattern, with -0 folded into +0 (same behaviour). */
static void h_f32(cache_hash *h, float f)
{
    if (f == 0.0f)
        f = 0.0f;
    uint32_t v;
    memcpy(&v, &f, 4);
    h_u32(h, v);
}

static void h_bytes(cache_hash *h, const void *p, size_t n)
{
    h_u64(h, n); /* length prefix: no two field sequences hash alike */
    cache_hash_update(h, p, n);
}

static void h_ids(cache_hash *h, const int32_t *ids, int32_t n)
{
    h_u32(h, (uint32_t)n);
    for (int32_t i = 0; i < n; i++)
        h_u32(h, (uint32_t)ids[i]);
}

/* D: SHA-256 over the canonical encoding of everything that decides the
 * output (cache.h). -EINVAL for a NULL stop string. */
static int output_digest(cache_hash *h, const cache_request *r, int greedy, uint8_t d[32],
                         lm_err *err)
{
    const sample_params *sp = r->sampling;
    cache_hash_update(h, "lightmoe-cache", 15);
    h_u32(h, CACHE_FORMAT_VERSION);
    h_bytes(h, r->model_fp, strlen(r->model_fp));
    h_ids(h, r->prompt, r->n_prompt);
    h_u32(h, (uint32_t)r->max_tokens);
    h_f32(h, sp->temperature);
    /* sample.h: greedy ignores the filters and the seed. Penalties still act. */
    h_u32(h, greedy ? 0u : (uint32_t)sp->top_k);
    h_f32(h, greedy ? 1.0f : sp->top_p);
    h_f32(h, greedy ? 0.0f : sp->min_p);
    h_f32(h, sp->repetition_penalty);
    h_f32(h, sp->presence_penalty);
    h_f32(h, sp->frequency_penalty);
    /* A seed the caller did not choose is random per request: hashing it would
     * make every key unique (cache_nondeterministic could never hit). */
    h_u64(h, greedy || !r->seed_fixed ? 0 : sp->seed);
    h_u32(h, (uint32_t)sp->logprobs);
    h_ids(h, r->stop_ids, r->n_stop_ids);
    h_u32(h, (uint32_t)r->n_stop);
    for (int32_t i = 0; i < r->n_stop; i++) {
        if (!r->stop[i])
            return lm_err_set(err, -EINVAL, "cache key: stop string %d is NULL", i);
        h_bytes(h, r->stop[i], strlen(r->stop[i]));
    }
    h_u32(h, r->ignore_eos ? 1u : 0u);
    h_bytes(h, r->extra, r->n_extra);
    return cache_hash_final(h, d) ? lm_err_set(err, -EIO, "cache key: SHA-256 failed") : 0;
}

/* M: 16 hex of SHA-256("model\0" fingerprint). 0 or -EIO. */
static int model_tag(cache_hash *h, const char *fp, char out[17])
{
    uint8_t d[CACHE_HASH_BYTES];
    cache_hash_update(h, "model", 6);
    cache_hash_update(h, fp, strlen(fp));
    int rc = cache_hash_final(h, d);
    cache_hex(d, 8, out);
    return rc;
}

/* P: 16 hex of SHA-256 of the first min(N, n) ids. 0 or -EIO. */
static int prefix_tag(cache_hash *h, const int32_t *ids, int32_t n, int32_t N, char out[17])
{
    uint8_t d[CACHE_HASH_BYTES];
    h_ids(h, ids, n < N ? n : N);
    int rc = cache_hash_final(h, d);
    cache_hex(d, 8, out);
    return rc;
}

/* "<prefix>v1:<M>:" (and "<P>:" when p) into out (CACHE_KEY_MAX); its length. */
static size_t key_head(const cache *c, const char *m, const char *p, char *out)
{
    _Static_assert(CACHE_FORMAT_VERSION == 1, "keys say v1");
    size_t n = strlen(c->prefix);
    memcpy(out, c->prefix, n);
    memcpy(out + n, "v1:", 3);
    memcpy(out + n + 3, m, 16);
    out[n + 19] = ':';
    n += 20;
    if (p) {
        memcpy(out + n, p, 16);
        out[n + 16] = ':';
        n += 17;
    }
    out[n] = '\0';
    return n;
}

/* The three digests of the key into k->str (cache.h). */
static int key_digests(cache_hash *h, const cache *c, const cache_request *r, int greedy,
                       cache_key *k, lm_err *err)
{
    uint8_t d[CACHE_HASH_BYTES];
    char m[17], p[17];
    int rc = output_digest(h, r, greedy, d, err);
    if (rc)
        return rc;
    /* M depends only on the fingerprint, the same for every request of a
     * daemon: each thread keeps its last one (one digest less per key). */
    static _Thread_local struct {
        char fp[80];
        char tag[17];
    } memo;
    size_t fl = strlen(r->model_fp);
    if (fl < sizeof memo.fp && memo.tag[0] && !memcmp(memo.fp, r->model_fp, fl + 1)) {
        memcpy(m, memo.tag, sizeof m);
    } else {
        if (model_tag(h, r->model_fp, m))
            return lm_err_set(err, -EIO, "cache key: SHA-256 failed");
        if (fl < sizeof memo.fp) {
            memcpy(memo.fp, r->model_fp, fl + 1);
            memcpy(memo.tag, m, sizeof m);
        }
    }
    if (prefix_tag(h, r->prompt, r->n_prompt, c->cfg.prefix_tokens, p))
        return lm_err_set(err, -EIO, "cache key: SHA-256 failed");
    size_t n = key_head(c, m, p, k->str);
    cache_hex(d, 32, k->str + n);
    k->len = n + 64;
    return 0;
}

int cache_key_make(const cache *c, const cache_request *r, cache_key *ret, lm_err *err)
{
    if (!r || !r->model_fp || !r->sampling)
        return lm_err_set(err, -EINVAL, "cache key: model fingerprint and sampling are required");
    if (r->n_prompt < 0 || (r->n_prompt && !r->prompt) || r->n_stop_ids < 0 ||
        (r->n_stop_ids && !r->stop_ids) || r->n_stop < 0 || (r->n_stop && !r->stop) ||
        (r->n_extra && !r->extra))
        return lm_err_set(err, -EINVAL, "cache key: negative count or missing array");
    if ((unsigned)r->mode > CACHE_MODE_NO_STORE)
        return lm_err_set(err, -EINVAL, "cache key: unknown mode %d", (int)r->mode);
    int greedy = r->sampling->temperature == 0.0f;
    cache_key k;
    cache_hash h;
    int rc = cache_hash_begin(&h);
    if (rc)
        return lm_err_set(err, rc, "cache key: SHA-256 unavailable (libcrypto)");
    rc = key_digests(&h, c, r, greedy, &k, err);
    cache_hash_end(&h);
    if (rc)
        return rc;
    int deterministic = greedy || r->seed_fixed || c->cfg.cache_nondeterministic;
    int on = c->be != NULL && deterministic;
    k.lookup = on && (r->mode == CACHE_MODE_USE || r->mode == CACHE_MODE_NO_STORE);
    k.store = on && (r->mode == CACHE_MODE_USE || r->mode == CACHE_MODE_REFRESH);
    uint32_t ttl = r->ttl_s ? r->ttl_s : c->cfg.ttl_s;
    if (c->cfg.max_ttl_s && (ttl > c->cfg.max_ttl_s || ttl == 0))
        ttl = c->cfg.max_ttl_s;
    k.ttl_s = ttl;
    *ret = k;
    return 0;
}

/* ---- get / put ------------------------------------------------------------- */

/* Count one backend get (rc as the backend's, dt_ns its time) and decode
 * a found value (freed here). 1 with *ret, or 0 (miss of any kind). */
static int get_account(cache *c, int rc, uint8_t *val, size_t n, int64_t dt_ns, cache_entry **ret)
{
    if (rc != -EAGAIN) {
        INC(c, get_ns, (uint64_t)dt_ns);
        INC(c, get_n, 1);
    }
    if (rc < 0) {
        if (rc == -EAGAIN) {
            INC(c, unavailable, 1);
        } else {
            INC(c, errors, 1);
            if (rc == -ETIMEDOUT)
                INC(c, timeouts, 1);
        }
        INC(c, misses, 1);
        return 0;
    }
    if (rc == 0) {
        INC(c, misses, 1);
        return 0;
    }
    INC(c, bytes_read, n);
    cache_entry *e = NULL;
    int drc = n > c->cfg.max_value_bytes ? -EBADMSG : cache_entry_decode(val, n, &e, NULL);
    free(val);
    if (drc) {
        INC(c, corrupt, 1);
        INC(c, misses, 1);
        return 0;
    }
    INC(c, hits, 1);
    *ret = e;
    return 1;
}

int cache_get(cache *c, const cache_key *k, int64_t deadline_ns, cache_entry **ret)
{
    if (!c || !k || !ret)
        return -EINVAL;
    if (!k->lookup || !c->be) {
        INC(c, bypassed, 1);
        return 0;
    }
    int64_t t0 = cache_now_ns();
    uint8_t *val = NULL;
    size_t n = 0;
    int rc = c->be->ops->get(c->be, k->str, k->len, deadline_ns, &val, &n);
    return get_account(c, rc, val, n, cache_now_ns() - t0, ret);
}

typedef struct many_ctx {
    cache *c;
    int64_t t0;
    cache_get_op *gops;         /* the caller's array */
    int n_gops, cap;
    const cache_get_more *more;
    cache_get_done_fn done;
    void *user;
} many_ctx;

static void many_done(void *user, cache_bget *op)
{
    many_ctx *m = user;
    cache_get_op *gop = op->user;
    cache_entry *e = NULL;
    int hit = get_account(m->c, op->rc, op->val, op->n, cache_now_ns() - m->t0, &e);
    op->val = NULL;
    m->done(m->user, gop, hit, hit ? e : NULL);
}

/* Turn the caller's ops [from, m->n_gops) into backend ops at bg (those
 * without a lookup are answered at once); how many were written. */
static int many_wrap(many_ctx *m, int from, cache_bget *bg)
{
    int nb = 0;
    for (int i = from; i < m->n_gops; i++) {
        cache_get_op *op = &m->gops[i];
        if (!op->key->lookup) {
            INC(m->c, bypassed, 1);
            m->done(m->user, op, 0, NULL);
            continue;
        }
        bg[nb++] = (cache_bget){.key = op->key->str, .klen = op->key->len,
                                .deadline_ns = op->deadline_ns, .user = op};
    }
    return nb;
}

static int many_more(void *user, cache_bget *bg, int max)
{
    many_ctx *m = user;
    int room = m->cap - m->n_gops;
    if (max < room)
        room = max;
    if (room <= 0)
        return 0;
    int from = m->n_gops;
    int k = m->more->take(m->user, m->gops + from, room);
    m->n_gops += k > 0 ? k : 0;
    return many_wrap(m, from, bg);
}

size_t cache_get_stream_scratch(int cap)
{
    return cap > 0 ? (size_t)cap * sizeof(cache_bget) : 0;
}

void cache_get_stream(cache *c, cache_get_op *ops, int n, int cap, const cache_get_more *more,
                      void *scratch, cache_get_done_fn done, void *user)
{
    cache_bget *bg = NULL;
    if (c->be && c->be->ops->get_many && cap > 0)
        bg = scratch ? scratch : malloc(cache_get_stream_scratch(cap));
    if (!bg) { /* memory, off, or no pipelining: one by one, nothing streamed */
        for (int i = 0; i < n; i++) {
            cache_entry *e = NULL;
            int hit = cache_get(c, ops[i].key, ops[i].deadline_ns, &e) == 1;
            done(user, &ops[i], hit, hit ? e : NULL);
        }
        return;
    }
    many_ctx m = {c, cache_now_ns(), ops, n, cap, more, done, user};
    int nb = many_wrap(&m, 0, bg);
    if (nb)
        c->be->ops->get_many(c->be, bg, nb, cap, more ? more->fd : -1,
                             more ? many_more : NULL, many_done, &m);
    if (bg != scratch)
        free(bg);
}

void cache_get_many(cache *c, cache_get_op *ops, int n, cache_get_done_fn done, void *user)
{
    cache_get_stream(c, ops, n, n, NULL, NULL, done, user);
}

int cache_put(cache *c, const cache_key *k, const cache_entry *e, int64_t deadline_ns)
{
    if (!c || !k || !e)
        return -EINVAL;
    if (!k->store || !c->be)
        return -EPERM;
    uint8_t *val;
    size_t n;
    int rc = cache_entry_encode(e, &val, &n);
    if (rc) {
        INC(c, store_skipped, 1);
        return rc;
    }
    if (n > c->cfg.max_value_bytes) {
        free(val);
        INC(c, store_skipped, 1);
        return -E2BIG;
    }
    int64_t t0 = cache_now_ns();
    rc = c->be->ops->put(c->be, k->str, k->len, val, n, k->ttl_s, deadline_ns);
    free(val);
    if (rc != -EAGAIN) {
        INC(c, put_ns, (uint64_t)(cache_now_ns() - t0));
        INC(c, put_n, 1);
    }
    if (rc) {
        INC(c, store_skipped, 1);
        if (rc == -EAGAIN) {
            INC(c, unavailable, 1);
        } else if (rc != -E2BIG) {
            INC(c, errors, 1);
            if (rc == -ETIMEDOUT)
                INC(c, timeouts, 1);
        }
        return rc;
    }
    INC(c, stores, 1);
    INC(c, bytes_written, n);
    return 0;
}

int cache_delete(cache *c, const cache_key *k, int64_t deadline_ns, lm_err *err)
{
    if (!c->be)
        return 0;
    int rc = c->be->ops->del(c->be, k->str, k->len, deadline_ns);
    if (rc < 0)
        return lm_err_set(err, rc, "cache delete: backend %s (%s)",
                          rc == -EAGAIN ? "unavailable" : "failed", cache_backend_name(c->url.kind));
    INC(c, invalidated, (uint64_t)rc);
    return rc;
}

/* ---- single flight ---------------------------------------------------------- */

static unsigned flight_bucket(const char *key)
{
    unsigned h = 2166136261u;
    for (; *key; key++)
        h = (h ^ (uint8_t)*key) * 16777619u;
    return h % FLIGHT_BUCKETS;
}

int cache_flight_join(cache *c, const cache_key *k, cache_flight **ret)
{
    unsigned b = flight_bucket(k->str);
    pthread_mutex_lock(&c->fl_mu);
    for (cache_flight *f = c->flights[b]; f; f = f->next) {
        if (!strcmp(f->key, k->str)) {
            f->refs++;
            pthread_mutex_unlock(&c->fl_mu);
            INC(c, fl_followers, 1);
            *ret = f;
            return CACHE_FLIGHT_FOLLOWER;
        }
    }
    cache_flight *f = calloc(1, sizeof *f);
    if (!f) {
        pthread_mutex_unlock(&c->fl_mu);
        return -ENOMEM;
    }
    memcpy(f->key, k->str, k->len + 1);
    f->refs = 1;
    f->next = c->flights[b];
    c->flights[b] = f;
    pthread_mutex_unlock(&c->fl_mu);
    INC(c, fl_leaders, 1);
    *ret = f;
    return CACHE_FLIGHT_LEADER;
}

/* Drop one reference; under fl_mu. */
static void flight_unref_locked(cache_flight *f)
{
    if (--f->refs == 0) {
        free(f->val);
        free(f);
    }
}

/* Hand the result to a parked waiter (no lock held); rc/val as published. */
static void waiter_done(cache_flight_waiter *w, int state, const uint8_t *val, size_t n)
{
    cache_entry *e = NULL;
    int rc = state == 1 && cache_entry_decode(val, n, &e, NULL) == 0 ? 0 : -EAGAIN;
    w->done(w, rc, rc == 0 ? e : NULL);
}

void cache_flight_publish(cache *c, cache_flight *f, const cache_entry *e)
{
    uint8_t *val = NULL;
    size_t n = 0;
    if (e && cache_entry_encode(e, &val, &n))
        val = NULL;
    pthread_mutex_lock(&c->fl_mu);
    cache_flight **pp = &c->flights[flight_bucket(f->key)];
    while (*pp && *pp != f)
        pp = &(*pp)->next;
    if (*pp)
        *pp = f->next;
    f->val = val;
    f->n_val = n;
    f->state = val ? 1 : 2;
    if (!val)
        INC(c, fl_failed, 1);
    pthread_cond_broadcast(&c->fl_cv);
    /* Parked waiters: detached now (so that unpark answers 0 from here on)
     * and told without the lock. Each holds a reference, so f->val stays. */
    cache_flight_waiter *ws = f->waiters;
    f->waiters = NULL;
    int n_ws = 0;
    for (cache_flight_waiter *w = ws; w; w = w->next)
        n_ws++;
    pthread_mutex_unlock(&c->fl_mu);
    for (cache_flight_waiter *w = ws, *nx; w; w = nx) {
        nx = w->next; /* done may free w */
        waiter_done(w, f->state, f->val, f->n_val);
    }
    pthread_mutex_lock(&c->fl_mu);
    f->refs -= n_ws;
    flight_unref_locked(f); /* the leader's (frees f when it was the last) */
    pthread_mutex_unlock(&c->fl_mu);
}

void cache_flight_park(cache *c, cache_flight *f, cache_flight_waiter *w)
{
    pthread_mutex_lock(&c->fl_mu);
    if (f->state == 0) {
        w->next = f->waiters;
        f->waiters = w;
        pthread_mutex_unlock(&c->fl_mu);
        return;
    }
    /* Already published: answer now. Our reference keeps f->val. */
    int state = f->state;
    pthread_mutex_unlock(&c->fl_mu);
    waiter_done(w, state, f->val, f->n_val);
    pthread_mutex_lock(&c->fl_mu);
    flight_unref_locked(f);
    pthread_mutex_unlock(&c->fl_mu);
}

int cache_flight_unpark(cache *c, cache_flight *f, cache_flight_waiter *w)
{
    pthread_mutex_lock(&c->fl_mu);
    int found = 0;
    for (cache_flight_waiter **pp = &f->waiters; *pp; pp = &(*pp)->next) {
        if (*pp == w) {
            *pp = w->next;
            found = 1;
            break;
        }
    }
    if (found)
        flight_unref_locked(f); /* f is still pending: the leader's reference remains */
    pthread_mutex_unlock(&c->fl_mu);
    return found;
}

int cache_flight_wait(cache *c, cache_flight *f, int64_t deadline_ns, cache_entry **ret)
{
    struct timespec ts = {deadline_ns / 1000000000, deadline_ns % 1000000000};
    int rc = 0;
    pthread_mutex_lock(&c->fl_mu);
    while (f->state == 0) {
        if (deadline_ns) {
            if (pthread_cond_timedwait(&c->fl_cv, &c->fl_mu, &ts) == ETIMEDOUT &&
                f->state == 0) {
                rc = -ETIMEDOUT;
                break;
            }
        } else {
            pthread_cond_wait(&c->fl_cv, &c->fl_mu);
        }
    }
    if (!rc)
        rc = f->state == 1 ? cache_entry_decode(f->val, f->n_val, ret, NULL) : -EAGAIN;
    if (rc == -EBADMSG)
        rc = -EAGAIN; /* cannot happen (we encoded it); compute rather than fail */
    flight_unref_locked(f);
    pthread_mutex_unlock(&c->fl_mu);
    return rc;
}

/* ---- invalidation ------------------------------------------------------------ */

typedef struct prefix_match {
    const int32_t *ids;
    int32_t n;
} prefix_match;

static int match_prompt_prefix(void *user, const uint8_t *val, size_t n)
{
    const prefix_match *pm = user;
    int32_t *p, np;
    if (cache_value_prompt(val, n, &p, &np))
        return 1; /* undecodable values are garbage anyway: delete */
    int ok = np >= pm->n && !memcmp(p, pm->ids, (size_t)pm->n * sizeof(int32_t));
    free(p);
    return ok;
}

int cache_invalidate(cache *c, const char *model_fp, const int32_t *prefix, int32_t n_prefix,
                     int64_t deadline_ns, uint64_t *ret_n, lm_err *err)
{
    *ret_n = 0;
    if (!model_fp || n_prefix < 0 || (n_prefix && !prefix))
        return lm_err_set(err, -EINVAL, "cache invalidate: bad arguments");
    if (!c->be)
        return 0;
    char m[17], p[17], kp[CACHE_KEY_MAX];
    cache_hash h;
    int rc = cache_hash_begin(&h);
    if (rc)
        return lm_err_set(err, rc, "cache invalidate: SHA-256 unavailable (libcrypto)");
    int whole = n_prefix >= c->cfg.prefix_tokens; /* P of the keys is known */
    rc = model_tag(&h, model_fp, m);
    if (!rc && whole)
        rc = prefix_tag(&h, prefix, n_prefix, c->cfg.prefix_tokens, p);
    cache_hash_end(&h);
    if (rc)
        return lm_err_set(err, rc, "cache invalidate: SHA-256 failed");
    size_t n = key_head(c, m, whole ? p : NULL, kp);
    prefix_match pm = {prefix, n_prefix};
    rc = c->be->ops->scan_delete(c->be, kp, n, n_prefix ? match_prompt_prefix : NULL, &pm,
                                 deadline_ns, ret_n, err);
    INC(c, invalidated, *ret_n);
    return rc;
}

void cache_get_stats(cache *c, cache_stats *s)
{
    memset(s, 0, sizeof *s);
    s->state = (cache_state)atomic_load(&c->state);
    s->kind = c->url.kind;
    s->hits = LOAD(c, hits);
    s->misses = LOAD(c, misses);
    s->errors = LOAD(c, errors);
    s->timeouts = LOAD(c, timeouts);
    s->corrupt = LOAD(c, corrupt);
    s->unavailable = LOAD(c, unavailable);
    s->stores = LOAD(c, stores);
    s->store_skipped = LOAD(c, store_skipped);
    s->bypassed = LOAD(c, bypassed);
    s->bytes_read = LOAD(c, bytes_read);
    s->bytes_written = LOAD(c, bytes_written);
    s->get_ns_sum = LOAD(c, get_ns);
    s->get_count = LOAD(c, get_n);
    s->put_ns_sum = LOAD(c, put_ns);
    s->put_count = LOAD(c, put_n);
    s->flight_leaders = LOAD(c, fl_leaders);
    s->flight_followers = LOAD(c, fl_followers);
    s->flight_failed = LOAD(c, fl_failed);
    s->invalidated = LOAD(c, invalidated);
    s->state_changes = LOAD(c, state_changes);
    s->mem_evictions = LOAD(c, evictions);
    if (c->be && c->url.kind == CACHE_BACKEND_MEMORY)
        cache_mem_usage(c->be, &s->mem_bytes, &s->mem_entries);
}
