/*
 * cache_redis.c: the Redis backend (hiredis 0.14, blocking contexts).
 *
 * Pool: up to pool_size contexts; a context is used by one thread at a time
 * (hiredis contexts are not thread-safe), taken from the idle list or made
 * on demand, and returned after the command. Every connect and command is
 * bounded by min(timeout_ms, time left to the caller's deadline). Socket
 * timeouts (SO_RCVTIMEO) are rounded to the kernel tick and overshoot by
 * 4-12 ms (measured on the CI machine), so replies are not read with a
 * blocking read: the command is appended and flushed, then the reply is
 * parsed from what ppoll(2) (high-resolution timer) says is readable, until
 * the bound (redisGetReplyFromReader + redisBufferRead). The socket timeouts
 * are still set to timeout_ms once per context, as a safety net for writes,
 * and set again on every new context: redisReconnect is never used (in 0.14
 * it drops them). A context whose command failed or timed out is freed (its
 * stream may hold an unread reply), never reused.
 *
 * State: OK until a connect fails, the connection breaks, or two commands
 * in a row time out on the full timeout_ms (a timeout caused by a caller's
 * short deadline says nothing about Redis). Then DOWN: idle contexts are
 * dropped (a generation number retires those in use), every operation
 * returns -EAGAIN at once, and after backoff_min_ms one caller probes (a
 * fresh connect + AUTH/SELECT/PING in one round trip); each failed probe
 * doubles the wait up to backoff_max_ms, a good one returns to OK. A broken
 * idle context found while OK (Redis restarted between requests) is retried
 * once on a fresh connection before declaring DOWN.
 *
 * Error replies to GET/SET (OOM, READONLY...) are counted by the caller as
 * errors but leave the state alone: the connection itself is in sync.
 *
 * Pipelined lookups (get_many, for cache_get_stream): one context, every
 * GET appended and flushed, replies read in order; each op has its own
 * bound (min(timeout_ms, its deadline)) and is answered -ETIMEDOUT when it
 * passes while later ones still wait; ops streamed in while replies are
 * awaited (an eventfd says so) join the same pipeline. Two ops in a row
 * cut by the full timeout_ms count as two timed-out commands (DOWN); a
 * broken reused context before any reply is retried once on a fresh one.
 */
#include <hiredis/hiredis.h>
#include <hiredis/sds.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache/cache_internal.h"

#define POOL_MAX 64
/* Stop this much before the caller's deadline: the caller still has to
 * return through its own code, and a wake-up is never exact. */
#define DEADLINE_MARGIN_NS 1000000

typedef struct conn {
    redisContext *ctx;
    uint64_t gen;
    int reused;
} conn;

typedef struct redis_backend {
    cache_backend base;
    cache_url url;
    int pool_size, timeout_ms, backoff_min_ms, backoff_max_ms;
    pthread_mutex_t mu;
    pthread_cond_t cv;          /* a context came back; CLOCK_MONOTONIC */
    conn idle[POOL_MAX];
    int n_idle, n_open;         /* n_open counts idle, in use and being connected */
    int down, probing, backoff_ms;
    int64_t next_try_ns;
    uint64_t gen;
    _Atomic int strikes;        /* full-length timeouts in a row */
} redis_backend;

static struct timeval ns_to_tv(int64_t ns)
{
    if (ns < 1000)
        ns = 1000;
    struct timeval tv = {(time_t)(ns / 1000000000), (suseconds_t)((ns % 1000000000) / 1000)};
    return tv;
}

/* Time allowed for the next step: min(cap, deadline - now); 0 if none left.
 * *full says whether the cap (not the caller) set it. */
static int64_t budget_ns(const redis_backend *b, int64_t deadline_ns, int *full)
{
    int64_t cap = (int64_t)b->timeout_ms * 1000000;
    if (!deadline_ns) {
        *full = 1;
        return cap;
    }
    int64_t left = deadline_ns - cache_now_ns() - DEADLINE_MARGIN_NS;
    if (left <= 0)
        return 0;
    *full = left >= cap;
    return left < cap ? left : cap;
}

/* Under mu: enter DOWN (or, for a failed probe, back off further). Returns
 * 1 if the state changed (the caller reports it after unlocking). */
