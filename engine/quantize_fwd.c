/*
 * quantize_fwd.c: checkpoint access and the sequence-level float32 layer
 * forward used for GPTQ calibration (see quantize_fwd.h).
 */
#include "engine/quantize_fwd.h"

#include <cblas.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gptq.h"
#include "engine/half.h"

/* ---- checkpoint ------------------------------------------------------- */

static int add_file(qfwd_model *m, const char *dir, const char *file, lm_err *err)
{
    for (int i = 0; i < m->n_files; i++) {
        const char *p = safetensors_path(m->files[i]);
        size_t lp = strlen(p), lf = strlen(file);
        if (lp >= lf + 1 && !strcmp(p + lp - lf, file) && p[lp - lf - 1] == '/')
            return 0;
    }
    safetensors_file **nf = realloc(m->files, sizeof *nf * (size_t)(m->n_files + 1));
    if (!nf)
        return lm_err_set(err, -ENOMEM, "out of memory");
    m->files = nf;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    int rc = safetensors_open(path, &m->files[m->n_files], err);
    if (rc)
        return rc;
    m->n_files++;
    return 0;
}

int qfwd_model_open(const char *dir, qfwd_model *ret, lm_err *err)
{
    memset(ret, 0, sizeof *ret);
    int rc = config_load(dir, &ret->cfg, err);
    if (rc)
        return rc;
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_error_t je;
    json_t *idx = json_load_file(path, 0, &je);
    if (idx) {
        json_t *map = json_object_get(idx, "weight_map");
        const char *key;
        json_t *val;
        if (!json_is_object(map)) {
            json_decref(idx);
            return lm_err_set(err, -EINVAL, "%s: no 'weight_map' object", path);
        }
        json_object_foreach(map, key, val)
        {
            if (!json_is_string(val) || strchr(json_string_value(val), '/')) {
                rc = lm_err_set(err, -EINVAL, "%s: weight_map['%s'] is not a file name", path,
                                key);
                break;
            }
            rc = add_file(ret, dir, json_string_value(val), err);
            if (rc)
                break;
        }
        json_decref(idx);
    } else {
        rc = add_file(ret, dir, "model.safetensors", err);
    }
    if (rc)
        qfwd_model_close(ret);
    return rc;
}

void qfwd_model_close(qfwd_model *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n_files; i++)
        safetensors_close(m->files[i]);
    free(m->files);
    memset(m, 0, sizeof *m);
}

const safetensors_tensor *qfwd_model_find(const qfwd_model *m, const char *name)
{
    for (int i = 0; i < m->n_files; i++) {
        const safetensors_tensor *t = safetensors_find(m->files[i], name);
        if (t)
            return t;
    }
    return NULL;
}

static void to_float(const safetensors_tensor *t, int64_t off, int64_t count, float *out)
{
    if (t->dtype == ST_F32) {
        memcpy(out, (const float *)t->data + off, sizeof(float) * (size_t)count);
        return;
    }
    const uint16_t *s = (const uint16_t *)t->data + off;
    if (t->dtype == ST_BF16)
        for (int64_t i = 0; i < count; i++)
            out[i] = bf16_to_float(s[i]);
    else
        for (int64_t i = 0; i < count; i++)
            out[i] = fp16_to_float(s[i]);
}

static int check_float_tensor(const safetensors_tensor *t, const char *name, int64_t numel,
                              lm_err *err)
{
    if (!t)
        return lm_err_set(err, -EINVAL, "tensor '%s' not found in the checkpoint", name);
    if (t->dtype != ST_BF16 && t->dtype != ST_F16 && t->dtype != ST_F32)
        return lm_err_set(err, -EINVAL, "tensor '%s' is %s, expected BF16, F16 or F32", name,
                          st_dtype_name(t->dtype));
    if (numel >= 0 && t->numel != numel)
        return lm_err_set(err, -EINVAL, "tensor '%s' has %lld elements, expected %lld", name,
                          (long long)t->numel, (long long)numel);
    return 0;
}

