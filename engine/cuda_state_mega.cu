/*
 * cuda_state_mega.cu: a cu_state's side of the one-token persistent kernel
 * (cuda_mega.cuh; LIGHTMOE_CUDA_MEGA=1, off by default): its layer table
 * and buffers, what it reports, and turning it off after a timeout.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cuda_common.cuh"
#include "engine/cuda_state.cuh"

/* LIGHTMOE_CUDA_MEGA_PROF=1: block 0's phase clocks (measurements) */
static int mega_prof_on(void)
{
    const char *v = getenv("LIGHTMOE_CUDA_MEGA_PROF");
    return v && v[0] == '1';
}

/* The one-token kernel's layer table (it needs the KV cache's address)
 * and its buffers. A model or card it cannot run on leaves it off, with
 * the reason in mega_why; allocation failures are errors. */
int cu_state_mega_init(cu_state *s, lm_err *err)
{
    const cu_model *m = s->m;
    const int nL = m->n_layers;
    cu_mega_layer *t = (cu_mega_layer *)calloc((size_t)nL, sizeof(*t));
    if (!t)
        return lm_err_set(err, -ENOMEM, "cuda: out of host memory");
    for (int l = 0; l < nL; l++) {
        const cu_layer *L = &m->layers[l];
        cu_mega_layer *d = &t[l];
        d->attn_norm = L->attn_norm;
        d->mlp_norm = L->mlp_norm;
        d->router = L->router;
        d->qkv_bias = L->qkv_bias;
        d->q_norm = L->q_norm;
        d->k_norm = L->k_norm;
        d->qkv = cu_linear_int4(&L->qkv, 0);
        d->o = cu_linear_int4(&L->o, 0);
        d->gate_up = cu_linear_int4(&L->gate_up, 0);
        d->down = cu_linear_int4(&L->down, 0);
        if (L->sh_gate_up.kind != CU_W_NONE) {
            d->sh_gate_up = cu_linear_int4(&L->sh_gate_up, 0);
            d->sh_down = cu_linear_int4(&L->sh_down, 0);
        }
        d->kc = s->kv + (size_t)(2 * l) * s->kv_layer_elems;
        d->vc = s->kv + (size_t)(2 * l + 1) * s->kv_layer_elems;
    }
    const int I = m->layers[0].down.k, sI = m->has_shared ? m->layers[0].sh_down.k : 0;
    int rc = cu_state_dev_alloc((void **)&s->d_mega_layers, (size_t)nL * sizeof(*t), err,
                                "layer table");
    if (!rc) {
        cudaError_t e = cudaMemcpy(s->d_mega_layers, t, (size_t)nL * sizeof(*t),
                                   cudaMemcpyHostToDevice);
        rc = cuda_err(err, e, "layer table upload");
    }
    free(t);
    if (rc ||
        (rc = cu_state_dev_alloc((void **)&s->mega_h, ((size_t)m->top_k * I + sI) * 2, err,
                                 "one-token hidden")) ||
        (rc = cu_state_dev_alloc((void **)&s->mega_bar, 4, err, "grid barrier")) ||
        (rc = cu_state_dev_alloc((void **)&s->mega_fail, 4, err, "grid barrier")) ||
        (rc = cu_state_dev_alloc((void **)&s->mega_cnt, (size_t)m->nkv * 4, err,
                                 "attention counters")) ||
        (rc = cu_state_host_alloc((void **)&s->h_mega_fail, 4, err)))
        return rc;
    CUDA_TRY(err, cudaMemset(s->mega_fail, 0, 4));
    CUDA_TRY(err, cudaMemset(s->mega_cnt, 0, (size_t)m->nkv * 4));
    *s->h_mega_fail = 0;
    cu_mega_args *a = &s->mega;
    a->layers = s->d_mega_layers;
    a->n_layers = nL;
    a->H = m->hidden;
    a->nq = m->nq;
    a->nkv = m->nkv;
    a->hd = m->head_dim;
    a->E = m->n_experts;
    a->k = m->top_k;
    a->renorm = m->renorm;
    a->has_shared = m->has_shared;
    a->I = I;
    a->sI = sI;
    a->eps = m->eps;
    a->inv_freq = s->inv_freq;
    a->embed = (const __half *)m->embed;
    a->tok = s->d_tok;
    a->pos = s->d_pos;
    a->block_table = s->d_bt;
    a->block_size = s->bs;
    a->x = s->x;
    a->qkv = s->qkv;
    a->part = s->part;
    a->rlog = s->rlog;
    a->att = s->att;
    a->h = s->mega_h;
    a->attn_cnt = s->mega_cnt;
    a->bar = s->mega_bar;
    a->fail = s->mega_fail;
    a->active = NULL;
    a->max_units = s->split_budget;
    if (mega_prof_on() &&
        (rc = cu_state_dev_alloc((void **)&s->mega_prof, (size_t)nL * 12 * 8, err, "phase clocks")))
        return rc;
    a->prof = s->mega_prof;
    lm_err e2;
    if (cu_mega_setup(a, s->sms, &s->mega_grid, &s->mega_smem, &e2)) {
        s->mega_grid = 0;
        snprintf(s->mega_why, sizeof s->mega_why, "%.95s", e2.msg);
    }
    return 0;
}

