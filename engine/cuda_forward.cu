/*
 * cuda_forward.cu: the forward pass of a cu_model on one GPU (see
 * cuda_model.h): state allocation, batch upload, the layer loop, logits.
 * The state's fields are in cuda_state.cuh; the one-token persistent
 * kernel's setup is in cuda_state_mega.cu.
 *
 * Everything a step touches is allocated in cu_state_create / kv_init for
 * max_tokens; a step validates the batch on the host, uploads its small
 * description (tokens, positions, attention tiles, block table) through
 * pinned memory in one stream, and launches. INT4 layers never leave the
 * GPU; 16-bit expert layers (bf16/fp16 checkpoints run as they are) read
 * the per-expert counts back once per layer to call cuBLAS per expert.
 */
#include <cublas_v2.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cuda_attn.cuh"
#include "engine/cuda_common.cuh"
#include "engine/cuda_int4_gemm.cuh"
#include "engine/cuda_mega.cuh"
#include "engine/cuda_model.h"
#include "engine/cuda_moe.cuh"
#include "engine/cuda_norm.cuh"
#include "engine/cuda_rope.cuh"
#include "engine/cuda_state.cuh"
#include "engine/cuda_tp.cuh"

/* rows from which the automatic path runs dense INT4 layers as
 * dequantise + cuBLAS (see use_dequant) */
#define CU_DEQUANT_ROWS 512

enum { PROF_MAX = 4096 };
static const char *const prof_names[] = {"embed+norm", "qkv", "rope+kv", "attention", "o_proj",
                                         "router", "route+group", "experts gate_up",
                                         "experts down", "shared expert", "combine(+norm)",
                                         "dense mlp", "lm_head", "all-reduce"};
enum { P_NORM, P_QKV, P_ROPE, P_ATTN, P_O, P_ROUTER, P_GROUP, P_GATEUP, P_DOWN, P_SHARED,
       P_COMBINE, P_DENSE, P_HEAD, P_COMM, P_NCAT };


int cu_state_dev_alloc(void **p, size_t bytes, lm_err *err, const char *what)
{
    if (bytes == 0)
        bytes = 16;
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess)
        return lm_err_set(err, -ENOMEM, "cuda: allocating %zu bytes for %s: %s", bytes, what,
                          cudaGetErrorString(e));
    return 0;
}
#define ALLOC(ptr, n, what) \
    do { \
        int rc_ = cu_state_dev_alloc((void **)&(ptr), (size_t)(n) * sizeof(*(ptr)), err, what); \
        if (rc_) { \
            cu_state_destroy(s); \
            return rc_; \
        } \
    } while (0)

static int blas_err(lm_err *err, cublasStatus_t b, const char *what)
{
    if (b == CUBLAS_STATUS_SUCCESS)
        return 0;
    return lm_err_set(err, -EIO, "cublas: %s: status %d", what, (int)b);
}

extern "C" void cu_state_destroy(cu_state *s)
{
    if (!s)
        return;
    if (s->st)
        cudaStreamSynchronize(s->st);
    void *dev[] = {s->x, s->xnf, s->qkv, s->q, s->part, s->rlog, s->topk_w, s->sg, s->y, s->ys,
                   s->tmp, s->logits, s->inv_freq, s->xn, s->att, s->h, s->hs, s->xg, s->hg,
                   s->fn, s->topk_ids, s->plan.offsets, s->plan.ent_token, s->plan.ent_expert,
                   s->plan.ent_weight, s->plan.pos, s->plan.items, s->plan.n_items, s->wdq, s->dq_tmp, s->attn_cnt, s->d_tok,
                   s->d_seq, s->d_pos, s->d_rows, s->d_bt, s->d_tiles, s->kv, s->d_active,
                   s->d_mega_layers, s->mega_h, s->mega_bar, s->mega_fail, s->mega_cnt,
                   s->mega_prof, s->o_acc, s->u_acc, s->d_picks, s->d_pout, s->d_pen, s->d_se};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
        if (dev[i])
            cudaFree(dev[i]);
    void *host[] = {s->h_tok, s->h_seq, s->h_pos, s->h_rows, s->h_bt, s->h_off, s->h_tiles,
                    s->h_mega_fail, s->h_picks, s->h_pout, s->h_pen};
    for (size_t i = 0; i < sizeof(host) / sizeof(host[0]); i++)
        if (host[i])
            cudaFreeHost(host[i]);
    free(s->h_seen);
    for (int i = 0; i < s->n_graphs; i++)
        cudaGraphExecDestroy(s->graphs[i].exec);
    if (s->prof_ev) {
        for (int i = 0; i < 2 * PROF_MAX; i++)
            cudaEventDestroy(s->prof_ev[i]);
        free(s->prof_ev);
        free(s->prof_cat);
    }
    if (s->route_m) {
        for (int l = 0; l < s->m->n_layers; l++)
            if (s->route_m[l])
                cudaFree(s->route_m[l]);
        free(s->route_m);
    }
    cu_tp_destroy(s->tp);
    if (s->blas_ws)
        cudaFree(s->blas_ws);
    if (s->blas)
        cublasDestroy(s->blas);
    if (s->st)
        cudaStreamDestroy(s->st);
    free(s);
}

/* An off-by-default switch: on when the variable's value starts with 1. */
static int env_is_1(const char *name)
{
    const char *v = getenv(name);
    return v && v[0] == '1';
}
/* An on-by-default switch: off when the variable's value starts with 0. */
static int env_not_0(const char *name)
{
    const char *v = getenv(name);
    return !(v && v[0] == '0');
}

int cu_state_host_alloc(void **p, size_t bytes, lm_err *err)
{
    cudaError_t e = cudaMallocHost(p, bytes ? bytes : 16);
    return e == cudaSuccess ? 0 : cuda_err(err, e, "pinned host allocation");
}

static int route_o_setup(cu_state *s, lm_err *err);

