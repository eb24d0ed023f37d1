/*
 * backend_tp.c: tensor-parallel CPU backend: N ranks = threads joined by
 * the host communicator (comm.h), rank r running cpu_forward over shard r
 * of the model (engine/tp_shard.h: Megatron-style split of heads, expert
 * widths and vocabulary, and the layouts it refuses). One all-reduce after
 * attention and one after the MoE/MLP block (cpu_forward.c).
 */
#include "engine/backend_cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/comm.h"
#include "engine/cpu_forward.h"
#include "engine/ops_cpu.h"
#include "engine/tp_shard.h"

typedef struct tp_backend {
    backend base;
    const model *m;
    int n;
    char name[32];
    tp_shards *shards;
    comm *comms[TP_MAX];
    cpu_forward *ranks[TP_MAX];
    cpu_pool *outer;            /* N threads: one per rank */
    int32_t block_size, n_blocks;
    const backend_batch *batch; /* for the rank tasks */
    lm_err errs[TP_MAX];
    int rcs[TP_MAX];
    int32_t kv_bs, kv_nb;
} tp_backend;

static void tp_rank_task(void *ctx, int64_t b, int64_t e, int thread)
{
    tp_backend *t = ctx;
    for (int64_t r = b; r < e; r++)
        t->rcs[r] = cpu_forward_run(t->ranks[r], t->batch, &t->errs[r]);
}

static int tp_forward(backend *b, const backend_batch *batch, lm_err *err)
{
    tp_backend *t = (tp_backend *)b;
    int rc = backend_batch_check(batch, t->m->cfg.vocab, t->block_size, t->n_blocks, err);
    if (rc)
        return rc;
    t->batch = batch;
    cpu_pool_run(t->outer, tp_rank_task, t, t->n, 1);
    for (int r = 0; r < t->n; r++)
        if (t->rcs[r]) {
            if (err)
                *err = t->errs[r];
            return t->rcs[r];
        }
    return 0;
}

static int tp_kv_init(backend *b, int32_t bs, int32_t nb, lm_err *err)
{
    tp_backend *t = (tp_backend *)b;
    for (int r = 0; r < t->n; r++) {
        int rc = cpu_forward_kv_init(t->ranks[r], bs, nb, err);
        if (rc)
            return rc;
    }
    t->block_size = bs;
    t->n_blocks = nb;
    return 0;
}

static int tp_kv_copy(backend *b, int32_t src, int32_t dst, lm_err *err)
{
    tp_backend *t = (tp_backend *)b;
    if (src < 0 || dst < 0 || src >= t->n_blocks || dst >= t->n_blocks)
        return lm_err_set(err, -EINVAL, "kv_copy: block %d -> %d outside 0..%d", src, dst,
                          t->n_blocks - 1);
    for (int r = 0; r < t->n; r++)
        cpu_forward_kv_copy(t->ranks[r], src, dst);
    return 0;
}

static void tp_info(const backend *b, backend_info *ret)
{
    const tp_backend *t = (const tp_backend *)b;
    ret->name = t->name;
    ret->vocab = t->m->cfg.vocab;
    ret->max_context = t->m->cfg.max_position;
    ret->tensor_parallel = t->n;
    ret->kv_bytes_per_token = 0;
    for (int r = 0; r < t->n; r++)
        ret->kv_bytes_per_token += cpu_forward_kv_bytes_per_token(t->ranks[r]);
    long pages = sysconf(_SC_AVPHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    ret->device_memory_free = pages > 0 && psz > 0 ? (size_t)pages * (size_t)psz : 0;
}

static void tp_destroy(backend *b)
{
    tp_backend *t = (tp_backend *)b;
    for (int r = 0; r < t->n; r++) {
        cpu_forward_destroy(t->ranks[r]);
        comm_destroy(t->comms[r]);
    }
    cpu_pool_destroy(t->outer);
    tp_shards_free(t->shards);
    free(t);
}

static const backend_ops tp_ops = {tp_kv_init, tp_kv_copy, tp_forward, tp_info, tp_destroy};

int backend_tp_cpu_create(const model *m, int tp, const backend_cpu_options *opt, backend **ret,
                          lm_err *err)
{
    *ret = NULL;
    if (tp < 1 || tp > TP_MAX)
        return lm_err_set(err, -EINVAL, "tp=%d: out of range 1..%d", tp, TP_MAX);
    tp_shards *sh = NULL;
    int rc = tp_shards_create(m, tp, &sh, err);
    if (rc)
        return rc;
    tp_backend *t = calloc(1, sizeof *t);
    if (!t) {
        tp_shards_free(sh);
        return lm_err_set(err, -ENOMEM, "tp: out of memory");
    }
    t->shards = sh;
    t->base.ops = &tp_ops;
    t->m = m;
    t->n = tp;
    snprintf(t->name, sizeof t->name, "cpu-tp%d", tp);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = opt && opt->threads > 0 ? opt->threads : (ncpu > 0 ? (int)ncpu : 1);
    int per = threads / tp > 0 ? threads / tp : 1;
    int32_t Vl = tp_vocab_stride(m->cfg.vocab, tp);
    if ((rc = cpu_pool_create(tp, &t->outer, err)) || (rc = comm_host_create(tp, t->comms, err)))
        goto fail;
    for (int r = 0; r < tp; r++) {
        cpu_forward_options fo = {.threads = per,
                                  .max_tokens = opt && opt->max_tokens > 0 ? opt->max_tokens : 256,
                                  .portable = opt ? opt->portable : 0,
                                  .comm = t->comms[r],
                                  .vocab_begin = r * Vl,
                                  .vocab_full = m->cfg.vocab,
                                  .vocab_stride = Vl};
        if ((rc = cpu_forward_create(tp_shards_model(sh, r), &fo, &t->ranks[r], err)))
            goto fail;
    }
    *ret = &t->base;
    return 0;
fail:
    tp_destroy(&t->base);
    return rc;
}
