/*
 * bench_cache_rpc.c: cache-hit throughput and latency of lightmoed through
 * gRPC (docs/PERF.md, "Exact-answer cache").
 *
 *   bench_cache_rpc --target 127.0.0.1:50051 --clients 16 --seconds 10
 *                   [--mode loop|threads] [--prompt TEXT] [--method Complete|Generate]
 *                   [--max-tokens N]
 *
 * Every client has its own channel (its own HTTP/2 connection:
 * grpc.use_local_subchannel_pool) and sends the same greedy request in a
 * closed loop (one call outstanding). Two ways to drive them:
 *   loop (default): ONE thread and one completion queue for all clients,
 *     like redis-benchmark's single event loop with N connections: the
 *     load generator costs about one core whatever the client count, so
 *     on a small machine it leaves the server the same CPU at 1 and 64
 *     clients;
 *   threads: one thread and one pluck queue per client (the first version
 *     of this tool; on 2 cores its 16-64 threads compete with the server).
 * The first request fills the cache; after a warm-up second, calls are timed. The
 * request is encoded by hand (prompt = field 1, temperature = field 4 as
 * 0.0f, max_tokens = field 3) and the answer is checked for cached = true
 * (field 6) so that a miss cannot pass for a hit. Prints requests/s and the
 * p50/p90/p99/p99.9 latency of timed calls.
 */
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static const char *target = "127.0.0.1:50051";
static const char *prompt = "What is the capital of France?";
static const char *method = "Complete";
static const char *mode = "loop";
static int clients = 1, max_tokens = 16;
static double seconds = 5;
static uint8_t req_buf[4096];
static size_t req_len;
static _Atomic int stop_flag, timing;
static _Atomic long errors, not_cached;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CPU time of this process (all threads), user + system. */
static int64_t cpu_ns(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ((int64_t)ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000 +
           ((int64_t)ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000;
}

static size_t put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    do {
        p[n] = (uint8_t)(v & 0x7f);
        v >>= 7;
        if (v)
            p[n] |= 0x80;
        n++;
    } while (v);
    return n;
}

static void encode_request(void)
{
    size_t n = 0, pl = strlen(prompt);
    req_buf[n++] = 0x0a; /* field 1, length-delimited */
    n += put_varint(req_buf + n, pl);
    memcpy(req_buf + n, prompt, pl);
    n += pl;
    req_buf[n++] = 0x18; /* field 3 varint: max_tokens */
    n += put_varint(req_buf + n, (uint64_t)max_tokens);
    req_buf[n++] = 0x25; /* field 4 fixed32: temperature = 0 */
    memset(req_buf + n, 0, 4);
    n += 4;
    req_len = n;
}

/* 1 if a GenerateResponse has cached (field 6) = true. */
static int response_cached(const uint8_t *p, size_t n)
{
    size_t i = 0;
    int cached = 0;
    while (i < n) {
        uint64_t key = 0;
        int sh = 0;
        while (i < n) {
            key |= (uint64_t)(p[i] & 0x7f) << sh;
            sh += 7;
            if (!(p[i++] & 0x80))
                break;
        }
        uint64_t field = key >> 3, wt = key & 7, v = 0;
        if (wt == 0) {
            sh = 0;
            while (i < n) {
                v |= (uint64_t)(p[i] & 0x7f) << sh;
                sh += 7;
                if (!(p[i++] & 0x80))
                    break;
            }
            if (field == 6)
                cached = v != 0;
        } else if (wt == 2) {
            sh = 0;
            while (i < n) {
                v |= (uint64_t)(p[i] & 0x7f) << sh;
                sh += 7;
                if (!(p[i++] & 0x80))
                    break;
            }
            i += v;
        } else if (wt == 5) {
            i += 4;
        } else if (wt == 1) {
            i += 8;
        } else {
            return 0;
        }
    }
    return cached;
}

typedef struct client {
    pthread_t th;
    int64_t *lat;               /* ns per timed call */
    size_t n_lat, cap;
} client;

/* One call in flight: what its batch writes into. */
typedef struct pending {
    grpc_call *call;
    grpc_byte_buffer *send, *recv;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
    int64_t t0;
} pending;

/* Create the call and start its one batch (all six ops) with tag. */
static int call_start(pending *p, grpc_channel *ch, grpc_completion_queue *cq, const char *path,
                      void *tag)
{
    memset(p, 0, sizeof *p);
    p->t0 = now_ns();
    gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                   gpr_time_from_millis(10000, GPR_TIMESPAN));
    grpc_slice ms = grpc_slice_from_static_string(path);
    p->call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, ms, NULL, dl, NULL);
    grpc_slice body = grpc_slice_from_copied_buffer((const char *)req_buf, req_len);
    p->send = grpc_raw_byte_buffer_create(&body, 1);
    grpc_slice_unref(body);
    grpc_metadata_array_init(&p->init_md);
    grpc_metadata_array_init(&p->trail_md);
    p->status = GRPC_STATUS_UNKNOWN;
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = p->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &p->init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &p->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &p->trail_md;
    ops[5].data.recv_status_on_client.status = &p->status;
    ops[5].data.recv_status_on_client.status_details = &p->details;
    if (grpc_call_start_batch(p->call, ops, 6, tag, NULL) != GRPC_CALL_OK) {
        p->details = grpc_empty_slice();
        return -1;
    }
    return 0;
}

