/*
 * runner.h: the daemon's view of the engine (the only daemon file that
 * includes engine headers beyond err/sample/sched is runner.c).
 *
 * A runner is a loaded checkpoint with its tokenizer, chat template, backend
 * and scheduler, plus the text-generation pipeline (engine/gen.h) that turns
 * prompt tokens into text deltas with stop strings. Loading reports
 * progress ("loading shard 3/16") through a callback so the daemon can tell
 * systemd; the scheduler's on_tick (engine thread) is passed through for the
 * watchdog.
 *
 * Threads: runner_generate/runner_cancel/runner_tokenize/runner_render from any
 * thread; generation callbacks arrive on the engine thread and must not
 * block. runner_destroy after every request has finished or been cancelled.
 */
#ifndef LIGHTMOE_DAEMON_RUNNER_H
#define LIGHTMOE_DAEMON_RUNNER_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "engine/sample.h"
#include "engine/sched.h"

struct daemon_config;
typedef struct runner runner;

typedef struct runner_msg {
    const char *role;
    const char *content;
} runner_msg;

typedef struct runner_info {
    char name[256];
    char architecture[64];
    char quantization[64];
    char device[64];
    int32_t context_length;
    int32_t vocab_size;
    int32_t tensor_parallel;
    char id[320];                   /* name + checksum: the cache's model_id */
} runner_info;

typedef struct runner_finish {
    sched_finish reason;
    int32_t prompt_tokens, completion_tokens, cached_prompt_tokens;
    const char *message;            /* reason == ERROR: why */
} runner_finish;

typedef struct runner_gen {
    const int32_t *prompt_ids;      /* copied */
    int32_t n_prompt;
    int32_t max_tokens;
    sample_params sampling;
    const char *const *stop;        /* copied */
    int32_t n_stop;
    int64_t deadline_ns;
    /* Engine thread. text is one UTF-8-complete piece (may be empty when
     * a token only advanced a stop-string match). */
    void (*on_delta)(void *user, const char *text, size_t len, const int32_t *ids, int32_t n,
                     const sample_result *lp);
    /* Last call for this request. */
    void (*on_finish)(void *user, const runner_finish *f);
    void *user;
} runner_gen;

typedef void (*runner_progress_fn)(void *user, const char *what, int step, int n_steps);

/* Load the model of cfg->model on cfg->device and start its engine thread;
 * tick runs on the engine thread after every step and while idle. */
int runner_load(const struct daemon_config *cfg, runner_progress_fn progress, void *puser,
               void (*tick)(void *), void *tick_user, runner **ret, lm_err *err);
/* Run one short generation so the first request does not pay for lazy setup. */
int runner_warmup(runner *m, lm_err *err);
/* Render chat messages with the model's template and the generation
 * prompt. *ret_text is malloc'ed. -EINVAL names the bad message. */
int runner_render(runner *m, const runner_msg *msgs, int32_t n, char **ret_text, lm_err *err);
/* The prompt token ids of a request, exactly as generation will use them:
 * a plain prompt encoded with the tokenizer's special tokens, or messages
 * rendered with the chat template (plus the generation prompt) and
 * encoded without them (engine/gen.h). *ret_ids is malloc'ed. -EINVAL
 * with a message for a bad prompt (bad UTF-8, template error, ...). */
int runner_prepare(runner *m, const char *prompt, const runner_msg *msgs, int32_t n,
                   int32_t **ret_ids, int32_t *ret_n, lm_err *err);
/* Start a generation: 0 and an id, -EAGAIN (queue full), -EINVAL, -ESHUTDOWN. */
int runner_generate(runner *m, const runner_gen *g, uint64_t *ret_id, lm_err *err);
void runner_cancel(runner *m, uint64_t id);
void runner_get_info(runner *m, runner_info *ret);
void runner_get_stats(runner *m, sched_stats *ret);
void runner_destroy(runner *m);

#endif
