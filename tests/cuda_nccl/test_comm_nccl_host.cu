/*
 * test_comm_nccl_host.cu: the NCCL communicator (engine/comm_nccl.h) against the
 * host communicator (engine/comm_host.c) on host copies of the same data.
 *
 * For every group size n = 1 .. visible GPUs, one thread per rank:
 *  - bad arguments first (count 0, a NULL buffer on one rank, a host
 *    buffer, counts that differ between ranks, a NULL gather buffer): every
 *    rank must get -EINVAL with a message that says what, and nobody hangs;
 *  - then all_reduce_sum and all_gather on counts 1, 3, 1000, 4099 (blocking
 *    and the *_async calls on the rank's stream), compared with comm_host.
 * Expectations: all_gather is a copy, bit-identical. all_reduce_sum is
 * bit-identical for n <= 2 (a + b == b + a); for n >= 3 NCCL's summation
 * order differs from the host's rank order, so the bound is the one for any
 * order of n float additions, taken for both sides:
 *   |nccl - host| <= (n - 1) * FLT_EPSILON * sum_r |x_r|   (per element),
 * and every rank must hold the same bits.
 * With no GPU (or no NCCL) it checks that create refuses clearly, prints
 * "SKIP: ..." and exits 77 (ctest SKIP_RETURN_CODE).
 */
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/comm.h"
#include "engine/comm_nccl.h"

#define MAXN COMM_NCCL_MAX
static const size_t COUNTS[] = {1, 3, 1000, 4099};
#define NCOUNTS (sizeof COUNTS / sizeof COUNTS[0])
#define MAXCOUNT 4099

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_fail = 0;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&g_mu);
    fputs("FAIL: ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    g_fail++;
    pthread_mutex_unlock(&g_mu);
    va_end(ap);
}

/* Values of several magnitudes (2^-8 .. 2^8) and both signs, so that the
 * order of summation shows in the low bits. */
static float value(int rank, size_t count, size_t i)
{
    uint64_t x = (uint64_t)rank * 0x9E3779B97F4A7C15ULL ^ (uint64_t)count * 0xBF58476D1CE4E5B9ULL ^
                 (uint64_t)(i + 1) * 0x94D049BB133111EBULL;
    x ^= x >> 31;
    x *= 0xD6E8FEB86659FD93ULL;
    x ^= x >> 29;
    float m = (float)(x >> 40) / 16777216.0f * 2.0f - 1.0f; /* [-1, 1) */
    int e = (int)((x >> 8) % 17) - 8;
    return ldexpf(m, e);
}

struct shared_t {
    int n;
    comm *nccl[MAXN];
    comm *host[MAXN];
    pthread_barrier_t bar;
    float *res[MAXN]; /* each rank's all-reduce result, host copy */
};

struct rank_arg {
    shared_t *s;
    int r;
};

/* Expect rc == -EINVAL and a message containing want (on this rank). */
static void expect_einval(int n, int r, const char *what, int rc, const lm_err *e, const char *want)
{
    if (rc != -EINVAL || !strstr(e->msg, want))
        fail("n=%d rank %d %s: rc %d msg '%s' (wanted -EINVAL and '%s')", n, r, what, rc, e->msg,
             want);
    else if (r == 0 || strstr(e->msg, "rank 0 gave") == NULL)
        printf("  n=%d rank %d %s -> %d: %s\n", n, r, what, rc, e->msg);
}

