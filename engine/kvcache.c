/*
 * kvcache.c: paged KV block bookkeeping (see kvcache.h).
 *
 * Layout: per-block arrays indexed by block id (refcount, registered flag,
 * hash, parent hash, token ids, LRU links); a stack of FREE block ids; an
 * open-addressing table (linear probing, power-of-two capacity >= 2 x
 * n_blocks, so at most half full) from chain hash to block id. Deletion
 * uses backward shifting, so there are no tombstones and lookups stay
 * short however long the cache runs. Everything is allocated in create.
 */
#include "engine/kvcache.h"

#include <stdlib.h>
#include <string.h>

struct kvcache {
    int32_t n_blocks, block_size;
    int32_t *refcount;    /* [n_blocks] */
    uint8_t *registered;  /* [n_blocks] 1 if in the prefix table */
    uint64_t *hash;       /* [n_blocks] chain hash (registered blocks) */
    uint64_t *parent;     /* [n_blocks] parent's chain hash */
    int32_t *tokens;      /* [n_blocks][block_size] token ids (registered blocks) */
    int32_t *free_stack;  /* [n_blocks], n_free entries valid */
    int32_t n_free;
    int32_t *lru_prev;    /* [n_blocks] CACHED blocks, head = least recently used */
    int32_t *lru_next;
    int32_t lru_head, lru_tail, n_cached;
    int32_t n_used;
    int32_t *table;       /* [table_cap] block id or -1 */
    uint32_t table_mask;
};

int32_t kvcache_blocks_for_bytes(size_t bytes, size_t bytes_per_token, int32_t block_size)
{
    if (!bytes_per_token || block_size <= 0)
        return 0;
    size_t n = bytes / bytes_per_token / (size_t)block_size;
    return n > INT32_MAX / 2 ? INT32_MAX / 2 : (int32_t)n;
}

void kvcache_destroy(kvcache *kv)
{
    if (!kv)
        return;
    free(kv->refcount);
    free(kv->registered);
    free(kv->hash);
    free(kv->parent);
    free(kv->tokens);
    free(kv->free_stack);
    free(kv->lru_prev);
    free(kv->lru_next);
    free(kv->table);
    free(kv);
}

int kvcache_create(int32_t n_blocks, int32_t block_size, kvcache **ret, lm_err *err)
{
    if (n_blocks < 1 || block_size < 1 || n_blocks > (1 << 28) || block_size > 4096)
        return lm_err_set(err, -EINVAL, "kvcache: bad size: %d blocks of %d tokens (need >= 1)",
                          (int)n_blocks, (int)block_size);
    kvcache *kv = calloc(1, sizeof *kv);
    if (!kv)
        return lm_err_set(err, -ENOMEM, "kvcache: out of memory");
    size_t n = (size_t)n_blocks;
    uint32_t cap = 16;
    while (cap < 2 * (uint32_t)n_blocks)
        cap *= 2;
    kv->n_blocks = n_blocks;
    kv->block_size = block_size;
    kv->refcount = calloc(n, sizeof *kv->refcount);
    kv->registered = calloc(n, 1);
    kv->hash = calloc(n, sizeof *kv->hash);
    kv->parent = calloc(n, sizeof *kv->parent);
    kv->tokens = calloc(n * (size_t)block_size, sizeof *kv->tokens);
    kv->free_stack = malloc(n * sizeof *kv->free_stack);
    kv->lru_prev = malloc(n * sizeof *kv->lru_prev);
    kv->lru_next = malloc(n * sizeof *kv->lru_next);
    kv->table = malloc(cap * sizeof *kv->table);
    if (!kv->refcount || !kv->registered || !kv->hash || !kv->parent || !kv->tokens ||
        !kv->free_stack || !kv->lru_prev || !kv->lru_next || !kv->table) {
        kvcache_destroy(kv);
        return lm_err_set(err, -ENOMEM, "kvcache: out of memory for %d blocks", (int)n_blocks);
    }
    kv->table_mask = cap - 1;
    memset(kv->table, 0xff, cap * sizeof *kv->table);
    /* Stack order: block 0 is handed out first (easier to read in tests). */
    for (int32_t i = 0; i < n_blocks; i++)
        kv->free_stack[i] = n_blocks - 1 - i;
    kv->n_free = n_blocks;
    kv->lru_head = kv->lru_tail = -1;
    *ret = kv;
    return 0;
}

