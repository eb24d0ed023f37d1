/*
 * bench_daemon.c: short unary requests through the whole stack (gRPC,
 * lightmoed, scheduler, CPU backend): requests/s and latency percentiles
 * with N closed-loop clients (docs/PERF.md, "Daemon").
 *
 *   bench_daemon --server 127.0.0.1:50051 --clients 16 --seconds 20
 *                [--max-tokens 8] [--prompt TEXT] [--stream]
 *
 * Each client is a thread with its own channel (lightmoe_client, one
 * HTTP/2 connection each) sending greedy requests back to back; each
 * client's prompt differs (its index is in it) so that the answer cache,
 * if on, cannot serve them; the first second is warm-up and not counted.
 * Prints one line: clients, requests, req/s, tokens/s, latency p50/p90/p99.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/client.h"

static lmc_options opt;
static const char *prompt = "Hello, world! The mixture of experts";
static double seconds = 10, warmup = 1;
static _Atomic int stop_flag, timing;
static _Atomic long errors;

typedef struct client {
    pthread_t th;
    int idx;
    double *lat;
    size_t n, cap;
    long tokens;
} client;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *run(void *arg)
{
    client *c = arg;
    lmc *conn;
    char err[256], p[512];
    if (lmc_connect(&opt, &conn, err, sizeof err)) {
        fprintf(stderr, "connect: %s\n", err);
        atomic_fetch_add(&errors, 1);
        return NULL;
    }
    snprintf(p, sizeof p, "%s (client %d)", prompt, c->idx);
    while (!atomic_load(&stop_flag)) {
        int timed = atomic_load(&timing);
        double t0 = now_s();
        lmc_result r;
        if (lmc_generate(conn, &opt, p, NULL, NULL, 0, NULL, NULL, &r)) {
            if (atomic_fetch_add(&errors, 1) < 5)
                fprintf(stderr, "call failed: %d %s\n", r.status, r.message);
            continue;
        }
        double dt = now_s() - t0;
        if (timed && atomic_load(&timing) && !atomic_load(&stop_flag)) {
            if (c->n == c->cap) {
                c->cap = c->cap ? c->cap * 2 : 1024;
                c->lat = realloc(c->lat, c->cap * sizeof *c->lat);
            }
            c->lat[c->n++] = dt;
            c->tokens += r.completion_tokens;
        }
    }
    lmc_close(conn);
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    lmc_options_default(&opt);
    opt.stream = 0;
    opt.max_tokens = 8;
    opt.temperature = 0;
    int clients = 1;
    for (int i = 1; i < argc; i++) {
        int r = lmc_parse_option(&opt, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r)
            continue;
        if (!strcmp(argv[i], "--clients") && i + 1 < argc)
            clients = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--prompt") && i + 1 < argc)
            prompt = argv[++i];
        else if (!strcmp(argv[i], "--stream"))
            opt.stream = 1;
        else {
            fprintf(stderr, "usage: bench_daemon [--clients N] [--seconds S] [--prompt T] "
                    "[--stream]\n%s", lmc_options_help());
            return 2;
        }
    }
    if (clients < 1 || clients > 1024 || seconds <= 0)
        return 2;
    client *cl = calloc((size_t)clients, sizeof *cl);
    for (int i = 0; i < clients; i++) {
        cl[i].idx = i;
        pthread_create(&cl[i].th, NULL, run, &cl[i]);
    }
    struct timespec w = {(time_t)warmup, (long)((warmup - (time_t)warmup) * 1e9)};
    nanosleep(&w, NULL);
    double t0 = now_s();
    atomic_store(&timing, 1);
    struct timespec d = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&d, NULL);
    atomic_store(&timing, 0);
    double elapsed = now_s() - t0;
    atomic_store(&stop_flag, 1);
    size_t total = 0;
    long tokens = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(cl[i].th, NULL);
        total += cl[i].n;
        tokens += cl[i].tokens;
    }
    double *all = malloc((total + 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < clients; i++) {
        memcpy(all + k, cl[i].lat, cl[i].n * sizeof *all);
        k += cl[i].n;
        free(cl[i].lat);
    }
    qsort(all, total, sizeof *all, cmp);
#define PCT(p) (total ? all[(size_t)((p) * (double)(total - 1))] * 1e3 : 0)
    printf("clients %3d  requests %6zu  %8.1f req/s  %8.1f tok/s  latency ms p50 %8.1f  p90 "
           "%8.1f  p99 %8.1f  errors %ld\n", clients, total, total / elapsed, tokens / elapsed,
           PCT(0.5), PCT(0.9), PCT(0.99), atomic_load(&errors));
    free(all);
    free(cl);
    return atomic_load(&errors) ? 1 : 0;
}
