/*
 * quantize.c: layer-by-layer GPTQ of a checkpoint and the writing of the
 * GPTQ v1 output folder (see quantize.h for the procedure).
 *
 * Memory: the source shards are mmapped; one decoder layer is converted to
 * float at a time; the packed 4-bit results (the output's size) accumulate
 * until the final write; calibration activations are [tokens][hidden].
 */
#include "engine/quantize.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "engine/gptq_cuda.h"
#include "engine/quantize_fwd.h"
#include "engine/safetensors.h"

/* ---- output tensor list ----------------------------------------------- */

typedef struct out_tensor {
    char *name;
    st_dtype dtype;
    int32_t ndim;
    int64_t shape[2];
    const void *data;   /* into the source mapping or `owned` */
    void *owned;
    size_t nbytes;
} out_tensor;

typedef struct qctx {
    const quantize_opts *o;
    qfwd_model m;
    out_tensor *out;
    size_t n_out, cap_out;
    char **qnames;      /* "<prefix>.weight" of every quantized Linear */
    size_t n_qnames, cap_qnames;
    quantize_summary sum;
    struct timespec t0;
    int32_t layer;
} qctx;

static double now_s(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + 1e-9 * (double)(t.tv_nsec - t0->tv_nsec);
}

static void progress(qctx *c, const char *stage, int32_t item, int32_t n_items, double frac)
{
    if (!c->o->on_progress)
        return;
    quantize_progress p = {c->layer, c->m.cfg.n_layers, stage, item, n_items, now_s(&c->t0), -1};
    double done = (double)c->layer + frac;
    if (done > 0.05)
        p.eta_s = p.elapsed_s / done * ((double)c->m.cfg.n_layers - done);
    c->o->on_progress(c->o->user, &p);
}

static int out_add(qctx *c, const char *name, st_dtype dt, int32_t ndim, int64_t d0, int64_t d1,
                   const void *data, void *owned, size_t nbytes, lm_err *err)
{
    if (c->n_out == c->cap_out) {
        size_t cap = c->cap_out ? 2 * c->cap_out : 256;
        out_tensor *n = realloc(c->out, sizeof *n * cap);
        if (!n) {
            free(owned);
            return lm_err_set(err, -ENOMEM, "out of memory");
        }
        c->out = n;
        c->cap_out = cap;
    }
    out_tensor *t = &c->out[c->n_out];
    t->name = strdup(name);
    if (!t->name) {
        free(owned);
        return lm_err_set(err, -ENOMEM, "out of memory");
    }
    t->dtype = dt;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->data = data;
    t->owned = owned;
    t->nbytes = nbytes;
    c->n_out++;
    return 0;
}

