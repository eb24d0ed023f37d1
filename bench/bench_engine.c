/*
 * bench_engine.c: CPU backend speed next to the machine's memory bandwidth.
 *
 *   bench_engine --model DIR [--threads N] [--steps N] [--prefill T] [--bw-mb MB]
 *
 * Reports: measured read bandwidth (all threads summing a buffer much larger
 * than the caches), the weight bytes a decode token must read (attention,
 * router, top-k experts, shared expert, lm_head; INT4 part separately), the
 * implied floor (bytes / bandwidth), then prefill tokens/s for one T-token
 * piece, decode tokens/s at batch 1 and batch 8 (8 sequences, one token
 * each per step). Timings are wall-clock medians of the steps. Also prints
 * the kernel set in use and the load average before and after, since the
 * build machine is shared. Process CPU time includes the pool threads'
 * short spins between jobs (ops_cpu.c), so it is not pure kernel time.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/backends.h"
#include "engine/model.h"
#include "engine/ops_cpu.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct bw_arg {
    const uint64_t *p;
    size_t n;
    uint64_t sum;
} bw_arg;

static void *bw_read(void *v)
{
    bw_arg *a = v;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= a->n; i += 4) {
        s0 += a->p[i];
        s1 += a->p[i + 1];
        s2 += a->p[i + 2];
        s3 += a->p[i + 3];
    }
    a->sum = s0 + s1 + s2 + s3;
    return NULL;
}

/* Best of 5 passes of `threads` threads reading disjoint parts of `mb` MB. */
static double bandwidth(int threads, size_t mb)
{
    size_t n = (mb << 20) / 8;
    uint64_t *buf = malloc(n * 8);
    if (!buf)
        return 0;
    for (size_t i = 0; i < n; i++)
        buf[i] = i;
    double best = 0;
    for (int pass = 0; pass < 5; pass++) {
        pthread_t th[64];
        bw_arg a[64];
        double t0 = now();
        for (int t = 0; t < threads; t++) {
            a[t] = (bw_arg){buf + n / (size_t)threads * (size_t)t, n / (size_t)threads, 0};
            pthread_create(&th[t], NULL, bw_read, &a[t]);
        }
        for (int t = 0; t < threads; t++)
            pthread_join(th[t], NULL);
        double gbs = (double)(n * 8) / (now() - t0) / 1e9;
        best = gbs > best ? gbs : best;
        if (a[0].sum == 42)
            printf(" ");
    }
    free(buf);
    return best;
}

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static size_t int4_active_bytes(const model *m)
{
    size_t b = 0;
    const model_config *c = &m->cfg;
    for (int32_t i = 0; i < c->n_layers; i++) {
        const layer_weights *lw = &m->layers[i];
        const linear *ls[4] = {&lw->q, &lw->k, &lw->v, &lw->o};
        for (int j = 0; j < 4; j++)
            b += ls[j]->kind == LINEAR_INT4 ? linear_bytes(ls[j]) : 0;
        const mlp_weights *e = lw->is_moe ? &lw->experts[0] : &lw->mlp;
        size_t eb = (e->gate.kind == LINEAR_INT4) *
                    (linear_bytes(&e->gate) + linear_bytes(&e->up) + linear_bytes(&e->down));
        b += lw->is_moe ? (size_t)c->top_k * eb : eb;
        if (lw->has_shared && lw->shared.gate.kind == LINEAR_INT4)
            b += linear_bytes(&lw->shared.gate) + linear_bytes(&lw->shared.up) +
                 linear_bytes(&lw->shared.down);
    }
    return b;
}