/* After the batch completed (ok = its success): 0 if the call succeeded
 * with cached = true, 1 if not cached, -1 on failure. Frees the call. */
static int call_finish(pending *p, int ok)
{
    int rc = -1;
    if (ok && p->status == GRPC_STATUS_OK && p->recv) {
        grpc_byte_buffer_reader rd;
        grpc_byte_buffer_reader_init(&rd, p->recv);
        grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
        rc = response_cached(GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all)) ? 0 : 1;
        grpc_slice_unref(all);
    } else if (p->status != GRPC_STATUS_OK) {
        char *d = grpc_slice_to_c_string(p->details);
        fprintf(stderr, "call failed: status %d: %s\n", (int)p->status, d);
        gpr_free(d);
    }
    grpc_slice_unref(p->details);
    if (p->recv)
        grpc_byte_buffer_destroy(p->recv);
    grpc_byte_buffer_destroy(p->send);
    grpc_metadata_array_destroy(&p->init_md);
    grpc_metadata_array_destroy(&p->trail_md);
    grpc_call_unref(p->call);
    return rc;
}

/* One call; returns 0 if it succeeded with cached = true. */
static int one_call(grpc_channel *ch, grpc_completion_queue *cq, const char *path)
{
    pending p;
    int started = call_start(&p, ch, cq, path, (void *)1) == 0;
    int ok = 0;
    if (started) {
        grpc_event ev = grpc_completion_queue_pluck(cq, (void *)1,
                                                    gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        ok = ev.type == GRPC_OP_COMPLETE && ev.success;
    }
    return call_finish(&p, ok);
}

static void record(client *cl, int rc, int64_t dt)
{
    if (rc < 0)
        atomic_fetch_add(&errors, 1);
    else if (rc > 0)
        atomic_fetch_add(&not_cached, 1);
    if (cl->n_lat == cl->cap) {
        cl->cap = cl->cap ? cl->cap * 2 : 4096;
        cl->lat = realloc(cl->lat, cl->cap * sizeof *cl->lat);
    }
    cl->lat[cl->n_lat++] = dt;
}

static grpc_channel *client_channel(void)
{
    grpc_arg arg = {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL,
                    .value.integer = 1};
    grpc_channel_args args = {1, &arg};
    grpc_channel_credentials *cr = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(target, cr, &args);
    grpc_channel_credentials_release(cr);
    return ch;
}

/* --mode loop: every client's call on one completion queue, driven by this
 * one thread; a completion records the call and starts that client's next.
 * Latencies go to cl[0]. */
static void *loop_main(void *p)
{
    client *cl = p;
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    grpc_channel **ch = calloc((size_t)clients, sizeof *ch);
    pending *pd = calloc((size_t)clients, sizeof *pd);
    char path[128];
    snprintf(path, sizeof path, "/lightmoe.v1.LightMoE/%s", method);
    int inflight = 0;
    for (int i = 0; i < clients; i++) {
        ch[i] = client_channel();
        if (call_start(&pd[i], ch[i], cq, path, (void *)(intptr_t)(i + 1)) == 0)
            inflight++;
        else
            record(cl, call_finish(&pd[i], 0), 0);
    }
    while (inflight > 0) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            break;
        int i = (int)(intptr_t)ev.tag - 1;
        int64_t dt = now_ns() - pd[i].t0;
        int rc = call_finish(&pd[i], ev.success);
        inflight--;
        if (atomic_load(&timing))
            record(cl, rc, dt);
        if (!atomic_load(&stop_flag)) {
            if (call_start(&pd[i], ch[i], cq, path, (void *)(intptr_t)(i + 1)) == 0)
                inflight++;
            else if (atomic_load(&timing))
                record(cl, call_finish(&pd[i], 0), 0);
            else
                call_finish(&pd[i], 0);
        }
    }
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
    for (int i = 0; i < clients; i++)
        grpc_channel_destroy(ch[i]);
    free(ch);
    free(pd);
    return NULL;
}

