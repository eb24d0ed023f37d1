/*
 * serve.c: the request path (see serve.h for the steps and the hooks).
 *
 * A job is one admitted request: it lives from serve_generate until its
 * on_final has returned, in serve's job list (for serve_cancel by id and
 * serve_cancel_all). The job keeps the text and token ids produced so far
 * only when the answer will be stored in the cache.
 */
#include "daemon/serve.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/log.h"
#include "daemon/metrics.h"

#define SERVE_MAX_STOP 16
#define SERVE_MAX_STOP_LEN 256

typedef struct job {
    serve *s;
    uint64_t id;                    /* serve's id (what callers cancel) */
    uint64_t engine_id;
    int engine_started;
    const serve_request *req;       /* owned by the caller until on_final */
    serve_sink sink;
    void *user;
    int32_t *prompt_ids;
    int32_t n_prompt;
    int32_t max_tokens;             /* resolved (default, clamped to the context) */
    int store;                      /* keep the answer for the cache */
    char *text;
    size_t text_len, text_cap;
    int32_t *ids;
    int32_t n_ids, ids_cap;
    serve_chunk *chunks;            /* how the kept answer was streamed (for cache replays) */
    int32_t n_chunks, chunks_cap;
    sample_result *lps;             /* [n_ids] kept when the request asked for logprobs */
    int32_t lps_cap;
    int looked_up;                  /* the cache was asked and missed: tell it when we end */
    int linked;                     /* in serve's job list (guarded by serve.mu) */
    int parked, resumed;            /* waiting in the cache's single flight (guarded by serve.mu) */
    uint64_t ticket;                /* the cache's name for the parked job */
    int64_t first_ns, last_ns;
    _Atomic int refs;               /* engine + submitter, see serve_generate */
    int finished;                   /* on_final called (guarded by serve.mu) */
    st_code cancel_code;            /* set by serve_cancel */
    char cancel_msg[256];
    struct job *prev, *next;
} job;

/* The configuration requests read (reloadable limits and the default TTL). */
typedef struct serve_limits {
    int64_t max_prompt_tokens, max_tokens_limit, default_max_tokens, max_concurrent_streams,
        max_queue, cache_ttl_seconds;
} serve_limits;

