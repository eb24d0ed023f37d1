/*
 * bench_kernels.c: op_linear throughput of each CPU kernel set, one thread.
 *
 *   bench_kernels [--n N] [--k K] [--group G] [--mb MB] [--m M] [--reps R] [--isa NAME]
 *
 * Builds enough random INT4 matrices (N x K, group G; default the
 * Qwen1.5-MoE expert shape 1408 x 2048, group 128) and fp16 matrices of the
 * same shape to hold MB megabytes of weights (default 256: far more than the
 * caches, so weights stream from memory as in a decode step), then runs
 * op_linear over all of them with M token rows (default 1) on a 1-thread
 * pool, for every kernel set this CPU has (portable, avx2, avx512) or only
 * the one named by --isa.
 * Reports, per set, GB/s of weight bytes (INT4: packed values + scales +
 * zeros, int4_matrix_bytes; fp16: 2 bytes a weight) per core: bytes over
 * the thread's CPU time, best of R passes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/half.h"
#include "engine/ops_cpu.h"

static double thread_cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rs = 0x9E3779B97F4A7C15ull;
static uint32_t urand32(void)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (uint32_t)(rs >> 32);
}

/* Best-of-reps GB/s of op_linear over mats[0..n_mats). */
static double run(cpu_pool *p, const linear *mats, int n_mats, const float *x, int32_t m,
                  float *y, float *scr, size_t bytes, int reps)
{
    double best = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = thread_cpu();
        for (int i = 0; i < n_mats; i++)
            op_linear(p, &mats[i], x, mats[i].k, m, y, mats[i].n, scr);
        double gbs = (double)bytes / (thread_cpu() - t0) / 1e9;
        best = gbs > best ? gbs : best;
    }
    return best;
}

int main(int argc, char **argv)
{
    int32_t n = 1408, k = 2048, g = 128, m = 1;
    int mb = 256, reps = 3;
    const char *only = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--n")) n = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--k")) k = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--group")) g = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--mb")) mb = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--m")) m = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--isa")) only = argv[i + 1];
    }
    if (n < 1 || k < 32 || k % 32 || g < 32 || g % 32 || k % g || m < 1 || mb < 1 || reps < 1) {
        fprintf(stderr, "usage: bench_kernels [--n N] [--k K (multiple of 32)] [--group G] "
                        "[--mb MB] [--m M] [--reps R] [--isa portable|avx2|avx512]\n");
        return 2;
    }
    size_t qb = int4_matrix_bytes(n, k, g), hb = (size_t)n * (size_t)k * 2;
    int nq = (int)(((size_t)mb << 20) / qb) + 1, nh = (int)(((size_t)mb << 20) / hb) + 1;
    linear *q = calloc((size_t)nq, sizeof *q), *h = calloc((size_t)nh, sizeof *h);
    float *x = malloc(sizeof(float) * (size_t)m * (size_t)k);
    float *y = malloc(sizeof(float) * (size_t)m * (size_t)n);
    float *scr = malloc(sizeof(float) * (size_t)m * (size_t)k);
    lm_err err = {0};
    cpu_pool *p = NULL;
    if (!q || !h || !x || !y || !scr || cpu_pool_create(1, &p, &err) ||
        cpu_pool_reserve(p, 4 * (size_t)k, &err)) {
        fprintf(stderr, "bench_kernels: out of memory\n");
        return 1;
    }
    for (int32_t i = 0; i < m * k; i++)
        x[i] = (float)(urand32() % 2001) / 1000.f - 1.f;
    size_t ng = (size_t)n * (size_t)(k / g);
    for (int i = 0; i < nq; i++) {
        uint8_t *qs = malloc(int4_qs_bytes(n, k)), *z = malloc(ng);
        uint16_t *s = malloc(2 * ng);
        if (!qs || !z || !s)
            return 1;
        for (size_t j = 0; j < int4_qs_bytes(n, k); j++)
            qs[j] = (uint8_t)urand32();
        for (size_t j = 0; j < ng; j++) {
            z[j] = 8;
            s[j] = float_to_fp16(0.001f * (float)(1 + urand32() % 50));
        }
        q[i] = (linear){.kind = LINEAR_INT4, .n = n, .k = k};
        q[i].q = (int4_matrix){.n = n, .k = k, .group = g, .qs = qs, .scales = s, .zeros = z};
    }
    for (int i = 0; i < nh; i++) {
        uint16_t *w = malloc(hb);
        if (!w)
            return 1;
        for (size_t j = 0; j < (size_t)n * (size_t)k; j++)
            w[j] = float_to_fp16((float)(urand32() % 2001) / 1e5f - 0.01f);
        h[i] = (linear){.kind = LINEAR_DENSE, .n = n, .k = k, .dtype = ST_F16, .w = w};
    }
    printf("op_linear, 1 thread, %d x %d, m = %d, %.0f MB INT4 (group %d) / %.0f MB fp16 "
           "weights per pass, best of %d, GB/s of weight bytes per core (thread CPU time)\n",
           n, k, m, (double)qb * nq / 1e6, g, (double)hb * nh / 1e6, reps);
    for (int isa = CPU_ISA_PORTABLE; isa <= (int)cpu_isa_best(); isa++) {
        if (only && strcmp(only, cpu_isa_name((cpu_isa)isa)))
            continue;
        cpu_pool_set_isa(p, (cpu_isa)isa);
        double gq = run(p, q, nq, x, m, y, scr, qb * (size_t)nq, reps);
        double gh = run(p, h, nh, x, m, y, scr, hb * (size_t)nh, reps);
        printf("%-8s  int4 %6.2f GB/s  (%.2f Gweights/s)   fp16 %6.2f GB/s\n",
               cpu_isa_name((cpu_isa)isa), gq, gq * (double)n * k / (double)qb, gh);
    }
    for (int i = 0; i < nq; i++) {
        free((void *)q[i].q.qs);
        free((void *)q[i].q.scales);
        free((void *)q[i].q.zeros);
    }
    for (int i = 0; i < nh; i++)
        free((void *)h[i].w);
    free(q);
    free(h);
    free(x);
    free(y);
    free(scr);
    cpu_pool_destroy(p);
    return 0;
}
