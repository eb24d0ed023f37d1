/*
 * test_gptq.c: the GPTQ/RTN math of engine/gptq.c on synthetic layers.
 *
 * W is random, X has correlated columns of very different scales (as real
 * activations do: a few large channels), so error feedback has something
 * to exploit. Checked: GPTQ's held-out reconstruction error is below RTN's
 * for every group/sym/act-order setting; the packed arrays decode (by an
 * independent decoder written from the fixtures README text) to exactly
 * the weights the quantizer reports; act-order g_idx is a valid grouping;
 * symmetric zeros are 8; dead inputs; bad arguments give clear errors.
 */
#include "engine/gptq.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/check_msg.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static double urand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}
static double nrand(void)
{
    double u = urand() + 1e-12, v = urand();
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

/* X = Z A with A mixing neighbouring channels, channel scales spread over
 * two decades; rows [rows][k]. */
static float *make_x(int64_t rows, int32_t k, const double *colscale, const float *mix)
{
    float *x = malloc(sizeof(float) * (size_t)rows * k);
    float *z = malloc(sizeof(float) * (size_t)k);
    for (int64_t r = 0; r < rows; r++) {
        for (int32_t i = 0; i < k; i++)
            z[i] = (float)nrand();
        for (int32_t i = 0; i < k; i++) {
            double s = 0;
            for (int32_t j = 0; j < 4; j++)
                s += mix[i * 4 + j] * z[(i + j * 7) % k];
            x[r * k + i] = (float)(s * colscale[i]);
        }
    }
    free(z);
    return x;
}

/* Independent decoder, straight from the README's layout text. */
static float readme_weight(const gptq_result *r, int32_t kk, int32_t nn)
{
    uint32_t qw = (uint32_t)r->qweight[(size_t)(kk / 8) * r->n + nn];
    int q = (qw >> (4 * (kk % 8))) & 15;
    int g = r->g_idx[kk];
    uint32_t qz = (uint32_t)r->qzeros[(size_t)g * (r->n / 8) + nn / 8];
    int zero = ((qz >> (4 * (nn % 8))) & 15) + 1;
    return gptq_fp16_to_float(r->scales[(size_t)g * r->n + nn]) * (float)(q - zero);
}

static void check_layout(const gptq_result *r, int sym, int act_order, const char *what)
{
    int32_t n = r->n, k = r->k, g = r->group, ng = k / g;
    int mismatches = 0, bad_zero = 0;
    for (int32_t kk = 0; kk < k; kk++)
        for (int32_t nn = 0; nn < n; nn++)
            if (readme_weight(r, kk, nn) != r->deq[(size_t)nn * k + kk])
                mismatches++;
    CHECK(mismatches == 0, "%s: %d weights decode differently from the reported ones", what,
          mismatches);
    float *w2 = malloc(sizeof(float) * (size_t)n * k);
    CHECK(gptq_unpack(r->qweight, r->qzeros, r->scales, r->g_idx, n, k, g, w2, NULL) == 0,
          "%s: unpack", what);
    CHECK(memcmp(w2, r->deq, sizeof(float) * (size_t)n * k) == 0, "%s: gptq_unpack differs",
          what);
    free(w2);
    for (int32_t grp = 0; grp < ng; grp++)
        for (int32_t nn = 0; nn < n; nn++) {
            uint32_t qz = (uint32_t)r->qzeros[(size_t)grp * (n / 8) + nn / 8];
            int zero = ((qz >> (4 * (nn % 8))) & 15) + 1;
            if (sym ? zero != 8 : (zero < 1 || zero > 15))
                bad_zero++;
        }
    CHECK(bad_zero == 0, "%s: %d zeros outside %s", what, bad_zero, sym ? "{8}" : "[1,15]");
    /* g_idx: each group has exactly g members; identity without act-order */
    int *count = calloc(ng > 0 ? (size_t)ng : 1, sizeof(int));
    int identity = 1, bad = 0;
    for (int32_t kk = 0; kk < k; kk++) {
        if (r->g_idx[kk] < 0 || r->g_idx[kk] >= ng) {
            bad++;
            continue;
        }
        count[r->g_idx[kk]]++;
        identity &= r->g_idx[kk] == kk / g;
    }
    CHECK(bad == 0, "%s: %d g_idx out of range", what, bad);
    for (int32_t grp = 0; grp < ng; grp++)
        CHECK(count[grp] == g, "%s: group %d has %d members, not %d", what, grp, count[grp], g);
    if (!act_order)
        CHECK(identity, "%s: g_idx is not k/group without act-order", what);
    else
        CHECK(!identity, "%s: act-order left g_idx = k/group on uneven activations", what);
    free(count);
}

static void test_fp16(void)
{
    const float vals[] = {0.0f, 1.0f, -2.5f, 0.000123f, 6.1e-5f, 3e-7f, 65504.0f, 0.1f, 1.0f / 3};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        float back = gptq_fp16_to_float(gptq_fp16_from_float(vals[i]));
        float tol = fabsf(vals[i]) * (1.0f / 1024) + 6e-8f;
        CHECK(fabsf(back - vals[i]) <= tol, "fp16 round trip of %g gave %g", vals[i], back);
    }
    CHECK(gptq_fp16_from_float(1.0f) == 0x3c00, "fp16(1)");
    CHECK(gptq_fp16_from_float(-2.0f) == 0xc000, "fp16(-2)");
    CHECK(gptq_fp16_from_float(1.0f + 1.0f / 2048) == 0x3c00, "ties to even (down)");
    CHECK(gptq_fp16_from_float(1.0f + 3.0f / 2048) == 0x3c02, "ties to even (up)");
    for (uint32_t h = 0; h < 0x7c00; h++) /* every finite positive half round trips */
        if (gptq_fp16_from_float(gptq_fp16_to_float((uint16_t)h)) != h) {
            CHECK(0, "half 0x%04x does not round trip", h);
            break;
        }
}

