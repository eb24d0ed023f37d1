/*
 * cache.h: the exact-answer cache in front of the engine.
 *
 * What: a finished generation (text, token ids, finish reason, usage,
 * logprobs) is stored under a key derived from everything that decides the
 * output; an identical later request is answered from the store without the
 * engine. Stores ("backends"): `memory` (in-process LRU bounded in bytes, the
 * default), `redis://[user:pass@]host:port/db`, `unix:///path[?db=N&user=U&
 * password=P]` (Redis over a unix socket), `off`.
 *
 * Key: "<prefix>v1:<M>:<P>:<D>" where
 *   M = 16 hex of SHA-256("model", model fingerprint): every key of one model
 *       shares "<prefix>v1:<M>:", so "invalidate this model" is one SCAN
 *       pattern, and a new fingerprint can never read an old model's answers;
 *   P = 16 hex of SHA-256 of the first N prompt token ids (N =
 *       cache_config.prefix_tokens, whole prompt when shorter);
 *   D = 64 hex of SHA-256 over a canonical encoding of (format version,
 *       model fingerprint, exact prompt ids, max_tokens, every sampling
 *       parameter, seed when it matters, stop strings, stop ids, ignore_eos,
 *       logprobs, caller "extra" bytes). Greedy requests (temperature 0)
 *       hash seed/top_k/top_p/min_p as neutral values, because sample.h
 *       promises that greedy ignores them: more hits, same answers.
 * Why P in the key rather than a secondary index: invalidation "by prompt
 * prefix" (L tokens) needs only a SCAN with pattern "<prefix>v1:<M>:<P>:*"
 * when L >= N, and every stored value carries its prompt ids, so candidates
 * are confirmed by decoding before deletion (and L < N falls back to the
 * model's keys, confirmed the same way). A secondary index (a Redis SET per
 * prefix) would need its own TTL and consistency with evictions: stale index
 * entries, two writes per store, and a non-atomic delete path. The key
 * approach has no second structure that can drift.
 *
 * Value: versioned compact binary (see cache_entry_encode), with a total
 * length and a CRC-32 so that a truncated or corrupt value decodes as an
 * error: counted, treated as a miss, and overwritten by the next store.
 *
 * Policy: only deterministic requests (temperature 0 or a caller-fixed seed)
 * are looked up and stored unless cache_config.cache_nondeterministic; the
 * request's mode picks use / bypass / refresh / no_store; TTL per request is
 * capped at max_ttl_s; values over max_value_bytes are not stored.
 *
 * Fail open: no function here turns a backend problem into a request error.
 * A Redis that is down, slow or answers errors gives misses (fast: after a
 * failure the backend backs off exponentially and fails immediately until
 * the next probe), counts errors, and flips cache_state, reported once per
 * change through cache_config.on_state (called on whichever thread saw the
 * change, with no lock held; it must not call back into the cache). Redis
 * operations are bounded by min(timeout_ms, the caller's deadline).
 *
 * Single flight: concurrent identical misses are computed once:
 * cache_flight_join makes the first caller the leader; the others wait for
 * what it publishes (or its failure, after which they compute themselves).
 *
 * Threads: every function is thread-safe. engine/ and cache/ never print.
 * Ownership: entries returned by cache_get / cache_flight_wait /
 * cache_entry_decode belong to the caller (cache_entry_free); entries passed
 * to cache_put / cache_flight_publish / cache_entry_encode are only read.
 * Redis backends set SIGPIPE to SIG_IGN if it was SIG_DFL (hiredis writes to
 * sockets with write(2); the gRPC core does the same).
 */
#ifndef LIGHTMOE_CACHE_H
#define LIGHTMOE_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "engine/sample.h"

#define CACHE_FORMAT_VERSION 1
#define CACHE_KEY_MAX 384          /* prefix (<= 256) + "v1:" + 16 + 1 + 16 + 1 + 64 + NUL */
#define CACHE_PREFIX_MAX 256

typedef struct cache cache;

typedef enum cache_mode {
    CACHE_MODE_USE = 0,         /* look up, store on a miss (default) */
    CACHE_MODE_BYPASS,          /* neither look up nor store */
    CACHE_MODE_REFRESH,         /* do not look up; recompute and overwrite */
    CACHE_MODE_NO_STORE,        /* look up; do not store on a miss */
} cache_mode;

typedef enum cache_state {
    CACHE_STATE_OK = 0,         /* backend answering (memory and off: always) */
    CACHE_STATE_DOWN,           /* unreachable, slow or failing: every lookup is a miss */
} cache_state;