extern "C" int cu_state_mega(const cu_state *s, const char **why)
{
    if (why)
        *why = s->mega_grid > 0 ? "" : s->mega_why[0] ? s->mega_why : "no KV cache yet";
    return s->mega_grid > 0;
}

extern "C" int cu_state_mega_report(cu_state *s, char *buf, size_t size)
{
    static const char *const names[] = {"qkv", "att", "o", "router", "gate_up", "down"};
    const int nL = s->m->n_layers;
    if (!s->mega_prof || size == 0)
        return 0;
    long long *t = (long long *)malloc((size_t)nL * 12 * 8);
    if (!t || cudaStreamSynchronize(s->st) != cudaSuccess ||
        cudaMemcpy(t, s->mega_prof, (size_t)nL * 12 * 8, cudaMemcpyDeviceToHost) != cudaSuccess) {
        free(t);
        return 0;
    }
    int khz = 0, dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev);
    const double us = khz > 0 ? 1e3 / khz : 0;
    size_t n = 0;
    buf[0] = 0;
    for (int p = 0; p < 6 && n < size; p++) {
        /* work: edge 2p -> 2p+1; wait: 2p+1 -> the next phase's start */
        double w = 0, b = 0;
        int nb = 0;
        for (int l = 0; l < nL; l++) {
            w += (double)(t[l * 12 + 2 * p + 1] - t[l * 12 + 2 * p]);
            if (p < 5) {
                b += (double)(t[l * 12 + 2 * p + 2] - t[l * 12 + 2 * p + 1]);
                nb++;
            } else if (l + 1 < nL) {
                b += (double)(t[(l + 1) * 12] - t[l * 12 + 11]);
                nb++;
            }
        }
        n += (size_t)snprintf(buf + n, size - n, "%s%s %.2f +wait %.2f", p ? " | " : "", names[p],
                              w / nL * us, nb ? b / nb * us : 0.0);
    }
    if (n < size)
        snprintf(buf + n, size - n, " (us a layer, block 0; whole: %.1f us)",
                 (double)(t[(nL - 1) * 12 + 11] - t[0]) * us);
    free(t);
    return 1;
}

int cu_state_mega_failed(cu_state *s, lm_err *err)
{
    for (int i = 0; i < s->n_graphs; i++)
        cudaGraphExecDestroy(s->graphs[i].exec);
    s->n_graphs = 0;
    s->mega_grid = 0;
    *s->h_mega_fail = 0;
    snprintf(s->mega_why, sizeof s->mega_why, "a grid barrier timed out");
    cudaMemset(s->mega_fail, 0, 4);
    cudaMemset(s->mega_cnt, 0, (size_t)s->m->nkv * 4);
    return lm_err_set(err, -EIO, "cuda: the one-token step kernel timed out at a grid barrier "
                      "(were all its blocks resident? LIGHTMOE_CUDA_MEGA_TIMEOUT sets the wait); "
                      "this step failed, later ones use the ordinary kernels");
}
