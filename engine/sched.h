/*
 * sched.h: the continuous-batching scheduler, the engine's public API for
 * the daemon and the command line.
 *
 * One engine thread owns the backend and runs steps; any thread may submit
 * and cancel. Each step runs one forward over all running sequences
 * (decode tokens plus prefill chunks within a token budget), samples one
 * token per sequence that reached the end of its prompt, and delivers
 * events through the request's callback. The KV cache is paged (blocks of
 * block_size tokens, a free list), prefix blocks are shared by reference
 * count, the newest sequences are preempted (and recomputed later) when
 * blocks run out, and the token budget adapts to a latency target.
 *
 * Ownership: sched_submit copies everything it needs from the request; the
 * callback is called on the engine thread and must not block (hand the
 * event to another thread). After the FINISHED event for a request the
 * scheduler never touches its `user` pointer again.
 */
#ifndef LIGHTMOE_SCHED_H
#define LIGHTMOE_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "engine/backend.h"
#include "engine/err.h"
#include "engine/sample.h"

typedef struct sched sched;

typedef enum sched_finish {
    SCHED_FINISH_NONE = 0,
    SCHED_FINISH_STOP,          /* EOS or a stop token id */
    SCHED_FINISH_LENGTH,        /* max_tokens or the context length */
    SCHED_FINISH_CANCELLED,     /* sched_cancel */
    SCHED_FINISH_DEADLINE,      /* deadline passed */
    SCHED_FINISH_ERROR,         /* backend failure; message in the event */
} sched_finish;

typedef enum sched_event_type {
    SCHED_EVENT_TOKEN = 1,      /* one new token */
    SCHED_EVENT_FINISHED,       /* last event of a request */
} sched_event_type;

typedef struct sched_event {
    sched_event_type type;
    uint64_t id;                /* request id from sched_submit */
    sample_result tok;          /* TOKEN: the token and its logprobs */
    sched_finish finish;        /* FINISHED */
    int32_t prompt_tokens;      /* FINISHED: usage */
    int32_t completion_tokens;  /* FINISHED */
    int32_t cached_prompt_tokens; /* FINISHED: prompt tokens served from prefix blocks */
    const char *message;        /* FINISHED with ERROR: why */
} sched_event;

typedef void (*sched_event_fn)(void *user, const sched_event *ev);

typedef struct sched_request {
    const int32_t *prompt;      /* [n_prompt] token ids, copied */
    int32_t n_prompt;
    int32_t max_tokens;         /* > 0 */
    sample_params sampling;
    const int32_t *stop_ids;    /* [n_stop_ids] extra stop tokens, copied */
    int32_t n_stop_ids;
    int ignore_eos;             /* do not stop at the model's EOS ids */
    int64_t deadline_ns;        /* CLOCK_MONOTONIC, 0 = none */
    sched_event_fn on_event;
    void *user;
} sched_request;

typedef struct sched_config {
    int32_t block_size;         /* tokens per KV block (16) */
    size_t kv_bytes;            /* KV memory budget in bytes; 0 = use kv_fraction */
    double kv_fraction;         /* of the backend's free device memory */
    int32_t max_running;        /* upper bound of the batch (sequences) */
    int32_t max_queue;          /* waiting requests before "overloaded" */
    int32_t max_step_tokens;    /* upper bound of the per-step token budget */
    int32_t min_step_tokens;    /* lower bound the controller never goes under */
    int32_t prefill_chunk;      /* largest prefill piece of one sequence per step */
    double target_itl_ms;       /* inter-token latency target (p95); 0 = fixed budget */
    int prefix_cache;           /* share full prompt blocks between requests */
    const int32_t *eos_ids;     /* the model's EOS ids (generation_config), copied */
    int32_t n_eos_ids;
    /* Called on the engine thread after every step and at least every
     * idle_tick_ms while idle: the daemon's watchdog ping and debug stall
     * hook live here, so a hung step stops the pings. May be NULL. */
    void (*on_tick)(void *user);
    void *tick_user;
    int32_t idle_tick_ms;
    /* Threads that sample a step's logits rows on the host, the engine
     * thread included: 0 = automatic, min(8, online CPUs); 1 = the engine
     * thread alone; at most SCHED_MAX_SAMPLE_THREADS, and no more than
     * max_running are started. A step's rows are shared out (each
     * request's pick is independent of the others') among as many threads
     * as get a row and SCHED_SAMPLE_LOGITS_PER_THREAD logits each, when
     * that is two or more; events, outputs and their order are those of
     * the engine thread alone. Device sampling does not use them (its
     * fallback to the host does). */
    int32_t sample_threads;
} sched_config;

#define SCHED_MAX_SAMPLE_THREADS 256
/* Logits (rows x vocabulary) a sampling thread must have in a step for
 * waking it to pay: 2 rows of qwen's 151936 on 2 threads take 0.7 of the
 * time on one, 8 rows of a 384 vocabulary 1.4-2x it; the break-even for
 * two threads lies between 4K and 12K logits in all (docs/PERF.md,
 * Scheduler: host sampling on several threads). */
#define SCHED_SAMPLE_LOGITS_PER_THREAD 4096

/* Statistics for metrics and tests (a consistent snapshot). */
typedef struct sched_stats {
    int32_t waiting, running;
    int32_t kv_blocks_total, kv_blocks_used, kv_blocks_cached;
    int32_t step_token_budget, batch_limit;
    uint64_t steps, tokens_generated, prompt_tokens_computed, prefix_tokens_reused;
    uint64_t preemptions, finished, cancelled;
    double last_step_ms;
    /* Host sampling: the threads that sample (sched_config.sample_threads
     * resolved), steps whose rows they shared, rows of those picked by a
     * thread other than the engine thread, and the time of the steps'
     * sample-and-deliver phase (the last step's, and summed). */
    int32_t sample_threads;
    uint64_t sample_parallel_steps, sample_rows_helped;
    double last_sample_ms, sample_ms_total;
} sched_stats;

void sched_config_default(sched_config *cfg);

/* Create a scheduler over `be` (not owned; must outlive the scheduler) and
 * start its engine thread. */
int sched_create(backend *be, const sched_config *cfg, sched **ret, lm_err *err);

/*
 * Queue a request. Returns 0 and its id, or:
 *   -EAGAIN   the queue is full ("overloaded": RESOURCE_EXHAUSTED),
 *   -EINVAL   bad request (empty prompt, prompt + max_tokens past the
 *             context, bad sampling values): message says which,
 *   -ESHUTDOWN the scheduler is stopping.
 * On error no event is ever delivered.
 */
int sched_submit(sched *s, const sched_request *req, uint64_t *ret_id, lm_err *err);

/* Cancel a request; its FINISHED(CANCELLED) event follows within one step.
 * Unknown or finished ids are ignored (returns -ENOENT). Any thread. */
int sched_cancel(sched *s, uint64_t id);

void sched_get_stats(sched *s, sched_stats *ret);

/* Stop accepting, cancel everything still queued or running (each gets its
 * FINISHED event), join the engine thread and free. NULL is fine. */
void sched_destroy(sched *s);

#endif