typedef enum cache_backend_kind {
    CACHE_BACKEND_OFF = 0,
    CACHE_BACKEND_MEMORY,
    CACHE_BACKEND_REDIS,        /* TCP */
    CACHE_BACKEND_REDIS_UNIX,
} cache_backend_kind;

/* A parsed cache URL (plain data). */
typedef struct cache_url {
    cache_backend_kind kind;
    char host[256];             /* REDIS: name or address (IPv6 without brackets) */
    int port;                   /* REDIS: 6379 when absent */
    char path[108];             /* REDIS_UNIX: socket path (sun_path size) */
    int db;                     /* SELECT db, 0..INT32_MAX (0 when absent) */
    char user[128];             /* ACL user, "" = none (AUTH password only) */
    char password[256];         /* "" = no AUTH */
} cache_url;

/* "memory", "off", "redis://[user[:password]@]host[:port][/db]" (user may be
 * empty: "redis://:pw@h"), "unix:///abs/path[?db=N&user=U&password=P]".
 * %XX escapes are decoded in user and password. -EINVAL with a message
 * naming the problem otherwise. */
int cache_url_parse(const char *s, cache_url *ret, lm_err *err);

typedef void (*cache_state_fn)(void *user, cache_state state, const char *why);

typedef struct cache_config {
    const char *url;            /* see cache_url_parse; NULL = "memory" */
    const char *prefix;         /* key prefix ("lightmoe:"), copied, <= CACHE_PREFIX_MAX */
    uint32_t ttl_s;             /* default TTL (3600); 0 = no expiry */
    uint32_t max_ttl_s;         /* cap on per-request TTLs (86400); 0 = no cap */
    size_t max_value_bytes;     /* larger encoded values are not stored (1 MiB) */
    size_t memory_bytes;        /* memory backend: bound on keys + values + overhead (64 MiB) */
    int32_t pool_size;          /* Redis connections kept (4), 1..64 */
    int32_t timeout_ms;         /* cap on one Redis connect or command (50) */
    int32_t backoff_min_ms;     /* first wait after a failure (100) */
    int32_t backoff_max_ms;     /* back-off doubles up to this (5000) */
    int32_t prefix_tokens;      /* N of the key's prompt-prefix hash (16) */
    int cache_nondeterministic; /* also cache sampled requests without a fixed seed (0) */
    cache_state_fn on_state;    /* may be NULL */
    void *state_user;
} cache_config;

/* What decides the output of one request (all borrowed for the call). */
typedef struct cache_request {
    const char *model_fp;       /* model fingerprint (weights, tokenizer, template) */
    const int32_t *prompt;      /* [n_prompt] token ids of the rendered prompt */
    int32_t n_prompt;
    int32_t max_tokens;
    const sample_params *sampling; /* every field is part of the key */
    int seed_fixed;             /* the caller chose the seed: sampled output is reproducible */
    const int32_t *stop_ids;    /* [n_stop_ids] */
    int32_t n_stop_ids;
    const char *const *stop;    /* [n_stop] stop strings */
    int32_t n_stop;
    int ignore_eos;
    const void *extra;          /* [n_extra] other output-affecting options, caller-defined */
    size_t n_extra;
    cache_mode mode;
    uint32_t ttl_s;             /* 0 = the configured default; capped at max_ttl_s */
} cache_request;

/* The key and the decisions for one request (plain data, caller-owned). */
typedef struct cache_key {
    char str[CACHE_KEY_MAX];    /* backend key, NUL-terminated */
    size_t len;
    int lookup;                 /* look this request up */
    int store;                  /* store its result */
    uint32_t ttl_s;             /* effective TTL, 0 = none */
} cache_key;

/* One streamed piece of an answer: text bytes and the tokens that made them. */
typedef struct cache_chunk {
    uint32_t text_len;
    int32_t n_tokens;
} cache_chunk;

/* A generation result. Entries from the cache own their arrays (one block,
 * cache_entry_free); entries the caller builds for cache_put are borrowed. */
typedef struct cache_entry {
    const char *text;           /* [text_len] UTF-8; NUL-terminated in decoded entries */
    size_t text_len;
    const int32_t *tokens;      /* [n_tokens] generated ids */
    int32_t n_tokens;
    const int32_t *prompt;      /* [n_prompt] prompt ids (for prefix invalidation) */
    int32_t n_prompt;
    int32_t finish;             /* caller's finish code (sched_finish), >= 0 */
    int32_t prompt_tokens;      /* usage */
    int32_t completion_tokens;
    const sample_result *logprobs; /* [n_tokens] or NULL */
    const cache_chunk *chunks;  /* [n_chunks] how the answer was streamed, or NULL; the
                                   pieces add up to text_len and n_tokens exactly */
    int32_t n_chunks;
} cache_entry;

