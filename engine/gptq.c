/*
 * gptq.c: GPTQ and RTN 4-bit quantization of one Linear (see gptq.h).
 *
 * Working precision is double for H, its inverse factor and the weights
 * being updated (K is at most a few thousand, so the cost is small and the
 * Cholesky factorizations stay well conditioned); the dequantized result is
 * float32 computed as fp16(scale) * (q - zero), the same expression the
 * checkpoint decodes to.
 */
#include "engine/gptq.h"
#include "engine/gptq_int.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define GPTQ_MAXQ 15
#define GPTQ_DAMP_RETRIES 5

/* ---- fp16 ------------------------------------------------------------- */

uint16_t gptq_fp16_from_float(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (absx < 0x38800000u) { /* below 2^-14: subnormal half (or zero) */
        /* value = absx as float; half subnormal unit is 2^-24 */
        float a;
        memcpy(&a, &absx, 4);
        float m = nearbyintf(a * 16777216.0f); /* / 2^-24, ties to even */
        return (uint16_t)(sign | (uint32_t)m);
    }
    /* normal: rebias exponent 127 -> 15, round mantissa 23 -> 10 bits */
    uint32_t mant = absx & 0x7fffffu;
    uint32_t exp = (absx >> 23) - 112u;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++; /* may carry into the exponent, which is the right result */
    return (uint16_t)(sign | h);
}

float gptq_fp16_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 31u;
    uint32_t mant = h & 0x3ffu;
    float f;
    if (exp == 0) {
        f = ldexpf((float)mant, -24);
        uint32_t b;
        memcpy(&b, &f, 4);
        b |= sign;
        memcpy(&f, &b, 4);
        return f;
    }
    uint32_t b = exp == 31 ? (sign | 0x7f800000u | (mant << 13))
                           : (sign | ((exp + 112u) << 23) | (mant << 13));
    memcpy(&f, &b, 4);
    return f;
}

/* ---- Hessian ---------------------------------------------------------- */

int gptq_hessian_init(gptq_hessian *h, int32_t k, lm_err *err)
{
    memset(h, 0, sizeof *h);
    if (k <= 0)
        return lm_err_set(err, -EINVAL, "gptq: Hessian size %d must be positive", k);
    h->s = calloc((size_t)k * (size_t)k, sizeof(double));
    if (!h->s)
        return lm_err_set(err, -ENOMEM, "gptq: out of memory for a %dx%d Hessian", k, k);
    h->k = k;
    return 0;
}

void gptq_hessian_add(gptq_hessian *h, const float *x, int64_t rows, int64_t ld)
{
    enum { CHUNK = 256 };
    int32_t k = h->k;
    double *buf = malloc(sizeof(double) * CHUNK * (size_t)k);
    if (!buf) { /* fall back to rank-1 updates: slow but correct */
        for (int64_t r = 0; r < rows; r++)
            for (int32_t i = 0; i < k; i++)
                for (int32_t j = i; j < k; j++)
                    h->s[(size_t)i * k + j] += (double)x[r * ld + i] * x[r * ld + j];
        h->n += rows;
        return;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += CHUNK) {
        int64_t m = rows - r0 < CHUNK ? rows - r0 : CHUNK;
        for (int64_t r = 0; r < m; r++)
            for (int32_t i = 0; i < k; i++)
                buf[r * k + i] = x[(r0 + r) * ld + i];
        /* upper triangle of S += buf^T buf */
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, k, (int)m, 1.0, buf, k, 1.0, h->s, k);
    }
    free(buf);
    h->n += rows;
}

void gptq_hessian_merge(gptq_hessian *h, const gptq_hessian *other)
{
    size_t kk = (size_t)h->k * (size_t)h->k;
    for (size_t i = 0; i < kk; i++)
        h->s[i] += other->s[i];
    h->n += other->n;
}

void gptq_hessian_free(gptq_hessian *h)
{
    if (!h)
        return;
    free(h->s);
    memset(h, 0, sizeof *h);
}

/* ---- scale / zero of one group ------------------------------------------ */

typedef gptq_qparam qparam; /* see gptq_int.h */

