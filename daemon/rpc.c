/*
 * rpc.c: the gRPC server core: completion-queue threads, method
 * registration, the listeners that keep a request outstanding for every
 * method (and one for unknown methods), the call machinery of
 * rpc_internal.h, bearer-token auth and shutdown.
 */
#include "daemon/rpc_internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon/log.h"
#include "daemon/metrics.h"

/* One outstanding request for a method (m == NULL: unknown methods). */
typedef struct listener {
    rpc_tag tag;
    rpc_server *srv;
    grpc_completion_queue *cq;      /* the queue its calls are bound to */
    const rpc_method *m;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
    grpc_call_details details;      /* unknown methods only */
} listener;

#define MAX_METHODS 16
#define MAX_THREADS 64

/* One thread serving one completion queue. */
typedef struct cq_worker {
    grpc_completion_queue *cq;
    pthread_t th;
} cq_worker;

struct rpc_server {
    grpc_server *server;
    grpc_completion_queue *cqs[MAX_THREADS];
    int n_cqs;
    serve *sv;
    cq_worker workers[MAX_THREADS];
    int n_threads;
    rpc_method methods[MAX_METHODS];
    int n_methods;
    /* One outstanding request per method (and one for unknown methods) on
     * every queue: listeners[q * (n_methods + 1) + i]. */
    listener listeners[MAX_THREADS * (MAX_METHODS + 1)];
    int serving;
    int shutting_down;
    rpc_tag shutdown_tag;
    int shutdown_done;
    pthread_mutex_t mu;             /* guards the fields below and the call list */
    pthread_cond_t cond;
    rpc_call *calls;
    int n_calls;
    char **tokens;
    int n_tokens;
    uint64_t next_req;
};

int64_t rpc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

serve *rpc_serve(rpc_server *r)
{
    return r->sv;
}

/* ---- auth ---------------------------------------------------------------------- */

static void free_tokens(char **t, int n)
{
    for (int i = 0; i < n; i++)
        free(t[i]);
    free(t);
}

int rpc_load_tokens(rpc_server *r, const char *path, char *errbuf, size_t errlen)
{
    char **toks = NULL;
    int n = 0, cap = 0;
    if (path && path[0]) {
        FILE *f = fopen(path, "r");
        if (!f) {
            int e = errno;
            snprintf(errbuf, errlen, "auth_token_file '%s': %s", path, strerror(e));
            return -e;
        }
        char line[1024];
        while (fgets(line, sizeof line, f)) {
            size_t len = strcspn(line, "\r\n");
            line[len] = 0;
            char *s = line;
            while (*s == ' ' || *s == '\t')
                s++;
            len = strlen(s);
            while (len && (s[len - 1] == ' ' || s[len - 1] == '\t'))
                s[--len] = 0;
            if (!len || *s == '#')
                continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 8;
                char **t = realloc(toks, (size_t)cap * sizeof *t);
                if (!t)
                    break;
                toks = t;
            }
            toks[n++] = strdup(s);
        }
        fclose(f);
        if (n == 0) {
            free(toks);
            snprintf(errbuf, errlen, "auth_token_file '%s' holds no token (one per line)", path);
            return -EINVAL;
        }
    }
    pthread_mutex_lock(&r->mu);
    char **old = r->tokens;
    int old_n = r->n_tokens;
    r->tokens = toks;
    r->n_tokens = n;
    pthread_mutex_unlock(&r->mu);
    free_tokens(old, old_n);
    return 0;
}

/* Constant-time comparison: a token's prefix must not be guessable by timing. */
static int token_eq(const char *a, const char *b)
{
    size_t na = strlen(a), nb = strlen(b);
    unsigned char d = na != nb;
    for (size_t i = 0; i < na; i++)
        d |= (unsigned char)(a[i] ^ b[i % (nb ? nb : 1)]);
    return d == 0;
}

