/*
 * tp_shard.c: the tensor-parallel sharding of a model (tp_shard.h): row
 * slices are views into the loaded model, column slices are copied.
 */
#include "engine/tp_shard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tp_shards {
    const model *m;
    int n;
    model shard[TP_MAX];
    void **owned;
    size_t n_owned, cap_owned;
};

static void *own(tp_shards *t, size_t bytes)
{
    if (t->n_owned == t->cap_owned) {
        size_t cap = t->cap_owned ? t->cap_owned * 2 : 256;
        void **n = realloc(t->owned, cap * sizeof *n);
        if (!n)
            return NULL;
        t->owned = n;
        t->cap_owned = cap;
    }
    void *p = calloc(1, bytes ? bytes : 1);
    if (p)
        t->owned[t->n_owned++] = p;
    return p;
}

/* Rows [r0, r0 + rn) of l (outputs): no copy. */
static linear slice_rows(const linear *l, int32_t r0, int32_t rn)
{
    linear s = *l;
    s.n = rn;
    if (l->kind == LINEAR_DENSE) {
        s.w = (const uint8_t *)l->w + (size_t)r0 * (size_t)l->k * st_dtype_size(l->dtype);
    } else {
        int32_t ng = l->k / l->q.group;
        s.q.n = rn;
        s.q.qs = l->q.qs + (size_t)r0 * (size_t)(l->k / 2);
        s.q.scales = l->q.scales + (size_t)r0 * (size_t)ng;
        s.q.zeros = l->q.zeros + (size_t)r0 * (size_t)ng;
    }
    if (l->bias)
        s.bias = l->bias + r0;
    s.q.bias = l->kind == LINEAR_INT4 ? s.bias : NULL;
    return s;
}

/* Input columns [c0, c0 + cn) of l: copied. keep_bias: this rank adds it. */
static int slice_cols(tp_shards *t, const linear *l, int32_t c0, int32_t cn, int keep_bias,
                      const char *what, linear *ret, lm_err *err)
{
    linear s = *l;
    s.k = cn;
    s.bias = keep_bias ? l->bias : NULL;
    if (l->kind == LINEAR_DENSE) {
        size_t esz = st_dtype_size(l->dtype);
        uint8_t *w = own(t, (size_t)l->n * (size_t)cn * esz);
        if (!w)
            return lm_err_set(err, -ENOMEM, "tp: out of memory");
        for (int32_t r = 0; r < l->n; r++)
            memcpy(w + (size_t)r * (size_t)cn * esz,
                   (const uint8_t *)l->w + ((size_t)r * (size_t)l->k + (size_t)c0) * esz,
                   (size_t)cn * esz);
        s.w = w;
        *ret = s;
        return 0;
    }
    int32_t g = l->q.group;
    if (l->q.perm)
        return lm_err_set(err, -EINVAL, "tp=%d: %s is act-order (g_idx) INT4; splitting its "
                          "inputs across ranks is not supported", t->n, what);
    if (c0 % g || cn % g || cn % INT4_K_ALIGN)
        return lm_err_set(err, -EINVAL, "tp=%d: splitting %s (K=%d) into %d-column shards "
                          "would cut a GPTQ group of %d (or break the %d-column alignment)",
                          t->n, what, l->k, cn, g, INT4_K_ALIGN);
    int32_t ng = l->k / g, ngl = cn / g;
    uint8_t *qs = own(t, (size_t)l->n * (size_t)cn / 2), *z = own(t, (size_t)l->n * (size_t)ngl);
    uint16_t *sc = own(t, (size_t)l->n * (size_t)ngl * 2);
    if (!qs || !z || !sc)
        return lm_err_set(err, -ENOMEM, "tp: out of memory");
    for (int32_t r = 0; r < l->n; r++) {
        memcpy(qs + (size_t)r * (size_t)(cn / 2), l->q.qs + (size_t)r * (size_t)(l->k / 2) + c0 / 2,
               (size_t)cn / 2);
        memcpy(sc + (size_t)r * (size_t)ngl, l->q.scales + (size_t)r * (size_t)ng + c0 / g,
               (size_t)ngl * 2);
        memcpy(z + (size_t)r * (size_t)ngl, l->q.zeros + (size_t)r * (size_t)ng + c0 / g,
               (size_t)ngl);
    }
    s.q.k = cn;
    s.q.qs = qs;
    s.q.scales = sc;
    s.q.zeros = z;
    s.q.bias = s.bias;
    *ret = s;
    return 0;
}

static int shard_mlp(tp_shards *t, int r, const mlp_weights *w, int32_t width, mlp_weights *ret,
                     const char *what, lm_err *err)
{
    int32_t wl = width / t->n;
    ret->gate = slice_rows(&w->gate, r * wl, wl);
    ret->up = slice_rows(&w->up, r * wl, wl);
    return slice_cols(t, &w->down, r * wl, wl, r == 0, what, &ret->down, err);
}

