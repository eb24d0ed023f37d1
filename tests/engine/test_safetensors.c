/*
 * test_safetensors.c: the reader accepts what the writer writes and refuses
 * every malformed file with a message naming the file, tensor and problem.
 * Malformed files are written into a fresh temp dir by the test itself.
 */
#include "engine/half.h"
#include "engine/safetensors.h"
#include "tests/engine/check.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[256];

static const char *tmp_path(const char *name)
{
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

/* Write a file: 8-byte length (hlen_override if nonzero), header, data bytes. */
static const char *write_raw(const char *name, const char *hdr, uint64_t hlen_override,
                             size_t data_bytes)
{
    const char *p = tmp_path(name);
    FILE *f = fopen(p, "wb");
    uint64_t hl = hlen_override ? hlen_override : strlen(hdr);
    uint8_t b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(hl >> (8 * i));
    fwrite(b, 1, 8, f);
    fwrite(hdr, 1, strlen(hdr), f);
    for (size_t i = 0; i < data_bytes; i++)
        fputc((int)(i & 0xff), f);
    fclose(f);
    return p;
}

static void expect_bad(const char *name, const char *hdr, uint64_t hl, size_t data,
                       const char *needle)
{
    lm_err err = {0};
    safetensors_file *f = NULL;
    const char *p = write_raw(name, hdr, hl, data);
    CHECK_ERR(safetensors_open(p, &f, &err), err, -EINVAL, needle);
    CHECK(f == NULL);
    CHECK(strstr(err.msg, name) != NULL); /* names the file */
}

static int fill_ramp(void *user, size_t index, void *buf, size_t offset, size_t len, lm_err *err)
{
    (void)user;
    float *f = buf;
    for (size_t i = 0; i < len / 4; i++)
        f[i] = (float)(index * 1000 + offset / 4 + i);
    return 0;
}

int main(void)
{
    snprintf(dir, sizeof dir, "/tmp/lm_st_XXXXXX");
    if (!mkdtemp(dir))
        return 2;
    lm_err err = {0};

    /* Round trip through the writer, with data given and with the fill callback. */
    safetensors_writer *w;
    CHECK(safetensors_writer_create(&w, &err) == 0);
    uint16_t h[6];
    for (int i = 0; i < 6; i++)
        h[i] = float_to_bf16((float)i - 2.5f);
    int64_t s23[2] = {2, 3}, s5[1] = {5};
    CHECK(safetensors_writer_add(w, "a.weight", ST_BF16, 2, s23, h, &err) == 0);
    CHECK(safetensors_writer_add(w, "b", ST_F32, 1, s5, NULL, &err) == 1);
    CHECK_ERR(safetensors_writer_add(w, "b", ST_F32, 1, s5, NULL, &err), err, -EEXIST, "twice");
    CHECK(safetensors_writer_write(w, tmp_path("ok.safetensors"), fill_ramp, NULL, &err) == 0);
    safetensors_writer_free(w);
    safetensors_file *f = NULL;
    CHECK(safetensors_open(tmp_path("ok.safetensors"), &f, &err) == 0);
    if (f) {
        CHECK(safetensors_count(f) == 2);
        const safetensors_tensor *t = safetensors_find(f, "a.weight");
        CHECK(t && t->dtype == ST_BF16 && t->ndim == 2 && t->shape[1] == 3 && t->nbytes == 12);
        CHECK(t && bf16_to_float(((const uint16_t *)t->data)[5]) == 2.5f);
        t = safetensors_find(f, "b");
        CHECK(t && ((const float *)t->data)[4] == 1004.f);
        CHECK(safetensors_find(f, "c") == NULL);
        safetensors_close(f);
    }

    /* Malformed files. */
    FILE *tf = fopen(tmp_path("trunc.safetensors"), "wb");
    fwrite("\x10\0\0", 1, 3, tf);
    fclose(tf);
    CHECK_ERR(safetensors_open(tmp_path("trunc.safetensors"), &f, &err), err, -EINVAL,
              "truncated");
    const char *good = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    expect_bad("past_eof.safetensors", good, 4096, 8, "past end of file");
    expect_bad("huge.safetensors", good, (uint64_t)1 << 40, 8, "exceeds");
    expect_bad("notjson.safetensors", "{\"x\": [1, 2", 0, 8, "not a JSON object");
    expect_bad("offsets.safetensors",
               "{\"x\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 0, 8,
               "runs past end of file");
    expect_bad("overlap.safetensors",
               "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
               0, 16, "overlaps");
    expect_bad("count.safetensors",
               "{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 0, 16,
               "shape need 12");
    expect_bad("dtype.safetensors",
               "{\"x\":{\"dtype\":\"Q4_K\",\"shape\":[2],\"data_offsets\":[0,8]}}", 0, 8,
               "unknown dtype 'Q4_K'");
    expect_bad("negshape.safetensors",
               "{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 0, 8,
               "shape[0]");
    expect_bad("nooff.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2]}}", 0, 8,
               "data_offsets");
    expect_bad("overflow.safetensors",
               "{\"x\":{\"dtype\":\"F64\",\"shape\":[1099511627776,1099511627776],"
               "\"data_offsets\":[0,8]}}",
               0, 8, "overflows");
    CHECK_ERR(safetensors_open(tmp_path("does-not-exist"), &f, &err), err, -ENOENT,
              "cannot open");
    CHECK_DONE();
}