static void check_errors(shared_t *s, int r, float *dbuf, float *hostbuf)
{
    int n = s->n;
    comm *c = s->nccl[r];
    lm_err e;

    lm_err_clear(&e);
    int rc = comm_all_reduce_sum(c, dbuf, 0, &e);
    expect_einval(n, r, "all_reduce count 0", rc, &e, "count 0");

    lm_err_clear(&e);
    rc = comm_all_reduce_sum(c, r == 0 ? NULL : dbuf, 3, &e);
    expect_einval(n, r, "all_reduce NULL on rank 0", rc, &e,
                  r == 0 ? "buffer is NULL" : "rank 0 gave bad arguments");

    lm_err_clear(&e);
    rc = comm_all_reduce_sum(c, r == n - 1 ? hostbuf : dbuf, 3, &e);
    expect_einval(n, r, "all_reduce host buffer on last rank", rc, &e,
                  r == n - 1 ? "not device memory" : "gave bad arguments");

    if (n > 1) {
        lm_err_clear(&e);
        rc = comm_all_reduce_sum(c, dbuf, 3 + (size_t)r, &e);
        /* rank 0 sees rank 1's count first; others see rank 0's. */
        expect_einval(n, r, "all_reduce counts differ", rc, &e, "every rank must pass the same");
    }

    lm_err_clear(&e);
    rc = comm_all_gather(c, dbuf, NULL, 3, &e);
    expect_einval(n, r, "all_gather NULL receive", rc, &e, "receive buffer is NULL");

    lm_err_clear(&e);
    rc = comm_nccl_all_reduce_sum_async(c, NULL, 3, &e);
    expect_einval(n, r, "all_reduce_async NULL", rc, &e, "buffer is NULL");
}

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            fail("rank %d: %s: %s", r, #x, cudaGetErrorString(e_));                         \
            return NULL;                                                                   \
        }                                                                                  \
    } while (0)

