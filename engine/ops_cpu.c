/*
 * ops_cpu.c: CPU operators (ops_cpu.h) and the small thread pool they use.
 *
 * Matmul structure: work is split over output rows in chunks; a thread
 * computes a tile of up to 4 output rows x 2 token rows at a time with one
 * 8-lane accumulator per (row, token), walking k in order (for INT4 in
 * blocks of 16 columns: the even ones, then the odd ones, the order the
 * nibbles unpack in; x is rearranged to match once per call). INT4 weights
 * are dequantised in registers (w = scale * (q - zero), the int4.h formula,
 * which the AVX2 tile gets exactly as one fma(scale, q, -scale * zero), see
 * int4_w16);
 * when there are more than 2 token rows, the tile's 4 weight rows are first
 * dequantised into the thread's scratch (the same float values) and reused
 * for every token pair. Either way every output is the same sequence of
 * float operations, whatever m and the thread count.
 *
 * Kernel sets: this file holds the portable loops and the AVX2 tiles; the
 * AVX-512 tiles (same structure, 16 lanes, INT4 weights from a per-group
 * table) are in ops_cpu_avx512.c, chosen per pool (cpu_pool_set_isa).
 * The pool's threads spin briefly between jobs (POOL_SPIN_NS) because a
 * decode step is hundreds of sub-millisecond jobs.
 */
#include "engine/ops_cpu.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/half.h"
#include "engine/ops_cpu_int.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define OPS_AVX2 1
#else
#define OPS_AVX2 0
#endif

/* ---- pool ------------------------------------------------------------------ */

struct cpu_pool {
    int n;
    cpu_isa isa;
    pthread_t *th;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv_start, cv_done;
    _Atomic uint64_t gen;       /* written under mu; read without it to spin */
    atomic_int stop;
    int active;                 /* workers inside the current job */
    cpu_task_fn fn;
    void *ctx;
    int64_t n_items, chunk;
    atomic_llong next;          /* first item not yet taken */
    atomic_llong done;          /* items finished */
    float **scratch;            /* per thread, scratch_floats each */
    size_t scratch_floats;
};

typedef struct worker_arg {
    cpu_pool *p;
    int idx;
} worker_arg;

/* Take chunks of the current job until none is left. The thread finishing
 * the last chunk wakes the caller: the caller never waits for a worker that
 * has not woken up yet (on a busy machine it may be descheduled for a long
 * time), only for the work itself. */