static void test_quality(void)
{
    const int32_t n = 64, k = 256;
    const int64_t rows = 2048, held = 1024;
    double *colscale = malloc(sizeof(double) * k);
    float *mix = malloc(sizeof(float) * k * 4);
    for (int32_t i = 0; i < k; i++) {
        colscale[i] = pow(10.0, 2.0 * urand() - 1.0) * (i % 37 == 0 ? 8.0 : 1.0);
        for (int j = 0; j < 4; j++)
            mix[i * 4 + j] = (float)(j == 0 ? 1.0 : 0.6 * nrand());
    }
    float *w = malloc(sizeof(float) * n * k);
    for (int32_t i = 0; i < n * k; i++)
        w[i] = (float)(0.05 * nrand());
    float *x = make_x(rows, k, colscale, mix);
    float *xh = make_x(held, k, colscale, mix);
    gptq_hessian h;
    CHECK(gptq_hessian_init(&h, k, NULL) == 0, "hessian init");
    gptq_hessian_add(&h, x, rows / 2, k); /* two calls = one call */
    gptq_hessian_add(&h, x + (rows / 2) * k, rows - rows / 2, k);
    CHECK(h.n == rows, "hessian count %lld", (long long)h.n);

    const int32_t groups[] = {32, 64, 128};
    for (int gi = 0; gi < 3; gi++)
        for (int sym = 0; sym <= 1; sym++) {
            gptq_params p;
            gptq_params_default(&p);
            p.group = groups[gi];
            p.sym = sym;
            p.method = GPTQ_METHOD_RTN;
            gptq_result rtn;
            lm_err err = {0};
            CHECK(gptq_quantize(w, n, k, NULL, &p, &rtn, &err) == 0, "rtn: %s", err.msg);
            char what[64];
            snprintf(what, sizeof what, "rtn g%d %s", p.group, sym ? "sym" : "asym");
            check_layout(&rtn, sym, 0, what);
            double e_rtn = gptq_recon_error(w, rtn.deq, n, k, xh, held);
            for (int act = 0; act <= 1; act++) {
                p.method = GPTQ_METHOD_GPTQ;
                p.act_order = act;
                gptq_result gq;
                CHECK(gptq_quantize(w, n, k, &h, &p, &gq, &err) == 0, "gptq: %s", err.msg);
                snprintf(what, sizeof what, "gptq g%d %s%s", p.group, sym ? "sym" : "asym",
                         act ? " act-order" : "");
                check_layout(&gq, sym, act, what);
                double e = gptq_recon_error(w, gq.deq, n, k, xh, held);
                printf("%-26s held-out ||WX-QX||^2: gptq %.4g  rtn %.4g  (%.2fx)\n", what, e,
                       e_rtn, e_rtn / e);
                CHECK(e < 0.8 * e_rtn, "%s: GPTQ error %g not clearly below RTN %g", what, e,
                      e_rtn);
                gptq_result_free(&gq);
            }
            gptq_result_free(&rtn);
        }
    gptq_hessian_free(&h);
    free(colscale);
    free(mix);
    free(w);
    free(x);
    free(xh);
}

