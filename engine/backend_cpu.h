/*
 * backend_cpu.h: the CPU reference backend (implements backend.h).
 *
 * fp32 activations and KV cache, weights as loaded (16-bit or INT4),
 * operators from ops_cpu.h on a pthread pool created once. A forward step
 * may hold any number of tokens; they are processed in chunks of
 * max_tokens rows whose scratch is allocated at creation, so forward never
 * allocates. Results of a sequence do not depend on what else is in the
 * batch (bit-identical), see ops_cpu.h.
 *
 * The model is borrowed: it must outlive the backend.
 */
#ifndef LIGHTMOE_BACKEND_CPU_H
#define LIGHTMOE_BACKEND_CPU_H

#include "engine/backend.h"
#include "engine/model.h"

typedef struct backend_cpu_options {
    int threads;                /* 0: all online cores */
    int32_t max_tokens;         /* token rows per internal chunk (0: 256) */
    int portable;               /* scalar kernels instead of AVX2 */
} backend_cpu_options;

int backend_cpu_create(const model *m, const backend_cpu_options *opt, backend **ret,
                       lm_err *err);

/* Tensor-parallel CPU backend: tp ranks (threads) with sharded weights
 * joined by the host communicator (comm.h); see backend_tp.c for the
 * sharding rules and the layouts it refuses. threads are split over ranks. */
int backend_tp_cpu_create(const model *m, int tp, const backend_cpu_options *opt, backend **ret,
                          lm_err *err);

#endif