int qfwd_tensor_float(const qfwd_model *m, const char *name, int64_t numel, float **ret,
                      lm_err *err)
{
    *ret = NULL;
    const safetensors_tensor *t = qfwd_model_find(m, name);
    int rc = check_float_tensor(t, name, numel, err);
    if (rc)
        return rc;
    float *f = malloc(sizeof(float) * (size_t)(t->numel ? t->numel : 1));
    if (!f)
        return lm_err_set(err, -ENOMEM, "out of memory for '%s'", name);
    to_float(t, 0, t->numel, f);
    *ret = f;
    return 0;
}

/* ---- layer loading ---------------------------------------------------- */

/* Dequantize a GPTQ v1 Linear (qweight/qzeros/scales/g_idx) to float. */
static int load_gptq(const qfwd_model *m, const char *prefix, int32_t n, int32_t k, float **ret,
                     lm_err *err)
{
    char name[QFWD_NAME_MAX + 16];
    const safetensors_tensor *t[4];
    const char *sfx[4] = {"qweight", "qzeros", "scales", "g_idx"};
    for (int i = 0; i < 4; i++) {
        snprintf(name, sizeof name, "%s.%s", prefix, sfx[i]);
        t[i] = qfwd_model_find(m, name);
        if (!t[i] && i < 3)
            return lm_err_set(err, -EINVAL, "GPTQ tensor '%s' missing", name);
    }
    int32_t group = m->cfg.quant.group_size > 0 ? m->cfg.quant.group_size : k;
    int32_t ng = k / group;
    if (k % group || n % 8 || k % 8 || t[0]->dtype != ST_I32 || t[0]->numel != (int64_t)k / 8 * n ||
        t[1]->dtype != ST_I32 || t[1]->numel != (int64_t)ng * (n / 8) || t[2]->dtype != ST_F16 ||
        t[2]->numel != (int64_t)ng * n || (t[3] && (t[3]->dtype != ST_I32 || t[3]->numel != k)))
        return lm_err_set(err, -EINVAL, "'%s': GPTQ tensors do not match a %dx%d Linear with "
                          "group %d", prefix, n, k, group);
    float *w = malloc(sizeof(float) * (size_t)n * k);
    if (!w)
        return lm_err_set(err, -ENOMEM, "out of memory for '%s'", prefix);
    int rc = gptq_unpack(t[0]->data, t[1]->data, t[2]->data, t[3] ? t[3]->data : NULL, n, k,
                         group, w, err);
    if (rc) {
        free(w);
        return lm_err_prefix(err, "%s", prefix);
    }
    *ret = w;
    return 0;
}

static int load_linear(const qfwd_model *m, const char *prefix, int32_t n, int32_t k,
                       qfwd_linear *l, lm_err *err)
{
    char name[QFWD_NAME_MAX + 16];
    if (strlen(prefix) >= QFWD_NAME_MAX)
        return lm_err_set(err, -EINVAL, "tensor name '%.64s...' too long", prefix);
    snprintf(l->name, sizeof l->name, "%s", prefix);
    l->n = n;
    l->k = k;
    snprintf(name, sizeof name, "%s.weight", prefix);
    const safetensors_tensor *t = qfwd_model_find(m, name);
    int rc;
    if (!t) {
        snprintf(name, sizeof name, "%s.qweight", prefix);
        if (qfwd_model_find(m, name)) {
            if (!m->allow_gptq)
                return lm_err_set(err, -EINVAL,
                                  "'%s' is already quantized (%s present): quantize needs a "
                                  "16-bit checkpoint", prefix, name);
            rc = load_gptq(m, prefix, n, k, &l->w, err);
            goto bias;
        }
        snprintf(name, sizeof name, "%s.weight", prefix);
    }
    rc = qfwd_tensor_float(m, name, (int64_t)n * k, &l->w, err);
bias:
    if (rc)
        return rc;
    snprintf(name, sizeof name, "%s.bias", prefix);
    if (qfwd_model_find(m, name))
        return qfwd_tensor_float(m, name, n, &l->b, err);
    return 0;
}

