/*
 * test_ops.c: every CPU operator against a plain double-precision
 * reference written here from the documented formula, on awkward sizes,
 * with the AVX2 and the portable kernels and 1 or 3 threads; plus the
 * batch-invariance property (a row's result does not depend on m).
 */
#include "engine/half.h"
#include "engine/ops_cpu.h"
#include "tests/engine/check.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rs = 88172645463325252ull;
static double urand(void)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (double)(rs >> 11) / 9007199254740992.0;
}
static float frand(void) { return (float)(urand() * 2 - 1); }

static double max_rel(const float *a, const float *b, size_t n)
{
    double mx = 0, ref = 1e-6;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        mx = d > mx || isnan(d) ? d : mx;
        ref = fabs(b[i]) > ref ? fabs(b[i]) : ref;
    }
    return mx / ref;
}

/* Compare op_linear with op_linear_naive for m in a few awkward values,
 * and check that row results are independent of m (bitwise). */
static void check_linear(cpu_pool *p, const linear *W, const char *what)
{
    int32_t ms[] = {1, 2, 3, 5, 9, 17};
    int32_t M = 17;
    float *x = malloc(sizeof(float) * (size_t)M * (size_t)W->k);
    float *y = malloc(sizeof(float) * (size_t)M * (size_t)W->n);
    float *y1 = malloc(sizeof(float) * (size_t)W->n);
    float *yr = malloc(sizeof(float) * (size_t)M * (size_t)W->n);
    float *scr = malloc(sizeof(float) * (op_linear_scratch(W, M) + 1));
    for (int32_t i = 0; i < M * W->k; i++)
        x[i] = frand();
    op_linear_naive(W, x, M, yr);
    for (size_t t = 0; t < sizeof ms / sizeof *ms; t++) {
        int32_t m = ms[t];
        op_linear(p, W, x, W->k, m, y, W->n, scr);
        double e = max_rel(y, yr, (size_t)m * (size_t)W->n);
        if (e > 1e-5)
            fprintf(stderr, "%s m=%d: rel error %g\n", what, m, e);
        CHECK(e <= 1e-5);
        for (int32_t r = 0; r < m; r++) { /* row r alone == row r in the batch */
            op_linear(p, W, x + (size_t)r * (size_t)W->k, W->k, 1, y1, W->n, scr);
            CHECK(!memcmp(y1, y + (size_t)r * (size_t)W->n, sizeof(float) * (size_t)W->n));
        }
    }
    free(x);
    free(y);
    free(y1);
    free(yr);
    free(scr);
}

/* One INT4 layer n x k, group g: random codes, zeros 1..16 and scales; with
 * and without an act-order permutation and a bias; `unit` also checks one
 * weight of the naive reference against the int4.h formula by hand. */
static void int4_case(cpu_pool *p, int32_t n, int32_t k, int32_t g, const float *bias, int unit)
{
    int32_t ng = k / g;
    uint8_t *qs = calloc((size_t)n * (size_t)k / 2, 1), *zeros = malloc((size_t)n * (size_t)ng);
    uint16_t *sc = malloc(2 * (size_t)n * (size_t)ng);
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)k);
    float *x = calloc((size_t)k, sizeof(float));
    for (size_t i = 0; i < (size_t)n * (size_t)k / 2; i++)
        qs[i] = (uint8_t)(urand() * 256);
    for (size_t i = 0; i < (size_t)n * (size_t)ng; i++) {
        zeros[i] = (uint8_t)(1 + urand() * 16); /* 1..16 as GPTQ v1 gives */
        sc[i] = float_to_fp16((float)(0.01 + 0.05 * urand()));
    }
    for (int32_t j = 0; j < k; j++)
        perm[j] = j;
    for (int32_t j = k - 1; j > 0; j--) {
        int32_t s = (int32_t)(urand() * (j + 1)), t = perm[j];
        perm[j] = perm[s];
        perm[s] = t;
    }
    char what[64];
    linear Q = {.kind = LINEAR_INT4, .n = n, .k = k};
    Q.q = (int4_matrix){.n = n, .k = k, .group = g, .qs = qs, .scales = sc, .zeros = zeros};
    snprintf(what, sizeof what, "int4 %dx%d g%d", n, k, g);
    check_linear(p, &Q, what);
    Q.q.perm = perm;
    Q.bias = Q.q.bias = bias;
    snprintf(what, sizeof what, "int4 act-order %dx%d g%d", n, k, g);
    check_linear(p, &Q, what);
    if (unit) { /* the naive reference follows the int4.h formula element by element */
        float y;
        x[5] = 1.f;
        linear one = Q;
        one.n = 1;
        one.q.n = 1;
        one.bias = one.q.bias = NULL;
        op_linear_naive(&one, x, 1, &y);
        int32_t j5 = 0;
        while (perm[j5] != 5)
            j5++;
        int qv = (j5 & 1) ? qs[j5 / 2] >> 4 : qs[j5 / 2] & 15;
        CHECK(y == fp16_to_float(sc[j5 / g]) * (float)(qv - zeros[j5 / g]));
    }
    free(qs);
    free(zeros);
    free(sc);
    free(perm);
    free(x);
}