static int qname_add(qctx *c, const char *prefix, lm_err *err)
{
    if (c->n_qnames == c->cap_qnames) {
        size_t cap = c->cap_qnames ? 2 * c->cap_qnames : 256;
        char **n = realloc(c->qnames, sizeof *n * cap);
        if (!n)
            return lm_err_set(err, -ENOMEM, "out of memory");
        c->qnames = n;
        c->cap_qnames = cap;
    }
    size_t len = strlen(prefix) + 8;
    char *s = malloc(len);
    if (!s)
        return lm_err_set(err, -ENOMEM, "out of memory");
    snprintf(s, len, "%s.weight", prefix);
    c->qnames[c->n_qnames++] = s;
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int cmp_out(const void *a, const void *b)
{
    return strcmp(((const out_tensor *)a)->name, ((const out_tensor *)b)->name);
}

static void ctx_free(qctx *c)
{
    for (size_t i = 0; i < c->n_out; i++) {
        free(c->out[i].name);
        free(c->out[i].owned);
    }
    free(c->out);
    for (size_t i = 0; i < c->n_qnames; i++)
        free(c->qnames[i]);
    free(c->qnames);
    qfwd_model_close(&c->m);
}

/* ---- one Linear ------------------------------------------------------- */

/* Quantize lin with Hessian h (NULL for RTN), measure on held-out inputs
 * xh [nh][k], replace lin->w by the dequantized weights and queue the
 * packed arrays for output. */
static int quant_linear(qctx *c, qfwd_linear *lin, const gptq_hessian *h, const float *xh,
                        int64_t nh, quantize_layer_stats *st, lm_err *err)
{
    gptq_params p = c->o->gptq;
    gptq_result r, rtn = {0};
    int rc = c->o->gptq_cuda ? gptq_cuda_quantize(lin->w, lin->n, lin->k, h, &p, &r, err)
                             : gptq_quantize(lin->w, lin->n, lin->k, h, &p, &r, err);
    if (rc)
        return lm_err_prefix(err, "%s", lin->name);
    if (nh > 0) {
        double e = gptq_recon_error(lin->w, r.deq, lin->n, lin->k, xh, nh), er = e;
        if (p.method != GPTQ_METHOD_RTN) {
            gptq_params pr = p;
            pr.method = GPTQ_METHOD_RTN;
            rc = gptq_quantize(lin->w, lin->n, lin->k, NULL, &pr, &rtn, err);
            if (rc) {
                gptq_result_free(&r);
                return rc;
            }
            er = gptq_recon_error(lin->w, rtn.deq, lin->n, lin->k, xh, nh);
            gptq_result_free(&rtn);
        }
        float *zero = calloc((size_t)lin->n * lin->k, sizeof(float));
        if (zero)
            st->ref += gptq_recon_error(lin->w, zero, lin->n, lin->k, xh, nh);
        free(zero);
        st->err_method += e;
        st->err_rtn += er;
        st->worse_linears += e > er;
    }
    st->n_linears++;
    if (c->o->on_linear)
        c->o->on_linear(c->o->user, lin->name, r.deq, lin->n, lin->k);
    memcpy(lin->w, r.deq, sizeof(float) * (size_t)lin->n * lin->k);

    char name[QFWD_NAME_MAX + 16];
    int32_t n = lin->n, k = lin->k, ng = k / p.group;
    size_t bq = sizeof(int32_t) * (size_t)(k / 8) * n, bz = sizeof(int32_t) * (size_t)ng * (n / 8),
           bs = sizeof(uint16_t) * (size_t)ng * n, bg = sizeof(int32_t) * (size_t)k;
    snprintf(name, sizeof name, "%s.qweight", lin->name);
    rc = out_add(c, name, ST_I32, 2, k / 8, n, r.qweight, r.qweight, bq, err);
    r.qweight = NULL;
    if (!rc) {
        snprintf(name, sizeof name, "%s.qzeros", lin->name);
        rc = out_add(c, name, ST_I32, 2, ng, n / 8, r.qzeros, r.qzeros, bz, err);
        r.qzeros = NULL;
    }
    if (!rc) {
        snprintf(name, sizeof name, "%s.scales", lin->name);
        rc = out_add(c, name, ST_F16, 2, ng, n, r.scales, r.scales, bs, err);
        r.scales = NULL;
    }
    if (!rc) {
        snprintf(name, sizeof name, "%s.g_idx", lin->name);
        rc = out_add(c, name, ST_I32, 1, k, 0, r.g_idx, r.g_idx, bg, err);
        r.g_idx = NULL;
    }
    gptq_result_free(&r);
    if (!rc)
        rc = qname_add(c, lin->name, err);
    c->sum.bytes_linear_out += bq + bz + bs + bg;
    c->sum.n_linears++;
    return rc;
}

static int quant_rtn_layer(qctx *c, qfwd_layer *l, quantize_layer_stats *st, lm_err *err)
{
    qfwd_linear *lin[4096];
    int32_t n = qfwd_layer_linears(l, lin, 4096);
    if (n > 4096)
        return lm_err_set(err, -E2BIG, "layer %d: too many Linears (%d)", l->index, n);
    for (int32_t i = 0; i < n; i++) {
        int rc = quant_linear(c, lin[i], NULL, NULL, 0, st, err);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- one layer with calibration --------------------------------------- */

typedef struct calib {
    int32_t n_seq, seq_len;
    int64_t t, tc;      /* all rows, calibration rows (the first tc) */
    float *h;           /* [t][hidden] residual stream */
} calib;

static int hess_from(const qctx *c, gptq_hessian *h, int32_t k, const float *x, int64_t rows,
                     lm_err *err)
{
    int rc = gptq_hessian_init(h, k, err);
    if (rc)
        return rc;
    if (c->o->gptq_cuda) /* X^T X by cuBLAS on the GPU */
        return gptq_cuda_hessian_add(h, x, rows, k, err);
    gptq_hessian_add(h, x, rows, k);
    return 0;
}

/* Expert (or shared expert / dense MLP) e of the layer on inputs xe:
 * [cal rows][hidden] then [held rows][hidden]; xall = every calibration row
 * (fallback). */
static int quant_mlp(qctx *c, qfwd_linear *g, qfwd_linear *u, qfwd_linear *d, const float *xe,
                     int64_t ncal, int64_t nheld, const float *xall, int64_t nall,
                     quantize_layer_stats *st, lm_err *err)
{
    int32_t hid = g->k, w = g->n;
    int gptq = c->o->gptq.method == GPTQ_METHOD_GPTQ;
    const float *xc = xe;
    int64_t nc = ncal;
    if (ncal < st->min_expert_tokens)
        st->min_expert_tokens = ncal;
    int32_t min_tok = c->o->min_expert_tokens > 0 ? c->o->min_expert_tokens
                                                  : QUANTIZE_DEFAULT_MIN_EXPERT_TOKENS;
    if (ncal < min_tok && nall > ncal) {
        xc = xall;
        nc = nall;
        st->n_fallback_experts++;
    }
    gptq_hessian h = {0};
    int rc = 0;
    float *hm = malloc(sizeof(float) * (size_t)(nc + nheld + 1) * w);
    if (!hm)
        return lm_err_set(err, -ENOMEM, "out of memory");
    if (gptq)
        rc = hess_from(c, &h, hid, xc, nc, err);
    if (!rc)
        rc = quant_linear(c, g, gptq ? &h : NULL, xe + ncal * hid, nheld, st, err);
    if (!rc)
        rc = quant_linear(c, u, gptq ? &h : NULL, xe + ncal * hid, nheld, st, err);
    gptq_hessian_free(&h);
    if (rc)
        goto out;
    /* down's inputs through the quantized gate/up: calibration rows first
     * (xc), then held-out rows */
    qfwd_mlp_hidden(g, u, xc, nc, hm);
    qfwd_mlp_hidden(g, u, xe + ncal * hid, nheld, hm + nc * w);
    if (gptq)
        rc = hess_from(c, &h, w, hm, nc, err);
    if (!rc)
        rc = quant_linear(c, d, gptq ? &h : NULL, hm + nc * w, nheld, st, err);
    gptq_hessian_free(&h);
out:
    free(hm);
    return rc;
}

static int quant_calib_layer(qctx *c, qfwd_layer *l, calib *cb, quantize_layer_stats *st,
                             lm_err *err)
{
    const model_config *cfg = &c->m.cfg;
    int32_t hid = cfg->hidden, qd = cfg->n_heads * cfg->head_dim, topk = cfg->top_k;
    int64_t t = cb->t, tc = cb->tc, th = t - tc;
    int gptq = c->o->gptq.method == GPTQ_METHOD_GPTQ;
    float *xn = malloc(sizeof(float) * (size_t)t * hid);
    float *oin = malloc(sizeof(float) * (size_t)t * qd);
    float *att = malloc(sizeof(float) * (size_t)t * hid);
    float *xe = malloc(sizeof(float) * (size_t)t * hid);
    int32_t *ex = malloc(sizeof(int32_t) * (size_t)t * topk);
    float *wt = malloc(sizeof(float) * (size_t)t * topk);
    gptq_hessian h = {0};
    int rc = 0;
    if (!xn || !oin || !att || !xe || !ex || !wt) {
        rc = lm_err_set(err, -ENOMEM, "layer %d: out of memory for %lld calibration tokens",
                        l->index, (long long)t);
        goto out;
    }
    progress(c, "attention", 0, 0, 0.0);
    qfwd_rmsnorm(cb->h, l->in_norm, t, hid, cfg->rms_eps, xn);
    if (gptq && (rc = hess_from(c, &h, hid, xn, tc, err)))
        goto out;
    qfwd_linear *qkv[3] = {&l->q, &l->k, &l->v};
    for (int i = 0; i < 3 && !rc; i++)
        rc = quant_linear(c, qkv[i], gptq ? &h : NULL, xn + tc * hid, th, st, err);
    gptq_hessian_free(&h);
    if (!rc)
        rc = qfwd_attention(&c->m, l, xn, cb->n_seq, cb->seq_len, oin, NULL, err);
    if (!rc && gptq)
        rc = hess_from(c, &h, qd, oin, tc, err);
    if (!rc)
        rc = quant_linear(c, &l->o, gptq ? &h : NULL, oin + tc * qd, th, st, err);
    gptq_hessian_free(&h);
    if (rc)
        goto out;
    qfwd_linear_apply(&l->o, oin, t, att);
    for (int64_t i = 0; i < t * hid; i++)
        cb->h[i] += att[i];

    qfwd_rmsnorm(cb->h, l->post_norm, t, hid, cfg->rms_eps, xn);
    qfwd_route(&c->m, l, xn, t, ex, wt);
    st->min_expert_tokens = INT64_MAX;
    for (int32_t e = 0; e < l->n_experts && !rc; e++) {
        progress(c, "experts", e + 1, l->n_experts, 0.1 + 0.8 * e / l->n_experts);
        int64_t ncal = 0, nheld = 0;
        for (int pass = 0; pass < 2; pass++)
            for (int64_t i = pass ? tc : 0; i < (pass ? t : tc); i++)
                for (int32_t j = 0; j < topk; j++)
                    if (ex[i * topk + j] == e) {
                        memcpy(xe + (ncal + nheld) * hid, xn + i * hid, sizeof(float) * hid);
                        *(pass ? &nheld : &ncal) += 1;
                    }
        rc = quant_mlp(c, &l->gate[e], &l->up[e], &l->down[e], xe, ncal, nheld, xn, tc, st, err);
    }
    if (!rc && l->has_shared) {
        progress(c, "shared expert", 0, 0, 0.9);
        int32_t saved = st->n_fallback_experts;
        int64_t smin = st->min_expert_tokens;
        rc = quant_mlp(c, &l->sgate, &l->sup, &l->sdown, xn, tc, th, xn, tc, st, err);
        st->n_fallback_experts = saved; /* sees every token: not an expert fallback */
        st->min_expert_tokens = smin;
    }
    if (!rc) /* propagate through the quantized block */
        rc = qfwd_moe_add(&c->m, l, xn, t, cb->h, err);
out:
    gptq_hessian_free(&h);
    free(xn);
    free(oin);
    free(att);
    free(xe);
    free(ex);
    free(wt);
    return rc;
}

/* ---- checks ----------------------------------------------------------- */

static int check_config(const model_config *cfg, const quantize_opts *o, lm_err *err)
{
    if (cfg->quant.gptq)
        return lm_err_set(err, -EINVAL, "%s is already quantized (quantization_config: gptq, "
                          "%d bits); quantize needs a bf16/fp16 checkpoint", o->model_dir,
                          cfg->quant.bits);
    int32_t g = o->gptq.group;
    if (g <= 0 || g % 32)
        return lm_err_set(err, -EINVAL, "group size %d: must be a positive multiple of 32 (the "
                          "engine's INT4 layout)", g);
    struct {
        const char *what;
        int32_t k;
    } ks[] = {{"hidden_size", cfg->hidden},
              {"num_attention_heads*head_dim", cfg->n_heads * cfg->head_dim},
              {"expert width (moe_intermediate_size)",
               cfg->moe_intermediate > 0 ? cfg->moe_intermediate : cfg->intermediate},
              {"shared_expert_intermediate_size", cfg->shared_intermediate}};
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++)
        if (ks[i].k > 0 && ks[i].k % g)
            return lm_err_set(err, -EINVAL, "group size %d does not divide %s = %d (a Linear's "
                              "input count K); choose a group that divides it", g, ks[i].what,
                              ks[i].k);
    for (int32_t i = 0; i < cfg->n_layers; i++)
        if (!cfg->layer_moe[i] && cfg->intermediate % g)
            return lm_err_set(err, -EINVAL, "group size %d does not divide intermediate_size = %d "
                              "(dense layer %d)", g, cfg->intermediate, i);
    if (o->gptq.method == GPTQ_METHOD_GPTQ && (!o->tokens || o->n_calib <= 0 || o->seq_len < 2))
        return lm_err_set(err, -EINVAL, "GPTQ needs calibration tokens (at least one sequence "
                          "of 2 or more tokens)");
    if (o->tokens && (o->n_calib <= 0 || o->n_heldout < 0 || o->seq_len < 2))
        return lm_err_set(err, -EINVAL, "calibration: %d sequences (+%d held out) of %d tokens",
                          o->n_calib, o->n_heldout, o->seq_len);
    return 0;
}

int quantize_check(const quantize_opts *o, lm_err *err)
{
    model_config cfg;
    int rc = config_load(o->model_dir, &cfg, err);
    if (rc)
        return rc;
    return check_config(&cfg, o, err);
}

/* ---- writing ---------------------------------------------------------- */

static int copy_file(const char *src_dir, const char *dst_dir, const char *name, lm_err *err)
{
    char src[4096], dst[4096];
    snprintf(src, sizeof src, "%s/%s", src_dir, name);
    snprintf(dst, sizeof dst, "%s/%s", dst_dir, name);
    FILE *in = fopen(src, "rb");
    if (!in)
        return 0; /* optional */
    FILE *out = fopen(dst, "wb");
    if (!out) {
        fclose(in);
        return lm_err_set(err, -errno, "%s: cannot create", dst);
    }
    char buf[65536];
    size_t n;
    int rc = 0;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, out) != n) {
            rc = lm_err_set(err, -EIO, "%s: write failed", dst);
            break;
        }
    fclose(in);
    if (fclose(out) && !rc)
        rc = lm_err_set(err, -EIO, "%s: write failed", dst);
    return rc;
}