static void pool_work(cpu_pool *p, int t)
{
    for (;;) {
        int64_t b = atomic_fetch_add(&p->next, p->chunk);
        if (b >= p->n_items)
            break;
        int64_t e = b + p->chunk < p->n_items ? b + p->chunk : p->n_items;
        p->fn(p->ctx, b, e, t);
        if (atomic_fetch_add(&p->done, e - b) + (e - b) == p->n_items) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_broadcast(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

/* How long a thread spins before sleeping on a condition variable. The
 * forward pass issues hundreds of small jobs per token, back to back: a
 * worker that went to sleep after each one would join the next one late by
 * the wake-up latency (tens of microseconds on a VM), a large part of an
 * expert matmul; the caller likewise waits for the last chunk. 50 us
 * covers the gaps inside a step (norms, routing: microseconds) and keeps
 * an idle pool from burning a shared machine's cores for long. */
#define POOL_SPIN_NS 50000

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Spin until the job generation differs from `old` (or the pool stops), at most POOL_SPIN_NS. */
static void spin_while_gen(cpu_pool *p, uint64_t old)
{
    int64_t t0 = mono_ns();
    for (int i = 1; atomic_load(&p->gen) == old && !atomic_load(&p->stop); i++) {
        if (!(i & 63) && mono_ns() - t0 > POOL_SPIN_NS)
            return;
        cpu_relax();
    }
}

/* Spin until `done` reaches n, at most POOL_SPIN_NS. */
static void spin_until_done(cpu_pool *p, int64_t n)
{
    int64_t t0 = mono_ns();
    for (int i = 1; atomic_load(&p->done) < n; i++) {
        if (!(i & 63) && mono_ns() - t0 > POOL_SPIN_NS)
            return;
        cpu_relax();
    }
}

static void *pool_main(void *arg)
{
    cpu_pool *p = ((worker_arg *)arg)->p;
    int idx = ((worker_arg *)arg)->idx;
    free(arg);
    uint64_t seen = 0;
    for (;;) {
        spin_while_gen(p, seen);
        pthread_mutex_lock(&p->mu);
        while (!p->stop && p->gen == seen)
            pthread_cond_wait(&p->cv_start, &p->mu);
        if (p->stop) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = p->gen;
        /* join the job only while it has work left; the next job cannot
         * start (and reset the counters) while we are inside (active) */
        int join = atomic_load(&p->next) < p->n_items;
        p->active += join;
        pthread_mutex_unlock(&p->mu);
        if (!join)
            continue;
        pool_work(p, idx);
        pthread_mutex_lock(&p->mu);
        if (--p->active == 0)
            pthread_cond_broadcast(&p->cv_done);
        pthread_mutex_unlock(&p->mu);
    }
}

int cpu_pool_create(int n_threads, cpu_pool **ret, lm_err *err)
{
    *ret = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return lm_err_set(err, -EINVAL, "cpu pool: %d threads is out of range 1..1024",
                          n_threads);
    cpu_pool *p = calloc(1, sizeof *p);
    if (!p || !(p->th = calloc((size_t)n_threads, sizeof *p->th)) ||
        !(p->scratch = calloc((size_t)n_threads, sizeof *p->scratch))) {
        if (p)
            free(p->th);
        free(p);
        return lm_err_set(err, -ENOMEM, "cpu pool: out of memory");
    }
    p->n = n_threads;
    p->isa = cpu_isa_best();
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_start, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    for (int i = 1; i < n_threads; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (a) {
            a->p = p;
            a->idx = i;
        }
        int rc = a ? pthread_create(&p->th[i], NULL, pool_main, a) : ENOMEM;
        if (rc) {
            free(a);
            p->n = i;
            cpu_pool_destroy(p);
            return lm_err_set(err, -rc, "cpu pool: cannot start thread %d", i);
        }
        p->started = i;
    }
    *ret = p;
    return 0;
}

void cpu_pool_destroy(cpu_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv_start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i <= p->started; i++)
        pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_start);
    pthread_cond_destroy(&p->cv_done);
    for (int i = 0; i < p->n; i++)
        free(p->scratch[i]);
    free(p->scratch);
    free(p->th);
    free(p);
}

int cpu_pool_threads(const cpu_pool *p) { return p->n; }
void cpu_pool_set_portable(cpu_pool *p, int portable)
{
    p->isa = portable ? CPU_ISA_PORTABLE : cpu_isa_best();
}
int cpu_pool_portable(const cpu_pool *p) { return p->isa == CPU_ISA_PORTABLE; }
void cpu_pool_set_isa(cpu_pool *p, cpu_isa isa)
{
    cpu_isa best = cpu_isa_best();
    p->isa = isa < best ? isa : best;
}
cpu_isa cpu_pool_isa(const cpu_pool *p) { return p->isa; }

float *cpu_pool_scratch(const cpu_pool *p, int thread, size_t *ret_floats)
{
    *ret_floats = p->scratch_floats;
    return p->scratch[thread];
}

cpu_isa cpu_isa_best(void)
{
    cpu_isa best = CPU_ISA_PORTABLE;
#if OPS_AVX2
    best = ops_avx512_supported() ? CPU_ISA_AVX512 : CPU_ISA_AVX2;
#endif
    const char *cap = getenv("LIGHTMOE_CPU_ISA");
    if (cap && !strcmp(cap, "portable"))
        best = CPU_ISA_PORTABLE;
    else if (cap && !strcmp(cap, "avx2") && best > CPU_ISA_AVX2)
        best = CPU_ISA_AVX2;
    return best;
}

const char *cpu_isa_name(cpu_isa isa)
{
    return isa == CPU_ISA_AVX512 ? "avx512" : isa == CPU_ISA_AVX2 ? "avx2" : "portable";
}

int cpu_pool_reserve(cpu_pool *p, size_t floats_per_thread, lm_err *err)
{
    if (floats_per_thread <= p->scratch_floats)
        return 0;
    for (int i = 0; i < p->n; i++) {
        free(p->scratch[i]);
        p->scratch[i] = aligned_alloc(64, ((floats_per_thread * sizeof(float)) + 63) & ~(size_t)63);
        if (!p->scratch[i]) {
            p->scratch_floats = 0;
            return lm_err_set(err, -ENOMEM, "cpu pool: out of memory for scratch");
        }
    }
    p->scratch_floats = floats_per_thread;
    return 0;
}

void cpu_pool_run(cpu_pool *p, cpu_task_fn fn, void *ctx, int64_t n_items, int64_t chunk)
{
    if (n_items <= 0)
        return;
    if (chunk < 1)
        chunk = 1;
    if (p->n == 1 || n_items <= chunk) {
        for (int64_t b = 0; b < n_items; b += chunk)
            fn(ctx, b, b + chunk < n_items ? b + chunk : n_items, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    while (p->active) /* stragglers of the previous job leave its loop at once */
        pthread_cond_wait(&p->cv_done, &p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_items = n_items;
    p->chunk = chunk;
    atomic_store(&p->next, 0);
    atomic_store(&p->done, 0);
    p->gen++;
    pthread_cond_broadcast(&p->cv_start);
    pthread_mutex_unlock(&p->mu);
    pool_work(p, 0);
    spin_until_done(p, n_items);
    pthread_mutex_lock(&p->mu);
    while (atomic_load(&p->done) < n_items)
        pthread_cond_wait(&p->cv_done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

/* ---- rows ------------------------------------------------------------------ */

void op_rmsnorm(float *out, const float *x, const float *w, int32_t n_rows, int32_t dim,
                float eps)
{
    for (int32_t r = 0; r < n_rows; r++) {
        const float *xr = x + (size_t)r * (size_t)dim;
        float *o = out + (size_t)r * (size_t)dim;
        double ss = 0;
        for (int32_t i = 0; i < dim; i++)
            ss += (double)xr[i] * (double)xr[i];
        float var = (float)(ss / dim);
        float inv = 1.f / sqrtf(var + eps);
        for (int32_t i = 0; i < dim; i++)
            o[i] = w[i] * (xr[i] * inv);
    }
}

void op_rope_inv_freq(float *inv_freq, int32_t head_dim, float theta)
{
    for (int32_t i = 0; i < head_dim / 2; i++) {
        float e = (float)(2 * i) / (float)head_dim;
        inv_freq[i] = 1.f / powf(theta, e);
    }
}

void op_rope(float *x, int32_t n_rows, int32_t n_heads, int32_t head_dim, const int32_t *pos,
             const float *inv_freq)
{
    int32_t h = head_dim / 2;
    for (int32_t r = 0; r < n_rows; r++) {
        float p = (float)pos[r];
        for (int32_t i = 0; i < h; i++) {
            float a = p * inv_freq[i];
            float c = (float)cos((double)a), s = (float)sin((double)a);
            for (int32_t hd = 0; hd < n_heads; hd++) {
                float *v = x + ((size_t)r * (size_t)n_heads + (size_t)hd) * (size_t)head_dim;
                float x1 = v[i], x2 = v[i + h];
                v[i] = x1 * c - x2 * s;
                v[i + h] = x2 * c + x1 * s;
            }
        }
    }
}

void op_silu_mul(float *g, const float *u, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

void op_embed(float *out, const linear *table, const int32_t *tokens, int32_t n_rows)
{
    size_t k = (size_t)table->k;
    for (int32_t r = 0; r < n_rows; r++)
        for (size_t i = 0; i < k; i++)
            out[(size_t)r * k + i] =
                ops_dense_elem(table->dtype, table->w, (size_t)tokens[r] * k + i);
}

/* ---- matmul ---------------------------------------------------------------- */

size_t op_linear_scratch(const linear *W, int32_t m)
{
    return W->kind == LINEAR_INT4 ? (size_t)m * (size_t)W->k : 0;
}

/* The int4.h dequantisation of one element, the definition everything follows. */
static inline float int4_w(const int4_matrix *q, int32_t r, int32_t j)
{
    size_t gi = (size_t)r * (size_t)(q->k / q->group) + (size_t)(j / q->group);
    return fp16_to_float(q->scales[gi]) * (float)(int4_get(q, r, j) - (int)q->zeros[gi]);
}

void op_linear_naive(const linear *W, const float *x, int32_t m, float *y)
{
    for (int32_t t = 0; t < m; t++)
        for (int32_t r = 0; r < W->n; r++) {
            double acc = 0;
            for (int32_t j = 0; j < W->k; j++) {
                float w;
                int32_t src = j;
                if (W->kind == LINEAR_INT4) {
                    w = int4_w(&W->q, r, j);
                    src = W->q.perm ? W->q.perm[j] : j;
                } else {
                    w = ops_dense_elem(W->dtype, W->w, (size_t)r * (size_t)W->k + (size_t)j);
                }
                acc += (double)w * (double)x[(size_t)t * (size_t)W->k + (size_t)src];
            }
            y[(size_t)t * (size_t)W->n + (size_t)r] = (float)acc + (W->bias ? W->bias[r] : 0.f);
        }
}

/* Portable: one float accumulator per output, k in order. */
static void lin_task_portable(void *vc, int64_t b, int64_t e, int thread)
{
    const lin_ctx *c = vc;
    const linear *W = c->W;
    for (int64_t r = b; r < e; r++)
        for (int32_t t = 0; t < c->m; t++) {
            const float *x = c->x + (size_t)t * (size_t)c->ldx;
            float acc = 0.f;
            for (int32_t j = 0; j < W->k; j++) {
                size_t at = (size_t)r * (size_t)W->k + (size_t)j;
                float w = W->kind == LINEAR_INT4 ? int4_w(&W->q, (int32_t)r, j)
                                                 : ops_dense_elem(W->dtype, W->w, at);
                acc += w * x[j];
            }
            c->y[(size_t)t * (size_t)c->ldy + (size_t)r] = acc + (W->bias ? W->bias[r] : 0.f);
        }
}

#if OPS_AVX2
/* Loops over a tile's rows and tokens (at most 4 and 2) must be unrolled
 * so that the accumulators stay in registers; -O2 does not always do it. */
#define UNROLL _Pragma("GCC unroll 4")

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_dense8(st_dtype dt, const void *w, size_t off)
{
    if (dt == ST_F32)
        return _mm256_loadu_ps((const float *)w + off);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + off));
    if (dt == ST_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 16 dequantised weights of packed columns j..j+15 (j % 16 == 0), split as
 * the even columns j, j+2, .., j+14 (*we) and the odd ones (*wo): one byte
 * holds an even column in its low nibble and the next odd one in its high
 * nibble. x is pre-arranged the same way (see op_linear).
 * w = fma(scale, q, -scale * zero) (nsz = -scale * zero) is the int4.h
 * value scale * (q - zero) exactly: scale is an fp16 (11 significant bits)
 * and q, zero, q - zero are integers of at most 5 bits, so scale * zero and
 * scale * (q - zero) are exact in float32, and the fused q * scale + nsz
 * is the exact real scale * (q - zero), which needs no rounding. (Only the
 * sign of a zero weight may differ, which no sum starting from +0 sees.) */
static inline void int4_w16(const uint8_t *qrow, int32_t j, __m256 scale, __m256 nsz, __m256 *we,
                            __m256 *wo)
{
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qrow + j / 2)));
    __m256i lo = _mm256_and_si256(b, _mm256_set1_epi32(15)), hi = _mm256_srli_epi32(b, 4);
    *we = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(lo), nsz);
    *wo = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(hi), nsz);
}

/* Scales and -scale * zero of up to 8 groups g0.. of row r, converted 8 at
 * a time (F16C; fp16 -> float is exact, so these are the values
 * fp16_to_float gives); int4_w16 takes them broadcast. */
static inline void group_params8(const int4_matrix *q, int32_t r, int32_t g0, float *sf,
                                 float *nz)
{
    int32_t ng = q->k / q->group, cnt = ng - g0 < 8 ? ng - g0 : 8;
    size_t gi = (size_t)r * (size_t)ng + (size_t)g0;
    __m128i hv, zb;
    if (cnt == 8) {
        hv = _mm_loadu_si128((const __m128i *)(q->scales + gi));
        zb = _mm_loadl_epi64((const __m128i *)(q->zeros + gi));
    } else { /* the row's last groups: copy, never read past the arrays */
        uint16_t h[8] = {0};
        uint8_t z8[16] = {0};
        for (int32_t i = 0; i < cnt; i++) {
            h[i] = q->scales[gi + (size_t)i];
            z8[i] = q->zeros[gi + (size_t)i];
        }
        hv = _mm_loadu_si128((const __m128i *)h);
        zb = _mm_loadu_si128((const __m128i *)z8);
    }
    __m256 sv = _mm256_cvtph_ps(hv);
    __m256 zv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(zb));
    _mm256_storeu_ps(sf, sv);
    _mm256_storeu_ps(nz, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(sv, zv)));
}