static int check_auth(rpc_call *c)
{
    rpc_server *r = c->srv;
    pthread_mutex_lock(&r->mu);
    int need = r->n_tokens > 0;
    pthread_mutex_unlock(&r->mu);
    if (!need || !c->m || !c->m->needs_auth)
        return 1;
    char v[1100];
    const char *h = rpc_metadata(c, "authorization", v, sizeof v);
    if (!h) {
        rpc_finish(c, GRPC_STATUS_UNAUTHENTICATED,
                   "missing bearer token: send metadata 'authorization: Bearer <token>'");
        return 0;
    }
    if (strncasecmp(h, "Bearer ", 7)) {
        rpc_finish(c, GRPC_STATUS_UNAUTHENTICATED,
                   "authorization metadata must be 'Bearer <token>'");
        return 0;
    }
    int ok = 0;
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->n_tokens; i++)
        ok |= token_eq(h + 7, r->tokens[i]);
    pthread_mutex_unlock(&r->mu);
    if (!ok)
        rpc_finish(c, GRPC_STATUS_UNAUTHENTICATED, "bearer token not accepted by this server");
    return ok;
}

/* ---- call machinery ------------------------------------------------------------- */

const char *rpc_metadata(rpc_call *c, const char *key, char *buf, size_t n)
{
    for (size_t i = 0; i < c->md.count; i++) {
        const grpc_metadata *e = &c->md.metadata[i];
        size_t kl = GRPC_SLICE_LENGTH(e->key);
        if (kl == strlen(key) && !strncasecmp((const char *)GRPC_SLICE_START_PTR(e->key), key, kl)) {
            size_t vl = GRPC_SLICE_LENGTH(e->value);
            if (vl >= n)
                vl = n - 1;
            memcpy(buf, GRPC_SLICE_START_PTR(e->value), vl);
            buf[vl] = 0;
            return buf;
        }
    }
    return NULL;
}

void rpc_call_ref(rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    c->refs++;
    pthread_mutex_unlock(&c->mu);
}

static void call_free(rpc_call *c)
{
    if (c->cleanup)
        c->cleanup(c);
    rpc_server *r = c->srv;
    pthread_mutex_lock(&r->mu);
    if (c->prev)
        c->prev->next = c->next;
    else
        r->calls = c->next;
    if (c->next)
        c->next->prev = c->prev;
    r->n_calls--;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mu);
    for (rpc_out *o = c->out_head; o;) {
        rpc_out *n = o->next;
        grpc_byte_buffer_destroy(o->buf);
        free(o);
        o = n;
    }
    if (c->payload)
        grpc_byte_buffer_destroy(c->payload);
    grpc_metadata_array_destroy(&c->md);
    free(c->details);
    if (c->call)
        grpc_call_unref(c->call);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

void rpc_call_unref(rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    int left = --c->refs;
    pthread_mutex_unlock(&c->mu);
    if (left == 0)
        call_free(c);
}

grpc_byte_buffer *rpc_pack(const ProtobufCMessage *msg)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *b = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return b;
}

/* The call's status went out: its log line (the RPC was counted when the
 * status was queued, rpc_finish). */
static void log_done(rpc_call *c)
{
    double secs = (double)(rpc_now_ns() - c->start_ns) * 1e-9;
    const char *name = c->m ? c->m->name : "unknown";
    log_level lvl = c->code == GRPC_STATUS_OK ? LL_INFO
                    : c->code == GRPC_STATUS_INTERNAL ? LL_ERROR : LL_WARN;
    if (c->m && !strncmp(c->m->name, "Health", 6) && c->code == GRPC_STATUS_OK)
        lvl = LL_DEBUG; /* probes every few seconds would drown the log */
    log_msg(lvl, c->request_id, "%s %s %.3fs%s%s", name, st_code_name((int)c->code), secs,
            c->details && c->details[0] ? ": " : "", c->details ? c->details : "");
}

static void send_done(rpc_tag *t, int ok);

