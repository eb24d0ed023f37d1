/*
 * model.c: load a hub folder into a `model` (model.h).
 *
 * Steps: config -> open the shards named by model.safetensors.index.json (or
 * the single model.safetensors), each fully validated by safetensors_open ->
 * for every weight the architecture needs, find it (through the index's
 * weight_map when sharded), check dtype and shape, and build the struct.
 * GPTQ linears are repacked into the int4.h layout here; with
 * quantize_int4, 16-bit linears are quantized here. Nothing else allocates
 * per weight.
 */
#include "engine/model.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/half.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "GPTQ words are little-endian");

struct model_storage {
    safetensors_file **files;
    size_t n_files;
    json_t *weight_map;         /* index.json weight_map, or NULL for one file */
    void **owned;               /* allocations freed with the model */
    size_t n_owned, cap_owned;
};

typedef struct loader {
    model *m;
    model_storage *s;
    model_load_options opt;
    lm_err *err;
} loader;

void model_load_options_default(model_load_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->group = 128;
}

static void *own_alloc(loader *L, size_t bytes)
{
    model_storage *s = L->s;
    if (s->n_owned == s->cap_owned) {
        size_t cap = s->cap_owned ? s->cap_owned * 2 : 256;
        void **n = realloc(s->owned, cap * sizeof *n);
        if (!n)
            return NULL;
        s->owned = n;
        s->cap_owned = cap;
    }
    void *p = calloc(1, bytes ? bytes : 1);
    if (p)
        s->owned[s->n_owned++] = p;
    return p;
}

static int oom(loader *L, const char *what)
{
    return lm_err_set(L->err, -ENOMEM, "%s: out of memory loading %s", L->m->dir, what);
}

/* ---- tensor lookup ------------------------------------------------------ */

/* Find a tensor; NULL (no error) when absent. *ret_file names its file. */
static const safetensors_tensor *find_opt(loader *L, const char *name, const char **ret_file)
{
    model_storage *s = L->s;
    if (s->weight_map) {
        json_t *fv = json_object_get(s->weight_map, name);
        if (!json_is_string(fv))
            return NULL;
        const char *fname = json_string_value(fv);
        for (size_t i = 0; i < s->n_files; i++) {
            const char *p = safetensors_path(s->files[i]);
            size_t pl = strlen(p), fl = strlen(fname);
            if (pl >= fl + 1 && !strcmp(p + pl - fl, fname) && p[pl - fl - 1] == '/') {
                *ret_file = p;
                return safetensors_find(s->files[i], name);
            }
        }
        return NULL;
    }
    *ret_file = safetensors_path(s->files[0]);
    return safetensors_find(s->files[0], name);
}

static const char *short_file(loader *L, const char *name)
{
    const char *f = NULL;
    if (L->s->weight_map) {
        json_t *fv = json_object_get(L->s->weight_map, name);
        if (json_is_string(fv))
            return json_string_value(fv);
    } else {
        f = safetensors_path(L->s->files[0]);
    }
    return f ? f : "model.safetensors.index.json";
}

/* Find a required tensor with the given shape (dims < 0 are not checked). */
static int get_tensor(loader *L, const char *name, int32_t ndim, const int64_t *shape,
                      const safetensors_tensor **ret)
{
    const char *file = NULL;
    const safetensors_tensor *t = find_opt(L, name, &file);
    if (!t)
        return lm_err_set(L->err, -EINVAL, "%s: tensor '%s' is missing (%s)", L->m->dir, name,
                          short_file(L, name));
    int ok = t->ndim == ndim;
    for (int32_t d = 0; ok && d < ndim; d++)
        ok = shape[d] < 0 || t->shape[d] == shape[d];
    if (!ok) {
        char want[128] = "", got[128] = "";
        size_t wl = 0, gl = 0;
        for (int32_t d = 0; d < ndim; d++)
            wl += (size_t)snprintf(want + wl, sizeof want - wl, "%s%lld", d ? ", " : "",
                                   (long long)shape[d]);
        for (int32_t d = 0; d < t->ndim && d < 8; d++)
            gl += (size_t)snprintf(got + gl, sizeof got - gl, "%s%lld", d ? ", " : "",
                                   (long long)t->shape[d]);
        return lm_err_set(L->err, -EINVAL, "%s: tensor '%s': shape [%s], expected [%s]", file,
                          name, got, want);
    }
    *ret = t;
    return 0;
}

