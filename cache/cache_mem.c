/*
 * cache_mem.c: the in-process backend: an LRU bounded in bytes.
 *
 * 16 shards, each a chained hash table plus a doubly linked LRU list under
 * its own mutex, so that lookups from many gRPC threads rarely contend. The
 * bound is split evenly: each shard keeps its own bytes (nodes with their
 * key and value, plus its bucket array) <= memory_bytes / 16, evicting from
 * its LRU tail; the total therefore never passes memory_bytes. Eviction
 * order is LRU per shard (an approximation of global LRU; keys are SHA-256
 * hex so they spread evenly). Expired entries are dropped when touched and
 * pushed out by eviction otherwise. Values are copied in and out: callers
 * never hold pointers into the table.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cache/cache_internal.h"

#define SHARDS 16

typedef struct mnode {
    struct mnode *hnext;        /* hash chain */
    struct mnode *prev, *next;  /* LRU list, head = most recent */
    uint64_t hash;
    int64_t expires_ns;         /* CLOCK_MONOTONIC, 0 = never */
    size_t klen, vlen;
    uint8_t data[];             /* key bytes then value bytes */
} mnode;

typedef struct shard {
    pthread_mutex_t mu;
    mnode **buckets;            /* [nb] */
    size_t nb, count, bytes;
    mnode lru;                  /* sentinel */
} shard;

typedef struct mem_backend {
    cache_backend base;
    size_t bound;               /* per shard */
    shard sh[SHARDS];
} mem_backend;

static uint64_t fnv1a(const char *k, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)k[i]) * 1099511628211ull;
    return h;
}

static size_t node_bytes(size_t klen, size_t vlen) { return sizeof(mnode) + klen + vlen; }

static void lru_unlink(mnode *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
}

static void lru_push_head(shard *s, mnode *n)
{
    n->next = s->lru.next;
    n->prev = &s->lru;
    s->lru.next->prev = n;
    s->lru.next = n;
}

static mnode **find_slot(shard *s, const char *key, size_t klen, uint64_t h)
{
    mnode **pp = &s->buckets[h & (s->nb - 1)];
    for (; *pp; pp = &(*pp)->hnext)
        if ((*pp)->hash == h && (*pp)->klen == klen && !memcmp((*pp)->data, key, klen))
            return pp;
    return pp;
}

/* Unlink from chain (pp points at it) and LRU, free, account. */
static void remove_node(shard *s, mnode **pp)
{
    mnode *n = *pp;
    *pp = n->hnext;
    lru_unlink(n);
    s->bytes -= node_bytes(n->klen, n->vlen);
    s->count--;
    free(n);
}

static void remove_by_ptr(shard *s, mnode *n)
{
    mnode **pp = &s->buckets[n->hash & (s->nb - 1)];
    while (*pp != n)
        pp = &(*pp)->hnext;
    remove_node(s, pp);
}

/* Double the bucket array if it fits the bound (a fuller table only costs speed). */
static void maybe_grow(mem_backend *m, shard *s)
{
    if (s->count <= s->nb)
        return;
    size_t nb = s->nb * 2, add = (nb - s->nb) * sizeof(mnode *);
    if (s->bytes + add > m->bound / 2)
        return;
    mnode **nbk = calloc(nb, sizeof *nbk);
    if (!nbk)
        return;
    for (size_t i = 0; i < s->nb; i++) {
        for (mnode *n = s->buckets[i], *nx; n; n = nx) {
            nx = n->hnext;
            n->hnext = nbk[n->hash & (nb - 1)];
            nbk[n->hash & (nb - 1)] = n;
        }
    }
    free(s->buckets);
    s->buckets = nbk;
    s->bytes += add;
    s->nb = nb;
}