/* Finish one output: lane sum, dense k tail, bias. */
static inline float lin_finish(const linear *W, __m256 acc, int32_t r, const float *x)
{
    float s = hsum8(acc);
    if (W->kind == LINEAR_DENSE)
        for (int32_t j = W->k & ~7; j < W->k; j++)
            s += ops_dense_elem(W->dtype, W->w, (size_t)r * (size_t)W->k + (size_t)j) * x[j];
    return s + (W->bias ? W->bias[r] : 0.f);
}

/* Dense tile: NR rows x NT tokens, weights converted in registers. */
static inline __attribute__((always_inline)) void dense_tile(const lin_ctx *c, st_dtype dt,
                                                             int32_t r0, int NR, int32_t t0,
                                                             int NT)
{
    const linear *W = c->W;
    int32_t k8 = W->k & ~7;
    __m256 acc[4][2];
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            acc[i][t] = _mm256_setzero_ps();
    const float *x0 = c->x + (size_t)t0 * (size_t)c->ldx;
    for (int32_t j = 0; j < k8; j += 8) {
        __m256 xv[2];
        UNROLL for (int t = 0; t < NT; t++)
            xv[t] = _mm256_loadu_ps(x0 + (size_t)t * (size_t)c->ldx + (size_t)j);
        if (!(j & (dt == ST_F32 ? 15 : 31))) /* once per 64-byte line */
            ops_prefetch_dense_rows(W, dt, r0, NR, j);
        UNROLL for (int i = 0; i < NR; i++) {
            __m256 w = load_dense8(dt, W->w, (size_t)(r0 + i) * (size_t)W->k + (size_t)j);
            UNROLL for (int t = 0; t < NT; t++)
                acc[i][t] = _mm256_fmadd_ps(w, xv[t], acc[i][t]);
        }
    }
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            c->y[(size_t)(t0 + t) * (size_t)c->ldy + (size_t)(r0 + i)] =
                lin_finish(W, acc[i][t], r0 + i, x0 + (size_t)t * (size_t)c->ldx);
}