extern "C" int cu_state_create(const cu_model *m, const cu_options *o, cu_state **ret,
                               lm_err *err)
{
    cu_state *s = (cu_state *)calloc(1, sizeof(*s));
    if (!s)
        return lm_err_set(err, -ENOMEM, "cuda: out of host memory");
    s->m = m;
    if (o)
        s->o = *o;
    if (s->o.max_tokens <= 0)
        s->o.max_tokens = 2048;
    const int Tm = s->Tm = s->o.max_tokens;
    if (s->o.max_logits <= 0 || s->o.max_logits > Tm)
        s->o.max_logits = Tm;
    /* the fp32 scratch of 16-bit SiLU products is needed only with 16-bit MLPs */
    int f16_mlp = 0;
    for (int l = 0; l < m->n_layers; l++)
        f16_mlp |= m->layers[l].gate_up.kind == CU_W_F16 || m->layers[l].sh_gate_up.kind == CU_W_F16;
    const int H = m->hidden, hd = m->head_dim, nq = m->nq, nkv = m->nkv;
    const int k = m->top_k > 0 ? m->top_k : 1, E = m->n_experts > 0 ? m->n_experts : 1;
    const int I = m->inter_max;
    const int nqkv = (nq + 2 * nkv) * hd;
    int dev = 0;
    cudaError_t ce = cudaGetDevice(&dev);
    if (ce == cudaSuccess)
        ce = cudaDeviceGetAttribute(&s->sms, cudaDevAttrMultiProcessorCount, dev);
    if (ce != cudaSuccess) {
        free(s);
        return cuda_err(err, ce, "device query");
    }
    if (cudaStreamCreateWithFlags(&s->st, cudaStreamNonBlocking) != cudaSuccess) {
        cu_state_destroy(s);
        return lm_err_set(err, -EIO, "cuda: cannot create a stream");
    }
    if (cublasCreate(&s->blas) != CUBLAS_STATUS_SUCCESS) {
        cu_state_destroy(s);
        return lm_err_set(err, -EIO, "cublas: cannot create a handle");
    }
    cublasSetStream(s->blas, s->st);
    /* a fixed cuBLAS workspace: no allocation inside a step, graph capture safe */
    if (cudaMalloc(&s->blas_ws, 32u << 20) != cudaSuccess ||
        cublasSetWorkspace(s->blas, s->blas_ws, 32u << 20) != CUBLAS_STATUS_SUCCESS) {
        cu_state_destroy(s);
        return lm_err_set(err, -ENOMEM, "cublas: cannot set a 32 MB workspace");
    }
    s->graph_ok = 1;
    for (int l = 0; l < m->n_layers; l++)
        if (m->layers[l].moe && m->layers[l].gate_up.kind != CU_W_INT4)
            s->graph_ok = 0;
    s->split_budget = Tm > 1024 ? Tm : 1024;
    /* Long contexts at decode: up to 256 splits of at most 8 steps (32K
     * positions at batch 1: 128 splits of 256 positions per KV head;
     * measured on the H100, docs/PERF.md: 12.8 -> 5.9 ms a qwen3-30b-a3b
     * step at 32K, 4.3 -> 3.5 ms at 4K).
     * LIGHTMOE_CUDA_ATTN_SPLITS=32 and LIGHTMOE_CUDA_ATTN_STEPS=1000 give
     * the earlier rule (two waves of blocks, at most 32 splits). */
    const char *as = getenv("LIGHTMOE_CUDA_ATTN_SPLITS");
    const char *at = getenv("LIGHTMOE_CUDA_ATTN_STEPS");
    s->attn_max_split = as ? atoi(as) : CU_ATTN_MAX_SPLIT;
    if (s->attn_max_split < 1 || s->attn_max_split > CU_ATTN_MAX_SPLIT)
        s->attn_max_split = CU_ATTN_MAX_SPLIT;
    s->attn_steps = at ? atoi(at) : 8;
    if (s->attn_steps < 1)
        s->attn_steps = 8;

    ALLOC(s->x, (size_t)Tm * H, "residual stream");
    ALLOC(s->xn, (size_t)Tm * H, "normed activations");
    ALLOC(s->xnf, (size_t)Tm * H, "normed activations (fp32)");
    ALLOC(s->qkv, (size_t)Tm * nqkv, "qkv");
    ALLOC(s->q, (size_t)Tm * nq * hd, "queries");
    ALLOC(s->att, (size_t)Tm * nq * hd, "attention output");
    ALLOC(s->part, (size_t)s->split_budget * nq * (hd + 2), "attention splits");
    ALLOC(s->rlog, (size_t)Tm * (E + 1), "router logits");
    ALLOC(s->topk_ids, (size_t)Tm * k, "top-k ids");
    ALLOC(s->topk_w, (size_t)Tm * k, "top-k weights");
    ALLOC(s->sg, (size_t)Tm, "shared gates");
    ALLOC(s->plan.offsets, E + 1, "expert offsets");
    ALLOC(s->plan.ent_token, (size_t)Tm * k, "entries");
    ALLOC(s->plan.ent_expert, (size_t)Tm * k, "entries");
    ALLOC(s->plan.ent_weight, (size_t)Tm * k, "entries");
    ALLOC(s->plan.pos, (size_t)Tm * k, "entries");
    ALLOC(s->plan.items, (size_t)Tm * k + E, "work items");
    /* the one-token gemv reads its item before it checks the item count
     * (cu_item_lookup): entries past the count are read, never used, and
     * should hold something written */
    if (cudaMemset(s->plan.items, 0, ((size_t)Tm * k + E) * sizeof(*s->plan.items)) != cudaSuccess) {
        cu_state_destroy(s);
        return lm_err_set(err, -EIO, "cuda: clearing the work items failed");
    }
    ALLOC(s->plan.n_items, 1, "work items");
    ALLOC(s->h, (size_t)Tm * k * I, "expert hidden");
    ALLOC(s->hg, (size_t)Tm * k * I, "expert hidden (gathered)");
    ALLOC(s->y, (size_t)Tm * k * H, "expert outputs");
    ALLOC(s->hs, (size_t)Tm * I, "shared hidden");
    ALLOC(s->ys, (size_t)Tm * H, "shared output");
    ALLOC(s->xg, (size_t)Tm * k * (H > nq * hd ? H : nq * hd), "gathered inputs");
    ALLOC(s->tmp, f16_mlp ? (size_t)Tm * k * 2 * I : 1, "16-bit product scratch");
    ALLOC(s->fn, (size_t)Tm * H, "final norm");
    ALLOC(s->logits, (size_t)s->o.max_logits * m->vocab, "logits");
    ALLOC(s->inv_freq, hd / 2, "rope frequencies");
    ALLOC(s->d_tok, Tm, "batch");
    ALLOC(s->d_seq, Tm, "batch");
    ALLOC(s->d_pos, Tm, "batch");
    ALLOC(s->d_rows, Tm, "batch");
    ALLOC(s->d_tiles, Tm, "batch");
    /* decode: q/k/v post-processing inside the attention kernel (on; =0 turns
     * it off). The attention's last block merging the splits is off unless
     * LIGHTMOE_CUDA_ATTN_MERGE=1: measured slower at batch 1 on the H100
     * (qwen3 shape 3.45 vs 3.23 ms/step; docs/PERF.md), the merge kernel
     * runs in parallel over rows while one block merges serially. */
    const char *qf = getenv("LIGHTMOE_CUDA_QKV_FUSE");
    s->qkv_fused = !(qf && qf[0] == '0');
    /* one-token steps, two launches a layer fewer: the routed (and shared)
     * experts' down products add into the residual atomically (no combine
     * kernel), and the next qkv product normalises its own input (no norm
     * kernel). On unless LIGHTMOE_CUDA_FOLD=0: measured -3% a step at batch
     * 1 on the H100, -5% with MERGE_O (docs/PERF.md, round 10). The atomic
     * sums have no fixed order: two runs may differ in the last bits. */
    s->fold = env_not_0("LIGHTMOE_CUDA_FOLD");
    /* with the fold, one launch a layer fewer again: the experts' gate_up
     * and down blocks route the token themselves from the router's logits
     * (no route+group launch; the down blocks before their dependency
     * wait). Off unless LIGHTMOE_CUDA_FOLD_ROUTE=1: measured no faster on
     * the H100 (docs/PERF.md, round 10). */
    s->fold_route = env_is_1("LIGHTMOE_CUDA_FOLD_ROUTE");
    /* one-token gate_up blocks ask L2 for their expert's down weights (a
     * share each), so that the down product reads L2; off unless
     * LIGHTMOE_CUDA_DOWN_PF=1: measured 1-2% slower on the H100
     * (docs/PERF.md, round 10) */
    s->down_pf = env_is_1("LIGHTMOE_CUDA_DOWN_PF");
    /* one-token steps: the attention's split merge and the o_proj product in
     * one launch, adding into the residual atomically (cu_attn_qkv_o); on
     * unless LIGHTMOE_CUDA_MERGE_O=0 (docs/PERF.md, round 10) */
    s->merge_o = env_not_0("LIGHTMOE_CUDA_MERGE_O");
    /* measurement only: letters of the one-token step's launches to leave
     * out (q qkv, a attention, m the merge + o_proj launch, o o_proj, r
     * router, g route+group, u experts' gate_up, d down, c combine); the
     * step's time without them says what they cost inside the graph. The
     * logits are then wrong; never for serving. */
    const char *sk = getenv("LIGHTMOE_CUDA_SKIP");
    snprintf(s->skip, sizeof s->skip, "%s", sk ? sk : "");
    /* one-token steps in one kernel: not with tensor parallelism (collectives
     * between the phases) nor for models it does not cover */
    if (s->o.comm)
        snprintf(s->mega_why, sizeof s->mega_why, "tensor parallelism");
    else if (!cu_mega_enabled())
        snprintf(s->mega_why, sizeof s->mega_why, "off (LIGHTMOE_CUDA_MEGA=1 turns it on)");
    else
        s->mega_want = cu_mega_supported(m, s->mega_why, sizeof s->mega_why);
    if (env_is_1("LIGHTMOE_CUDA_ATTN_MERGE")) {
        ALLOC(s->attn_cnt, (size_t)Tm * nkv, "attention split counters");
        if ((ce = cudaMemset(s->attn_cnt, 0, (size_t)Tm * nkv * 4)) != cudaSuccess) {
            cu_state_destroy(s);
            return cuda_err(err, ce, "attention counters");
        }
    }
    /* dense INT4 layers at prefill sizes (cu_forward_dequant_rows) or always
     * (path 3): workspace for the largest one, fp32 rows of the widest
     * fused-SiLU one, 1024 rows at a time */
    if (s->o.path == 3 || (s->o.path == 0 && Tm >= CU_DEQUANT_ROWS)) {
        size_t big = 0;
        int silu_n = 0;
        for (int l = 0; l < m->n_layers; l++) {
            const cu_layer *L = &m->layers[l];
            const cu_linear *d[] = {&L->qkv, &L->o, &L->sh_gate_up, &L->sh_down,
                                    L->moe ? NULL : &L->gate_up, L->moe ? NULL : &L->down};
            for (int i = 0; i < 6; i++)
                if (d[i] && d[i]->kind == CU_W_INT4 && (size_t)d[i]->n * d[i]->k > big)
                    big = (size_t)d[i]->n * d[i]->k;
            if (L->sh_gate_up.kind == CU_W_INT4 && L->sh_gate_up.n > silu_n)
                silu_n = L->sh_gate_up.n;
            if (!L->moe && L->gate_up.kind == CU_W_INT4 && L->gate_up.n > silu_n)
                silu_n = L->gate_up.n;
        }
        if (m->lm_head.kind == CU_W_INT4 && (size_t)m->lm_head.n * m->lm_head.k > big)
            big = (size_t)m->lm_head.n * m->lm_head.k;
        if (big) {
            ALLOC(s->wdq, big, "dequantised weights");
            s->wdq_elems = big;
            s->silu_rows = Tm < 1024 ? Tm : 1024;
            if (silu_n)
                ALLOC(s->dq_tmp, (size_t)s->silu_rows * silu_n, "dequantised SiLU products");
        }
    }
    int rc = 0;
    if (s->o.comm) {
        if (s->o.vocab_stride <= 0)
            s->o.vocab_stride = m->vocab;
        if (m->lm_head.n > s->o.vocab_stride || s->o.vocab_begin < 0 ||
            s->o.vocab_begin + m->lm_head.n > m->vocab) {
            cu_state_destroy(s);
            return lm_err_set(err, -EINVAL, "cuda: vocabulary rows [%d, %d) of %d at stride %d",
                              s->o.vocab_begin, s->o.vocab_begin + m->lm_head.n, m->vocab,
                              s->o.vocab_stride);
        }
        if ((rc = cu_tp_create(s->o.comm, (size_t)Tm * H,
                               (size_t)s->o.max_logits * s->o.vocab_stride, &s->tp, err))) {
            cu_state_destroy(s);
            return rc;
        }
        /* the host communicator synchronises on the host: nothing to capture */
        s->graph_ok &= cu_tp_graphable(s->tp);
    }
    if ((rc = cu_state_host_alloc((void **)&s->h_tok, Tm * 4, err)) ||
        (rc = cu_state_host_alloc((void **)&s->h_seq, Tm * 4, err)) ||
        (rc = cu_state_host_alloc((void **)&s->h_pos, Tm * 4, err)) ||
        (rc = cu_state_host_alloc((void **)&s->h_rows, Tm * 4, err)) ||
        (rc = cu_state_host_alloc((void **)&s->h_tiles, Tm * 8, err)) ||
        (rc = cu_state_host_alloc((void **)&s->h_off, (E + 1) * 4, err))) {
        cu_state_destroy(s);
        return rc;
    }
    /* sampling on the device, only picks crossing to the host: with
     * LIGHTMOE_CUDA_SAMPLE=1, not with tensor parallelism. Off by default
     * until it has run on a GPU (written in a session without one; see
     * docs/PERF.md, round 21). */
    if (!s->tp && env_is_1("LIGHTMOE_CUDA_SAMPLE")) {
        const int nl = s->o.max_logits, ns = nl < CU_SAMPLE_BLOCKS ? nl : CU_SAMPLE_BLOCKS;
        s->pen_cap = CU_SAMPLE_MAX_PENALTIES;
        ALLOC(s->d_picks, nl, "sampling parameters");
        ALLOC(s->d_pout, nl, "sampling results");
        ALLOC(s->d_pen, s->pen_cap, "sampling penalty entries");
        ALLOC(s->d_se, (size_t)ns * m->vocab, "sampling scratch");
        s->h_seen = (uint8_t *)calloc((size_t)m->vocab, 1);
        if (!s->h_seen) {
            cu_state_destroy(s);
            return lm_err_set(err, -ENOMEM, "cuda: out of host memory (sampling id marks)");
        }
        if ((rc = cu_state_host_alloc((void **)&s->h_picks, (size_t)nl * sizeof(cu_pick), err)) ||
            (rc = cu_state_host_alloc((void **)&s->h_pout, (size_t)nl * sizeof(backend_pick_out),
                                      err)) ||
            (rc = cu_state_host_alloc((void **)&s->h_pen,
                                      (size_t)s->pen_cap * sizeof(sample_penalty), err))) {
            cu_state_destroy(s);
            return rc;
        }
    }
    float *f = (float *)malloc(sizeof(float) * (hd / 2));
    if (!f) {
        cu_state_destroy(s);
        return lm_err_set(err, -ENOMEM, "cuda: out of host memory");
    }
    /* transformers: 1 / theta ** (arange(0, hd, 2) / hd) in float32 */
    for (int i = 0; i < hd / 2; i++)
        f[i] = (float)(1.0 / pow((double)m->rope_theta, (double)(2 * i) / (double)hd));
    ce = cudaMemcpy(s->inv_freq, f, sizeof(float) * (hd / 2), cudaMemcpyHostToDevice);
    free(f);
    if (ce != cudaSuccess) {
        rc = cuda_err(err, ce, "rope upload");
        cu_state_destroy(s);
        return rc;
    }
    /* one-token steps: the MoE router's dot products made by the merge +
     * o_proj launch, the norm, routing and grouping in one launch after it
     * (one launch a layer fewer). Off unless LIGHTMOE_CUDA_ROUTE_O=1: 3-4%
     * faster a step at batch 1 on the H100 (both models, docs/PERF.md round
     * 18), but the logits take o_proj's part through (router W_o) in fp32,
     * not o_proj's sums as every other step does, which moves the gptq
     * fixture's router near-tie between batched and alone (round 14); with
     * that arithmetic in steps of 2-4 tokens as well, the near-tie falls
     * against the reference's side alone and batched (round 19). */
    s->route_o = env_is_1("LIGHTMOE_CUDA_ROUTE_O") && s->merge_o && s->qkv_fused &&
                 !s->o.comm && !s->attn_cnt && !(s->fold && s->fold_route) && !s->mega_want;
    if (s->route_o && (rc = route_o_setup(s, err))) {
        cu_state_destroy(s);
        return rc;
    }
    *ret = s;
    return 0;
}

