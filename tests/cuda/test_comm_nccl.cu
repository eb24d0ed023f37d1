/*
 * test_comm_nccl.cu: the NCCL communicator (engine/comm_nccl.h) against the
 * arithmetic it must do, on every GPU of the machine (tp = 1 on one GPU):
 * one thread per rank, all-reduce of distinct per-rank data (awkward
 * counts), all-gather, and bad arguments. Exits 77 without a GPU.
 */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/comm_nccl.h"

static int g_fail = 0;
#define CHECK(c, ...) \
    do { \
        if (!(c)) { \
            printf("FAIL: " __VA_ARGS__); \
            printf("\n"); \
            g_fail = 1; \
        } \
    } while (0)

struct rank_job {
    comm *c;
    int device;
    size_t count;
    int ok;
};

static void *rank_main(void *p)
{
    rank_job *j = (rank_job *)p;
    const int r = j->c->rank, n = j->c->size;
    const size_t cnt = j->count;
    cudaSetDevice(j->device);
    float *h = (float *)malloc(cnt * n * sizeof(float)), *d = NULL, *dg = NULL;
    j->ok = h != NULL && cudaMalloc(&d, cnt * 4) == cudaSuccess &&
            cudaMalloc(&dg, cnt * n * 4) == cudaSuccess;
    if (!j->ok)
        return NULL;
    for (size_t i = 0; i < cnt; i++)
        h[i] = (float)((r + 1) * 1000 + (i % 977)) * 0.25f;
    cudaMemcpy(d, h, cnt * 4, cudaMemcpyHostToDevice);
    lm_err e = {0, ""};
    if (comm_all_gather(j->c, d, dg, cnt, &e)) {
        printf("rank %d all-gather: %s\n", r, e.msg);
        j->ok = 0;
    }
    if (comm_all_reduce_sum(j->c, d, cnt, &e)) {
        printf("rank %d all-reduce: %s\n", r, e.msg);
        j->ok = 0;
    }
    cudaMemcpy(h, d, cnt * 4, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < cnt && j->ok; i++) {
        float want = 0.f; /* small integers times 0.25: exact in any order */
        for (int q = 0; q < n; q++)
            want += (float)((q + 1) * 1000 + (i % 977)) * 0.25f;
        if (h[i] != want) {
            printf("rank %d all-reduce [%zu] = %g, want %g\n", r, i, h[i], want);
            j->ok = 0;
        }
    }
    cudaMemcpy(h, dg, cnt * n * 4, cudaMemcpyDeviceToHost);
    for (int q = 0; q < n && j->ok; q++)
        for (size_t i = 0; i < cnt; i++)
            if (h[q * cnt + i] != (float)((q + 1) * 1000 + (i % 977)) * 0.25f) {
                printf("rank %d all-gather [%d][%zu] wrong\n", r, q, i);
                j->ok = 0;
                break;
            }
    cudaFree(d);
    cudaFree(dg);
    free(h);
    return NULL;
}

int main(void)
{
    int nd = 0;
    cudaError_t e = cudaGetDeviceCount(&nd);
    if (e != cudaSuccess || nd == 0) {
        printf("SKIP: no CUDA device (%s); NCCL tests run on the GPU machine\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return 77;
    }
    lm_err err = {0, ""};
    comm *bad[1];
    CHECK(comm_nccl_create(nd + 1, NULL, bad, &err) == -EINVAL, "more ranks than devices accepted");
    printf("bad rank count: %s\n", err.msg);
    for (int n = 1; n <= nd && n <= 8; n *= 2) {
        comm *cs[8] = {0};
        err.msg[0] = 0;
        int rc = comm_nccl_create(n, NULL, cs, &err);
        if (rc == -ENODEV && strstr(err.msg, "without NCCL")) { /* comm_nccl.h */
            printf("SKIP: %s\n", err.msg);
            return 77;
        }
        CHECK(rc == 0, "comm_nccl_create(%d): %s", n, err.msg);
        if (rc)
            break;
        for (size_t count : {(size_t)1, (size_t)1000, (size_t)262147}) {
            pthread_t th[8];
            rank_job jobs[8];
            for (int r = 0; r < n; r++) {
                jobs[r] = {cs[r], r, count, 0};
                pthread_create(&th[r], NULL, rank_main, &jobs[r]);
            }
            int ok = 1;
            for (int r = 0; r < n; r++) {
                pthread_join(th[r], NULL);
                ok &= jobs[r].ok;
            }
            printf("%-4s nccl tp=%d all-gather + all-reduce of %zu floats\n", ok ? "ok" : "FAIL", n,
                   count);
            if (!ok)
                g_fail = 1;
        }
        for (int r = 0; r < n; r++)
            comm_destroy(cs[r]);
    }
    printf("%s\n", g_fail ? "FAILED" : "all passed");
    return g_fail;
}