/* INT4 tile, dequantising in registers; x is in the arranged order. */
static inline __attribute__((always_inline)) void int4_tile(const lin_ctx *c, int32_t r0, int NR,
                                                            int32_t t0, int NT)
{
    const int4_matrix *q = &c->W->q;
    int32_t ng = q->k / q->group, kb = q->k / 2;
    __m256 acc[4][2];
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            acc[i][t] = _mm256_setzero_ps();
    const float *x0 = c->x + (size_t)t0 * (size_t)c->ldx;
    float sf[4][8], nz[4][8];
    for (int32_t g = 0; g < ng; g++) {
        if (!(g & 7))
            UNROLL for (int i = 0; i < NR; i++)
                group_params8(q, r0 + i, g, sf[i], nz[i]);
        __m256 sc[4], ze[4];
        UNROLL for (int i = 0; i < NR; i++) {
            sc[i] = _mm256_broadcast_ss(&sf[i][g & 7]);
            ze[i] = _mm256_broadcast_ss(&nz[i][g & 7]);
        }
        for (int32_t j = g * q->group; j < (g + 1) * q->group; j += 16) {
            __m256 xe[2], xo[2];
            UNROLL for (int t = 0; t < NT; t++) {
                xe[t] = _mm256_loadu_ps(x0 + (size_t)t * (size_t)c->ldx + (size_t)j);
                xo[t] = _mm256_loadu_ps(x0 + (size_t)t * (size_t)c->ldx + (size_t)j + 8);
            }
            if (!(j & 127)) /* the next tile's rows, as in ops_cpu_avx512.c */
                UNROLL for (int i = 0; i < NR; i++)
                    _mm_prefetch((const char *)q->qs + (size_t)(r0 + NR + i) * (size_t)kb +
                                     (size_t)(j / 2), _MM_HINT_T0);
            UNROLL for (int i = 0; i < NR; i++) {
                __m256 we, wo;
                int4_w16(q->qs + (size_t)(r0 + i) * (size_t)kb, j, sc[i], ze[i], &we, &wo);
                UNROLL for (int t = 0; t < NT; t++) {
                    acc[i][t] = _mm256_fmadd_ps(we, xe[t], acc[i][t]);
                    acc[i][t] = _mm256_fmadd_ps(wo, xo[t], acc[i][t]);
                }
            }
        }
    }
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            c->y[(size_t)(t0 + t) * (size_t)c->ldy + (size_t)(r0 + i)] =
                lin_finish(c->W, acc[i][t], r0 + i, NULL);
}

