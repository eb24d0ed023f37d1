/*
 * cuda_synth.cu: random cu_models in GPU memory (see cuda_synth.h). Every
 * array comes from one cudaMalloc recorded in a list freed by
 * cu_synth_free; the random values come from a counter-based hash so that
 * a (config, seed) pair always gives the same model.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cuda_common.cuh"
#include "engine/cuda_synth.h"

const cu_synth_config cu_synth_qwen3_30b_a3b = {
    "qwen3-30b-a3b", 48, 2048, 32, 4, 128, 151936, 40960, 128, 8, 1, 768, 0, 128, 1, 0, 1,
    1000000.f};
const cu_synth_config cu_synth_qwen15_moe_a27b = {
    "qwen1.5-moe-a2.7b", 24, 2048, 16, 16, 128, 151936, 8192, 60, 4, 0, 1408, 5632, 128, 0, 1, 1,
    1000000.f};

namespace {

struct synth_owner {
    cu_model m;
    cu_layer *layers;
    void **ptrs;
    int n_ptrs, cap;
};

__device__ __forceinline__ uint32_t hash32(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (uint32_t)x;
}
__device__ __forceinline__ float unif(uint64_t seed, size_t i) /* [-1, 1) */
{
    return (float)(hash32(seed * 0x9E3779B97F4A7C15ULL + i) >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

__global__ void k_fill_f16(__half *p, size_t n, uint64_t seed, float amp)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2half(amp * unif(seed, i));
}
__global__ void k_fill_f32(float *p, size_t n, uint64_t seed, float base, float amp)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = base + amp * unif(seed, i);
}
__global__ void k_fill_u8(uint8_t *p, size_t n, uint64_t seed, int mask, int fixed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = fixed >= 0 ? (uint8_t)fixed : (uint8_t)(hash32(seed * 31 + i) & mask);
}

int grab(synth_owner *o, void **p, size_t bytes, lm_err *err)
{
    if (o->n_ptrs == o->cap) {
        int nc = o->cap ? 2 * o->cap : 256;
        void **np = (void **)realloc(o->ptrs, nc * sizeof(void *));
        if (!np)
            return lm_err_set(err, -ENOMEM, "synth: out of host memory");
        o->ptrs = np;
        o->cap = nc;
    }
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 16);
    if (e != cudaSuccess)
        return lm_err_set(err, -ENOMEM, "synth: cudaMalloc of %zu bytes: %s", bytes,
                          cudaGetErrorString(e));
    o->ptrs[o->n_ptrs++] = *p;
    return 0;
}

const int FILL_GRID = 1024;

int make_linear(synth_owner *o, cu_linear *l, int int4, int n, int k, int group, int E,
                uint64_t seed, lm_err *err)
{
    memset(l, 0, sizeof(*l));
    l->n = n;
    l->k = k;
    l->group = group;
    l->n_experts = E;
    const float amp = sqrtf(3.0f / (float)k);
    int rc;
    if (!int4) {
        l->kind = CU_W_F16;
        size_t cnt = (size_t)E * n * k;
        if ((rc = grab(o, (void **)&l->w16, cnt * 2, err)))
            return rc;
        k_fill_f16<<<FILL_GRID, 256>>>((__half *)l->w16, cnt, seed, amp);
    } else {
        l->kind = CU_W_INT4;
        size_t qb = (size_t)E * n * (k / 2), gc = (size_t)E * n * (k / group);
        if ((rc = grab(o, (void **)&l->qs, qb, err)) || (rc = grab(o, (void **)&l->scales, gc * 2, err)) ||
            (rc = grab(o, (void **)&l->zeros, gc, err)))
            return rc;
        k_fill_u8<<<FILL_GRID, 256>>>((uint8_t *)l->qs, qb, seed, 0xff, -1);
        k_fill_u8<<<FILL_GRID, 256>>>((uint8_t *)l->zeros, gc, seed + 1, 0xf, 8);
        /* raw scales in [-1, 1); k_scale_fix maps them to 1/(4.6 sqrt(k)) * (1 + u/4) once all
         * layers are filled ((q - 8) uniform on [-8, 7] has standard deviation ~4.6) */
        k_fill_f16<<<FILL_GRID, 256>>>((__half *)l->scales, gc, seed + 2, 1.0f);
    }
    CUDA_LAUNCH_CHECK(err, "synth fill");
    return 0;
}

__global__ void k_scale_fix(__half *p, size_t n, float amp)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2half(amp * (1.0f + 0.25f * __half2float(p[i])));
}

} // namespace

extern "C" size_t cu_linear_bytes(const cu_linear *l)
{
    if (l->kind == CU_W_F16)
        return (size_t)l->n_experts * l->n * l->k * 2;
    if (l->kind == CU_W_INT4)
        return (size_t)l->n_experts * ((size_t)l->n * (l->k / 2) + (size_t)l->n * (l->k / l->group) * 3);
    return 0;
}

extern "C" void cu_synth_free(cu_model *m)
{
    if (!m)
        return;
    synth_owner *o = (synth_owner *)m; /* m is the first member */
    cudaDeviceSynchronize();
    for (int i = 0; i < o->n_ptrs; i++)
        cudaFree(o->ptrs[i]);
    free(o->ptrs);
    free(o->layers);
    free(o);
}