static int is_float_dtype(st_dtype d) { return d == ST_F32 || d == ST_F16 || d == ST_BF16; }

static float elem_to_float(st_dtype d, const void *p, size_t i)
{
    switch (d) {
    case ST_F32: return ((const float *)p)[i];
    case ST_F16: return fp16_to_float(((const uint16_t *)p)[i]);
    case ST_BF16: return bf16_to_float(((const uint16_t *)p)[i]);
    default: return 0.f;
    }
}

/* A 1-D float tensor of length n converted to an owned float array. */
static int get_vector(loader *L, const char *name, int64_t n, const float **ret)
{
    const safetensors_tensor *t;
    int rc = get_tensor(L, name, 1, &n, &t);
    if (rc)
        return rc;
    if (!is_float_dtype(t->dtype))
        return lm_err_set(L->err, -EINVAL, "%s: tensor '%s': dtype %s, expected F32/F16/BF16",
                          short_file(L, name), name, st_dtype_name(t->dtype));
    float *v = own_alloc(L, (size_t)n * sizeof *v);
    if (!v)
        return oom(L, name);
    for (int64_t i = 0; i < n; i++)
        v[i] = elem_to_float(t->dtype, t->data, (size_t)i);
    *ret = v;
    return 0;
}

/* ---- INT4 ----------------------------------------------------------------- */

int int4_quantize_rtn(const float *w, int32_t n, int32_t k, int32_t group, uint8_t *qs,
                      uint16_t *scales, uint8_t *zeros, lm_err *err)
{
    if (group <= 0 || group % INT4_K_ALIGN || k % group)
        return lm_err_set(err, -EINVAL,
                          "INT4 group %d must be a multiple of %d that divides K=%d", group,
                          INT4_K_ALIGN, k);
    int32_t ng = k / group;
    for (int32_t r = 0; r < n; r++) {
        const float *row = w + (size_t)r * (size_t)k;
        uint8_t *qrow = qs + (size_t)r * (size_t)(k / 2);
        memset(qrow, 0, (size_t)(k / 2));
        for (int32_t g = 0; g < ng; g++) {
            float lo = 0.f, hi = 0.f; /* the range always contains 0, as GPTQ's quantizer */
            for (int32_t j = g * group; j < (g + 1) * group; j++) {
                lo = row[j] < lo ? row[j] : lo;
                hi = row[j] > hi ? row[j] : hi;
            }
            float scale = (hi - lo) / 15.f;
            if (!(scale > 0.f))
                scale = 1.f;
            uint16_t s16 = float_to_fp16(scale);
            float s = fp16_to_float(s16);
            if (!(s > 0.f)) { /* underflow to fp16 zero: smallest normal */
                s16 = 0x0400;
                s = fp16_to_float(s16);
            }
            int z = (int)lrintf(-lo / s);
            z = z < 0 ? 0 : z > 15 ? 15 : z;
            scales[(size_t)r * (size_t)ng + (size_t)g] = s16;
            zeros[(size_t)r * (size_t)ng + (size_t)g] = (uint8_t)z;
            for (int32_t j = g * group; j < (g + 1) * group; j++) {
                int q = (int)lrintf(row[j] / s) + z;
                q = q < 0 ? 0 : q > 15 ? 15 : q;
                qrow[j / 2] |= (uint8_t)(q << ((j & 1) * 4));
            }
        }
    }
    return 0;
}