/* Dequantise rows r0..r0+NR-1 into wbuf[NR][k] in the arranged order (the
 * same float values as int4_w16, so wbuf_tile repeats int4_tile exactly). */
static void int4_decode_rows(const int4_matrix *q, int32_t r0, int NR, float *wbuf)
{
    int32_t ng = q->k / q->group, kb = q->k / 2;
    UNROLL for (int i = 0; i < NR; i++) {
        const uint8_t *qrow = q->qs + (size_t)(r0 + i) * (size_t)kb;
        float *dst = wbuf + (size_t)i * (size_t)q->k;
        float sf[8], nz[8];
        for (int32_t g = 0; g < ng; g++) {
            if (!(g & 7))
                group_params8(q, r0 + i, g, sf, nz);
            __m256 sc = _mm256_broadcast_ss(&sf[g & 7]);
            __m256 ze = _mm256_broadcast_ss(&nz[g & 7]);
            for (int32_t j = g * q->group; j < (g + 1) * q->group; j += 16) {
                __m256 we, wo;
                int4_w16(qrow, j, sc, ze, &we, &wo);
                _mm256_storeu_ps(dst + j, we);
                _mm256_storeu_ps(dst + j + 8, wo);
            }
        }
    }
}

/* Tile over decoded float rows (used for INT4 when m > 2). */
static inline __attribute__((always_inline)) void wbuf_tile(const lin_ctx *c, const float *wbuf,
                                                            int32_t r0, int NR, int32_t t0,
                                                            int NT)
{
    int32_t k = c->W->k;
    __m256 acc[4][2];
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            acc[i][t] = _mm256_setzero_ps();
    const float *x0 = c->x + (size_t)t0 * (size_t)c->ldx;
    for (int32_t j = 0; j < k; j += 8) {
        __m256 xv[2];
        UNROLL for (int t = 0; t < NT; t++)
            xv[t] = _mm256_loadu_ps(x0 + (size_t)t * (size_t)c->ldx + (size_t)j);
        UNROLL for (int i = 0; i < NR; i++) {
            __m256 w = _mm256_loadu_ps(wbuf + (size_t)i * (size_t)k + (size_t)j);
            UNROLL for (int t = 0; t < NT; t++)
                acc[i][t] = _mm256_fmadd_ps(w, xv[t], acc[i][t]);
        }
    }
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            c->y[(size_t)(t0 + t) * (size_t)c->ldy + (size_t)(r0 + i)] =
                lin_finish(c->W, acc[i][t], r0 + i, NULL);
}