/* AutoGPTQ's find_params for one row over `len` values x[0], x[stride], ...,
 * range including 0. Asym zero 0 cannot be stored in v1 (zero-1 = -1), so
 * a group whose zero rounds to 0 is re-fitted with zero 1 and scale
 * xmax/14, which keeps xmax representable. */
static qparam find_params(const double *x, size_t stride, int32_t len, int sym)
{
    double xmin = 0, xmax = 0;
    for (int32_t i = 0; i < len; i++) {
        double v = x[(size_t)i * stride];
        if (v < xmin)
            xmin = v;
        if (v > xmax)
            xmax = v;
    }
    if (sym) {
        double a = fmax(-xmin, xmax);
        xmax = a;
        if (xmin < 0)
            xmin = -a;
    }
    if (xmin == 0 && xmax == 0) {
        xmin = -1;
        xmax = 1;
    }
    qparam p;
    double scale = (xmax - xmin) / GPTQ_MAXQ;
    if (sym) {
        p.zero = (GPTQ_MAXQ + 1) / 2;
    } else {
        double z = nearbyint(-xmin / scale);
        if (z < 1) {
            z = 1;
            scale = xmax / (GPTQ_MAXQ - 1);
        }
        p.zero = (int)(z > GPTQ_MAXQ ? GPTQ_MAXQ : z);
    }
    p.scale16 = gptq_fp16_from_float((float)scale);
    if ((p.scale16 & 0x7fffu) == 0)
        p.scale16 = 1; /* smallest positive half: never divide by zero */
    p.scale = gptq_fp16_to_float(p.scale16);
    return p;
}

static inline int quant_one(double w, const qparam *p)
{
    double q = nearbyint(w / p->scale) + p->zero;
    return q < 0 ? 0 : q > GPTQ_MAXQ ? GPTQ_MAXQ : (int)q;
}

static inline float dequant_one(int q, const qparam *p)
{
    return p->scale * (float)(q - p->zero);
}

/* ---- packing ---------------------------------------------------------- */

void gptq_params_default(gptq_params *p)
{
    p->method = GPTQ_METHOD_GPTQ;
    p->group = 128;
    p->sym = 1;
    p->act_order = 0;
    p->percdamp = 0.01;
    p->blocksize = 128;
}

void gptq_result_free(gptq_result *r)
{
    if (!r)
        return;
    free(r->qweight);
    free(r->qzeros);
    free(r->scales);
    free(r->g_idx);
    free(r->deq);
    memset(r, 0, sizeof *r);
}

static int result_alloc(gptq_result *r, int32_t n, int32_t k, int32_t group, lm_err *err)
{
    memset(r, 0, sizeof *r);
    size_t ng = (size_t)(k / group);
    r->n = n;
    r->k = k;
    r->group = group;
    r->qweight = calloc((size_t)(k / 8) * n, sizeof(int32_t));
    r->qzeros = calloc(ng * (size_t)(n / 8), sizeof(int32_t));
    r->scales = calloc(ng * n, sizeof(uint16_t));
    r->g_idx = calloc((size_t)k, sizeof(int32_t));
    r->deq = calloc((size_t)n * k, sizeof(float));
    if (!r->qweight || !r->qzeros || !r->scales || !r->g_idx || !r->deq) {
        gptq_result_free(r);
        return lm_err_set(err, -ENOMEM, "gptq: out of memory for a %dx%d result", n, k);
    }
    return 0;
}

/* Store q (original column order) and the group's parameters. */
static void pack_q(gptq_result *r, int32_t row, int32_t col, int q)
{
    uint32_t *qw = (uint32_t *)r->qweight;
    qw[(size_t)(col / 8) * r->n + row] |= (uint32_t)q << (4 * (col % 8));
}

static void pack_group(gptq_result *r, int32_t grp, int32_t row, const qparam *p)
{
    uint32_t *qz = (uint32_t *)r->qzeros;
    qz[(size_t)grp * (r->n / 8) + row / 8] |= (uint32_t)(p->zero - 1) << (4 * (row % 8));
    r->scales[(size_t)grp * r->n + row] = p->scale16;
}