/* Allocate the arrays of an n x k INT4 matrix owned by the model. */
static int int4_alloc(loader *L, linear *l, int32_t n, int32_t k, int32_t group, const char *name)
{
    l->kind = LINEAR_INT4;
    l->n = n;
    l->k = k;
    l->q.n = n;
    l->q.k = k;
    l->q.group = group;
    l->q.qs = own_alloc(L, int4_qs_bytes(n, k));
    l->q.scales = own_alloc(L, int4_group_count(n, k, group) * 2);
    l->q.zeros = own_alloc(L, int4_group_count(n, k, group));
    if (!l->q.qs || !l->q.scales || !l->q.zeros)
        return oom(L, name);
    L->m->int4 = 1;
    L->m->int4_group = group;
    return 0;
}

static uint32_t rd32(const void *p, size_t i)
{
    uint32_t v;
    memcpy(&v, (const uint8_t *)p + 4 * i, 4);
    return v;
}

/* GPTQ (checkpoint_format "gptq") -> int4.h layout; see fixtures README. */
static int load_gptq(loader *L, const char *prefix, int32_t n, int32_t k, linear *l)
{
    char name[256];
    const char *file;
    int32_t group = L->m->cfg.quant.group_size ? L->m->cfg.quant.group_size : k;
    snprintf(name, sizeof name, "%s.qweight", prefix);
    if (k % 8 || n % 8)
        return lm_err_set(L->err, -EINVAL, "%s: GPTQ needs in/out features divisible by 8 (%d x %d)",
                          name, n, k);
    if (k % INT4_K_ALIGN || group % INT4_K_ALIGN || k % group)
        return lm_err_set(L->err, -ENOTSUP,
                          "%s: GPTQ group %d with K=%d: the INT4 layout needs K and the group "
                          "to be multiples of %d and the group to divide K",
                          name, group, k, INT4_K_ALIGN);
    int32_t ng = k / group;
    const safetensors_tensor *qw, *qz, *sc, *gi = NULL;
    int64_t s_qw[2] = {k / 8, n}, s_qz[2] = {ng, n / 8}, s_sc[2] = {ng, n}, s_gi[1] = {k};
    int rc;
    if ((rc = get_tensor(L, name, 2, s_qw, &qw)))
        return rc;
    snprintf(name, sizeof name, "%s.qzeros", prefix);
    if ((rc = get_tensor(L, name, 2, s_qz, &qz)))
        return rc;
    snprintf(name, sizeof name, "%s.scales", prefix);
    if ((rc = get_tensor(L, name, 2, s_sc, &sc)))
        return rc;
    if (qw->dtype != ST_I32 || qz->dtype != ST_I32 || (sc->dtype != ST_F16 && sc->dtype != ST_BF16 && sc->dtype != ST_F32))
        return lm_err_set(L->err, -EINVAL, "%s: GPTQ tensors need I32 qweight/qzeros and "
                          "F16 scales", prefix);
    snprintf(name, sizeof name, "%s.g_idx", prefix);
    if (find_opt(L, name, &file) && (rc = get_tensor(L, name, 1, s_gi, &gi)))
        return rc;
    if (gi && gi->dtype != ST_I32)
        return lm_err_set(L->err, -EINVAL, "%s: g_idx must be I32", name);

    /* Act-order: sort inputs by group (stable), so each group is contiguous. */
    int32_t *perm = NULL;
    if (gi) {
        int32_t *cnt = calloc((size_t)ng + 1, sizeof *cnt);
        if (!cnt)
            return oom(L, name);
        int identity = 1;
        for (int32_t j = 0; j < k; j++) {
            int32_t g = (int32_t)rd32(gi->data, (size_t)j);
            if (g < 0 || g >= ng) {
                free(cnt);
                return lm_err_set(L->err, -EINVAL, "%s: g_idx[%d] = %d outside 0..%d", name, j,
                                  g, ng - 1);
            }
            cnt[g + 1]++;
            identity &= g == j / group;
        }
        for (int32_t g = 0; g < ng; g++)
            if (cnt[g + 1] != group) {
                int32_t c = cnt[g + 1];
                free(cnt);
                return lm_err_set(L->err, -EINVAL,
                                  "%s: g_idx puts %d inputs in group %d, expected %d", name, c,
                                  g, group);
            }
        if (!identity) {
            perm = own_alloc(L, (size_t)k * sizeof *perm);
            if (!perm) {
                free(cnt);
                return oom(L, name);
            }
            for (int32_t g = 0; g < ng; g++)
                cnt[g + 1] += cnt[g];
            for (int32_t j = 0; j < k; j++)
                perm[cnt[rd32(gi->data, (size_t)j)]++] = j;
        }
        free(cnt);
    }
    if ((rc = int4_alloc(L, l, n, k, group, prefix)))
        return rc;
    l->q.perm = perm;
    uint8_t *qs = (uint8_t *)l->q.qs;
    uint16_t *scales = (uint16_t *)l->q.scales;
    uint8_t *zeros = (uint8_t *)l->q.zeros;
    if (!perm) {
        /* GPTQ packs inputs 8k..8k+7 of output r low nibble first into one
         * little-endian word: its 4 bytes are exactly bytes 4k..4k+3 of
         * int4.h row r (even column low nibble, odd column high nibble). */
        for (int32_t kb = 0; kb < k / 8; kb++)
            for (int32_t r = 0; r < n; r++)
                memcpy(qs + (size_t)r * (size_t)(k / 2) + (size_t)kb * 4,
                       (const uint8_t *)qw->data + ((size_t)kb * (size_t)n + (size_t)r) * 4, 4);
    }
    for (int32_t j = 0; perm && j < k; j++) {
        int32_t src = perm[j]; /* input index of packed column j */
        for (int32_t r = 0; r < n; r++) {
            uint32_t word = rd32(qw->data, (size_t)(src / 8) * (size_t)n + (size_t)r);
            uint8_t q = (uint8_t)((word >> (4 * (src % 8))) & 15u);
            qs[(size_t)r * (size_t)(k / 2) + (size_t)(j / 2)] |= (uint8_t)(q << ((j & 1) * 4));
        }
    }
    for (int32_t g = 0; g < ng; g++)
        for (int32_t r = 0; r < n; r++) {
            uint32_t word = rd32(qz->data, (size_t)g * (size_t)(n / 8) + (size_t)(r / 8));
            /* stored zero - 1 (GPTQ v1): the real zero is stored + 1 (1..16) */
            zeros[(size_t)r * (size_t)ng + (size_t)g] = (uint8_t)(((word >> (4 * (r % 8))) & 15u) + 1u);
            size_t si = (size_t)g * (size_t)n + (size_t)r;
            scales[(size_t)r * (size_t)ng + (size_t)g] =
                sc->dtype == ST_F16 ? ((const uint16_t *)sc->data)[si]
                                    : float_to_fp16(elem_to_float(sc->dtype, sc->data, si));
        }
    snprintf(name, sizeof name, "%s.bias", prefix);
    if (find_opt(L, name, &file)) {
        if ((rc = get_vector(L, name, n, &l->bias)))
            return rc;
        l->q.bias = l->bias;
    }
    return 0;
}