int32_t kvcache_block_size(const kvcache *kv)
{
    return kv->block_size;
}

int32_t kvcache_n_blocks(const kvcache *kv)
{
    return kv->n_blocks;
}

int32_t kvcache_available(const kvcache *kv)
{
    return kv->n_free + kv->n_cached;
}

int32_t kvcache_refcount(const kvcache *kv, int32_t block)
{
    return kv->refcount[block];
}

/* ---- LRU of CACHED blocks -------------------------------------------- */

static void lru_remove(kvcache *kv, int32_t b)
{
    int32_t p = kv->lru_prev[b], n = kv->lru_next[b];
    if (p >= 0)
        kv->lru_next[p] = n;
    else
        kv->lru_head = n;
    if (n >= 0)
        kv->lru_prev[n] = p;
    else
        kv->lru_tail = p;
    kv->n_cached--;
}

static void lru_push_tail(kvcache *kv, int32_t b)
{
    kv->lru_prev[b] = kv->lru_tail;
    kv->lru_next[b] = -1;
    if (kv->lru_tail >= 0)
        kv->lru_next[kv->lru_tail] = b;
    else
        kv->lru_head = b;
    kv->lru_tail = b;
    kv->n_cached++;
}

/* ---- prefix table ------------------------------------------------------ */

static uint32_t slot_of(const kvcache *kv, uint64_t h)
{
    return (uint32_t)(h ^ (h >> 32)) & kv->table_mask;
}

/* Remove block b (registered) from the table: find its slot, then shift
 * later entries of the probe run back so that no lookup run is broken. */
static void table_remove(kvcache *kv, int32_t b)
{
    uint32_t i = slot_of(kv, kv->hash[b]);
    while (kv->table[i] != b)
        i = (i + 1) & kv->table_mask;
    uint32_t hole = i;
    for (;;) {
        i = (i + 1) & kv->table_mask;
        int32_t e = kv->table[i];
        if (e < 0)
            break;
        uint32_t home = slot_of(kv, kv->hash[e]);
        /* e may move into the hole iff its home is not in (hole, i]. */
        int movable = hole <= i ? (home <= hole || home > i) : (home <= hole && home > i);
        if (movable) {
            kv->table[hole] = e;
            hole = i;
        }
    }
    kv->table[hole] = -1;
    kv->registered[b] = 0;
}

uint64_t kvcache_hash_block(uint64_t parent, const int32_t *tokens, int32_t n)
{
    /* Per token: xor in, then a 64-bit finaliser (murmur3 fmix64), so that
     * the order of tokens matters and every bit mixes. */
    uint64_t h = parent ^ (0x9e3779b97f4a7c15ull * (uint64_t)(n + 1));
    for (int32_t i = 0; i < n; i++) {
        h ^= (uint64_t)(uint32_t)tokens[i];
        h ^= h >> 33;
        h *= 0xff51afd7ed558ccdull;
        h ^= h >> 33;
        h *= 0xc4ceb9fe1a85ec53ull;
        h ^= h >> 33;
    }
    return h;
}

static int block_matches(const kvcache *kv, int32_t b, uint64_t hash, uint64_t parent,
                         const int32_t *tokens)
{
    return kv->hash[b] == hash && kv->parent[b] == parent &&
           !memcmp(kv->tokens + (size_t)b * kv->block_size, tokens,
                   (size_t)kv->block_size * sizeof *tokens);
}

int32_t kvcache_lookup(kvcache *kv, uint64_t hash, uint64_t parent, const int32_t *tokens)
{
    for (uint32_t i = slot_of(kv, hash);; i = (i + 1) & kv->table_mask) {
        int32_t b = kv->table[i];
        if (b < 0)
            return -1;
        if (kv->hash[b] != hash)
            continue;
        if (!block_matches(kv, b, hash, parent, tokens))
            return -1; /* same hash, other content: a collision counts as a miss */
        if (kv->refcount[b] == 0) {
            lru_remove(kv, b);
            kv->n_used++;
        }
        kv->refcount[b]++;
        return b;
    }
}

