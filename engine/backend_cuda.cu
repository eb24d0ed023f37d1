/*
 * backend_cuda.cu: engine model -> cu_model on the GPU, and the backend
 * vtable over cu_forward (see backend_cuda.h).
 *
 * Upload: every device array is written row by row through an uploader
 * that fills one of two pinned buffers (converting bf16/fp32 to fp16, or
 * copying INT4 bytes) while the other is in flight on the copy stream;
 * fused matrices (q|k|v, gate/up interleaved, experts stacked) are built
 * in that order so that no second pass over the weights is needed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend_cuda.h"
#include "engine/comm.h"
#include "engine/cuda_common.cuh"
#include "engine/cuda_model.h"
#include "engine/half.h"

namespace {

constexpr size_t STAGE_BYTES = 32u << 20;

struct uploader {
    cudaStream_t st;
    uint8_t *pin[2];
    cudaEvent_t ev[2];
    int cur;
    size_t used;       /* bytes filled in pin[cur] */
    uint8_t *dst;      /* device address pin[cur] goes to */
};

struct cuda_backend {
    backend base;
    cu_model m;
    cu_layer *layers;
    cu_state *s;
    void **ptrs;
    int n_ptrs, cap;
    int device;
    char name[32];
};

int up_init(uploader *u, lm_err *err)
{
    memset(u, 0, sizeof(*u));
    CUDA_TRY(err, cudaStreamCreateWithFlags(&u->st, cudaStreamNonBlocking));
    for (int i = 0; i < 2; i++) {
        CUDA_TRY(err, cudaMallocHost((void **)&u->pin[i], STAGE_BYTES));
        CUDA_TRY(err, cudaEventCreateWithFlags(&u->ev[i], cudaEventDisableTiming));
        CUDA_TRY(err, cudaEventRecord(u->ev[i], u->st));
    }
    return 0;
}

int up_flush(uploader *u, lm_err *err)
{
    if (u->used) {
        CUDA_TRY(err, cudaMemcpyAsync(u->dst, u->pin[u->cur], u->used, cudaMemcpyHostToDevice, u->st));
        CUDA_TRY(err, cudaEventRecord(u->ev[u->cur], u->st));
        u->cur ^= 1;
        u->used = 0;
        CUDA_TRY(err, cudaEventSynchronize(u->ev[u->cur])); /* the other buffer is free again */
    }
    return 0;
}

/* Room for `bytes` (<= STAGE_BYTES) at device address dst, appended to the
 * pending copy when contiguous. Callers flush at the end of every device
 * allocation: one cudaMemcpy must not span two allocations. */
int up_reserve(uploader *u, uint8_t *dst, size_t bytes, uint8_t **ret, lm_err *err)
{
    if (u->used && (u->dst + u->used != dst || u->used + bytes > STAGE_BYTES)) {
        int rc = up_flush(u, err);
        if (rc)
            return rc;
    }
    if (!u->used)
        u->dst = dst;
    *ret = u->pin[u->cur] + u->used;
    u->used += bytes;
    return 0;
}

void up_free(uploader *u)
{
    if (u->st)
        cudaStreamSynchronize(u->st);
    for (int i = 0; i < 2; i++) {
        if (u->pin[i])
            cudaFreeHost(u->pin[i]);
        if (u->ev[i])
            cudaEventDestroy(u->ev[i]);
    }
    if (u->st)
        cudaStreamDestroy(u->st);
}

int grab(cuda_backend *b, void **p, size_t bytes, const char *what, lm_err *err)
{
    if (b->n_ptrs == b->cap) {
        int nc = b->cap ? 2 * b->cap : 512;
        void **np = (void **)realloc(b->ptrs, nc * sizeof(void *));
        if (!np)
            return lm_err_set(err, -ENOMEM, "cuda: out of host memory");
        b->ptrs = np;
        b->cap = nc;
    }
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 16);
    if (e != cudaSuccess)
        return lm_err_set(err, -ENOMEM, "cuda: allocating %zu bytes for %s: %s", bytes, what,
                          cudaGetErrorString(e));
    b->ptrs[b->n_ptrs++] = *p;
    return 0;
}