static int mark_down_locked(redis_backend *b, int probe)
{
    int changed = 0;
    if (!b->down) {
        b->down = 1;
        b->backoff_ms = b->backoff_min_ms;
        b->gen++;
        for (int i = 0; i < b->n_idle; i++)
            redisFree(b->idle[i].ctx);
        b->n_open -= b->n_idle;
        b->n_idle = 0;
        changed = 1;
    } else if (probe) {
        b->backoff_ms = b->backoff_ms * 2 > b->backoff_max_ms ? b->backoff_max_ms
                                                               : b->backoff_ms * 2;
    }
    b->next_try_ns = cache_now_ns() + (int64_t)b->backoff_ms * 1000000;
    return changed;
}

static void mark_down(redis_backend *b, int probe, const char *why)
{
    pthread_mutex_lock(&b->mu);
    int changed = mark_down_locked(b, probe);
    pthread_mutex_unlock(&b->mu);
    if (changed)
        cache_report_state(b->base.owner, CACHE_STATE_DOWN, why);
}

/* Drop idle contexts without changing state (they may all be stale). */
static void flush_idle(redis_backend *b)
{
    pthread_mutex_lock(&b->mu);
    b->gen++;
    for (int i = 0; i < b->n_idle; i++)
        redisFree(b->idle[i].ctx);
    b->n_open -= b->n_idle;
    b->n_idle = 0;
    pthread_mutex_unlock(&b->mu);
}

/* Map a failed hiredis call to an errno (saved_errno read right after it). */
static int ctx_errno(const redisContext *ctx, int saved_errno)
{
    if (ctx->err == REDIS_ERR_IO &&
        (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK || saved_errno == ETIMEDOUT ||
         strstr(ctx->errstr, "timed out")))
        return -ETIMEDOUT;
    if (ctx->err == REDIS_ERR_EOF)
        return -ECONNRESET;
    if (ctx->err == REDIS_ERR_PROTOCOL)
        return -EPROTO;
    if (ctx->err == REDIS_ERR_OOM)
        return -ENOMEM;
    return -EIO;
}

/* Wait until fd is ready for `events` or until_ns passes: 0 ready,
 * -ETIMEDOUT, -EINTR (call again), or another negative errno. */
static int wait_fd(int fd, short events, int64_t until_ns)
{
    int64_t left = until_ns - cache_now_ns();
    if (left <= 0)
        return -ETIMEDOUT;
    struct pollfd p = {fd, events, 0};
    struct timespec ts = {(time_t)(left / 1000000000), (long)(left % 1000000000)};
    int k = ppoll(&p, 1, &ts, NULL);
    if (k < 0)
        return -errno;
    return k == 0 ? -ETIMEDOUT : 0;
}

/* Flush the output buffer by until_ns. A command of a few KiB (every GET)
 * fits an idle socket's send buffer, so it is written at once, without a
 * ppoll first (one syscall less per lookup); a larger one (a big SET) waits
 * for POLLOUT so that the blocking write cannot outlast until_ns. */
static int tx_flush(redisContext *ctx, int64_t until_ns)
{
    int done = 0;
    if (sdslen(ctx->obuf) <= 4096 && redisBufferWrite(ctx, &done) != REDIS_OK)
        return ctx_errno(ctx, errno);
    while (!done) {
        int k = wait_fd(ctx->fd, POLLOUT, until_ns);
        if (k == -EINTR)
            continue;
        if (k)
            return k;
        if (redisBufferWrite(ctx, &done) != REDIS_OK)
            return ctx_errno(ctx, errno);
    }
    return 0;
}

/* Read one reply by until_ns (reading only what ppoll says is there). */
static int rx_reply(redisContext *ctx, int64_t until_ns, redisReply **ret)
{
    for (;;) {
        void *r = NULL;
        if (redisGetReplyFromReader(ctx, &r) != REDIS_OK)
            return ctx_errno(ctx, errno);
        if (r) {
            *ret = r;
            return 0;
        }
        int k = wait_fd(ctx->fd, POLLIN, until_ns);
        if (k == -EINTR)
            continue;
        if (k)
            return k;
        if (redisBufferRead(ctx) != REDIS_OK)
            return ctx_errno(ctx, errno);
    }
}