typedef struct cache_stats {
    cache_state state;
    cache_backend_kind kind;
    uint64_t hits, misses;      /* lookups made (bypassed ones are not counted) */
    uint64_t errors;            /* backend failures, timeouts included (each was a miss or a lost store) */
    uint64_t timeouts;          /* of which deadline or timeout_ms ran out */
    uint64_t corrupt;           /* values that failed to decode (each was a miss) */
    uint64_t unavailable;       /* lookups/stores skipped at once while DOWN (back-off) */
    uint64_t stores, store_skipped; /* stored; not stored (too big or failed) */
    uint64_t bypassed;          /* requests whose policy skipped the lookup */
    uint64_t bytes_read, bytes_written;
    uint64_t get_ns_sum, get_count; /* latency of lookups that reached a backend */
    uint64_t put_ns_sum, put_count;
    uint64_t flight_leaders, flight_followers, flight_failed;
    uint64_t invalidated;
    uint64_t state_changes;
    uint64_t mem_bytes, mem_entries, mem_evictions; /* memory backend */
} cache_stats;

void cache_config_default(cache_config *cfg);

/* Parse cfg->url and create the cache (no connection is made yet for Redis:
 * the first request connects, so a Redis that is down at start-up never
 * delays the daemon). -EINVAL with a message for bad configuration. */
int cache_create(const cache_config *cfg, cache **ret, lm_err *err);

/* Close connections and free. Flights must all be finished. NULL is fine. */
void cache_destroy(cache *c);

/* Build the key and apply the policy. -EINVAL (message) for a malformed
 * request (NULL prompt with n_prompt > 0, negative counts, NULL model_fp). */
int cache_key_make(const cache *c, const cache_request *r, cache_key *ret, lm_err *err);

/* Look up. 1 = hit (*ret set, caller frees), 0 = miss of any kind (absent,
 * policy, corrupt, backend down or slow). deadline_ns is CLOCK_MONOTONIC, 0
 * = only timeout_ms bounds it. */
int cache_get(cache *c, const cache_key *k, int64_t deadline_ns, cache_entry **ret);

/* Several lookups made together (a cache thread's, never a request's):
 * for Redis one pipeline on one connection (every GET appended and sent,
 * then the replies read), each op bounded by min(timeout_ms, its own
 * deadline_ns); other backends look up one by one. done(user, op, hit, e)
 * is called exactly once per op, on the calling thread, as soon as that
 * op's result is known (not necessarily in order): hit 1 with e (caller
 * frees), or 0 (miss of any kind, as cache_get) with e NULL. Ops whose
 * key says no lookup are answered 0 at once. Counted as cache_get. */
typedef struct cache_get_op {
    const cache_key *key;       /* read until done is called for this op */
    int64_t deadline_ns;        /* CLOCK_MONOTONIC, 0 = only timeout_ms */
    void *user;                 /* the caller's */
} cache_get_op;

typedef void (*cache_get_done_fn)(void *user, cache_get_op *op, int hit, cache_entry *e);

void cache_get_many(cache *c, cache_get_op *ops, int n, cache_get_done_fn done, void *user);

/* As cache_get_many, but the pipeline stays open to later lookups: while
 * replies are awaited, when more->fd is readable (an eventfd the caller
 * writes when it has queued lookups; the call reads it), more->take(user,
 * ops + k, max) is asked (without blocking) for up to max further ops,
 * written at ops[k..], and they are appended to the same pipeline. So a
 * lookup that arrives while Redis is slow waits only for its own bound,
 * not for the batch before it. ops has room for cap ops (n <= cap). Returns
 * when every op taken has been answered. scratch: cache_get_stream_scratch
 * (cap) bytes of work space the caller made once (a thread that streams
 * pipelines one after another), or NULL: allocated for this call. */
typedef struct cache_get_more {
    int fd;
    int (*take)(void *user, cache_get_op *ops, int max);
} cache_get_more;

size_t cache_get_stream_scratch(int cap);
void cache_get_stream(cache *c, cache_get_op *ops, int n, int cap, const cache_get_more *more,
                      void *scratch, cache_get_done_fn done, void *user);

/* Store (if k->store). 0 stored; -EPERM policy says no; -E2BIG over
 * max_value_bytes; -EINVAL bad entry (negative ids); other negative errno:
 * the backend failed (already counted; callers ignore it: fail open). */
