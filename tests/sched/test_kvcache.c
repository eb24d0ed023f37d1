/*
 * test_kvcache.c: the KV block manager on its own: states and counts,
 * sharing by refcount, prefix lookup (hits, misses, collisions), LRU
 * eviction order, and a random stress run against a simple model with the
 * full invariant check after every operation.
 */
#include "engine/kvcache.h"

#include "tests/sched/harness.h"

static void check_ok(const kvcache *kv, const char *where)
{
    lm_err err = {0};
    int rc = kvcache_check(kv, &err);
    CHECK(rc == 0, "%s: %s", where, err.msg);
}

static void test_bad_sizes(void)
{
    kvcache *kv = NULL;
    lm_err err = {0};
    CHECK(kvcache_create(0, 16, &kv, &err) == -EINVAL, "0 blocks accepted");
    CHECK(strstr(err.msg, "0 blocks") != NULL, "message: %s", err.msg);
    CHECK(kvcache_create(4, 0, &kv, &err) == -EINVAL, "block_size 0 accepted");
    CHECK(kvcache_blocks_for_bytes(1 << 20, 1024, 16) == 64, "1 MiB / (1 KiB x 16) != 64");
    CHECK(kvcache_blocks_for_bytes(1 << 20, 0, 16) == 0, "0 bytes per token");
    CHECK(kvcache_blocks_for_bytes(1000, 1024, 16) == 0, "budget under one block");
}

static void test_alloc_release(void)
{
    kvcache *kv = NULL;
    CHECK(kvcache_create(4, 2, &kv, NULL) == 0, "create");
    int32_t b[5];
    for (int i = 0; i < 4; i++)
        b[i] = kvcache_alloc(kv);
    b[4] = kvcache_alloc(kv);
    CHECK(b[4] == -1, "allocated a 5th block of 4: %d", b[4]);
    CHECK(kvcache_available(kv) == 0, "available %d", kvcache_available(kv));
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < i; j++)
            CHECK(b[i] != b[j], "block %d handed out twice", b[i]);
    check_ok(kv, "all used");
    for (int i = 0; i < 4; i++)
        kvcache_release(kv, b[i]);
    kvcache_stats st;
    kvcache_get_stats(kv, &st);
    CHECK(st.free == 4 && st.used == 0 && st.cached == 0, "free %d used %d cached %d", st.free,
          st.used, st.cached);
    check_ok(kv, "all free");
    kvcache_destroy(kv);
    kvcache_destroy(NULL);
}

static void test_prefix(void)
{
    kvcache *kv = NULL;
    CHECK(kvcache_create(3, 4, &kv, NULL) == 0, "create");
    const int32_t t0[4] = {1, 2, 3, 4}, t1[4] = {5, 6, 7, 8}, t2[4] = {9, 9, 9, 9};
    uint64_t h0 = kvcache_hash_block(KVCACHE_HASH_ROOT, t0, 4);
    uint64_t h1 = kvcache_hash_block(h0, t1, 4);
    CHECK(h0 != kvcache_hash_block(KVCACHE_HASH_ROOT, t1, 4), "hash ignores tokens");
    CHECK(h1 != kvcache_hash_block(KVCACHE_HASH_ROOT, t1, 4), "hash ignores the parent");
    const int32_t swapped[4] = {2, 1, 3, 4};
    CHECK(h0 != kvcache_hash_block(KVCACHE_HASH_ROOT, swapped, 4), "hash ignores order");

    int32_t a = kvcache_alloc(kv), b = kvcache_alloc(kv);
    CHECK(kvcache_publish(kv, a, h0, KVCACHE_HASH_ROOT, t0) == 1, "publish a");
    CHECK(kvcache_publish(kv, b, h1, h0, t1) == 1, "publish b");
    int32_t other = kvcache_alloc(kv);
    CHECK(kvcache_publish(kv, other, h0, KVCACHE_HASH_ROOT, t0) == 0,
          "a second block under a registered hash was registered");
    /* Hit while in use: shared. */
    CHECK(kvcache_lookup(kv, h0, KVCACHE_HASH_ROOT, t0) == a, "lookup a");
    CHECK(kvcache_refcount(kv, a) == 2, "refcount %d", kvcache_refcount(kv, a));
    /* Collision: same hash, other parent or tokens: a miss. */
    CHECK(kvcache_lookup(kv, h1, KVCACHE_HASH_ROOT, t1) == -1, "wrong parent matched");
    CHECK(kvcache_lookup(kv, h1, h0, t2) == -1, "wrong tokens matched");
    CHECK(kvcache_lookup(kv, h1 ^ 1, h0, t1) == -1, "wrong hash matched");
    check_ok(kv, "shared");

    kvcache_release(kv, a);
    kvcache_release(kv, a);
    kvcache_release(kv, b);
    kvcache_release(kv, other);
    kvcache_stats st;
    kvcache_get_stats(kv, &st);
    CHECK(st.cached == 2 && st.free == 1 && st.used == 0, "free %d used %d cached %d", st.free,
          st.used, st.cached);
    CHECK(kvcache_available(kv) == 3, "cached blocks not available");
    check_ok(kv, "cached");

    /* A cached block comes back on lookup. */
    CHECK(kvcache_lookup(kv, h1, h0, t1) == b, "cached b not found");
    kvcache_release(kv, b); /* b is now the most recently used */
    /* Allocation: free first, then the LRU cached block (a), then b. */
    int32_t x = kvcache_alloc(kv);
    CHECK(x == other, "free block not taken first (%d)", x);
    int32_t y = kvcache_alloc(kv);
    CHECK(y == a, "LRU order: expected %d, got %d", a, y);
    CHECK(kvcache_lookup(kv, h0, KVCACHE_HASH_ROOT, t0) == -1, "evicted block still found");
    CHECK(kvcache_lookup(kv, h1, h0, t1) == b, "b evicted too early");
    check_ok(kv, "after eviction");
    CHECK(kvcache_alloc(kv) == -1, "b is in use, nothing left");
    kvcache_release(kv, b);
    kvcache_release(kv, x);
    kvcache_release(kv, y);
    check_ok(kv, "end");
    kvcache_destroy(kv);
}

