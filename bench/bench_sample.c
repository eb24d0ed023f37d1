/*
 * bench_sample.c: the host sampler (engine/sample.h), one pick at a time.
 *
 *   bench_sample [--vocab N] [--reps N]
 *
 * One row of qwen's 151936 logits (a broad body in [-3, 3) and one token in
 * 1024 raised by 14, roughly a language model's), copied fresh before each
 * pick; for each sampling setting the best and the median time of one
 * sample_pick over --reps picks (each with its own draw). This is the cost
 * the scheduler pays per logits row on the host (CPU backend, or the CUDA
 * backend without LIGHTMOE_CUDA_SAMPLE=1).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/sample.h"

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int32_t V = 151936;
    int reps = 31;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--vocab") && i + 1 < argc)
            V = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_sample [--vocab N] [--reps N]\n");
            return 2;
        }
    }
    if (V < 1 || reps < 1) {
        fprintf(stderr, "bench_sample: --vocab and --reps must be positive\n");
        return 2;
    }
    float *src = malloc(sizeof(float) * (size_t)V), *row = malloc(sizeof(float) * (size_t)V);
    void *scratch = malloc(sample_scratch_bytes(V));
    double *t = malloc(sizeof(double) * (size_t)reps);
    int32_t hist[256];
    if (!src || !row || !scratch || !t) {
        fprintf(stderr, "bench_sample: out of memory\n");
        return 1;
    }
    uint32_t x = 12345;
    for (int32_t i = 0; i < V; i++) {
        x = x * 1664525u + 1013904223u;
        const float u = (float)(x >> 8) / 16777216.0f;
        row[i] = src[i] = 6.0f * u - 3.0f + ((x & 1023) == 7 ? 14.0f : 0.0f);
    }
    for (int i = 0; i < 256; i++)
        hist[i] = (int32_t)(((int64_t)i * 7919) % V);
    struct setting {
        const char *name;
        float t, top_p, min_p, rep;
        int32_t top_k, logprobs;
    } set[] = {
        {"greedy", 0.0f, 1.0f, 0.0f, 1.0f, 0, 0},
        {"T 1, no filter", 1.0f, 1.0f, 0.0f, 1.0f, 0, 0},
        {"T 0.7, top_p 0.9", 0.7f, 0.9f, 0.0f, 1.0f, 0, 0},
        {"T 0.7, top_k 50, top_p 0.9", 0.7f, 0.9f, 0.0f, 1.0f, 50, 0},
        {"T 0.7, top_p 0.9, min_p 0.05, rep 1.1 (256 ids), 5 logprobs", 0.7f, 0.9f, 0.05f, 1.1f,
         0, 5},
    };
    printf("host sampler, vocabulary %d, %d picks each (us a pick)\n", V, reps);
    sample_rng rng;
    sample_rng_seed(&rng, 1);
    for (size_t k = 0; k < sizeof set / sizeof set[0]; k++) {
        sample_params p;
        sample_params_default(&p);
        p.temperature = set[k].t;
        p.top_p = set[k].top_p;
        p.min_p = set[k].min_p;
        p.repetition_penalty = set[k].rep;
        p.top_k = set[k].top_k;
        p.logprobs = set[k].logprobs;
        const int32_t np = set[k].rep != 1.0f ? 200 : 0, no = set[k].rep != 1.0f ? 56 : 0;
        for (int r = 0; r < reps; r++) {
            memcpy(row, src, sizeof(float) * (size_t)V);
            sample_result res;
            lm_err err = {0};
            const double t0 = now_s();
            if (sample_pick(row, V, &p, &rng, hist, np, hist + np, no, scratch, &res, &err)) {
                fprintf(stderr, "bench_sample: %s\n", err.msg);
                return 1;
            }
            t[r] = now_s() - t0;
        }
        qsort(t, (size_t)reps, sizeof *t, cmp_d);
        printf("%-62s best %8.1f  median %8.1f\n", set[k].name, t[0] * 1e6, t[reps / 2] * 1e6);
    }
    free(src);
    free(row);
    free(scratch);
    free(t);
    return 0;
}