static int mem_get(cache_backend *b, const char *key, size_t klen, int64_t deadline_ns,
                   uint8_t **val, size_t *n)
{
    mem_backend *m = (mem_backend *)b;
    uint64_t h = fnv1a(key, klen);
    shard *s = &m->sh[h % SHARDS];
    int rc = 0;
    pthread_mutex_lock(&s->mu);
    mnode **pp = find_slot(s, key, klen, h);
    if (*pp) {
        mnode *nd = *pp;
        if (nd->expires_ns && cache_now_ns() >= nd->expires_ns) {
            remove_node(s, pp);
        } else {
            uint8_t *v = malloc(nd->vlen ? nd->vlen : 1);
            if (!v) {
                rc = -ENOMEM;
            } else {
                memcpy(v, nd->data + nd->klen, nd->vlen);
                *val = v;
                *n = nd->vlen;
                lru_unlink(nd);
                lru_push_head(s, nd);
                rc = 1;
            }
        }
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int mem_put(cache_backend *b, const char *key, size_t klen, const uint8_t *val, size_t n,
                   uint32_t ttl_s, int64_t deadline_ns)
{
    mem_backend *m = (mem_backend *)b;
    size_t need = node_bytes(klen, n);
    uint64_t h = fnv1a(key, klen);
    shard *s = &m->sh[h % SHARDS];
    if (need > m->bound / 2) /* buckets take at most the other half: see maybe_grow */
        return -E2BIG;
    mnode *nd = malloc(need);
    if (!nd)
        return -ENOMEM;
    nd->hash = h;
    nd->klen = klen;
    nd->vlen = n;
    nd->expires_ns = ttl_s ? cache_now_ns() + (int64_t)ttl_s * 1000000000 : 0;
    memcpy(nd->data, key, klen);
    memcpy(nd->data + klen, val, n);
    uint64_t evicted = 0;
    pthread_mutex_lock(&s->mu);
    mnode **pp = find_slot(s, key, klen, h);
    if (*pp)
        remove_node(s, pp);
    while (s->count && s->bytes + need > m->bound) {
        remove_by_ptr(s, s->lru.prev);
        evicted++;
    }
    pp = &s->buckets[h & (s->nb - 1)];
    nd->hnext = *pp;
    *pp = nd;
    lru_push_head(s, nd);
    s->count++;
    s->bytes += need;
    maybe_grow(m, s);
    pthread_mutex_unlock(&s->mu);
    if (evicted)
        cache_count_evictions(b->owner, evicted);
    return 0;
}

static int mem_del(cache_backend *b, const char *key, size_t klen, int64_t deadline_ns)
{
    mem_backend *m = (mem_backend *)b;
    uint64_t h = fnv1a(key, klen);
    shard *s = &m->sh[h % SHARDS];
    pthread_mutex_lock(&s->mu);
    mnode **pp = find_slot(s, key, klen, h);
    int found = *pp != NULL;
    if (found)
        remove_node(s, pp);
    pthread_mutex_unlock(&s->mu);
    return found;
}

static int mem_scan_delete(cache_backend *b, const char *key_prefix, size_t plen,
                           cache_match_fn match, void *mu, int64_t deadline_ns, uint64_t *ret_n,
                           lm_err *err)
{
    mem_backend *m = (mem_backend *)b;
    uint64_t n = 0;
    for (int i = 0; i < SHARDS; i++) {
        shard *s = &m->sh[i];
        pthread_mutex_lock(&s->mu);
        for (mnode *nd = s->lru.next, *nx; nd != &s->lru; nd = nx) {
            nx = nd->next;
            if (nd->klen >= plen && !memcmp(nd->data, key_prefix, plen) &&
                (!match || match(mu, nd->data + nd->klen, nd->vlen))) {
                remove_by_ptr(s, nd);
                n++;
            }
        }
        pthread_mutex_unlock(&s->mu);
    }
    *ret_n = n;
    return 0;
}

static void mem_destroy(cache_backend *b)
{
    mem_backend *m = (mem_backend *)b;
    for (int i = 0; i < SHARDS; i++) {
        shard *s = &m->sh[i];
        for (mnode *nd = s->lru.next, *nx; nd != &s->lru; nd = nx) {
            nx = nd->next;
            free(nd);
        }
        free(s->buckets);
        pthread_mutex_destroy(&s->mu);
    }
    free(m);
}

void cache_mem_usage(cache_backend *b, uint64_t *bytes, uint64_t *entries)
{
    mem_backend *m = (mem_backend *)b;
    uint64_t by = 0, en = 0;
    for (int i = 0; i < SHARDS; i++) {
        pthread_mutex_lock(&m->sh[i].mu);
        by += m->sh[i].bytes;
        en += m->sh[i].count;
        pthread_mutex_unlock(&m->sh[i].mu);
    }
    *bytes = by;
    *entries = en;
}

static const cache_backend_ops mem_ops = {mem_get, mem_put, mem_del, mem_scan_delete, mem_destroy,
                                         NULL};

int cache_mem_create(cache *owner, const cache_config *cfg, cache_backend **ret, lm_err *err)
{
    size_t per = cfg->memory_bytes / SHARDS;
    if (per < 4096)
        return lm_err_set(err, -EINVAL, "cache memory bound %zu bytes is too small (>= %d)",
                          cfg->memory_bytes, 4096 * SHARDS);
    mem_backend *m = calloc(1, sizeof *m);
    if (!m)
        return lm_err_set(err, -ENOMEM, "cache: out of memory");
    m->base.ops = &mem_ops;
    m->base.owner = owner;
    m->bound = per;
    for (int i = 0; i < SHARDS; i++) {
        shard *s = &m->sh[i];
        pthread_mutex_init(&s->mu, NULL);
        s->nb = 16;
        s->buckets = calloc(s->nb, sizeof *s->buckets);
        s->bytes = s->nb * sizeof(mnode *);
        s->lru.next = s->lru.prev = &s->lru;
        if (!s->buckets) {
            for (int j = 0; j <= i; j++)
                pthread_mutex_destroy(&m->sh[j].mu), free(m->sh[j].buckets);
            free(m);
            return lm_err_set(err, -ENOMEM, "cache: out of memory");
        }
    }
    *ret = &m->base;
    return 0;
}
