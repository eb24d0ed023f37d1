/*
 * cpu_forward.c: one rank's forward pass (cpu_forward.h).
 *
 * Per chunk of T token rows (x is the residual stream [T][H]):
 *   x = embed(tokens)
 *   per layer:  h = rmsnorm(x); q,k,v = h W^T (+b); [qwen3: rmsnorm per head
 *               of q and k]; rope(q, k); store k, v in the paged cache;
 *               a = attention(q, cache); x += a Wo^T
 *               h = rmsnorm(x); x += moe(h) or mlp(h)
 *   logits of the requested rows = rmsnorm(x) W_lm^T
 * moe(h) = sum over the top-k experts e (in expert-id order) of
 *          w_e * down_e(silu(gate_e h) * up_e h)  [+ sigmoid(g . h) * shared(h)]
 * which is the order transformers adds them in.
 */
#include "engine/cpu_forward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/ops_cpu.h"

#define LOGIT_CHUNK 64

struct cpu_forward {
    const model *m;
    cpu_forward_options opt;
    cpu_pool *pool;
    int32_t T;                  /* max_tokens */
    int32_t H, D, Hq, Hkv, Imax, Kmax, Vl;
    /* scratch, [T][...] each */
    float *x, *h, *tmp, *q, *k, *v, *att, *rlog, *rw, *ein, *eg, *eu, *eout, *perm, *sgate;
    int32_t *rid, *tok, *pos, *ecount, *elist;
    float *ew;
    const int32_t **tables;
    float *lrows, *llog, *lgather;
    float *inv_freq;
    /* KV cache */
    int32_t block_size, n_blocks;
    float **kc, **vc;           /* [layers] */
    float *attn_scratch;
    int32_t max_ctx;
};

int backend_batch_check(const backend_batch *b, int32_t vocab, int32_t block_size,
                        int32_t n_blocks, lm_err *err)
{
    if (block_size <= 0)
        return lm_err_set(err, -EINVAL, "forward: KV cache not initialised (kv_init)");
    if (b->n_seqs < 1 || b->n_tokens < 1 || !b->tokens || !b->seq_start || !b->start_pos ||
        !b->block_table || b->max_blocks < 1)
        return lm_err_set(err, -EINVAL, "forward: empty batch or missing arrays");
    if (b->seq_start[0] != 0 || b->seq_start[b->n_seqs] != b->n_tokens)
        return lm_err_set(err, -EINVAL, "forward: seq_start must go from 0 to n_tokens");
    for (int32_t s = 0; s < b->n_seqs; s++) {
        int32_t len = b->seq_start[s + 1] - b->seq_start[s];
        if (len < 1)
            return lm_err_set(err, -EINVAL, "forward: piece %d is empty or seq_start decreases", s);
        int64_t cap = (int64_t)(b->max_blocks < n_blocks ? b->max_blocks : n_blocks) * block_size;
        if (b->start_pos[s] < 0 || (int64_t)b->start_pos[s] + len > cap)
            return lm_err_set(err, -EINVAL,
                              "forward: piece %d positions [%d, %d) exceed its block table or "
                              "the cache (%lld token slots)",
                              s, b->start_pos[s], b->start_pos[s] + len, (long long)cap);
        int32_t nb = (b->start_pos[s] + len + block_size - 1) / block_size;
        for (int32_t j = 0; j < nb; j++) {
            int32_t id = b->block_table[(size_t)s * (size_t)b->max_blocks + (size_t)j];
            if (id < 0 || id >= n_blocks)
                return lm_err_set(err, -EINVAL, "forward: piece %d block_table[%d] = %d not in "
                                  "0..%d", s, j, id, n_blocks - 1);
        }
    }
    for (int32_t t = 0; t < b->n_tokens; t++)
        if (b->tokens[t] < 0 || b->tokens[t] >= vocab)
            return lm_err_set(err, -EINVAL, "forward: token %d at row %d outside vocabulary of %d",
                              b->tokens[t], t, vocab);
    if (b->n_logits < 0 || (b->n_logits && (!b->logit_rows || !b->logits)))
        return lm_err_set(err, -EINVAL, "forward: logit rows without an output buffer");
    for (int32_t i = 0; i < b->n_logits; i++)
        if (b->logit_rows[i] < 0 || b->logit_rows[i] >= b->n_tokens)
            return lm_err_set(err, -EINVAL, "forward: logit_rows[%d] = %d outside 0..%d", i,
                              b->logit_rows[i], b->n_tokens - 1);
    return 0;
}