static json_t *quant_config_json(const quantize_opts *o)
{
    json_t *q = json_object();
    json_object_set_new(q, "quant_method", json_string("gptq"));
    json_object_set_new(q, "bits", json_integer(4));
    json_object_set_new(q, "group_size", json_integer(o->gptq.group));
    json_object_set_new(q, "desc_act", json_boolean(o->gptq.method == GPTQ_METHOD_GPTQ &&
                                                    o->gptq.act_order));
    json_object_set_new(q, "sym", json_boolean(o->gptq.sym));
    json_object_set_new(q, "true_sequential", json_true());
    json_object_set_new(q, "checkpoint_format", json_string("gptq"));
    json_object_set_new(q, "damp_percent", json_real(o->gptq.percdamp));
    json_object_set_new(q, "static_groups", json_false());
    return q;
}

static int write_json(json_t *j, const char *dir, const char *name, lm_err *err)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (json_dump_file(j, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER))
        return lm_err_set(err, -EIO, "%s: cannot write", path);
    return 0;
}

static int write_configs(qctx *c, lm_err *err)
{
    const quantize_opts *o = c->o;
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", o->model_dir);
    json_error_t je;
    json_t *cfg = json_load_file(path, JSON_PRESERVE_ORDER, &je);
    if (!cfg)
        return lm_err_set(err, -EINVAL, "%s: %s", path, je.text);
    json_object_set_new(cfg, "quantization_config", quant_config_json(o));
    int rc = write_json(cfg, o->out_dir, "config.json", err);
    json_decref(cfg);
    if (rc)
        return rc;
    json_t *qc = quant_config_json(o);
    json_t *meta = json_object();
    json_object_set_new(meta, "quantizer", json_string("lightmoe " LIGHTMOE_VERSION));
    json_object_set_new(meta, "method", json_string(o->gptq.method == GPTQ_METHOD_GPTQ ? "gptq"
                                                                                       : "rtn"));
    json_object_set_new(meta, "calibration_sequences", json_integer(o->tokens ? o->n_calib : 0));
    json_object_set_new(meta, "calibration_seq_len", json_integer(o->tokens ? o->seq_len : 0));
    json_object_set_new(meta, "min_expert_tokens",
                        json_integer(o->min_expert_tokens > 0 ? o->min_expert_tokens
                                                              : QUANTIZE_DEFAULT_MIN_EXPERT_TOKENS));
    json_object_set_new(qc, "meta", meta);
    rc = write_json(qc, o->out_dir, "quantize_config.json", err);
    json_decref(qc);
    if (rc)
        return rc;
    const char *copy[] = {"tokenizer.json",         "tokenizer_config.json", "chat_template.jinja",
                          "generation_config.json", "special_tokens_map.json", "tokenizer.model",
                          "vocab.json",             "merges.txt",             "added_tokens.json"};
    for (size_t i = 0; i < sizeof copy / sizeof copy[0] && !rc; i++)
        rc = copy_file(o->model_dir, o->out_dir, copy[i], err);
    return rc;
}