/* Connect and hand-shake (AUTH, SELECT, PING pipelined). 0 or -errno, with
 * a reason in why. */
static int redis_connect(redis_backend *b, int64_t deadline_ns, redisContext **ret, char *why,
                         size_t why_n, int *timed_out_full)
{
    int full = 0;
    *timed_out_full = 0;
    int64_t t = budget_ns(b, deadline_ns, &full);
    if (!t) {
        snprintf(why, why_n, "no time left before the deadline");
        return -EAGAIN;
    }
    redisContext *ctx = b->url.kind == CACHE_BACKEND_REDIS_UNIX
                            ? redisConnectUnixWithTimeout(b->url.path, ns_to_tv(t))
                            : redisConnectWithTimeout(b->url.host, b->url.port, ns_to_tv(t));
    int e = errno;
    if (!ctx) {
        snprintf(why, why_n, "connect: out of memory");
        return -ENOMEM;
    }
    if (ctx->err) {
        int rc = ctx_errno(ctx, e);
        snprintf(why, why_n, "connect to %.150s: %.120s",
                 b->url.kind == CACHE_BACKEND_REDIS_UNIX ? b->url.path : b->url.host, ctx->errstr);
        redisFree(ctx);
        *timed_out_full = rc == -ETIMEDOUT && full;
        return rc == -ETIMEDOUT ? rc : -ECONNREFUSED;
    }
    /* Safety net for blocking writes; reads are bounded by ppoll below. */
    redisSetTimeout(ctx, ns_to_tv((int64_t)b->timeout_ms * 1000000));
    t = budget_ns(b, deadline_ns, &full);
    if (!t) {
        snprintf(why, why_n, "no time left after connecting");
        redisFree(ctx);
        return -EAGAIN;
    }
    int64_t until = cache_now_ns() + t;
    char db[16];
    snprintf(db, sizeof db, "%d", b->url.db);
    int n = 0;
    const char *what[3];
    if (b->url.password[0]) {
        const char *argv[3] = {"AUTH", b->url.user, b->url.password};
        const char **av = b->url.user[0] ? argv : (const char *[]){"AUTH", b->url.password};
        redisAppendCommandArgv(ctx, b->url.user[0] ? 3 : 2, av, NULL);
        what[n++] = "AUTH";
    }
    if (b->url.db) {
        const char *argv[2] = {"SELECT", db};
        redisAppendCommandArgv(ctx, 2, argv, NULL);
        what[n++] = "SELECT";
    }
    const char *ping[1] = {"PING"};
    redisAppendCommandArgv(ctx, 1, ping, NULL);
    what[n++] = "PING";
    int rc = tx_flush(ctx, until);
    if (rc) {
        snprintf(why, why_n, "sending %s: %s", what[0], rc == -ETIMEDOUT ? "timed out" : ctx->errstr);
        *timed_out_full = rc == -ETIMEDOUT && full;
    }
    for (int i = 0; !rc && i < n; i++) {
        redisReply *r = NULL;
        rc = rx_reply(ctx, until, &r);
        if (rc) {
            snprintf(why, why_n, "%s: %.200s", what[i],
                     rc == -ETIMEDOUT ? "no reply in time" : ctx->errstr);
            *timed_out_full = rc == -ETIMEDOUT && full;
            break;
        }
        if (r->type == REDIS_REPLY_ERROR) {
            /* The context is discarded: no need to drain the pipeline. */
            snprintf(why, why_n, "%s refused: %.200s", what[i], r->str);
            rc = -EACCES;
            freeReplyObject(r);
            break;
        }
        freeReplyObject(r);
    }
    if (rc) {
        redisFree(ctx);
        return rc;
    }
    *ret = ctx;
    return 0;
}

/* Take a context. 0 or: -EAGAIN (down and backing off, no time left, pool
 * busy until the deadline), or a connect failure (state already updated). */