/* Every kernel set's INT4 weight is exactly the int4.h value: with x one-hot
 * at column j (no bias), y[r] is w(r, j) alone, so it must equal
 * fp16_to_float(scale) * (q - zero) bit for bit (as floats: +0 == -0).
 * Scales are random fp16 patterns of both signs, subnormals included (no
 * inf/NaN), zeros 0..16; m = 3 takes the decoded-rows path where the pool
 * has the scratch for it. K / group = 15 and 16 groups: the AVX2 kernel
 * reads group parameters 8 at a time, a row's last ones copied. */
static void int4_exact_case(cpu_pool *p, int32_t n, int32_t k, int32_t g)
{
    int32_t ng = k / g, M = 3;
    uint8_t *qs = malloc((size_t)n * (size_t)k / 2), *zeros = malloc((size_t)n * (size_t)ng);
    uint16_t *sc = malloc(2 * (size_t)n * (size_t)ng);
    float *x = calloc((size_t)M * (size_t)k, sizeof(float));
    float *y = malloc(sizeof(float) * (size_t)M * (size_t)n);
    float *scr = malloc(sizeof(float) * (op_linear_scratch(&(linear){.kind = LINEAR_INT4, .n = n,
                                                                      .k = k}, M) + 1));
    for (size_t i = 0; i < (size_t)n * (size_t)k / 2; i++)
        qs[i] = (uint8_t)(urand() * 256);
    for (size_t i = 0; i < (size_t)n * (size_t)ng; i++) {
        zeros[i] = (uint8_t)(urand() * 17);
        uint16_t h;
        do
            h = (uint16_t)(urand() * 65536);
        while ((h & 0x7c00u) == 0x7c00u);
        sc[i] = h;
    }
    linear Q = {.kind = LINEAR_INT4, .n = n, .k = k};
    Q.q = (int4_matrix){.n = n, .k = k, .group = g, .qs = qs, .scales = sc, .zeros = zeros};
    int bad = 0;
    for (int32_t j0 = 0; j0 < k && !bad; j0 += 7) {
        int32_t js[3] = {j0, (j0 + 1) % k, (k - 1 - j0 + k) % k};
        memset(x, 0, sizeof(float) * (size_t)M * (size_t)k);
        for (int32_t t = 0; t < M; t++)
            x[(size_t)t * (size_t)k + (size_t)js[t]] = 1.f;
        for (int32_t m = 1; m <= M; m += 2) {
            op_linear(p, &Q, x, k, m, y, n, scr);
            for (int32_t t = 0; t < m; t++)
                for (int32_t r = 0; r < n; r++) {
                    int32_t j = js[t];
                    uint8_t b = qs[(size_t)r * (size_t)k / 2 + (size_t)j / 2];
                    int qv = (j & 1) ? b >> 4 : b & 15;
                    size_t gi = (size_t)r * (size_t)ng + (size_t)(j / g);
                    float want = fp16_to_float(sc[gi]) * (float)(qv - zeros[gi]);
                    if (y[(size_t)t * (size_t)n + (size_t)r] != want && !bad++)
                        fprintf(stderr, "int4 exact %dx%d g%d m=%d row %d col %d: %a != %a\n",
                                n, k, g, m, r, j, y[(size_t)t * (size_t)n + (size_t)r], want);
                }
        }
    }
    CHECK(!bad);
    free(qs);
    free(zeros);
    free(sc);
    free(x);
    free(y);
    free(scr);
}