extern "C" int cu_state_kv_init(cu_state *s, int32_t block_size, int32_t n_blocks, lm_err *err)
{
    const cu_model *m = s->m;
    if (s->kv)
        return lm_err_set(err, -EALREADY, "cuda: KV cache already allocated");
    if (block_size <= 0 || n_blocks <= 0)
        return lm_err_set(err, -EINVAL, "cuda: KV cache of %d blocks of %d tokens", n_blocks,
                          block_size);
    s->bs = block_size;
    s->n_blocks = n_blocks;
    s->kv_layer_elems = (size_t)n_blocks * block_size * m->nkv * m->head_dim;
    const size_t bytes = s->kv_layer_elems * 2 * m->n_layers * sizeof(__half);
    cudaError_t e = cudaMalloc((void **)&s->kv, bytes);
    if (e != cudaSuccess) {
        s->kv = NULL;
        return lm_err_set(err, -ENOMEM, "cuda: KV cache of %zu bytes (%d blocks of %d tokens): %s",
                          bytes, n_blocks, block_size, cudaGetErrorString(e));
    }
    /* zeroed so that a slot read before it is written holds numbers, not NaN */
    CUDA_TRY(err, cudaMemset(s->kv, 0, bytes));
    const int max_blocks = (m->max_ctx + block_size - 1) / block_size + 1;
    const int seqs = s->Tm < 1024 ? s->Tm : 1024;
    s->bt_cap = seqs * max_blocks;
    s->bt_stride_max = max_blocks;
    int rc = cu_state_dev_alloc((void **)&s->d_bt, (size_t)s->bt_cap * 4, err, "block tables");
    if (rc || (rc = cu_state_host_alloc((void **)&s->h_bt, (size_t)s->bt_cap * 4, err)))
        return rc;
    return s->mega_want ? cu_state_mega_init(s, err) : 0;
}

extern "C" int cu_state_kv_copy(cu_state *s, int32_t src, int32_t dst, lm_err *err)
{
    if (!s->kv)
        return lm_err_set(err, -EINVAL, "cuda: KV cache not allocated");
    if (src < 0 || dst < 0 || src >= s->n_blocks || dst >= s->n_blocks)
        return lm_err_set(err, -EINVAL, "cuda: KV copy %d -> %d outside %d blocks", src, dst,
                          s->n_blocks);
    const size_t blk = (size_t)s->bs * s->m->nkv * s->m->head_dim;
    for (int l = 0; l < 2 * s->m->n_layers; l++) {
        __half *base = s->kv + (size_t)l * s->kv_layer_elems;
        CUDA_TRY(err, cudaMemcpyAsync(base + dst * blk, base + src * blk, blk * sizeof(__half),
                                      cudaMemcpyDeviceToDevice, s->st));
    }
    return 0;
}

extern "C" size_t cu_state_kv_bytes_per_token(const cu_state *s)
{
    return (size_t)s->m->n_layers * 2 * s->m->nkv * s->m->head_dim * sizeof(__half);
}

extern "C" int cu_state_graph_count(const cu_state *s)
{
    return s && s->o.graphs ? s->n_graphs : 0;
}

extern "C" long cu_state_folds(const cu_state *s)
{
    return s ? s->n_folds : 0;
}

extern "C" long cu_state_routed(const cu_state *s)
{
    return s ? s->n_routed : 0;
}

extern "C" long cu_state_routed_o(const cu_state *s)
{
    return s ? s->n_route_o : 0;
}

extern "C" int cu_state_sample_cap(const cu_state *s)
{
    return s->pen_cap;
}

extern "C" size_t cu_state_free_bytes(const cu_state *s)
{
    size_t fr = 0, tot = 0;
    (void)s;
    if (cudaMemGetInfo(&fr, &tot) != cudaSuccess)
        return 0;
    return fr;
}

/* ---- products ------------------------------------------------------------ */

__global__ void k_silu_pairs(const float *__restrict__ t, int n2, int rows, __half *__restrict__ h,
                             int ldh)
{
    CU_TRACE_KERNEL();
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int half = n2 / 2;
    if (idx >= (size_t)rows * half)
        return;
    const size_t r = idx / half, j = idx % half;
    const float g = t[r * n2 + 2 * j], u = t[r * n2 + 2 * j + 1];
    h[r * ldh + j] = __float2half(cu_silu(g) * u);
}

cu_int4_weights cu_linear_int4(const cu_linear *L, int e)
{
    cu_int4_weights w;
    w.n = L->n;
    w.k = L->k;
    w.group = L->group;
    w.n_experts = L->n_experts;
    const size_t G = (size_t)L->n * (L->k / L->group);
    w.qs = L->qs + (size_t)e * L->n * (L->k / 2);
    w.scales = (const __half *)L->scales + (size_t)e * G;
    w.zeros = L->zeros + (size_t)e * G;
    return w;
}