int cache_put(cache *c, const cache_key *k, const cache_entry *e, int64_t deadline_ns);

/* Delete the entry of k (whatever its policy says). 1 deleted, 0 absent,
 * negative errno when the backend failed (returned, unlike lookups). */
int cache_delete(cache *c, const cache_key *k, int64_t deadline_ns, lm_err *err);

/* ---- single flight ------------------------------------------------------ */

typedef struct cache_flight cache_flight;

enum { CACHE_FLIGHT_LEADER = 1, CACHE_FLIGHT_FOLLOWER = 2 };

/* Join the flight of k->str. Returns CACHE_FLIGHT_LEADER (compute, store,
 * then cache_flight_publish) or CACHE_FLIGHT_FOLLOWER (cache_flight_wait),
 * or -ENOMEM. *ret is a reference released by publish / wait. */
int cache_flight_join(cache *c, const cache_key *k, cache_flight **ret);

/* Leader: hand the result to every follower (e == NULL: the computation
 * failed) and release the leader's reference. Later joiners of the same key
 * start a new flight (by then the result is in the store). */
void cache_flight_publish(cache *c, cache_flight *f, const cache_entry *e);

/* Follower: wait until the leader publishes or deadline_ns (0 = none).
 * 0 and *ret (caller frees); -EAGAIN the leader failed: compute yourself
 * (or join again); -ETIMEDOUT. Always releases the follower's reference. */
int cache_flight_wait(cache *c, cache_flight *f, int64_t deadline_ns, cache_entry **ret);

/* Follower, without a thread: instead of cache_flight_wait, park a waiter
 * (memory owned by the caller, valid until done is called or unpark
 * returns 1). done(w, rc, e) is called exactly once, by the thread that
 * publishes (or at once, from park, when the flight has already ended),
 * with no lock of the cache held: rc 0 and e (the callee frees it), or
 * -EAGAIN (the leader failed: compute yourself) with e NULL. done must not
 * block; it releases the follower's reference, and the cache does not touch
 * w after calling it. */
typedef struct cache_flight_waiter {
    void (*done)(struct cache_flight_waiter *w, int rc, cache_entry *e);
    struct cache_flight_waiter *next;   /* the cache's */
} cache_flight_waiter;

void cache_flight_park(cache *c, cache_flight *f, cache_flight_waiter *w);

/* Take a parked waiter back (its client left, its deadline passed): 1 when
 * removed before done was called (done never will be; the follower's
 * reference is released), 0 when done has been or is being called. */
int cache_flight_unpark(cache *c, cache_flight *f, cache_flight_waiter *w);

/* ---- admin -------------------------------------------------------------- */

/* Delete every entry of model_fp (n_prefix == 0), or those whose prompt
 * starts with prefix[0..n_prefix). *ret_n = entries deleted. Errors
 * (backend down, deadline) are returned here, unlike lookups. */
int cache_invalidate(cache *c, const char *model_fp, const int32_t *prefix, int32_t n_prefix,
                     int64_t deadline_ns, uint64_t *ret_n, lm_err *err);

void cache_get_stats(cache *c, cache_stats *ret);
const char *cache_state_name(cache_state s);
const char *cache_backend_name(cache_backend_kind k);

/* ---- value encoding (exposed for tests and tools) ----------------------- */

/* Encode e into a malloc'ed buffer (*ret, *ret_n). -EINVAL for negative ids
 * or n_top out of range, -ENOMEM. */
int cache_entry_encode(const cache_entry *e, uint8_t **ret, size_t *ret_n);

/* Decode; -EBADMSG (with a message) for anything malformed. */
int cache_entry_decode(const uint8_t *buf, size_t n, cache_entry **ret, lm_err *err);

void cache_entry_free(cache_entry *e);

/* Fingerprint of a model folder: SHA-256 (hex, 65 bytes with NUL) over the
 * small files that define behaviour (config.json, generation_config.json,
 * tokenizer.json, tokenizer_config.json, chat_template.jinja, quantize_config.json,
 * *.safetensors index) in full and, for each *.safetensors, its header, its size
 * and 16 samples of 4 KiB spread over the data (weights of several GB are not
 * read whole: a changed file of the same size and header that differs only
 * outside the samples is not noticed; operators can add a tag, see `extra`). */
int cache_fingerprint_dir(const char *dir, const char *tag, char out[65], lm_err *err);

/* Current CLOCK_MONOTONIC in ns (the clock of every deadline here). */
int64_t cache_now_ns(void);

#endif