/* Dense n x k in every dtype, with a bias except for bf16. */
static void dense_case(cpu_pool *p, int32_t n, int32_t k)
{
    float *wf = malloc(sizeof(float) * (size_t)n * (size_t)k);
    uint16_t *wh = malloc(2 * (size_t)n * (size_t)k), *wb = malloc(2 * (size_t)n * (size_t)k);
    float *bias = malloc(sizeof(float) * (size_t)n);
    for (int32_t i = 0; i < n * k; i++) {
        wf[i] = frand();
        wh[i] = float_to_fp16(wf[i]);
        wb[i] = float_to_bf16(wf[i]);
    }
    for (int32_t i = 0; i < n; i++)
        bias[i] = frand();
    linear W = {.kind = LINEAR_DENSE, .n = n, .k = k, .dtype = ST_F32, .w = wf, .bias = bias};
    check_linear(p, &W, "dense f32");
    W.dtype = ST_F16;
    W.w = wh;
    check_linear(p, &W, "dense f16");
    W.dtype = ST_BF16;
    W.w = wb;
    W.bias = NULL;
    check_linear(p, &W, "dense bf16");
    free(wf);
    free(wh);
    free(wb);
    free(bias);
}

static void test_linear(cpu_pool *p)
{
    /* dense: K not a multiple of 8 or 16, K below one vector; N not a
     * multiple of 4 */
    dense_case(p, 37, 83);
    dense_case(p, 6, 15);
    dense_case(p, 3, 40);
    /* INT4, with and without act-order: groups of 32 (K = 96: not a multiple
     * of 64; K = 32: one block), 64, and 128 and 256 (the AVX-512 kernel's
     * wide layout; K = 384: three groups); N not a multiple of 4 */
    float bias[37];
    for (int32_t i = 0; i < 37; i++)
        bias[i] = frand();
    int4_case(p, 37, 96, 32, bias, 1);
    int4_case(p, 17, 32, 32, bias, 0);
    int4_case(p, 37, 192, 64, bias, 0);
    int4_case(p, 37, 384, 128, bias, 1);
    int4_case(p, 5, 512, 256, bias, 0);
    /* 16 and 15 groups of 32 (group parameters read 8 at a time by the AVX2
     * kernel); K <= 512 so the 3-thread pool's scratch covers m > 2 */
    int4_case(p, 9, 512, 32, bias, 0);
    int4_case(p, 9, 480, 32, bias, 0);
    int4_exact_case(p, 9, 512, 32);
    int4_exact_case(p, 6, 480, 32);
}

static void test_rows(void)
{
    /* rmsnorm, dim 77 */
    int32_t R = 3, Dm = 77;
    float x[3 * 77], w[77], o[3 * 77];
    for (int i = 0; i < R * Dm; i++)
        x[i] = frand() * 3;
    for (int i = 0; i < Dm; i++)
        w[i] = frand();
    op_rmsnorm(o, x, w, R, Dm, 1e-6f);
    for (int r = 0; r < R; r++) {
        double ss = 0;
        for (int i = 0; i < Dm; i++)
            ss += (double)x[r * Dm + i] * x[r * Dm + i];
        double inv = 1 / sqrt(ss / Dm + 1e-6);
        for (int i = 0; i < Dm; i++)
            CHECK(fabs(o[r * Dm + i] - w[i] * x[r * Dm + i] * inv) < 1e-5);
    }
    /* rope: head_dim 6 (odd half), 3 heads, positions 0, 7, 1000 */
    int32_t H = 3, D = 6, pos[3] = {0, 7, 1000};
    float q[3 * 3 * 6], q0[3 * 3 * 6], inv[3];
    for (int i = 0; i < 3 * H * D; i++)
        q0[i] = q[i] = frand();
    op_rope_inv_freq(inv, D, 10000.f);
    for (int i = 0; i < 3; i++)
        CHECK(fabs(inv[i] - pow(10000.0, -2.0 * i / D)) < 1e-6 * fabs(inv[i]) + 1e-9);
    op_rope(q, 3, H, D, pos, inv);
    for (int r = 0; r < 3; r++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < D / 2; i++) {
                const float *a = q0 + (r * H + h) * D;
                const float *b = q + (r * H + h) * D;
                double ang = (double)((float)pos[r] * inv[i]);
                CHECK(fabs(b[i] - (a[i] * cos(ang) - a[i + 3] * sin(ang))) < 1e-5);
                CHECK(fabs(b[i + 3] - (a[i + 3] * cos(ang) + a[i] * sin(ang))) < 1e-5);
            }
    /* silu * mul */
    float g[5] = {-3, -0.5f, 0, 0.5f, 4}, u[5] = {1, 2, 3, 4, 5};
    op_silu_mul(g, u, 5);
    float g0[5] = {-3, -0.5f, 0, 0.5f, 4};
    for (int i = 0; i < 5; i++)
        CHECK(fabs(g[i] - g0[i] / (1 + exp(-g0[i])) * u[i]) < 1e-6);
}

