/*
 * quant_util.h: shared helpers of the quantization tests (header-only):
 * recording the weights quantize reports, writing a float32 "dequantized"
 * checkpoint from them, reading GPTQ tensors with the README's layout, and
 * running the calibration forward for logits.
 */
#ifndef LIGHTMOE_TESTS_QUANT_UTIL_H
#define LIGHTMOE_TESTS_QUANT_UTIL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/gptq.h"
#include "engine/half.h"
#include "engine/quantize.h"
#include "engine/quantize_fwd.h"
#include "engine/safetensors.h"

static int qu_failures;
#define QU_CHECK(cond, ...)                                                                 \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            qu_failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);        \
            fprintf(stderr, __VA_ARGS__);                                                   \
            fprintf(stderr, "\n");                                                          \
        }                                                                                   \
    } while (0)

/* Weights reported through quantize_opts.on_linear. */
typedef struct qu_record {
    int n;
    char **names;
    float **w;
    int32_t *rows, *cols;
} qu_record;

static inline void qu_on_linear(void *user, const char *name, const float *deq, int32_t n, int32_t k)
{
    qu_record *r = user;
    r->names = realloc(r->names, sizeof(char *) * (size_t)(r->n + 1));
    r->w = realloc(r->w, sizeof(float *) * (size_t)(r->n + 1));
    r->rows = realloc(r->rows, sizeof(int32_t) * (size_t)(r->n + 1));
    r->cols = realloc(r->cols, sizeof(int32_t) * (size_t)(r->n + 1));
    r->names[r->n] = strdup(name);
    r->w[r->n] = malloc(sizeof(float) * (size_t)n * k);
    memcpy(r->w[r->n], deq, sizeof(float) * (size_t)n * k);
    r->rows[r->n] = n;
    r->cols[r->n] = k;
    r->n++;
}

static inline void qu_record_free(qu_record *r)
{
    for (int i = 0; i < r->n; i++) {
        free(r->names[i]);
        free(r->w[i]);
    }
    free(r->names);
    free(r->w);
    free(r->rows);
    free(r->cols);
    memset(r, 0, sizeof *r);
}

/* Index of the record whose "<name>.weight" is `tensor`, or -1. */
static inline int qu_record_find(const qu_record *r, const char *tensor)
{
    for (int i = 0; i < r->n; i++) {
        size_t l = strlen(r->names[i]);
        if (!strncmp(tensor, r->names[i], l) && !strcmp(tensor + l, ".weight"))
            return i;
    }
    return -1;
}

static inline int qu_copy_file(const char *src, const char *dst)
{
    FILE *in = fopen(src, "rb"), *out = in ? fopen(dst, "wb") : NULL;
    char buf[65536];
    size_t n;
    if (!in || !out) {
        if (in)
            fclose(in);
        return -1;
    }
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        fwrite(buf, 1, n, out);
    fclose(in);
    fclose(out);
    return 0;
}

/* out_dir <- the source checkpoint in float32 with every recorded Linear
 * replaced by its reported (dequantized) weight. */
static inline int qu_write_dequant(const char *src_dir, const qu_record *rec, const char *out_dir)
{
    qfwd_model m;
    lm_err err = {0};
    if (qfwd_model_open(src_dir, &m, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    mkdir(out_dir, 0755);
    safetensors_writer *w = NULL;
    safetensors_writer_create(&w, &err);
    int nbuf = 0;
    float **bufs = NULL;
    for (int f = 0; f < m.n_files; f++)
        for (size_t i = 0; i < safetensors_count(m.files[f]); i++) {
            const safetensors_tensor *t = safetensors_at(m.files[f], i);
            int r = qu_record_find(rec, t->name);
            const float *data;
            if (r >= 0) {
                data = rec->w[r];
            } else {
                float *b;
                qfwd_tensor_float(&m, t->name, t->numel, &b, &err);
                bufs = realloc(bufs, sizeof(float *) * (size_t)(nbuf + 1));
                bufs[nbuf++] = b;
                data = b;
            }
            safetensors_writer_add(w, t->name, ST_F32, t->ndim, t->shape, data, &err);
        }
    char path[4096], src[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", out_dir);
    int rc = safetensors_writer_write(w, path, NULL, NULL, &err);
    if (rc)
        fprintf(stderr, "write dequant: %s\n", err.msg);
    safetensors_writer_free(w);
    for (int i = 0; i < nbuf; i++)
        free(bufs[i]);
    free(bufs);
    const char *files[] = {"config.json", "generation_config.json", "tokenizer.json",
                           "tokenizer_config.json", "chat_template.jinja"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(src, sizeof src, "%s/%s", src_dir, files[i]);
        snprintf(path, sizeof path, "%s/%s", out_dir, files[i]);
        qu_copy_file(src, path);
    }
    qfwd_model_close(&m);
    return rc;
}

/* Logits [n_seq*len][vocab] of the checkpoint in dir (float32 forward). */
static inline float *qu_logits(const char *dir, const int32_t *tok, int32_t n_seq, int32_t len)
{
    qfwd_model m;
    lm_err err = {0};
    if (qfwd_model_open(dir, &m, &err)) {
        fprintf(stderr, "%s: %s\n", dir, err.msg);
        return NULL;
    }
    int64_t t = (int64_t)n_seq * len;
    float *h = malloc(sizeof(float) * (size_t)t * m.cfg.hidden);
    float *lg = malloc(sizeof(float) * (size_t)t * m.cfg.vocab);
    int rc = qfwd_embed(&m, tok, t, h, &err);
    for (int32_t i = 0; !rc && i < m.cfg.n_layers; i++) {
        qfwd_layer l;
        rc = qfwd_layer_load(&m, i, &l, &err);
        if (!rc)
            rc = qfwd_layer_forward(&m, &l, h, n_seq, len, &err);
        qfwd_layer_free(&l);
    }
    if (!rc)
        rc = qfwd_logits(&m, h, t, lg, &err);
    free(h);
    qfwd_model_close(&m);
    if (rc) {
        fprintf(stderr, "%s: %s\n", dir, err.msg);
        free(lg);
        return NULL;
    }
    return lg;
}

/* Mean over rows of KL(softmax(p) || softmax(q)). */
static inline double qu_mean_kl(const float *p, const float *q, int64_t rows, int32_t vocab)
{
    double sum = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *a = p + r * vocab, *b = q + r * vocab;
        double ma = a[0], mb = b[0], sa = 0, sb = 0;
        for (int32_t v = 1; v < vocab; v++) {
            ma = fmax(ma, a[v]);
            mb = fmax(mb, b[v]);
        }
        for (int32_t v = 0; v < vocab; v++) {
            sa += exp(a[v] - ma);
            sb += exp(b[v] - mb);
        }
        double la = ma + log(sa), lb = mb + log(sb), kl = 0;
        for (int32_t v = 0; v < vocab; v++) {
            double lpa = a[v] - la, lpb = b[v] - lb;
            kl += exp(lpa) * (lpa - lpb);
        }
        sum += kl;
    }
    return sum / (double)rows;
}

static uint64_t qu_rng = 88172645463325252ull;
static inline int32_t qu_rand_below(int32_t n)
{
    qu_rng ^= qu_rng << 13;
    qu_rng ^= qu_rng >> 7;
    qu_rng ^= qu_rng << 17;
    return (int32_t)((qu_rng >> 33) % (uint64_t)n);
}

#endif