static void free_linear(qfwd_linear *l)
{
    free(l->w);
    free(l->b);
    l->w = l->b = NULL;
}

int qfwd_layer_load(const qfwd_model *m, int32_t index, qfwd_layer *l, lm_err *err)
{
    const model_config *c = &m->cfg;
    memset(l, 0, sizeof *l);
    l->index = index;
    char p[64], name[160];
    int32_t hd = c->head_dim, qd = c->n_heads * hd, kvd = c->n_kv_heads * hd, h = c->hidden;
    int rc = 0;
#define TRY(x)                                                                                   \
    do {                                                                                         \
        if ((rc = (x)))                                                                          \
            goto fail;                                                                           \
    } while (0)
    snprintf(p, sizeof p, "model.layers.%d", index);
    snprintf(name, sizeof name, "%s.input_layernorm.weight", p);
    TRY(qfwd_tensor_float(m, name, h, &l->in_norm, err));
    snprintf(name, sizeof name, "%s.post_attention_layernorm.weight", p);
    TRY(qfwd_tensor_float(m, name, h, &l->post_norm, err));
    if (c->qk_norm) {
        snprintf(name, sizeof name, "%s.self_attn.q_norm.weight", p);
        TRY(qfwd_tensor_float(m, name, hd, &l->q_norm, err));
        snprintf(name, sizeof name, "%s.self_attn.k_norm.weight", p);
        TRY(qfwd_tensor_float(m, name, hd, &l->k_norm, err));
    }
    snprintf(name, sizeof name, "%s.self_attn.q_proj", p);
    TRY(load_linear(m, name, qd, h, &l->q, err));
    snprintf(name, sizeof name, "%s.self_attn.k_proj", p);
    TRY(load_linear(m, name, kvd, h, &l->k, err));
    snprintf(name, sizeof name, "%s.self_attn.v_proj", p);
    TRY(load_linear(m, name, kvd, h, &l->v, err));
    snprintf(name, sizeof name, "%s.self_attn.o_proj", p);
    TRY(load_linear(m, name, h, qd, &l->o, err));

    int mixtral = c->arch == MODEL_ARCH_MIXTRAL;
    const char *blk = mixtral ? "block_sparse_moe" : "mlp";
    const char *gn = mixtral ? "w1" : "gate_proj", *un = mixtral ? "w3" : "up_proj",
               *dn = mixtral ? "w2" : "down_proj";
    int moe = c->layer_moe[index];
    int32_t width = moe ? (c->moe_intermediate > 0 ? c->moe_intermediate : c->intermediate)
                        : c->intermediate;
    l->n_experts = moe ? c->n_experts : 1;
    l->gate = calloc((size_t)l->n_experts, sizeof(qfwd_linear));
    l->up = calloc((size_t)l->n_experts, sizeof(qfwd_linear));
    l->down = calloc((size_t)l->n_experts, sizeof(qfwd_linear));
    if (!l->gate || !l->up || !l->down) {
        rc = lm_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if (moe) {
        snprintf(l->router_name, sizeof l->router_name, "%s.%s.gate.weight", p, blk);
        TRY(qfwd_tensor_float(m, l->router_name, (int64_t)c->n_experts * h, &l->router, err));
    }
    for (int32_t e = 0; e < l->n_experts; e++) {
        char ep[128];
        if (moe)
            snprintf(ep, sizeof ep, "%s.%s.experts.%d", p, blk, e);
        else
            snprintf(ep, sizeof ep, "%s.mlp", p);
        snprintf(name, sizeof name, "%s.%s", ep, gn);
        TRY(load_linear(m, name, width, h, &l->gate[e], err));
        snprintf(name, sizeof name, "%s.%s", ep, un);
        TRY(load_linear(m, name, width, h, &l->up[e], err));
        snprintf(name, sizeof name, "%s.%s", ep, dn);
        TRY(load_linear(m, name, h, width, &l->down[e], err));
    }
    if (moe && c->shared_intermediate > 0) {
        int32_t sw = c->shared_intermediate;
        l->has_shared = 1;
        snprintf(name, sizeof name, "%s.mlp.shared_expert.gate_proj", p);
        TRY(load_linear(m, name, sw, h, &l->sgate, err));
        snprintf(name, sizeof name, "%s.mlp.shared_expert.up_proj", p);
        TRY(load_linear(m, name, sw, h, &l->sup, err));
        snprintf(name, sizeof name, "%s.mlp.shared_expert.down_proj", p);
        TRY(load_linear(m, name, h, sw, &l->sdown, err));
        snprintf(name, sizeof name, "%s.mlp.shared_expert_gate.weight", p);
        TRY(qfwd_tensor_float(m, name, h, &l->shared_gate, err));
    }
#undef TRY
    return 0;
fail:
    qfwd_layer_free(l);
    return rc;
}

void qfwd_layer_free(qfwd_layer *l)
{
    if (!l)
        return;
    free(l->in_norm);
    free(l->post_norm);
    free(l->q_norm);
    free(l->k_norm);
    free_linear(&l->q);
    free_linear(&l->k);
    free_linear(&l->v);
    free_linear(&l->o);
    free(l->router);
    for (int32_t e = 0; e < l->n_experts; e++) {
        if (l->gate)
            free_linear(&l->gate[e]);
        if (l->up)
            free_linear(&l->up[e]);
        if (l->down)
            free_linear(&l->down[e]);
    }
    free(l->gate);
    free(l->up);
    free(l->down);
    free_linear(&l->sgate);
    free_linear(&l->sup);
    free_linear(&l->sdown);
    free(l->shared_gate);
    memset(l, 0, sizeof *l);
}

int qfwd_layer_linears(qfwd_layer *l, qfwd_linear **ret, int32_t max)
{
    int32_t n = 0;
#define PUT(x)                                                                                   \
    do {                                                                                         \
        if (n < max)                                                                             \
            ret[n] = (x);                                                                        \
        n++;                                                                                     \
    } while (0)
    PUT(&l->q);
    PUT(&l->k);
    PUT(&l->v);
    PUT(&l->o);
    for (int32_t e = 0; e < l->n_experts; e++) {
        PUT(&l->gate[e]);
        PUT(&l->up[e]);
        PUT(&l->down[e]);
    }
    if (l->has_shared) {
        PUT(&l->sgate);
        PUT(&l->sup);
        PUT(&l->sdown);
    }
#undef PUT
    return n;
}

/* ---- ops -------------------------------------------------------------- */

void qfwd_linear_apply(const qfwd_linear *l, const float *x, int64_t t, float *y)
{
    if (t <= 0)
        return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)t, l->n, l->k, 1.0f, x, l->k, l->w,
                l->k, 0.0f, y, l->n);
    if (l->b)
        for (int64_t i = 0; i < t; i++)
            for (int32_t j = 0; j < l->n; j++)
                y[i * l->n + j] += l->b[j];
}