int main(int argc, char **argv)
{
    const char *dir = NULL;
    int threads = (int)sysconf(_SC_NPROCESSORS_ONLN), steps = 16, prefill = 512;
    size_t bw_mb = 1024;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model"))
            dir = argv[i + 1];
        else if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--steps"))
            steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prefill"))
            prefill = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--bw-mb"))
            bw_mb = (size_t)atol(argv[i + 1]);
    }
    if (!dir || threads < 1 || threads > 64 || steps < 1 || prefill < 1) {
        fprintf(stderr, "usage: bench_engine --model DIR [--threads N] [--steps N] "
                        "[--prefill T] [--bw-mb MB]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress lines appear as they are measured */
    double la[3] = {0};
    if (getloadavg(la, 3) > 0)
        printf("load average at start: %.2f %.2f %.2f\n", la[0], la[1], la[2]);
    printf("CPU kernels: %s (LIGHTMOE_CPU_ISA=portable|avx2|avx512 caps them)\n",
           cpu_isa_name(cpu_isa_best()));
    double bw = bandwidth(threads, bw_mb);
    printf("memory read bandwidth (%d threads, %zu MB): %.2f GB/s\n", threads, bw_mb, bw);
    lm_err err = {0};
    model *m = NULL;
    backend *be = NULL;
    double t0 = now();
    if (model_load(dir, NULL, &m, &err)) {
        fprintf(stderr, "bench_engine: %s\n", err.msg);
        return 1;
    }
    printf("load: %.1f s\n", now() - t0);
    size_t act = model_active_bytes(m), act4 = int4_active_bytes(m);
    printf("active weight bytes per decode token: %.1f MB (INT4 part %.1f MB)\n", act / 1e6,
           act4 / 1e6);
    printf("floor at %.2f GB/s: all active bytes %.1f ms/token (%.2f tok/s); INT4 bytes only "
           "%.1f ms/token (%.2f tok/s)\n",
           bw, act / bw / 1e6, bw * 1e9 / act, act4 / bw / 1e6, bw * 1e9 / act4);
    backend_options bo;
    backend_options_default(&bo);
    bo.threads = threads;
    bo.max_tokens = prefill;
    int32_t bs = 16, per = (prefill + steps + bs) / bs + 1, nseq = 9;
    if (backend_open(m, &bo, &be, &err) || backend_kv_init(be, bs, per * nseq, &err)) {
        fprintf(stderr, "bench_engine: %s\n", err.msg);
        return 1;
    }
    int32_t V = m->cfg.vocab;
    float *logits = malloc(sizeof(float) * 8 * (size_t)V);
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t)prefill), *table = malloc(sizeof(int32_t) * (size_t)(per * nseq));
    for (int32_t i = 0; i < per * nseq; i++)
        table[i] = i;
    for (int i = 0; i < prefill; i++)
        tokens[i] = (int32_t)((i * 7919) % (V - 3));
    /* prefill: one piece of `prefill` tokens, logits of the last row */
    int32_t ss[9] = {0, prefill}, sp[8] = {0}, row = prefill - 1;
    backend_batch b = {1, prefill, tokens, ss, sp, table, per, 1, &row, logits, NULL, NULL, 0, NULL};
    t0 = now();
    double c0 = cpu_now();
    if (backend_forward(be, &b, &err)) {
        fprintf(stderr, "bench_engine: %s\n", err.msg);
        return 1;
    }
    double tp = now() - t0;
    printf("prefill %d tokens: %.2f s = %.1f tok/s (process CPU %.2f s over %d threads)\n",
           prefill, tp, prefill / tp, cpu_now() - c0, threads);
    /* decode batch 1 continuing that sequence */
    double *ts = malloc(sizeof(double) * (size_t)steps);
    int32_t tok = 1, r0 = 0;
    double c1 = cpu_now(), w1 = now();
    for (int s = 0; s < steps; s++) {
        int32_t ss1[2] = {0, 1}, sp1[1] = {prefill + s};
        backend_batch d = {1, 1, &tok, ss1, sp1, table, per, 1, &r0, logits, NULL, NULL, 0, NULL};
        t0 = now();
        if (backend_forward(be, &d, &err)) {
            fprintf(stderr, "bench_engine: %s\n", err.msg);
            return 1;
        }
        ts[s] = now() - t0;
        tok = (tok * 31 + 7) % (V - 3);
    }
    double cpu1 = (cpu_now() - c1) / steps, wall1 = (now() - w1) / steps;
    qsort(ts, (size_t)steps, sizeof *ts, cmp_d);
    double d1 = ts[steps / 2];
    printf("decode batch 1: process CPU %.1f ms/token over %d threads (wall mean %.1f ms: "
           "CPU share %.0f%%)\n", cpu1 * 1e3, threads, wall1 * 1e3, 100 * cpu1 / (wall1 * threads));
    printf("decode batch 1: median %.1f ms/token = %.2f tok/s (floor ratio %.2fx of all active "
           "bytes)\n", d1 * 1e3, 1 / d1, d1 / (act / bw / 1e9));
    /* decode batch 8: sequences 1..8 with a 16-token prefix each, then steps */
    int32_t toks8[8 * 16], ss8[9], sp8[8], rows8[8];
    for (int i = 0; i < 8 * 16; i++)
        toks8[i] = (i * 131) % (V - 3);
    for (int i = 0; i <= 8; i++)
        ss8[i] = i * 16;
    for (int i = 0; i < 8; i++) {
        sp8[i] = 0;
        rows8[i] = ss8[i + 1] - 1;
    }
    b = (backend_batch){8, 128, toks8, ss8, sp8, table + per, per, 8, rows8, logits, NULL, NULL, 0, NULL};
    if (backend_forward(be, &b, &err)) {
        fprintf(stderr, "bench_engine: %s\n", err.msg);
        return 1;
    }
    for (int s = 0; s < steps; s++) {
        int32_t t8[8], s8[9], p8[8], r8[8];
        for (int i = 0; i < 8; i++) {
            t8[i] = (s * 17 + i * 5) % (V - 3);
            s8[i] = i;
            p8[i] = 16 + s;
            r8[i] = i;
        }
        s8[8] = 8;
        backend_batch d = {8, 8, t8, s8, p8, table + per, per, 8, r8, logits, NULL, NULL, 0, NULL};
        t0 = now();
        if (backend_forward(be, &d, &err)) {
            fprintf(stderr, "bench_engine: %s\n", err.msg);
            return 1;
        }
        ts[s] = now() - t0;
    }
    qsort(ts, (size_t)steps, sizeof *ts, cmp_d);
    printf("decode batch 8: median %.1f ms/step = %.2f tok/s\n", ts[steps / 2] * 1e3,
           8 / ts[steps / 2]);
    if (getloadavg(la, 3) > 0)
        printf("load average at end: %.2f %.2f %.2f\n", la[0], la[1], la[2]);
    free(ts);
    free(logits);
    free(tokens);
    free(table);
    backend_destroy(be);
    model_free(m);
    return 0;
}