/* Start the next batch if none is in flight. Called with c->mu held. When
 * RECV_CLOSE_ON_SERVER is pending (only right after the handler) and this
 * batch carries the status, the close rides along: one completion. */
static void pump_locked(rpc_call *c)
{
    if (c->in_handler || c->sending || c->status_sent)
        return;
    grpc_byte_buffer *buf = NULL;
    if (!c->broken) {
        if (c->out_head) {
            rpc_out *o = c->out_head;
            c->out_head = o->next;
            if (!c->out_head)
                c->out_tail = NULL;
            buf = o->buf;
            free(o);
        } else if (c->produce) {
            buf = c->produce(c);
        }
    }
    /* The status travels with the last message: when nothing is queued and
     * produce has nothing more. */
    int with_status = c->status_queued &&
                      (c->broken || (!c->out_head && !(c->has_more && c->has_more(c))));
    if (!buf && !with_status)
        return;
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    int n = 0;
    if (!c->sent_md) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
        c->sent_md = 1;
    }
    if (buf) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = buf;
        n++;
    }
    if (with_status) {
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = c->code;
        c->details_slice = grpc_slice_from_copied_string(c->details ? c->details : "");
        ops[n].data.send_status_from_server.status_details = &c->details_slice;
        n++;
        c->status_in_flight = 1;
    }
    int with_close = with_status && c->close_pending;
    if (with_close) { /* its reference is the one counted at the call's start */
        ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        ops[n].data.recv_close_on_server.cancelled = &c->close_cancelled;
        n++;
        c->close_pending = 0;
    }
    c->inflight = buf;
    c->sending = 1;
    c->refs++;
    grpc_call_error e = grpc_call_start_batch(c->call, ops, (size_t)n,
                                              with_close ? &c->both_tag : &c->send_tag, NULL);
    if (e != GRPC_CALL_OK) {
        log_msg(LL_ERROR, c->request_id, "BUG: grpc_call_start_batch (send) failed: %d", e);
        c->close_pending |= with_close;
        c->sending = 0;
        c->refs--;
        if (buf)
            grpc_byte_buffer_destroy(buf);
        c->inflight = NULL;
        if (c->status_in_flight) {
            grpc_slice_unref(c->details_slice);
            c->status_in_flight = 0;
        }
        c->status_sent = 1;
        c->broken = 1;
    }
}

/* A send batch completed (the batch's reference is dropped by the caller). */
static void send_complete(rpc_call *c, int ok)
{
    pthread_mutex_lock(&c->mu);
    c->sending = 0;
    if (c->inflight) {
        grpc_byte_buffer_destroy(c->inflight);
        c->inflight = NULL;
    }
    int finished_now = 0;
    if (c->status_in_flight) {
        grpc_slice_unref(c->details_slice);
        c->status_in_flight = 0;
        c->status_sent = 1;
        finished_now = 1;
    }
    if (!ok && !c->broken)
        c->broken = 1; /* the client is gone: send only the status from now */
    pump_locked(c);
    pthread_mutex_unlock(&c->mu);
    if (finished_now)
        log_done(c);
}

static void send_done(rpc_tag *t, int ok)
{
    rpc_call *c = (rpc_call *)((char *)t - offsetof(rpc_call, send_tag));
    send_complete(c, ok);
    rpc_call_unref(c);
}

void rpc_kick(rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    pump_locked(c);
    pthread_mutex_unlock(&c->mu);
}

void rpc_send(rpc_call *c, const ProtobufCMessage *msg)
{
    rpc_out *o = malloc(sizeof *o);
    if (!o)
        return;
    o->buf = rpc_pack(msg);
    o->next = NULL;
    pthread_mutex_lock(&c->mu);
    if (c->status_queued) {
        pthread_mutex_unlock(&c->mu);
        grpc_byte_buffer_destroy(o->buf);
        free(o);
        return;
    }
    if (c->out_tail)
        c->out_tail->next = o;
    else
        c->out_head = o;
    c->out_tail = o;
    pump_locked(c);
    pthread_mutex_unlock(&c->mu);
}