void qfwd_rmsnorm(const float *x, const float *w, int64_t t, int32_t d, float eps, float *out)
{
    for (int64_t i = 0; i < t; i++) {
        const float *r = x + i * d;
        float ss = 0;
        for (int32_t j = 0; j < d; j++)
            ss += r[j] * r[j];
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (int32_t j = 0; j < d; j++)
            out[i * d + j] = w[j] * (r[j] * inv);
    }
}

/* Rotate-half RoPE of one head vector at position pos (transformers'
 * default rope: pairs (i, i + d/2)). */
static void rope(float *x, int32_t d, int32_t pos, const float *inv_freq)
{
    int32_t half = d / 2;
    for (int32_t i = 0; i < half; i++) {
        float a = (float)pos * inv_freq[i];
        float c = cosf(a), s = sinf(a);
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

int qfwd_attention(const qfwd_model *m, const qfwd_layer *l, const float *xn, int32_t n_seq,
                   int32_t seq_len, float *ret_o_in, float *out, lm_err *err)
{
    const model_config *c = &m->cfg;
    int32_t hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    int32_t qd = nh * hd, kvd = nkv * hd;
    int64_t t = (int64_t)n_seq * seq_len;
    float *q = malloc(sizeof(float) * (size_t)t * qd);
    float *k = malloc(sizeof(float) * (size_t)t * kvd);
    float *v = malloc(sizeof(float) * (size_t)t * kvd);
    float *s = malloc(sizeof(float) * (size_t)seq_len * seq_len);
    float *inv_freq = malloc(sizeof(float) * (size_t)(hd / 2 + 1));
    if (!q || !k || !v || !s || !inv_freq) {
        free(q);
        free(k);
        free(v);
        free(s);
        free(inv_freq);
        return lm_err_set(err, -ENOMEM, "attention: out of memory for %lld tokens",
                          (long long)t);
    }
    qfwd_linear_apply(&l->q, xn, t, q);
    qfwd_linear_apply(&l->k, xn, t, k);
    qfwd_linear_apply(&l->v, xn, t, v);
    for (int32_t i = 0; i < hd / 2; i++)
        inv_freq[i] = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)hd);
    for (int64_t i = 0; i < t; i++) {
        int32_t pos = (int32_t)(i % seq_len);
        for (int32_t h = 0; h < nh; h++) {
            float *qh = q + i * qd + h * hd;
            if (l->q_norm)
                qfwd_rmsnorm(qh, l->q_norm, 1, hd, c->rms_eps, qh);
            rope(qh, hd, pos, inv_freq);
        }
        for (int32_t h = 0; h < nkv; h++) {
            float *kh = k + i * kvd + h * hd;
            if (l->k_norm)
                qfwd_rmsnorm(kh, l->k_norm, 1, hd, c->rms_eps, kh);
            rope(kh, hd, pos, inv_freq);
        }
    }
    float scale = 1.0f / sqrtf((float)hd);
    int32_t rep = nh / nkv;
    for (int32_t sq = 0; sq < n_seq; sq++) {
        int64_t base = (int64_t)sq * seq_len;
        for (int32_t h = 0; h < nh; h++) {
            const float *qh = q + base * qd + h * hd;
            const float *kh = k + base * kvd + (h / rep) * hd;
            const float *vh = v + base * kvd + (h / rep) * hd;
            /* S = scale * Q K^T over the sequence, then causal softmax rows */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, seq_len, seq_len, hd, scale, qh,
                        qd, kh, kvd, 0.0f, s, seq_len);
            for (int32_t i = 0; i < seq_len; i++) {
                float *row = s + (size_t)i * seq_len, mx = row[0], sum = 0;
                for (int32_t j = 1; j <= i; j++)
                    mx = row[j] > mx ? row[j] : mx;
                for (int32_t j = 0; j <= i; j++) {
                    row[j] = expf(row[j] - mx);
                    sum += row[j];
                }
                for (int32_t j = 0; j <= i; j++)
                    row[j] /= sum;
                for (int32_t j = i + 1; j < seq_len; j++)
                    row[j] = 0;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, seq_len, hd, seq_len, 1.0f, s,
                        seq_len, vh, kvd, 0.0f, ret_o_in + base * qd + h * hd, qd);
        }
    }
    if (out)
        qfwd_linear_apply(&l->o, ret_o_in, t, out);
    free(q);
    free(k);
    free(v);
    free(s);
    free(inv_freq);
    return 0;
}

