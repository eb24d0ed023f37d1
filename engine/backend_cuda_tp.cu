/*
 * backend_cuda_tp.cu: the tensor-parallel CUDA backend (backend_cuda.h):
 * N rank backends (backend_cuda_create_rank over the shards of
 * engine/tp_shard.h) driven by one thread per rank, joined by NCCL or by
 * the host communicator.
 *
 * A step hands the same batch to every rank thread; each rank runs the
 * whole layer loop on its shard (all-reduces inside, cuda_tp.cuh) and
 * rank 0 writes the gathered logits. Every rank validates the batch the
 * same way, so a bad batch fails on all of them before any collective.
 * A CUDA fault on one rank in the middle of a step leaves the others
 * waiting in the collective (as NCCL does): such a backend is broken
 * anyway and the process must be restarted.
 *
 * Threads: one caller at a time (the engine thread); the rank threads are
 * a cpu_pool of N threads, each setting its rank's device per task.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "engine/backend_cuda.h"
#include "engine/comm.h"
#include "engine/comm_nccl.h"
extern "C" {
#include "engine/cpu_forward.h" /* backend_batch_check (a C header without guards) */
}
#include "engine/ops_cpu.h"
#include "engine/tp_shard.h"

namespace {

struct tp_cuda {
    backend base;
    const model *m;
    const backend_options *o; /* during creation only */
    int n;
    int dev[TP_MAX];
    tp_shards *sh;
    comm *comms[TP_MAX];
    backend *ranks[TP_MAX];
    cpu_pool *pool;
    const backend_batch *batch;
    int rcs[TP_MAX];
    lm_err errs[TP_MAX];
    int32_t block_size, n_blocks;
    char name[64];
};

int first_error(tp_cuda *t, lm_err *err)
{
    for (int r = 0; r < t->n; r++)
        if (t->rcs[r]) {
            if (err)
                *err = t->errs[r];
            return t->rcs[r];
        }
    return 0;
}

void task_create(void *ctx, int64_t b, int64_t e, int thread)
{
    (void)thread;
    tp_cuda *t = (tp_cuda *)ctx;
    const int32_t S = tp_vocab_stride(t->m->cfg.vocab, t->n);
    for (int64_t r = b; r < e; r++) {
        cudaError_t ce = cudaSetDevice(t->dev[r]);
        if (ce != cudaSuccess) {
            t->rcs[r] = lm_err_set(&t->errs[r], -ENODEV, "tp rank %d: device %d: %s", (int)r,
                                   t->dev[r], cudaGetErrorString(ce));
            continue;
        }
        t->rcs[r] = backend_cuda_create_rank(tp_shards_model(t->sh, (int)r), t->o, t->dev[r],
                                             t->comms[r], (int32_t)r * S, S, &t->ranks[r],
                                             &t->errs[r]);
        if (t->rcs[r])
            lm_err_prefix(&t->errs[r], "tp rank %d (device %d)", (int)r, t->dev[r]);
    }
}

void task_forward(void *ctx, int64_t b, int64_t e, int thread)
{
    (void)thread;
    tp_cuda *t = (tp_cuda *)ctx;
    for (int64_t r = b; r < e; r++)
        t->rcs[r] = backend_forward(t->ranks[r], t->batch, &t->errs[r]);
}

int tc_kv_init(backend *bb, int32_t bs, int32_t nb, lm_err *err)
{
    tp_cuda *t = (tp_cuda *)bb;
    for (int r = 0; r < t->n; r++) {
        int rc = backend_kv_init(t->ranks[r], bs, nb, err);
        if (rc)
            return lm_err_prefix(err, "tp rank %d", r);
    }
    t->block_size = bs;
    t->n_blocks = nb;
    return 0;
}

int tc_kv_copy(backend *bb, int32_t src, int32_t dst, lm_err *err)
{
    tp_cuda *t = (tp_cuda *)bb;
    for (int r = 0; r < t->n; r++) {
        int rc = backend_kv_copy(t->ranks[r], src, dst, err);
        if (rc)
            return rc;
    }
    return 0;
}

int tc_forward(backend *bb, const backend_batch *batch, lm_err *err)
{
    tp_cuda *t = (tp_cuda *)bb;
    int rc = backend_batch_check(batch, t->m->cfg.vocab, t->block_size, t->n_blocks, err);
    if (rc)
        return rc;
    t->batch = batch;
    cpu_pool_run(t->pool, task_forward, t, t->n, 1);
    return first_error(t, err);
}

void tc_info(const backend *bb, backend_info *ret)
{
    const tp_cuda *t = (const tp_cuda *)bb;
    backend_info ri;
    memset(ret, 0, sizeof(*ret));
    ret->name = t->name;
    ret->vocab = t->m->cfg.vocab;
    ret->max_context = t->m->cfg.max_position;
    ret->tensor_parallel = t->n;
    /* KV bytes of all ranks; free memory: the tightest device times the
     * number of distinct devices (each holds its ranks' share) */
    size_t min_free = (size_t)-1;
    int distinct = 0;
    for (int r = 0; r < t->n; r++) {
        backend_get_info(t->ranks[r], &ri);
        ret->kv_bytes_per_token += ri.kv_bytes_per_token;
        min_free = ri.device_memory_free < min_free ? ri.device_memory_free : min_free;
        int seen = 0;
        for (int q = 0; q < r; q++)
            seen |= t->dev[q] == t->dev[r];
        distinct += !seen;
    }
    ret->device_memory_free = min_free * (size_t)distinct;
}

void tc_destroy(backend *bb)
{
    tp_cuda *t = (tp_cuda *)bb;
    if (!t)
        return;
    for (int r = 0; r < t->n; r++)
        if (t->ranks[r])
            backend_destroy(t->ranks[r]); /* before the comms their states borrow */
    for (int r = 0; r < t->n; r++)
        comm_destroy(t->comms[r]);
    cpu_pool_destroy(t->pool);
    tp_shards_free(t->sh);
    free(t);
}

const backend_ops tp_cuda_ops = {tc_kv_init, tc_kv_copy, tc_forward, tc_info, tc_destroy};

} // namespace