void rpc_finish(rpc_call *c, int code, const char *fmt, ...)
{
    char msg[1024] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
    }
    pthread_mutex_lock(&c->mu);
    if (!c->status_queued) {
        c->status_queued = 1;
        c->code = (grpc_status_code)code;
        c->details = strdup(msg);
        /* counted now, before the client can see the status: a metrics
         * scrape after the client's last answer includes it */
        metrics_count_request(c->m ? c->m->name : "unknown", code);
        pump_locked(c);
    }
    pthread_mutex_unlock(&c->mu);
}

/* RECV_CLOSE_ON_SERVER completed (its reference is dropped by the caller). */
static void close_complete(rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    c->closed = 1;
    int cancelled = c->close_cancelled && !c->status_sent;
    if (cancelled)
        c->broken = 1;
    pthread_mutex_unlock(&c->mu);
    if (cancelled) {
        log_msg(LL_INFO, c->request_id, "client cancelled the call or its deadline passed");
        /* Every handler answers on_cancel with rpc_finish, so the outcome
         * is counted once (rpc_finish) and logged once (log_done). */
        if (c->on_cancel)
            c->on_cancel(c);
    }
}

static void close_done(rpc_tag *t, int ok)
{
    (void)ok;
    rpc_call *c = (rpc_call *)((char *)t - offsetof(rpc_call, close_tag));
    close_complete(c);
    rpc_call_unref(c);
}

/* The answer and RECV_CLOSE_ON_SERVER in one batch: both references. */
static void both_done(rpc_tag *t, int ok)
{
    rpc_call *c = (rpc_call *)((char *)t - offsetof(rpc_call, both_tag));
    send_complete(c, ok);
    close_complete(c);
    rpc_call_unref(c);
    rpc_call_unref(c);
}

static void recv_done(rpc_tag *t, int ok)
{
    rpc_call *c = (rpc_call *)((char *)t - offsetof(rpc_call, recv_tag));
    grpc_byte_buffer *b = ok ? c->recv_buf : NULL;
    if (!ok && c->recv_buf)
        grpc_byte_buffer_destroy(c->recv_buf);
    c->recv_buf = NULL;
    if (c->on_recv)
        c->on_recv(c, b);
    else if (b)
        grpc_byte_buffer_destroy(b);
    rpc_call_unref(c);
}

void rpc_recv(rpc_call *c)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_buf;
    rpc_call_ref(c);
    pthread_mutex_lock(&c->mu);
    grpc_call_error e = grpc_call_start_batch(c->call, &op, 1, &c->recv_tag, NULL);
    pthread_mutex_unlock(&c->mu);
    if (e != GRPC_CALL_OK) {
        log_msg(LL_ERROR, c->request_id, "BUG: grpc_call_start_batch (recv) failed: %d", e);
        rpc_call_unref(c);
    }
}

ProtobufCMessage *rpc_unpack(rpc_call *c, const ProtobufCMessageDescriptor *desc)
{
    if (!c->payload) {
        rpc_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "no request message received");
        return NULL;
    }
    grpc_byte_buffer_reader rd;
    if (!grpc_byte_buffer_reader_init(&rd, c->payload)) {
        rpc_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "unreadable (compressed?) request message");
        return NULL;
    }
    grpc_slice s = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(s),
                                                    GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    if (!m)
        rpc_finish(c, GRPC_STATUS_INVALID_ARGUMENT,
                   "request is not a valid %s message (wrong proto or corrupted)", desc->name);
    return m;
}

/* ---- listeners ----------------------------------------------------------------- */

static void listener_done(rpc_tag *t, int ok);