/* One row of a dense linear as fp16; -ERANGE if a value does not fit. */
int row_f16(const linear *l, int r, uint16_t *out, lm_err *err)
{
    const size_t k = (size_t)l->k;
    for (size_t j = 0; j < k; j++) {
        float v;
        switch (l->dtype) {
        case ST_F16: out[j] = ((const uint16_t *)l->w)[(size_t)r * k + j]; continue;
        case ST_BF16: v = bf16_to_float(((const uint16_t *)l->w)[(size_t)r * k + j]); break;
        case ST_F32: v = ((const float *)l->w)[(size_t)r * k + j]; break;
        default: return lm_err_set(err, -EINVAL, "cuda: weight dtype %d not supported", (int)l->dtype);
        }
        out[j] = float_to_fp16(v);
        if ((out[j] & 0x7c00u) == 0x7c00u && isfinite(v))
            return lm_err_set(err, -ERANGE, "cuda: weight %g outside the fp16 range "
                              "(load with --quantize int4 or use the CPU backend)", v);
    }
    return 0;
}

/* A fused matrix: `parts` stacked (interleave = 0) or row-interleaved
 * (interleave = 1, two parts), for each of n_experts groups. */
struct fused {
    const linear *const *parts; /* [n_experts * np] */
    int np, interleave, n_experts;
};

int fused_rows(const fused *f) /* rows per expert */
{
    int n = 0;
    for (int p = 0; p < f->np; p++)
        n += f->parts[p]->n;
    return n;
}

/* Source (linear, row) of fused row r of expert e. */
const linear *fused_src(const fused *f, int e, int r, int *row)
{
    const linear *const *P = f->parts + (size_t)e * f->np;
    if (f->interleave) {
        *row = r / 2;
        return P[r % 2];
    }
    for (int p = 0; p < f->np; p++) {
        if (r < P[p]->n) {
            *row = r;
            return P[p];
        }
        r -= P[p]->n;
    }
    *row = 0;
    return P[0];
}

int upload_fused(cuda_backend *b, uploader *u, const fused *f, const char *what, cu_linear *out,
                 lm_err *err)
{
    const linear *l0 = f->parts[0];
    const int n = fused_rows(f), k = l0->k;
    memset(out, 0, sizeof(*out));
    out->n = n;
    out->k = k;
    out->n_experts = f->n_experts;
    for (int i = 0; i < f->np * f->n_experts; i++) {
        const linear *l = f->parts[i];
        if (l->kind != l0->kind || l->k != k || (l->kind == LINEAR_INT4 && l->q.group != l0->q.group))
            return lm_err_set(err, -EINVAL, "cuda: %s: fused parts differ in kind, width or group",
                              what);
        if (l->kind == LINEAR_INT4 && (l->q.perm == NULL) != (l0->q.perm == NULL))
            return lm_err_set(err, -EINVAL, "cuda: %s: act-order on some parts only", what);
        if (l->kind == LINEAR_INT4 && l->q.perm && i % f->np &&
            memcmp(l->q.perm, f->parts[i - i % f->np]->q.perm, (size_t)k * 4))
            return lm_err_set(err, -ENOTSUP, "cuda: %s: act-order with different permutations "
                              "for fused parts is not implemented on CUDA (use --device cpu)", what);
        if (l->kind == LINEAR_INT4 && l->q.bias)
            ; /* biases are taken separately by the caller */
    }
    const size_t rows = (size_t)n * f->n_experts;
    int rc;
    if (l0->kind == LINEAR_DENSE) {
        out->kind = CU_W_F16;
        uint8_t *d;
        if ((rc = grab(b, (void **)&d, rows * k * 2, what, err)))
            return rc;
        out->w16 = (const uint16_t *)d;
        for (size_t R = 0; R < rows; R++) {
            int row;
            const linear *l = fused_src(f, (int)(R / n), (int)(R % n), &row);
            uint8_t *buf;
            if ((rc = up_reserve(u, d + R * k * 2, (size_t)k * 2, &buf, err)) ||
                (rc = row_f16(l, row, (uint16_t *)buf, err)))
                return lm_err_prefix(err, "%s", what);
        }
        return up_flush(u, err);
    }
    out->kind = CU_W_INT4;
    const int g = l0->q.group, G = k / g;
    out->group = g;
    uint8_t *qs, *sc, *zp;
    if ((rc = grab(b, (void **)&qs, rows * (k / 2), what, err)) ||
        (rc = grab(b, (void **)&sc, rows * G * 2, what, err)) ||
        (rc = grab(b, (void **)&zp, rows * G, what, err)))
        return rc;
    out->qs = qs;
    out->scales = (const uint16_t *)sc;
    out->zeros = zp;
    for (int a = 0; a < 3; a++) {
        uint8_t *base = a == 0 ? qs : a == 1 ? sc : zp;
        const size_t rb = a == 0 ? (size_t)k / 2 : a == 1 ? (size_t)G * 2 : (size_t)G;
        for (size_t R = 0; R < rows; R++) {
            int row;
            const linear *l = fused_src(f, (int)(R / n), (int)(R % n), &row);
            const uint8_t *src = a == 0 ? l->q.qs : a == 1 ? (const uint8_t *)l->q.scales : l->q.zeros;
            uint8_t *buf;
            if ((rc = up_reserve(u, base + R * rb, rb, &buf, err)))
                return rc;
            memcpy(buf, src + (size_t)row * rb, rb);
        }
        /* never merge two allocations into one copy, even if they happen to be adjacent */
        if ((rc = up_flush(u, err)))
            return rc;
    }
    if (l0->q.perm) {
        uint8_t *pm;
        if ((rc = grab(b, (void **)&pm, (size_t)f->n_experts * k * 4, what, err)))
            return rc;
        for (int e = 0; e < f->n_experts; e++) {
            uint8_t *buf;
            if ((rc = up_reserve(u, pm + (size_t)e * k * 4, (size_t)k * 4, &buf, err)))
                return rc;
            memcpy(buf, f->parts[(size_t)e * f->np]->q.perm, (size_t)k * 4);
        }
        out->perm = (const int32_t *)pm;
    }
    return up_flush(u, err);
}