int gptq_unpack(const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
                const int32_t *g_idx, int32_t n, int32_t k, int32_t group, float *ret_w,
                lm_err *err)
{
    int32_t ng = k / group;
    for (int32_t c = 0; c < k; c++) {
        int32_t g = g_idx ? g_idx[c] : c / group;
        if (g < 0 || g >= ng)
            return lm_err_set(err, -EINVAL, "gptq: g_idx[%d] = %d outside [0, %d)", c, g, ng);
        for (int32_t r = 0; r < n; r++) {
            uint32_t qw = (uint32_t)qweight[(size_t)(c / 8) * n + r];
            int q = (int)((qw >> (4 * (c % 8))) & 15u);
            uint32_t qz = (uint32_t)qzeros[(size_t)g * (n / 8) + r / 8];
            int z = (int)((qz >> (4 * (r % 8))) & 15u) + 1;
            float s = gptq_fp16_to_float(scales[(size_t)g * n + r]);
            ret_w[(size_t)r * k + c] = s * (float)(q - z);
        }
    }
    return 0;
}

/* ---- RTN -------------------------------------------------------------- */

static void quantize_rtn(const float *w, gptq_result *r, int sym)
{
    int32_t n = r->n, k = r->k, g = r->group;
    double *row = malloc(sizeof(double) * (size_t)g);
    for (int32_t c = 0; c < k; c++)
        r->g_idx[c] = c / g;
    for (int32_t i = 0; i < n; i++) {
        for (int32_t c0 = 0; c0 < k; c0 += g) {
            for (int32_t j = 0; j < g; j++)
                row[j] = w[(size_t)i * k + c0 + j];
            qparam p = find_params(row, 1, g, sym);
            pack_group(r, c0 / g, i, &p);
            for (int32_t j = 0; j < g; j++) {
                int q = quant_one(row[j], &p);
                pack_q(r, i, c0 + j, q);
                r->deq[(size_t)i * k + c0 + j] = dequant_one(q, &p);
            }
        }
    }
    free(row);
}

/* ---- GPTQ ------------------------------------------------------------- */

typedef gptq_diag_idx diag_idx;

static int cmp_diag_desc(const void *a, const void *b)
{
    const diag_idx *x = a, *y = b;
    if (x->d != y->d)
        return x->d < y->d ? 1 : -1;
    return x->i - y->i; /* stable: ties keep input order */
}

/* Shared by the CPU and the CUDA paths (gptq_int.h): H = 2 S / n, the
 * act-order permutation, dead inputs, permuted copies of W and H. */
double gptq_int_prepare(const float *w, const gptq_hessian *hs, int act_order, int32_t n,
                        int32_t k, double *h, double *u, double *wp, int32_t *perm,
                        gptq_diag_idx *di)
{
    size_t kk = (size_t)k * k;
    /* H = 2 S / n, symmetric from the stored upper triangle */
    double sc = 2.0 / (double)hs->n;
    for (int32_t i = 0; i < k; i++)
        for (int32_t j = i; j < k; j++)
            h[(size_t)i * k + j] = h[(size_t)j * k + i] = sc * hs->s[(size_t)i * k + j];

    /* act-order: process inputs by diag(H) descending (largest activations
     * first); dead inputs (never non-zero) keep H_ii = 1 and weight 0 below */
    for (int32_t i = 0; i < k; i++) {
        di[i].d = h[(size_t)i * k + i];
        di[i].i = i;
    }
    if (act_order)
        qsort(di, (size_t)k, sizeof *di, cmp_diag_desc);
    for (int32_t j = 0; j < k; j++)
        perm[j] = di[j].i;

    /* permuted copies: wp[r][j] = w[r][perm[j]], u (scratch) = H[perm][perm] */
    for (int32_t j = 0; j < k; j++) {
        int32_t pj = perm[j];
        int is_dead = h[(size_t)pj * k + pj] == 0;
        for (int32_t rr = 0; rr < n; rr++)
            wp[(size_t)rr * k + j] = is_dead ? 0.0 : (double)w[(size_t)rr * k + pj];
        for (int32_t i = 0; i < k; i++)
            u[(size_t)j * k + i] = h[(size_t)pj * k + perm[i]];
        if (is_dead)
            u[(size_t)j * k + j] = 1;
    }
    memcpy(h, u, sizeof(double) * kk);
    double mean_diag = 0;
    for (int32_t i = 0; i < k; i++)
        mean_diag += h[(size_t)i * k + i];
    mean_diag /= k;
    return mean_diag;
}

/* Upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U) into u [k][k];
 * retries with 10x damping when H + damp I is not positive definite. */
static int hinv_upper(const double *h, int32_t k, double damp, double *u, double *ret_damp,
                      lm_err *err)
{
    for (int attempt = 0; attempt <= GPTQ_DAMP_RETRIES; attempt++, damp *= 10) {
        memcpy(u, h, sizeof(double) * (size_t)k * k);
        for (int32_t i = 0; i < k; i++)
            u[(size_t)i * k + i] += damp;
        if (LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'L', k, u, k) != 0)
            continue;
        if (LAPACKE_dpotri(LAPACK_ROW_MAJOR, 'L', k, u, k) != 0)
            continue;
        for (int32_t i = 0; i < k; i++) /* mirror the lower inverse upwards */
            for (int32_t j = i + 1; j < k; j++)
                u[(size_t)i * k + j] = u[(size_t)j * k + i];
        if (LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'U', k, u, k) != 0)
            continue;
        for (int32_t i = 0; i < k; i++)
            for (int32_t j = 0; j < i; j++)
                u[(size_t)i * k + j] = 0;
        *ret_damp = damp;
        return 0;
    }
    return lm_err_set(err, -EDOM,
                      "gptq: Hessian (%dx%d) not positive definite even with damping %g", k, k,
                      damp / 10);
}

static int quantize_gptq(const float *w, const gptq_hessian *hs, const gptq_params *prm,
                         gptq_result *r, lm_err *err)
{
    int32_t n = r->n, k = r->k, g = r->group;
    size_t kk = (size_t)k * k;
    int rc = 0;
    double *h = malloc(sizeof(double) * kk);
    double *u = malloc(sizeof(double) * kk);
    double *wp = malloc(sizeof(double) * (size_t)n * k);
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)k);
    diag_idx *di = malloc(sizeof(diag_idx) * (size_t)k);
    int *qint = malloc(sizeof(int) * (size_t)n * k);
    qparam *gp = malloc(sizeof(qparam) * (size_t)n);
    int32_t bs = prm->blocksize > 0 ? prm->blocksize : 128;
    bs = (bs + g - 1) / g * g; /* a block never splits a group */
    double *err1 = malloc(sizeof(double) * (size_t)n * bs);
    if (!h || !u || !wp || !perm || !di || !qint || !gp || !err1) {
        rc = lm_err_set(err, -ENOMEM, "gptq: out of memory for a %dx%d layer", n, k);
        goto out;
    }

    double mean_diag = gptq_int_prepare(w, hs, prm->act_order, n, k, h, u, wp, perm, di);
    rc = hinv_upper(h, k, prm->percdamp * mean_diag, u, &r->damp_used, err);
    if (rc)
        goto out;

    for (int32_t i1 = 0; i1 < k; i1 += bs) {
        int32_t i2 = i1 + bs < k ? i1 + bs : k, cnt = i2 - i1;
        for (int32_t i = 0; i < cnt; i++) {
            int32_t col = i1 + i;
            double d = u[(size_t)col * k + col];
            const double *urow = u + (size_t)col * k;
            if (col % g == 0) /* group params from the current, updated weights */
                for (int32_t rr = 0; rr < n; rr++)
                    gp[rr] = find_params(wp + (size_t)rr * k + col, 1, g, prm->sym);
            for (int32_t rr = 0; rr < n; rr++) {
                double *wr = wp + (size_t)rr * k;
                int q = quant_one(wr[col], &gp[rr]);
                float dq = dequant_one(q, &gp[rr]);
                qint[(size_t)rr * k + col] = q;
                r->deq[(size_t)rr * k + perm[col]] = dq;
                double e = (wr[col] - (double)dq) / d;
                for (int32_t j = col + 1; j < i2; j++)
                    wr[j] -= e * urow[j];
                err1[(size_t)rr * bs + i] = e;
            }
            if (col % g == 0)
                for (int32_t rr = 0; rr < n; rr++)
                    pack_group(r, col / g, rr, &gp[rr]);
        }
        if (i2 < k) /* lazy batch update of the columns after this block */
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, k - i2, cnt, -1.0, err1, bs,
                        u + (size_t)i1 * k + i2, k, 1.0, wp + i2, k);
    }

    for (int32_t j = 0; j < k; j++) {
        r->g_idx[perm[j]] = j / g;
        for (int32_t rr = 0; rr < n; rr++)
            pack_q(r, rr, perm[j], qint[(size_t)rr * k + j]);
    }