extern "C" int cu_synth_create(const cu_synth_config *c, uint64_t seed, cu_model **ret, lm_err *err)
{
    synth_owner *o = (synth_owner *)calloc(1, sizeof(*o));
    if (!o)
        return lm_err_set(err, -ENOMEM, "synth: out of host memory");
    o->layers = (cu_layer *)calloc(c->n_layers, sizeof(cu_layer));
    if (!o->layers) {
        free(o);
        return lm_err_set(err, -ENOMEM, "synth: out of host memory");
    }
    cu_model *m = &o->m;
    const int H = c->hidden, hd = c->head_dim;
    m->n_layers = c->n_layers;
    m->hidden = H;
    m->nq = c->nq;
    m->nkv = c->nkv;
    m->head_dim = hd;
    m->vocab = c->vocab;
    m->max_ctx = c->max_ctx;
    m->n_experts = c->n_experts;
    m->top_k = c->top_k;
    m->renorm = c->renorm;
    m->has_shared = c->shared_inter > 0;
    m->inter_max = c->moe_inter > c->shared_inter ? c->moe_inter : c->shared_inter;
    m->eps = 1e-6f;
    m->rope_theta = c->rope_theta;
    m->layers = o->layers;
    uint64_t sd = seed * 1000003ULL;
    int rc = 0;
#define TRY(x) \
    do { \
        if ((rc = (x))) \
            goto fail; \
    } while (0)
    {
        void *p;
        TRY(grab(o, &p, (size_t)c->vocab * H * 2, err));
        m->embed = (const uint16_t *)p;
        k_fill_f16<<<FILL_GRID, 256>>>((__half *)p, (size_t)c->vocab * H, sd++, 1.0f);
        TRY(grab(o, &p, (size_t)H * 4, err));
        m->final_norm = (const float *)p;
        k_fill_f32<<<FILL_GRID, 256>>>((float *)p, H, sd++, 1.0f, 0.1f);
        TRY(make_linear(o, &m->lm_head, 0, c->vocab, H, c->group, 1, sd++, err));
    }
    for (int l = 0; l < c->n_layers; l++) {
        cu_layer *L = &o->layers[l];
        void *p;
        const int nqkv = (c->nq + 2 * c->nkv) * hd;
        TRY(grab(o, &p, (size_t)H * 4, err));
        L->attn_norm = (const float *)p;
        k_fill_f32<<<FILL_GRID, 256>>>((float *)p, H, sd++, 1.0f, 0.1f);
        TRY(grab(o, &p, (size_t)H * 4, err));
        L->mlp_norm = (const float *)p;
        k_fill_f32<<<FILL_GRID, 256>>>((float *)p, H, sd++, 1.0f, 0.1f);
        TRY(make_linear(o, &L->qkv, c->int4, nqkv, H, c->group, 1, sd++, err));
        if (c->qkv_bias) {
            TRY(grab(o, &p, (size_t)nqkv * 4, err));
            L->qkv_bias = (const float *)p;
            k_fill_f32<<<FILL_GRID, 256>>>((float *)p, nqkv, sd++, 0.f, 0.1f);
        }
        if (c->qk_norm) {
            TRY(grab(o, &p, (size_t)hd * 4, err));
            L->q_norm = (const float *)p;
            k_fill_f32<<<FILL_GRID, 256>>>((float *)p, hd, sd++, 1.0f, 0.1f);
            TRY(grab(o, &p, (size_t)hd * 4, err));
            L->k_norm = (const float *)p;
            k_fill_f32<<<FILL_GRID, 256>>>((float *)p, hd, sd++, 1.0f, 0.1f);
        }
        TRY(make_linear(o, &L->o, c->int4, H, c->nq * hd, c->group, 1, sd++, err));
        L->moe = 1;
        const int er = c->n_experts + (c->shared_inter > 0);
        TRY(grab(o, &p, (size_t)er * H * 4, err));
        L->router = (const float *)p;
        k_fill_f32<<<FILL_GRID, 256>>>((float *)p, (size_t)er * H, sd++, 0.f, sqrtf(3.0f / H));
        TRY(make_linear(o, &L->gate_up, c->int4, 2 * c->moe_inter, H, c->group, c->n_experts, sd++, err));
        TRY(make_linear(o, &L->down, c->int4, H, c->moe_inter, c->group, c->n_experts, sd++, err));
        if (c->shared_inter > 0) {
            TRY(make_linear(o, &L->sh_gate_up, c->int4, 2 * c->shared_inter, H, c->group, 1, sd++, err));
            TRY(make_linear(o, &L->sh_down, c->int4, H, c->shared_inter, c->group, 1, sd++, err));
        }
        cu_linear *lins[] = {&L->qkv, &L->o, &L->gate_up, &L->down, &L->sh_gate_up, &L->sh_down};
        for (auto *x : lins)
            if (x->kind == CU_W_INT4) {
                const size_t gc = (size_t)x->n_experts * x->n * (x->k / x->group);
                k_scale_fix<<<FILL_GRID, 256>>>((__half *)x->scales, gc,
                                                1.0f / (4.6f * sqrtf((float)x->k)));
            }
    }
    {
        cudaError_t e = cudaDeviceSynchronize();
        if (e != cudaSuccess) {
            rc = cuda_err(err, e, "synth fill");
            goto fail;
        }
    }
    *ret = m;
    return 0;
fail:
    cu_synth_free(m);
    return rc;
#undef TRY
}