int kvcache_publish(kvcache *kv, int32_t block, uint64_t hash, uint64_t parent,
                    const int32_t *tokens)
{
    if (kv->registered[block] || kv->refcount[block] <= 0)
        return 0;
    uint32_t i = slot_of(kv, hash);
    for (; kv->table[i] >= 0; i = (i + 1) & kv->table_mask)
        if (kv->hash[kv->table[i]] == hash)
            return 0;
    kv->table[i] = block;
    kv->registered[block] = 1;
    kv->hash[block] = hash;
    kv->parent[block] = parent;
    memcpy(kv->tokens + (size_t)block * kv->block_size, tokens,
           (size_t)kv->block_size * sizeof *tokens);
    return 1;
}

/* ---- allocation ------------------------------------------------------- */

int32_t kvcache_alloc(kvcache *kv)
{
    int32_t b;
    if (kv->n_free > 0) {
        b = kv->free_stack[--kv->n_free];
    } else if (kv->lru_head >= 0) {
        b = kv->lru_head; /* evict the least recently used cached prefix block */
        lru_remove(kv, b);
        table_remove(kv, b);
    } else {
        return -1;
    }
    kv->refcount[b] = 1;
    kv->n_used++;
    return b;
}

void kvcache_release(kvcache *kv, int32_t block)
{
    if (--kv->refcount[block] > 0)
        return;
    kv->n_used--;
    if (kv->registered[block])
        lru_push_tail(kv, block);
    else
        kv->free_stack[kv->n_free++] = block;
}

void kvcache_get_stats(const kvcache *kv, kvcache_stats *ret)
{
    ret->total = kv->n_blocks;
    ret->free = kv->n_free;
    ret->used = kv->n_used;
    ret->cached = kv->n_cached;
}

int kvcache_check(const kvcache *kv, lm_err *err)
{
    int32_t used = 0, reg = 0, in_table = 0;
    for (int32_t b = 0; b < kv->n_blocks; b++) {
        if (kv->refcount[b] < 0)
            return lm_err_set(err, -EPROTO, "kvcache: block %d refcount %d", b, kv->refcount[b]);
        used += kv->refcount[b] > 0;
        reg += kv->registered[b];
    }
    for (uint32_t i = 0; i <= kv->table_mask; i++) {
        int32_t b = kv->table[i];
        if (b < 0)
            continue;
        in_table++;
        if (!kv->registered[b])
            return lm_err_set(err, -EPROTO, "kvcache: block %d in table, not registered", b);
    }
    if (in_table != reg)
        return lm_err_set(err, -EPROTO, "kvcache: %d table entries, %d registered", in_table,
                          reg);
    int32_t n_lru = 0;
    for (int32_t b = kv->lru_head, p = -1; b >= 0; p = b, b = kv->lru_next[b]) {
        if (kv->lru_prev[b] != p || kv->refcount[b] != 0 || !kv->registered[b] ||
            ++n_lru > kv->n_blocks)
            return lm_err_set(err, -EPROTO, "kvcache: LRU list broken at block %d", b);
    }
    for (int32_t i = 0; i < kv->n_free; i++) {
        int32_t b = kv->free_stack[i];
        if (kv->refcount[b] != 0 || kv->registered[b])
            return lm_err_set(err, -EPROTO, "kvcache: free block %d refcount %d registered %d",
                              b, kv->refcount[b], kv->registered[b]);
    }
    if (used != kv->n_used || n_lru != kv->n_cached ||
        kv->n_free + kv->n_used + kv->n_cached != kv->n_blocks)
        return lm_err_set(err, -EPROTO,
                          "kvcache: counts: free %d + used %d (seen %d) + cached %d (seen %d) != %d",
                          kv->n_free, kv->n_used, used, kv->n_cached, n_lru, kv->n_blocks);
    return 0;
}