out:
    free(h);
    free(u);
    free(wp);
    free(perm);
    free(di);
    free(qint);
    free(gp);
    free(err1);
    return rc;
}

int gptq_quantize(const float *w, int32_t n, int32_t k, const gptq_hessian *h,
                  const gptq_params *p, gptq_result *ret, lm_err *err)
{
    memset(ret, 0, sizeof *ret);
    if (n <= 0 || k <= 0 || n % 8 || k % 8)
        return lm_err_set(err, -EINVAL,
                          "gptq: a %dx%d weight cannot be packed (outputs and inputs must be "
                          "positive multiples of 8)", n, k);
    if (p->group <= 0 || k % p->group)
        return lm_err_set(err, -EINVAL, "gptq: group size %d does not divide the %d inputs",
                          p->group, k);
    if (p->method == GPTQ_METHOD_GPTQ) {
        if (!h || h->k != k)
            return lm_err_set(err, -EINVAL, "gptq: Hessian of size %d for a layer of %d inputs",
                              h ? h->k : 0, k);
        if (h->n <= 0)
            return lm_err_set(err, -EINVAL, "gptq: Hessian has no inputs accumulated");
        if (!(p->percdamp > 0))
            return lm_err_set(err, -EINVAL, "gptq: dampening %g must be positive", p->percdamp);
    }
    int rc = result_alloc(ret, n, k, p->group, err);
    if (rc)
        return rc;
    if (p->method == GPTQ_METHOD_RTN) {
        quantize_rtn(w, ret, p->sym);
        return 0;
    }
    rc = quantize_gptq(w, h, p, ret, err);
    if (rc)
        gptq_result_free(ret);
    return rc;
}

double gptq_recon_error(const float *a, const float *b, int32_t n, int32_t k, const float *x,
                        int64_t rows)
{
    enum { CHUNK = 512 };
    float *d = malloc(sizeof(float) * (size_t)n * k);
    float *y = malloc(sizeof(float) * (size_t)CHUNK * n);
    if (!d || !y) {
        free(d);
        free(y);
        return NAN;
    }
    for (size_t i = 0; i < (size_t)n * k; i++)
        d[i] = a[i] - b[i];
    double sum = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += CHUNK) {
        int m = (int)(rows - r0 < CHUNK ? rows - r0 : CHUNK);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x + r0 * k, k, d, k,
                    0.0f, y, n);
        for (size_t i = 0; i < (size_t)m * n; i++)
            sum += (double)y[i] * y[i];
    }
    free(d);
    free(y);
    return sum;
}

/* ---- internals shared with gptq_cuda.cu (gptq_int.h) ---------------------- */

gptq_qparam gptq_int_find_params(const double *x, size_t stride, int32_t len, int sym)
{
    return find_params(x, stride, len, sym);
}

int gptq_int_quant_one(double w, const gptq_qparam *p) { return quant_one(w, p); }

float gptq_int_dequant_one(int q, const gptq_qparam *p) { return dequant_one(q, p); }

void gptq_int_pack_q(gptq_result *r, int32_t row, int32_t col, int q) { pack_q(r, row, col, q); }

void gptq_int_pack_group(gptq_result *r, int32_t grp, int32_t row, const gptq_qparam *p)
{
    pack_group(r, grp, row, p);
}

int gptq_int_result_alloc(gptq_result *r, int32_t n, int32_t k, int32_t group, lm_err *err)
{
    return result_alloc(r, n, k, group, err);
}