int upload_floats(cuda_backend *b, uploader *u, const float *const *src, const int *len, int n,
                  const float **ret, const char *what, lm_err *err)
{
    size_t tot = 0;
    for (int i = 0; i < n; i++)
        tot += len[i];
    uint8_t *d;
    int rc = grab(b, (void **)&d, tot * 4, what, err);
    if (rc)
        return rc;
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        /* in STAGE-sized pieces */
        for (size_t j = 0; j < (size_t)len[i];) {
            const size_t c = (size_t)len[i] - j < STAGE_BYTES / 8 ? (size_t)len[i] - j : STAGE_BYTES / 8;
            uint8_t *buf;
            if ((rc = up_reserve(u, d + (off + j) * 4, c * 4, &buf, err)))
                return rc;
            if (src[i])
                memcpy(buf, src[i] + j, c * 4);
            else
                memset(buf, 0, c * 4);
            j += c;
        }
        off += len[i];
    }
    *ret = (const float *)d;
    return up_flush(u, err);
}

int upload_f32_rows(cuda_backend *b, uploader *u, const linear *const *rows_of, int n, int k,
                    const float **ret, const char *what, lm_err *err)
{
    /* dense [rows][k] matrices (router, shared gate) stacked, as fp32 */
    int tot = 0;
    for (int i = 0; i < n; i++)
        tot += rows_of[i]->n;
    uint8_t *d;
    int rc = grab(b, (void **)&d, (size_t)tot * k * 4, what, err);
    if (rc)
        return rc;
    size_t R = 0;
    for (int i = 0; i < n; i++) {
        const linear *l = rows_of[i];
        if (l->kind != LINEAR_DENSE || l->k != k)
            return lm_err_set(err, -EINVAL, "cuda: %s: expected a dense [*][%d] matrix", what, k);
        for (int r = 0; r < l->n; r++, R++) {
            uint8_t *buf;
            if ((rc = up_reserve(u, d + R * k * 4, (size_t)k * 4, &buf, err)))
                return rc;
            float *o = (float *)buf;
            for (int j = 0; j < k; j++) {
                const size_t x = (size_t)r * k + j;
                o[j] = l->dtype == ST_F32 ? ((const float *)l->w)[x]
                       : l->dtype == ST_BF16 ? bf16_to_float(((const uint16_t *)l->w)[x])
                                             : fp16_to_float(((const uint16_t *)l->w)[x]);
            }
        }
    }
    *ret = (const float *)d;
    return up_flush(u, err);
}

