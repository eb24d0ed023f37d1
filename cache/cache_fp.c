/*
 * cache_fp.c: the model fingerprint (cache_fingerprint_dir in cache.h).
 *
 * Anything that can change an answer must change the fingerprint: the
 * config and generation defaults, the tokenizer, the chat template, the
 * quantization settings (hashed whole: small files), and the weights. The
 * weights are too big to hash per start-up (GBs), so each *.safetensors
 * contributes its name, size, full JSON header (names, dtypes, shapes,
 * offsets) and 16 samples of 4 KiB spread evenly over the file. Files are
 * taken in name order so that the directory order does not matter.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache/cache_internal.h"

#define SAMPLES 16
#define SAMPLE_BYTES 4096
#define SMALL_MAX (64u << 20)
#define HEADER_MAX (100u << 20)

static const char *small_files[] = {
    "config.json",           "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja",    "quantize_config.json",
    "special_tokens_map.json", "model.safetensors.index.json",
};

static void h_u64(cache_hash *h, uint64_t v)
{
    uint8_t b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    cache_hash_update(h, b, 8);
}

static void h_str(cache_hash *h, const char *s)
{
    h_u64(h, strlen(s));
    cache_hash_update(h, s, strlen(s));
}

/* Hash [off, off+n) of fd; -errno on a read error. */
static int h_range(cache_hash *h, int fd, uint64_t off, uint64_t n, uint8_t *buf, size_t cap)
{
    while (n) {
        size_t want = n < cap ? (size_t)n : cap;
        ssize_t got = pread(fd, buf, want, (off_t)off);
        if (got < 0)
            return -errno;
        if (got == 0)
            return -EIO;
        cache_hash_update(h, buf, (size_t)got);
        off += (uint64_t)got;
        n -= (uint64_t)got;
    }
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int hash_safetensors(cache_hash *h, int dfd, const char *name, uint8_t *buf, lm_err *err)
{
    int fd = openat(dfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return lm_err_set(err, -errno, "fingerprint: %s: cannot open", name);
    struct stat st;
    int rc = 0;
    uint8_t hl[8];
    if (fstat(fd, &st) || pread(fd, hl, 8, 0) != 8) {
        close(fd);
        return lm_err_set(err, -EIO, "fingerprint: %s: cannot read the header length", name);
    }
    uint64_t hlen = 0, size = (uint64_t)st.st_size;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)hl[i] << (8 * i);
    if (hlen > HEADER_MAX || 8 + hlen > size) {
        close(fd);
        return lm_err_set(err, -EBADMSG, "fingerprint: %s: header length %llu is not plausible",
                          name, (unsigned long long)hlen);
    }
    h_str(h, name);
    h_u64(h, size);
    rc = h_range(h, fd, 0, 8 + hlen, buf, SAMPLE_BYTES);
    uint64_t data = 8 + hlen, span = size - data;
    for (int i = 0; !rc && i < SAMPLES && span; i++) {
        uint64_t off = data + span / SAMPLES * (uint64_t)i;
        uint64_t n = size - off < SAMPLE_BYTES ? size - off : SAMPLE_BYTES;
        rc = h_range(h, fd, off, n, buf, SAMPLE_BYTES);
    }
    close(fd);
    if (rc)
        return lm_err_set(err, rc, "fingerprint: %s: read failed", name);
    return 0;
}

int cache_fingerprint_dir(const char *dir, const char *tag, char out[65], lm_err *err)
{
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return lm_err_set(err, -errno, "fingerprint: %s: cannot open the model folder", dir);
    cache_hash h;
    int rc = cache_hash_begin(&h);
    if (rc) {
        close(dfd);
        return lm_err_set(err, rc, "fingerprint: SHA-256 unavailable (libcrypto)");
    }
    cache_hash_update(&h, "lightmoe-model-fp", 18);
    h_str(&h, tag ? tag : "");
    uint8_t *buf = malloc(SAMPLE_BYTES);
    rc = buf ? 0 : lm_err_set(err, -ENOMEM, "fingerprint: out of memory");
    for (size_t i = 0; !rc && i < sizeof small_files / sizeof *small_files; i++) {
        h_str(&h, small_files[i]);
        int fd = openat(dfd, small_files[i], O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st)) {
            h_str(&h, "(absent)");
        } else if ((uint64_t)st.st_size > SMALL_MAX) {
            rc = lm_err_set(err, -EFBIG, "fingerprint: %s/%s: larger than %u bytes", dir,
                            small_files[i], SMALL_MAX);
        } else {
            h_u64(&h, (uint64_t)st.st_size);
            if (h_range(&h, fd, 0, (uint64_t)st.st_size, buf, SAMPLE_BYTES))
                rc = lm_err_set(err, -EIO, "fingerprint: %s/%s: read failed", dir,
                                small_files[i]);
        }
        if (fd >= 0)
            close(fd);
    }
    /* Weight files, in name order. */
    DIR *d = rc ? NULL : fdopendir(dup(dfd));
    char **names = NULL;
    size_t nn = 0, cap = 0;
    if (!rc && !d)
        rc = lm_err_set(err, -errno, "fingerprint: %s: cannot list", dir);
    for (struct dirent *de; d && !rc && (de = readdir(d));) {
        size_t l = strlen(de->d_name);
        if (l < 12 || strcmp(de->d_name + l - 12, ".safetensors") ||
            !strcmp(de->d_name, "reference.safetensors") || !strcmp(de->d_name, "eval.safetensors"))
            continue;
        if (nn == cap) {
            cap = cap ? cap * 2 : 16;
            char **nx = realloc(names, cap * sizeof *names);
            if (!nx) {
                rc = lm_err_set(err, -ENOMEM, "fingerprint: out of memory");
                break;
            }
            names = nx;
        }
        if (!(names[nn] = strdup(de->d_name))) {
            rc = lm_err_set(err, -ENOMEM, "fingerprint: out of memory");
            break;
        }
        nn++;
    }
    if (d)
        closedir(d);
    if (!rc && nn == 0)
        rc = lm_err_set(err, -ENOENT, "fingerprint: %s: no *.safetensors weights", dir);
    if (!rc)
        qsort(names, nn, sizeof *names, cmp_str);
    for (size_t i = 0; !rc && i < nn; i++)
        rc = hash_safetensors(&h, dfd, names[i], buf, err);
    for (size_t i = 0; i < nn; i++)
        free(names[i]);
    free(names);
    free(buf);
    close(dfd);
    uint8_t dg[CACHE_HASH_BYTES];
    if (!rc && cache_hash_final(&h, dg))
        rc = lm_err_set(err, -EIO, "fingerprint: SHA-256 failed");
    cache_hash_end(&h);
    if (rc)
        return rc;
    cache_hex(dg, CACHE_HASH_BYTES, out);
    return 0;
}
