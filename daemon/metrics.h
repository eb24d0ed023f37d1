/*
 * metrics.h: Prometheus metrics of lightmoed, served as text on a separate
 * HTTP port (libmicrohttpd, GET /metrics).
 *
 * Counters and histograms are lock-free atomics updated on the hot path
 * (RPC and engine threads); gauges that belong to the engine (queue depth,
 * running sequences, KV blocks) are read from a stats callback at scrape
 * time so the engine never pushes them.
 *
 * Metric names (all prefixed lightmoe_):
 *   requests_total{method,code}      finished RPCs by method and status code
 *   time_to_first_token_seconds      histogram
 *   inter_token_latency_seconds      histogram
 *   batch_size                       histogram of sequences per engine step
 *   generated_tokens_total, prompt_tokens_total, tokens_per_second (10 s window)
 *   queue_depth, running_sequences, kv_blocks_used, kv_blocks_total,
 *   active_streams, preemptions_total, engine_steps_total
 *   sample_threads, sample_shared_steps_total, sample_rows_helped_total,
 *   sample_seconds_total (host sampling: engine/sched.h's sample_* stats)
 *   cache_hits_total, cache_misses_total, cache_stores_total
 *   serving (1 when health is SERVING)
 */
#ifndef LIGHTMOE_DAEMON_METRICS_H
#define LIGHTMOE_DAEMON_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "engine/sched.h"

typedef struct metrics_gauges {
    sched_stats sched;              /* zero while no model is loaded */
    int has_sched;
    int active_streams;
    int serving;
} metrics_gauges;

/* Start the HTTP listener on "HOST:PORT" (port 0 picks one; *ret_port is
 * the bound port). Returns 0 or a negative errno with errbuf filled. */
int metrics_start(const char *addr, int *ret_port, char *errbuf, size_t errlen);
void metrics_stop(void);
void metrics_set_gauge_source(void (*fn)(void *user, metrics_gauges *ret), void *user);

void metrics_count_request(const char *method, int code);
void metrics_observe_ttft(double seconds);
void metrics_observe_itl(double seconds);
void metrics_observe_batch(int n_seqs);
void metrics_add_tokens(int64_t prompt, int64_t generated);
void metrics_count_cache(int hit);
void metrics_count_cache_store(void);
/* Called about once a second (main thread): updates tokens_per_second. */
void metrics_tick(void);
double metrics_tokens_per_second(void);
uint64_t metrics_requests_total(void);

#endif