static void lin_task_avx2(void *vc, int64_t b, int64_t e, int thread)
{
    const lin_ctx *c = vc;
    const linear *W = c->W;
    int int4 = W->kind == LINEAR_INT4;
    float *wbuf = NULL;
    if (int4 && c->m > 2 && c->p->scratch_floats >= 4 * (size_t)W->k)
        wbuf = c->p->scratch[thread];
    for (int64_t r = b; r < e;) {
        int NR = e - r >= 4 ? 4 : 1;
        int32_t r0 = (int32_t)r;
        if (wbuf)
            int4_decode_rows(&W->q, r0, NR, wbuf);
        for (int32_t t = 0; t < c->m;) {
            int NT = c->m - t >= 2 ? 2 : 1;
            if (wbuf) {
                if (NR == 4 && NT == 2) wbuf_tile(c, wbuf, r0, 4, t, 2);
                else if (NR == 4) wbuf_tile(c, wbuf, r0, 4, t, 1);
                else if (NT == 2) wbuf_tile(c, wbuf, r0, 1, t, 2);
                else wbuf_tile(c, wbuf, r0, 1, t, 1);
            } else if (int4) {
                if (NR == 4 && NT == 2) int4_tile(c, r0, 4, t, 2);
                else if (NR == 4) int4_tile(c, r0, 4, t, 1);
                else if (NT == 2) int4_tile(c, r0, 1, t, 2);
                else int4_tile(c, r0, 1, t, 1);
            } else {
#define DENSE_CASES(DT)                                                        \
                if (NR == 4 && NT == 2) dense_tile(c, DT, r0, 4, t, 2);       \
                else if (NR == 4) dense_tile(c, DT, r0, 4, t, 1);             \
                else if (NT == 2) dense_tile(c, DT, r0, 1, t, 2);             \
                else dense_tile(c, DT, r0, 1, t, 1);
                switch (W->dtype) {
                case ST_F32: DENSE_CASES(ST_F32) break;
                case ST_F16: DENSE_CASES(ST_F16) break;
                default: DENSE_CASES(ST_BF16) break;
                }
#undef DENSE_CASES
            }
            t += NT;
        }
        r += NR;
    }
}
#endif

