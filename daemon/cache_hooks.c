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
 * which each follower computes by itself. Followers do not wait on a
 * thread: lookup_async parks them (a cache_flight_waiter in the flight) and
 * returns; when the flight ends, the publishing thread moves the follower
 * to the ready queue and a resumer thread (Redis: as many as readers; one
 * for the in-process store) resumes it (serve then answers, or computes). Identical requests are the common case of a hit (an FAQ):
 * most Redis-backed hits are followers of the lookup in flight, so their
 * answers are sent by several resumers side by side. A parked follower
 * whose deadline passes is taken back by the writer thread and resumed
 * without an answer (serve ends it with DEADLINE_EXCEEDED); one whose
 * client leaves is taken back by serve (unpark). So any number of
 * identical requests can wait while every RPC thread stays free.
 *
 * Readers (Redis): a lookup never waits on an RPC thread. lookup_async
 * joins the flight of its key first (so identical requests park behind it
 * at once), then parks the request itself (an rget) and hands its key to
 * one of the reader threads (in turn), which sends every GET queued to it
 * as one pipeline on a connection of its own (and appends lookups queued
 * while it awaits replies: cache_get_stream) and resumes each request as
 * its reply comes: a hit answers it and is published to its followers; a
 * miss, error or timeout resumes it without an answer, to compute as the
 * leader (fail open). A client that leaves meanwhile is taken back
 * (unpark; serve's finish then fails the flight). Several readers
 * (cache_readers) parse replies and send answers side by side; measured
 * on 16 cores, two served 2-5% more hits than one and more served fewer
 * (docs/PERF.md). In-process backend: looked up inline.
 *
 * Writer: the store hook runs on the engine thread and must not block; for
 * Redis it encodes the answer and queues it (bounded: when full the answer
 * is not stored, only published); the in-process backend stores at once
 * (a short lock), so an answer is in the cache before its client has it.
 * One writer thread performs the Redis stores and ends parked followers
 * whose deadline passed; resumptions are the resumers' (never the engine
 * thread's: resuming may submit to the engine).
 * Lock order: h->mu, then the cache's flight lock (cache_flight_unpark);
 * the cache calls done without its lock, and done takes h->mu. A reader's
 * lock (rd->mu: its queues) is never held with another lock.
 *
 * Not cached: sampled requests without a seed (cache.h's policy). Requests
 * asking for logprobs are cached with them (the number asked is part of
 * the key); an entry without them never answers such a request.
 */
#include "daemon/cache_hooks.h"

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

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

typedef struct hooks_state hooks_state;

/* A parked follower: in h->parked until its flight ends (then in h->ready)
 * or it is taken back (unpark, deadline). */
typedef struct parked {
    cache_flight_waiter w;      /* the cache's handle; done = on_flight_done */
    hooks_state *h;
    cache_flight *f;
    uint64_t id;                /* serve's ticket */
    int64_t deadline_ns;        /* 0 = none */
    int want_logprobs;
    serve_cache_resume_fn resume;
    void *ctx;
    int rc;                     /* from the flight: 0 with e, or -EAGAIN */
    cache_entry *e;
    struct parked *prev, *next; /* h->parked (doubly) or h->ready (next only) */
} parked;

typedef struct reader reader;

/* A lookup waiting for Redis (async_get): in its reader's rq until the
 * reader takes it into a pipeline (rbusy), then answered (resume) or taken
 * back (unpark: freed from rq at once; in the pipeline only marked gone,
 * and freed by the reader after its batch). */
typedef struct rget {
    cache_key key;
    hooks_state *h;
    const serve_request *req;   /* for take_leader, when lead */
    int lead;                   /* the request leads the flight of its key */
    uint64_t id;                /* serve's ticket */
    int64_t deadline_ns;        /* 0 = none */
    int want_logprobs;
    serve_cache_resume_fn resume;
    void *ctx;
    int gone;                   /* taken back while in the pipeline: resume nobody */
    struct rget *prev, *next;   /* rd->rq or rd->rbusy */
} rget;

#define READ_BATCH_MAX 512

/* A reader thread and its queues. */
struct reader {
    hooks_state *h;
    pthread_mutex_t mu;         /* rq, rbusy, stop, reading */
    pthread_cond_t cv;          /* rq got one, or stop */
    rget *rq, *rq_tail;         /* lookups for this reader, oldest first */
    rget *rbusy;                /* lookups in its pipeline */
    int stop;
    int reading;                /* in a pipeline: wake it through efd */
    int efd;                    /* eventfd, -1 if none (then no streaming) */
    int taken;                  /* the reader's: lookups taken into this pipeline */
    cache_get_op *ops;          /* the reader's: [READ_BATCH_MAX], made at install */
    void *scratch;              /* the reader's cache_get_stream work space */
    uint64_t lookups;           /* atomic: lookups taken into its pipelines (metrics) */
    int started;
    pthread_t thread;
};

struct hooks_state {
    cache *c;
    char fp[65];
    int32_t timeout_ms;
    pthread_mutex_t mu;         /* leaders, queue, parked, ready */
    pthread_cond_t cv;          /* CLOCK_MONOTONIC */
    int64_t writer_wait;        /* the writer sleeps until then (INT64_MAX: no timeout), 0 awake */
    leader *leaders[LEADER_BUCKETS];
    wjob *head, *tail;
    int queued, stop;
    parked *parked;             /* waiting for their flight */
    parked *ready, *ready_tail; /* flight ended: to resume (resumer threads) */
    uint64_t next_park;         /* tickets (atomic: readers' lookups take one without mu) */
    int store_inline;           /* in-process backend: store on the engine thread */
    int async_get;              /* Redis: lookups go through the reader threads */
    pthread_t writer;
    reader *readers;            /* [n_readers] when async_get */
    int n_readers;
    pthread_t *resumers;        /* [n_resumers]: as many as readers (Redis), else 1 */
    int n_resumers;
    pthread_cond_t rdy_cv;      /* h->ready got one, or rdy_stop */
    int rdy_stop;
    unsigned next_reader;       /* atomic: the reader of the next lookup */
};

/* Take p out of h->parked (h->mu held). */
static void parked_unlink(hooks_state *h, parked *p)
{
    if (p->prev)
        p->prev->next = p->next;
    else
        h->parked = p->next;
    if (p->next)
        p->next->prev = p->prev;
}

static cache_flight *take_leader(hooks_state *h, const serve_request *req);

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

/* e if it may answer a request (NULL stays NULL); an entry without the
 * logprobs the request asks for cannot happen (the key differs), but is
 * never used: freed, NULL. */
static cache_entry *usable(cache_entry *e, int want_logprobs)
{
    if (e && want_logprobs && !e->logprobs) {
        cache_entry_free(e);
        return NULL;
    }
    return e;
}

/* Resume a parked request: with e's answer (released by serve through
 * hook_release), or without one (e NULL: compute, or end). */
static void resume_with(serve_cache_resume_fn resume, void *ctx, cache_entry *e)
{
    if (e) {
        serve_answer ans;
        fill_answer(e, &ans);
        resume(ctx, 1, &ans);
    } else {
        resume(ctx, 0, NULL);
    }
}

/* The cache's done callback of a parked follower (publishing thread, no
 * cache lock held): move it to the ready queue, for a resumer. */
static void on_flight_done(cache_flight_waiter *w, int rc, cache_entry *e)
{
    parked *p = (parked *)w;
    hooks_state *h = p->h;
    pthread_mutex_lock(&h->mu);
    parked_unlink(h, p);
    p->rc = rc;
    p->e = e;
    p->prev = p->next = NULL;
    if (h->ready_tail)
        h->ready_tail->next = p;
    else
        h->ready = p;
    h->ready_tail = p;
    pthread_cond_signal(&h->rdy_cv);
    pthread_mutex_unlock(&h->mu);
}

/* Take g out of a list of rgets (its reader's mu held); tail may be NULL. */
static void rget_unlink(rget **head, rget **tail, rget *g)
{
    if (g->prev)
        g->prev->next = g->next;
    else
        *head = g->next;
    if (g->next)
        g->next->prev = g->prev;
    else if (tail)
        *tail = g->prev;
    g->prev = g->next = NULL;
}

/* Hand k to a reader thread: SERVE_CACHE_PARKED with *ret_ticket, or 0
 * (out of memory: the caller goes on as after a miss). */
static int park_get(hooks_state *h, const serve_cache_key *sk, const cache_key *k, int lead,
                    int64_t deadline_ns, serve_cache_resume_fn resume, void *ctx,
                    uint64_t *ret_ticket)
{
    rget *g = calloc(1, sizeof *g);
    if (!g)
        return 0;
    g->key = *k;
    g->h = h;
    g->req = sk->req;
    g->lead = lead;
    g->deadline_ns = deadline_ns;
    g->want_logprobs = sk->req->sampling.logprobs > 0;
    g->resume = resume;
    g->ctx = ctx;
    g->id = __atomic_add_fetch(&h->next_park, 1, __ATOMIC_RELAXED);
    *ret_ticket = g->id;
    reader *rd = &h->readers[__atomic_fetch_add(&h->next_reader, 1, __ATOMIC_RELAXED) %
                             (unsigned)h->n_readers];
    pthread_mutex_lock(&rd->mu);
    g->prev = rd->rq_tail;
    if (rd->rq_tail)
        rd->rq_tail->next = g;
    else
        rd->rq = g;
    rd->rq_tail = g;
    pthread_cond_signal(&rd->cv);
    int wake = rd->reading && rd->efd >= 0;
    pthread_mutex_unlock(&rd->mu);
    if (wake) {
        uint64_t one = 1;
        if (write(rd->efd, &one, sizeof one) < 0) {
            /* EAGAIN: the counter is full, the reader is woken anyway */
        }
    }
    /* From here g is the reader's: it may be resumed before this returns. */
    return SERVE_CACHE_PARKED;
}

static int hook_lookup_async(void *user, const serve_cache_key *sk, int64_t deadline_ns,
                             serve_answer *ret, serve_cache_resume_fn resume, void *ctx,
                             uint64_t *ret_ticket)
{
    hooks_state *h = user;
    cache_key k;
    if (make_key(h, sk, &k) || !k.lookup)
        return 0;
    cache_entry *e = NULL;
    if (!h->async_get && cache_get(h->c, &k, deadline_ns, &e) == 1 &&
        (e = usable(e, sk->req->sampling.logprobs > 0))) {
        fill_answer(e, ret);
        return 1;
    }
    if (!k.store) /* no_store: compute alone, nobody waits for it */
        return h->async_get ? park_get(h, sk, &k, 0, deadline_ns, resume, ctx, ret_ticket) : 0;
    parked *p = calloc(1, sizeof *p); /* before joining: a follower must be able to park */
    if (!p)
        return 0;
    cache_flight *f;
    int role = cache_flight_join(h->c, &k, &f);
    if (role == CACHE_FLIGHT_LEADER) {
        free(p);
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
        /* Redis: the leader itself waits for its GET, parked; identical
         * requests park behind it meanwhile. A miss resumes it to compute
         * (it stays the leader), a hit is published to its followers. */
        return h->async_get ? park_get(h, sk, &k, 1, deadline_ns, resume, ctx, ret_ticket) : 0;
    }
    if (role != CACHE_FLIGHT_FOLLOWER) {
        free(p);
        return 0;
    }
    p->w.done = on_flight_done;
    p->h = h;
    p->f = f;
    p->deadline_ns = deadline_ns;
    p->want_logprobs = sk->req->sampling.logprobs > 0;
    p->resume = resume;
    p->ctx = ctx;
    pthread_mutex_lock(&h->mu);
    p->id = __atomic_add_fetch(&h->next_park, 1, __ATOMIC_RELAXED);
    p->next = h->parked;
    if (h->parked)
        h->parked->prev = p;
    h->parked = p;
    /* The writer takes it into account when it looks next; wake it only when
     * it sleeps past this deadline (requests without one never wake it). */
    if (p->deadline_ns && h->writer_wait && p->deadline_ns < h->writer_wait)
        pthread_cond_signal(&h->cv);
    pthread_mutex_unlock(&h->mu);
    *ret_ticket = p->id;
    /* From here p belongs to the flight, then to the writer: it may be
     * resumed (and freed) before this returns. */
    cache_flight_park(h->c, f, &p->w);
    return SERVE_CACHE_PARKED;
}

static int hook_unpark(void *user, uint64_t ticket)
{
    hooks_state *h = user;
    pthread_mutex_lock(&h->mu);
    parked *p = h->parked;
    while (p && p->id != ticket)
        p = p->next;
    /* Not in h->parked: its flight ended and the writer resumes it. In the
     * list but no longer in the flight: done is running (waiting for mu). */
    int taken = p && cache_flight_unpark(h->c, p->f, &p->w);
    if (taken) {
        parked_unlink(h, p);
    }
    pthread_mutex_unlock(&h->mu);
    if (p) {
        if (taken)
            free(p);
        return taken;
    }
    /* A lookup waiting for Redis (a ticket is a parked follower or an rget,
     * never both): still queued (free it), or in a reader's pipeline (the
     * reader frees it after its batch). Serve ends the request and its
     * finish hook fails a leader's flight. */
    for (int i = 0; i < h->n_readers; i++) {
        reader *rd = &h->readers[i];
        pthread_mutex_lock(&rd->mu);
        rget *g;
        for (g = rd->rq; g && g->id != ticket; g = g->next)
            ;
        const int queued = g != NULL;
        if (!g)
            for (g = rd->rbusy; g && g->id != ticket; g = g->next)
                ;
        if (g) {
            rget_unlink(queued ? &rd->rq : &rd->rbusy, queued ? &rd->rq_tail : NULL, g);
            g->gone = 1;
        }
        pthread_mutex_unlock(&rd->mu);
        if (g) {
            if (queued)
                free(g);
            return 1;
        }
    }
    return 0;
}

/* Reader thread: the GET of one parked lookup is answered (hit 1 with e). */
static void on_get_done(void *user, cache_get_op *op, int hit, cache_entry *e)
{
    reader *rd = user;
    hooks_state *h = rd->h;
    rget *g = op->user;
    pthread_mutex_lock(&rd->mu);
    int gone = g->gone;
    if (!gone)
        rget_unlink(&rd->rbusy, NULL, g); /* from here unpark answers 0 */
    pthread_mutex_unlock(&rd->mu);
    if (gone) { /* its request has ended; freed after the batch */
        cache_entry_free(e);
        return;
    }
    e = usable(hit ? e : NULL, g->want_logprobs); /* a miss has no entry */
    if (e && g->lead) {
        /* The followers get the hit too; later identical requests find the
         * entry in Redis. On a miss the request stays the leader. */
        cache_flight *f = take_leader(h, g->req);
        if (f)
            cache_flight_publish(h->c, f, e);
    }
    resume_with(g->resume, g->ctx, e); /* no entry: compute (fail open), or end */
}

/* Reader thread (cache_get_stream's take): move queued lookups into the
 * pipeline. */
static int reader_take(void *user, cache_get_op *ops, int max)
{
    reader *rd = user;
    int n = 0;
    pthread_mutex_lock(&rd->mu);
    while (rd->rq && n < max) {
        rget *g = rd->rq;
        rget_unlink(&rd->rq, &rd->rq_tail, g);
        g->next = rd->rbusy;
        if (rd->rbusy)
            rd->rbusy->prev = g;
        rd->rbusy = g;
        ops[n++] = (cache_get_op){&g->key, g->deadline_ns, g};
    }
    pthread_mutex_unlock(&rd->mu);
    rd->taken += n;
    __atomic_add_fetch(&rd->lookups, (uint64_t)n, __ATOMIC_RELAXED);
    return n;
}

/* Reader thread: the queued lookups' GETs go out as one pipeline, which
 * stays open to lookups queued while its replies are awaited (park_get
 * writes rd->efd then); each request is resumed as its reply comes. */
static void *reader_main(void *arg)
{
    reader *rd = arg;
    cache_get_op *ops = rd->ops;
    const int cap = READ_BATCH_MAX;
    cache_get_more more = {rd->efd, reader_take};
    pthread_mutex_lock(&rd->mu);
    for (;;) {
        while (!rd->rq && !rd->stop)
            pthread_cond_wait(&rd->cv, &rd->mu);
        if (!rd->rq)
            break; /* stop with an empty queue */
        rd->reading = 1;
        pthread_mutex_unlock(&rd->mu);
        rd->taken = 0;
        int n = reader_take(rd, ops, cap);
        cache_get_stream(rd->h->c, ops, n, cap, rd->efd >= 0 ? &more : NULL, rd->scratch,
                         on_get_done, rd);
        for (int i = 0; i < rd->taken; i++)
            free(ops[i].user); /* answered, or taken back (gone) */
        pthread_mutex_lock(&rd->mu);
        rd->reading = 0;
    }
    pthread_mutex_unlock(&rd->mu);
    return NULL;
}

/* Stop and join the started readers, free every reader's resources. */
static void readers_destroy(hooks_state *h)
{
    for (int i = 0; i < h->n_readers; i++) {
        reader *rd = &h->readers[i];
        if (!rd->started)
            continue;
        pthread_mutex_lock(&rd->mu);
        rd->stop = 1;
        pthread_cond_signal(&rd->cv);
        pthread_mutex_unlock(&rd->mu);
        pthread_join(rd->thread, NULL);
    }
    for (int i = 0; i < h->n_readers; i++) {
        reader *rd = &h->readers[i];
        pthread_mutex_destroy(&rd->mu);
        pthread_cond_destroy(&rd->cv);
        if (rd->efd >= 0)
            close(rd->efd);
        free(rd->ops);
        free(rd->scratch);
    }
    free(h->readers);
    h->readers = NULL;
    h->n_readers = 0;
}

/* Make and start n readers: 0, or -ENOMEM / -EAGAIN (none left running). */
static int readers_start(hooks_state *h, int n)
{
    h->readers = calloc((size_t)n, sizeof *h->readers);
    if (!h->readers)
        return -ENOMEM;
    h->n_readers = n;
    int rc = 0;
    for (int i = 0; i < n; i++) {
        reader *rd = &h->readers[i];
        rd->h = h;
        pthread_mutex_init(&rd->mu, NULL);
        pthread_cond_init(&rd->cv, NULL);
        rd->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        rd->ops = malloc(READ_BATCH_MAX * sizeof *rd->ops);
        rd->scratch = malloc(cache_get_stream_scratch(READ_BATCH_MAX));
    }
    for (int i = 0; i < n && !rc; i++) {
        reader *rd = &h->readers[i];
        if (!rd->ops || !rd->scratch)
            rc = -ENOMEM;
        else if (pthread_create(&rd->thread, NULL, reader_main, rd))
            rc = -EAGAIN;
        else
            rd->started = 1;
    }
    if (rc)
        readers_destroy(h);
    return rc;
}

/* Resumer thread: resume one follower whose flight ended (p is unlisted). */
static void resume_parked(parked *p)
{
    resume_with(p->resume, p->ctx, usable(p->rc == 0 ? p->e : NULL, p->want_logprobs));
    free(p);
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
    if (h->store_inline) {
        /* In-process store: a short lock, no I/O. Done before the answer
         * reaches the client, so the next identical request hits. */
        int ok = make_key(h, sk, &k) == 0 && k.store;
        if (ok)
            cache_put(h->c, &k, &e, 0);
        if (f)
            cache_flight_publish(h->c, f, ok ? &e : NULL);
        return;
    }
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

/* Under h->mu: take back the parked followers whose deadline has passed
 * (onto *expired); the earliest deadline still pending, 0 if none. */
static int64_t expire_parked(hooks_state *h, int64_t now, parked **expired)
{
    int64_t next = 0;
    for (parked *p = h->parked, *nx; p; p = nx) {
        nx = p->next;
        if (!p->deadline_ns)
            continue;
        if (p->deadline_ns > now) {
            if (!next || p->deadline_ns < next)
                next = p->deadline_ns;
            continue;
        }
        if (!cache_flight_unpark(h->c, p->f, &p->w)) {
            /* Its flight has just ended (it comes through h->ready), or
             * lookup_async has not parked it yet: look again soon. */
            if (!next || now + 1000000 < next)
                next = now + 1000000;
            continue;
        }
        parked_unlink(h, p);
        p->prev = NULL;
        p->next = *expired;
        *expired = p;
    }
    return next;
}

static void *writer_main(void *arg)
{
    hooks_state *h = arg;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        parked *expired = NULL;
        int64_t next = expire_parked(h, cache_now_ns(), &expired);
        if (!h->head && !expired) {
            if (h->stop)
                break; /* stop with an empty queue */
            if (next) {
                struct timespec ts = {next / 1000000000, next % 1000000000};
                h->writer_wait = next;
                pthread_cond_timedwait(&h->cv, &h->mu, &ts);
            } else {
                h->writer_wait = INT64_MAX;
                pthread_cond_wait(&h->cv, &h->mu);
            }
            h->writer_wait = 0;
            continue;
        }
        /* Expired followers first: they end requests now; a store only saves. */
        wjob *j = expired ? NULL : h->head;
        if (j) {
            h->head = j->next;
            if (!h->head)
                h->tail = NULL;
            h->queued--;
        }
        pthread_mutex_unlock(&h->mu);
        for (parked *p = expired, *nx; p; p = nx) {
            nx = p->next;
            p->resume(p->ctx, 0, NULL); /* serve ends it: deadline exceeded */
            free(p);
        }
        if (j) {
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
        }
        pthread_mutex_lock(&h->mu);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

/* Resumer thread: resume followers whose flight ended, one at a time,
 * while another resumer takes the next; drains h->ready at stop. */
static void *resumer_main(void *arg)
{
    hooks_state *h = arg;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (!h->ready && !h->rdy_stop)
            pthread_cond_wait(&h->rdy_cv, &h->mu);
        parked *p = h->ready;
        if (!p)
            break; /* stop with an empty queue */
        h->ready = p->next;
        if (!h->ready)
            h->ready_tail = NULL;
        else
            pthread_cond_signal(&h->rdy_cv); /* more: wake another resumer */
        pthread_mutex_unlock(&h->mu);
        resume_parked(p);
        pthread_mutex_lock(&h->mu);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

/* Stop the started resumers once h->ready is empty (join). */
static void resumers_stop(hooks_state *h)
{
    pthread_mutex_lock(&h->mu);
    h->rdy_stop = 1;
    pthread_cond_broadcast(&h->rdy_cv);
    pthread_mutex_unlock(&h->mu);
    for (int i = 0; i < h->n_resumers; i++)
        pthread_join(h->resumers[i], NULL);
    free(h->resumers);
    h->resumers = NULL;
    h->n_resumers = 0;
}

/* Start n resumers: 0, or -ENOMEM / -EAGAIN (none left running). */
static int resumers_start(hooks_state *h, int n)
{
    h->resumers = calloc((size_t)n, sizeof *h->resumers);
    if (!h->resumers)
        return -ENOMEM;
    for (int i = 0; i < n; i++) {
        if (pthread_create(&h->resumers[i], NULL, resumer_main, h)) {
            resumers_stop(h); /* the i started */
            return -EAGAIN;
        }
        h->n_resumers = i + 1;
    }
    return 0;
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
    /* Leaders left (none once every request has ended): fail their
     * flights, so that their parked followers go through h->ready. */
    pthread_mutex_lock(&h->mu);
    leader *left = NULL;
    for (int b = 0; b < LEADER_BUCKETS; b++) {
        for (leader *l = h->leaders[b], *nx; l; l = nx) {
            nx = l->next;
            l->next = left;
            left = l;
        }
        h->leaders[b] = NULL;
    }
    pthread_mutex_unlock(&h->mu);
    for (leader *l = left, *nx; l; l = nx) {
        nx = l->next;
        cache_flight_publish(h->c, l->f, NULL);
        free(l);
    }
    readers_destroy(h); /* first: their hits may still put followers in h->ready */
    pthread_mutex_lock(&h->mu);
    h->stop = 1;
    pthread_cond_signal(&h->cv);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->writer, NULL);
    resumers_stop(h); /* last: the readers' and the writer's publications end in h->ready */
    /* Nothing is parked once every request has ended; should one be left
     * (a flight nobody leads), take it back so that nothing leaks. */
    for (parked *p = h->parked, *nx; p; p = nx) {
        nx = p->next;
        if (cache_flight_unpark(h->c, p->f, &p->w))
            free(p);
    }
    h->parked = NULL;
    for (parked *p = h->ready, *nx; p; p = nx) {
        nx = p->next;
        cache_entry_free(p->e);
        free(p);
    }
    h->ready = h->ready_tail = NULL;
    if (H == h)
        H = NULL;
    cache_destroy(h->c);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv);
    pthread_cond_destroy(&h->rdy_cv);
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
    const hooks_state *h = H;
    size_t cap = 8192;
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
    if (h->n_readers) {
        EMIT("# HELP lightmoe_cache_reader_lookups_total Redis lookups sent by each reader "
             "thread\n# TYPE lightmoe_cache_reader_lookups_total counter\n");
        for (int i = 0; i < h->n_readers; i++)
            EMIT("lightmoe_cache_reader_lookups_total{reader=\"%d\"} %llu\n", i,
                 (unsigned long long)__atomic_load_n(&h->readers[i].lookups, __ATOMIC_RELAXED));
    }
#undef EMIT
#undef COUNTER
#undef GAUGE
    if (n >= cap) { /* cannot happen with 8 KiB (32 readers at most); never send a cut line */
        free(out);
        return NULL;
    }
    return out;
}

int cache_hooks_readers(const daemon_config *cfg)
{
    if (cfg->cache_readers > 0) /* 1..32: the configuration's range */
        return (int)cfg->cache_readers;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int n = cpus > 0 ? (int)(cpus / CACHE_READERS_AUTO_DIV) : 1;
    return n < 1 ? 1 : n > CACHE_READERS_AUTO_MAX ? CACHE_READERS_AUTO_MAX : n;
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
    const int n_readers = cache_hooks_readers(cfg);
    /* a connection a reader, the writer's, one for admin calls */
    cc.pool_size = n_readers + 2 > cc.pool_size ? n_readers + 2 : cc.pool_size;
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
    h->store_inline = u.kind == CACHE_BACKEND_MEMORY;
    h->async_get = !h->store_inline;
    pthread_mutex_init(&h->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&h->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&h->rdy_cv, NULL);
    /* Redis: a resumer a reader (started first: readers may publish) */
    rc = resumers_start(h, h->async_get ? n_readers : 1);
    if (!rc)
        rc = h->async_get ? readers_start(h, n_readers) : 0;
    if (!rc && pthread_create(&h->writer, NULL, writer_main, h))
        rc = -EAGAIN;
    if (rc) {
        snprintf(err, errlen, "cache: cannot start the writer and %d reader and resumer threads%s",
                 h->async_get ? n_readers : 0, rc == -ENOMEM ? " (out of memory)" : "");
        readers_destroy(h);
        resumers_stop(h);
        cache_destroy(h->c);
        pthread_mutex_destroy(&h->mu);
        pthread_cond_destroy(&h->cv);
        pthread_cond_destroy(&h->rdy_cv);
        free(h);
        return rc;
    }
    serve_cache_hooks hk = {
        .user = h,
        .lookup_async = hook_lookup_async,
        .unpark = hook_unpark,
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
        log_info("cache: redis %s:%d db %d%s%s, ttl %lld s, timeout %lld ms, readers: %d, model "
                 "fingerprint %.16s", u.host, u.port, u.db, u.user[0] ? " user " : "",
                 u.user[0] ? u.user : (u.password[0] ? " (password)" : ""),
                 (long long)cfg->cache_ttl_seconds, (long long)cfg->cache_timeout_ms, n_readers,
                 h->fp);
    else
        log_info("cache: redis unix socket %s db %d, ttl %lld s, readers: %d, model fingerprint "
                 "%.16s", u.path, u.db, (long long)cfg->cache_ttl_seconds, n_readers, h->fp);
    return 0;
}
