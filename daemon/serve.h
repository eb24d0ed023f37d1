/*
 * serve.h: the request path of lightmoed, below gRPC and above the engine.
 *
 * rpc_api.c turns a decoded GenerateRequest into a serve_request and calls
 * serve_generate; serve checks the limits, renders and tokenizes the prompt
 * (runner.h), asks the exact-answer cache, submits to the engine, forwards
 * text deltas to the caller's sink, and stores the finished answer in the
 * cache. No gRPC type appears here: status codes are st_code (status.h).
 *
 *   serve_generate
 *     1. admission: draining/loading -> UNAVAILABLE, too many calls ->
 *        RESOURCE_EXHAUSTED, bad fields -> INVALID_ARGUMENT
 *     2. render (chat template) + tokenize; prompt limits
 *     3. CACHE LOOKUP HOOK  hooks.lookup_async (or hooks.lookup) unless
 *        cache_mode is BYPASS or REFRESH; a hit answers from the cache
 *        (cached = 1); a request identical to one in flight, or whose lookup
 *        needs Redis, is parked (no
 *        thread waits) and resumed when that one ends: with its answer,
 *        or to compute by itself, or to end (cancelled, deadline)
 *     4. engine: runner_generate; deltas -> sink.on_delta
 *     5. CACHE STORE HOOK   hooks.store(key, answer) when the answer is
 *        complete (finish stop or length) and cache_mode is USE or REFRESH
 *     6. sink.on_final exactly once
 *
 * Threads: serve_generate runs on an RPC thread and may call the sink
 * before it returns (a cache hit answers at once), so the caller must not
 * hold a lock the sink takes. Later sink calls come from the engine thread,
 * the cache's thread (a parked request resumed) or the thread that called
 * serve_cancel (a parked request cancelled), and must not block.
 * serve_cancel is safe from any thread at any time.
 */
#ifndef LIGHTMOE_DAEMON_SERVE_H
#define LIGHTMOE_DAEMON_SERVE_H

#include <stddef.h>
#include <stdint.h>

#include "daemon/config.h"
#include "daemon/runner.h"
#include "daemon/status.h"
#include "engine/sample.h"

typedef struct serve serve;

typedef enum serve_cache_mode {
    SERVE_CACHE_USE = 0,
    SERVE_CACHE_BYPASS = 1,
    SERVE_CACHE_REFRESH = 2,
    SERVE_CACHE_NO_STORE = 3,
} serve_cache_mode;

typedef struct serve_request {
    const char *request_id;         /* never NULL */
    const char *prompt;             /* raw text, or NULL/"" when messages are given */
    const runner_msg *messages;
    int32_t n_messages;
    int32_t max_tokens;             /* checked: 1..max_tokens_limit */
    int has_max_tokens;             /* 0: use default_max_tokens */
    sample_params sampling;         /* resolved defaults; checked by serve */
    const char *const *stop;        /* stop strings */
    int32_t n_stop;
    int64_t deadline_ns;            /* CLOCK_MONOTONIC; 0 = none */
    int64_t arrival_ns;             /* CLOCK_MONOTONIC */
    serve_cache_mode cache_mode;
    uint32_t cache_ttl_seconds;     /* 0 = cache_ttl_seconds of the config */
    int has_seed;                   /* the caller chose the seed (sampling is reproducible) */
} serve_request;

typedef struct serve_delta {
    const char *text;               /* UTF-8 piece, not NUL-terminated */
    size_t len;
    const int32_t *token_ids;       /* tokens that completed this piece */
    int32_t n_tokens;
    const sample_result *logprobs;  /* [n_tokens] when logprobs were asked, else NULL */
} serve_delta;

typedef struct serve_final {
    st_code code;                   /* OK, or why the request failed */
    const char *message;            /* for code != OK */
    const char *finish_reason;      /* "stop", "length", "cancelled", "deadline", "error" */
    int32_t prompt_tokens, completion_tokens, cached_prompt_tokens;
    double ttft_s, total_s;
    int cached;                     /* answered by the exact-answer cache */
} serve_final;

typedef struct serve_sink {
    void (*on_delta)(void *user, const serve_delta *d);
    void (*on_final)(void *user, const serve_final *f);   /* last call; exactly once */
} serve_sink;

/* ---- exact-answer cache hooks (implemented by the cache module) -------- */

/* What identifies an answer: the model, the exact prompt tokens and every
 * parameter that changes the output. */
typedef struct serve_cache_key {
    const char *model_id;           /* model name + checksum of config.json */
    const int32_t *prompt_ids;
    int32_t n_prompt;
    int32_t max_tokens;             /* resolved: default applied, clamped to the context */
    const serve_request *req;       /* sampling, stop, logprobs, ... */
} serve_cache_key;

/* One streamed piece of an answer (so that a hit replays the same chunks). */
typedef struct serve_chunk {
    uint32_t len;                   /* text bytes */
    int32_t n_tokens;
} serve_chunk;

typedef struct serve_answer {
    const char *text;
    size_t len;
    const int32_t *token_ids;
    int32_t n_tokens;
    const char *finish_reason;      /* "stop" or "length" */
    int32_t prompt_tokens, completion_tokens;
    const serve_chunk *chunks;      /* [n_chunks] adding up to len and n_tokens; NULL: one piece */
    int32_t n_chunks;
    const sample_result *logprobs;  /* [n_tokens] when the request asked for logprobs, else NULL */
    void *priv;                     /* the hook's (lookup -> release) */
} serve_answer;