static void test_route(void)
{
    float l[7] = {0.1f, 2.0f, -1.0f, 2.0f, 0.5f, 1.5f, -3.f};
    int32_t ids[3];
    float w[3];
    op_route(l, 7, 3, 0, ids, w);
    double z = 0;
    for (int e = 0; e < 7; e++)
        z += exp(l[e]);
    CHECK(ids[0] == 1 && ids[1] == 3 && ids[2] == 5); /* tie 1/3: lower id first */
    CHECK(fabs(w[0] - exp(2.0) / z) < 1e-6 && fabs(w[2] - exp(1.5) / z) < 1e-6);
    op_route(l, 7, 3, 1, ids, w);
    /* renormalised == softmax over the selected logits (mixtral's definition) */
    double zk = 2 * exp(2.0) + exp(1.5);
    CHECK(fabs(w[0] - exp(2.0) / zk) < 1e-6 && fabs(w[2] - exp(1.5) / zk) < 1e-6);
    CHECK(fabs(w[0] + w[1] + w[2] - 1) < 1e-6);
}

/* Paged attention vs a dense reference: 6 heads over 2 KV heads (GQA 3),
 * head_dim 12 (not a multiple of 8) and 16, block size 3, scattered blocks. */
static void test_attention(cpu_pool *p, int32_t D)
{
    int32_t nh = 6, nkv = 2, bs = 3, nb = 20, len = 17;
    float *kc = calloc((size_t)nb * bs * nkv * D, 4), *vc = calloc((size_t)nb * bs * nkv * D, 4);
    float *K = malloc(sizeof(float) * len * nkv * D), *V = malloc(sizeof(float) * len * nkv * D);
    float *q = malloc(sizeof(float) * len * nh * D), *out = malloc(sizeof(float) * len * nh * D);
    int32_t table[7] = {13, 2, 19, 7, 0, 11, 5}, pos[17];
    const int32_t *tabs[17];
    for (int i = 0; i < len * nkv * D; i++) {
        K[i] = frand();
        V[i] = frand();
    }
    for (int i = 0; i < len * nh * D; i++)
        q[i] = frand() * 2;
    for (int t = 0; t < len; t++) {
        pos[t] = t;
        tabs[t] = table;
    }
    op_kv_layer kv = {kc, vc, bs, nkv, D};
    op_kv_store(&kv, K, V, len, pos, tabs);
    float *scr = malloc(sizeof(float) * (size_t)cpu_pool_threads(p) * nb * bs);
    float scale = 1.f / sqrtf((float)D);
    op_attention(p, out, q, len, nh, pos, tabs, &kv, scale, scr, nb * bs);
    double worst = 0;
    for (int t = 0; t < len; t++)
        for (int h = 0; h < nh; h++) {
            int kh = h / 3;
            double s[17], mx = -1e30, sum = 0;
            for (int j = 0; j <= t; j++) {
                double d = 0;
                for (int i = 0; i < D; i++)
                    d += (double)q[(t * nh + h) * D + i] * K[(j * nkv + kh) * D + i];
                s[j] = d * scale;
                mx = s[j] > mx ? s[j] : mx;
            }
            for (int j = 0; j <= t; j++)
                sum += (s[j] = exp(s[j] - mx));
            for (int i = 0; i < D; i++) {
                double o = 0;
                for (int j = 0; j <= t; j++)
                    o += s[j] / sum * V[(j * nkv + kh) * D + i];
                double e = fabs(o - out[(t * nh + h) * D + i]);
                worst = e > worst ? e : worst;
            }
        }
    if (worst > 1e-5)
        fprintf(stderr, "attention D=%d: max error %g\n", D, worst);
    CHECK(worst <= 1e-5);
    free(kc);
    free(vc);
    free(K);
    free(V);
    free(q);
    free(out);
    free(scr);
}