static void *rank_main(void *p)
{
    rank_arg *a = (rank_arg *)p;
    shared_t *s = a->s;
    int r = a->r, n = s->n;
    comm *c = s->nccl[r];
    CK(cudaSetDevice(comm_nccl_device(c)));
    cudaStream_t st = (cudaStream_t)comm_nccl_stream(c);
    float *dbuf = NULL, *dsend = NULL, *drecv = NULL;
    CK(cudaMalloc(&dbuf, MAXCOUNT * sizeof(float)));
    CK(cudaMalloc(&dsend, MAXCOUNT * sizeof(float)));
    CK(cudaMalloc(&drecv, (size_t)n * MAXCOUNT * sizeof(float)));
    float *hbuf = (float *)malloc(MAXCOUNT * sizeof(float));
    float *hgot = (float *)malloc((size_t)n * MAXCOUNT * sizeof(float));
    float *href = (float *)malloc((size_t)n * MAXCOUNT * sizeof(float));
    if (!hbuf || !hgot || !href) {
        fail("rank %d: out of memory", r);
        return NULL;
    }
    s->res[r] = hgot;

    check_errors(s, r, dbuf, hbuf);

    lm_err e;
    for (int async = 0; async < 2; async++) {
        for (size_t ci = 0; ci < NCOUNTS; ci++) {
            size_t cnt = COUNTS[ci];
            /* all_reduce_sum */
            for (size_t i = 0; i < cnt; i++)
                hbuf[i] = value(r, cnt, i);
            CK(cudaMemcpy(dbuf, hbuf, cnt * sizeof(float), cudaMemcpyHostToDevice));
            lm_err_clear(&e);
            int rc = async ? comm_nccl_all_reduce_sum_async(c, dbuf, cnt, &e)
                           : comm_all_reduce_sum(c, dbuf, cnt, &e);
            if (!rc && async)
                rc = cudaStreamSynchronize(st) == cudaSuccess ? 0 : -EIO;
            if (rc) /* the host barriers below still run: no rank is left waiting */
                fail("n=%d rank %d all_reduce%s count %zu: %d %s", n, r, async ? "_async" : "",
                     cnt, rc, e.msg);
            CK(cudaMemcpy(hgot, dbuf, cnt * sizeof(float), cudaMemcpyDeviceToHost));
            lm_err_clear(&e);
            if (comm_all_reduce_sum(s->host[r], hbuf, cnt, &e))
                fail("rank %d host all_reduce: %s", r, e.msg);
            double worst = 0, worst_bound = 0;
            size_t bad = 0;
            for (size_t i = 0; i < cnt; i++) {
                double sumabs = 0;
                for (int k = 0; k < n; k++)
                    sumabs += fabs((double)value(k, cnt, i));
                double bound = n <= 2 ? 0.0 : (double)(n - 1) * FLT_EPSILON * sumabs;
                double d = fabs((double)hgot[i] - (double)hbuf[i]);
                if (d > bound || (n <= 2 && memcmp(&hgot[i], &hbuf[i], sizeof(float))))
                    bad++;
                if (d - bound > worst - worst_bound || i == 0) {
                    worst = d;
                    worst_bound = bound;
                }
            }
            if (rc)
                ;
            else if (bad)
                fail("n=%d rank %d all_reduce%s count %zu: %zu elements off (worst diff %.3g, "
                     "bound %.3g)", n, r, async ? "_async" : "", cnt, bad, worst, worst_bound);
            else if (r == 0)
                printf("  n=%d all_reduce%s count %4zu: ok (%s; worst diff %.3g, bound %.3g)\n",
                       n, async ? "_async" : "", cnt, n <= 2 ? "bit-identical" : "within bound",
                       worst, worst_bound);
            pthread_barrier_wait(&s->bar); /* every rank must hold rank 0's bits */
            if (memcmp(hgot, s->res[0], cnt * sizeof(float)))
                fail("n=%d rank %d all_reduce count %zu: result differs from rank 0's", n, r,
                     cnt);
            pthread_barrier_wait(&s->bar);

            /* all_gather */
            for (size_t i = 0; i < cnt; i++)
                hbuf[i] = value(r + 1000, cnt, i);
            CK(cudaMemcpy(dsend, hbuf, cnt * sizeof(float), cudaMemcpyHostToDevice));
            CK(cudaMemset(drecv, 0xff, (size_t)n * cnt * sizeof(float)));
            lm_err_clear(&e);
            rc = async ? comm_nccl_all_gather_async(c, dsend, drecv, cnt, &e)
                       : comm_all_gather(c, dsend, drecv, cnt, &e);
            if (!rc && async)
                rc = cudaStreamSynchronize(st) == cudaSuccess ? 0 : -EIO;
            if (rc)
                fail("n=%d rank %d all_gather%s count %zu: %d %s", n, r, async ? "_async" : "",
                     cnt, rc, e.msg);
            CK(cudaMemcpy(hgot, drecv, (size_t)n * cnt * sizeof(float), cudaMemcpyDeviceToHost));
            lm_err_clear(&e);
            if (comm_all_gather(s->host[r], hbuf, href, cnt, &e))
                fail("rank %d host all_gather: %s", r, e.msg);
            if (rc)
                ;
            else if (memcmp(hgot, href, (size_t)n * cnt * sizeof(float)))
                fail("n=%d rank %d all_gather%s count %zu: differs from the host gather", n, r,
                     async ? "_async" : "", cnt);
            else if (r == 0)
                printf("  n=%d all_gather%s count %4zu: ok (bit-identical)\n", n,
                       async ? "_async" : "", cnt);
        }
    }
    pthread_barrier_wait(&s->bar); /* nobody frees hgot while others compare */
    cudaFree(dbuf);
    cudaFree(dsend);
    cudaFree(drecv);
    free(hbuf);
    free(href);
    free(hgot);
    return NULL;
}