static int32_t imax(int32_t a, int32_t b) { return a > b ? a : b; }

void cpu_forward_destroy(cpu_forward *f)
{
    if (!f)
        return;
    cpu_pool_destroy(f->pool);
    float **bufs[] = {&f->x,   &f->h,     &f->tmp,   &f->q,     &f->k,    &f->v,
                      &f->att, &f->rlog,  &f->rw,    &f->ein,   &f->eg,   &f->eu,
                      &f->eout, &f->perm, &f->sgate, &f->ew,    &f->lrows, &f->llog,
                      &f->lgather, &f->inv_freq, &f->attn_scratch};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        free(*bufs[i]);
    free(f->rid);
    free(f->tok);
    free(f->pos);
    free(f->ecount);
    free(f->elist);
    free(f->tables);
    if (f->kc)
        for (int32_t l = 0; l < f->m->cfg.n_layers; l++) {
            free(f->kc[l]);
            free(f->vc[l]);
        }
    free(f->kc);
    free(f->vc);
    free(f);
}

static float *fbuf(size_t n, int *fail)
{
    float *p = calloc(n ? n : 1, sizeof(float));
    *fail |= !p;
    return p;
}

int cpu_forward_create(const model *m, const cpu_forward_options *opt, cpu_forward **ret,
                       lm_err *err)
{
    *ret = NULL;
    const model_config *c = &m->cfg;
    cpu_forward *f = calloc(1, sizeof *f);
    if (!f)
        return lm_err_set(err, -ENOMEM, "cpu backend: out of memory");
    f->m = m;
    f->opt = *opt;
    int rc = cpu_pool_create(opt->threads, &f->pool, err);
    if (rc) {
        free(f);
        return rc;
    }
    cpu_pool_set_portable(f->pool, opt->portable);
    size_t T = (size_t)(f->T = opt->max_tokens > 0 ? opt->max_tokens : 256);
    f->H = c->hidden;
    f->D = c->head_dim;
    f->Hq = c->n_heads * c->head_dim;
    f->Hkv = c->n_kv_heads * c->head_dim;
    f->Imax = imax(imax(c->moe_intermediate, c->shared_intermediate), c->intermediate);
    f->Kmax = imax(imax(f->H, f->Hq), f->Imax);
    f->Vl = m->lm_head.n;
    size_t E = (size_t)c->n_experts, K = (size_t)c->top_k, L = T < LOGIT_CHUNK ? T : LOGIT_CHUNK;
    int fail = 0;
    f->x = fbuf(T * (size_t)f->H, &fail);
    f->h = fbuf(T * (size_t)f->H, &fail);
    f->tmp = fbuf(T * (size_t)f->H, &fail);
    f->q = fbuf(T * (size_t)f->Hq, &fail);
    f->k = fbuf(T * (size_t)f->Hkv, &fail);
    f->v = fbuf(T * (size_t)f->Hkv, &fail);
    f->att = fbuf(T * (size_t)f->Hq, &fail);
    f->rlog = fbuf(T * E, &fail);
    f->rw = fbuf(T * K, &fail);
    f->ein = fbuf(T * (size_t)f->H, &fail);
    f->eg = fbuf(T * (size_t)f->Imax, &fail);
    f->eu = fbuf(T * (size_t)f->Imax, &fail);
    f->eout = fbuf(T * (size_t)f->H, &fail);
    f->perm = fbuf(T * (size_t)f->Kmax, &fail);
    f->sgate = fbuf(T, &fail);
    f->ew = fbuf(E * T, &fail);
    f->lrows = fbuf(L * (size_t)f->H, &fail);
    f->inv_freq = fbuf((size_t)f->D / 2, &fail);
    if (opt->comm) {
        f->llog = fbuf(L * (size_t)opt->vocab_stride, &fail);
        f->lgather = fbuf(L * (size_t)opt->vocab_stride * (size_t)opt->comm->size, &fail);
    }
    f->rid = calloc(T * K, sizeof *f->rid);
    f->tok = calloc(T, sizeof *f->tok);
    f->pos = calloc(T, sizeof *f->pos);
    f->ecount = calloc(E, sizeof *f->ecount);
    f->elist = calloc(E * T, sizeof *f->elist);
    f->tables = calloc(T, sizeof *f->tables);
    if (fail || !f->rid || !f->tok || !f->pos || !f->ecount || !f->elist || !f->tables) {
        cpu_forward_destroy(f);
        return lm_err_set(err, -ENOMEM, "cpu backend: out of memory for %zu-token scratch", T);
    }
    if ((rc = cpu_pool_reserve(f->pool, 4 * (size_t)f->Kmax, err))) {
        cpu_forward_destroy(f);
        return rc;
    }
    op_rope_inv_freq(f->inv_freq, f->D, c->rope_theta);
    *ret = f;
    return 0;
}