static void test_rtn(void)
{
    int32_t n = 5, k = 64, g = 32;
    float w[5 * 64];
    uint8_t qs[5 * 32], z[10];
    uint16_t sc[10];
    for (int i = 0; i < n * k; i++)
        w[i] = frand() * (1 + i % 7);
    lm_err err = {0};
    CHECK(int4_quantize_rtn(w, n, k, g, qs, sc, z, &err) == 0);
    int4_matrix m = {.n = n, .k = k, .group = g, .qs = qs, .scales = sc, .zeros = z};
    for (int r = 0; r < n; r++)
        for (int j = 0; j < k; j++) {
            float s = fp16_to_float(sc[r * 2 + j / g]);
            float d = s * (float)(int4_get(&m, r, j) - z[r * 2 + j / g]);
            CHECK(fabs(d - w[r * k + j]) <= s * 0.5f + 1e-6f);
        }
    CHECK_ERR(int4_quantize_rtn(w, n, k, 48, qs, sc, z, &err), err, -EINVAL, "group 48");
}

/* The pool runs every item of every job exactly once, jobs back to back. */
typedef struct pool_job {
    int hits[64];
} pool_job;

static void count_task(void *ctx, int64_t b, int64_t e, int thread)
{
    pool_job *j = ctx;
    for (int64_t i = b; i < e; i++)
        __atomic_add_fetch(&j->hits[i], 1, __ATOMIC_RELAXED);
}

static void test_pool(cpu_pool *p)
{
    for (int it = 0; it < 3000; it++) {
        pool_job j;
        memset(&j, 0, sizeof j);
        int64_t n = 1 + it % 64, chunk = 1 + it % 5;
        cpu_pool_run(p, count_task, &j, n, chunk);
        for (int64_t i = 0; i < 64; i++)
            if (j.hits[i] != (i < n)) {
                CHECK(j.hits[i] == (i < n));
                return;
            }
    }
}

int main(void)
{
    lm_err err = {0};
    cpu_pool *p1, *p3;
    if (cpu_pool_create(1, &p1, &err) || cpu_pool_create(3, &p3, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    CHECK(cpu_pool_reserve(p3, 4 * 512, &err) == 0);
    test_pool(p3);
    /* every kernel set this CPU has (AVX-512 only where the CPU has it) */
    for (int isa = CPU_ISA_PORTABLE; isa <= (int)cpu_isa_best(); isa++) {
        cpu_pool_set_isa(p1, (cpu_isa)isa);
        cpu_pool_set_isa(p3, (cpu_isa)isa);
        CHECK(cpu_pool_isa(p1) == (cpu_isa)isa && cpu_pool_isa(p3) == (cpu_isa)isa);
        fprintf(stderr, "kernels: %s\n", cpu_isa_name((cpu_isa)isa));
        test_linear(p1);
        test_linear(p3);
    }
    cpu_pool_set_portable(p1, 1);
    CHECK(cpu_pool_portable(p1) && cpu_pool_isa(p1) == CPU_ISA_PORTABLE);
    cpu_pool_set_portable(p1, 0);
    CHECK(cpu_pool_isa(p1) == cpu_isa_best());
    test_rows();
    test_route();
    test_attention(p3, 12);
    test_attention(p1, 16);
    test_rtn();
    cpu_pool_destroy(p1);
    cpu_pool_destroy(p3);
    CHECK_DONE();
}
