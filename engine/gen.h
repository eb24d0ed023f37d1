/*
 * gen.h: text generation, the text side of the scheduler. A request in
 * text (a prompt, or chat messages) becomes token ids (chat template, then
 * tokenizer), is submitted to the scheduler, and its token events come back
 * as text deltas.
 *
 * What gen adds on top of sched.h:
 *   - prompts: chat messages are rendered with the model's chat template
 *     and encoded WITHOUT special tokens (the template writes BOS itself,
 *     as apply_chat_template does); a plain prompt is encoded WITH them
 *     (BOS/EOS as the tokenizer's post-processor adds them);
 *   - streaming detokenization: deltas are whole UTF-8 characters, and the
 *     concatenation of every delta equals decoding the output ids (minus
 *     what stop handling removes, below);
 *   - stop strings, matched on the text across token boundaries: text that
 *     could still be the start of a stop string is held back; on a match
 *     the scheduler request is cancelled, the stop string and everything
 *     after it are never emitted, and the request finishes with
 *     SCHED_FINISH_STOP (gen_event.stop says which string);
 *   - EOS and stop ids (the model's eos ids given at gen_create plus the
 *     request's stop_ids) finish with SCHED_FINISH_STOP; their text is not
 *     emitted.
 *
 * Events: for every generated token one GEN_EVENT_DELTA (text may be empty
 * when it is held back or the token is EOS), then exactly one
 * GEN_EVENT_FINISHED whose text is the held-back rest that turned out not
 * to be a stop string (usually empty). Token counts in FINISHED include
 * the token that completed a stop string; tokens the scheduler produced
 * after that (before the cancel took effect) are dropped and not counted.
 *
 * Threads: gen_submit, gen_cancel and gen_prepare may be called from any
 * thread. Callbacks run on the scheduler's engine thread, one request's
 * events in order; they must not block (hand the event to another thread)
 * and may call gen_cancel. Event pointers (text, tok) are valid only during
 * the callback. After FINISHED gen never touches the request's `user`
 * again.
 *
 * Ownership: a gen borrows its tokenizer, chat template and scheduler
 * (they must outlive it). gen_submit copies what it needs from the request.
 * Destroy order: sched_destroy first (it finishes every request), then
 * gen_destroy.
 */
#ifndef LIGHTMOE_GEN_H
#define LIGHTMOE_GEN_H

#include <stddef.h>
#include <stdint.h>

#include "engine/chat.h"
#include "engine/err.h"
#include "engine/sample.h"
#include "engine/sched.h"
#include "engine/tokenizer.h"

#define GEN_MAX_STOP 16         /* stop strings per request */
#define GEN_MAX_STOP_LEN 256    /* bytes per stop string */

typedef struct gen gen;

typedef struct gen_config {
    const tokenizer *tok;       /* required, borrowed */
    const chat_template *tmpl;  /* borrowed; NULL: chat requests are refused */
    sched *sched;               /* required, borrowed */
    const int32_t *eos_ids;     /* the model's EOS ids (model_config.eos_ids), copied */
    int32_t n_eos_ids;
} gen_config;

typedef enum gen_event_type {
    GEN_EVENT_DELTA = 1,        /* one generated token and the text it released */
    GEN_EVENT_FINISHED,         /* last event of a request */
} gen_event_type;

typedef struct gen_event {
    gen_event_type type;
    uint64_t id;                /* from gen_submit */
    const char *text;           /* new text (valid UTF-8, not NUL-terminated), len may be 0 */
    size_t len;
    const sample_result *tok;   /* DELTA: the token and its logprobs */
    sched_finish finish;        /* FINISHED: STOP (EOS, stop id or stop string), LENGTH, ... */
    const char *stop;           /* FINISHED by a stop string: that string; else NULL */
    int32_t stop_token;         /* FINISHED by EOS or a stop id: that id; else -1 */
    int32_t prompt_tokens;      /* FINISHED: usage */
    int32_t completion_tokens;
    int32_t cached_prompt_tokens;
    const char *message;        /* FINISHED with ERROR: why */
} gen_event;

typedef void (*gen_event_fn)(void *user, const gen_event *ev);

typedef struct gen_request {
    /* The prompt: exactly one of these three. */
    const char *prompt;                 /* plain text (a completion) */
    const chat_message *messages;       /* chat messages [n_messages] */
    int32_t n_messages;
    const int32_t *prompt_ids;          /* already tokenized [n_prompt_ids] */
    int32_t n_prompt_ids;

    /* Chat only. */
    int add_generation_prompt;          /* 1 (default) */
    const char *chat_extra_json;        /* extra template variables, JSON object text, or NULL */

    int32_t max_tokens;                 /* > 0 */
    sample_params sampling;
    const char *const *stop;            /* stop strings [n_stop] (<= GEN_MAX_STOP), copied */
    int32_t n_stop;
    const int32_t *stop_ids;            /* extra stop token ids [n_stop_ids], copied */
    int32_t n_stop_ids;
    int ignore_eos;                     /* do not stop at the model's EOS ids */
    int skip_special_tokens;            /* 1 (default): special tokens add no text */
    int64_t deadline_ns;                /* CLOCK_MONOTONIC, 0 = none */

    gen_event_fn on_event;
    void *user;
} gen_request;

/* Defaults: no prompt, add_generation_prompt 1, max_tokens 16, greedy
 * sampling (sample_params_default), skip_special_tokens 1. */
void gen_request_default(gen_request *req);

int gen_create(const gen_config *cfg, gen **ret, lm_err *err);

/* Accepts NULL. Every request must have finished (see Ownership). */
void gen_destroy(gen *g);

/*
 * The prompt ids a request would be submitted with (chat rendering and
 * tokenization, no submission): for token counting, cache keys and the
 * CLI. *ret_ids is malloc'ed (caller frees). -EINVAL with a message for a
 * bad request (no prompt, two prompts, template error, bad UTF-8, ...).
 */
int gen_prepare(gen *g, const gen_request *req, int32_t **ret_ids, int32_t *ret_n, lm_err *err);

/*
 * Validate, prepare and submit. Returns 0 and the request id, or the
 * errors of gen_prepare and sched_submit (-EAGAIN overloaded, -EINVAL,
 * -ESHUTDOWN). On error no event is ever delivered.
 */
int gen_submit(gen *g, const gen_request *req, uint64_t *ret_id, lm_err *err);

/* Cancel; FINISHED(CANCELLED) follows (unless the request finished on its
 * own first). -ENOENT for unknown or finished ids. Any thread, including
 * from a callback. */
int gen_cancel(gen *g, uint64_t id);

#endif