/* Random operations; a model of refcounts checks ids; kvcache_check after
 * every step. Small table so probe runs wrap around and deletions shift. */
static void test_stress(void)
{
    enum { NB = 37, BS = 2, OPS = 20000, NH = 24 };
    kvcache *kv = NULL;
    CHECK(kvcache_create(NB, BS, &kv, NULL) == 0, "create");
    int32_t held[4 * NB];
    int n_held = 0;
    uint64_t seed = 12345;
    int32_t toks[NH][BS];
    uint64_t hashes[NH];
    for (int i = 0; i < NH; i++) {
        toks[i][0] = i;
        toks[i][1] = i * 7;
        hashes[i] = kvcache_hash_block(KVCACHE_HASH_ROOT, toks[i], BS);
        if (i % 5 == 0) /* force some slot collisions: share low bits */
            hashes[i] = (hashes[i] & ~0xffull) | 0x11;
    }
    int hits = 0;
    for (int op = 0; op < OPS && !failures; op++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        int r = (int)(seed >> 33) % 4;
        int k = (int)((seed >> 45) % NH);
        if (r == 0 && n_held < 4 * NB) {
            int32_t b = kvcache_alloc(kv);
            if (b >= 0)
                held[n_held++] = b;
            else
                CHECK(kvcache_available(kv) == 0, "alloc failed with %d available",
                      kvcache_available(kv));
        } else if (r == 1 && n_held) {
            int i = (int)((seed >> 20) % (uint64_t)n_held);
            kvcache_release(kv, held[i]);
            held[i] = held[--n_held];
        } else if (r == 2 && n_held) {
            int i = (int)((seed >> 20) % (uint64_t)n_held);
            kvcache_publish(kv, held[i], hashes[k], KVCACHE_HASH_ROOT, toks[k]);
        } else if (r == 3 && n_held < 4 * NB) {
            int32_t b = kvcache_lookup(kv, hashes[k], KVCACHE_HASH_ROOT, toks[k]);
            if (b >= 0) {
                held[n_held++] = b;
                hits++;
            }
        }
        lm_err err = {0};
        if (kvcache_check(kv, &err) < 0) {
            CHECK(0, "op %d: %s", op, err.msg);
            break;
        }
    }
    CHECK(hits > 100, "only %d lookup hits: stress does not exercise sharing", hits);
    while (n_held)
        kvcache_release(kv, held[--n_held]);
    kvcache_stats st;
    kvcache_get_stats(kv, &st);
    CHECK(st.used == 0 && st.free + st.cached == NB, "leak: free %d used %d cached %d", st.free,
          st.used, st.cached);
    check_ok(kv, "stress end");
    kvcache_destroy(kv);
}

int main(void)
{
    test_bad_sizes();
    test_alloc_release();
    test_prefix();
    test_stress();
    if (failures)
        fprintf(stderr, "test_kvcache: %d failures\n", failures);
    return failures ? 1 : 0;
}
