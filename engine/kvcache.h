/*
 * kvcache.h: the paged KV block manager (bookkeeping only; the KV memory
 * itself lives in the backend, see backend.h).
 *
 * The cache has n_blocks blocks of block_size token slots. Every block is in
 * exactly one of three states:
 *   FREE    on the free list, refcount 0, not in the prefix table;
 *   USED    refcount > 0 (held by one or more sequences' block tables);
 *   CACHED  refcount 0 but registered in the prefix table, kept in an LRU
 *           list so that a later request with the same prefix can take it
 *           back instead of recomputing it.
 * kvcache_alloc takes a FREE block, or when none is left evicts the least
 * recently released CACHED block (it leaves the prefix table). So the
 * blocks a caller can obtain right now are FREE + CACHED
 * (kvcache_available).
 *
 * Prefix caching: a FULL block (all block_size slots written) can be
 * registered (kvcache_publish) under the chain hash of its content,
 * hash_i = kvcache_hash_block(hash_{i-1}, tokens of block i), with
 * hash_{-1} = KVCACHE_HASH_ROOT. Because the hash covers the whole prefix,
 * two sequences whose first k blocks hash alike hold identical KV in them,
 * and may share the block by reference count. The table also keeps each
 * block's parent hash and token ids and compares them on lookup, so a hash
 * collision is a miss, never wrong KV. Only full blocks are shared, and a
 * shared block is never written again (a sequence only writes positions
 * past its own shared prefix), so copy-on-write is never needed.
 *
 * Ownership and threads: a kvcache is plain memory, allocated once at
 * create; no call allocates afterwards. It is used by one thread (the
 * engine thread of the scheduler); no locking.
 */
#ifndef LIGHTMOE_KVCACHE_H
#define LIGHTMOE_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

#define KVCACHE_HASH_ROOT 0x6c696768746d6f65ull /* "lightmoe" */

typedef struct kvcache kvcache;

typedef struct kvcache_stats {
    int32_t total;  /* n_blocks */
    int32_t free;   /* on the free list */
    int32_t used;   /* refcount > 0 */
    int32_t cached; /* refcount 0, in the prefix table (reclaimable) */
} kvcache_stats;

/*
 * How many blocks a budget buys: bytes / (bytes_per_token * block_size).
 * Returns the count (>= 0); 0 when a size is 0.
 */
int32_t kvcache_blocks_for_bytes(size_t bytes, size_t bytes_per_token, int32_t block_size);

/* Create a manager of n_blocks (>= 1) blocks of block_size (>= 1) slots.
 * All blocks start FREE. -EINVAL on bad sizes, -ENOMEM. */
int kvcache_create(int32_t n_blocks, int32_t block_size, kvcache **ret, lm_err *err);
void kvcache_destroy(kvcache *kv);

int32_t kvcache_block_size(const kvcache *kv);
int32_t kvcache_n_blocks(const kvcache *kv);
/* FREE + CACHED: how many kvcache_alloc calls will succeed now. */
int32_t kvcache_available(const kvcache *kv);

/* Take a block (refcount 1, not registered): a FREE one, else the least
 * recently used CACHED one. Returns the block id, or -1 when every block is
 * USED. */
int32_t kvcache_alloc(kvcache *kv);

/* Drop one reference. At refcount 0 a registered block becomes CACHED (most
 * recently used end of the LRU), an unregistered one FREE. */
void kvcache_release(kvcache *kv, int32_t block);

/* Chain hash of one full block: its parent's hash and its n token ids. */
uint64_t kvcache_hash_block(uint64_t parent, const int32_t *tokens, int32_t n);

/*
 * Find a registered block with this hash, parent hash and block_size token
 * ids. On a hit the block gains a reference (a CACHED block becomes USED
 * and leaves the LRU) and its id is returned; -1 on a miss.
 */
int32_t kvcache_lookup(kvcache *kv, uint64_t hash, uint64_t parent, const int32_t *tokens);

/*
 * Register a USED, full block (its block_size slots hold the KV of these
 * tokens after that prefix) so that later lookups find it. If a block is
 * already registered under this hash, nothing happens (the first wins; this
 * one stays private and returns to the free list when released). Returns 1
 * when registered, 0 when not.
 */
int kvcache_publish(kvcache *kv, int32_t block, uint64_t hash, uint64_t parent,
                    const int32_t *tokens);

int32_t kvcache_refcount(const kvcache *kv, int32_t block);
void kvcache_get_stats(const kvcache *kv, kvcache_stats *ret);

/* Check every invariant (state counts, lists, refcounts, table); for tests.
 * 0 or -EPROTO with the first broken invariant in err. O(n_blocks). */
int kvcache_check(const kvcache *kv, lm_err *err);

#endif
