/*
 * rpc_internal.h: the call machinery shared by rpc.c, rpc_api.c,
 * rpc_health.c and rpc_reflect.c. Not for use outside daemon/rpc*.c.
 *
 * Every completion-queue tag is an rpc_tag whose done() runs on a CQ thread.
 * An rpc_call wraps one grpc_call with:
 *   - a reference count: 1 for its handler, +1 per batch in flight, +1 for
 *     the engine job when one runs; freed (and the grpc_call unref'd) at 0;
 *   - an outgoing queue: messages are sent one batch at a time (the core
 *     allows one SEND_MESSAGE in flight; waiting for it is the flow
 *     control), first the queued ones, then what `produce` makes; the
 *     status goes with the last message (has_more says when) or alone;
 *   - RECV_CLOSE_ON_SERVER started when the handler returns: in the same
 *     batch as the answer when the handler has answered already (a cache
 *     hit, Tokenize, Health.Check: one completion per call instead of two),
 *     else alone; its completion with cancelled = 1 (client cancel,
 *     deadline, broken connection) calls the handler's on_cancel, which
 *     stops the work. While the handler runs, sends are only queued.
 * All fields after `mu` are guarded by it.
 */
#ifndef LIGHTMOE_DAEMON_RPC_INTERNAL_H
#define LIGHTMOE_DAEMON_RPC_INTERNAL_H

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <protobuf-c/protobuf-c.h>
#include <pthread.h>
#include <stdint.h>

#include "daemon/rpc.h"
#include "daemon/status.h"

typedef struct rpc_tag {
    void (*done)(struct rpc_tag *t, int ok);
} rpc_tag;

typedef struct rpc_call rpc_call;

typedef struct rpc_method {
    const char *path;               /* "/pkg.Service/Method" */
    const char *name;               /* metric label: "Generate", "Health.Check", ... */
    int read_payload;               /* 1: request message arrives with the call */
    int needs_auth;
    void (*handler)(rpc_call *c);
    void *registered;               /* from grpc_server_register_method */
} rpc_method;

typedef struct rpc_out {
    grpc_byte_buffer *buf;
    struct rpc_out *next;
} rpc_out;

struct rpc_call {
    rpc_server *srv;
    grpc_call *call;
    const rpc_method *m;
    char method_path[256];
    grpc_metadata_array md;         /* request metadata */
    gpr_timespec deadline;
    int64_t deadline_ns;            /* CLOCK_MONOTONIC, 0 = none */
    int64_t start_ns;
    grpc_byte_buffer *payload;      /* request message (read_payload methods) */
    char request_id[80];
    rpc_tag close_tag, send_tag, recv_tag;
    rpc_tag both_tag;               /* a send batch that carries RECV_CLOSE_ON_SERVER too */
    int close_cancelled;            /* written by the core */
    grpc_byte_buffer *recv_buf;     /* written by the core */
    /* Handler hooks. */
    void (*on_cancel)(rpc_call *c);                 /* client went away */
    grpc_byte_buffer *(*produce)(rpc_call *c);      /* next message, under mu */
    int (*has_more)(rpc_call *c);                   /* produce has more, under mu */
    void (*on_recv)(rpc_call *c, grpc_byte_buffer *msg); /* NULL msg: half-close */
    void (*cleanup)(rpc_call *c);                   /* at the last unref */
    void *state;

    pthread_mutex_t mu;
    int refs;
    int sending, sent_md, status_queued, status_sent, closed, broken;
    int in_handler;                 /* the handler runs: queue, do not send yet */
    int close_pending;              /* RECV_CLOSE_ON_SERVER not started yet */
    rpc_out *out_head, *out_tail;
    grpc_byte_buffer *inflight;
    grpc_status_code code;
    char *details;
    grpc_slice details_slice;
    int status_in_flight;
    rpc_call *prev, *next;          /* server's list (guarded by the server) */
};

/* rpc.c */
void rpc_call_ref(rpc_call *c);
void rpc_call_unref(rpc_call *c);
/* Queue a message (serialized now). Safe from any thread. */
void rpc_send(rpc_call *c, const ProtobufCMessage *msg);
/* Queue the status (the first one wins) and send what is queued. */
void rpc_finish(rpc_call *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Send again what `produce` has (after new data arrived). */
void rpc_kick(rpc_call *c);
/* Start one RECV_MESSAGE; on_recv gets the result. */
void rpc_recv(rpc_call *c);
/* Decode the request payload with desc; NULL (and INVALID_ARGUMENT sent)
 * when it does not parse. */
ProtobufCMessage *rpc_unpack(rpc_call *c, const ProtobufCMessageDescriptor *desc);
grpc_byte_buffer *rpc_pack(const ProtobufCMessage *msg);
int rpc_is_serving(rpc_server *r);
serve *rpc_serve(rpc_server *r);
int64_t rpc_now_ns(void);
/* Metadata value of key (NUL-terminated copy into buf) or NULL. */
const char *rpc_metadata(rpc_call *c, const char *key, char *buf, size_t n);

/* rpc_api.c */
extern const rpc_method rpc_api_methods[];
extern const int rpc_api_n_methods;

/* rpc_health.c */
extern const rpc_method rpc_health_methods[];
extern const int rpc_health_n_methods;
void rpc_health_set(rpc_server *r, int serving);
void rpc_health_end_watches(void);

/* rpc_reflect.c */
extern const rpc_method rpc_reflect_methods[];
extern const int rpc_reflect_n_methods;

#endif
