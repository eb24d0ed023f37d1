/*
 * test_cache_fp.c: the model fingerprint (cache_fingerprint_dir) on a copy
 * of a fixture checkpoint: the same files in another folder give the same
 * fingerprint (it depends on content, not paths), and a changed chat
 * template, config, tokenizer, safetensors header or sampled weight byte,
 * or an operator tag, each give another; bad folders are refused.
 */
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

static char src[512], dst[512];

static void copy_file(const char *name)
{
    char a[1024], b[1024];
    snprintf(a, sizeof a, "%s/%s", src, name);
    snprintf(b, sizeof b, "%s/%s", dst, name);
    int in = open(a, O_RDONLY), out = open(b, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    CHECK(in >= 0 && out >= 0);
    char buf[65536];
    ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0)
        CHECK(write(out, buf, (size_t)n) == n);
    close(in);
    close(out);
}

static void fp(const char *dir, const char *tag, char out[65])
{
    lm_err e;
    lm_err_clear(&e);
    int rc = cache_fingerprint_dir(dir, tag, out, &e);
    CHECK_MSG(rc == 0, "%s", e.msg);
}

/* Flip one byte of dst/name at off, return the old byte. */
static int poke(const char *name, off_t off, int val)
{
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dst, name);
    int fd = open(p, O_RDWR);
    CHECK(fd >= 0);
    unsigned char old;
    CHECK(pread(fd, &old, 1, off) == 1);
    unsigned char v = (unsigned char)(val < 0 ? old ^ 0x5a : val);
    CHECK(pwrite(fd, &v, 1, off) == 1);
    close(fd);
    return old;
}

int main(int argc, char **argv)
{
    CHECK(argc == 2);
    snprintf(src, sizeof src, "%s/qwen2moe-tiny", argv[1]);
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(dst, sizeof dst, "%s/lmfp.XXXXXX", tmp);
    CHECK(mkdtemp(dst));
    DIR *d = opendir(src);
    CHECK(d);
    struct dirent *de;
    while ((de = readdir(d)))
        if (de->d_name[0] != '.')
            copy_file(de->d_name);
    closedir(d);

    char f0[65], f1[65], f2[65];
    fp(src, NULL, f0);
    fp(dst, NULL, f1);
    CHECK_MSG(!strcmp(f0, f1), "same content, other folder: %s vs %s", f0, f1);
    fp(dst, "v2", f2);
    CHECK(strcmp(f1, f2));

    /* Each behaviour-defining file counts. */
    const char *small[] = {"chat_template.jinja", "config.json", "tokenizer.json",
                           "generation_config.json", "tokenizer_config.json"};
    for (size_t i = 0; i < sizeof small / sizeof *small; i++) {
        int old = poke(small[i], 10, -1);
        fp(dst, NULL, f2);
        CHECK_MSG(strcmp(f1, f2), "%s changed, fingerprint did not", small[i]);
        poke(small[i], 10, old);
        fp(dst, NULL, f2);
        CHECK(!strcmp(f1, f2));
    }
    /* Weights: a header byte, and the first byte of the data (sample 0). */
    const char *w = "model-00001-of-00002.safetensors";
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dst, w);
    int fd = open(p, O_RDONLY);
    unsigned char hl[8];
    CHECK(fd >= 0 && pread(fd, hl, 8, 0) == 8);
    close(fd);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)hl[i] << (8 * i);
    off_t offs[2] = {20, (off_t)(8 + hlen)};
    for (int i = 0; i < 2; i++) {
        int old = poke(w, offs[i], -1);
        fp(dst, NULL, f2);
        CHECK_MSG(strcmp(f1, f2), "weights byte at %lld changed, fingerprint did not",
                  (long long)offs[i]);
        poke(w, offs[i], old);
    }
    fp(dst, NULL, f2);
    CHECK(!strcmp(f1, f2));

    /* Refusals. */
    lm_err e;
    CHECK(cache_fingerprint_dir("/nonexistent/model", NULL, f2, &e) < 0 &&
          strstr(e.msg, "/nonexistent/model"));
    char empty[600];
    snprintf(empty, sizeof empty, "%s/empty", dst);
    CHECK(mkdir(empty, 0755) == 0);
    CHECK(cache_fingerprint_dir(empty, NULL, f2, &e) == -ENOENT && strstr(e.msg, "safetensors"));
    rmdir(empty);

    d = opendir(dst);
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        snprintf(p, sizeof p, "%s/%s", dst, de->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dst);
    printf("cache fingerprint ok (%.16s)\n", f0);
    return 0;
}
