/*
 * test_cache_hash.c: the cache's SHA-256 (cache_hash.c, OpenSSL underneath)
 * and its keys.
 * 1. FIPS 180-4 example vectors (csrc.nist.gov "SHA256.pdf",
 *    "SHA2_Additional.pdf"): "", "abc", the 448-bit two-block message, the
 *    55/56/64-byte padding boundaries, one million 'a' fed in odd-sized
 *    pieces (crossing the 512-byte staging buffer in every way), and two
 *    digests in a row from one context (cache_hash_final re-arms it).
 * 2. Golden keys: cache_key_make's exact bytes for fixed requests, taken
 *    from the hand-written SHA-256 this replaced (commit f47e7c5), so that
 *    keys already stored in a Redis stay valid across the change.
 */
#include <string.h>

#include "cache/cache_internal.h"
#include "testutil.h"

static void check(const char *msg, size_t n, size_t step, const char *want)
{
    cache_hash h;
    uint8_t d[CACHE_HASH_BYTES];
    char hx[65];
    CHECK(cache_hash_begin(&h) == 0);
    cache_hash_update(&h, NULL, 0); /* an empty field (UBSan checks memcpy's arguments) */
    for (size_t off = 0; off < n; off += step)
        cache_hash_update(&h, msg + off, n - off < step ? n - off : step);
    CHECK(cache_hash_final(&h, d) == 0);
    cache_hex(d, 32, hx);
    CHECK_MSG(!strcmp(hx, want), "sha256(%.20s..., %zu bytes, step %zu) = %s, want %s", msg,
              n, step, hx, want);
    /* The same context again (final re-arms it): same digest. */
    cache_hash_update(&h, msg, n);
    CHECK(cache_hash_final(&h, d) == 0);
    cache_hex(d, 32, hx);
    CHECK(!strcmp(hx, want));
    cache_hash_end(&h);
}

static void vectors(void)
{
    static char buf[1000000];
    memset(buf, 'a', sizeof buf);
    const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    size_t steps[] = {1, 3, 64, 511, 512, 513, 4096, 1000000};
    for (size_t i = 0; i < sizeof steps / sizeof *steps; i++) {
        size_t s = steps[i];
        check("", 0, s, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        check("abc", 3, s, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        check(m448, strlen(m448), s,
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
        check(buf, 55, s, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
        check(buf, 56, s, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
        check(buf, 64, s, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
        check(buf, sizeof buf, s,
              "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    }
    /* Pieces of changing size, as the key makes them. */
    cache_hash h;
    uint8_t d[CACHE_HASH_BYTES];
    char hx[65];
    CHECK(cache_hash_begin(&h) == 0);
    size_t left = sizeof buf, step = 1;
    while (left) {
        size_t n = step < left ? step : left;
        cache_hash_update(&h, buf, n);
        left -= n;
        step = step % 997 + 13;
    }
    CHECK(cache_hash_final(&h, d) == 0);
    cache_hash_end(&h);
    cache_hex(d, 32, hx);
    CHECK(!strcmp(hx, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
}

/* A request of every field: prompt of n ids, stops, extra (or none: NULL),
 * sampled with a fixed seed (seeded = 1) or greedy. */
static void golden(const cache *c, int32_t n, int seeded, int extra, const char *want)
{
    int32_t prompt[3000], stop_ids[2] = {7, 151643};
    for (int32_t i = 0; i < n; i++)
        prompt[i] = (i * 7919) % 151000;
    const char *stop[2] = {"\n\n", "User:"};
    sample_params sp;
    memset(&sp, 0, sizeof sp);
    sp.temperature = seeded ? 0.7f : 0.0f;
    sp.top_k = 40;
    sp.top_p = 0.9f;
    sp.min_p = 0.05f;
    sp.repetition_penalty = 1.1f;
    sp.seed = 12345;
    sp.logprobs = 2;
    cache_request r;
    memset(&r, 0, sizeof r);
    r.model_fp = "3f1c0ffee";
    r.prompt = prompt;
    r.n_prompt = n;
    r.max_tokens = 64;
    r.sampling = &sp;
    r.seed_fixed = seeded;
    r.stop_ids = stop_ids;
    r.n_stop_ids = 2;
    r.stop = stop;
    r.n_stop = 2;
    if (extra) {
        r.extra = "chat:1";
        r.n_extra = 6;
    }
    cache_key k;
    lm_err e;
    lm_err_clear(&e);
    CHECK(cache_key_make(c, &r, &k, &e) == 0);
    CHECK_MSG(!strcmp(k.str, want) && k.len == strlen(want), "key %s, want %s", k.str, want);
}

int main(void)
{
    vectors();
    cache_config cfg;
    cache_config_default(&cfg);
    cache *c;
    lm_err e;
    lm_err_clear(&e);
    CHECK(cache_create(&cfg, &c, &e) == 0);
    /* prompt ids, seeded, extra: the key (cache_key_make's exact bytes) */
    static const struct {
        int32_t n;
        int seeded, extra;
        const char *want;
    } keys[] = {
        {0, 0, 1,
         "lightmoe:v1:54b78da521b13ef9:df3f619804a92fdb:"
         "2632a3a512deab72a18dc93e21cfb0c353c208cf5694efa06a9f25c176f6a06b"},
        {5, 0, 1,
         "lightmoe:v1:54b78da521b13ef9:8576f91c8660d529:"
         "24402edb008b7bac37ad9a91c4a996d9732e800248619567f5de364a8c97263c"},
        {16, 0, 1,
         "lightmoe:v1:54b78da521b13ef9:c08e2772ddbb55d7:"
         "b067205a6e5b1e17671a0e749da0dff2b3dd674d65c1b0b4ba1dab4088913515"},
        {17, 0, 1,
         "lightmoe:v1:54b78da521b13ef9:c08e2772ddbb55d7:"
         "20b1b3de75d79c621a9a0261d63e20e5f0c1a6c7d0d4f36b168bab0b74db84e7"},
        {200, 0, 1,
         "lightmoe:v1:54b78da521b13ef9:c08e2772ddbb55d7:"
         "fc8c5cada957f97c545f292fe96b3b8867590e7f6d15e8ae24344319d40518a9"},
        {3000, 0, 1,
         "lightmoe:v1:54b78da521b13ef9:c08e2772ddbb55d7:"
         "f43c224c89912b74a76dacf1fcb52a1503fb819a484c8febf39cd6a86c5e90db"},
        {200, 1, 1,
         "lightmoe:v1:54b78da521b13ef9:c08e2772ddbb55d7:"
         "107215d0415be81944756f2fbf626fffed19857afae21cf1a06aa6a1e83f8e5f"},
        {5, 0, 0,
         "lightmoe:v1:54b78da521b13ef9:8576f91c8660d529:"
         "917fa16ec0029290da89e8b4fb9a9b83d12a31aa64dff3240ce99758f17b92cf"},
        {0, 1, 0,
         "lightmoe:v1:54b78da521b13ef9:df3f619804a92fdb:"
         "f3c05de0f517dd5d759da28e75faf34a104e93b6050d43853e5e8098a28220b4"},
    };
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        golden(c, keys[i].n, keys[i].seeded, keys[i].extra, keys[i].want);
    cache_destroy(c);
    printf("cache_hash: FIPS 180-4 vectors and golden keys ok\n");
    return 0;
}
