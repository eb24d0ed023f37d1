/*
 * comm_nccl.cu: the NCCL communicator (comm_nccl.h).
 *
 * A group holds the n NCCL communicators (ncclCommInitAll), one stream per
 * rank, and the host agreement used by the blocking collectives: each rank
 * publishes {ok, count} in slot [call parity][rank], waits at a barrier,
 * then reads every rank's entry. Two slots are enough because a rank can be
 * at most one call ahead of the slowest one (it waits at the next barrier
 * for it), so it never overwrites an entry that a slower rank still reads.
 */
#include "engine/comm_nccl.h"

#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef LIGHTMOE_HAVE_NCCL
#include <nccl.h>
#endif

namespace {

const comm_ops *nccl_ops_ptr();

#ifdef LIGHTMOE_HAVE_NCCL

struct vote {
    int ok;
    size_t count;
};

struct nccl_group {
    int n;
    int refs;
    pthread_mutex_t mu;
    pthread_barrier_t bar;
    ncclComm_t nc[COMM_NCCL_MAX];
    cudaStream_t st[COMM_NCCL_MAX];
    int dev[COMM_NCCL_MAX];
    vote votes[2][COMM_NCCL_MAX];
};

struct nccl_comm {
    comm base;
    nccl_group *g;
    unsigned gen; /* calls of blocking collectives so far (slot parity) */
};

int nccl_code(ncclResult_t r)
{
    switch (r) {
    case ncclSuccess:
        return 0;
    case ncclInvalidArgument:
    case ncclInvalidUsage:
        return -EINVAL;
    case ncclInProgress:
        return -EAGAIN;
    default:
        return -EIO;
    }
}

int nccl_fail(lm_err *err, ncclResult_t r, ncclComm_t c, const char *what, int rank)
{
    const char *last = c ? ncclGetLastError(c) : NULL;
    return lm_err_set(err, nccl_code(r), "nccl rank %d: %s: %s%s%s", rank, what,
                      ncclGetErrorString(r), last && *last ? " (" : "",
                      last && *last ? last : "");
}

int cuda_fail(lm_err *err, cudaError_t e, const char *what, int rank)
{
    return lm_err_set(err, -EIO, "nccl rank %d: %s: %s", rank, what, cudaGetErrorString(e));
}

/* Is p device memory of device dev (or managed memory)? Writes why not. */
int check_buf(const void *p, int dev, const char *name, int rank, lm_err *err)
{
    if (!p)
        return lm_err_set(err, -EINVAL, "nccl rank %d: %s buffer is NULL", rank, name);
    cudaPointerAttributes a;
    cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* not sticky: clear it for later calls */
        return lm_err_set(err, -EINVAL, "nccl rank %d: %s buffer %p: %s", rank, name, p,
                          cudaGetErrorString(e));
    }
    if (a.type == cudaMemoryTypeManaged)
        return 0;
    if (a.type != cudaMemoryTypeDevice)
        return lm_err_set(err, -EINVAL, "nccl rank %d: %s buffer %p is not device memory "
                          "(the NCCL communicator takes cudaMalloc'd buffers)", rank, name, p);
    if (a.device != dev)
        return lm_err_set(err, -EINVAL, "nccl rank %d: %s buffer %p is on device %d, the rank's "
                          "device is %d", rank, name, p, a.device, dev);
    return 0;
}

int check_args(nccl_comm *nc, const void *send, const void *recv, size_t count, lm_err *err)
{
    int r = nc->base.rank, n = nc->g->n;
    if (count == 0)
        return lm_err_set(err, -EINVAL, "nccl rank %d: count 0 (a collective needs at least "
                          "one element)", r);
    if (count > SIZE_MAX / sizeof(float) / (size_t)n)
        return lm_err_set(err, -EINVAL, "nccl rank %d: count %zu is too large", r, count);
    int dev = nc->g->dev[r];
    if (send != recv) {
        int rc = check_buf(send, dev, "send", r, err);
        if (rc)
            return rc;
    }
    return check_buf(recv, dev, send != recv ? "receive" : "data", r, err);
}

/* Host agreement: 0 when every rank's arguments were good and counts equal. */
int agree(nccl_comm *nc, int local_rc, size_t count, lm_err *err)
{
    nccl_group *g = nc->g;
    int r = nc->base.rank, n = g->n;
    vote *slot = g->votes[nc->gen++ & 1u];
    slot[r].ok = local_rc == 0;
    slot[r].count = count;
    pthread_barrier_wait(&g->bar);
    if (local_rc)
        return local_rc;
    for (int k = 0; k < n; k++) {
        if (!slot[k].ok)
            return lm_err_set(err, -EINVAL, "nccl rank %d: rank %d gave bad arguments to the "
                              "collective, so no rank ran it", r, k);
        if (slot[k].count != count)
            return lm_err_set(err, -EINVAL, "nccl rank %d: count %zu here but %zu on rank %d "
                              "(every rank must pass the same count)", r, count,
                              slot[k].count, k);
    }
    return 0;
}

