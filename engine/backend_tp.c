/*
 * backend_tp.c: tensor-parallel CPU backend (Megatron-style sharding over
 * ranks = threads joined by the host communicator, comm.h).
 *
 * Rank r of N holds a shard model built here:
 *  - attention: heads [r*Hl, (r+1)*Hl) of q (column-parallel rows), their
 *    KV heads for k/v: split when N divides n_kv_heads, replicated (each
 *    rank takes the one KV head its query heads use) when n_kv_heads
 *    divides N; o_proj takes the matching input columns (row-parallel), its
 *    bias on rank 0 only; the rank's KV cache holds only its KV heads;
 *  - MLP / every expert / shared expert: intermediate columns
 *    [r*Il, (r+1)*Il) of gate/up (rows) and down (input columns); router,
 *    shared-expert gate and norms replicated;
 *  - embeddings and lm_head: vocabulary rows [r*Vl, (r+1)*Vl), Vl =
 *    ceil(V/N): lookups are summed across ranks, logits gathered.
 * One all-reduce after attention and one after the MoE/MLP block
 * (cpu_forward.c). Row slices point into the loaded model (no copy);
 * column slices are copied once at creation.
 *
 * Refused with -EINVAL and a message: heads not divisible by N, KV heads
 * neither dividing nor divisible by N, widths not divisible by N, an INT4
 * column split that would cut a group (or break the 32-column alignment),
 * act-order INT4 matrices split by columns.
 */
#include "engine/backend_cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/comm.h"
#include "engine/cpu_forward.h"
#include "engine/ops_cpu.h"

#define TP_MAX 64

typedef struct tp_backend {
    backend base;
    const model *m;
    int n;
    char name[32];
    model shard[TP_MAX];
    comm *comms[TP_MAX];
    cpu_forward *ranks[TP_MAX];
    cpu_pool *outer;            /* N threads: one per rank */
    void **owned;
    size_t n_owned, cap_owned;
    int32_t block_size, n_blocks;
    const backend_batch *batch; /* for the rank tasks */
    lm_err errs[TP_MAX];
    int rcs[TP_MAX];
    int32_t kv_bs, kv_nb;
} tp_backend;