/* ---- vtable ------------------------------------------------------------------------ */

int cb_kv_init(backend *bb, int32_t bs, int32_t nb, lm_err *err)
{
    cuda_backend *b = (cuda_backend *)bb;
    CUDA_TRY(err, cudaSetDevice(b->device));
    return cu_state_kv_init(b->s, bs, nb, err);
}
int cb_kv_copy(backend *bb, int32_t src, int32_t dst, lm_err *err)
{
    cuda_backend *b = (cuda_backend *)bb;
    CUDA_TRY(err, cudaSetDevice(b->device));
    return cu_state_kv_copy(b->s, src, dst, err);
}
int cb_forward(backend *bb, const backend_batch *batch, lm_err *err)
{
    cuda_backend *b = (cuda_backend *)bb;
    CUDA_TRY(err, cudaSetDevice(b->device));
    return cu_forward(b->s, batch, err);
}
void cb_info(const backend *bb, backend_info *r)
{
    const cuda_backend *b = (const cuda_backend *)bb;
    memset(r, 0, sizeof(*r));
    r->name = b->name;
    r->vocab = b->m.vocab;
    r->max_context = b->m.max_ctx;
    r->tensor_parallel = 1;
    r->kv_bytes_per_token = cu_state_kv_bytes_per_token(b->s);
    r->device_memory_free = cu_state_free_bytes(b->s);
    r->max_penalties = cu_state_sample_cap(b->s);
    r->device_sampling = r->max_penalties > 0;
}
void cb_destroy(backend *bb)
{
    cuda_backend *b = (cuda_backend *)bb;
    if (!b)
        return;
    cudaSetDevice(b->device);
    cu_state_destroy(b->s);
    for (int i = 0; i < b->n_ptrs; i++)
        cudaFree(b->ptrs[i]);
    free(b->ptrs);
    free(b->layers);
    free(b);
}
const backend_ops cuda_ops = {cb_kv_init, cb_kv_copy, cb_forward, cb_info, cb_destroy};