static int write_shards(qctx *c, lm_err *err)
{
    const quantize_opts *o = c->o;
    size_t limit = o->max_shard_bytes ? o->max_shard_bytes : QUANTIZE_DEFAULT_SHARD_BYTES;
    qsort(c->out, c->n_out, sizeof *c->out, cmp_out);
    /* shard boundaries: greedy in name order */
    int32_t *shard = malloc(sizeof(int32_t) * (c->n_out + 1));
    if (!shard)
        return lm_err_set(err, -ENOMEM, "out of memory");
    int32_t ns = 1;
    size_t cur = 0;
    for (size_t i = 0; i < c->n_out; i++) {
        if (cur > 0 && cur + c->out[i].nbytes > limit) {
            ns++;
            cur = 0;
        }
        shard[i] = ns - 1;
        cur += c->out[i].nbytes;
        c->sum.bytes_out += c->out[i].nbytes;
    }
    int rc = 0;
    json_t *map = json_object();
    for (int32_t s = 0; s < ns && !rc; s++) {
        char file[128], path[4096];
        if (ns == 1)
            snprintf(file, sizeof file, "model.safetensors");
        else
            snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", s + 1, ns);
        snprintf(path, sizeof path, "%s/%s", o->out_dir, file);
        safetensors_writer *w = NULL;
        rc = safetensors_writer_create(&w, err);
        for (size_t i = 0; i < c->n_out && !rc; i++) {
            if (shard[i] != s)
                continue;
            int r = safetensors_writer_add(w, c->out[i].name, c->out[i].dtype, c->out[i].ndim,
                                           c->out[i].shape, c->out[i].data, err);
            rc = r < 0 ? r : 0;
            json_object_set_new(map, c->out[i].name, json_string(file));
        }
        if (!rc)
            rc = safetensors_writer_write(w, path, NULL, NULL, err);
        safetensors_writer_free(w);
    }
    if (!rc && ns > 1) {
        json_t *idx = json_object(), *md = json_object();
        json_object_set_new(md, "total_size", json_integer((json_int_t)c->sum.bytes_out));
        json_object_set_new(idx, "metadata", md);
        json_object_set(idx, "weight_map", map);
        rc = write_json(idx, o->out_dir, "model.safetensors.index.json", err);
        json_decref(idx);
    } else if (!rc) { /* a stale index from an earlier sharded run would mislead loaders */
        char path[4096];
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", o->out_dir);
        remove(path);
    }
    json_decref(map);
    free(shard);
    c->sum.n_shards = ns;
    return rc;
}