int qfwd_route(const qfwd_model *m, const qfwd_layer *l, const float *xn, int64_t t,
               int32_t *ret_expert, float *ret_weight)
{
    const model_config *c = &m->cfg;
    int32_t topk = c->top_k, ne = l->n_experts;
    if (!l->router) {
        for (int64_t i = 0; i < t; i++)
            for (int32_t j = 0; j < topk; j++) {
                ret_expert[i * topk + j] = j == 0 ? 0 : -1;
                ret_weight[i * topk + j] = j == 0 ? 1.0f : 0.0f;
            }
        return 0;
    }
    float *lg = malloc(sizeof(float) * (size_t)ne);
    if (!lg)
        return -ENOMEM;
    for (int64_t i = 0; i < t; i++) {
        const float *x = xn + i * c->hidden;
        float mx = -INFINITY, sum = 0;
        for (int32_t e = 0; e < ne; e++) {
            float d = 0;
            for (int32_t j = 0; j < c->hidden; j++)
                d += l->router[(size_t)e * c->hidden + j] * x[j];
            lg[e] = d;
            mx = d > mx ? d : mx;
        }
        for (int32_t e = 0; e < ne; e++) {
            lg[e] = expf(lg[e] - mx);
            sum += lg[e];
        }
        for (int32_t e = 0; e < ne; e++)
            lg[e] /= sum;
        float tsum = 0;
        for (int32_t j = 0; j < topk; j++) {
            int32_t best = -1;
            for (int32_t e = 0; e < ne; e++)
                if (lg[e] >= 0 && (best < 0 || lg[e] > lg[best]))
                    best = e;
            ret_expert[i * topk + j] = best;
            ret_weight[i * topk + j] = lg[best];
            tsum += lg[best];
            lg[best] = -1; /* taken */
        }
        /* mixtral renormalises always (softmax over the top-k logits) */
        if (c->norm_topk_prob || c->arch == MODEL_ARCH_MIXTRAL)
            for (int32_t j = 0; j < topk; j++)
                ret_weight[i * topk + j] /= tsum;
    }
    free(lg);
    return 0;
}

