/*
 * sched_pool.h: the scheduler's sampling threads.
 *
 * A step's logits rows belong to different requests, each with its own
 * sample_params and rng, so they can be picked in any order on any thread.
 * sched_pool_run calls fn(ctx, row, thread, scratch) once for every row of
 * [0, n_rows), on the calling thread (thread 0) and on the pool's
 * n_threads - 1 workers. Rows are handed out one at a time from an atomic
 * counter, so a slow row (top_k over 151936 logits: ~3 ms on the host)
 * does not hold back a thread that drew quick ones, and the caller never
 * waits for a worker that has not woken up yet, only for rows a worker
 * has taken.
 *
 * Each thread has its own scratch of scratch_bytes (the sampler's
 * sample_scratch_bytes(vocab)), allocated at create: nothing is allocated
 * per run. Workers sleep on a condition variable between runs (no spin:
 * runs come once a step, milliseconds apart, and the CPU backend's own
 * pool wants the cores in between).
 *
 * Threads: one thread (the scheduler's engine thread) calls sched_pool_run
 * and uses scratch 0; fn must only touch what its row owns. Create and
 * destroy on any thread, never during a run. Modelled on ops_cpu.c's
 * cpu_pool, which serves the CPU backend's matmuls (and spins between its
 * jobs, which come microseconds apart).
 */
#ifndef LIGHTMOE_SCHED_POOL_H
#define LIGHTMOE_SCHED_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

typedef struct sched_pool sched_pool;

/* One row of a run, on thread `thread` (0 = the caller) with that
 * thread's scratch. */
typedef void (*sched_pool_fn)(void *ctx, int32_t row, int32_t thread, void *scratch);

#define SCHED_POOL_MAX_THREADS 256

/*
 * A pool of n_threads threads in all, the caller included (so
 * n_threads - 1 workers are started; 1 = none), each with scratch_bytes
 * of scratch. -EINVAL for n_threads outside [1, SCHED_POOL_MAX_THREADS],
 * -ENOMEM, or pthread_create's error (the threads already started are
 * joined). On failure *ret is NULL.
 */
int sched_pool_create(int32_t n_threads, size_t scratch_bytes, sched_pool **ret, lm_err *err);

int32_t sched_pool_threads(const sched_pool *p);

/* Thread t's scratch (0 = the caller's), owned by the pool. */
void *sched_pool_scratch(sched_pool *p, int32_t thread);

/*
 * Run fn for every row of [0, n_rows) on at most n_threads threads, the
 * caller included (n_threads is clamped to [1, sched_pool_threads]), and
 * return once all are done (what the rows wrote is then visible to the
 * caller). With one thread, or n_rows < 2, the caller runs them in order
 * alone.
 */
void sched_pool_run(sched_pool *p, int32_t n_rows, int32_t n_threads, sched_pool_fn fn,
                    void *ctx);

/* Stop and join the workers, free. NULL is fine. */
void sched_pool_destroy(sched_pool *p);

#endif
