/*
 * safetensors.c: validated mmap reader and streaming writer (safetensors.h).
 *
 * The reader trusts nothing in the file: every number from the header is
 * range-checked with overflow-safe arithmetic before a pointer is formed.
 */
#include "engine/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const struct {
    const char *name;
    size_t size;
} dtype_table[ST_DTYPE_COUNT] = {
    [ST_BOOL] = {"BOOL", 1}, [ST_U8] = {"U8", 1},   [ST_I8] = {"I8", 1},
    [ST_I16] = {"I16", 2},   [ST_U16] = {"U16", 2}, [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2}, [ST_I32] = {"I32", 4}, [ST_U32] = {"U32", 4},
    [ST_F32] = {"F32", 4},   [ST_I64] = {"I64", 8}, [ST_U64] = {"U64", 8},
    [ST_F64] = {"F64", 8},
};

size_t st_dtype_size(st_dtype t) { return (unsigned)t < ST_DTYPE_COUNT ? dtype_table[t].size : 0; }

const char *st_dtype_name(st_dtype t)
{
    return (unsigned)t < ST_DTYPE_COUNT ? dtype_table[t].name : "?";
}

int st_dtype_parse(const char *s, st_dtype *ret)
{
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (!strcmp(s, dtype_table[i].name)) {
            *ret = (st_dtype)i;
            return 0;
        }
    return -EINVAL;
}

/* ---- reader ----------------------------------------------------------- */

struct safetensors_file {
    char *path;
    void *map;
    size_t map_size;
    size_t n;
    safetensors_tensor *t; /* sorted by name for safetensors_find */
    char *names;           /* all names, NUL separated */
};

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const safetensors_tensor *)a)->name, ((const safetensors_tensor *)b)->name);
}

typedef struct range {
    size_t begin, end;
    size_t idx;
} range;