int build(cuda_backend *b, const model *mm, uploader *u, lm_err *err)
{
    const model_config *c = &mm->cfg;
    cu_model *m = &b->m;
    int rc;
    if (c->o_bias)
        return lm_err_set(err, -ENOTSUP, "cuda: o_proj bias is not implemented on CUDA");
    m->n_layers = c->n_layers;
    m->hidden = c->hidden;
    m->nq = c->n_heads;
    m->nkv = c->n_kv_heads;
    m->head_dim = c->head_dim;
    m->vocab = c->vocab;
    m->max_ctx = c->max_position;
    m->n_experts = c->n_experts;
    m->top_k = c->top_k;
    m->renorm = c->norm_topk_prob;
    m->has_shared = c->shared_intermediate > 0;
    m->eps = c->rms_eps;
    m->rope_theta = c->rope_theta;
    int imax = c->moe_intermediate > c->shared_intermediate ? c->moe_intermediate : c->shared_intermediate;
    for (int l = 0; l < c->n_layers; l++)
        if (!mm->layers[l].is_moe && mm->layers[l].mlp.down.k > imax)
            imax = mm->layers[l].mlp.down.k;
    for (int l = 0; l < c->n_layers; l++)
        if (mm->layers[l].is_moe && mm->layers[l].experts[0].down.k > imax)
            imax = mm->layers[l].experts[0].down.k;
    m->inter_max = imax;
    b->layers = (cu_layer *)calloc(c->n_layers, sizeof(cu_layer));
    if (!b->layers)
        return lm_err_set(err, -ENOMEM, "cuda: out of host memory");
    m->layers = b->layers;
    {
        const linear *e1[] = {&mm->embed};
        fused f = {e1, 1, 0, 1};
        cu_linear emb;
        if ((rc = upload_fused(b, u, &f, "embed_tokens", &emb, err)))
            return rc;
        if (emb.kind != CU_W_F16)
            return lm_err_set(err, -EINVAL, "cuda: embeddings must be 16-bit");
        m->embed = emb.w16;
        if (mm->lm_head.w == mm->embed.w && mm->lm_head.kind == LINEAR_DENSE) {
            m->lm_head = emb;
        } else {
            const linear *h1[] = {&mm->lm_head};
            fused fh = {h1, 1, 0, 1};
            if ((rc = upload_fused(b, u, &fh, "lm_head", &m->lm_head, err)))
                return rc;
        }
        const float *fn[] = {mm->final_norm};
        const int fl[] = {c->hidden};
        if ((rc = upload_floats(b, u, fn, fl, 1, &m->final_norm, "norm", err)))
            return rc;
    }
    for (int l = 0; l < c->n_layers; l++) {
        const layer_weights *W = &mm->layers[l];
        cu_layer *L = &b->layers[l];
        char what[64];
        snprintf(what, sizeof what, "layer %d", l);
        const float *nv[] = {W->attn_norm};
        const int nl[] = {c->hidden};
        if ((rc = upload_floats(b, u, nv, nl, 1, &L->attn_norm, what, err)))
            return rc;
        nv[0] = W->ffn_norm;
        if ((rc = upload_floats(b, u, nv, nl, 1, &L->mlp_norm, what, err)))
            return rc;
        const linear *qkv[] = {&W->q, &W->k, &W->v};
        fused fq = {qkv, 3, 0, 1};
        snprintf(what, sizeof what, "layer %d q/k/v", l);
        if ((rc = upload_fused(b, u, &fq, what, &L->qkv, err)))
            return rc;
        if (W->q.bias || W->k.bias || W->v.bias) {
            const float *bv[] = {W->q.bias, W->k.bias, W->v.bias};
            const int bl[] = {W->q.n, W->k.n, W->v.n};
            if ((rc = upload_floats(b, u, bv, bl, 3, &L->qkv_bias, what, err)))
                return rc;
        }
        if (W->q_norm) {
            const float *qn[] = {W->q_norm}, *kn[] = {W->k_norm};
            const int hl[] = {c->head_dim};
            if ((rc = upload_floats(b, u, qn, hl, 1, &L->q_norm, what, err)) ||
                (rc = upload_floats(b, u, kn, hl, 1, &L->k_norm, what, err)))
                return rc;
        }
        const linear *o1[] = {&W->o};
        fused fo = {o1, 1, 0, 1};
        snprintf(what, sizeof what, "layer %d o_proj", l);
        if ((rc = upload_fused(b, u, &fo, what, &L->o, err)))
            return rc;
        L->moe = W->is_moe;
        if (!W->is_moe) {
            const linear *gu[] = {&W->mlp.gate, &W->mlp.up}, *dn[] = {&W->mlp.down};
            fused fg = {gu, 2, 1, 1}, fd = {dn, 1, 0, 1};
            snprintf(what, sizeof what, "layer %d mlp", l);
            if ((rc = upload_fused(b, u, &fg, what, &L->gate_up, err)) ||
                (rc = upload_fused(b, u, &fd, what, &L->down, err)))
                return rc;
            continue;
        }
        const int E = c->n_experts;
        const linear **gu = (const linear **)malloc(sizeof(linear *) * 2 * E);
        const linear **dn = (const linear **)malloc(sizeof(linear *) * E);
        if (!gu || !dn) {
            free(gu);
            free(dn);
            return lm_err_set(err, -ENOMEM, "cuda: out of host memory");
        }
        for (int e = 0; e < E; e++) {
            gu[2 * e] = &W->experts[e].gate;
            gu[2 * e + 1] = &W->experts[e].up;
            dn[e] = &W->experts[e].down;
        }
        fused fg = {gu, 2, 1, E}, fd = {dn, 1, 0, E};
        snprintf(what, sizeof what, "layer %d experts", l);
        rc = upload_fused(b, u, &fg, what, &L->gate_up, err);
        if (!rc)
            rc = upload_fused(b, u, &fd, what, &L->down, err);
        free(gu);
        free(dn);
        if (rc)
            return rc;
        const linear *rt[] = {&W->router, &W->shared_gate};
        snprintf(what, sizeof what, "layer %d router", l);
        if ((rc = upload_f32_rows(b, u, rt, W->has_shared ? 2 : 1, c->hidden, &L->router, what, err)))
            return rc;
        if (W->has_shared) {
            const linear *sg[] = {&W->shared.gate, &W->shared.up}, *sd[] = {&W->shared.down};
            fused fs = {sg, 2, 1, 1}, fsd = {sd, 1, 0, 1};
            snprintf(what, sizeof what, "layer %d shared expert", l);
            if ((rc = upload_fused(b, u, &fs, what, &L->sh_gate_up, err)) ||
                (rc = upload_fused(b, u, &fsd, what, &L->sh_down, err)))
                return rc;
        }
    }
    return 0;
}

} // namespace