static int acquire(redis_backend *b, int64_t deadline_ns, conn *out)
{
    char why[320];
    pthread_mutex_lock(&b->mu);
    for (;;) {
        int64_t now = cache_now_ns();
        if (deadline_ns && now >= deadline_ns) {
            pthread_mutex_unlock(&b->mu);
            return -EAGAIN;
        }
        int probe = 0;
        if (b->down) {
            if (now < b->next_try_ns || b->probing) {
                pthread_mutex_unlock(&b->mu);
                return -EAGAIN;
            }
            probe = b->probing = 1;
        } else if (b->n_idle) {
            *out = b->idle[--b->n_idle];
            out->reused = 1;
            pthread_mutex_unlock(&b->mu);
            return 0;
        } else if (b->n_open >= b->pool_size) {
            /* Wait for a context to come back, at most until the deadline or
             * timeout_ms: a busy pool must not stall a request. */
            int full;
            int64_t t = budget_ns(b, deadline_ns, &full);
            int64_t until = now + t;
            struct timespec ts = {until / 1000000000, until % 1000000000};
            if (pthread_cond_timedwait(&b->cv, &b->mu, &ts) == ETIMEDOUT && !b->n_idle) {
                pthread_mutex_unlock(&b->mu);
                return -EAGAIN;
            }
            continue;
        }
        b->n_open++;
        uint64_t gen = b->gen;
        pthread_mutex_unlock(&b->mu);

        redisContext *ctx = NULL;
        int tfull = 0;
        int rc = redis_connect(b, deadline_ns, &ctx, why, sizeof why, &tfull);
        pthread_mutex_lock(&b->mu);
        if (probe)
            b->probing = 0;
        if (rc) {
            b->n_open--;
            int changed = 0;
            if (rc != -EAGAIN && (rc != -ETIMEDOUT || tfull || probe))
                changed = mark_down_locked(b, probe);
            pthread_cond_broadcast(&b->cv);
            pthread_mutex_unlock(&b->mu);
            if (changed)
                cache_report_state(b->base.owner, CACHE_STATE_DOWN, why);
            return rc;
        }
        int up = 0;
        if (probe) {
            b->down = 0;
            b->gen++;
            gen = b->gen;
            up = 1;
        }
        pthread_mutex_unlock(&b->mu);
        atomic_store(&b->strikes, 0);
        if (up)
            cache_report_state(b->base.owner, CACHE_STATE_OK, "reconnected");
        out->ctx = ctx;
        out->gen = gen;
        out->reused = 0;
        return 0;
    }
}

static void release(redis_backend *b, conn *c, int ok)
{
    pthread_mutex_lock(&b->mu);
    if (ok && c->gen == b->gen && !b->down && b->n_idle < POOL_MAX) {
        b->idle[b->n_idle++] = *c;
    } else {
        redisFree(c->ctx);
        b->n_open--;
    }
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

/* Run one command; *ret gets the reply (not an error reply: those give
 * -EREMOTEIO). Handles timeouts, broken connections and the state. */
static int command(redis_backend *b, int64_t deadline_ns, int argc, const char **argv,
                   const size_t *lens, redisReply **ret)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        conn c;
        int rc = acquire(b, deadline_ns, &c);
        if (rc)
            return rc;
        int full = 0;
        int64_t t = budget_ns(b, deadline_ns, &full);
        if (!t) {
            release(b, &c, 1);
            return -EAGAIN;
        }
        int64_t until = cache_now_ns() + t;
        redisReply *r = NULL;
        rc = redisAppendCommandArgv(c.ctx, argc, argv, lens) == REDIS_OK ? 0 : -ENOMEM;
        if (!rc)
            rc = tx_flush(c.ctx, until);
        if (!rc)
            rc = rx_reply(c.ctx, until, &r);
        if (!rc) {
            atomic_store(&b->strikes, 0);
            if (r->type == REDIS_REPLY_ERROR) {
                freeReplyObject(r);
                release(b, &c, 1);
                return -EREMOTEIO;
            }
            release(b, &c, 1);
            *ret = r;
            return 0;
        }
        char why[300];
        snprintf(why, sizeof why, "%s: %s", argv[0],
                 rc == -ETIMEDOUT ? "no reply in time" : c.ctx->errstr);
        int reused = c.reused;
        release(b, &c, 0);
        if (rc == -ETIMEDOUT) {
            if (full && atomic_fetch_add(&b->strikes, 1) + 1 >= 2)
                mark_down(b, 0, why);
            return rc;
        }
        if (reused && attempt == 0) {
            flush_idle(b); /* Redis restarted between requests? try a fresh context */
            continue;
        }
        mark_down(b, 0, why);
        return rc;
    }
    return -EIO;
}