static void listener_arm(listener *l)
{
    rpc_server *r = l->srv;
    grpc_metadata_array_init(&l->md);
    l->call = NULL;
    l->payload = NULL;
    grpc_call_error e;
    if (l->m) {
        e = grpc_server_request_registered_call(r->server, l->m->registered, &l->call,
                                                &l->deadline, &l->md,
                                                l->m->read_payload ? &l->payload : NULL, l->cq,
                                                l->cq, &l->tag);
    } else {
        grpc_call_details_init(&l->details);
        e = grpc_server_request_call(r->server, &l->call, &l->details, &l->md, l->cq, l->cq,
                                     &l->tag);
    }
    if (e != GRPC_CALL_OK)
        log_error("BUG: request_call for %s failed: %d", l->m ? l->m->path : "(unknown)", e);
}

static void unknown_method(rpc_call *c)
{
    rpc_finish(c, GRPC_STATUS_UNIMPLEMENTED,
               "method %s is not implemented by lightmoed (services: lightmoe.v1.LightMoE, "
               "grpc.health.v1.Health, grpc.reflection.v1[alpha].ServerReflection)",
               c->method_path);
}

/* src[0..n) into dst (cap bytes), cut to cap - 1, NUL-terminated. */
static void copy_trunc(char *dst, size_t cap, const char *src, size_t n)
{
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

/* "lm-<t hex>-<seq decimal>" (the id of a call whose client sent none) into
 * out (>= 3 + 16 + 1 + 20 + 1 bytes). */
static void make_request_id(char *out, uint64_t t, uint64_t seq)
{
    char tmp[20];
    int n = 0, k = 0;
    out[n++] = 'l';
    out[n++] = 'm';
    out[n++] = '-';
    do
        tmp[k++] = "0123456789abcdef"[t & 15];
    while ((t >>= 4) != 0);
    while (k)
        out[n++] = tmp[--k];
    out[n++] = '-';
    do
        tmp[k++] = (char)('0' + seq % 10);
    while ((seq /= 10) != 0);
    while (k)
        out[n++] = tmp[--k];
    out[n] = 0;
}

static void listener_done(rpc_tag *t, int ok)
{
    listener *l = (listener *)t;
    rpc_server *r = l->srv;
    if (!ok) { /* server shutting down */
        grpc_metadata_array_destroy(&l->md);
        if (!l->m)
            grpc_call_details_destroy(&l->details);
        return;
    }
    rpc_call *c = calloc(1, sizeof *c);
    if (!c) {
        grpc_call_cancel(l->call, NULL);
        grpc_call_unref(l->call);
        grpc_metadata_array_destroy(&l->md);
        listener_arm(l);
        return;
    }
    pthread_mutex_init(&c->mu, NULL);
    c->srv = r;
    c->call = l->call;
    c->m = l->m;
    c->md = l->md;
    c->payload = l->payload;
    c->start_ns = rpc_now_ns();
    c->close_tag.done = close_done;
    c->send_tag.done = send_done;
    c->recv_tag.done = recv_done;
    c->both_tag.done = both_done;
    c->refs = 2; /* handler + RECV_CLOSE_ON_SERVER */
    c->in_handler = 1;
    c->close_pending = 1;
    gpr_timespec dl = l->m ? l->deadline : l->details.deadline;
    if (gpr_time_cmp(dl, gpr_inf_future(dl.clock_type)) != 0) {
        gpr_timespec mono = gpr_convert_clock_type(dl, GPR_CLOCK_MONOTONIC);
        gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);
        gpr_timespec left = gpr_time_sub(mono, now);
        c->deadline_ns = c->start_ns + (int64_t)left.tv_sec * 1000000000 + left.tv_nsec;
        if (c->deadline_ns <= 0)
            c->deadline_ns = 1;
    }
    /* No printf on this path: it runs once per call (hits included). */
    if (l->m) {
        copy_trunc(c->method_path, sizeof c->method_path, l->m->path, strlen(l->m->path));
    } else {
        copy_trunc(c->method_path, sizeof c->method_path,
                   (const char *)GRPC_SLICE_START_PTR(l->details.method),
                   GRPC_SLICE_LENGTH(l->details.method));
        grpc_call_details_destroy(&l->details);
    }
    char rid[80];
    pthread_mutex_lock(&r->mu);
    uint64_t seq = ++r->next_req;
    c->next = r->calls;
    if (r->calls)
        r->calls->prev = c;
    r->calls = c;
    r->n_calls++;
    pthread_mutex_unlock(&r->mu);
    if (rpc_metadata(c, "x-request-id", rid, sizeof rid) && rid[0])
        copy_trunc(c->request_id, 64 + 1, rid, strlen(rid)); /* at most 64 bytes of it */
    else
        make_request_id(c->request_id, (uint64_t)c->start_ns & 0xffffff, seq);

    /* Keep a request outstanding before handling this one. */
    if (!r->shutting_down)
        listener_arm(l);

    log_msg(LL_DEBUG, c->request_id, "%s started", c->method_path);
    if (!l->m)
        unknown_method(c);
    else if (check_auth(c))
        l->m->handler(c);
    /* Send what the handler queued; RECV_CLOSE_ON_SERVER goes with the
     * status if that is ready, else alone (to learn of cancellation). */
    pthread_mutex_lock(&c->mu);
    c->in_handler = 0;
    pump_locked(c);
    int close_alone = c->close_pending;
    c->close_pending = 0;
    if (close_alone) {
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        op.data.recv_close_on_server.cancelled = &c->close_cancelled;
        if (grpc_call_start_batch(c->call, &op, 1, &c->close_tag, NULL) != GRPC_CALL_OK) {
            log_msg(LL_ERROR, c->request_id, "BUG: RECV_CLOSE_ON_SERVER failed");
            c->refs--; /* the close's reference; the handler's still holds c */
        }
    }
    pthread_mutex_unlock(&c->mu);
    rpc_call_unref(c);
}

