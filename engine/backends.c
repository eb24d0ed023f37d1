/*
 * backends.c: backend_open (backends.h).
 */
#include "engine/backends.h"

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