/* A GET reply as get's result: 1 with *val (malloc'ed), 0 nil, or -errno. */
static int get_reply(redisReply *r, uint8_t **val, size_t *n)
{
    if (r->type == REDIS_REPLY_NIL)
        return 0;
    if (r->type == REDIS_REPLY_ERROR)
        return -EREMOTEIO;
    if (r->type != REDIS_REPLY_STRING)
        return -EPROTO;
    uint8_t *v = malloc(r->len ? (size_t)r->len : 1);
    if (!v)
        return -ENOMEM;
    memcpy(v, r->str, (size_t)r->len);
    *val = v;
    *n = (size_t)r->len;
    return 1;
}

static int rb_get(cache_backend *be, const char *key, size_t klen, int64_t deadline_ns,
                  uint8_t **val, size_t *n)
{
    redis_backend *b = (redis_backend *)be;
    const char *argv[2] = {"GET", key};
    size_t lens[2] = {3, klen};
    redisReply *r;
    int rc = command(b, deadline_ns, 2, argv, lens, &r);
    if (rc)
        return rc;
    rc = get_reply(r, val, n);
    freeReplyObject(r);
    return rc;
}

static void bget_finish(cache_bget *op, int rc, cache_bget_done_fn done, void *user)
{
    op->fin = 1;
    op->rc = rc;
    done(user, op);
}

/* A batch in progress: the ops (growing when streamed; their own fields
 * hold each one's bound, state and the order the GETs were sent in). */
typedef struct bget_run {
    cache_bget *ops;
    int n, cap;
    int more_fd;                /* -1: nothing streamed */
    int (*more)(void *user, cache_bget *ops, int max);
    cache_bget_done_fn done;
    void *user;
} bget_run;

/* Answer every op of the run not answered yet with rc. */
static void run_finish_all(bget_run *r, int rc)
{
    for (int i = 0; i < r->n; i++)
        if (!r->ops[i].fin)
            bget_finish(&r->ops[i], rc, r->done, r->user);
}

/* Append the GETs of ops [from, r->n) to ctx (those with no time left are
 * answered -EAGAIN, as command() does). 0 or -ENOMEM. *last: latest bound. */
static int run_append(redis_backend *b, bget_run *r, redisContext *ctx, int from, int *m,
                      int64_t *last)
{
    int64_t now = cache_now_ns();
    for (int i = from; i < r->n; i++) {
        cache_bget *op = &r->ops[i];
        if (op->fin)
            continue;
        int64_t t = budget_ns(b, op->deadline_ns, &op->full);
        if (!t) {
            bget_finish(op, -EAGAIN, r->done, r->user);
            continue;
        }
        const char *argv[2] = {"GET", op->key};
        size_t lens[2] = {3, op->klen};
        if (redisAppendCommandArgv(ctx, 2, argv, lens) != REDIS_OK)
            return -ENOMEM;
        op->until = now + t;
        if (op->until > *last)
            *last = op->until;
        r->ops[(*m)++].sent = i; /* *m <= i: no op's entry is overwritten early */
    }
    return 0;
}

/* Wait until ctx's fd is readable (0), more_fd is (1), or until_ns passes
 * (-ETIMEDOUT); -EINTR (call again) or another negative errno. */
static int wait_rx(int fd, int more_fd, int64_t until_ns)
{
    int64_t left = until_ns - cache_now_ns();
    if (left <= 0)
        return -ETIMEDOUT;
    struct pollfd p[2] = {{fd, POLLIN, 0}, {more_fd, POLLIN, 0}};
    struct timespec ts = {(time_t)(left / 1000000000), (long)(left % 1000000000)};
    int k = ppoll(p, more_fd >= 0 ? 2 : 1, &ts, NULL);
    if (k < 0)
        return -errno;
    if (k == 0)
        return -ETIMEDOUT;
    return p[0].revents ? 0 : 1;
}

/* One pipeline on one context: append every unanswered GET, flush, read
 * the replies in order. The reader sleeps (ppoll) until the earliest bound
 * still pending; an op whose bound passes is answered -ETIMEDOUT at once
 * while later ones keep waiting (its reply, if it comes, is dropped).
 * While it waits, lookups streamed in (more_fd) are appended and sent.
 * Returns 1 when the batch should be retried on a fresh context (a reused
 * one was broken before any reply: Redis restarted between requests). */