/* Quantize a dense linear (already validated) to INT4 at load. */
static int quantize_dense(loader *L, const char *prefix, linear *l)
{
    int32_t n = l->n, k = l->k, group = L->opt.group;
    if (group <= 0 || group % INT4_K_ALIGN || k % group)
        return lm_err_set(L->err, -EINVAL,
                          "%s: --quantize int4 group %d does not fit K=%d (needs a multiple of %d "
                          "dividing K)",
                          prefix, group, k, INT4_K_ALIGN);
    float *tmp = malloc((size_t)n * (size_t)k * sizeof *tmp);
    if (!tmp)
        return oom(L, prefix);
    for (size_t i = 0; i < (size_t)n * (size_t)k; i++)
        tmp[i] = elem_to_float(l->dtype, l->w, i);
    const float *bias = l->bias;
    int rc = int4_alloc(L, l, n, k, group, prefix);
    if (!rc)
        rc = int4_quantize_rtn(tmp, n, k, group, (uint8_t *)l->q.qs, (uint16_t *)l->q.scales,
                               (uint8_t *)l->q.zeros, L->err);
    free(tmp);
    l->w = NULL;
    l->bias = l->q.bias = bias;
    return rc;
}

/* A linear `prefix`.weight [n][k] (or GPTQ `prefix`.qweight ...).
 * bias: 1 required, 0 none. quantizable: may become INT4 at load. */