struct serve {
    pthread_mutex_t mu;
    serve_limits lim;               /* guarded by mu */
    runner *m;
    runner_info info;
    serve_cache_hooks hooks;
    int has_hooks;
    int draining;
    int active;
    uint64_t next_id;
    job *jobs;
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static st_code fail(st_code code, char *msg, size_t n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static st_code fail(st_code code, char *msg, size_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, n, fmt, ap);
    va_end(ap);
    return code;
}

/* The configuration a request reads: a few numbers, copied under mu by
 * each request (not the whole 5 KB daemon_config). */
static serve_limits limits_of(const daemon_config *cfg)
{
    return (serve_limits){cfg->max_prompt_tokens, cfg->max_tokens_limit, cfg->default_max_tokens,
                          cfg->max_concurrent_streams, cfg->max_queue, cfg->cache_ttl_seconds};
}

int serve_create(const daemon_config *cfg, serve **ret)
{
    serve *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    pthread_mutex_init(&s->mu, NULL);
    s->lim = limits_of(cfg);
    s->next_id = 1;
    *ret = s;
    return 0;
}

void serve_attach_model(serve *s, runner *m)
{
    pthread_mutex_lock(&s->mu);
    s->m = m;
    if (m)
        runner_get_info(m, &s->info);
    pthread_mutex_unlock(&s->mu);
}

void serve_set_cache_hooks(serve *s, const serve_cache_hooks *hooks)
{
    pthread_mutex_lock(&s->mu);
    s->has_hooks = hooks != NULL;
    if (hooks)
        s->hooks = *hooks;
    pthread_mutex_unlock(&s->mu);
}

void serve_reconfigure(serve *s, const daemon_config *cfg)
{
    pthread_mutex_lock(&s->mu);
    s->lim = limits_of(cfg);
    serve_cache_hooks h = s->hooks;
    int has = s->has_hooks;
    pthread_mutex_unlock(&s->mu);
    if (has && h.reconfigure)
        h.reconfigure(h.user, cfg);
}

void serve_set_draining(serve *s)
{
    pthread_mutex_lock(&s->mu);
    s->draining = 1;
    pthread_mutex_unlock(&s->mu);
}

int serve_active(serve *s)
{
    pthread_mutex_lock(&s->mu);
    int n = s->active;
    pthread_mutex_unlock(&s->mu);
    return n;
}

void serve_destroy(serve *s)
{
    if (!s)
        return;
    if (s->has_hooks && s->hooks.destroy)
        s->hooks.destroy(s->hooks.user);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* ---- jobs ------------------------------------------------------------------ */

static void job_free(job *j)
{
    free(j->prompt_ids);
    free(j->text);
    free(j->ids);
    free(j->chunks);
    free(j->lps);
    free(j);
}

static void job_unref(job *j)
{
    if (atomic_fetch_sub(&j->refs, 1) == 1)
        job_free(j);
}

/* Into serve's job list (for serve_cancel and serve_cancel_all); both
 * idempotent. Under s->mu. */
static void job_link_locked(job *j)
{
    serve *s = j->s;
    if (j->linked)
        return;
    j->prev = NULL;
    j->next = s->jobs;
    if (s->jobs)
        s->jobs->prev = j;
    s->jobs = j;
    j->linked = 1;
}

static void job_unlink_locked(job *j)
{
    serve *s = j->s;
    if (!j->linked)
        return;
    if (j->prev)
        j->prev->next = j->next;
    else
        s->jobs = j->next;
    if (j->next)
        j->next->prev = j->prev;
    j->prev = j->next = NULL;
    j->linked = 0;
}

/* Unlink and release the admission slot. */
static void job_remove(job *j)
{
    serve *s = j->s;
    pthread_mutex_lock(&s->mu);
    job_unlink_locked(j);
    j->finished = 1;
    s->active--;
    pthread_mutex_unlock(&s->mu);
}

static void job_keep(job *j, const char *text, size_t len, const int32_t *ids, int32_t n,
                     const sample_result *lp)
{
    if (len == 0 && n == 0)
        return;
    if (j->req->sampling.logprobs > 0 && n > 0) {
        if (!lp) {
            j->store = 0; /* an answer without its logprobs must not be replayed */
            return;
        }
        if (j->n_ids + n > j->lps_cap) {
            int32_t cap = (j->lps_cap ? j->lps_cap * 2 : 32) + n;
            sample_result *p = realloc(j->lps, (size_t)cap * sizeof *p);
            if (!p) {
                j->store = 0;
                return;
            }
            j->lps = p;
            j->lps_cap = cap;
        }
        memcpy(j->lps + j->n_ids, lp, (size_t)n * sizeof *lp);
    }
    if (j->text_len + len + 1 > j->text_cap) {
        size_t cap = (j->text_cap ? j->text_cap * 2 : 256) + len;
        char *t = realloc(j->text, cap);
        if (!t) {
            j->store = 0;
            return;
        }
        j->text = t;
        j->text_cap = cap;
    }
    if (len)
        memcpy(j->text + j->text_len, text, len);
    j->text_len += len;
    j->text[j->text_len] = 0;
    if (j->n_ids + n > j->ids_cap) {
        int32_t cap = (j->ids_cap ? j->ids_cap * 2 : 64) + n;
        int32_t *p = realloc(j->ids, (size_t)cap * sizeof *p);
        if (!p) {
            j->store = 0;
            return;
        }
        j->ids = p;
        j->ids_cap = cap;
    }
    if (n > 0)
        memcpy(j->ids + j->n_ids, ids, (size_t)n * sizeof *ids);
    j->n_ids += n;
    if (len == 0 && n == 0)
        return;
    if (j->n_chunks == j->chunks_cap) {
        int32_t cap = j->chunks_cap ? j->chunks_cap * 2 : 32;
        serve_chunk *c = realloc(j->chunks, (size_t)cap * sizeof *c);
        if (!c) {
            j->store = 0;
            return;
        }
        j->chunks = c;
        j->chunks_cap = cap;
    }
    j->chunks[j->n_chunks++] = (serve_chunk){(uint32_t)len, n};
}

/* The cache's single flight waits for this request: say it ended. */
static void job_tell_cache(job *j)
{
    if (!j->looked_up)
        return;
    serve *s = j->s;
    pthread_mutex_lock(&s->mu);
    serve_cache_hooks h = s->hooks;
    int has = s->has_hooks;
    pthread_mutex_unlock(&s->mu);
    if (has && h.finish)
        h.finish(h.user, j->req);
    j->looked_up = 0;
}

static void on_engine_delta(void *user, const char *text, size_t len, const int32_t *ids,
                            int32_t n, const sample_result *lp)
{
    job *j = user;
    int64_t t = now_ns();
    if (n > 0) {
        if (!j->first_ns) {
            j->first_ns = t;
            metrics_observe_ttft((double)(t - j->req->arrival_ns) * 1e-9);
        } else {
            metrics_observe_itl((double)(t - j->last_ns) * 1e-9 / n);
        }
        j->last_ns = t;
    }
    if (j->store)
        job_keep(j, text, len, ids, n, lp);
    if (len == 0 && n == 0)
        return;
    serve_delta d = {text, len, ids, n, j->req->sampling.logprobs > 0 ? lp : NULL};
    j->sink.on_delta(j->user, &d);
}

static const char *finish_name(sched_finish f)
{
    switch (f) {
    case SCHED_FINISH_STOP: return "stop";
    case SCHED_FINISH_LENGTH: return "length";
    case SCHED_FINISH_CANCELLED: return "cancelled";
    case SCHED_FINISH_DEADLINE: return "deadline";
    default: return "error";
    }
}

static void on_engine_finish(void *user, const runner_finish *f)
{
    job *j = user;
    serve *s = j->s;
    int64_t t = now_ns();
    char msg[LM_ERR_MSG_MAX + 128];
    serve_final fin = {0};
    fin.finish_reason = finish_name(f->reason);
    fin.prompt_tokens = f->prompt_tokens;
    fin.completion_tokens = f->completion_tokens;
    fin.cached_prompt_tokens = f->cached_prompt_tokens;
    fin.ttft_s = j->first_ns ? (double)(j->first_ns - j->req->arrival_ns) * 1e-9 : 0;
    fin.total_s = (double)(t - j->req->arrival_ns) * 1e-9;
    metrics_add_tokens(f->prompt_tokens, f->completion_tokens);
    switch (f->reason) {
    case SCHED_FINISH_STOP:
    case SCHED_FINISH_LENGTH:
        fin.code = ST_OK;
        if (j->store) {
            pthread_mutex_lock(&s->mu);
            serve_cache_hooks h = s->hooks;
            int has = s->has_hooks;
            uint32_t ttl = j->req->cache_ttl_seconds ? j->req->cache_ttl_seconds
                                                     : (uint32_t)s->lim.cache_ttl_seconds;
            pthread_mutex_unlock(&s->mu);
            if (has && h.store) {
                serve_cache_key key = {s->info.id, j->prompt_ids, j->n_prompt, j->max_tokens,
                                       j->req};
                serve_answer ans = {j->text ? j->text : "", j->text_len, j->ids, j->n_ids,
                                    fin.finish_reason, f->prompt_tokens, f->completion_tokens,
                                    j->chunks, j->n_chunks,
                                    j->req->sampling.logprobs > 0 ? j->lps : NULL, NULL};
                h.store(h.user, &key, &ans, ttl);
                metrics_count_cache_store();
            }
        }
        break;
    case SCHED_FINISH_CANCELLED:
        if (j->cancel_code) {
            fin.code = j->cancel_code;
            fin.message = j->cancel_msg;
        } else {
            fin.code = ST_CANCELLED;
            fin.message = "request cancelled";
        }
        break;
    case SCHED_FINISH_DEADLINE:
        snprintf(msg, sizeof msg, "deadline exceeded after %d generated tokens",
                 f->completion_tokens);
        fin.code = ST_DEADLINE_EXCEEDED;
        fin.message = msg;
        break;
    default:
        snprintf(msg, sizeof msg, "engine failure: %s", f->message ? f->message : "(no detail)");
        fin.code = ST_INTERNAL;
        fin.message = msg;
        log_msg(LL_ERROR, j->req->request_id, "%s", msg);
        break;
    }
    job_tell_cache(j);
    job_remove(j);
    j->sink.on_final(j->user, &fin);
    job_unref(j);
}

/* ---- admission -------------------------------------------------------------- */

static const char *const known_roles[] = {"system", "user", "assistant", "tool"};

static st_code check_request(const serve_request *r, const serve_limits *lim, char *msg,
                             size_t n)
{
    int has_prompt = r->prompt && r->prompt[0];
    if (!has_prompt && r->n_messages == 0)
        return fail(ST_INVALID_ARGUMENT, msg, n,
                    "empty request: set `prompt` (raw text) or `messages` (chat turns)");
    if (has_prompt && r->n_messages > 0)
        return fail(ST_INVALID_ARGUMENT, msg, n,
                    "set either `prompt` or `messages`, not both");
    for (int32_t i = 0; i < r->n_messages; i++) {
        const char *role = r->messages[i].role ? r->messages[i].role : "";
        int ok = 0;
        for (size_t k = 0; k < sizeof known_roles / sizeof *known_roles; k++)
            ok |= !strcmp(role, known_roles[k]);
        if (!ok)
            return fail(ST_INVALID_ARGUMENT, msg, n,
                        "messages[%d].role '%.64s' is unknown: use system, user, assistant or "
                        "tool", i, role);
    }
    if (r->has_max_tokens && r->max_tokens < 1)
        return fail(ST_INVALID_ARGUMENT, msg, n, "max_tokens must be at least 1 (got %d)",
                    r->max_tokens);
    if (r->has_max_tokens && r->max_tokens > lim->max_tokens_limit)
        return fail(ST_INVALID_ARGUMENT, msg, n,
                    "max_tokens %d exceeds the server limit (max_tokens_limit = %lld)",
                    r->max_tokens, (long long)lim->max_tokens_limit);
    if (r->n_stop > SERVE_MAX_STOP)
        return fail(ST_INVALID_ARGUMENT, msg, n, "%d stop strings given, at most %d allowed",
                    r->n_stop, SERVE_MAX_STOP);
    for (int32_t i = 0; i < r->n_stop; i++) {
        size_t len = strlen(r->stop[i]);
        if (len == 0 || len > SERVE_MAX_STOP_LEN)
            return fail(ST_INVALID_ARGUMENT, msg, n,
                        "stop[%d] must be 1 to %d bytes long (got %zu)", i, SERVE_MAX_STOP_LEN,
                        len);
    }
    if (r->sampling.logprobs < 0 || r->sampling.logprobs > SAMPLE_MAX_LOGPROBS)
        return fail(ST_INVALID_ARGUMENT, msg, n, "logprobs must be in [0, %d] (got %d)",
                    SAMPLE_MAX_LOGPROBS, r->sampling.logprobs);
    lm_err err = {0};
    if (sample_params_check(&r->sampling, &err))
        return fail(ST_INVALID_ARGUMENT, msg, n, "%s", err.msg);
    return ST_OK;
}

/* Prompt text -> token ids, with the prompt limits. */
static st_code prompt_ids(serve *s, runner *m, const serve_request *r, const serve_limits *lim,
                          int32_t **ret_ids, int32_t *ret_n, char *msg, size_t n)
{
    lm_err err = {0};
    int rc = runner_prepare(m, r->n_messages ? NULL : r->prompt, r->messages, r->n_messages,
                            ret_ids, ret_n, &err);
    if (rc)
        return fail(rc == -EINVAL ? ST_INVALID_ARGUMENT : ST_INTERNAL, msg, n, "%s", err.msg);
    int32_t ctx = s->info.context_length;
    int64_t most = lim->max_prompt_tokens ? lim->max_prompt_tokens : ctx;
    if (*ret_n == 0) {
        free(*ret_ids);
        return fail(ST_INVALID_ARGUMENT, msg, n, "the prompt encodes to zero tokens");
    }
    if (*ret_n > most || *ret_n >= ctx) {
        int32_t got = *ret_n;
        free(*ret_ids);
        if (*ret_n >= ctx)
            return fail(ST_INVALID_ARGUMENT, msg, n,
                        "prompt is %d tokens, past the model's context length of %d: shorten it",
                        got, ctx);
        return fail(ST_INVALID_ARGUMENT, msg, n,
                    "prompt is %d tokens, the server limit is %lld (max_prompt_tokens): shorten "
                    "it", got, (long long)most);
    }
    return ST_OK;
}

/* ---- answering: from the cache, from the engine, parked ------------------ */

static void job_link(job *j)
{
    pthread_mutex_lock(&j->s->mu);
    job_link_locked(j);
    pthread_mutex_unlock(&j->s->mu);
}

/* Unlink without releasing the admission slot (job_remove does both). */
static void job_unlink(job *j)
{
    pthread_mutex_lock(&j->s->mu);
    job_unlink_locked(j);
    pthread_mutex_unlock(&j->s->mu);
}

/* Answer from the cache: replay the answer as the chunks it was streamed
 * in, end the job (on_final), release the answer. The caller frees j. */
static void answer_hit(job *j, const serve_cache_hooks *hooks, serve_answer *ans)
{
    const serve_request *req = j->req;
    job_link(j); /* listed so that serve_active counts it */
    int64_t t = now_ns();
    serve_final fin = {ST_OK, NULL, ans->finish_reason, ans->prompt_tokens,
                       ans->completion_tokens, 0, (double)(t - req->arrival_ns) * 1e-9,
                       (double)(t - req->arrival_ns) * 1e-9, 1};
    size_t off = 0;
    int32_t tok = 0;
    for (int32_t i = 0; i < ans->n_chunks; i++) {
        serve_delta d = {ans->text + off, ans->chunks[i].len, ans->token_ids + tok,
                         ans->chunks[i].n_tokens, ans->logprobs ? ans->logprobs + tok : NULL};
        j->sink.on_delta(j->user, &d);
        off += ans->chunks[i].len;
        tok += ans->chunks[i].n_tokens;
    }
    if (ans->n_chunks == 0 && (ans->len || ans->n_tokens)) {
        serve_delta d = {ans->text, ans->len, ans->token_ids, ans->n_tokens, ans->logprobs};
        j->sink.on_delta(j->user, &d);
    }
    job_remove(j);
    j->sink.on_final(j->user, &fin);
    if (hooks->release)
        hooks->release(hooks->user, ans);
}

/* Submit j to the engine (the caller holds a reference; the engine takes
 * its own). On failure j is unlinked, the cache told, and the code and
 * message returned; the admission slot is the caller's to release. */
static st_code start_engine(job *j, runner *m, const serve_limits *lim, char *msg,
                            size_t msglen)
{
    serve *s = j->s;
    const serve_request *req = j->req;
    pthread_mutex_lock(&s->mu);
    serve_cache_hooks hooks = s->hooks;
    int has_hooks = s->has_hooks;
    pthread_mutex_unlock(&s->mu);
    j->store = has_hooks && hooks.store &&
               (req->cache_mode == SERVE_CACHE_USE || req->cache_mode == SERVE_CACHE_REFRESH);
    runner_gen g = {j->prompt_ids, j->n_prompt, j->max_tokens, req->sampling, req->stop,
                    req->n_stop, req->deadline_ns, on_engine_delta, on_engine_finish, j};
    job_link(j);
    /* The engine's reference (dropped after on_final); the engine may
     * finish the job before runner_generate returns. s->mu is not held
     * across runner_generate: the engine thread may hold engine locks while
     * it calls on_engine_finish, which takes s->mu. */
    atomic_fetch_add(&j->refs, 1);
    lm_err err = {0};
    uint64_t eid = 0;
    int rc = m ? runner_generate(m, &g, &eid, &err) : -ESHUTDOWN;
    if (rc == 0) {
        pthread_mutex_lock(&s->mu);
        j->engine_id = eid;
        j->engine_started = 1;
        int late_cancel = j->cancel_code && !j->finished; /* cancelled while submitting */
        pthread_mutex_unlock(&s->mu);
        if (late_cancel)
            runner_cancel(m, eid);
        return ST_OK;
    }
    atomic_fetch_sub(&j->refs, 1);
    job_unlink(j);
    job_tell_cache(j);
    if (rc == -EAGAIN)
        return fail(ST_RESOURCE_EXHAUSTED, msg, msglen,
                    "server overloaded: the engine queue is full (max_queue = %lld): retry with "
                    "backoff", (long long)lim->max_queue);
    if (rc == -ESHUTDOWN)
        return fail(ST_UNAVAILABLE, msg, msglen, "lightmoed is shutting down");
    if (rc == -EINVAL)
        return fail(ST_INVALID_ARGUMENT, msg, msglen, "%s", err.msg);
    return fail(ST_INTERNAL, msg, msglen, "engine refused the request: %s", err.msg);
}

/* End a job that serve_generate already accepted, without the engine. */
static void finish_early(job *j, st_code code, const char *message)
{
    serve_final fin = {0};
    fin.code = code;
    fin.message = message;
    fin.finish_reason = code == ST_DEADLINE_EXCEEDED ? "deadline"
                        : code == ST_CANCELLED      ? "cancelled" : "error";
    fin.prompt_tokens = j->n_prompt;
    fin.total_s = (double)(now_ns() - j->req->arrival_ns) * 1e-9;
    job_tell_cache(j);
    job_remove(j);
    j->sink.on_final(j->user, &fin);
}

/* The cache resumes a parked job (on its own thread): answer, compute, or
 * end it if it was cancelled or its deadline passed while it waited. Drops
 * the park's reference. */
static void on_cache_resume(void *ctx, int hit, serve_answer *ans)
{
    job *j = ctx;
    serve *s = j->s;
    pthread_mutex_lock(&s->mu);
    j->resumed = 1;
    j->parked = 0;
    st_code cancel = j->cancel_code;
    serve_cache_hooks hooks = s->hooks;
    serve_limits lim = s->lim;
    runner *m = s->m;
    pthread_mutex_unlock(&s->mu);
    metrics_count_cache(hit > 0);
    if (hit > 0 && cancel == ST_OK) {
        answer_hit(j, &hooks, ans);
        job_unref(j);
        return;
    }
    if (hit > 0 && hooks.release)
        hooks.release(hooks.user, ans);
    /* Looked up and not answered: the cache hears when we end (a request
     * parked for its own Redis lookup leads its key's flight). */
    j->looked_up = 1;
    char msg[1024];
    st_code code = cancel;
    if (code != ST_OK) {
        snprintf(msg, sizeof msg, "%s", j->cancel_msg);
    } else if (j->req->deadline_ns && now_ns() >= j->req->deadline_ns) {
        code = fail(ST_DEADLINE_EXCEEDED, msg, sizeof msg,
                    "deadline exceeded while waiting for the cache (its lookup or an identical "
                    "request in progress)");
    } else {
        code = start_engine(j, m, &lim, msg, sizeof msg); /* miss, or the leader failed */
    }
    if (code != ST_OK)
        finish_early(j, code, msg);
    job_unref(j);
}

/* A parked job was cancelled. The caller claimed it under s->mu (read
 * j->ticket and cleared j->parked, so nobody else unparks it): take it back
 * from the cache and end it here, unless the cache is resuming it already
 * (then on_cache_resume sees the cancel). j may be gone once this returns,
 * and must not be touched by the caller after the claim. */
static void job_unpark_claimed(job *j, uint64_t ticket, const serve_cache_hooks *hooks)
{
    if (!hooks->unpark || hooks->unpark(hooks->user, ticket) != 1)
        return;
    /* resume will not come: the park's reference is ours. finish_early
     * tells the cache (a request parked for its own lookup leads a flight). */
    j->looked_up = 1;
    finish_early(j, j->cancel_code ? j->cancel_code : ST_CANCELLED,
                 j->cancel_code ? j->cancel_msg : "request cancelled");
    job_unref(j);
}

st_code serve_generate(serve *s, const serve_request *req, const serve_sink *sink, void *user,
                       uint64_t *ret_job, char *msg, size_t msglen)
{
    pthread_mutex_lock(&s->mu);
    serve_limits lim = s->lim;
    runner *m = s->m;
    int draining = s->draining;
    serve_cache_hooks hooks = s->hooks;
    int has_hooks = s->has_hooks;
    if (!m || draining) {
        pthread_mutex_unlock(&s->mu);
        return fail(ST_UNAVAILABLE, msg, msglen,
                    draining ? "lightmoed is shutting down: retry on another instance"
                             : "the model is still loading: retry shortly");
    }
    if (s->active >= lim.max_concurrent_streams) {
        int act = s->active;
        pthread_mutex_unlock(&s->mu);
        return fail(ST_RESOURCE_EXHAUSTED, msg, msglen,
                    "too many requests in progress (%d, max_concurrent_streams = %lld): retry "
                    "with backoff", act, (long long)lim.max_concurrent_streams);
    }
    s->active++;
    uint64_t id = s->next_id++;
    pthread_mutex_unlock(&s->mu);

    job *j = NULL;
    st_code code = check_request(req, &lim, msg, msglen);
    if (code)
        goto out;
    if (req->deadline_ns && req->deadline_ns <= now_ns()) {
        code = fail(ST_DEADLINE_EXCEEDED, msg, msglen, "deadline passed before the request ran");
        goto out;
    }
    j = calloc(1, sizeof *j);
    if (!j) {
        code = fail(ST_RESOURCE_EXHAUSTED, msg, msglen, "out of memory");
        goto out;
    }
    atomic_store(&j->refs, 1); /* ours, the submitter's */
    j->s = s;
    j->id = id;
    j->req = req;
    j->sink = *sink;
    j->user = user;
    code = prompt_ids(s, m, req, &lim, &j->prompt_ids, &j->n_prompt, msg, msglen);
    if (code) {
        j->prompt_ids = NULL;
        goto out;
    }
    int32_t max_tokens = req->has_max_tokens ? req->max_tokens : (int32_t)lim.default_max_tokens;
    if (j->n_prompt + max_tokens > s->info.context_length)
        max_tokens = s->info.context_length - j->n_prompt; /* ends with finish "length" */

    j->max_tokens = max_tokens;
    serve_cache_key key = {s->info.id, j->prompt_ids, j->n_prompt, max_tokens, req};
    /* 3. CACHE LOOKUP HOOK */
    if (has_hooks && (hooks.lookup_async || hooks.lookup) &&
        req->cache_mode != SERVE_CACHE_BYPASS && req->cache_mode != SERVE_CACHE_REFRESH) {
        serve_answer ans = {0};
        int hit;
        if (hooks.lookup_async) {
            /* A second reference for the park (dropped by whoever ends it):
             * the cache may resume the job before lookup_async returns. */
            atomic_store(&j->refs, 2);
            uint64_t ticket = 0;
            hit = hooks.lookup_async(hooks.user, &key, req->deadline_ns, &ans, on_cache_resume, j,
                                     &ticket);
            if (hit == SERVE_CACHE_PARKED) {
                /* Listed (for serve_cancel, which cannot know the id before
                 * we return) unless resume has already run. */
                pthread_mutex_lock(&s->mu);
                if (!j->resumed) {
                    job_link_locked(j);
                    j->parked = 1;
                    j->ticket = ticket;
                }
                pthread_mutex_unlock(&s->mu);
                *ret_job = id;
                job_unref(j);
                return ST_OK;
            }
            atomic_store(&j->refs, 1);
        } else {
            hit = hooks.lookup(hooks.user, &key, req->deadline_ns, &ans);
        }
        if (hit < 0)
            log_msg(LL_WARN, req->request_id, "cache lookup failed (%d): answering from the model",
                    hit);
        metrics_count_cache(hit > 0);
        j->looked_up = hit <= 0;
        if (hit > 0) {
            *ret_job = id;
            answer_hit(j, &hooks, &ans);
            job_free(j);
            return ST_OK;
        }
    }

    /* 4. engine */
    code = start_engine(j, m, &lim, msg, msglen);
    if (code == ST_OK) {
        job_unref(j);
        *ret_job = id;
        return ST_OK;
    }
out:
    if (j)
        job_free(j);
    pthread_mutex_lock(&s->mu);
    s->active--;
    pthread_mutex_unlock(&s->mu);
    return code;
}

/* runner_cancel is called without s->mu: the engine thread may hold its own
 * lock while it delivers on_engine_finish (which takes s->mu). Cancelling
 * an id that has just finished is harmless (the engine ignores it). */
void serve_cancel(serve *s, uint64_t id, st_code code, const char *message)
{
    uint64_t eid = 0, ticket = 0;
    int started = 0;
    job *parked = NULL;
    pthread_mutex_lock(&s->mu);
    runner *m = s->m;
    serve_cache_hooks hooks = s->hooks;
    for (job *j = s->jobs; j; j = j->next)
        if (j->id == id) {
            if (!j->cancel_code) {
                j->cancel_code = code;
                snprintf(j->cancel_msg, sizeof j->cancel_msg, "%s", message);
            }
            started = j->engine_started;
            eid = j->engine_id;
            if (j->parked) { /* claim it (see job_unpark_claimed) */
                j->parked = 0;
                parked = j;
                ticket = j->ticket;
            }
            break;
        }
    pthread_mutex_unlock(&s->mu);
    if (started)
        runner_cancel(m, eid);
    if (parked)
        job_unpark_claimed(parked, ticket, &hooks);
}

void serve_cancel_all(serve *s, st_code code, const char *message)
{
    pthread_mutex_lock(&s->mu);
    runner *m = s->m;
    serve_cache_hooks hooks = s->hooks;
    int n = 0, n_parked = 0;
    uint64_t *ids = calloc((size_t)s->active + 1, sizeof *ids);
    uint64_t *tickets = calloc((size_t)s->active + 1, sizeof *tickets);
    job **parked = calloc((size_t)s->active + 1, sizeof *parked);
    for (job *j = s->jobs; j; j = j->next) {
        if (!j->cancel_code) {
            j->cancel_code = code;
            snprintf(j->cancel_msg, sizeof j->cancel_msg, "%s", message);
        }
        if (j->engine_started && ids && n < s->active)
            ids[n++] = j->engine_id;
        if (j->parked && tickets && parked && n_parked < s->active) {
            j->parked = 0; /* claimed */
            tickets[n_parked] = j->ticket;
            parked[n_parked++] = j;
        }
    }
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < n; i++)
        runner_cancel(m, ids[i]);
    for (int i = 0; i < n_parked; i++)
        job_unpark_claimed(parked[i], tickets[i], &hooks);
    free(ids);
    free(tickets);
    free(parked);
}

/* ---- other methods ------------------------------------------------------------ */

static runner *get_model(serve *s, char *msg, size_t n)
{
    pthread_mutex_lock(&s->mu);
    runner *m = s->m;
    pthread_mutex_unlock(&s->mu);
    if (!m)
        fail(ST_UNAVAILABLE, msg, n, "the model is still loading: retry shortly");
    return m;
}

st_code serve_tokenize(serve *s, const char *text, const runner_msg *msgs, int32_t n_msgs,
                       int32_t **ret_ids, int32_t *ret_n, char **ret_rendered, char *msg,
                       size_t msglen)
{
    runner *m = get_model(s, msg, msglen);
    if (!m)
        return ST_UNAVAILABLE;
    int has_text = text && text[0];
    if (has_text && n_msgs > 0)
        return fail(ST_INVALID_ARGUMENT, msg, msglen, "set either `text` or `messages`, not both");
    lm_err err = {0};
    char *rendered = NULL;
    if (n_msgs > 0) {
        serve_request r = {.messages = msgs, .n_messages = n_msgs, .max_tokens = 1};
        sample_params_default(&r.sampling);
        pthread_mutex_lock(&s->mu);
        serve_limits lim = s->lim;
        pthread_mutex_unlock(&s->mu);
        st_code c = check_request(&r, &lim, msg, msglen);
        if (c)
            return c;
        if (runner_render(m, msgs, n_msgs, &rendered, &err))
            return fail(ST_INVALID_ARGUMENT, msg, msglen, "chat template: %s", err.msg);
    } else {
        rendered = strdup(text ? text : "");
        if (!rendered)
            return fail(ST_RESOURCE_EXHAUSTED, msg, msglen, "out of memory");
    }
    if (runner_prepare(m, n_msgs ? NULL : rendered, msgs, n_msgs, ret_ids, ret_n, &err)) {
        free(rendered);
        return fail(ST_INVALID_ARGUMENT, msg, msglen, "%s", err.msg);
    }
    *ret_rendered = rendered;
    return ST_OK;
}

st_code serve_model_info(serve *s, runner_info *ret, char *msg, size_t msglen)
{
    runner *m = get_model(s, msg, msglen);
    if (!m)
        return ST_UNAVAILABLE;
    *ret = s->info;
    return ST_OK;
}

st_code serve_invalidate(serve *s, int all, const serve_request *req, int64_t *ret_removed,
                         char *msg, size_t msglen)
{
    runner *m = get_model(s, msg, msglen);
    if (!m)
        return ST_UNAVAILABLE;
    pthread_mutex_lock(&s->mu);
    serve_cache_hooks h = s->hooks;
    int has = s->has_hooks;
    serve_limits lim = s->lim;
    pthread_mutex_unlock(&s->mu);
    if (!has || !h.invalidate)
        return fail(ST_FAILED_PRECONDITION, msg, msglen,
                    "the exact-answer cache is off (cache_url = off): nothing to invalidate");
    int64_t n;
    if (all) {
        n = h.invalidate(h.user, NULL, msg, msglen);
    } else {
        st_code c = check_request(req, &lim, msg, msglen);
        if (c)
            return c;
        int32_t *ids = NULL, n_ids = 0;
        c = prompt_ids(s, m, req, &lim, &ids, &n_ids, msg, msglen);
        if (c)
            return c;
        int32_t mt = req->has_max_tokens ? req->max_tokens : (int32_t)lim.default_max_tokens;
        if (n_ids + mt > s->info.context_length)
            mt = s->info.context_length - n_ids; /* as serve_generate resolves it */
        serve_cache_key key = {s->info.id, ids, n_ids, mt, req};
        n = h.invalidate(h.user, &key, msg, msglen);
        free(ids);
    }
    if (n < 0)
        return ST_UNAVAILABLE;
    *ret_removed = n;
    return ST_OK;
}

st_code serve_invalidate_prefix(serve *s, const int32_t *ids, int32_t n, int64_t *ret_removed,
                                char *msg, size_t msglen)
{
    if (!get_model(s, msg, msglen))
        return ST_UNAVAILABLE;
    pthread_mutex_lock(&s->mu);
    serve_cache_hooks h = s->hooks;
    int has = s->has_hooks;
    pthread_mutex_unlock(&s->mu);
    if (!has || !h.invalidate_prefix)
        return fail(ST_FAILED_PRECONDITION, msg, msglen,
                    "the exact-answer cache is off (cache_url = off): nothing to invalidate");
    if (n < 1)
        return fail(ST_INVALID_ARGUMENT, msg, msglen, "prefix_token_ids is empty");
    for (int32_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= s->info.vocab_size)
            return fail(ST_INVALID_ARGUMENT, msg, msglen,
                        "prefix_token_ids[%d] = %d is not a token id (vocabulary %d)", i, ids[i],
                        s->info.vocab_size);
    int64_t r = h.invalidate_prefix(h.user, ids, n, msg, msglen);
    if (r < 0)
        return ST_UNAVAILABLE;
    *ret_removed = r;
    return ST_OK;
}