/* ---- server ------------------------------------------------------------------------ */

static void *cq_thread(void *arg)
{
    cq_worker *w = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC),
                                                   NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type == GRPC_OP_COMPLETE)
            ((rpc_tag *)ev.tag)->done(ev.tag, ev.success);
    }
    return NULL;
}

static void shutdown_done(rpc_tag *t, int ok)
{
    rpc_server *r = (rpc_server *)((char *)t - offsetof(rpc_server, shutdown_tag));
    pthread_mutex_lock(&r->mu);
    r->shutdown_done = 1;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mu);
}

static char *read_file(const char *path, char *errbuf, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(errbuf, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (!b) {
        snprintf(errbuf, errlen, "%s: cannot read", path);
        return NULL;
    }
    b[n] = 0;
    return b;
}

static void add_methods(rpc_server *r, const rpc_method *ms, int n)
{
    for (int i = 0; i < n && r->n_methods < MAX_METHODS; i++)
        r->methods[r->n_methods++] = ms[i];
}

int rpc_start(const daemon_config *cfg, serve *sv, rpc_server **ret, int *ret_port,
              char *errbuf, size_t errlen)
{
    rpc_server *r = calloc(1, sizeof *r);
    if (!r)
        return -ENOMEM;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cond, NULL);
    r->sv = sv;
    r->shutdown_tag.done = shutdown_done;
    int rc = rpc_load_tokens(r, cfg->auth_token_file, errbuf, errlen);
    if (rc) {
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->cond);
        free(r);
        return rc;
    }
    grpc_init();

    /* HTTP/2's per-connection stream limit (GRPC_ARG_MAX_CONCURRENT_STREAMS)
     * is left at gRPC's default on purpose: over it, clients queue their
     * calls silently until the deadline; max_concurrent_streams is enforced
     * by serve instead, which answers RESOURCE_EXHAUSTED at once. */
    grpc_arg args[2];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)cfg->max_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = -1;
    grpc_channel_args ca = {2, args};
    r->server = grpc_server_create(&ca, NULL);
    /* rpc_threads 0: one per core. More threads than cores only add
     * wake-ups and hand-offs (docs/PERF.md: 4 threads on 2 cores served
     * fewer cache hits than 2); at least 2, so that a slow handler (an
     * admin call waiting on Redis) never holds every call up. rpc_queues
     * (default 1): the completion queues the threads are spread over (0: a
     * queue per thread). A call stays on the queue that accepted it. On 16
     * cores a queue per thread cost ~1.8x the CPU per cache hit of one
     * shared queue and served ~25% fewer (docs/PERF.md): the thread that
     * reads a call's bytes is seldom the one polling that call's queue, so
     * every event became a wake-up of another thread. */
    long want = cfg->rpc_threads;
    if (want == 0) {
        want = sysconf(_SC_NPROCESSORS_ONLN);
        if (want < 2)
            want = 2;
    }
    r->n_threads = (int)(want < MAX_THREADS ? want : MAX_THREADS);
    long nq = cfg->rpc_queues;
    r->n_cqs = (int)(nq == 0 || nq > r->n_threads ? r->n_threads : nq);
    for (int q = 0; q < r->n_cqs; q++) {
        r->cqs[q] = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(r->server, r->cqs[q], NULL);
    }

    add_methods(r, rpc_api_methods, rpc_api_n_methods);
    add_methods(r, rpc_health_methods, rpc_health_n_methods);
    add_methods(r, rpc_reflect_methods, rpc_reflect_n_methods);
    for (int i = 0; i < r->n_methods; i++)
        r->methods[i].registered = grpc_server_register_method(
            r->server, r->methods[i].path, NULL,
            r->methods[i].read_payload ? GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER
                                       : GRPC_SRM_PAYLOAD_NONE, 0);

    grpc_server_credentials *creds;
    if (cfg->tls_cert[0]) {
        char *cert = read_file(cfg->tls_cert, errbuf, errlen);
        char *key = cert ? read_file(cfg->tls_key, errbuf, errlen) : NULL;
        char *ca_pem = key && cfg->tls_client_ca[0]
                           ? read_file(cfg->tls_client_ca, errbuf, errlen) : NULL;
        if (!cert || !key || (cfg->tls_client_ca[0] && !ca_pem)) {
            free(cert);
            free(key);
            free(ca_pem);
            rc = -EINVAL;
            goto fail;
        }
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        creds = grpc_ssl_server_credentials_create_ex(
            ca_pem, &pair, 1,
            ca_pem ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                   : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE, NULL);
        free(cert);
        free(key);
        free(ca_pem);
        if (!creds) {
            snprintf(errbuf, errlen, "tls_cert/tls_key: gRPC refused the certificate or key");
            rc = -EINVAL;
            goto fail;
        }
    } else {
        creds = grpc_insecure_server_credentials_create();
    }
    int port = grpc_server_add_http2_port(r->server, cfg->listen, creds);
    grpc_server_credentials_release(creds);
    if (port == 0) {
        snprintf(errbuf, errlen, "listen: cannot bind '%s' (in use, bad address or no "
                 "permission)", cfg->listen);
        rc = -EADDRINUSE;
        goto fail;
    }
    grpc_server_start(r->server);
    for (int q = 0; q < r->n_cqs; q++) {
        for (int i = 0; i <= r->n_methods; i++) {
            listener *l = &r->listeners[q * (r->n_methods + 1) + i];
            l->tag.done = listener_done;
            l->srv = r;
            l->cq = r->cqs[q];
            l->m = i < r->n_methods ? &r->methods[i] : NULL;
            listener_arm(l);
        }
    }
    for (int i = 0; i < r->n_threads; i++) {
        cq_worker *w = &r->workers[i];
        w->cq = r->cqs[i % r->n_cqs];
        pthread_create(&w->th, NULL, cq_thread, w);
    }
    *ret_port = strncmp(cfg->listen, "unix:", 5) ? port : 0;
    *ret = r;
    return 0;