static int get_batch(redis_backend *b, bget_run *r, int attempt)
{
    int64_t dl = 0; /* acquire's bound: the latest deadline (0 if any has none) */
    int any_open = 0;
    for (int i = 0; i < r->n; i++) {
        if (r->ops[i].fin)
            continue;
        if (!r->ops[i].deadline_ns) {
            dl = 0;
            any_open = 1;
        } else if (!any_open && r->ops[i].deadline_ns > dl) {
            dl = r->ops[i].deadline_ns;
        }
    }
    conn c;
    int rc = acquire(b, dl, &c);
    if (rc) {
        run_finish_all(r, rc);
        return 0;
    }
    int m = 0, got = 0, down = 0;
    int64_t last = 0;
    rc = run_append(b, r, c.ctx, 0, &m, &last);
    if (!rc && m)
        rc = tx_flush(c.ctx, last);
    while (!rc && got < m) {
        void *rep = NULL;
        if (redisGetReplyFromReader(c.ctx, &rep) != REDIS_OK) {
            rc = ctx_errno(c.ctx, errno);
            break;
        }
        if (rep) {
            int i = r->ops[got++].sent;
            atomic_store(&b->strikes, 0);
            if (!r->ops[i].fin) {
                r->ops[i].val = NULL;
                int grc = get_reply(rep, &r->ops[i].val, &r->ops[i].n);
                bget_finish(&r->ops[i], grc, r->done, r->user);
            }
            freeReplyObject(rep);
            continue;
        }
        /* Nothing buffered: answer the ops whose bound has passed, sleep
         * until the earliest one left (or until more lookups come). */
        int64_t now = cache_now_ns(), next = 0;
        for (int k = got; k < m; k++) {
            int i = r->ops[k].sent;
            if (r->ops[i].fin)
                continue;
            if (r->ops[i].until <= now) {
                /* Two lookups in a row timed out on the full timeout_ms
                 * (as two commands would): DOWN. */
                if (r->ops[i].full && atomic_fetch_add(&b->strikes, 1) + 1 >= 2)
                    down = 1;
                bget_finish(&r->ops[i], -ETIMEDOUT, r->done, r->user);
            } else if (!next || r->ops[i].until < next) {
                next = r->ops[i].until;
            }
        }
        if (!next || down) {
            rc = -ETIMEDOUT; /* every op left answered, or Redis is declared down */
            break;
        }
        int k = wait_rx(c.ctx->fd, r->n < r->cap ? r->more_fd : -1, next);
        if (k == -EINTR || k == -ETIMEDOUT)
            continue;
        if (k < 0) {
            rc = k;
            break;
        }
        if (k == 1) { /* lookups queued meanwhile: into this pipeline */
            uint64_t v;
            if (read(r->more_fd, &v, sizeof v) < 0 && errno != EAGAIN)
                continue;
            int from = r->n;
            r->n += r->more(r->user, r->ops + from, r->cap - from);
            rc = run_append(b, r, c.ctx, from, &m, &last);
            if (!rc)
                rc = tx_flush(c.ctx, last);
            continue;
        }
        if (redisBufferRead(c.ctx) != REDIS_OK)
            rc = ctx_errno(c.ctx, errno);
    }
    if (!rc) {
        release(b, &c, 1);
        return 0;
    }
    char why[300];
    snprintf(why, sizeof why, "GET (pipeline of %d): %s", m,
             rc == -ETIMEDOUT ? "no reply in time" : c.ctx->errstr);
    int reused = c.reused;
    release(b, &c, 0);
    if (rc == -ENOMEM) { /* inside hiredis: the stream may hold half a command */
        run_finish_all(r, rc);
        return 0;
    }
    if (rc == -ETIMEDOUT) {
        /* Ops left unanswered (a flush that timed out, or DOWN declared
         * before their bound): fail open now. A flush cut by timeout_ms is
         * one strike. */
        int full_cut = 0;
        for (int i = 0; i < r->n; i++) {
            if (!r->ops[i].fin) {
                full_cut |= r->ops[i].full && r->ops[i].until <= cache_now_ns();
                bget_finish(&r->ops[i], -ETIMEDOUT, r->done, r->user);
            }
        }
        if (full_cut && atomic_fetch_add(&b->strikes, 1) + 1 >= 2)
            down = 1;
        if (down)
            mark_down(b, 0, why);
        return 0;
    }
    if (reused && attempt == 0 && got == 0) {
        flush_idle(b); /* Redis restarted between requests? try a fresh context */
        return 1;
    }
    mark_down(b, 0, why);
    run_finish_all(r, rc);
    return 0;
}

