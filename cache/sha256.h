/*
 * sha256.h: SHA-256 (FIPS PUB 180-4, "Secure Hash Standard", section 6.2),
 * written from the specification for the answer cache's keys and the model
 * fingerprint. Not a general crypto library: no HMAC, no constant-time
 * claims (the inputs hashed here are not secrets).
 *
 * Usage: sha256_init, any number of sha256_update calls, sha256_final.
 * The context is plain data owned by the caller; one context per thread.
 */
#ifndef LIGHTMOE_SHA256_H
#define LIGHTMOE_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define SHA256_DIGEST_BYTES 32

typedef struct sha256_ctx {
    uint32_t h[8];      /* chaining state H(i) */
    uint64_t n_bytes;   /* message length so far */
    uint8_t buf[64];    /* pending partial block */
    size_t n_buf;
} sha256_ctx;

void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t n);
void sha256_final(sha256_ctx *c, uint8_t out[SHA256_DIGEST_BYTES]);

/* One-shot convenience. */
void sha256(const void *data, size_t n, uint8_t out[SHA256_DIGEST_BYTES]);

/* Lower-case hex of the first n_bytes of a digest into out (2*n_bytes+1). */
void sha256_hex(const uint8_t *digest, size_t n_bytes, char *out);

#endif
