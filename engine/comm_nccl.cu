/*
 * comm_nccl.cu: comm.h over NCCL (see comm_nccl.h). The group keeps the
 * NCCL communicators and a reference count; each rank handle owns a stream
 * on its device.
 */
#include <stdlib.h>

#include "engine/comm_nccl.h"
#include "engine/cuda_common.cuh"

#ifdef LIGHTMOE_HAVE_NCCL
#include <nccl.h>

namespace {

struct nccl_group {
    int n, live;
    ncclComm_t *comms;
};

struct nccl_rank {
    comm base;
    nccl_group *g;
    int device;
    cudaStream_t st;
};

int nccl_err(lm_err *err, ncclResult_t r, const char *what)
{
    if (r == ncclSuccess)
        return 0;
    return lm_err_set(err, -EIO, "nccl: %s: %s", what, ncclGetErrorString(r));
}

int nr_all_reduce(comm *c, float *buf, size_t count, lm_err *err)
{
    nccl_rank *r = (nccl_rank *)c;
    CUDA_TRY(err, cudaSetDevice(r->device));
    int rc = nccl_err(err, ncclAllReduce(buf, buf, count, ncclFloat, ncclSum,
                                         r->g->comms[c->rank], r->st), "all-reduce");
    if (rc)
        return rc;
    return cuda_err(err, cudaStreamSynchronize(r->st), "all-reduce");
}

int nr_all_gather(comm *c, const float *send, float *recv, size_t count, lm_err *err)
{
    nccl_rank *r = (nccl_rank *)c;
    CUDA_TRY(err, cudaSetDevice(r->device));
    int rc = nccl_err(err, ncclAllGather(send, recv, count, ncclFloat, r->g->comms[c->rank], r->st),
                      "all-gather");
    if (rc)
        return rc;
    return cuda_err(err, cudaStreamSynchronize(r->st), "all-gather");
}

void nr_destroy(comm *c)
{
    if (!c)
        return;
    nccl_rank *r = (nccl_rank *)c;
    nccl_group *g = r->g;
    cudaSetDevice(r->device);
    if (r->st)
        cudaStreamDestroy(r->st);
    if (g && g->comms[c->rank])
        ncclCommDestroy(g->comms[c->rank]);
    if (g && --g->live == 0) {
        free(g->comms);
        free(g);
    }
    free(r);
}

const comm_ops nccl_ops = {nr_all_reduce, nr_all_gather, nr_destroy};

} // namespace

extern "C" int comm_nccl_create(int n, const int *devices, comm **ret, lm_err *err)
{
    int nd = 0;
    cudaError_t e = cudaGetDeviceCount(&nd);
    if (e != cudaSuccess)
        return cuda_err(err, e, "nccl: device count");
    if (n < 1 || n > nd)
        return lm_err_set(err, -EINVAL, "nccl: %d ranks but %d CUDA devices", n, nd);
    int *devs = (int *)malloc(sizeof(int) * n);
    nccl_group *g = (nccl_group *)calloc(1, sizeof(*g));
    if (g)
        g->comms = (ncclComm_t *)calloc(n, sizeof(ncclComm_t));
    if (!devs || !g || !g->comms) {
        free(devs);
        if (g)
            free(g->comms);
        free(g);
        return lm_err_set(err, -ENOMEM, "nccl: out of host memory");
    }
    for (int i = 0; i < n; i++) {
        devs[i] = devices ? devices[i] : i;
        if (devs[i] < 0 || devs[i] >= nd) {
            free(devs);
            free(g->comms);
            free(g);
            return lm_err_set(err, -EINVAL, "nccl: rank %d on device %d of %d", i, devs[i], nd);
        }
    }
    setenv("NCCL_NVLS_ENABLE", "0", 0); /* never NVLink multicast on shared hosts */
    int rc = nccl_err(err, ncclCommInitAll(g->comms, n, devs), "init");
    if (rc) {
        free(devs);
        free(g->comms);
        free(g);
        return rc;
    }
    g->n = g->live = n;
    for (int i = 0; i < n; i++) {
        nccl_rank *r = (nccl_rank *)calloc(1, sizeof(*r));
        if (r) {
            r->base.ops = &nccl_ops;
            r->base.rank = i;
            r->base.size = n;
            r->g = g;
            r->device = devs[i];
        }
        cudaError_t ce = cudaErrorMemoryAllocation;
        if (r) {
            cudaSetDevice(devs[i]);
            ce = cudaStreamCreateWithFlags(&r->st, cudaStreamNonBlocking);
        }
        if (ce != cudaSuccess) {
            rc = r ? cuda_err(err, ce, "nccl: rank stream") : lm_err_set(err, -ENOMEM, "nccl: out of host memory");
            free(r);
            /* ranks 0..i-1 built: destroy them; the rest of the communicators here */
            for (int j = i; j < n; j++) {
                ncclCommDestroy(g->comms[j]);
                g->comms[j] = NULL;
            }
            g->live = i;
            for (int j = 0; j < i; j++)
                nr_destroy(ret[j]);
            if (i == 0) {
                free(g->comms);
                free(g);
            }
            free(devs);
            return rc;
        }
        ret[i] = &r->base;
    }
    free(devs);
    return 0;
}

#else /* no NCCL at build time */

extern "C" int comm_nccl_create(int n, const int *devices, comm **ret, lm_err *err)
{
    (void)n;
    (void)devices;
    (void)ret;
    return lm_err_set(err, -ENOTSUP, "nccl: built without NCCL");
}

#endif