static void *client_main(void *p)
{
    client *cl = p;
    grpc_channel *ch = client_channel();
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    char path[128];
    snprintf(path, sizeof path, "/lightmoe.v1.LightMoE/%s", method);
    while (!atomic_load(&stop_flag)) {
        int64_t t0 = now_ns();
        int rc = one_call(ch, cq, path);
        int64_t dt = now_ns() - t0;
        if (atomic_load(&timing))
            record(cl, rc, dt);
    }
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
    grpc_channel_destroy(ch);
    return NULL;
}

static int cmp64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--target")) target = argv[i + 1];
        else if (!strcmp(argv[i], "--clients")) clients = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--prompt")) prompt = argv[i + 1];
        else if (!strcmp(argv[i], "--method")) method = argv[i + 1];
        else if (!strcmp(argv[i], "--mode")) mode = argv[i + 1];
        else if (!strcmp(argv[i], "--max-tokens")) max_tokens = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (clients < 1 || clients > 1024 || seconds <= 0 || strlen(prompt) > 3000) {
        fprintf(stderr, "bad --clients/--seconds/--prompt\n");
        return 2;
    }
    int loop = !strcmp(mode, "loop");
    if (!loop && strcmp(mode, "threads")) {
        fprintf(stderr, "--mode must be loop or threads\n");
        return 2;
    }
    encode_request();
    grpc_init();
    {
        /* Fill the cache once (the first call computes). */
        grpc_channel_credentials *cr = grpc_insecure_credentials_create();
        grpc_channel *ch = grpc_channel_create(target, cr, NULL);
        grpc_channel_credentials_release(cr);
        grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
        char path[128];
        snprintf(path, sizeof path, "/lightmoe.v1.LightMoE/%s", method);
        int first = one_call(ch, cq, path), second = one_call(ch, cq, path);
        grpc_completion_queue_shutdown(cq);
        while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
                   .type != GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(cq);
        grpc_channel_destroy(ch);
        if (first < 0 || second != 0) {
            fprintf(stderr, "priming failed: first call %d, second call %s\n", first,
                    second == 0 ? "cached" : second > 0 ? "NOT cached" : "failed");
            grpc_shutdown();
            return 1;
        }
    }
    int n_threads = loop ? 1 : clients;
    client *cl = calloc((size_t)n_threads, sizeof *cl);
    for (int i = 0; i < n_threads; i++)
        pthread_create(&cl[i].th, NULL, loop ? loop_main : client_main, &cl[i]);
    struct timespec warm = {1, 0};
    nanosleep(&warm, NULL);
    atomic_store(&timing, 1);
    int64_t t0 = now_ns(), cpu0 = cpu_ns();
    struct timespec run = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    nanosleep(&run, NULL);
    atomic_store(&timing, 0);
    int64_t t1 = now_ns(), cpu1 = cpu_ns();
    atomic_store(&stop_flag, 1);
    size_t total = 0;
    for (int i = 0; i < n_threads; i++) {
        pthread_join(cl[i].th, NULL);
        total += cl[i].n_lat;
    }
    int64_t *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < n_threads; i++) {
        memcpy(all + k, cl[i].lat, cl[i].n_lat * sizeof *all);
        k += cl[i].n_lat;
        free(cl[i].lat);
    }
    qsort(all, total, sizeof *all, cmp64);
    double el = (double)(t1 - t0) * 1e-9;
#define PCT(q) (total ? (double)all[(size_t)((double)(total - 1) * (q))] / 1e6 : 0)
    printf("clients %d  mode %s  method %s  calls %zu in %.2f s  = %.0f req/s  latency ms "
           "p50 %.3f p90 %.3f p99 %.3f p99.9 %.3f max %.3f  client CPU %.1f us/call  "
           "errors %ld not_cached %ld\n",
           clients, mode, method, total, el, (double)total / el, PCT(0.50), PCT(0.90), PCT(0.99),
           PCT(0.999), total ? (double)all[total - 1] / 1e6 : 0,
           total ? (double)(cpu1 - cpu0) / 1e3 / (double)total : 0, atomic_load(&errors),
           atomic_load(&not_cached));
    free(all);
    free(cl);
    grpc_shutdown();
    return atomic_load(&errors) || atomic_load(&not_cached) ? 1 : 0;
}
