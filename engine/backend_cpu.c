/*
 * backend_cpu.c: backend.h over one unsharded cpu_forward rank.
 */
#include "engine/backend_cpu.h"

#include <stdlib.h>
#include <unistd.h>

#include "engine/cpu_forward.h"

typedef struct cpu_backend {
    backend base;
    const model *m;
    cpu_forward *f;
    int32_t block_size, n_blocks;
} cpu_backend;

static int cpu_kv_init(backend *b, int32_t block_size, int32_t n_blocks, lm_err *err)
{
    cpu_backend *c = (cpu_backend *)b;
    int rc = cpu_forward_kv_init(c->f, block_size, n_blocks, err);
    if (!rc) {
        c->block_size = block_size;
        c->n_blocks = n_blocks;
    }
    return rc;
}

static int cpu_kv_copy(backend *b, int32_t src, int32_t dst, lm_err *err)
{
    cpu_backend *c = (cpu_backend *)b;
    if (src < 0 || dst < 0 || src >= c->n_blocks || dst >= c->n_blocks)
        return lm_err_set(err, -EINVAL, "kv_copy: block %d -> %d outside 0..%d", src, dst,
                          c->n_blocks - 1);
    cpu_forward_kv_copy(c->f, src, dst);
    return 0;
}

static int cpu_fwd(backend *b, const backend_batch *batch, lm_err *err)
{
    cpu_backend *c = (cpu_backend *)b;
    int rc = backend_batch_check(batch, c->m->cfg.vocab, c->block_size, c->n_blocks, err);
    return rc ? rc : cpu_forward_run(c->f, batch, err);
}

static size_t host_free_bytes(void)
{
    long pages = sysconf(_SC_AVPHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    return pages > 0 && psz > 0 ? (size_t)pages * (size_t)psz : 0;
}

static void cpu_info(const backend *b, backend_info *ret)
{
    const cpu_backend *c = (const cpu_backend *)b;
    ret->name = "cpu";
    ret->vocab = c->m->cfg.vocab;
    ret->max_context = c->m->cfg.max_position;
    ret->tensor_parallel = 1;
    ret->kv_bytes_per_token = cpu_forward_kv_bytes_per_token(c->f);
    ret->device_memory_free = host_free_bytes();
}

static void cpu_destroy(backend *b)
{
    cpu_backend *c = (cpu_backend *)b;
    cpu_forward_destroy(c->f);
    free(c);
}

static const backend_ops cpu_ops = {cpu_kv_init, cpu_kv_copy, cpu_fwd, cpu_info, cpu_destroy};

int backend_cpu_create(const model *m, const backend_cpu_options *opt, backend **ret,
                       lm_err *err)
{
    *ret = NULL;
    cpu_backend *c = calloc(1, sizeof *c);
    if (!c)
        return lm_err_set(err, -ENOMEM, "cpu backend: out of memory");
    c->base.ops = &cpu_ops;
    c->m = m;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_forward_options fo = {
        .threads = opt && opt->threads > 0 ? opt->threads : (ncpu > 0 ? (int)ncpu : 1),
        .max_tokens = opt && opt->max_tokens > 0 ? opt->max_tokens : 256,
        .portable = opt ? opt->portable : 0,
        .vocab_full = m->cfg.vocab,
        .vocab_stride = m->cfg.vocab,
    };
    int rc = cpu_forward_create(m, &fo, &c->f, err);
    if (rc) {
        free(c);
        return rc;
    }
    *ret = &c->base;
    return 0;
}