static void *own(tp_backend *t, size_t bytes)
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
static int slice_cols(tp_backend *t, const linear *l, int32_t c0, int32_t cn, int keep_bias,
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

static int shard_mlp(tp_backend *t, int r, const mlp_weights *w, int32_t width, mlp_weights *ret,
                     const char *what, lm_err *err)
{
    int32_t wl = width / t->n;
    ret->gate = slice_rows(&w->gate, r * wl, wl);
    ret->up = slice_rows(&w->up, r * wl, wl);
    return slice_cols(t, &w->down, r * wl, wl, r == 0, what, &ret->down, err);
}

static int build_shard(tp_backend *t, int r, lm_err *err)
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
    int32_t Vl = (c->vocab + N - 1) / N, v0 = r * Vl, vn = c->vocab - v0 < Vl ? c->vocab - v0 : Vl;
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

static int tp_check_layout(const model_config *c, int N, lm_err *err)
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

static void tp_rank_task(void *ctx, int64_t b, int64_t e, int thread)
{
    tp_backend *t = ctx;
    for (int64_t r = b; r < e; r++)
        t->rcs[r] = cpu_forward_run(t->ranks[r], t->batch, &t->errs[r]);
}

static int tp_forward(backend *b, const backend_batch *batch, lm_err *err)
{
    tp_backend *t = (tp_backend *)b;
    int rc = backend_batch_check(batch, t->m->cfg.vocab, t->block_size, t->n_blocks, err);
    if (rc)
        return rc;
    t->batch = batch;
    cpu_pool_run(t->outer, tp_rank_task, t, t->n, 1);
    for (int r = 0; r < t->n; r++)
        if (t->rcs[r]) {
            if (err)
                *err = t->errs[r];
            return t->rcs[r];
        }
    return 0;
}

static int tp_kv_init(backend *b, int32_t bs, int32_t nb, lm_err *err)
{
    tp_backend *t = (tp_backend *)b;
    for (int r = 0; r < t->n; r++) {
        int rc = cpu_forward_kv_init(t->ranks[r], bs, nb, err);
        if (rc)
            return rc;
    }
    t->block_size = bs;
    t->n_blocks = nb;
    return 0;
}

static int tp_kv_copy(backend *b, int32_t src, int32_t dst, lm_err *err)
{
    tp_backend *t = (tp_backend *)b;
    if (src < 0 || dst < 0 || src >= t->n_blocks || dst >= t->n_blocks)
        return lm_err_set(err, -EINVAL, "kv_copy: block %d -> %d outside 0..%d", src, dst,
                          t->n_blocks - 1);
    for (int r = 0; r < t->n; r++)
        cpu_forward_kv_copy(t->ranks[r], src, dst);
    return 0;
}

static void tp_info(const backend *b, backend_info *ret)
{
    const tp_backend *t = (const tp_backend *)b;
    ret->name = t->name;
    ret->vocab = t->m->cfg.vocab;
    ret->max_context = t->m->cfg.max_position;
    ret->tensor_parallel = t->n;
    ret->kv_bytes_per_token = 0;
    for (int r = 0; r < t->n; r++)
        ret->kv_bytes_per_token += cpu_forward_kv_bytes_per_token(t->ranks[r]);
    long pages = sysconf(_SC_AVPHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    ret->device_memory_free = pages > 0 && psz > 0 ? (size_t)pages * (size_t)psz : 0;
}

static void tp_destroy(backend *b)
{
    tp_backend *t = (tp_backend *)b;
    for (int r = 0; r < t->n; r++) {
        cpu_forward_destroy(t->ranks[r]);
        comm_destroy(t->comms[r]);
    }
    cpu_pool_destroy(t->outer);
    for (size_t i = 0; i < t->n_owned; i++)
        free(t->owned[i]);
    free(t->owned);
    free(t);
}

static const backend_ops tp_ops = {tp_kv_init, tp_kv_copy, tp_forward, tp_info, tp_destroy};

int backend_tp_cpu_create(const model *m, int tp, const backend_cpu_options *opt, backend **ret,
                          lm_err *err)
{
    *ret = NULL;
    if (tp < 1 || tp > TP_MAX)
        return lm_err_set(err, -EINVAL, "tp=%d: out of range 1..%d", tp, TP_MAX);
    int rc = tp_check_layout(&m->cfg, tp, err);
    if (rc)
        return rc;
    tp_backend *t = calloc(1, sizeof *t);
    if (!t)
        return lm_err_set(err, -ENOMEM, "tp: out of memory");
    t->base.ops = &tp_ops;
    t->m = m;
    t->n = tp;
    snprintf(t->name, sizeof t->name, "cpu-tp%d", tp);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = opt && opt->threads > 0 ? opt->threads : (ncpu > 0 ? (int)ncpu : 1);
    int per = threads / tp > 0 ? threads / tp : 1;
    int32_t Vl = (m->cfg.vocab + tp - 1) / tp;
    if ((rc = cpu_pool_create(tp, &t->outer, err)) || (rc = comm_host_create(tp, t->comms, err)))
        goto fail;
    for (int r = 0; r < tp; r++) {
        if ((rc = build_shard(t, r, err)))
            goto fail;
        cpu_forward_options fo = {.threads = per,
                                  .max_tokens = opt && opt->max_tokens > 0 ? opt->max_tokens : 256,
                                  .portable = opt ? opt->portable : 0,
                                  .comm = t->comms[r],
                                  .vocab_begin = r * Vl,
                                  .vocab_full = m->cfg.vocab,
                                  .vocab_stride = Vl};
        if ((rc = cpu_forward_create(&t->shard[r], &fo, &t->ranks[r], err)))
            goto fail;
    }
    *ret = &t->base;
    return 0;
fail:
    tp_destroy(&t->base);
    return rc;
}