fail:
    grpc_server_destroy(r->server);
    for (int q = 0; q < r->n_cqs; q++) {
        grpc_completion_queue_shutdown(r->cqs[q]);
        while (grpc_completion_queue_next(r->cqs[q], gpr_inf_future(GPR_CLOCK_MONOTONIC),
                                          NULL).type != GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(r->cqs[q]);
    }
    free_tokens(r->tokens, r->n_tokens);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cond);
    free(r);
    grpc_shutdown();
    return rc;
}

void rpc_set_serving(rpc_server *r, int serving)
{
    pthread_mutex_lock(&r->mu);
    r->serving = serving;
    pthread_mutex_unlock(&r->mu);
    rpc_health_set(r, serving);
}

int rpc_is_serving(rpc_server *r)
{
    pthread_mutex_lock(&r->mu);
    int s = r->serving;
    pthread_mutex_unlock(&r->mu);
    return s;
}

void rpc_begin_drain(rpc_server *r)
{
    rpc_set_serving(r, 0);
    rpc_health_end_watches();
}

static int wait_until(rpc_server *r, int *flag, double wait_s)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    int64_t ns = until.tv_nsec + (int64_t)(wait_s * 1e9);
    until.tv_sec += ns / 1000000000;
    until.tv_nsec = ns % 1000000000;
    pthread_mutex_lock(&r->mu);
    int rc = 0;
    while (!*flag && rc == 0)
        rc = pthread_cond_timedwait(&r->cond, &r->mu, &until);
    int v = *flag;
    pthread_mutex_unlock(&r->mu);
    return v;
}