static int get_linear(loader *L, const char *prefix, int32_t n, int32_t k, int bias,
                      int quantizable, linear *l)
{
    char name[256];
    const char *file;
    memset(l, 0, sizeof *l);
    snprintf(name, sizeof name, "%s.qweight", prefix);
    if (find_opt(L, name, &file)) {
        if (!L->m->cfg.quant.gptq)
            return lm_err_set(L->err, -EINVAL, "%s: '%s' is GPTQ but config.json has no GPTQ "
                              "quantization_config", file, name);
        int rc = load_gptq(L, prefix, n, k, l);
        if (!rc && bias && !l->bias)
            rc = lm_err_set(L->err, -EINVAL, "%s: tensor '%s.bias' is missing", L->m->dir, prefix);
        return rc;
    }
    snprintf(name, sizeof name, "%s.weight", prefix);
    const safetensors_tensor *t;
    int64_t shape[2] = {n, k};
    int rc = get_tensor(L, name, 2, shape, &t);
    if (rc)
        return rc;
    if (!is_float_dtype(t->dtype))
        return lm_err_set(L->err, -EINVAL, "%s: tensor '%s': dtype %s, expected F32/F16/BF16",
                          short_file(L, name), name, st_dtype_name(t->dtype));
    l->kind = LINEAR_DENSE;
    l->n = n;
    l->k = k;
    l->dtype = t->dtype;
    l->w = t->data;
    if (bias) {
        snprintf(name, sizeof name, "%s.bias", prefix);
        if ((rc = get_vector(L, name, n, &l->bias)))
            return rc;
    }
    if (quantizable && L->opt.quantize_int4)
        return quantize_dense(L, prefix, l);
    return 0;
}

static int get_mlp(loader *L, const char *prefix, const char *g, const char *u, const char *d,
                   int32_t width, mlp_weights *w)
{
    char p[256];
    int32_t H = L->m->cfg.hidden;
    int rc;
    snprintf(p, sizeof p, "%s.%s", prefix, g);
    if ((rc = get_linear(L, p, width, H, 0, 1, &w->gate)))
        return rc;
    snprintf(p, sizeof p, "%s.%s", prefix, u);
    if ((rc = get_linear(L, p, width, H, 0, 1, &w->up)))
        return rc;
    snprintf(p, sizeof p, "%s.%s", prefix, d);
    return get_linear(L, p, H, width, 0, 1, &w->down);
}

