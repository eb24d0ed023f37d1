/*
 * backends.c: backend_open (backends.h).
 */
#include "engine/backends.h"

#include <stdlib.h>
#include <string.h>

#include "engine/backend_cpu.h"
#ifdef LIGHTMOE_HAVE_CUDA
#include "engine/backend_cuda.h"
#endif

void backend_options_default(backend_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->device = "cpu";
    opt->tp = 1;
}

int backend_open(const model *m, const backend_options *opt, backend **ret, lm_err *err)
{
    *ret = NULL;
    backend_options def;
    if (!opt) {
        backend_options_default(&def);
        opt = &def;
    }
    const char *dev = opt->device ? opt->device : "cpu";
    int tp = opt->tp > 0 ? opt->tp : 1;
    if (!strcmp(dev, "cpu")) {
        backend_cpu_options co = {.threads = opt->threads, .max_tokens = opt->max_tokens,
                                  .portable = opt->force_portable};
        if (tp == 1)
            return backend_cpu_create(m, &co, ret, err);
        return backend_tp_cpu_create(m, tp, &co, ret, err);
    }
    if (!strcmp(dev, "cuda")) {
#ifdef LIGHTMOE_HAVE_CUDA
        return backend_cuda_create(m, opt, ret, err);
#else
        return lm_err_set(err, -ENODEV, "device 'cuda': built without CUDA support");
#endif
    }
    return lm_err_set(err, -EINVAL, "unknown device '%s' (cpu or cuda)", dev);
}

/* A backend that forwards to an inner one and owns the model. */
typedef struct owning_backend {
    backend base;
    backend *inner;
    model *m;
} owning_backend;

static int own_kv_init(backend *b, int32_t bs, int32_t nb, lm_err *err)
{
    return backend_kv_init(((owning_backend *)b)->inner, bs, nb, err);
}
static int own_kv_copy(backend *b, int32_t s, int32_t d, lm_err *err)
{
    return backend_kv_copy(((owning_backend *)b)->inner, s, d, err);
}
static int own_forward(backend *b, const backend_batch *batch, lm_err *err)
{
    return backend_forward(((owning_backend *)b)->inner, batch, err);
}
static void own_info(const backend *b, backend_info *ret)
{
    backend_get_info(((const owning_backend *)b)->inner, ret);
}
static void own_destroy(backend *b)
{
    owning_backend *o = (owning_backend *)b;
    backend_destroy(o->inner);
    model_free(o->m);
    free(o);
}
static const backend_ops owning_ops = {own_kv_init, own_kv_copy, own_forward, own_info,
                                       own_destroy};

int backend_open_dir(const char *dir, int threads, backend **ret, lm_err *err)
{
    *ret = NULL;
    owning_backend *o = calloc(1, sizeof *o);
    if (!o)
        return lm_err_set(err, -ENOMEM, "%s: out of memory", dir);
    o->base.ops = &owning_ops;
    int rc = model_load(dir, NULL, &o->m, err);
    backend_options bo;
    backend_options_default(&bo);
    bo.threads = threads;
    if (!rc)
        rc = backend_open(o->m, &bo, &o->inner, err);
    if (rc) {
        model_free(o->m);
        free(o);
        return rc;
    }
    *ret = &o->base;
    return 0;
}
