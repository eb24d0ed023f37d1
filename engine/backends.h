/*
 * backends.h: open the compute backend named by options (the one place
 * that knows every backend).
 *
 *   device "cpu":  backend_cpu (tp == 1) or the tensor-parallel CPU backend
 *                  over the host communicator (tp > 1);
 *   device "cuda": backend_cuda_create (engine/backend_cuda.h) when built
 *                  with CUDA, else -ENODEV "built without CUDA support".
 *
 * The model is borrowed and must outlive the backend.
 */
#ifndef LIGHTMOE_BACKENDS_H
#define LIGHTMOE_BACKENDS_H

#include <stdint.h>

#include "engine/backend.h"
#include "engine/model.h"

typedef struct backend_options {
    const char *device;         /* "cpu" (default when NULL) or "cuda" */
    int tp;                     /* tensor-parallel ranks (0 or 1: none) */
    const int *devices;         /* cuda: device ids [tp] or NULL for 0..tp-1 */
    int threads;                /* cpu: threads (0: all cores) */
    int32_t max_tokens;         /* token rows per step the backend sizes scratch for (0: 256) */
    int force_portable;         /* cpu: scalar kernels; cuda: no arch-specific kernels */
} backend_options;

void backend_options_default(backend_options *opt);

int backend_open(const model *m, const backend_options *opt, backend **ret, lm_err *err);

/* Convenience for tools and benchmarks: load the model in DIR (default load
 * options) and open a CPU backend with `threads` threads (0: all cores)
 * that owns the model (backend_destroy frees both). */
int backend_open_dir(const char *dir, int threads, backend **ret, lm_err *err);

#endif
