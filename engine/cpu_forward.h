/*
 * cpu_forward.h: one rank's forward pass on the CPU (internal to the CPU
 * backends: backend_cpu uses one unsharded rank, backend_tp N sharded ranks
 * joined by a communicator).
 *
 * A rank holds a model (the full one, or a shard built by backend_tp whose
 * config counts only the rank's heads and intermediate widths), a thread
 * pool, its part of the paged KV cache, and scratch for `max_tokens` token
 * rows, all allocated at creation / kv_init. cpu_forward_run walks the
 * batch in chunks of at most max_tokens tokens (each token carries its own
 * position and block table, so chunking changes nothing in the results)
 * and allocates nothing.
 *
 * With a communicator, the rank all-reduces the attention output and the
 * MoE/MLP output (the row-parallel partial sums), all-reduces the
 * vocabulary-split embedding lookup, and all-gathers the vocabulary-split
 * logits. The batch must already be validated (backend_batch_check).
 */
#ifndef LIGHTMOE_CPU_FORWARD_H
#define LIGHTMOE_CPU_FORWARD_H

#include <stdint.h>

#include "engine/backend.h"
#include "engine/comm.h"
#include "engine/model.h"

typedef struct cpu_forward cpu_forward;

typedef struct cpu_forward_options {
    int threads;                /* threads of this rank's pool */
    int32_t max_tokens;         /* token rows per internal chunk */
    int portable;               /* scalar kernels */
    comm *comm;                 /* NULL: unsharded */
    int32_t vocab_begin;        /* this rank's vocabulary rows [begin, begin + model lm_head n) */
    int32_t vocab_full;         /* the full vocabulary (logits row length) */
    int32_t vocab_stride;       /* per-rank gathered row length (>= local rows) */
} cpu_forward_options;

int cpu_forward_create(const model *m, const cpu_forward_options *opt, cpu_forward **ret,
                       lm_err *err);
void cpu_forward_destroy(cpu_forward *f);
int cpu_forward_kv_init(cpu_forward *f, int32_t block_size, int32_t n_blocks, lm_err *err);
void cpu_forward_kv_copy(cpu_forward *f, int32_t src, int32_t dst);
int cpu_forward_run(cpu_forward *f, const backend_batch *b, lm_err *err);
/* K and V bytes per token of this rank's cache (all layers). */
size_t cpu_forward_kv_bytes_per_token(const cpu_forward *f);

/* Check a batch against the model and the KV geometry; -EINVAL naming the
 * offending field otherwise. Shared by every backend. */
int backend_batch_check(const backend_batch *b, int32_t vocab, int32_t block_size,
                        int32_t n_blocks, lm_err *err);

#endif