static void rb_get_many(cache_backend *be, cache_bget *ops, int n, int cap, int more_fd,
                        int (*more)(void *user, cache_bget *ops, int max),
                        cache_bget_done_fn done, void *user)
{
    redis_backend *b = (redis_backend *)be;
    bget_run r = {ops, n, cap, more ? more_fd : -1, more, done, user};
    for (int attempt = 0; attempt < 2; attempt++)
        if (!get_batch(b, &r, attempt))
            break;
    run_finish_all(&r, -EIO); /* cannot happen: every path answers its ops */
}

static int rb_put(cache_backend *be, const char *key, size_t klen, const uint8_t *val, size_t n,
                  uint32_t ttl_s, int64_t deadline_ns)
{
    redis_backend *b = (redis_backend *)be;
    char ttl[16];
    int tn = snprintf(ttl, sizeof ttl, "%u", ttl_s);
    /* SET with EX: value and expiry in one command, one round trip. */
    const char *argv[5] = {"SET", key, (const char *)val, "EX", ttl};
    size_t lens[5] = {3, klen, n, 2, (size_t)tn};
    redisReply *r;
    int rc = command(b, deadline_ns, ttl_s ? 5 : 3, argv, lens, &r);
    if (rc)
        return rc;
    freeReplyObject(r);
    return 0;
}

static int rb_del(cache_backend *be, const char *key, size_t klen, int64_t deadline_ns)
{
    redis_backend *b = (redis_backend *)be;
    const char *argv[2] = {"UNLINK", key};
    size_t lens[2] = {6, klen};
    redisReply *r;
    int rc = command(b, deadline_ns, 2, argv, lens, &r);
    if (rc)
        return rc;
    rc = r->type == REDIS_REPLY_INTEGER && r->integer > 0;
    freeReplyObject(r);
    return rc;
}

/* Escape a literal for a SCAN MATCH glob and append '*'. */
static void glob_literal(const char *s, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (strchr("*?[]\\", s[i]))
            out[o++] = '\\';
        out[o++] = s[i];
    }
    out[o++] = '*';
    out[o] = '\0';
}

/* Invalidate: SCAN MATCH the key prefix; with a matcher, pipeline GETs of
 * each batch and keep the keys it accepts; then one pipelined round of
 * UNLINKs (non-blocking deletes) per batch. One context for the whole walk,
 * the caller's deadline (not timeout_ms) bounds each step: admin calls may
 * walk many keys. */