static void test_dead_and_errors(void)
{
    const int32_t n = 16, k = 64;
    float *w = malloc(sizeof(float) * n * k);
    float *x = malloc(sizeof(float) * 200 * k);
    for (int32_t i = 0; i < n * k; i++)
        w[i] = (float)nrand();
    for (int32_t r = 0; r < 200; r++)
        for (int32_t i = 0; i < k; i++)
            x[r * k + i] = i == 5 || i == 40 ? 0.0f : (float)nrand();
    gptq_hessian h;
    gptq_hessian_init(&h, k, NULL);
    gptq_hessian_add(&h, x, 200, k);
    gptq_params p;
    gptq_params_default(&p);
    p.group = 32;
    p.act_order = 1;
    gptq_result r;
    lm_err err = {0};
    CHECK(gptq_quantize(w, n, k, &h, &p, &r, &err) == 0, "dead columns: %s", err.msg);
    for (int32_t i = 0; i < n; i++)
        CHECK(r.deq[i * k + 5] == 0 && r.deq[i * k + 40] == 0, "dead input weight not zero");
    gptq_result_free(&r);

    p.group = 48;
    CHECK(gptq_quantize(w, n, k, &h, &p, &r, &err) == -EINVAL && strstr(err.msg, "group"),
          "group 48 of 64 inputs: '%s'", err.msg);
    p.group = 32;
    CHECK(gptq_quantize(w, 12, k, NULL, &p, &r, &err) == -EINVAL && strstr(err.msg, "8"),
          "12 outputs: '%s'", err.msg);
    CHECK(gptq_quantize(w, n, k, NULL, &p, &r, &err) == -EINVAL && strstr(err.msg, "Hessian"),
          "gptq without Hessian: '%s'", err.msg);
    gptq_hessian h0;
    gptq_hessian_init(&h0, k, NULL);
    CHECK(gptq_quantize(w, n, k, &h0, &p, &r, &err) == -EINVAL && strstr(err.msg, "no inputs"),
          "empty Hessian: '%s'", err.msg);
    CHECK(r.qweight == NULL, "result zeroed on failure");
    int32_t bad_g[64] = {0};
    bad_g[3] = 9;
    float out[16 * 64];
    gptq_result ok;
    p.method = GPTQ_METHOD_RTN;
    gptq_quantize(w, n, k, NULL, &p, &ok, NULL);
    CHECK(gptq_unpack(ok.qweight, ok.qzeros, ok.scales, bad_g, n, k, 32, out, &err) == -EINVAL,
          "bad g_idx accepted");
    gptq_result_free(&ok);
    gptq_hessian_free(&h0);
    gptq_hessian_free(&h);
    free(w);
    free(x);
}

int main(void)
{
    test_fp16();
    test_quality();
    test_dead_and_errors();
    if (failures) {
        fprintf(stderr, "test_gptq: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_gptq: ok\n");
    return 0;
}