/* out (fp32 [T][ldo], or fp16 [T][ldo] for SILU) = W a, W of expert e. */
static int gemm_f16(cu_state *s, const cu_linear *L, int e, int T, const __half *a, int lda,
                    void *out, int ldo, cu_out_mode mode, lm_err *err)
{
    if (T <= 0)
        return 0;
    const float one = 1.f, zero = 0.f;
    const __half *W = (const __half *)L->w16 + (size_t)e * L->n * L->k;
    float *dst = mode == CU_OUT_SILU_F16 ? s->tmp : (float *)out;
    const int ldd = mode == CU_OUT_SILU_F16 ? L->n : ldo;
    cublasStatus_t b = cublasGemmEx(s->blas, CUBLAS_OP_T, CUBLAS_OP_N, L->n, T, L->k, &one, W,
                                    CUDA_R_16F, L->k, a, CUDA_R_16F, lda,
                                    mode == CU_OUT_F32_ACC ? &one : &zero, dst, CUDA_R_32F, ldd,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (b != CUBLAS_STATUS_SUCCESS)
        return blas_err(err, b, "16-bit product");
    if (mode == CU_OUT_SILU_F16) {
        const size_t n = (size_t)T * (L->n / 2);
        k_silu_pairs<<<(unsigned)((n + 255) / 256), 256, 0, s->st>>>(s->tmp, L->n, T, (__half *)out, ldo);
        CUDA_LAUNCH_CHECK(err, "silu launch");
    }
    return 0;
}

/* The product kernels' path: path 3 (dequantise + cuBLAS for dense
 * layers) leaves the grouped expert products to the automatic choice. */
static cu_gemm_path kpath(const cu_state *s)
{
    return s->o.path == 3 ? CU_GEMM_AUTO : (cu_gemm_path)s->o.path;
}

/* Dense INT4 layer through fp16 cuBLAS: from CU_DEQUANT_ROWS rows on the
 * automatic path (measured on the H100: qkv 5120x2048 at 2048 rows 123.9
 * us vs 263.6 us for the mma kernel, docs/PERF.md), at every size on
 * path 3; path 2 (mma) never. */
static int use_dequant(const cu_state *s, const cu_linear *L, int T, cu_out_mode mode)
{
    if (!s->wdq || (size_t)L->n * L->k > s->wdq_elems || (mode == CU_OUT_SILU_F16 && !s->dq_tmp))
        return 0;
    return s->o.path == 3 || (s->o.path == 0 && T >= CU_DEQUANT_ROWS);
}

static int linear_dequant(cu_state *s, const cu_linear *L, int T, const __half *a, int lda,
                          void *out, int ldo, cu_out_mode mode, lm_err *err)
{
    cu_int4_weights w = cu_linear_int4(L, 0);
    int rc = cu_int4_dequant(&w, s->wdq, s->st, err);
    if (rc)
        return rc;
    const float one = 1.f, zero = 0.f;
    if (mode != CU_OUT_SILU_F16) {
        cublasStatus_t b = cublasGemmEx(s->blas, CUBLAS_OP_T, CUBLAS_OP_N, L->n, T, L->k, &one,
                                        s->wdq, CUDA_R_16F, L->k, a, CUDA_R_16F, lda,
                                        mode == CU_OUT_F32_ACC ? &one : &zero, out, CUDA_R_32F,
                                        ldo, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        return blas_err(err, b, "dequantised product");
    }
    for (int r0 = 0; r0 < T; r0 += s->silu_rows) {
        const int rows = T - r0 < s->silu_rows ? T - r0 : s->silu_rows;
        cublasStatus_t b = cublasGemmEx(s->blas, CUBLAS_OP_T, CUBLAS_OP_N, L->n, rows, L->k, &one,
                                        s->wdq, CUDA_R_16F, L->k, a + (size_t)r0 * lda, CUDA_R_16F,
                                        lda, &zero, s->dq_tmp, CUDA_R_32F, L->n,
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (b != CUBLAS_STATUS_SUCCESS)
            return blas_err(err, b, "dequantised product");
        const size_t n = (size_t)rows * (L->n / 2);
        k_silu_pairs<<<(unsigned)((n + 255) / 256), 256, 0, s->st>>>(
            s->dq_tmp, L->n, rows, (__half *)out + (size_t)r0 * ldo, ldo);
        CUDA_LAUNCH_CHECK(err, "silu launch");
    }
    return 0;
}

/* A dense (one-expert) layer over T rows of a; r_in, if not NULL, gives
 * the row description's extra fields (row_scale, x_f32, ...). */
static int linear_rows(cu_state *s, const cu_linear *L, int T, const __half *a, int lda,
                       void *out, int ldo, cu_out_mode mode, const cu_gemm_rows *r_in,
                       lm_err *err);
static int linear(cu_state *s, const cu_linear *L, int T, const __half *a, int lda, void *out,
                  int ldo, cu_out_mode mode, lm_err *err)
{
    return linear_rows(s, L, T, a, lda, out, ldo, mode, NULL, err);
}

/* LIGHTMOE_CUDA_SKIP (measurement): leave launch `c` out of this step */
static int skipped(const cu_state *s, int T, char c)
{
    return T == 1 && s->skip[0] && strchr(s->skip, c);
}

/* The one-token folds (s->fold): only where the product is sure to take
 * the one-token INT4 gemv (the atomic output and the normalising input
 * exist there only). */
static int fold_gemv(const cu_state *s, const cu_linear *L, int T, cu_out_mode mode)
{
    return L->kind == CU_W_INT4 && T == 1 && kpath(s) != CU_GEMM_MMA && !use_dequant(s, L, T, mode);
}
/* qkv computes rmsnorm(x) * attn_norm itself */
static int fold_qkv(const cu_state *s, const cu_layer *L, int T)
{
    const int H = s->m->hidden;
    return s->fold && !s->tp && L->attn_norm && !((uintptr_t)L->attn_norm & 15) && !L->qkv.perm &&
           H % 32 == 0 && H >= 256 && H <= 8192 && fold_gemv(s, &L->qkv, T, CU_OUT_F32);
}
/* the attention's merge launch multiplies by o_proj and adds into x */
static int fold_merge_o(const cu_state *s, const cu_layer *L, int T)
{
    return s->merge_o && !s->tp && T == 1 && s->qkv_fused && s->step_decode && !s->attn_cnt &&
           L->o.kind == CU_W_INT4 && !L->o.perm;
}
/* the experts' down products add into x; no combine */
static int fold_moe(const cu_state *s, const cu_layer *L, int T)
{
    return s->fold && !s->tp && L->moe && L->gate_up.kind == CU_W_INT4 &&
           fold_gemv(s, &L->down, T, CU_OUT_F32_ADD) &&
           (L->sh_gate_up.kind == CU_W_NONE || fold_gemv(s, &L->sh_down, T, CU_OUT_F32_ADD));
}
/* with fold_moe, no routing launch: entry j of the experts' products is the
 * token's j-th choice, each block routing the token itself (not with
 * act-order experts, whose gather needs the plan, nor while the benchmark
 * counts experts from it) */
static int fold_route(const cu_state *s, const cu_layer *L, int T)
{
    const cu_model *m = s->m;
    return s->fold_route && fold_moe(s, L, T) && !L->gate_up.perm && !L->down.perm &&
           !s->d_active && m->top_k <= 32 && m->n_experts <= 1024;
}

static int linear_rows(cu_state *s, const cu_linear *L, int T, const __half *a, int lda,
                       void *out, int ldo, cu_out_mode mode, const cu_gemm_rows *r_in,
                       lm_err *err)
{
    if (r_in && (L->kind != CU_W_INT4 || mode == CU_OUT_SILU_F16 || (r_in->x_f32 && L->perm)))
        return lm_err_set(err, -EINVAL, "cuda: a folded product needs INT4 weights%s",
                          r_in->x_f32 && L->perm ? " in order" : "");
    if (L->kind == CU_W_F16)
        return gemm_f16(s, L, 0, T, a, lda, out, ldo, mode, err);
    if (L->kind != CU_W_INT4)
        return lm_err_set(err, -EINVAL, "cuda: linear layer has no weights");
    if (L->perm) {
        int rc = cu_gather_rows(a, lda, NULL, T, L->k, L->perm, NULL, s->xg, s->st, err);
        if (rc)
            return rc;
        a = s->xg;
        lda = L->k;
    }
    if (use_dequant(s, L, T, mode))
        return linear_dequant(s, L, T, a, lda, out, ldo, mode, err);
    cu_int4_weights w = cu_linear_int4(L, 0);
    cu_gemm_rows r;
    if (r_in)
        r = *r_in;
    else
        memset(&r, 0, sizeof(r));
    r.n_rows = T;
    return cu_int4_matmul(&w, &r, a, lda, out, ldo, mode, kpath(s), s->st, err);
}

/* ---- one MoE block -------------------------------------------------------- */

__global__ void k_count_active(const int32_t *off, int E, int32_t *counter)
{
    CU_TRACE_KERNEL();
    int c = 0;
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        c += off[e + 1] > off[e];
    atomicAdd(counter, c);
}

extern "C" int cu_state_count_experts(cu_state *s, int on, lm_err *err)
{
    if (!on != !s->d_active) { /* the captured steps have (or lack) the counting launch */
        for (int i = 0; i < s->n_graphs; i++)
            cudaGraphExecDestroy(s->graphs[i].exec);
        s->n_graphs = 0;
    }
    if (on && !s->d_active) {
        CUDA_TRY(err, cudaMalloc((void **)&s->d_active, 4));
        CUDA_TRY(err, cudaMemset(s->d_active, 0, 4));
    }
    if (!on && s->d_active) {
        cudaFree(s->d_active);
        s->d_active = NULL;
    }
    return 0;
}

extern "C" long cu_state_read_experts(cu_state *s)
{
    int32_t v = 0;
    if (!s->d_active)
        return 0;
    cudaStreamSynchronize(s->st);
    cudaMemcpy(&v, s->d_active, 4, cudaMemcpyDeviceToHost);
    cudaMemset(s->d_active, 0, 4);
    return v;
}

static void prof_mark(cu_state *s, int cat);

/* Few tokens: the MLP input norm is fused into the router kernel (one
 * launch less per layer); the same test decides in launch_layers and
 * moe_block. Not with tensor parallelism: ranks other than 0 zero x
 * between the norm and the MoE block (tp_zero). */
static int router_fused(const cu_state *s, const cu_layer *L, int T)
{
    return !s->tp && L->moe && T <= 16 && s->m->hidden % 4 == 0 &&
           !(((uintptr_t)L->mlp_norm | (uintptr_t)L->router) & 15);
}

/* The router through o_proj for layer L (cu_route_o): what the kernels take */
static int route_o_layer(const cu_state *s, const cu_layer *L)
{
    const cu_model *m = s->m;
    const int H = m->hidden, er = m->n_experts + (m->has_shared ? 1 : 0);
    return L->moe && L->o.kind == CU_W_INT4 && !L->o.perm && L->mlp_norm && L->router &&
           L->gate_up.kind == CU_W_INT4 && router_fused(s, L, 1) && L->o.n == H &&
           L->o.k == m->nq * m->head_dim && H % m->nq == 0 && (H / m->nq) % 4 == 0 &&
           H / m->nq <= 128 && er <= CU_ROUTE_O_ROWS_PER_SLICE * ((H + 127) / 128) &&
           m->n_experts <= 1024 && m->top_k >= 1 && m->top_k <= 32 &&
           m->top_k <= m->n_experts && H % 4 == 0 && H <= 8192;
}

/* (W_router * mlp_norm) W_o for every layer that takes it (fp32, made once:
 * W_o dequantised to fp16 through one scratch), the sums' buffers zeroed */
static int route_o_setup(cu_state *s, lm_err *err)
{
    const cu_model *m = s->m;
    const int H = m->hidden, K = m->nq * m->head_dim;
    const int er = m->n_experts + (m->has_shared ? 1 : 0);
    int any = 0, rc = 0;
    for (int l = 0; l < m->n_layers; l++)
        any |= route_o_layer(s, &m->layers[l]);
    if (!any) {
        s->route_o = 0;
        return 0;
    }
    s->route_nc = 4;
    if ((rc = cu_state_dev_alloc((void **)&s->o_acc, (size_t)H * 4, err, "o_proj sums")) ||
        (rc = cu_state_dev_alloc((void **)&s->u_acc, (size_t)s->route_nc * er * 4, err,
                                 "router sums")))
        return rc;
    s->route_m = (float **)calloc((size_t)m->n_layers, sizeof(float *));
    if (!s->route_m)
        return lm_err_set(err, -ENOMEM, "cuda: out of host memory");
    __half *tmp = NULL;
    if ((rc = cu_state_dev_alloc((void **)&tmp, (size_t)H * K * 2, err, "dequantised o_proj")))
        return rc;
    for (int l = 0; l < m->n_layers && !rc; l++) {
        const cu_layer *L = &m->layers[l];
        if (!route_o_layer(s, L))
            continue;
        cu_int4_weights wo = cu_linear_int4(&L->o, 0);
        if (!(rc = cu_state_dev_alloc((void **)&s->route_m[l], (size_t)er * K * 4, err,
                               "router through o_proj")))
            rc = cu_route_o_matrix(&wo, L->router, L->mlp_norm, er, s->route_m[l], tmp, s->st,
                                   err);
        if (rc)
            rc = lm_err_prefix(err, "layer %d", l);
    }
    cudaError_t ce = cudaSuccess;
    if (!rc)
        ce = cudaMemsetAsync(s->o_acc, 0, (size_t)H * 4, s->st);
    if (!rc && ce == cudaSuccess)
        ce = cudaMemsetAsync(s->u_acc, 0, (size_t)s->route_nc * er * 4, s->st);
    if (ce == cudaSuccess)
        ce = cudaStreamSynchronize(s->st);
    cudaFree(tmp);
    if (!rc && ce != cudaSuccess)
        rc = cuda_err(err, ce, "router through o_proj");
    return rc;
}

/* this one-token step's layer l takes the router through o_proj */
static int route_o(const cu_state *s, int l, const cu_layer *L, int T)
{
    return s->route_o && s->route_m && s->route_m[l] && T == 1 && fold_merge_o(s, L, T) &&
           !fold_route(s, L, T) && !s->skip[0];
}

/* The MoE block; ro: the merge + o_proj launch made the router's sums
 * (route_o): no router launch, cu_moe_norm_route instead of route+group.
 * If next_norm, the combine also writes rmsnorm(x) * next_norm
 * into s->xn (the next layer's attention input). */
static int moe_block(cu_state *s, const cu_layer *L, int T, const float *next_norm, int ro,
                     lm_err *err)
{
    const cu_model *m = s->m;
    const int H = m->hidden, E = m->n_experts, k = m->top_k, n = T * k;
    const int I = L->down.k;
    const int er = E + (m->has_shared ? 1 : 0);
    const float one = 1.f, zero = 0.f;
    int rc;
    if (skipped(s, T, 'r') || ro) { /* ro: the merge + o_proj launch made the dot products */
    } else if (router_fused(s, L, T)) {
        if ((rc = cu_router_norm(s->x, T, H, L->mlp_norm, m->eps, L->router, er, s->rlog, s->xn,
                                 s->st, err)))
            return rc;
    } else {
        cublasStatus_t b = cublasSgemm(s->blas, CUBLAS_OP_T, CUBLAS_OP_N, er, T, H, &one,
                                       L->router, H, s->xnf, H, &zero, s->rlog, er);
        if (b != CUBLAS_STATUS_SUCCESS)
            return blas_err(err, b, "router product");
    }
    prof_mark(s, P_ROUTER);
    const int avg = (n + E - 1) / E;
    int tile = cu_int4_tile_for(T, avg, kpath(s));
    const int routed = fold_route(s, L, T);
    if (routed) { /* the experts' products route the token themselves */
        s->n_routed++;
    } else if (skipped(s, T, 'g')) {
    } else if (ro) { /* x += o, the norm, the logits, routing and grouping */
        s->n_route_o++;
        if ((rc = cu_moe_norm_route(s->x, s->o_acc, H, L->mlp_norm, m->eps, s->u_acc,
                                    s->route_nc, er, s->rlog, s->xn, E, k, m->renorm,
                                    m->has_shared, tile, s->topk_ids, s->topk_w, s->sg, &s->plan,
                                    s->st, err)))
            return rc;
    } else if (T <= 64) { /* one launch: routing and grouping in a single block */
        if ((rc = cu_moe_route_group(s->rlog, er, T, E, k, m->renorm, m->has_shared, tile,
                                     s->topk_ids, s->topk_w, s->sg, &s->plan, s->st, err)))
            return rc;
    } else {
        if ((rc = cu_moe_route(s->rlog, er, T, E, k, m->renorm, m->has_shared, s->topk_ids,
                               s->topk_w, s->sg, s->st, err)))
            return rc;
        if ((rc = cu_moe_group(s->topk_ids, s->topk_w, T, k, E, tile, &s->plan, s->st, err)))
            return rc;
    }
    if (s->d_active) {
        k_count_active<<<1, 128, 0, s->st>>>(s->plan.offsets, E, s->d_active);
        CUDA_LAUNCH_CHECK(err, "expert count launch");
    }
    prof_mark(s, P_GROUP);

    const int fold = fold_moe(s, L, T);
    if (L->gate_up.kind == CU_W_INT4) {
        cu_gemm_rows r;
        memset(&r, 0, sizeof(r));
        const __half *a = s->xn;
        int lda = H;
        if (!routed) { /* the work list of route+group */
            r.n_rows = n;
            r.offsets = s->plan.offsets;
            r.items = s->plan.items;
            r.n_items = s->plan.n_items;
            r.max_items = cu_moe_max_items(n, E, tile);
            r.tile = tile;
            r.a_rows = s->plan.ent_token;
        } else { /* entry j = the token's j-th choice; every entry reads row 0 */
            r.n_rows = k;
            r.route = s->rlog;
            r.route_e = E;
            r.route_k = k;
            r.route_renorm = m->renorm;
            r.route_shared = m->has_shared;
            r.route_sg = s->sg;
            lda = 0;
        }
        if (L->gate_up.perm) {
            if ((rc = cu_gather_rows(s->xn, H, s->plan.ent_token, n, H, L->gate_up.perm,
                                     s->plan.ent_expert, s->xg, s->st, err)))
                return rc;
            a = s->xg;
            r.a_rows = NULL;
        }
        cu_int4_weights w = cu_linear_int4(&L->gate_up, 0);
        if (s->down_pf && L->down.kind == CU_W_INT4)
            r.pf = cu_linear_int4(&L->down, 0);
        if (!skipped(s, T, 'u') &&
            (rc = cu_int4_matmul(&w, &r, a, lda, s->h, I, CU_OUT_SILU_F16, kpath(s), s->st, err)))
            return rc;
        memset(&r.pf, 0, sizeof(r.pf));
        const __half *hin = s->h;
        r.a_rows = NULL;
        if (L->down.perm) {
            if ((rc = cu_gather_rows(s->h, I, NULL, n, I, L->down.perm, s->plan.ent_expert, s->hg,
                                     s->st, err)))
                return rc;
            hin = s->hg;
        }
        prof_mark(s, P_GATEUP);
        /* the plan is two launches back (route+group, gate_up): the one-token
         * down product loads its experts' weights before waiting */
        r.plan_ready = cu_early_loads();
        w = cu_linear_int4(&L->down, 0);
        if (routed) { /* the logits are two launches back too: route before the wait;
                       * every entry adds weight * down(h) into x's one row (ldo 0) */
            r.route_sg = NULL;
            r.route_scale = 1;
            r.route_ready = cu_early_loads();
            s->n_folds++;
        } else if (fold) { /* x[token] += weight * down(h), atomically */
            r.out_rows = s->plan.ent_token;
            r.row_scale = s->plan.ent_weight;
            s->n_folds++;
        }
        if (!skipped(s, T, 'd') &&
            (rc = cu_int4_matmul(&w, &r, hin, I, fold ? s->x : s->y, routed ? 0 : H,
                                 fold ? CU_OUT_F32_ADD : CU_OUT_F32, kpath(s), s->st, err)))
            return rc;
        prof_mark(s, P_DOWN);
    } else {
        /* 16-bit experts: per-expert cuBLAS calls need the counts on the host. */
        CUDA_TRY(err, cudaMemcpyAsync(s->h_off, s->plan.offsets, (E + 1) * sizeof(int32_t),
                                      cudaMemcpyDeviceToHost, s->st));
        CUDA_TRY(err, cudaStreamSynchronize(s->st));
        if ((rc = cu_gather_rows(s->xn, H, s->plan.ent_token, n, H, NULL, NULL, s->xg, s->st, err)))
            return rc;
        for (int e = 0; e < E; e++) {
            const int o0 = s->h_off[e], c = s->h_off[e + 1] - o0;
            if (c <= 0)
                continue;
            if ((rc = gemm_f16(s, &L->gate_up, e, c, s->xg + (size_t)o0 * H, H, s->h + (size_t)o0 * I,
                               I, CU_OUT_SILU_F16, err)))
                return rc;
            if ((rc = gemm_f16(s, &L->down, e, c, s->h + (size_t)o0 * I, I, s->y + (size_t)o0 * H,
                               H, CU_OUT_F32, err)))
                return rc;
        }
    }
    if (L->sh_gate_up.kind != CU_W_NONE) {
        const int sI = L->sh_down.k;
        if ((rc = linear(s, &L->sh_gate_up, T, s->xn, H, s->hs, sI, CU_OUT_SILU_F16, err)))
            return rc;
        if (fold) { /* x += sigmoid gate * shared(h), atomically */
            cu_gemm_rows r;
            memset(&r, 0, sizeof(r));
            r.row_scale = s->sg;
            s->n_folds++;
            rc = linear_rows(s, &L->sh_down, T, s->hs, sI, s->x, H, CU_OUT_F32_ADD, &r, err);
        } else {
            rc = linear(s, &L->sh_down, T, s->hs, sI, s->ys, H, CU_OUT_F32, err);
        }
        if (rc)
            return rc;
        prof_mark(s, P_SHARED);
    }
    if (fold || skipped(s, T, 'c'))
        return 0;
    rc = cu_moe_combine_norm(s->x, H, T, k, s->y, s->plan.pos, s->plan.ent_weight,
                             L->sh_gate_up.kind != CU_W_NONE ? s->ys : NULL, s->sg, next_norm,
                             m->eps, s->xn, s->st, err);
    prof_mark(s, P_COMBINE);
    return rc;
}

/* ---- the step -------------------------------------------------------------- */

static int upload_batch(cu_state *s, const backend_batch *bt, cu_attn_batch *ab, int *ret_decode,
                        lm_err *err)
{
    const cu_model *m = s->m;
    const int T = bt->n_tokens;
    if (!s->kv)
        return lm_err_set(err, -EINVAL, "cuda: forward before kv_init");
    if (T <= 0 || T > s->Tm)
        return lm_err_set(err, -EINVAL, "cuda: batch of %d tokens (max %d)", T, s->Tm);
    if (bt->n_seqs <= 0 || bt->n_seqs > T || bt->seq_start[0] != 0 ||
        bt->seq_start[bt->n_seqs] != T)
        return lm_err_set(err, -EINVAL, "cuda: batch of %d pieces does not cover %d tokens",
                          bt->n_seqs, T);
    if (bt->n_seqs > s->bt_cap / s->bt_stride_max)
        return lm_err_set(err, -EINVAL, "cuda: %d sequences in one step (max %d)", bt->n_seqs,
                          s->bt_cap / s->bt_stride_max);
    if (bt->n_logits < 0 || bt->n_logits > T || bt->n_logits > s->o.max_logits)
        return lm_err_set(err, -EINVAL, "cuda: %d logit rows for %d tokens (max %d)",
                          bt->n_logits, T, s->o.max_logits);
    const int G = m->nq / m->nkv;
    int decode = 1;
    for (int q = 0; q < bt->n_seqs; q++)
        if (bt->seq_start[q + 1] - bt->seq_start[q] != 1)
            decode = 0;
    const int bq = decode ? 1 : (64 / G > 0 ? 64 / G : 1);
    int n_tiles = 0, max_ctx = 1;
    for (int q = 0; q < bt->n_seqs; q++) {
        const int a = bt->seq_start[q], b = bt->seq_start[q + 1];
        if (b <= a)
            return lm_err_set(err, -EINVAL, "cuda: piece %d is empty", q);
        const int p0 = bt->start_pos[q], end = p0 + (b - a);
        if (p0 < 0 || end > m->max_ctx)
            return lm_err_set(err, -EINVAL, "cuda: piece %d positions [%d, %d) outside context %d",
                              q, p0, end, m->max_ctx);
        if ((end + s->bs - 1) / s->bs > bt->max_blocks)
            return lm_err_set(err, -EINVAL, "cuda: piece %d needs %d blocks, table has %d", q,
                              (end + s->bs - 1) / s->bs, bt->max_blocks);
        for (int j = 0; j < (end + s->bs - 1) / s->bs; j++) {
            const int blk = bt->block_table[(size_t)q * bt->max_blocks + j];
            if (blk < 0 || blk >= s->n_blocks)
                return lm_err_set(err, -EINVAL, "cuda: piece %d block %d = %d outside %d blocks", q,
                                  j, blk, s->n_blocks);
        }
        if (end > max_ctx)
            max_ctx = end;
        for (int t = a; t < b; t++) {
            if (bt->tokens[t] < 0 || bt->tokens[t] >= m->vocab)
                return lm_err_set(err, -EINVAL, "cuda: token %d = %d outside vocabulary %d", t,
                                  bt->tokens[t], m->vocab);
            s->h_seq[t] = q;
            s->h_pos[t] = p0 + (t - a);
            s->h_tok[t] = bt->tokens[t];
        }
        for (int t = a; t < b; t += bq)
            s->h_tiles[n_tiles++] = make_int2(t, (b - t) < bq ? (b - t) : bq);
    }
    for (int i = 0; i < bt->n_logits; i++) {
        if (bt->logit_rows[i] < 0 || bt->logit_rows[i] >= T)
            return lm_err_set(err, -EINVAL, "cuda: logit row %d = %d outside %d tokens", i,
                              bt->logit_rows[i], T);
        s->h_rows[i] = bt->logit_rows[i];
    }
    /* block table rows at a stride that depends only on the longest piece
     * (a power of two), so that decode graphs can be reused across steps */
    int need = (max_ctx + s->bs - 1) / s->bs, stride = 16;
    while (stride < need)
        stride *= 2;
    if (stride > s->bt_stride_max)
        stride = s->bt_stride_max;
    s->bt_stride = stride;
    for (int q = 0; q < bt->n_seqs; q++) {
        const int nbq = (bt->start_pos[q] + bt->seq_start[q + 1] - bt->seq_start[q] + s->bs - 1) / s->bs;
        memcpy(s->h_bt + (size_t)q * stride, bt->block_table + (size_t)q * bt->max_blocks,
               (size_t)nbq * 4);
    }
    const size_t btn = (size_t)bt->n_seqs * stride;
    CUDA_TRY(err, cudaMemcpyAsync(s->d_tok, s->h_tok, T * 4, cudaMemcpyHostToDevice, s->st));
    CUDA_TRY(err, cudaMemcpyAsync(s->d_seq, s->h_seq, T * 4, cudaMemcpyHostToDevice, s->st));
    CUDA_TRY(err, cudaMemcpyAsync(s->d_pos, s->h_pos, T * 4, cudaMemcpyHostToDevice, s->st));
    CUDA_TRY(err, cudaMemcpyAsync(s->d_tiles, s->h_tiles, n_tiles * 8, cudaMemcpyHostToDevice, s->st));
    CUDA_TRY(err, cudaMemcpyAsync(s->d_bt, s->h_bt, btn * 4, cudaMemcpyHostToDevice, s->st));
    if (bt->n_logits > 0)
        CUDA_TRY(err, cudaMemcpyAsync(s->d_rows, s->h_rows, bt->n_logits * 4,
                                      cudaMemcpyHostToDevice, s->st));
    /* flash-decoding split: enough blocks for two waves, 64+ positions each
     * at prefill; at decode also at most attn_steps 32-position steps per
     * split (long contexts: the steps of one block are a chain of loads) */
    int nsplit = 1;
    const int blocks = n_tiles * m->nkv;
    const int max_split = s->attn_cnt ? CU_ATTN_MAX_SPLIT_OWN : s->attn_max_split;
    if (blocks < 2 * s->sms) {
        nsplit = (2 * s->sms + blocks - 1) / blocks;
        /* prefill: no split shorter than 64 positions; decode: a function of the
         * token count and table stride alone (graphs; the stride bounds the
         * context), splits past the context are empty */
        /* (32 positions a split at decode: one step of the kernel per block, the
         * latency of the chain of 32-position steps was most of its time) */
        const int by_len = decode ? (stride * s->bs + 31) / 32 : (max_ctx + 63) / 64;
        if (decode && nsplit < (by_len + s->attn_steps - 1) / s->attn_steps)
            nsplit = (by_len + s->attn_steps - 1) / s->attn_steps;
        if (nsplit > by_len)
            nsplit = by_len;
        if (nsplit > max_split)
            nsplit = max_split;
    }
    if (nsplit > s->split_budget / T)
        nsplit = s->split_budget / T;
    if (nsplit < 1)
        nsplit = 1;
    ab->T = T;
    ab->tok_seq = s->d_seq;
    ab->tok_pos = s->d_pos;
    ab->block_table = s->d_bt;
    ab->max_blocks = stride;
    ab->block_size = s->bs;
    ab->tiles = s->d_tiles;
    ab->n_tiles = n_tiles;
    ab->bq = bq;
    ab->nsplit = nsplit;
    ab->counters = s->attn_cnt;
    ab->early = cu_early_loads();
    *ret_decode = decode;
    return 0;
}

/* ---- profiling ---------------------------------------------------------------- */

static void prof_mark(cu_state *s, int cat)
{
    if (!s->prof_on || s->prof_n >= PROF_MAX)
        return;
    cudaEventRecord(s->prof_ev[2 * s->prof_n + 1], s->st);
    s->prof_cat[s->prof_n] = cat;
    s->prof_n++;
    if (s->prof_n < PROF_MAX)
        cudaEventRecord(s->prof_ev[2 * s->prof_n], s->st);
}

extern "C" int cu_state_profile(cu_state *s, int on, lm_err *err)
{
    if (on && !s->prof_ev) {
        s->prof_ev = (cudaEvent_t *)calloc(2 * PROF_MAX, sizeof(cudaEvent_t));
        s->prof_cat = (int *)calloc(PROF_MAX, sizeof(int));
        if (!s->prof_ev || !s->prof_cat)
            return lm_err_set(err, -ENOMEM, "cuda: out of host memory");
        for (int i = 0; i < 2 * PROF_MAX; i++)
            CUDA_TRY(err, cudaEventCreate(&s->prof_ev[i]));
    }
    s->prof_on = on;
    memset(s->prof_ms, 0, sizeof(s->prof_ms));
    return 0;
}

static void prof_collect(cu_state *s)
{
    if (!s->prof_on)
        return;
    cudaStreamSynchronize(s->st);
    for (int i = 0; i < s->prof_n; i++) {
        float ms = 0;
        if (cudaEventElapsedTime(&ms, s->prof_ev[2 * i], s->prof_ev[2 * i + 1]) == cudaSuccess)
            s->prof_ms[s->prof_cat[i]] += ms;
    }
    s->prof_n = 0;
}

extern "C" int cu_state_profile_report(cu_state *s, char *buf, size_t size)
{
    size_t at = 0;
    double tot = 0;
    for (int c = 0; c < P_NCAT; c++)
        tot += s->prof_ms[c];
    for (int c = 0; c < P_NCAT && at < size; c++)
        if (s->prof_ms[c] > 0)
            at += snprintf(buf + at, size - at, "%s%s %.3f ms (%.0f%%)", at ? ", " : "",
                           prof_names[c], s->prof_ms[c], 100 * s->prof_ms[c] / (tot > 0 ? tot : 1));
    memset(s->prof_ms, 0, sizeof(s->prof_ms));
    return 0;
}

/* ---- the step ------------------------------------------------------------------- */

/* Tensor parallelism: a row-parallel product adds this rank's partial sum
 * into the residual stream x; rank 0 keeps x, the others clear it first,
 * so that the all-reduce of x gives x + the sum of every rank's part. */
static int tp_zero(cu_state *s, int T, lm_err *err)
{
    if (s->tp && cu_tp_rank(s->tp) != 0)
        CUDA_TRY(err, cudaMemsetAsync(s->x, 0, (size_t)T * s->m->hidden * sizeof(float), s->st));
    return 0;
}
static int tp_sum(cu_state *s, int T, lm_err *err)
{
    if (!s->tp)
        return 0;
    int rc = cu_tp_all_reduce(s->tp, s->x, (size_t)T * s->m->hidden, s->st, err);
    prof_mark(s, P_COMM);
    return rc;
}

/* The final norm and the logits of the rows asked for. */
static int launch_head(cu_state *s, int n_logits, lm_err *err)
{
    const cu_model *m = s->m;
    int rc;
    if (n_logits > 0) {
        if ((rc = cu_rmsnorm(s->x, m->hidden, s->d_rows, n_logits, m->final_norm, m->eps, s->fn,
                             NULL, s->st, err)))
            return rc;
        if ((rc = linear(s, &m->lm_head, n_logits, s->fn, m->hidden, s->logits,
                         s->tp ? s->o.vocab_stride : m->vocab, CU_OUT_F32, err)))
            return rc;
        prof_mark(s, P_HEAD);
    }
    return 0;
}

/* Every launch of one step; depends on the batch only through ab (fixed
 * device buffers) and T / n_logits, so it can be captured in a graph. */
static int launch_layers(cu_state *s, const cu_attn_batch *ab, int T, int n_logits, lm_err *err)
{
    const cu_model *m = s->m;
    int rc;
    const int H = m->hidden;
    const cu_attn_shape shape = {m->nq, m->nkv, m->head_dim};
    const int nqkv = (m->nq + 2 * m->nkv) * m->head_dim, nqd = m->nq * m->head_dim;
    /* programmatic dependent launch (Hopper-only): for few-token steps */
    cu_pdl_allow(!s->o.portable && T <= cu_pdl_max_tokens());
    if (s->prof_on && s->prof_n < PROF_MAX)
        cudaEventRecord(s->prof_ev[2 * s->prof_n], s->st);
    if (s->mega_step) { /* embedding and every layer in one kernel */
        s->mega.active = s->d_active;
        if ((rc = cu_mega_launch(&s->mega, s->mega_grid, s->mega_smem, s->st, err)))
            return rc;
        return launch_head(s, n_logits, err);
    }
    if (s->tp) { /* vocabulary-split table: own rows, zeros elsewhere, then sum */
        if ((rc = cu_tp_embed((const __half *)m->embed, H, s->o.vocab_begin, m->lm_head.n,
                              s->d_tok, T, s->x, s->st, err)) ||
            (rc = tp_sum(s, T, err)))
            return rc;
    } else if ((rc = cu_embed((const __half *)m->embed, H, s->d_tok, T, s->x, s->st, err))) {
        return rc;
    }
    int normed = 0; /* s->xn already holds this layer's attention input */
    for (int l = 0; l < m->n_layers; l++) {
        const cu_layer *L = &m->layers[l];
        __half *kc = s->kv + (size_t)(2 * l) * s->kv_layer_elems;
        __half *vc = s->kv + (size_t)(2 * l + 1) * s->kv_layer_elems;
        if (skipped(s, T, 'q')) {
        } else if (!normed && fold_qkv(s, L, T)) { /* the product normalises x itself */
            cu_gemm_rows r;
            memset(&r, 0, sizeof(r));
            r.x_f32 = s->x;
            r.x_norm = L->attn_norm;
            r.x_eps = m->eps;
            s->n_folds++;
            if ((rc = linear_rows(s, &L->qkv, T, s->xn, H, s->qkv, nqkv, CU_OUT_F32, &r, err)))
                return rc;
        } else {
            if (!normed &&
                (rc = cu_rmsnorm(s->x, H, NULL, T, L->attn_norm, m->eps, s->xn, NULL, s->st, err)))
                return rc;
            prof_mark(s, P_NORM);
            if ((rc = linear(s, &L->qkv, T, s->xn, H, s->qkv, nqkv, CU_OUT_F32, err)))
                return rc;
        }
        prof_mark(s, P_QKV);
        cu_qkv_params qp = {L->qkv_bias, L->q_norm, L->k_norm, m->eps, s->inv_freq};
        const int merge_o = fold_merge_o(s, L, T), ro = route_o(s, l, L, T);
        if (skipped(s, T, 'a')) {
        } else if (ro) { /* o = o_proj(attention) and the router's sums (cu_route_o) */
            cu_int4_weights wo = cu_linear_int4(&L->o, 0);
            const cu_route_o r = {s->route_m[l], L->router, L->mlp_norm, s->x, s->u_acc,
                                  m->n_experts + (m->has_shared ? 1 : 0), s->route_nc,
                                  cu_early_loads()};
            s->n_folds++;
            if ((rc = cu_attn_qkv_o_route(&shape, s->qkv, &qp, kc, vc, ab, s->part, &wo,
                                          s->o_acc, &r, s->st, err)))
                return rc;
        } else if (merge_o) { /* x += o_proj(attention), the merge launch doing the product */
            cu_int4_weights wo = cu_linear_int4(&L->o, 0);
            s->n_folds++;
            if ((rc = cu_attn_qkv_o(&shape, s->qkv, &qp, kc, vc, ab, s->part,
                                    skipped(s, T, 'm') ? NULL : &wo, s->x, H, s->st, err)))
                return rc;
        } else if (s->qkv_fused && s->step_decode) {
            if ((rc = cu_attn_qkv(&shape, s->qkv, &qp, kc, vc, ab, s->part, s->att, s->st, err)))
                return rc;
        } else {
            if ((rc = cu_qkv_post(&shape, s->qkv, &qp, ab, kc, vc, s->q, s->st, err)))
                return rc;
            prof_mark(s, P_ROPE);
            if ((rc = cu_attn(&shape, s->q, kc, vc, ab, s->part, s->att, s->st, err)))
                return rc;
        }
        prof_mark(s, P_ATTN);
        if ((rc = tp_zero(s, T, err)) ||
            (!skipped(s, T, 'o') && !merge_o &&
             (rc = linear(s, &L->o, T, s->att, nqd, s->x, H, CU_OUT_F32_ACC, err))))
            return rc;
        prof_mark(s, P_O);
        if ((rc = tp_sum(s, T, err)))
            return rc;
        if (!router_fused(s, L, T) &&
            (rc = cu_rmsnorm(s->x, H, NULL, T, L->mlp_norm, m->eps, s->xn, L->moe ? s->xnf : NULL,
                             s->st, err)))
            return rc;
        prof_mark(s, P_NORM);
        normed = 0;
        if ((rc = tp_zero(s, T, err)))
            return rc;
        if (L->moe) {
            /* tp: the next norm needs the summed x, so it is not fused */
            const float *next = l + 1 < m->n_layers && !s->tp ? m->layers[l + 1].attn_norm : NULL;
            if ((rc = moe_block(s, L, T, next, ro, err)))
                return lm_err_prefix(err, "layer %d", l);
            normed = next != NULL && !fold_moe(s, L, T); /* folded: no combine wrote xn */
        } else {
            const int I = L->down.k;
            if ((rc = linear(s, &L->gate_up, T, s->xn, H, s->h, I, CU_OUT_SILU_F16, err)))
                return rc;
            if ((rc = linear(s, &L->down, T, s->h, I, s->x, H, CU_OUT_F32_ACC, err)))
                return rc;
            prof_mark(s, P_DENSE);
        }
        if ((rc = tp_sum(s, T, err)))
            return rc;
    }
    return launch_head(s, n_logits, err);
}

static int forward_layers(cu_state *s, const backend_batch *bt, lm_err *err)
{
    cu_attn_batch ab;
    int decode = 0;
    int rc = upload_batch(s, bt, &ab, &decode, err);
    if (rc)
        return rc;
    const int T = bt->n_tokens, nl = bt->n_logits;
    s->step_decode = decode;
    s->mega_step = s->mega_grid > 0 && T == 1 && !s->prof_on;
    if (!(s->o.graphs && s->graph_ok && decode && !s->prof_on)) {
        rc = launch_layers(s, &ab, T, nl, err);
        prof_collect(s);
        return rc;
    }
    for (int i = 0; i < s->n_graphs; i++)
        if (s->graphs[i].T == T && s->graphs[i].n_logits == nl && s->graphs[i].stride == ab.max_blocks)
            return cuda_err(err, cudaGraphLaunch(s->graphs[i].exec, s->st), "graph launch");
    /* first step of this shape: run it, then capture it for the next ones */
    if ((rc = launch_layers(s, &ab, T, nl, err)))
        return rc;
    if (s->n_graphs == (int)(sizeof(s->graphs) / sizeof(s->graphs[0])))
        return 0;
    cudaGraph_t g = NULL;
    cudaGraphExec_t ge = NULL;
    CUDA_TRY(err, cudaStreamBeginCapture(s->st, cudaStreamCaptureModeRelaxed));
    rc = launch_layers(s, &ab, T, nl, err);
    cudaError_t e = cudaStreamEndCapture(s->st, &g);
    if (rc && !s->tp) {
        if (g)
            cudaGraphDestroy(g);
        return rc;
    }
    if (e == cudaSuccess && !rc)
        e = cudaGraphInstantiate(&ge, g, 0);
    if (g)
        cudaGraphDestroy(g);
    if ((rc || e != cudaSuccess) && s->tp) {
        /* NCCL collectives that cannot be captured (an old NCCL): nothing
         * captured ran, this step already did; later steps run without graphs */
        if (ge)
            cudaGraphExecDestroy(ge);
        cudaGetLastError();
        s->o.graphs = 0;
        return 0;
    }
    if (e != cudaSuccess)
        return cuda_err(err, e, "graph capture of a decode step");
    s->graphs[s->n_graphs].T = T;
    s->graphs[s->n_graphs].n_logits = nl;
    s->graphs[s->n_graphs].stride = ab.max_blocks;
    s->graphs[s->n_graphs].exec = ge;
    s->n_graphs++;
    return 0;
}

/* The step's logits rows picked on the device (backend.h's picks): the
 * picks and penalty entries up, the kernel, the results down (into h_pout;
 * cu_forward copies them out after its synchronisation). */
static int sample_rows(cu_state *s, const backend_batch *bt, lm_err *err)
{
    const int n = bt->n_logits;
    if (!s->pen_cap)
        return lm_err_set(err, -EINVAL, "cuda: sampling on the device is off for this state "
                                        "(LIGHTMOE_CUDA_SAMPLE is not 1, or tensor parallelism)");
    if (!bt->picks_out || bt->n_penalties < 0 || bt->n_penalties > s->pen_cap ||
        (bt->n_penalties && !bt->penalties))
        return lm_err_set(err, -EINVAL, "cuda: sampling: %d penalty entries (room for %d), "
                                        "results %s", bt->n_penalties, s->pen_cap,
                          bt->picks_out ? "given" : "missing");
    for (int i = 0; i < n; i++) {
        const backend_pick *bp = &bt->picks[i];
        if (!bp->p || bp->n_pen < 0 || bp->pen_begin < 0 ||
            (int64_t)bp->pen_begin + bp->n_pen > bt->n_penalties)
            return lm_err_set(err, -EINVAL, "cuda: sampling: row %d's penalty entries [%d, +%d) "
                                            "outside the %d given", i, bp->pen_begin, bp->n_pen,
                              bt->n_penalties);
        int rc = sample_params_check(bp->p, err);
        if (rc)
            return lm_err_prefix(err, "cuda: sampling row %d", i);
        /* ids in the vocabulary, each once (the kernel applies a row's
         * entries in parallel) */
        const sample_penalty *pen = bt->penalties + bp->pen_begin;
        const char *why = NULL;
        int id = 0, j = 0;
        for (; j < bp->n_pen && !why; j++) {
            id = pen[j].id;
            if (id < 0 || id >= s->m->vocab)
                why = "outside the vocabulary";
            else if (s->h_seen[id])
                why = "listed twice";
            else
                s->h_seen[id] = 1;
        }
        for (int q = 0; q < j; q++) /* clear what this row marked */
            if (pen[q].id >= 0 && pen[q].id < s->m->vocab)
                s->h_seen[pen[q].id] = 0;
        if (why)
            return lm_err_set(err, -EINVAL, "cuda: sampling: row %d's penalty id %d %s", i, id,
                              why);
        cu_pick_from(bp, &s->h_picks[i]);
    }
    if (bt->n_penalties > 0) {
        memcpy(s->h_pen, bt->penalties, (size_t)bt->n_penalties * sizeof(sample_penalty));
        CUDA_TRY(err, cudaMemcpyAsync(s->d_pen, s->h_pen,
                                      (size_t)bt->n_penalties * sizeof(sample_penalty),
                                      cudaMemcpyHostToDevice, s->st));
    }
    CUDA_TRY(err, cudaMemcpyAsync(s->d_picks, s->h_picks, (size_t)n * sizeof(cu_pick),
                                  cudaMemcpyHostToDevice, s->st));
    int rc = cu_sample(s->logits, s->m->vocab, s->m->vocab, n, s->d_picks, s->d_pen, s->d_se,
                       s->d_pout, s->st, err);
    if (rc)
        return rc;
    CUDA_TRY(err, cudaMemcpyAsync(s->h_pout, s->d_pout, (size_t)n * sizeof(backend_pick_out),
                                  cudaMemcpyDeviceToHost, s->st));
    return 0;
}

/* A grid barrier of the one-token kernel timed out (its blocks were not
 * all resident: another process's kernels on the card?). The step's
 * results are void; later steps take the ordinary path (graphs captured
 * with the kernel are dropped). */
extern "C" int cu_forward_device(cu_state *s, const backend_batch *bt, lm_err *err)
{
    return forward_layers(s, bt, err);
}

extern "C" int cu_forward(cu_state *s, const backend_batch *bt, lm_err *err)
{
    int rc = forward_layers(s, bt, err);
    if (rc) {
        cudaStreamSynchronize(s->st);
        return rc;
    }
    if (s->tp && bt->picks) /* not offered (cb_info): say so rather than leave picks unwritten */
        return lm_err_set(err, -EINVAL, "cuda: sampling on the device is not available with "
                                        "tensor parallelism");
    if (s->tp) /* every rank takes part; rank 0 writes the rows */
        return cu_tp_gather_logits(s->tp, s->logits, bt->n_logits, s->o.vocab_stride,
                                   s->m->vocab, bt->logits, s->st, err);
    if (bt->picks && bt->n_logits > 0) {
        if ((rc = sample_rows(s, bt, err))) {
            cudaStreamSynchronize(s->st);
            return rc;
        }
    } else if (bt->n_logits > 0) {
        CUDA_TRY(err, cudaMemcpyAsync(bt->logits, s->logits,
                                      (size_t)bt->n_logits * s->m->vocab * sizeof(float),
                                      cudaMemcpyDeviceToHost, s->st));
    }
    if (s->mega_step)
        CUDA_TRY(err, cudaMemcpyAsync(s->h_mega_fail, s->mega_fail, 4, cudaMemcpyDeviceToHost,
                                      s->st));
    CUDA_TRY(err, cudaStreamSynchronize(s->st));
    if (s->mega_step && *s->h_mega_fail)
        return cu_state_mega_failed(s, err);
    if (bt->picks && bt->n_logits > 0)
        memcpy(bt->picks_out, s->h_pout, (size_t)bt->n_logits * sizeof(backend_pick_out));
    return 0;
}