static int rb_scan_delete(cache_backend *be, const char *key_prefix, size_t plen,
                          cache_match_fn match, void *mu, int64_t deadline_ns, uint64_t *ret_n,
                          lm_err *err)
{
    redis_backend *b = (redis_backend *)be;
    if (!deadline_ns)
        deadline_ns = cache_now_ns() + 10 * (int64_t)1000000000;
    conn c;
    int rc = acquire(b, deadline_ns, &c);
    if (rc)
        return lm_err_set(err, rc == -EAGAIN ? -EAGAIN : rc,
                          "cache invalidate: Redis unavailable (%s)",
                          rc == -EAGAIN ? "down or deadline passed" : "connect failed");
    char *pattern = malloc(2 * plen + 2);
    char cursor[32] = "0";
    uint64_t deleted = 0;
    rc = 0;
    if (!pattern) {
        release(b, &c, 1);
        return lm_err_set(err, -ENOMEM, "cache invalidate: out of memory");
    }
    glob_literal(key_prefix, plen, pattern);
    do {
        int64_t left = deadline_ns - cache_now_ns();
        if (left <= 0 || redisSetTimeout(c.ctx, ns_to_tv(left)) != REDIS_OK) {
            rc = lm_err_set(err, -ETIMEDOUT, "cache invalidate: deadline passed after %llu keys",
                            (unsigned long long)deleted);
            break;
        }
        redisReply *r = redisCommand(c.ctx, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
            r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_ARRAY) {
            rc = lm_err_set(err, r ? -EPROTO : ctx_errno(c.ctx, errno), "cache invalidate: SCAN: %s",
                            r && r->type == REDIS_REPLY_ERROR ? r->str
                            : r                               ? "unexpected reply"
                                                              : c.ctx->errstr);
            if (r)
                freeReplyObject(r);
            break;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        redisReply *keys = r->element[1];
        size_t nk = keys->elements;
        char *del = calloc(nk ? nk : 1, 1); /* keys to delete */
        if (!del) {
            freeReplyObject(r);
            rc = lm_err_set(err, -ENOMEM, "cache invalidate: out of memory");
            break;
        }
        if (match) {
            for (size_t i = 0; i < nk; i++) {
                const char *argv[2] = {"GET", keys->element[i]->str};
                size_t lens[2] = {3, keys->element[i]->len};
                redisAppendCommandArgv(c.ctx, 2, argv, lens);
            }
            for (size_t i = 0; i < nk && !rc; i++) {
                redisReply *g;
                if (redisGetReply(c.ctx, (void **)&g) != REDIS_OK) {
                    rc = lm_err_set(err, ctx_errno(c.ctx, errno), "cache invalidate: GET: %s",
                                    c.ctx->errstr);
                    break;
                }
                if (g->type == REDIS_REPLY_STRING)
                    del[i] = (char)match(mu, (const uint8_t *)g->str, (size_t)g->len);
                freeReplyObject(g);
            }
        } else {
            memset(del, 1, nk);
        }
        size_t n_cmd = 0;
        for (size_t i = 0; i < nk && !rc; i++) {
            if (!del[i])
                continue;
            const char *argv[2] = {"UNLINK", keys->element[i]->str};
            size_t lens[2] = {6, keys->element[i]->len};
            redisAppendCommandArgv(c.ctx, 2, argv, lens);
            n_cmd++;
        }
        for (size_t i = 0; i < n_cmd && !rc; i++) {
            redisReply *u;
            if (redisGetReply(c.ctx, (void **)&u) != REDIS_OK) {
                rc = lm_err_set(err, ctx_errno(c.ctx, errno), "cache invalidate: UNLINK: %s",
                                c.ctx->errstr);
                break;
            }
            if (u->type == REDIS_REPLY_INTEGER)
                deleted += (uint64_t)u->integer;
            freeReplyObject(u);
        }
        free(del);
        freeReplyObject(r);
    } while (!rc && strcmp(cursor, "0") != 0);
    free(pattern);
    if (redisSetTimeout(c.ctx, ns_to_tv((int64_t)b->timeout_ms * 1000000)) != REDIS_OK)
        rc = rc ? rc : -EIO; /* back to the safety net; else do not reuse it */
    release(b, &c, rc == 0);
    *ret_n = deleted;
    return rc;
}

static void rb_destroy(cache_backend *be)
{
    redis_backend *b = (redis_backend *)be;
    for (int i = 0; i < b->n_idle; i++)
        redisFree(b->idle[i].ctx);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cv);
    free(b);
}

static const cache_backend_ops redis_ops = {rb_get,     rb_put, rb_del, rb_scan_delete,
                                           rb_destroy, rb_get_many};

int cache_redis_create(cache *owner, const cache_config *cfg, const cache_url *url,
                       cache_backend **ret, lm_err *err)
{
    redis_backend *b = calloc(1, sizeof *b);
    if (!b)
        return lm_err_set(err, -ENOMEM, "cache: out of memory");
    b->base.ops = &redis_ops;
    b->base.owner = owner;
    b->url = *url;
    b->pool_size = cfg->pool_size;
    b->timeout_ms = cfg->timeout_ms;
    b->backoff_min_ms = cfg->backoff_min_ms;
    b->backoff_max_ms = cfg->backoff_max_ms;
    pthread_mutex_init(&b->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->cv, &ca);
    pthread_condattr_destroy(&ca);
    *ret = &b->base;
    return 0;
}