static int cmp_range(const void *a, const void *b)
{
    const range *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

static int parse_u64(json_t *v, uint64_t *ret)
{
    /* jansson holds integers as json_int_t (long long); negative is invalid. */
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return -EINVAL;
    *ret = (uint64_t)json_integer_value(v);
    return 0;
}

/* Validate one header entry; fill t (name set by caller). */
static int parse_entry(const char *path, const char *name, json_t *e, size_t data_size,
                       const uint8_t *data, safetensors_tensor *t, range *r, lm_err *err)
{
    if (!json_is_object(e))
        return lm_err_set(err, -EINVAL, "%s: tensor '%s': header entry is not an object", path,
                          name);
    json_t *dt = json_object_get(e, "dtype");
    json_t *sh = json_object_get(e, "shape");
    json_t *off = json_object_get(e, "data_offsets");
    if (!json_is_string(dt))
        return lm_err_set(err, -EINVAL, "%s: tensor '%s': missing or non-string dtype", path,
                          name);
    if (st_dtype_parse(json_string_value(dt), &t->dtype))
        return lm_err_set(err, -EINVAL, "%s: tensor '%s': unknown dtype '%s'", path, name,
                          json_string_value(dt));
    if (!json_is_array(sh) || json_array_size(sh) > SAFETENSORS_MAX_DIMS)
        return lm_err_set(err, -EINVAL, "%s: tensor '%s': shape missing or more than %d dims",
                          path, name, SAFETENSORS_MAX_DIMS);
    t->ndim = (int32_t)json_array_size(sh);
    uint64_t numel = 1;
    for (int32_t d = 0; d < t->ndim; d++) {
        uint64_t v;
        if (parse_u64(json_array_get(sh, (size_t)d), &v) || v > (1ull << 40))
            return lm_err_set(err, -EINVAL, "%s: tensor '%s': shape[%d] is not a valid size",
                              path, name, d);
        t->shape[d] = (int64_t)v;
        if (v && numel > UINT64_MAX / v)
            return lm_err_set(err, -EINVAL, "%s: tensor '%s': shape overflows", path, name);
        numel *= v;
    }
    uint64_t esz = st_dtype_size(t->dtype);
    if (numel > UINT64_MAX / esz)
        return lm_err_set(err, -EINVAL, "%s: tensor '%s': shape overflows", path, name);
    uint64_t want = numel * esz;
    uint64_t b, en;
    if (!json_is_array(off) || json_array_size(off) != 2 || parse_u64(json_array_get(off, 0), &b) ||
        parse_u64(json_array_get(off, 1), &en))
        return lm_err_set(err, -EINVAL, "%s: tensor '%s': data_offsets must be [begin, end]",
                          path, name);
    if (b > en)
        return lm_err_set(err, -EINVAL, "%s: tensor '%s': data_offsets [%llu, %llu) reversed",
                          path, name, (unsigned long long)b, (unsigned long long)en);
    if (en > data_size)
        return lm_err_set(err, -EINVAL,
                          "%s: tensor '%s': data range [%llu, %llu) runs past end of file "
                          "(data area is %zu bytes)",
                          path, name, (unsigned long long)b, (unsigned long long)en, data_size);
    if (en - b != want)
        return lm_err_set(err, -EINVAL,
                          "%s: tensor '%s': %llu data bytes but dtype %s and shape need %llu",
                          path, name, (unsigned long long)(en - b), st_dtype_name(t->dtype),
                          (unsigned long long)want);
    if (((uintptr_t)(data + b)) % esz)
        return lm_err_set(err, -EINVAL, "%s: tensor '%s': data not aligned to its %llu-byte type",
                          path, name, (unsigned long long)esz);
    t->numel = (int64_t)numel;
    t->nbytes = (size_t)want;
    t->data = data + b;
    r->begin = (size_t)b;
    r->end = (size_t)en;
    return 0;
}

int safetensors_open(const char *path, safetensors_file **ret, lm_err *err)
{
    *ret = NULL;
    safetensors_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return lm_err_set(err, -ENOMEM, "%s: out of memory", path);
    }
    int rc = 0;
    json_t *root = NULL;
    range *ranges = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = lm_err_set(err, -errno, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rc = lm_err_set(err, -errno, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        goto fail;
    }
    size_t size = (size_t)st.st_size;
    if (size < 8) {
        close(fd);
        rc = lm_err_set(err, -EINVAL, "%s: truncated file (%zu bytes, no header length)", path,
                        size);
        goto fail;
    }
    f->map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        rc = lm_err_set(err, -errno, "%s: mmap failed: %s", path, strerror(errno));
        goto fail;
    }
    f->map_size = size;
    const uint8_t *p = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | p[i];
    if (hlen > SAFETENSORS_MAX_HEADER) {
        rc = lm_err_set(err, -EINVAL, "%s: header length %llu exceeds the %u byte limit", path,
                        (unsigned long long)hlen, SAFETENSORS_MAX_HEADER);
        goto fail;
    }
    if (hlen < 2 || hlen > size - 8) {
        rc = lm_err_set(err, -EINVAL,
                        "%s: header length %llu runs past end of file (%zu bytes) or is empty",
                        path, (unsigned long long)hlen, size);
        goto fail;
    }
    json_error_t je;
    root = json_loadb((const char *)p + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root || !json_is_object(root)) {
        rc = lm_err_set(err, -EINVAL, "%s: header is not a JSON object: %s (at byte %d)", path,
                        root ? "not an object" : je.text, root ? 0 : je.position);
        goto fail;
    }
    size_t data_size = size - 8 - (size_t)hlen;
    const uint8_t *data = p + 8 + hlen;
    size_t n = json_object_size(root), names_len = 0;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) names_len += strlen(key) + 1;
    f->t = calloc(n ? n : 1, sizeof *f->t);
    f->names = malloc(names_len ? names_len : 1);
    ranges = calloc(n ? n : 1, sizeof *ranges);
    if (!f->t || !f->names || !ranges) {
        rc = lm_err_set(err, -ENOMEM, "%s: out of memory for %zu tensors", path, n);
        goto fail;
    }
    char *np = f->names;
    json_object_foreach(root, key, val)
    {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(val)) {
                rc = lm_err_set(err, -EINVAL, "%s: __metadata__ is not an object", path);
                goto fail;
            }
            continue;
        }
        safetensors_tensor *t = &f->t[f->n];
        size_t kl = strlen(key) + 1;
        memcpy(np, key, kl);
        t->name = np;
        np += kl;
        rc = parse_entry(path, key, val, data_size, data, t, &ranges[f->n], err);
        if (rc)
            goto fail;
        ranges[f->n].idx = f->n;
        f->n++;
    }
    qsort(ranges, f->n, sizeof *ranges, cmp_range);
    size_t prev_end = 0;
    const char *prev_name = NULL;
    for (size_t i = 0; i < f->n; i++) {
        if (ranges[i].begin == ranges[i].end)
            continue;
        if (prev_name && ranges[i].begin < prev_end) {
            rc = lm_err_set(err, -EINVAL, "%s: tensor '%s': data range [%zu, %zu) overlaps tensor '%s'",
                            path, f->t[ranges[i].idx].name, ranges[i].begin, ranges[i].end,
                            prev_name);
            goto fail;
        }
        prev_end = ranges[i].end;
        prev_name = f->t[ranges[i].idx].name;
    }
    qsort(f->t, f->n, sizeof *f->t, cmp_name);
    free(ranges);
    json_decref(root);
    *ret = f;
    return 0;