extern "C" int backend_cuda_create(const model *mm, const backend_options *o, backend **ret,
                                   lm_err *err)
{
    *ret = NULL;
    const char *cm = getenv("LIGHTMOE_CUDA_COMM");
    if ((o && o->tp > 1) || (cm && *cm)) {
        int kind = !cm || !*cm ? CUDA_TP_COMM_AUTO
                   : !strcmp(cm, "nccl") ? CUDA_TP_COMM_NCCL
                   : !strcmp(cm, "host") ? CUDA_TP_COMM_HOST : -1;
        if (kind < 0)
            return lm_err_set(err, -EINVAL, "LIGHTMOE_CUDA_COMM='%s': expected nccl or host", cm);
        return backend_cuda_tp_create(mm, o, kind, ret, err);
    }
    return backend_cuda_create_rank(mm, o, o && o->devices ? o->devices[0] : 0, NULL, 0, 0, ret,
                                    err);
}

extern "C" int backend_cuda_create_rank(const model *mm, const backend_options *o, int device,
                                        comm *c, int32_t vocab_begin, int32_t vocab_stride,
                                        backend **ret, lm_err *err)
{
    *ret = NULL;
    cuda_backend *b = (cuda_backend *)calloc(1, sizeof(*b));
    if (!b)
        return lm_err_set(err, -ENOMEM, "cuda: out of host memory");
    b->base.ops = &cuda_ops;
    b->device = device;
    snprintf(b->name, sizeof b->name, "%s", o && o->force_portable ? "cuda-portable" : "cuda");
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || b->device < 0 || b->device >= n) {
        free(b);
        return lm_err_set(err, -ENODEV, "cuda: no device %d (%s)", device,
                          e != cudaSuccess ? cudaGetErrorString(e) : "not that many devices");
    }
    int rc = cuda_err(err, cudaSetDevice(b->device), "select device");
    uploader u;
    memset(&u, 0, sizeof(u));
    if (!rc)
        rc = up_init(&u, err);
    if (!rc)
        rc = build(b, mm, &u, err);
    up_free(&u);
    if (!rc) {
        cu_options co;
        memset(&co, 0, sizeof(co));
        co.max_tokens = o && o->max_tokens > 0 ? o->max_tokens : 256;
        /* logits rows: all tokens, but at most ~1 GB of them (large vocabularies) */
        const long cap = (1l << 30) / ((long)b->m.vocab * 4);
        co.max_logits = co.max_tokens < cap ? co.max_tokens : (cap > 256 ? (int)cap : 256);
        co.portable = o ? o->force_portable : 0;
        const char *p = getenv("LIGHTMOE_CUDA_PATH");
        co.path = p && !strcmp(p, "gemv")      ? 1
                  : p && !strcmp(p, "mma")     ? 2
                  : p && !strcmp(p, "dequant") ? 3
                                               : 0;
        const char *g = getenv("LIGHTMOE_CUDA_GRAPHS");
        co.graphs = !(g && !strcmp(g, "0"));
        co.comm = c;
        co.vocab_begin = vocab_begin;
        co.vocab_stride = vocab_stride;
        rc = cu_state_create(&b->m, &co, &b->s, err);
    }
    if (rc) {
        cb_destroy(&b->base);
        return rc;
    }
    *ret = &b->base;
    return 0;
}

extern "C" struct cu_state *backend_cuda_state(backend *bb)
{
    backend *r0 = backend_cuda_tp_rank(bb, 0);
    if (r0)
        bb = r0;
    return bb && bb->ops == &cuda_ops ? ((cuda_backend *)bb)->s : NULL;
}

extern "C" const struct cu_model *backend_cuda_model(backend *bb)
{
    backend *r0 = backend_cuda_tp_rank(bb, 0);
    if (r0)
        bb = r0;
    return bb && bb->ops == &cuda_ops ? &((cuda_backend *)bb)->m : NULL;
}