int enqueue_reduce(nccl_comm *nc, float *buf, size_t count, lm_err *err)
{
    nccl_group *g = nc->g;
    int r = nc->base.rank;
    cudaError_t e = cudaSetDevice(g->dev[r]);
    if (e != cudaSuccess)
        return cuda_fail(err, e, "cudaSetDevice", r);
    ncclResult_t res = ncclAllReduce(buf, buf, count, ncclFloat32, ncclSum, g->nc[r], g->st[r]);
    if (res != ncclSuccess)
        return nccl_fail(err, res, g->nc[r], "ncclAllReduce", r);
    return 0;
}

int enqueue_gather(nccl_comm *nc, const float *send, float *recv, size_t count, lm_err *err)
{
    nccl_group *g = nc->g;
    int r = nc->base.rank;
    cudaError_t e = cudaSetDevice(g->dev[r]);
    if (e != cudaSuccess)
        return cuda_fail(err, e, "cudaSetDevice", r);
    ncclResult_t res = ncclAllGather(send, recv, count, ncclFloat32, g->nc[r], g->st[r]);
    if (res != ncclSuccess)
        return nccl_fail(err, res, g->nc[r], "ncclAllGather", r);
    return 0;
}

int finish(nccl_comm *nc, const char *what, lm_err *err)
{
    nccl_group *g = nc->g;
    int r = nc->base.rank;
    cudaError_t e = cudaStreamSynchronize(g->st[r]);
    if (e != cudaSuccess)
        return cuda_fail(err, e, what, r);
    ncclResult_t async = ncclSuccess;
    ncclResult_t res = ncclCommGetAsyncError(g->nc[r], &async);
    if (res != ncclSuccess)
        return nccl_fail(err, res, g->nc[r], "ncclCommGetAsyncError", r);
    if (async != ncclSuccess)
        return nccl_fail(err, async, g->nc[r], what, r);
    return 0;
}

int nccl_all_reduce(comm *c, float *buf, size_t count, lm_err *err)
{
    nccl_comm *nc = (nccl_comm *)c;
    int rc = agree(nc, check_args(nc, buf, buf, count, err), count, err);
    if (!rc)
        rc = enqueue_reduce(nc, buf, count, err);
    if (!rc)
        rc = finish(nc, "all_reduce_sum", err);
    return rc;
}

int nccl_all_gather(comm *c, const float *send, float *recv, size_t count, lm_err *err)
{
    nccl_comm *nc = (nccl_comm *)c;
    int rc = agree(nc, check_args(nc, send, recv, count, err), count, err);
    if (!rc)
        rc = enqueue_gather(nc, send, recv, count, err);
    if (!rc)
        rc = finish(nc, "all_gather", err);
    return rc;
}

void group_free(nccl_group *g)
{
    /* Single thread, every communicator: the pattern NCCL documents for
     * ncclCommInitAll groups. */
    for (int r = 0; r < g->n; r++) {
        if (g->st[r]) {
            cudaSetDevice(g->dev[r]);
            cudaStreamSynchronize(g->st[r]);
        }
    }
    for (int r = 0; r < g->n; r++)
        if (g->nc[r])
            ncclCommDestroy(g->nc[r]);
    for (int r = 0; r < g->n; r++) {
        if (g->st[r]) {
            cudaSetDevice(g->dev[r]);
            cudaStreamDestroy(g->st[r]);
        }
    }
    pthread_barrier_destroy(&g->bar);
    pthread_mutex_destroy(&g->mu);
    free(g);
}

void nccl_destroy(comm *c)
{
    nccl_group *g = ((nccl_comm *)c)->g;
    pthread_mutex_lock(&g->mu);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    free(c);
    if (last)
        group_free(g);
}

const comm_ops nccl_ops = {nccl_all_reduce, nccl_all_gather, nccl_destroy};
const comm_ops *nccl_ops_ptr() { return &nccl_ops; }

#else /* no NCCL */

int no_op_reduce(comm *, float *, size_t, lm_err *err)
{
    return lm_err_set(err, -ENODEV, "nccl: built without NCCL");
}
int no_op_gather(comm *, const float *, float *, size_t, lm_err *err)
{
    return lm_err_set(err, -ENODEV, "nccl: built without NCCL");
}
void no_op_destroy(comm *) {}
const comm_ops nccl_ops = {no_op_reduce, no_op_gather, no_op_destroy};
const comm_ops *nccl_ops_ptr() { return &nccl_ops; }

#endif

} // namespace

extern "C" int comm_nccl_is(const comm *c)
{
    return c && c->ops == nccl_ops_ptr();
}

#ifdef LIGHTMOE_HAVE_NCCL

extern "C" void *comm_nccl_stream(const comm *c)
{
    if (!comm_nccl_is(c))
        return NULL;
    const nccl_comm *nc = (const nccl_comm *)c;
    return (void *)nc->g->st[c->rank];
}

extern "C" int comm_nccl_device(const comm *c)
{
    if (!comm_nccl_is(c))
        return -1;
    return ((const nccl_comm *)c)->g->dev[c->rank];
}

