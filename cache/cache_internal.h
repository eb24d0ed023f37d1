/*
 * cache_internal.h: what cache.c shares with its backends (cache_mem.c,
 * cache_redis.c) and helpers (cache_codec.c, cache_url.c). Not a public
 * contract: only files of cache/ include it.
 *
 * Backend return convention: get: 1 found (*val malloc'ed), 0 absent,
 * negative errno on failure (-ETIMEDOUT: deadline or timeout_ms; -EAGAIN:
 * skipped at once because the backend is DOWN and backing off; others:
 * connection or protocol errors). put: 0 or negative errno.
 */
#ifndef LIGHTMOE_CACHE_INTERNAL_H
#define LIGHTMOE_CACHE_INTERNAL_H

#include <stdatomic.h>

#include "cache/cache.h"

typedef struct cache_backend cache_backend;

/* Decide whether a stored value matches an invalidation; 1 = delete. */
typedef int (*cache_match_fn)(void *user, const uint8_t *val, size_t n);

/* One GET of a pipelined batch (get_many). The backend fills rc (as get's
 * return), val/n (malloc'ed on 1) and calls done once per op. The front
 * end sets the first four fields and zeroes the rest. */
typedef struct cache_bget {
    const char *key;
    size_t klen;
    int64_t deadline_ns;        /* 0 = only timeout_ms */
    void *user;                 /* the front end's */
    int rc;
    uint8_t *val;
    size_t n;
    /* the backend's, during one get_many: */
    int64_t until;              /* when this op's GET times out */
    int full;                   /* that bound is timeout_ms, not the caller's deadline */
    int fin;                    /* answered */
    int sent;                   /* ops[k].sent = the op of the k-th GET sent */
} cache_bget;

typedef void (*cache_bget_done_fn)(void *user, cache_bget *op);

typedef struct cache_backend_ops {
    int (*get)(cache_backend *b, const char *key, size_t klen, int64_t deadline_ns, uint8_t **val,
               size_t *n);
    int (*put)(cache_backend *b, const char *key, size_t klen, const uint8_t *val, size_t n,
               uint32_t ttl_s, int64_t deadline_ns);
    /* 1 deleted, 0 absent, negative errno. */
    int (*del)(cache_backend *b, const char *key, size_t klen, int64_t deadline_ns);
    /* Delete keys starting with key_prefix (a literal) for which match says
     * 1 (match NULL: all). */
    int (*scan_delete)(cache_backend *b, const char *key_prefix, size_t plen, cache_match_fn match,
                       void *mu, int64_t deadline_ns, uint64_t *ret_n, lm_err *err);
    void (*destroy)(cache_backend *b);
    /* Optional: GET every op in one pipeline (append all, flush, read all
     * replies); done(user, op) once per op on the calling thread, as soon as
     * its result is known (its reply, an error, or its own bound passing
     * while later ones still wait). NULL: the front end loops over get.
     * Streaming (cache_get_stream): ops has room for cap; when more_fd is
     * readable (more_fd >= 0), more(user, ops + n, cap - n) returns how many
     * ops it added there, to append to the same pipeline. */
    void (*get_many)(cache_backend *b, cache_bget *ops, int n, int cap, int more_fd,
                     int (*more)(void *user, cache_bget *ops, int max), cache_bget_done_fn done,
                     void *user);
} cache_backend_ops;

struct cache_backend {
    const cache_backend_ops *ops;
    cache *owner;
};

/* Called by a backend when its state changes (cache.c reports it once). */
void cache_report_state(cache *c, cache_state s, const char *why);
/* Count a skipped-at-once operation / an eviction (for stats). */
void cache_count_unavailable(cache *c);
void cache_count_evictions(cache *c, uint64_t n);

int cache_mem_create(cache *owner, const cache_config *cfg, cache_backend **ret, lm_err *err);
void cache_mem_usage(cache_backend *b, uint64_t *bytes, uint64_t *entries);
int cache_redis_create(cache *owner, const cache_config *cfg, const cache_url *url,
                       cache_backend **ret, lm_err *err);

uint32_t cache_crc32(const uint8_t *p, size_t n);

/* SHA-256 (cache_hash.c, OpenSSL libcrypto underneath). Usage:
 * cache_hash_begin, cache_hash_update any number of times, cache_hash_final
 * (which readies the same context for another digest), ..., cache_hash_end
 * (always, after a successful begin). begin: 0, -ENOMEM, or -EIO (libcrypto
 * has no SHA-256); final: 0 or -EIO. The struct is plain data on the
 * caller's stack; its ctx is libcrypto's and freed by cache_hash_end. */
#define CACHE_HASH_BYTES 32

typedef struct cache_hash {
    struct evp_md_ctx_st *ctx;  /* EVP_MD_CTX */
    size_t n;                   /* bytes staged in buf */
    int failed;                 /* an EVP call failed: final returns -EIO */
    uint8_t buf[512];           /* staged input, handed to libcrypto when full */
} cache_hash;

int cache_hash_begin(cache_hash *h);
void cache_hash_update(cache_hash *h, const void *p, size_t n);
int cache_hash_final(cache_hash *h, uint8_t out[CACHE_HASH_BYTES]);
void cache_hash_end(cache_hash *h);

/* Lower-case hex of d[0..n_bytes) into out (2 * n_bytes + 1 with the NUL). */
void cache_hex(const uint8_t *d, size_t n_bytes, char *out);

/* Prompt ids of an encoded value without decoding the rest: for matching
 * prefixes. Returns 0 and a pointer into a malloc'ed array, or -EBADMSG. */
int cache_value_prompt(const uint8_t *val, size_t n, int32_t **ret, int32_t *ret_n);

#endif