void qfwd_mlp_hidden(const qfwd_linear *gate, const qfwd_linear *up, const float *x, int64_t t,
                     float *h)
{
    int32_t w = gate->n;
    float *u = malloc(sizeof(float) * (size_t)(t > 0 ? t : 1) * w);
    qfwd_linear_apply(gate, x, t, h);
    qfwd_linear_apply(up, x, t, u);
    for (int64_t i = 0; i < t * w; i++) {
        float g = h[i];
        h[i] = g / (1.0f + expf(-g)) * u[i];
    }
    free(u);
}

int qfwd_moe_add(const qfwd_model *m, const qfwd_layer *l, const float *xn, int64_t t, float *acc,
                 lm_err *err)
{
    const model_config *c = &m->cfg;
    int32_t h = c->hidden, topk = c->top_k;
    int32_t wmax = l->gate[0].n > l->sgate.n ? l->gate[0].n : l->sgate.n;
    int32_t *ex = malloc(sizeof(int32_t) * (size_t)t * topk);
    float *wt = malloc(sizeof(float) * (size_t)t * topk);
    int64_t *rows = malloc(sizeof(int64_t) * (size_t)t);
    float *rw = malloc(sizeof(float) * (size_t)t);
    float *xe = malloc(sizeof(float) * (size_t)t * h);
    float *hm = malloc(sizeof(float) * (size_t)t * wmax);
    float *y = malloc(sizeof(float) * (size_t)t * h);
    int rc = 0;
    if (!ex || !wt || !rows || !rw || !xe || !hm || !y) {
        rc = lm_err_set(err, -ENOMEM, "moe: out of memory for %lld tokens", (long long)t);
        goto out;
    }
    qfwd_route(m, l, xn, t, ex, wt);
    for (int32_t e = 0; e < l->n_experts; e++) {
        int64_t cnt = 0;
        for (int64_t i = 0; i < t; i++)
            for (int32_t j = 0; j < topk; j++)
                if (ex[i * topk + j] == e) {
                    rows[cnt] = i;
                    rw[cnt] = wt[i * topk + j];
                    memcpy(xe + cnt * h, xn + i * h, sizeof(float) * (size_t)h);
                    cnt++;
                }
        if (!cnt)
            continue;
        qfwd_mlp_hidden(&l->gate[e], &l->up[e], xe, cnt, hm);
        qfwd_linear_apply(&l->down[e], hm, cnt, y);
        for (int64_t r = 0; r < cnt; r++)
            for (int32_t j = 0; j < h; j++)
                acc[rows[r] * h + j] += rw[r] * y[r * h + j];
    }
    if (l->has_shared) {
        qfwd_mlp_hidden(&l->sgate, &l->sup, xn, t, hm);
        qfwd_linear_apply(&l->sdown, hm, t, y);
        for (int64_t i = 0; i < t; i++) {
            float d = 0;
            for (int32_t j = 0; j < h; j++)
                d += l->shared_gate[j] * xn[i * h + j];
            float g = 1.0f / (1.0f + expf(-d));
            for (int32_t j = 0; j < h; j++)
                acc[i * h + j] += g * y[i * h + j];
        }
    }
out:
    free(ex);
    free(wt);
    free(rows);
    free(rw);
    free(xe);
    free(hm);
    free(y);
    return rc;
}