fail:
    free(ranges);
    json_decref(root);
    safetensors_close(f);
    return rc;
}

void safetensors_close(safetensors_file *f)
{
    if (!f)
        return;
    if (f->map)
        munmap(f->map, f->map_size);
    free(f->t);
    free(f->names);
    free(f->path);
    free(f);
}

const char *safetensors_path(const safetensors_file *f) { return f->path; }
size_t safetensors_count(const safetensors_file *f) { return f->n; }
const safetensors_tensor *safetensors_at(const safetensors_file *f, size_t i)
{
    return i < f->n ? &f->t[i] : NULL;
}

const safetensors_tensor *safetensors_find(const safetensors_file *f, const char *name)
{
    safetensors_tensor key = {.name = name};
    return bsearch(&key, f->t, f->n, sizeof *f->t, cmp_name);
}

/* ---- writer ----------------------------------------------------------- */

typedef struct wtensor {
    char *name;
    st_dtype dtype;
    int32_t ndim;
    int64_t shape[SAFETENSORS_MAX_DIMS];
    size_t nbytes;
    const void *data;
} wtensor;

struct safetensors_writer {
    wtensor *t;
    size_t n, cap;
    size_t total;
};

int safetensors_writer_create(safetensors_writer **ret, lm_err *err)
{
    *ret = calloc(1, sizeof **ret);
    return *ret ? 0 : lm_err_set(err, -ENOMEM, "safetensors writer: out of memory");
}

void safetensors_writer_free(safetensors_writer *w)
{
    if (!w)
        return;
    for (size_t i = 0; i < w->n; i++)
        free(w->t[i].name);
    free(w->t);
    free(w);
}