static void run_group(int n)
{
    shared_t s;
    memset(&s, 0, sizeof s);
    s.n = n;
    lm_err e;
    lm_err_clear(&e);
    int rc = comm_nccl_create(n, NULL, s.nccl, &e);
    if (rc) {
        fail("comm_nccl_create(%d): %d %s", n, rc, e.msg);
        return;
    }
    if (comm_host_create(n, s.host, &e)) {
        fail("comm_host_create(%d): %s", n, e.msg);
        return;
    }
    for (int r = 0; r < n; r++) {
        if (!comm_nccl_is(s.nccl[r]) || s.nccl[r]->rank != r || s.nccl[r]->size != n ||
            comm_nccl_device(s.nccl[r]) != r || !comm_nccl_stream(s.nccl[r]))
            fail("n=%d rank %d: handle fields wrong", n, r);
    }
    if (comm_nccl_is(s.host[0]) || comm_nccl_stream(s.host[0]) || comm_nccl_device(s.host[0]) != -1)
        fail("a host communicator passes for an NCCL one");
    printf("n=%d: %d rank threads\n", n, n);
    pthread_barrier_init(&s.bar, NULL, (unsigned)n);
    pthread_t th[MAXN];
    rank_arg args[MAXN];
    for (int r = 0; r < n; r++) {
        args[r].s = &s;
        args[r].r = r;
        pthread_create(&th[r], NULL, rank_main, &args[r]);
    }
    for (int r = 0; r < n; r++)
        pthread_join(th[r], NULL);
    pthread_barrier_destroy(&s.bar);
    for (int r = 0; r < n; r++) {
        comm_destroy(s.nccl[r]);
        comm_destroy(s.host[r]);
    }
}

int main(void)
{
    lm_err e;
    comm *c[MAXN];
    lm_err_clear(&e);
    int rc = comm_nccl_create(0, NULL, c, &e);
    if (rc != -EINVAL || !strstr(e.msg, "out of range"))
        fail("create(0 ranks): rc %d msg '%s'", rc, e.msg);

    int ndev = 0;
    cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess || ndev < 1) {
        lm_err_clear(&e);
        rc = comm_nccl_create(1, NULL, c, &e);
        if (rc != -ENODEV || !e.msg[0])
            fail("create without a GPU: rc %d msg '%s' (wanted -ENODEV)", rc, e.msg);
        else
            printf("create without a GPU -> %d: %s\n", rc, e.msg);
        printf("SKIP: no CUDA device (%s)\n",
               ce != cudaSuccess ? cudaGetErrorString(ce) : "0 devices");
        return g_fail ? 1 : 77;
    }
    lm_err_clear(&e);
    rc = comm_nccl_create(1, NULL, c, &e);
    if (rc == -ENODEV && strstr(e.msg, "without NCCL")) {
        printf("SKIP: %s\n", e.msg);
        return g_fail ? 1 : 77;
    }
    if (rc) {
        fail("create(1 rank): %d %s", rc, e.msg);
        return 1;
    }
    comm_destroy(c[0]);
    printf("%d CUDA device(s); NCCL_NVLS_ENABLE=%s\n", ndev, getenv("NCCL_NVLS_ENABLE"));

    lm_err_clear(&e);
    rc = comm_nccl_create(ndev + 1, NULL, c, &e);
    if (rc != -EINVAL || !strstr(e.msg, "one GPU per rank"))
        fail("create with %d ranks: rc %d msg '%s'", ndev + 1, rc, e.msg);
    else
        printf("create with %d ranks -> %d: %s\n", ndev + 1, rc, e.msg);
    int bad_dev[2] = {0, 0};
    lm_err_clear(&e);
    rc = comm_nccl_create(2, bad_dev, c, &e);
    if (rc != -EINVAL)
        fail("create with device 0 twice: rc %d msg '%s'", rc, e.msg);
    else
        printf("create with devices {0,0} -> %d: %s\n", rc, e.msg);
    int far_dev = ndev;
    lm_err_clear(&e);
    rc = comm_nccl_create(1, &far_dev, c, &e);
    if (rc != -EINVAL || !strstr(e.msg, "does not exist"))
        fail("create on device %d: rc %d msg '%s'", ndev, rc, e.msg);
    else
        printf("create on device %d -> %d: %s\n", ndev, rc, e.msg);

    if (ndev > MAXN)
        ndev = MAXN;
    for (int n = 1; n <= ndev; n++)
        run_group(n);
    if (g_fail) {
        printf("%d failure(s)\n", g_fail);
        return 1;
    }
    printf("all NCCL communicator checks passed for n = 1..%d\n", ndev);
    return 0;
}