static int load_layer(loader *L, int32_t i)
{
    const model_config *c = &L->m->cfg;
    layer_weights *lw = &L->m->layers[i];
    char p[256], q[256];
    int32_t H = c->hidden, D = c->head_dim, Hq = c->n_heads * D, Hkv = c->n_kv_heads * D;
    int rc;
    snprintf(p, sizeof p, "model.layers.%d.input_layernorm.weight", i);
    if ((rc = get_vector(L, p, H, &lw->attn_norm)))
        return rc;
    snprintf(p, sizeof p, "model.layers.%d.post_attention_layernorm.weight", i);
    if ((rc = get_vector(L, p, H, &lw->ffn_norm)))
        return rc;
    const char *proj[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
    linear *dst[4] = {&lw->q, &lw->k, &lw->v, &lw->o};
    int32_t outs[4] = {Hq, Hkv, Hkv, H}, ins[4] = {H, H, H, Hq};
    for (int j = 0; j < 4; j++) {
        snprintf(p, sizeof p, "model.layers.%d.self_attn.%s", i, proj[j]);
        if ((rc = get_linear(L, p, outs[j], ins[j], j < 3 ? c->qkv_bias : c->o_bias, 1, dst[j])))
            return rc;
    }
    if (c->qk_norm) {
        snprintf(p, sizeof p, "model.layers.%d.self_attn.q_norm.weight", i);
        if ((rc = get_vector(L, p, D, &lw->q_norm)))
            return rc;
        snprintf(p, sizeof p, "model.layers.%d.self_attn.k_norm.weight", i);
        if ((rc = get_vector(L, p, D, &lw->k_norm)))
            return rc;
    }
    lw->is_moe = c->layer_moe[i];
    int mix = c->arch == MODEL_ARCH_MIXTRAL;
    const char *blk = mix ? "block_sparse_moe" : "mlp";
    if (!lw->is_moe) {
        snprintf(p, sizeof p, "model.layers.%d.mlp", i);
        return get_mlp(L, p, "gate_proj", "up_proj", "down_proj", c->intermediate, &lw->mlp);
    }
    snprintf(p, sizeof p, "model.layers.%d.%s.gate", i, blk);
    if ((rc = get_linear(L, p, c->n_experts, H, 0, 0, &lw->router)))
        return rc;
    lw->experts = own_alloc(L, (size_t)c->n_experts * sizeof *lw->experts);
    if (!lw->experts)
        return oom(L, "experts");
    for (int32_t e = 0; e < c->n_experts; e++) {
        snprintf(p, sizeof p, "model.layers.%d.%s.experts.%d", i, blk, e);
        rc = mix ? get_mlp(L, p, "w1", "w3", "w2", c->moe_intermediate, &lw->experts[e])
                 : get_mlp(L, p, "gate_proj", "up_proj", "down_proj", c->moe_intermediate,
                           &lw->experts[e]);
        if (rc)
            return rc;
    }
    if (c->shared_intermediate > 0) {
        lw->has_shared = 1;
        snprintf(p, sizeof p, "model.layers.%d.mlp.shared_expert", i);
        if ((rc = get_mlp(L, p, "gate_proj", "up_proj", "down_proj", c->shared_intermediate,
                          &lw->shared)))
            return rc;
        snprintf(q, sizeof q, "model.layers.%d.mlp.shared_expert_gate", i);
        if ((rc = get_linear(L, q, 1, H, 0, 0, &lw->shared_gate)))
            return rc;
    }
    return 0;
}

/* ---- files ---------------------------------------------------------------- */

static int file_exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

static int open_files(loader *L)
{
    model_storage *s = L->s;
    const char *dir = L->m->dir;
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (file_exists(path)) {
        json_error_t je;
        json_t *idx = json_load_file(path, 0, &je);
        json_t *wm = idx ? json_object_get(idx, "weight_map") : NULL;
        if (!json_is_object(wm)) {
            json_decref(idx);
            return lm_err_set(L->err, -EINVAL, "%s: not a valid index (no weight_map object)%s%s",
                              path, idx ? "" : ": ", idx ? "" : je.text);
        }
        s->weight_map = json_incref(wm);
        json_decref(idx);
        size_t n = json_object_size(wm);
        s->files = calloc(n ? n : 1, sizeof *s->files);
        if (!s->files)
            return oom(L, "index");
        const char *key;
        json_t *v;
        json_object_foreach(wm, key, v)
        {
            if (!json_is_string(v) || strchr(json_string_value(v), '/'))
                return lm_err_set(L->err, -EINVAL, "%s: weight_map['%s'] is not a file name",
                                  path, key);
            const char *fn = json_string_value(v);
            int seen = 0;
            for (size_t i = 0; i < s->n_files && !seen; i++) {
                const char *p = safetensors_path(s->files[i]);
                size_t pl = strlen(p), fl = strlen(fn);
                seen = pl > fl && p[pl - fl - 1] == '/' && !strcmp(p + pl - fl, fn);
            }
            if (seen)
                continue;
            snprintf(path, sizeof path, "%s/%s", dir, fn);
            if (!file_exists(path))
                return lm_err_set(L->err, -ENOENT, "%s: shard '%s' (holding '%s') is missing",
                                  dir, fn, key);
            int rc = safetensors_open(path, &s->files[s->n_files], L->err);
            if (rc)
                return rc;
            s->n_files++;
        }
        return 0;
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (!file_exists(path))
        return lm_err_set(L->err, -ENOENT,
                          "%s: no model.safetensors and no model.safetensors.index.json", dir);
    s->files = calloc(1, sizeof *s->files);
    if (!s->files)
        return oom(L, "files");
    int rc = safetensors_open(path, &s->files[0], L->err);
    if (!rc)
        s->n_files = 1;
    return rc;
}

int model_load(const char *dir, const model_load_options *opt, model **ret, lm_err *err)
{
    *ret = NULL;
    model *m = calloc(1, sizeof *m);
    loader L = {.m = m, .err = err};
    if (m)
        m->storage = L.s = calloc(1, sizeof *L.s);
    if (!m || !L.s || !(m->dir = strdup(dir))) {
        model_free(m);
        return lm_err_set(err, -ENOMEM, "%s: out of memory", dir);
    }
    if (opt)
        L.opt = *opt;
    else
        model_load_options_default(&L.opt);
    int rc = config_load(dir, &m->cfg, err);
    if (rc)
        goto fail;
    const model_config *c = &m->cfg;
    if (L.opt.quantize_int4 && c->quant.gptq) {
        rc = lm_err_set(err, -EINVAL, "%s: already GPTQ-quantized; --quantize int4 applies to "
                        "16-bit checkpoints", dir);
        goto fail;
    }
    if ((rc = open_files(&L)))
        goto fail;
    if ((rc = get_linear(&L, "model.embed_tokens", c->vocab, c->hidden, 0, 0, &m->embed)))
        goto fail;
    if ((rc = get_vector(&L, "model.norm.weight", c->hidden, &m->final_norm)))
        goto fail;
    if (c->tie_embeddings)
        m->lm_head = m->embed;
    else if ((rc = get_linear(&L, "lm_head", c->vocab, c->hidden, 0, 0, &m->lm_head)))
        goto fail;
    if (m->embed.kind != LINEAR_DENSE || m->lm_head.kind != LINEAR_DENSE) {
        rc = lm_err_set(err, -ENOTSUP, "%s: quantized embeddings or lm_head are not implemented",
                        dir);
        goto fail;
    }
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->layers) {
        rc = oom(&L, "layers");
        goto fail;
    }
    for (int32_t i = 0; i < c->n_layers; i++)
        if ((rc = load_layer(&L, i)))
            goto fail;
    *ret = m;
    return 0;
fail:
    model_free(m);
    return rc;
}

void model_free(model *m)
{
    if (!m)
        return;
    model_storage *s = m->storage;
    if (s) {
        for (size_t i = 0; i < s->n_files; i++)
            safetensors_close(s->files[i]);
        free(s->files);
        json_decref(s->weight_map);
        for (size_t i = 0; i < s->n_owned; i++)
            free(s->owned[i]);
        free(s->owned);
        free(s);
    }
    free(m->layers);
    free(m->dir);
    free(m);
}

size_t linear_bytes(const linear *l)
{
    if (l->kind == LINEAR_INT4)
        return int4_matrix_bytes(l->n, l->k, l->q.group);
    return (size_t)l->n * (size_t)l->k * st_dtype_size(l->dtype);
}

static size_t mlp_bytes(const mlp_weights *w)
{
    return linear_bytes(&w->gate) + linear_bytes(&w->up) + linear_bytes(&w->down);
}

size_t model_active_bytes(const model *m)
{
    const model_config *c = &m->cfg;
    size_t b = linear_bytes(&m->lm_head) + (size_t)c->hidden * st_dtype_size(m->embed.dtype);
    for (int32_t i = 0; i < c->n_layers; i++) {
        const layer_weights *lw = &m->layers[i];
        b += linear_bytes(&lw->q) + linear_bytes(&lw->k) + linear_bytes(&lw->v) +
             linear_bytes(&lw->o);
        if (!lw->is_moe) {
            b += mlp_bytes(&lw->mlp);
            continue;
        }
        b += linear_bytes(&lw->router) + (size_t)c->top_k * mlp_bytes(&lw->experts[0]);
        if (lw->has_shared)
            b += mlp_bytes(&lw->shared) + linear_bytes(&lw->shared_gate);
    }
    return b;
}