extern "C" int comm_nccl_all_reduce_sum_async(comm *c, float *buf, size_t count, lm_err *err)
{
    if (!comm_nccl_is(c))
        return lm_err_set(err, -EINVAL, "comm_nccl_all_reduce_sum_async: not an NCCL "
                          "communicator");
    nccl_comm *nc = (nccl_comm *)c;
    int rc = check_args(nc, buf, buf, count, err);
    return rc ? rc : enqueue_reduce(nc, buf, count, err);
}

extern "C" int comm_nccl_all_gather_async(comm *c, const float *send, float *recv, size_t count,
                                          lm_err *err)
{
    if (!comm_nccl_is(c))
        return lm_err_set(err, -EINVAL, "comm_nccl_all_gather_async: not an NCCL communicator");
    nccl_comm *nc = (nccl_comm *)c;
    int rc = check_args(nc, send, recv, count, err);
    return rc ? rc : enqueue_gather(nc, send, recv, count, err);
}

extern "C" int comm_nccl_create(int n, const int *devices, comm **ret, lm_err *err)
{
    if (n < 1 || n > COMM_NCCL_MAX)
        return lm_err_set(err, -EINVAL, "nccl communicator: %d ranks is out of range 1..%d", n,
                          COMM_NCCL_MAX);
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return lm_err_set(err, -ENODEV, "nccl communicator: no CUDA device (%s)",
                          cudaGetErrorString(e));
    }
    if (ndev < 1)
        return lm_err_set(err, -ENODEV, "nccl communicator: no CUDA device");
    if (n > ndev)
        return lm_err_set(err, -EINVAL, "nccl communicator: %d ranks but %d CUDA device%s "
                          "visible (one GPU per rank)", n, ndev, ndev == 1 ? "" : "s");
    nccl_group *g = (nccl_group *)calloc(1, sizeof *g);
    if (!g)
        return lm_err_set(err, -ENOMEM, "nccl communicator: out of host memory");
    g->n = n;
    for (int r = 0; r < n; r++) {
        int d = devices ? devices[r] : r;
        if (d < 0 || d >= ndev) {
            free(g);
            return lm_err_set(err, -EINVAL, "nccl communicator: rank %d: device %d does not "
                              "exist (%d visible)", r, d, ndev);
        }
        for (int k = 0; k < r; k++) {
            if (g->dev[k] == d) {
                free(g);
                return lm_err_set(err, -EINVAL, "nccl communicator: device %d given to ranks "
                                  "%d and %d (one GPU per rank)", d, k, r);
            }
        }
        g->dev[r] = d;
    }
    pthread_mutex_init(&g->mu, NULL);
    pthread_barrier_init(&g->bar, NULL, (unsigned)n);
    setenv("NCCL_NVLS_ENABLE", "0", 0); /* keep NVLink multicast off unless asked */
    int saved = 0;
    cudaGetDevice(&saved);
    int rc = 0;
    ncclResult_t res = ncclCommInitAll(g->nc, n, g->dev);
    if (res != ncclSuccess) {
        memset(g->nc, 0, sizeof g->nc);
        rc = nccl_fail(err, res, NULL, "ncclCommInitAll", 0);
    }
    for (int r = 0; !rc && r < n; r++) {
        e = cudaSetDevice(g->dev[r]);
        if (e == cudaSuccess)
            e = cudaStreamCreateWithFlags(&g->st[r], cudaStreamNonBlocking);
        if (e != cudaSuccess) {
            g->st[r] = NULL;
            rc = cuda_fail(err, e, "creating the rank's stream", r);
        }
    }
    if (rc) {
        group_free(g);
        cudaSetDevice(saved);
        return lm_err_prefix(err, "nccl communicator");
    }
    for (int r = 0; r < n; r++) {
        nccl_comm *c = (nccl_comm *)calloc(1, sizeof *c);
        if (!c) {
            for (int k = 0; k < r; k++)
                nccl_destroy(ret[k]);
            if (r == 0)
                group_free(g);
            cudaSetDevice(saved);
            return lm_err_set(err, -ENOMEM, "nccl communicator: out of host memory");
        }
        c->base.ops = &nccl_ops;
        c->base.rank = r;
        c->base.size = n;
        c->g = g;
        g->refs++;
        ret[r] = &c->base;
    }
    cudaSetDevice(saved);
    return 0;
}

#else /* no NCCL */

extern "C" void *comm_nccl_stream(const comm *) { return NULL; }
extern "C" int comm_nccl_device(const comm *) { return -1; }
extern "C" int comm_nccl_all_reduce_sum_async(comm *, float *, size_t, lm_err *err)
{
    return lm_err_set(err, -ENODEV, "nccl communicator: built without NCCL");
}
extern "C" int comm_nccl_all_gather_async(comm *, const float *, float *, size_t, lm_err *err)
{
    return lm_err_set(err, -ENODEV, "nccl communicator: built without NCCL");
}
extern "C" int comm_nccl_create(int n, const int *, comm **, lm_err *err)
{
    return lm_err_set(err, -ENODEV, "nccl communicator (%d ranks): lightmoe was built without "
                      "NCCL (libnccl.so was not found at configure time)", n);
}

#endif