extern "C" backend *backend_cuda_tp_rank(backend *b, int r)
{
    if (!b || b->ops != &tp_cuda_ops)
        return NULL;
    const tp_cuda *t = (const tp_cuda *)b;
    return r >= 0 && r < t->n ? t->ranks[r] : NULL;
}

extern "C" int backend_cuda_tp_create(const model *m, const backend_options *o, int comm_kind,
                                      backend **ret, lm_err *err)
{
    *ret = NULL;
    const int n = o && o->tp > 0 ? o->tp : 1;
    if (n > TP_MAX)
        return lm_err_set(err, -EINVAL, "tp=%d: out of range 1..%d", n, TP_MAX);
    int visible = 0;
    if (cudaGetDeviceCount(&visible) != cudaSuccess)
        visible = 0;
    int ids[TP_MAX], shared = 0;
    for (int r = 0; r < n; r++)
        ids[r] = o && o->devices ? o->devices[r] : r;
    int rc = tp_devices_check(ids, n, visible, &shared, err);
    if (rc) {
        if (rc == -EINVAL && !(o && o->devices) && visible >= 1)
            lm_err_prefix(err, "tp=%d with the default devices 0..%d (to put several ranks on "
                          "one GPU, give e.g. devices = 0,0)", n, n - 1);
        return rc;
    }
    tp_shards *sh = NULL;
    if ((rc = tp_shards_create(m, n, &sh, err)))
        return rc;
    tp_cuda *t = (tp_cuda *)calloc(1, sizeof(*t));
    if (!t) {
        tp_shards_free(sh);
        return lm_err_set(err, -ENOMEM, "cuda tp: out of host memory");
    }
    t->base.ops = &tp_cuda_ops;
    t->m = m;
    t->n = n;
    t->sh = sh;
    memcpy(t->dev, ids, sizeof(int) * n);
    int host = comm_kind == CUDA_TP_COMM_HOST || (comm_kind == CUDA_TP_COMM_AUTO && shared);
    const char *why = comm_kind == CUDA_TP_COMM_HOST ? "host-comm" : "host-comm(shared GPU)";
    if (!host) {
        rc = comm_nccl_create(n, ids, t->comms, err);
        if (rc == -ENODEV && comm_kind == CUDA_TP_COMM_AUTO) { /* built without NCCL */
            host = 1;
            why = "host-comm(no NCCL)";
        } else if (rc) {
            tc_destroy(&t->base);
            return lm_err_prefix(err, "tp=%d", n);
        }
    }
    if (host && (rc = comm_host_create(n, t->comms, err))) {
        tc_destroy(&t->base);
        return rc;
    }
    int at = snprintf(t->name, sizeof t->name, "cuda-tp%d %s devices=", n, host ? why : "nccl");
    for (int r = 0; r < n && at < (int)sizeof t->name; r++)
        at += snprintf(t->name + at, sizeof t->name - at, "%s%d", r ? "," : "", ids[r]);
    if ((rc = cpu_pool_create(n, &t->pool, err))) {
        tc_destroy(&t->base);
        return rc;
    }
    t->o = o;
    cpu_pool_run(t->pool, task_create, t, n, 1);
    t->o = NULL;
    if ((rc = first_error(t, err))) {
        tc_destroy(&t->base);
        return rc;
    }
    *ret = &t->base;
    return 0;
}