int safetensors_writer_add(safetensors_writer *w, const char *name, st_dtype dtype, int32_t ndim,
                           const int64_t *shape, const void *data, lm_err *err)
{
    if ((unsigned)dtype >= ST_DTYPE_COUNT || ndim < 0 || ndim > SAFETENSORS_MAX_DIMS)
        return lm_err_set(err, -EINVAL, "safetensors writer: tensor '%s': bad dtype or rank",
                          name);
    for (size_t i = 0; i < w->n; i++)
        if (!strcmp(w->t[i].name, name))
            return lm_err_set(err, -EEXIST, "safetensors writer: tensor '%s' declared twice",
                              name);
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 64;
        wtensor *nt = realloc(w->t, cap * sizeof *nt);
        if (!nt)
            return lm_err_set(err, -ENOMEM, "safetensors writer: out of memory");
        w->t = nt;
        w->cap = cap;
    }
    wtensor *t = &w->t[w->n];
    memset(t, 0, sizeof *t);
    size_t nb = st_dtype_size(dtype);
    for (int32_t d = 0; d < ndim; d++) {
        if (shape[d] < 0)
            return lm_err_set(err, -EINVAL, "safetensors writer: tensor '%s': negative dim",
                              name);
        t->shape[d] = shape[d];
        nb *= (size_t)shape[d];
    }
    if (!(t->name = strdup(name)))
        return lm_err_set(err, -ENOMEM, "safetensors writer: out of memory");
    t->dtype = dtype;
    t->ndim = ndim;
    t->nbytes = nb;
    t->data = data;
    w->total += nb;
    return (int)w->n++;
}

size_t safetensors_writer_data_bytes(const safetensors_writer *w) { return w->total; }

static int write_all(FILE *fp, const void *p, size_t n, const char *path, lm_err *err)
{
    if (n && fwrite(p, 1, n, fp) != n)
        return lm_err_set(err, -EIO, "%s: write failed: %s", path, strerror(errno));
    return 0;
}

int safetensors_writer_write(safetensors_writer *w, const char *path, safetensors_fill_fn fill,
                             void *user, lm_err *err)
{
    json_t *root = json_object();
    json_t *meta = json_object();
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(root, "__metadata__", meta);
    size_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        wtensor *t = &w->t[i];
        json_t *e = json_object(), *sh = json_array();
        json_object_set_new(e, "dtype", json_string(st_dtype_name(t->dtype)));
        for (int32_t d = 0; d < t->ndim; d++)
            json_array_append_new(sh, json_integer(t->shape[d]));
        json_object_set_new(e, "shape", sh);
        json_t *o = json_array();
        json_array_append_new(o, json_integer((json_int_t)off));
        json_array_append_new(o, json_integer((json_int_t)(off + t->nbytes)));
        json_object_set_new(e, "data_offsets", o);
        json_object_set_new(root, t->name, e);
        off += t->nbytes;
    }
    char *hdr = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!hdr)
        return lm_err_set(err, -ENOMEM, "%s: cannot encode header", path);
    size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7; /* keep data 8-aligned */
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        free(hdr);
        return lm_err_set(err, -errno, "%s: cannot create: %s", path, strerror(errno));
    }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    int rc = write_all(fp, len8, 8, path, err);
    if (!rc)
        rc = write_all(fp, hdr, hl, path, err);
    for (size_t i = hl; !rc && i < padded; i++)
        rc = write_all(fp, " ", 1, path, err);
    free(hdr);
    void *buf = NULL;
    for (size_t i = 0; !rc && i < w->n; i++) {
        wtensor *t = &w->t[i];
        if (t->data) {
            rc = write_all(fp, t->data, t->nbytes, path, err);
            continue;
        }
        if (!fill) {
            rc = lm_err_set(err, -EINVAL, "%s: tensor '%s' has no data and no fill callback", path,
                            t->name);
            break;
        }
        if (!buf && !(buf = malloc(SAFETENSORS_FILL_CHUNK))) {
            rc = lm_err_set(err, -ENOMEM, "%s: out of memory", path);
            break;
        }
        for (size_t o = 0; !rc && o < t->nbytes; o += SAFETENSORS_FILL_CHUNK) {
            size_t len = t->nbytes - o < SAFETENSORS_FILL_CHUNK ? t->nbytes - o
                                                                : SAFETENSORS_FILL_CHUNK;
            rc = fill(user, i, buf, o, len, err);
            if (!rc)
                rc = write_all(fp, buf, len, path, err);
        }
    }
    free(buf);
    if (fclose(fp) != 0 && !rc)
        rc = lm_err_set(err, -EIO, "%s: close failed: %s", path, strerror(errno));
    return rc;
}