/* ---- driver ----------------------------------------------------------- */

static int pass_through(qctx *c, lm_err *err)
{
    qsort(c->qnames, c->n_qnames, sizeof *c->qnames, cmp_str);
    for (int f = 0; f < c->m.n_files; f++) {
        const safetensors_file *sf = c->m.files[f];
        for (size_t i = 0; i < safetensors_count(sf); i++) {
            const safetensors_tensor *t = safetensors_at(sf, i);
            c->sum.bytes_in += t->nbytes;
            const char *key = t->name;
            if (bsearch(&key, c->qnames, c->n_qnames, sizeof *c->qnames, cmp_str)) {
                c->sum.bytes_linear_in += t->nbytes;
                continue;
            }
            if (t->ndim > 2)
                return lm_err_set(err, -ENOTSUP, "tensor '%s' has %d dimensions; only 1-2 are "
                                  "expected in this architecture", t->name, t->ndim);
            int rc = out_add(c, t->name, t->dtype, t->ndim, t->ndim > 0 ? t->shape[0] : 1,
                             t->ndim > 1 ? t->shape[1] : 0, t->data, NULL, t->nbytes, err);
            if (rc)
                return rc;
        }
    }
    return 0;
}

int quantize_run(const quantize_opts *o, quantize_summary *ret, lm_err *err)
{
    qctx c;
    memset(&c, 0, sizeof c);
    memset(ret, 0, sizeof *ret);
    c.o = o;
    clock_gettime(CLOCK_MONOTONIC, &c.t0);
    int rc = qfwd_model_open(o->model_dir, &c.m, err);
    if (rc)
        return rc;
    const model_config *cfg = &c.m.cfg;
    calib cb = {0};
    if ((rc = check_config(cfg, o, err)))
        goto out;
    if (mkdir(o->out_dir, 0755) && errno != EEXIST) {
        rc = lm_err_set(err, -errno, "%s: cannot create the output folder", o->out_dir);
        goto out;
    }
    if (o->tokens) {
        cb.n_seq = o->n_calib + o->n_heldout;
        cb.seq_len = o->seq_len;
        cb.t = (int64_t)cb.n_seq * cb.seq_len;
        cb.tc = (int64_t)o->n_calib * cb.seq_len;
        cb.h = malloc(sizeof(float) * (size_t)cb.t * cfg->hidden);
        if (!cb.h) {
            rc = lm_err_set(err, -ENOMEM, "out of memory for %lld calibration tokens",
                            (long long)cb.t);
            goto out;
        }
        if ((rc = qfwd_embed(&c.m, o->tokens, cb.t, cb.h, err)))
            goto out;
    }
    for (int32_t i = 0; i < cfg->n_layers && !rc; i++) {
        c.layer = i;
        qfwd_layer l;
        quantize_layer_stats st = {.layer = i};
        rc = qfwd_layer_load(&c.m, i, &l, err);
        if (rc)
            break;
        rc = o->tokens ? quant_calib_layer(&c, &l, &cb, &st, err) : quant_rtn_layer(&c, &l, &st, err);
        qfwd_layer_free(&l);
        if (!rc && o->on_layer)
            o->on_layer(o->user, &st);
    }
    if (!rc) {
        c.layer = cfg->n_layers;
        progress(&c, "writing", 0, 0, 0.0);
        rc = pass_through(&c, err);
    }
    if (!rc)
        rc = write_shards(&c, err);
    if (!rc)
        rc = write_configs(&c, err);
    if (!rc)
        *ret = c.sum;
out:
    free(cb.h);
    ctx_free(&c);
    return rc;
}