void rpc_shutdown(rpc_server *r, double wait_s)
{
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    r->shutting_down = 1;
    pthread_mutex_unlock(&r->mu);
    grpc_server_shutdown_and_notify(r->server, r->cqs[0], &r->shutdown_tag);
    /* The core also waits for idle client connections to go; once none of
     * our calls is left there is nothing to wait for, so stop waiting then
     * (polled: n_calls changes under mu with a broadcast on cond). */
    int64_t until = rpc_now_ns() + (int64_t)(wait_s * 1e9);
    int done = 0, left = 0;
    for (;;) {
        done = wait_until(r, &r->shutdown_done, 0.05);
        pthread_mutex_lock(&r->mu);
        left = r->n_calls;
        pthread_mutex_unlock(&r->mu);
        if (done || left == 0 || rpc_now_ns() >= until)
            break;
    }
    if (!done) {
        if (left > 0)
            log_warn("shutdown: %d call(s) still open after %.1fs: cancelling them", left,
                     wait_s);
        grpc_server_cancel_all_calls(r->server);
        wait_until(r, &r->shutdown_done, 3600);
    }
}

void rpc_destroy(rpc_server *r)
{
    if (!r)
        return;
    /* Calls may still hold references (an engine job finishing): wait for
     * them, but not forever: a call that never ends is a bug, and exiting
     * with it (gRPC left as it is) beats hanging the stop. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 30;
    pthread_mutex_lock(&r->mu);
    int rc = 0;
    while (r->n_calls > 0 && rc == 0)
        rc = pthread_cond_timedwait(&r->cond, &r->mu, &until);
    int left = r->n_calls;
    pthread_mutex_unlock(&r->mu);
    if (left > 0) {
        log_error("BUG: %d call(s) still referenced 30s after shutdown; exiting without "
                  "freeing the gRPC server", left);
        return;
    }
    grpc_server_destroy(r->server);
    for (int q = 0; q < r->n_cqs; q++)
        grpc_completion_queue_shutdown(r->cqs[q]);
    for (int i = 0; i < r->n_threads; i++)
        pthread_join(r->workers[i].th, NULL);
    for (int q = 0; q < r->n_cqs; q++)
        grpc_completion_queue_destroy(r->cqs[q]);
    free_tokens(r->tokens, r->n_tokens);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cond);
    free(r);
    grpc_shutdown();
}