size_t cpu_forward_kv_bytes_per_token(const cpu_forward *f)
{
    return (size_t)f->m->cfg.n_layers * 2u * (size_t)f->Hkv * sizeof(float);
}

int cpu_forward_kv_init(cpu_forward *f, int32_t block_size, int32_t n_blocks, lm_err *err)
{
    if (f->kc)
        return lm_err_set(err, -EALREADY, "cpu backend: KV cache already initialised");
    if (block_size < 1 || n_blocks < 1 || (int64_t)block_size * n_blocks > (1 << 30))
        return lm_err_set(err, -EINVAL, "cpu backend: bad KV geometry %d blocks of %d", n_blocks,
                          block_size);
    int32_t Ln = f->m->cfg.n_layers;
    f->kc = calloc((size_t)Ln, sizeof *f->kc);
    f->vc = calloc((size_t)Ln, sizeof *f->vc);
    size_t per = (size_t)n_blocks * (size_t)block_size * (size_t)f->Hkv;
    f->max_ctx = block_size * n_blocks;
    f->attn_scratch = malloc((size_t)cpu_pool_threads(f->pool) * (size_t)f->max_ctx * sizeof(float));
    int fail = !f->kc || !f->vc || !f->attn_scratch;
    for (int32_t l = 0; !fail && l < Ln; l++) {
        f->kc[l] = calloc(per, sizeof(float));
        f->vc[l] = calloc(per, sizeof(float));
        fail = !f->kc[l] || !f->vc[l];
    }
    if (fail) {
        for (int32_t l = 0; f->kc && l < Ln; l++) {
            free(f->kc[l]);
            free(f->vc[l]);
        }
        free(f->kc);
        free(f->vc);
        free(f->attn_scratch);
        f->kc = f->vc = NULL;
        f->attn_scratch = NULL;
        return lm_err_set(err, -ENOMEM, "cpu backend: out of memory for a KV cache of %d x %d "
                          "tokens", n_blocks, block_size);
    }
    f->block_size = block_size;
    f->n_blocks = n_blocks;
    return 0;
}

void cpu_forward_kv_copy(cpu_forward *f, int32_t src, int32_t dst)
{
    size_t blk = (size_t)f->block_size * (size_t)f->Hkv;
    for (int32_t l = 0; l < f->m->cfg.n_layers; l++) {
        memcpy(f->kc[l] + (size_t)dst * blk, f->kc[l] + (size_t)src * blk, blk * sizeof(float));
        memcpy(f->vc[l] + (size_t)dst * blk, f->vc[l] + (size_t)src * blk, blk * sizeof(float));
    }
}

static int all_reduce(cpu_forward *f, float *buf, size_t n, lm_err *err)
{
    return f->opt.comm ? comm_all_reduce_sum(f->opt.comm, buf, n, err) : 0;
}

/* out [T][H] = mlp(in [T][H]) for T rows. */
static void mlp_rows(cpu_forward *f, const mlp_weights *w, const float *in, int32_t T, float *out)
{
    int32_t W = w->gate.n;
    op_linear(f->pool, &w->gate, in, f->H, T, f->eg, W, f->perm);
    op_linear(f->pool, &w->up, in, f->H, T, f->eu, W, f->perm);
    op_silu_mul(f->eg, f->eu, (int64_t)T * W);
    op_linear(f->pool, &w->down, f->eg, W, T, out, f->H, f->perm);
}