int qfwd_layer_forward(const qfwd_model *m, const qfwd_layer *l, float *h, int32_t n_seq,
                       int32_t seq_len, lm_err *err)
{
    const model_config *c = &m->cfg;
    int64_t t = (int64_t)n_seq * seq_len;
    int32_t d = c->hidden;
    float *xn = malloc(sizeof(float) * (size_t)t * d);
    float *oin = malloc(sizeof(float) * (size_t)t * c->n_heads * c->head_dim);
    float *att = malloc(sizeof(float) * (size_t)t * d);
    int rc = 0;
    if (!xn || !oin || !att) {
        rc = lm_err_set(err, -ENOMEM, "layer %d: out of memory", l->index);
        goto out;
    }
    qfwd_rmsnorm(h, l->in_norm, t, d, c->rms_eps, xn);
    rc = qfwd_attention(m, l, xn, n_seq, seq_len, oin, att, err);
    if (rc)
        goto out;
    for (int64_t i = 0; i < t * d; i++)
        h[i] += att[i];
    qfwd_rmsnorm(h, l->post_norm, t, d, c->rms_eps, xn);
    rc = qfwd_moe_add(m, l, xn, t, h, err);
out:
    free(xn);
    free(oin);
    free(att);
    return rc;
}

int qfwd_embed(const qfwd_model *m, const int32_t *tokens, int64_t t, float *h, lm_err *err)
{
    const char *name = "model.embed_tokens.weight";
    const safetensors_tensor *e = qfwd_model_find(m, name);
    int32_t d = m->cfg.hidden;
    int rc = check_float_tensor(e, name, (int64_t)m->cfg.vocab * d, err);
    if (rc)
        return rc;
    for (int64_t i = 0; i < t; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab)
            return lm_err_set(err, -EINVAL, "token id %d at position %lld outside the vocabulary "
                              "(%d)", tokens[i], (long long)i, m->cfg.vocab);
        to_float(e, (int64_t)tokens[i] * d, d, h + i * d);
    }
    return 0;
}

int qfwd_logits(const qfwd_model *m, const float *h, int64_t t, float *logits, lm_err *err)
{
    const model_config *c = &m->cfg;
    float *nw = NULL;
    qfwd_linear head = {0};
    float *xn = malloc(sizeof(float) * (size_t)t * c->hidden);
    int rc = xn ? 0 : lm_err_set(err, -ENOMEM, "logits: out of memory");
    if (!rc)
        rc = qfwd_tensor_float(m, "model.norm.weight", c->hidden, &nw, err);
    if (!rc) {
        head.n = c->vocab;
        head.k = c->hidden;
        rc = qfwd_tensor_float(m, c->tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight",
                               (int64_t)c->vocab * c->hidden, &head.w, err);
    }
    if (!rc) {
        qfwd_rmsnorm(h, nw, t, c->hidden, c->rms_eps, xn);
        qfwd_linear_apply(&head, xn, t, logits);
    }
    free(xn);
    free(nw);
    free(head.w);
    return rc;
}
