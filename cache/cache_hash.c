/*
 * cache_hash.c: SHA-256 for the cache's keys and the model fingerprint,
 * through OpenSSL's libcrypto (EVP), which uses the CPU's SHA extensions
 * where there are any (see cache_internal.h for the contract).
 *
 * The digest is fetched from the default provider once per process
 * (pthread_once) rather than per hash: an implicit fetch by name costs a
 * lookup in OpenSSL's method store on every EVP_DigestInit. The key is made
 * of many 4-byte fields; they are staged in cache_hash.buf and handed to
 * EVP_DigestUpdate a block at a time, so that a key costs a few calls into
 * libcrypto instead of one per field. The bytes hashed are exactly the bytes
 * given, in order: staging changes nothing in the digest.
 *
 * Threads: any; one cache_hash per thread at a time.
 */
#include <pthread.h>
#include <string.h>

#include <openssl/evp.h>

#include "cache/cache_internal.h"

static pthread_once_t md_once = PTHREAD_ONCE_INIT;
static EVP_MD *md_sha256; /* process lifetime; NULL when the provider has none */

static void md_fetch(void) { md_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL); }

int cache_hash_begin(cache_hash *h)
{
    pthread_once(&md_once, md_fetch);
    h->n = 0;
    h->failed = 0;
    h->ctx = md_sha256 ? EVP_MD_CTX_new() : NULL;
    if (!h->ctx)
        return -ENOMEM;
    if (!EVP_DigestInit_ex2(h->ctx, md_sha256, NULL)) {
        EVP_MD_CTX_free(h->ctx);
        h->ctx = NULL;
        return -EIO;
    }
    return 0;
}

static void flush(cache_hash *h)
{
    if (h->n && !EVP_DigestUpdate(h->ctx, h->buf, h->n))
        h->failed = 1;
    h->n = 0;
}

void cache_hash_update(cache_hash *h, const void *p, size_t n)
{
    if (n == 0)
        return; /* p may be NULL then (an empty `extra`): memcpy must not see it */
    if (n > sizeof h->buf - h->n) {
        flush(h);
        if (n >= sizeof h->buf) {
            if (!EVP_DigestUpdate(h->ctx, p, n))
                h->failed = 1;
            return;
        }
    }
    memcpy(h->buf + h->n, p, n);
    h->n += n;
}

int cache_hash_final(cache_hash *h, uint8_t out[CACHE_HASH_BYTES])
{
    unsigned int len = 0;
    flush(h);
    if (!h->failed && (!EVP_DigestFinal_ex(h->ctx, out, &len) || len != CACHE_HASH_BYTES))
        h->failed = 1;
    if (!h->failed && !EVP_DigestInit_ex2(h->ctx, NULL, NULL))
        h->failed = 1; /* ready for the next digest with the same context */
    return h->failed ? -EIO : 0;
}

void cache_hash_end(cache_hash *h)
{
    EVP_MD_CTX_free(h->ctx);
    h->ctx = NULL;
}

void cache_hex(const uint8_t *d, size_t n_bytes, char *out)
{
    static const char hx[] = "0123456789abcdef";
    for (size_t i = 0; i < n_bytes; i++) {
        out[2 * i] = hx[d[i] >> 4];
        out[2 * i + 1] = hx[d[i] & 15];
    }
    out[2 * n_bytes] = '\0';
}