/* f->tmp [T][H] = moe(f->h) (partial sums on a shard). */
static void moe_block(cpu_forward *f, const layer_weights *lw, int32_t T)
{
    const model_config *c = &f->m->cfg;
    int32_t E = c->n_experts, K = c->top_k, H = f->H;
    op_linear(f->pool, &lw->router, f->h, H, T, f->rlog, E, NULL);
    memset(f->ecount, 0, (size_t)E * sizeof *f->ecount);
    for (int32_t t = 0; t < T; t++) {
        int32_t *ids = f->rid + (size_t)t * (size_t)K;
        float *ws = f->rw + (size_t)t * (size_t)K;
        op_route(f->rlog + (size_t)t * (size_t)E, E, K, c->norm_topk_prob, ids, ws);
        for (int32_t i = 0; i < K; i++) {
            int32_t e = ids[i];
            f->elist[(size_t)e * (size_t)f->T + (size_t)f->ecount[e]] = t;
            f->ew[(size_t)e * (size_t)f->T + (size_t)f->ecount[e]] = ws[i];
            f->ecount[e]++;
        }
    }
    memset(f->tmp, 0, (size_t)T * (size_t)H * sizeof(float));
    for (int32_t e = 0; e < E; e++) {
        int32_t n = f->ecount[e];
        if (!n)
            continue;
        const int32_t *list = f->elist + (size_t)e * (size_t)f->T;
        const float *ws = f->ew + (size_t)e * (size_t)f->T;
        for (int32_t i = 0; i < n; i++)
            memcpy(f->ein + (size_t)i * (size_t)H, f->h + (size_t)list[i] * (size_t)H,
                   (size_t)H * sizeof(float));
        mlp_rows(f, &lw->experts[e], f->ein, n, f->eout);
        for (int32_t i = 0; i < n; i++) {
            float *dst = f->tmp + (size_t)list[i] * (size_t)H;
            const float *src = f->eout + (size_t)i * (size_t)H;
            for (int32_t d = 0; d < H; d++)
                dst[d] += src[d] * ws[i];
        }
    }
    if (lw->has_shared) {
        op_linear(f->pool, &lw->shared_gate, f->h, H, T, f->sgate, 1, NULL);
        mlp_rows(f, &lw->shared, f->h, T, f->eout);
        for (int32_t t = 0; t < T; t++) {
            float g = op_sigmoid(f->sgate[t]);
            float *dst = f->tmp + (size_t)t * (size_t)H;
            const float *src = f->eout + (size_t)t * (size_t)H;
            for (int32_t d = 0; d < H; d++)
                dst[d] += g * src[d];
        }
    }
}

static int layer_forward(cpu_forward *f, int32_t li, int32_t T, lm_err *err)
{
    const model_config *c = &f->m->cfg;
    const layer_weights *lw = &f->m->layers[li];
    int32_t H = f->H, D = f->D;
    op_rmsnorm(f->h, f->x, lw->attn_norm, T, H, c->rms_eps);
    op_linear(f->pool, &lw->q, f->h, H, T, f->q, f->Hq, f->perm);
    op_linear(f->pool, &lw->k, f->h, H, T, f->k, f->Hkv, f->perm);
    op_linear(f->pool, &lw->v, f->h, H, T, f->v, f->Hkv, f->perm);
    if (lw->q_norm) {
        op_rmsnorm(f->q, f->q, lw->q_norm, T * c->n_heads, D, c->rms_eps);
        op_rmsnorm(f->k, f->k, lw->k_norm, T * c->n_kv_heads, D, c->rms_eps);
    }
    op_rope(f->q, T, c->n_heads, D, f->pos, f->inv_freq);
    op_rope(f->k, T, c->n_kv_heads, D, f->pos, f->inv_freq);
    op_kv_layer kv = {f->kc[li], f->vc[li], f->block_size, c->n_kv_heads, D};
    op_kv_store(&kv, f->k, f->v, T, f->pos, f->tables);
    op_attention(f->pool, f->att, f->q, T, c->n_heads, f->pos, f->tables, &kv,
                 1.f / sqrtf((float)D), f->attn_scratch, f->max_ctx);
    op_linear(f->pool, &lw->o, f->att, f->Hq, T, f->tmp, H, f->perm);
    int rc = all_reduce(f, f->tmp, (size_t)T * (size_t)H, err);
    if (rc)
        return rc;
    for (size_t i = 0; i < (size_t)T * (size_t)H; i++)
        f->x[i] += f->tmp[i];
    op_rmsnorm(f->h, f->x, lw->ffn_norm, T, H, c->rms_eps);
    if (lw->is_moe)
        moe_block(f, lw, T);
    else
        mlp_rows(f, &lw->mlp, f->h, T, f->tmp);
    if ((rc = all_reduce(f, f->tmp, (size_t)T * (size_t)H, err)))
        return rc;
    for (size_t i = 0; i < (size_t)T * (size_t)H; i++)
        f->x[i] += f->tmp[i];
    return 0;
}