static int build_shard(tp_shards *t, int r, lm_err *err)
{
    const model *m = t->m;
    const model_config *c = &m->cfg;
    int N = t->n;
    model *s = &t->shard[r];
    *s = *m;
    s->storage = NULL;
    model_config *sc = &s->cfg;
    int32_t D = c->head_dim, hl = c->n_heads / N, kvl, kv0;
    if (c->n_kv_heads % N == 0) {
        kvl = c->n_kv_heads / N;
        kv0 = r * kvl;
    } else {
        kvl = 1;
        kv0 = r / (N / c->n_kv_heads);
    }
    sc->n_heads = hl;
    sc->n_kv_heads = kvl;
    sc->moe_intermediate = c->moe_intermediate / N;
    sc->shared_intermediate = c->shared_intermediate / N;
    sc->intermediate = c->intermediate / N;
    int32_t Vl = tp_vocab_stride(c->vocab, N), v0 = r * Vl, vn = c->vocab - v0 < Vl ? c->vocab - v0 : Vl;
    if (vn < 1)
        return lm_err_set(err, -EINVAL, "tp=%d: vocabulary %d too small to split", N, c->vocab);
    s->embed = slice_rows(&m->embed, v0, vn);
    s->lm_head = slice_rows(&m->lm_head, v0, vn);
    s->layers = own(t, (size_t)c->n_layers * sizeof *s->layers);
    if (!s->layers)
        return lm_err_set(err, -ENOMEM, "tp: out of memory");
    char what[128];
    for (int32_t i = 0; i < c->n_layers; i++) {
        const layer_weights *L = &m->layers[i];
        layer_weights *S = &s->layers[i];
        *S = *L;
        S->q = slice_rows(&L->q, r * hl * D, hl * D);
        S->k = slice_rows(&L->k, kv0 * D, kvl * D);
        S->v = slice_rows(&L->v, kv0 * D, kvl * D);
        snprintf(what, sizeof what, "layer %d o_proj", i);
        int rc = slice_cols(t, &L->o, r * hl * D, hl * D, r == 0, what, &S->o, err);
        if (rc)
            return rc;
        if (!L->is_moe) {
            snprintf(what, sizeof what, "layer %d mlp.down_proj", i);
            if ((rc = shard_mlp(t, r, &L->mlp, c->intermediate, &S->mlp, what, err)))
                return rc;
            continue;
        }
        S->experts = own(t, (size_t)c->n_experts * sizeof *S->experts);
        if (!S->experts)
            return lm_err_set(err, -ENOMEM, "tp: out of memory");
        for (int32_t e = 0; e < c->n_experts; e++) {
            snprintf(what, sizeof what, "layer %d expert %d down_proj", i, e);
            if ((rc = shard_mlp(t, r, &L->experts[e], c->moe_intermediate, &S->experts[e], what,
                                err)))
                return rc;
        }
        if (L->has_shared) {
            snprintf(what, sizeof what, "layer %d shared_expert.down_proj", i);
            if ((rc = shard_mlp(t, r, &L->shared, c->shared_intermediate, &S->shared, what, err)))
                return rc;
        }
    }
    return 0;
}

int tp_layout_check(const model_config *c, int N, lm_err *err)
{
    if (c->n_heads % N)
        return lm_err_set(err, -EINVAL, "tp=%d: %d attention heads do not divide evenly", N,
                          c->n_heads);
    if (c->n_kv_heads % N && N % c->n_kv_heads)
        return lm_err_set(err, -EINVAL, "tp=%d: %d KV heads neither split evenly nor replicate "
                          "evenly", N, c->n_kv_heads);
    const char *names[3] = {"moe_intermediate_size", "shared_expert_intermediate_size",
                            "intermediate_size"};
    int32_t w[3] = {c->moe_intermediate, c->shared_intermediate, c->intermediate};
    int any_dense = 0;
    for (int32_t i = 0; i < c->n_layers; i++)
        any_dense |= !c->layer_moe[i];
    for (int i = 0; i < 3; i++) {
        if (i == 2 && !any_dense)
            continue;
        if (w[i] % N)
            return lm_err_set(err, -EINVAL, "tp=%d: %s %d does not divide evenly", N, names[i],
                              w[i]);
    }
    return 0;
}

int32_t tp_vocab_stride(int32_t vocab, int n)
{
    return n > 0 ? (vocab + n - 1) / n : vocab;
}

void tp_shards_free(tp_shards *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->n_owned; i++)
        free(s->owned[i]);
    free(s->owned);
    free(s);
}

int tp_shards_create(const model *m, int n, tp_shards **ret, lm_err *err)
{
    *ret = NULL;
    if (n < 1 || n > TP_MAX)
        return lm_err_set(err, -EINVAL, "tp=%d: out of range 1..%d", n, TP_MAX);
    int rc = tp_layout_check(&m->cfg, n, err);
    if (rc)
        return rc;
    tp_shards *s = calloc(1, sizeof *s);
    if (!s)
        return lm_err_set(err, -ENOMEM, "tp: out of memory");
    s->m = m;
    s->n = n;
    for (int r = 0; r < n; r++)
        if ((rc = build_shard(s, r, err))) {
            tp_shards_free(s);
            return rc;
        }
    *ret = s;
    return 0;
}

const model *tp_shards_model(const tp_shards *s, int rank)
{
    return rank >= 0 && rank < s->n ? &s->shard[rank] : NULL;
}

int tp_devices_check(const int *ids, int n, int n_visible, int *ret_shared, lm_err *err)
{
    *ret_shared = 0;
    if (n_visible < 1)
        return lm_err_set(err, -ENODEV, "tp=%d: no CUDA device is visible", n);
    for (int r = 0; r < n; r++) {
        if (ids[r] < 0 || ids[r] >= n_visible)
            return lm_err_set(err, -EINVAL, "devices: rank %d asks for device %d, but only "
                              "devices 0..%d are visible", r, ids[r], n_visible - 1);
        for (int q = 0; q < r; q++)
            if (ids[q] == ids[r])
                *ret_shared = 1;
    }
    return 0;
}
