/*
 * safetensors.h: read (mmap, validated) and write safetensors files.
 *
 * File format: u64 little-endian header length N, N bytes of JSON
 * {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
 * then the data area; offsets are relative to the data area.
 *
 * Reader invariants, all checked by safetensors_open before anything is used:
 * 8 <= N <= SAFETENSORS_MAX_HEADER and 8 + N <= file size; the JSON is well
 * formed and every entry has a known dtype, a shape of at most
 * SAFETENSORS_MAX_DIMS non-negative dims and data_offsets inside the data
 * area; end - begin == product(shape) * dtype size (no overflow); no two
 * non-empty ranges overlap; data is aligned to its element size. A failure
 * is -EINVAL (or -EIO/-ENOMEM) with a message naming the file, the tensor
 * and what is wrong. After a successful open, every tensor's `data` points
 * inside the read-only mapping and holds exactly `nbytes` bytes.
 *
 * Ownership: a safetensors_file owns its mapping and tensor table; tensor
 * pointers stay valid until safetensors_close. Read-only after open, so any
 * number of threads may read it.
 *
 * Writer: declare tensors (name, dtype, shape, and either the bytes or NULL
 * for "filled by the callback"), then safetensors_writer_write streams the
 * header and the data to a file in declaration order, asking the callback
 * for at most SAFETENSORS_FILL_CHUNK bytes at a time, so that a multi-GB
 * tensor never needs to exist in memory.
 */
#ifndef LIGHTMOE_SAFETENSORS_H
#define LIGHTMOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SAFETENSORS_MAX_HEADER (100u << 20) /* as the reference implementation */
#define SAFETENSORS_MAX_DIMS 8
#define SAFETENSORS_FILL_CHUNK ((size_t)16 << 20)

typedef enum st_dtype {
    ST_BOOL = 0,
    ST_U8,
    ST_I8,
    ST_I16,
    ST_U16,
    ST_F16,
    ST_BF16,
    ST_I32,
    ST_U32,
    ST_F32,
    ST_I64,
    ST_U64,
    ST_F64,
    ST_DTYPE_COUNT
} st_dtype;

/* Bytes per element; name as spelled in the header ("BF16"). */
size_t st_dtype_size(st_dtype t);
const char *st_dtype_name(st_dtype t);
/* Parse a header spelling; -EINVAL for an unknown one. */
int st_dtype_parse(const char *s, st_dtype *ret);

typedef struct safetensors_tensor {
    const char *name;
    st_dtype dtype;
    int32_t ndim;
    int64_t shape[SAFETENSORS_MAX_DIMS];
    int64_t numel;
    const void *data; /* inside the mapping */
    size_t nbytes;
} safetensors_tensor;

typedef struct safetensors_file safetensors_file;

/* Map and validate `path`. */
int safetensors_open(const char *path, safetensors_file **ret, lm_err *err);
/* Unmap and free; NULL is fine. */
void safetensors_close(safetensors_file *f);

const char *safetensors_path(const safetensors_file *f);
size_t safetensors_count(const safetensors_file *f);
const safetensors_tensor *safetensors_at(const safetensors_file *f, size_t i);
/* NULL when absent. */
const safetensors_tensor *safetensors_find(const safetensors_file *f, const char *name);

/* ---- writer --------------------------------------------------------- */

typedef struct safetensors_writer safetensors_writer;

/* Fill buf with `len` bytes of tensor `index` starting at byte `offset` of
 * its data. Return 0 or a negative errno (setting err). */
typedef int (*safetensors_fill_fn)(void *user, size_t index, void *buf, size_t offset,
                                   size_t len, lm_err *err);

int safetensors_writer_create(safetensors_writer **ret, lm_err *err);
void safetensors_writer_free(safetensors_writer *w);

/* Declare a tensor. `data` (nbytes = numel * dtype size) is NOT copied and
 * must stay valid until write; NULL means the fill callback provides it.
 * Returns its index (>= 0) or a negative errno (duplicate name, bad shape). */
int safetensors_writer_add(safetensors_writer *w, const char *name, st_dtype dtype, int32_t ndim,
                           const int64_t *shape, const void *data, lm_err *err);

/* Bytes the file will have (header + data), e.g. for an index's total_size. */
size_t safetensors_writer_data_bytes(const safetensors_writer *w);

/* Write every declared tensor to `path` (created or truncated). */
int safetensors_writer_write(safetensors_writer *w, const char *path, safetensors_fill_fn fill,
                             void *user, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