void op_linear(cpu_pool *p, const linear *W, const float *x, int32_t ldx, int32_t m, float *y,
               int32_t ldy, float *scratch)
{
    if (m <= 0)
        return;
    lin_ctx c = {.p = p, .W = W, .x = x, .ldx = ldx, .m = m, .y = y, .ldy = ldy};
#if OPS_AVX2
    if (W->kind == LINEAR_INT4 && p->isa == CPU_ISA_AVX512) {
        ops_avx512_arrange_int4(&W->q, x, ldx, m, scratch);
        c.x = scratch;
        c.ldx = W->k;
    } else if (W->kind == LINEAR_INT4 && p->isa == CPU_ISA_AVX2) {
        /* per 16 packed columns: the 8 even ones, then the 8 odd ones (int4_w16),
         * with act-order's permutation folded in */
        const int32_t *perm = W->q.perm;
        for (int32_t t = 0; t < m; t++) {
            const float *xr = x + (size_t)t * (size_t)ldx;
            float *d = scratch + (size_t)t * (size_t)W->k;
            for (int32_t j = 0; j < W->k; j += 16)
                for (int32_t i = 0; i < 8; i++) {
                    d[j + i] = xr[perm ? perm[j + 2 * i] : j + 2 * i];
                    d[j + 8 + i] = xr[perm ? perm[j + 2 * i + 1] : j + 2 * i + 1];
                }
        }
        c.x = scratch;
        c.ldx = W->k;
    } else
#endif
    if (W->kind == LINEAR_INT4 && W->q.perm) {
        /* act-order: gather x into packed-column order once */
        for (int32_t t = 0; t < m; t++)
            for (int32_t j = 0; j < W->k; j++)
                scratch[(size_t)t * (size_t)W->k + (size_t)j] =
                    x[(size_t)t * (size_t)ldx + (size_t)W->q.perm[j]];
        c.x = scratch;
        c.ldx = W->k;
    }
    /* chunks of rows: a multiple of 4, about 4 chunks per thread */
    int64_t chunk = W->n / (4 * cpu_pool_threads(p));
    chunk = chunk < 4 ? 4 : (chunk + 3) & ~(int64_t)3;
#if OPS_AVX2
    if (p->isa == CPU_ISA_AVX512) {
        cpu_pool_run(p, ops_avx512_linear_task, &c, W->n, chunk);
        return;
    }
    if (p->isa == CPU_ISA_AVX2) {
        cpu_pool_run(p, lin_task_avx2, &c, W->n, chunk);
        return;
    }
#endif
    cpu_pool_run(p, lin_task_portable, &c, W->n, chunk);
}

/* ---- routing ---------------------------------------------------------------- */

void op_route(const float *logits, int32_t n_experts, int32_t top_k, int renorm, int32_t *ids,
              float *weights)
{
    float mx = logits[0];
    for (int32_t e = 1; e < n_experts; e++)
        mx = logits[e] > mx ? logits[e] : mx;
    float sum = 0.f;
    for (int32_t e = 0; e < n_experts; e++)
        sum += expf(logits[e] - mx);
    for (int32_t i = 0; i < top_k; i++) {
        int32_t best = -1;
        for (int32_t e = 0; e < n_experts; e++) {
            int taken = 0;
            for (int32_t j = 0; j < i; j++)
                taken |= ids[j] == e;
            if (!taken && (best < 0 || logits[e] > logits[best]))
                best = e;
        }
        ids[i] = best;
        weights[i] = expf(logits[best] - mx) / sum;
    }
    if (renorm) {
        float s = 0.f;
        for (int32_t i = 0; i < top_k; i++)
            s += weights[i];
        for (int32_t i = 0; i < top_k; i++)
            weights[i] /= s;
    }
}

