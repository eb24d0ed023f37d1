/*
 * test_sha256.c: SHA-256 against the FIPS 180-4 example vectors
 * (csrc.nist.gov "SHA256.pdf", "SHA2_Additional.pdf"): "abc", the 448-bit
 * two-block message, one million 'a' (fed in odd-sized pieces to exercise
 * the buffering), and the empty string.
 */
#include <string.h>

#include "cache/sha256.h"
#include "testutil.h"

static void check(const char *msg, size_t n, const char *want)
{
    uint8_t d[32];
    char hx[65];
    sha256(msg, n, d);
    sha256_hex(d, 32, hx);
    CHECK_MSG(!strcmp(hx, want), "sha256(%.20s...) = %s, want %s", msg, hx, want);
}

int main(void)
{
    check("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    check("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    check(m448, strlen(m448), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    /* 55, 56, 63, 64 bytes: the padding boundaries. */
    char buf[1024];
    memset(buf, 'a', sizeof buf);
    check(buf, 55, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
    check(buf, 56, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
    check(buf, 64, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
    sha256_ctx c;
    sha256_init(&c);
    size_t left = 1000000, step = 1;
    while (left) {
        size_t n = step < left ? step : left;
        sha256_update(&c, buf, n);
        left -= n;
        step = step % 997 + 13;
    }
    uint8_t d[32];
    char hx[65];
    sha256_final(&c, d);
    sha256_hex(d, 32, hx);
    CHECK(!strcmp(hx, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
    printf("sha256: FIPS 180-4 vectors ok\n");
    return 0;
}