/* lookup_async: the request was parked (see below). */
#define SERVE_CACHE_PARKED 2

/* Resumes a parked request: hit 1 with *ans filled (released by the hook's
 * release), or 0 (no answer: compute, or end if cancelled / past the
 * deadline). */
typedef void (*serve_cache_resume_fn)(void *ctx, int hit, serve_answer *ans);

typedef struct serve_cache_hooks {
    void *user;
    /* 1 on a hit with *ret filled (strings/arrays owned by the hook until
     * release is called), 0 on a miss, < 0 on an error (logged, treated as
     * a miss). Must return by deadline_ns (0 = none) and cache_timeout_ms. */
    int (*lookup)(void *user, const serve_cache_key *key, int64_t deadline_ns,
                  serve_answer *ret);
    void (*release)(void *user, serve_answer *ans);
    /* Called on the engine thread: must not block (queue the write). */
    void (*store)(void *user, const serve_cache_key *key, const serve_answer *ans,
                  uint32_t ttl_seconds);
    /* key == NULL: drop everything of this model. Returns entries removed
     * or a negative errno with msg filled. */
    int64_t (*invalidate)(void *user, const serve_cache_key *key, char *msg, size_t msglen);
    /* SIGHUP: the cache_* keys that may change. */
    void (*reconfigure)(void *user, const daemon_config *cfg);
    void (*destroy)(void *user);
    /* Called once when a request that was looked up and not answered from
     * the cache ends (after store, if any; also when it ends without an
     * answer, parked ones included): the single-flight leader's followers
     * stop waiting. May be NULL. Any thread, must not block. */
    void (*finish)(void *user, const serve_request *req);
    /* Drop every entry whose prompt starts with ids[0..n). Entries removed
     * or a negative errno with msg filled. May be NULL. */
    int64_t (*invalidate_prefix)(void *user, const int32_t *ids, int32_t n, char *msg,
                                 size_t msglen);
    /* Optional; used instead of lookup when set. As lookup, except that a
     * request identical to one in flight, or one whose lookup needs I/O
     * (Redis), does not wait: it returns SERVE_CACHE_PARKED with
     * *ret_ticket set, and resume(ctx, ...) is then called exactly once, on
     * the hook's own thread (never from inside lookup_async), when the
     * answer is known (hit), the leader failed, the lookup missed or
     * deadline_ns has passed (no hit) -- unless unpark(ticket) returned 1
     * first. key is only read during the call. */
    int (*lookup_async)(void *user, const serve_cache_key *key, int64_t deadline_ns,
                        serve_answer *ret, serve_cache_resume_fn resume, void *ctx,
                        uint64_t *ret_ticket);
    /* Take a parked request back: 1 removed (resume will not be called), 0
     * resume has been or will be called. Any thread, never blocks long. */
    int (*unpark)(void *user, uint64_t ticket);
} serve_cache_hooks;

/* ---- lifecycle ---------------------------------------------------------- */

/* Create with the limits of cfg (copied). The model comes later. */
int serve_create(const daemon_config *cfg, serve **ret);
/* Hand the loaded model over (owned by the caller; must outlive serve's
 * use of it: detach before destroying the model). */
void serve_attach_model(serve *s, runner *m);
/* Install cache hooks (copied); NULL removes them. Before serving starts. */
void serve_set_cache_hooks(serve *s, const serve_cache_hooks *hooks);
/* SIGHUP: new limits and cache settings. */
void serve_reconfigure(serve *s, const daemon_config *cfg);
/* Refuse new requests with UNAVAILABLE (draining). */
void serve_set_draining(serve *s);
/* Cancel every running request; each ends with code and message. */
void serve_cancel_all(serve *s, st_code code, const char *message);
/* Requests in progress. */
int serve_active(serve *s);
void serve_destroy(serve *s);

/* ---- requests ------------------------------------------------------------ */

/* Start a request. On success returns ST_OK and a job id for serve_cancel;
 * the sink is then called (perhaps before this returns). On failure returns
 * the code, writes an actionable message and never calls the sink. */
st_code serve_generate(serve *s, const serve_request *req, const serve_sink *sink, void *user,
                       uint64_t *ret_job, char *msg, size_t msglen);
/* Stop a job; its on_final (finish "cancelled", code `code`) follows soon.
 * Unknown or finished jobs are ignored. Any thread. */
void serve_cancel(serve *s, uint64_t job, st_code code, const char *message);

/* Tokenize text or rendered messages. ids/rendered are malloc'ed (caller frees). */
st_code serve_tokenize(serve *s, const char *text, const runner_msg *msgs, int32_t n_msgs,
                       int32_t **ret_ids, int32_t *ret_n, char **ret_rendered, char *msg,
                       size_t msglen);
st_code serve_model_info(serve *s, runner_info *ret, char *msg, size_t msglen);
st_code serve_invalidate(serve *s, int all, const serve_request *req, int64_t *ret_removed,
                         char *msg, size_t msglen);
/* Drop every cached answer whose prompt starts with ids[0..n). */
st_code serve_invalidate_prefix(serve *s, const int32_t *ids, int32_t n, int64_t *ret_removed,
                                char *msg, size_t msglen);

#endif