/* Logits of the batch rows in [t0, t0 + T) that were asked for. */
static int chunk_logits(cpu_forward *f, const backend_batch *b, int32_t t0, int32_t T,
                        lm_err *err)
{
    int32_t H = f->H, V = f->opt.vocab_full;
    int32_t L = f->T < LOGIT_CHUNK ? f->T : LOGIT_CHUNK;
    int32_t idx[LOGIT_CHUNK];
    int32_t i = 0;
    for (;;) {
        /* collect up to L requested rows of this chunk (every rank sees the same) */
        int32_t n = 0;
        for (; i < b->n_logits && n < L; i++)
            if (b->logit_rows[i] >= t0 && b->logit_rows[i] < t0 + T)
                idx[n++] = i;
        if (!n)
            return 0;
        for (int32_t j = 0; j < n; j++)
            op_rmsnorm(f->lrows + (size_t)j * (size_t)H,
                       f->x + (size_t)(b->logit_rows[idx[j]] - t0) * (size_t)H, f->m->final_norm,
                       1, H, f->m->cfg.rms_eps);
        if (!f->opt.comm) {
            if (idx[n - 1] - idx[0] == n - 1) { /* the usual case: one product for all rows */
                op_linear(f->pool, &f->m->lm_head, f->lrows, H, n,
                          b->logits + (size_t)idx[0] * (size_t)V, V, NULL);
                continue;
            }
            for (int32_t j = 0; j < n; j++)
                op_linear(f->pool, &f->m->lm_head, f->lrows + (size_t)j * (size_t)H, H, 1,
                          b->logits + (size_t)idx[j] * (size_t)V, V, NULL);
            continue;
        }
        int32_t S = f->opt.vocab_stride, R = f->opt.comm->size;
        memset(f->llog, 0, (size_t)n * (size_t)S * sizeof(float));
        op_linear(f->pool, &f->m->lm_head, f->lrows, H, n, f->llog, S, NULL);
        int rc = comm_all_gather(f->opt.comm, f->llog, f->lgather, (size_t)n * (size_t)S, err);
        if (rc)
            return rc;
        if (f->opt.comm->rank != 0) /* every rank has the rows; rank 0 writes them out */
            continue;
        for (int32_t r = 0; r < R; r++) {
            int32_t v0 = r * S, vn = V - v0 < S ? V - v0 : S;
            for (int32_t j = 0; vn > 0 && j < n; j++)
                memcpy(b->logits + (size_t)idx[j] * (size_t)V + (size_t)v0,
                       f->lgather + ((size_t)r * (size_t)n + (size_t)j) * (size_t)S,
                       (size_t)vn * sizeof(float));
        }
    }
}

int cpu_forward_run(cpu_forward *f, const backend_batch *b, lm_err *err)
{
    int32_t H = f->H;
    int32_t s = 0;
    for (int32_t t0 = 0; t0 < b->n_tokens; t0 += f->T) {
        int32_t T = b->n_tokens - t0 < f->T ? b->n_tokens - t0 : f->T;
        for (int32_t t = 0; t < T; t++) {
            int32_t row = t0 + t;
            while (row >= b->seq_start[s + 1])
                s++;
            f->tok[t] = b->tokens[row];
            f->pos[t] = b->start_pos[s] + (row - b->seq_start[s]);
            f->tables[t] = b->block_table + (size_t)s * (size_t)b->max_blocks;
        }
        const linear *emb = &f->m->embed;
        if (!f->opt.comm) {
            op_embed(f->x, emb, f->tok, T);
        } else { /* vocabulary-split table: own rows, zeros elsewhere, then sum */
            for (int32_t t = 0; t < T; t++) {
                int32_t id = f->tok[t] - f->opt.vocab_begin;
                if (id >= 0 && id < emb->n)
                    op_embed(f->x + (size_t)t * (size_t)H, emb, &id, 1);
                else
                    memset(f->x + (size_t)t * (size_t)H, 0, (size_t)H * sizeof(float));
            }
            int rc = all_reduce(f, f->x, (size_t)T * (size_t)H, err);
            if (rc)
                return rc;
        }
        for (int32_t l = 0; l < f->m->cfg.n_layers; l++) {
            int rc = layer_forward(f, l, T, err);
            if (rc)
                return rc;
        }
        int rc = chunk_logits(f, b, t0, T, err);
        if (rc)
            return rc;
    }
    return 0;
}
