/*
 * test_qfwd.c: the calibration forward of engine/quantize_fwd.c computes
 * what transformers computes: full-model logits over each fixture's
 * reference prompts (prompt + greedy tokens, teacher-forced) against
 * reference.safetensors, max |diff| relative to the row's max |logit|.
 * The GPTQ fixture (written by another tool) is decoded with the README
 * layout and must match its transformers reference the same way.
 * Also: a two-sequence batch gives each sequence the logits it gets alone
 * (causality and per-sequence positions).
 */
#include "engine/quantize_fwd.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

static float *full_logits(const qfwd_model *m, const int32_t *tok, int32_t n_seq, int32_t len)
{
    lm_err err = {0};
    int64_t t = (int64_t)n_seq * len;
    float *h = malloc(sizeof(float) * (size_t)t * m->cfg.hidden);
    float *lg = malloc(sizeof(float) * (size_t)t * m->cfg.vocab);
    int rc = qfwd_embed(m, tok, t, h, &err);
    for (int32_t i = 0; !rc && i < m->cfg.n_layers; i++) {
        qfwd_layer l;
        rc = qfwd_layer_load(m, i, &l, &err);
        if (!rc)
            rc = qfwd_layer_forward(m, &l, h, n_seq, len, &err);
        qfwd_layer_free(&l);
    }
    if (!rc)
        rc = qfwd_logits(m, h, t, lg, &err);
    free(h);
    if (rc) {
        fprintf(stderr, "forward: %s\n", err.msg);
        free(lg);
        return NULL;
    }
    return lg;
}

static void check_fixture(const char *fix, const char *name)
{
    int gptq = strstr(name, "gptq") != NULL;
    char dir[4096], ref[4200];
    snprintf(dir, sizeof dir, "%s/%s", fix, name);
    snprintf(ref, sizeof ref, "%s/reference.safetensors", dir);
    qfwd_model m;
    lm_err err = {0};
    safetensors_file *rf = NULL;
    if (qfwd_model_open(dir, &m, &err) || safetensors_open(ref, &rf, &err)) {
        fprintf(stderr, "%s: %s\n", name, err.msg);
        failures++;
        return;
    }
    m.allow_gptq = gptq; /* decode with the README layout */
    int32_t *seqs[8] = {0};
    int32_t lens[8] = {0};
    int np = 0;
    for (int p = 0; p < 8; p++) {
        char a[64], b[64], c[64];
        snprintf(a, sizeof a, "p%d.input_ids", p);
        snprintf(b, sizeof b, "p%d.greedy_ids", p);
        snprintf(c, sizeof c, "p%d.logits", p);
        const safetensors_tensor *ti = safetensors_find(rf, a), *tg = safetensors_find(rf, b),
                                 *tl = safetensors_find(rf, c);
        if (!ti)
            break;
        int32_t len = (int32_t)(ti->numel + tg->numel);
        int32_t *tok = malloc(sizeof(int32_t) * (size_t)len);
        memcpy(tok, ti->data, ti->nbytes);
        memcpy(tok + ti->numel, tg->data, tg->nbytes);
        float *lg = full_logits(&m, tok, 1, len);
        const float *want = tl->data;
        double worst = 0;
        for (int32_t r = 0; lg && r < len; r++) {
            double mx = 0, md = 0;
            for (int32_t v = 0; v < m.cfg.vocab; v++) {
                mx = fmax(mx, fabs(want[(size_t)r * m.cfg.vocab + v]));
                md = fmax(md, fabs(want[(size_t)r * m.cfg.vocab + v] - lg[(size_t)r * m.cfg.vocab + v]));
            }
            worst = fmax(worst, md / mx);
        }
        printf("%s p%d: %d tokens, max |diff| / max |logit| = %.3g\n", name, p, len, worst);
        if (!lg || !(worst < 2e-4)) {
            fprintf(stderr, "%s p%d: logits differ from transformers by %g\n", name, p, worst);
            failures++;
        }
        free(lg);
        seqs[np] = tok;
        lens[np++] = len;
    }
    /* batch of two sequences (cut to the shorter length) = each alone */
    if (np >= 2) {
        int32_t len = lens[0] < lens[1] ? lens[0] : lens[1];
        int32_t *both = malloc(sizeof(int32_t) * 2 * (size_t)len);
        memcpy(both, seqs[0], sizeof(int32_t) * (size_t)len);
        memcpy(both + len, seqs[1], sizeof(int32_t) * (size_t)len);
        float *lb = full_logits(&m, both, 2, len);
        float *l1 = full_logits(&m, seqs[1], 1, len);
        double md = 0;
        for (size_t i = 0; lb && l1 && i < (size_t)len * m.cfg.vocab; i++)
            md = fmax(md, fabs(lb[(size_t)len * m.cfg.vocab + i] - l1[i]));
        if (!lb || !l1 || md > 1e-4) {
            fprintf(stderr, "%s: second sequence of a batch differs by %g from alone\n", name, md);
            failures++;
        }
        free(lb);
        free(l1);
        free(both);
    }
    for (int p = 0; p < np; p++)
        free(seqs[p]);
    safetensors_close(rf);
    qfwd_model_close(&m);
}

int main(int argc, char **argv)
{
    const char *fix = argc > 1 ? argv[1] : "../shared/fixtures";
    check_fixture(fix, "qwen2moe-tiny");
    check_fixture(fix, "mixtral-tiny");
    check_fixture(fix, "trained-moe");
    /* a GPTQ file written by another tool, decoded by gptq_unpack: same
     * logits as transformers computes from it */
    check_fixture(fix, "qwen2moe-tiny-gptq");
    /* a GPTQ checkpoint is refused with a clear message */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/qwen2moe-tiny-gptq", fix);
    qfwd_model m;
    qfwd_layer l;
    lm_err err = {0};
    if (qfwd_model_open(dir, &m, &err) == 0) {
        int rc = qfwd_layer_load(&m, 0, &l, &err);
        if (rc != -EINVAL || !strstr(err.msg, "already quantized")) {
            fprintf(stderr, "gptq layer load: rc %d '%s'\n", rc, err.msg);
            failures++;
        }
        qfwd_model_close(&m);
    } else {
        fprintf(stderr, "open gptq fixture: %s\n", err.msg);
        failures++;
    }
    if (failures)
        return 1;
    printf("test_qfwd: ok\n");
    return 0;
}