/* ---- attention ---------------------------------------------------------------- */

static inline const float *kv_row(const op_kv_layer *kv, const float *base, const int32_t *table,
                                  int32_t pos, int32_t h)
{
    size_t slot = (size_t)table[pos / kv->block_size] * (size_t)kv->block_size +
                  (size_t)(pos % kv->block_size);
    return base + (slot * (size_t)kv->n_kv + (size_t)h) * (size_t)kv->head_dim;
}

void op_kv_store(const op_kv_layer *kv, const float *k, const float *v, int32_t n_rows,
                 const int32_t *pos, const int32_t *const *tables)
{
    size_t w = (size_t)kv->n_kv * (size_t)kv->head_dim;
    for (int32_t r = 0; r < n_rows; r++) {
        float *kd = (float *)kv_row(kv, kv->k, tables[r], pos[r], 0);
        float *vd = (float *)kv_row(kv, kv->v, tables[r], pos[r], 0);
        memcpy(kd, k + (size_t)r * w, w * sizeof(float));
        memcpy(vd, v + (size_t)r * w, w * sizeof(float));
    }
}

typedef struct attn_ctx {
    cpu_pool *p;
    float *out;
    const float *q;
    int32_t n_heads;
    const int32_t *pos;
    const int32_t *const *tables;
    const op_kv_layer *kv;
    float scale;
    float *scratch;
    int32_t max_ctx;
} attn_ctx;

static inline float dot(const float *a, const float *b, int32_t n)
{
#if OPS_AVX2
    if (n % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int32_t i = 0; i < n; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        return hsum8(acc);
    }
#endif
    float s = 0.f;
    for (int32_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* o[i] += a * v[i] (a product, then a sum: the same floats either way). */
static inline void axpy(float *o, float a, const float *v, int32_t n)
{
#if OPS_AVX2
    if (n % 8 == 0) {
        __m256 av = _mm256_set1_ps(a);
        for (int32_t i = 0; i < n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(o + i),
                                                  _mm256_mul_ps(av, _mm256_loadu_ps(v + i))));
        return;
    }
#endif
    for (int32_t i = 0; i < n; i++)
        o[i] += a * v[i];
}

static void attn_task(void *vc, int64_t b, int64_t e, int thread)
{
    const attn_ctx *c = vc;
    const op_kv_layer *kv = c->kv;
    int32_t D = kv->head_dim, group = c->n_heads / kv->n_kv;
    float *s = c->scratch + (size_t)thread * (size_t)c->max_ctx;
    for (int64_t it = b; it < e; it++) {
        int32_t r = (int32_t)(it / c->n_heads), h = (int32_t)(it % c->n_heads), kvh = h / group;
        const float *q = c->q + ((size_t)r * (size_t)c->n_heads + (size_t)h) * (size_t)D;
        float *o = c->out + ((size_t)r * (size_t)c->n_heads + (size_t)h) * (size_t)D;
        int32_t n = c->pos[r] + 1;
        float mx = -INFINITY;
        for (int32_t j = 0; j < n; j++) {
            s[j] = dot(q, kv_row(kv, kv->k, c->tables[r], j, kvh), D) * c->scale;
            mx = s[j] > mx ? s[j] : mx;
        }
        float sum = 0.f;
        for (int32_t j = 0; j < n; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        memset(o, 0, (size_t)D * sizeof *o);
        for (int32_t j = 0; j < n; j++) {
            float pj = s[j] / sum;
            axpy(o, pj, kv_row(kv, kv->v, c->tables[r], j, kvh), D);
        }
    }
}

void op_attention(cpu_pool *p, float *out, const float *q, int32_t n_rows, int32_t n_heads,
                  const int32_t *pos, const int32_t *const *tables, const op_kv_layer *kv,
                  float scale, float *scratch, int32_t max_ctx)
{
    attn_ctx c = {p, out, q, n_heads, pos, tables, kv, scale, scratch, max_ctx};
    cpu_pool_run(p, attn_task, &c, (int64_t)n_rows * n_heads, 1);
}
