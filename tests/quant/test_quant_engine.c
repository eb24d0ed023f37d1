/*
 * test_quant_engine.c: checkpoints written by `quantize` load in the engine
 * and compute what their own dequantized weights compute in float32.
 *
 * For qwen2moe-tiny quantized with GPTQ (sym, no act-order; asym with
 * act-order) the test writes a float32 checkpoint holding the weights the
 * quantizer reported, then runs the fixture's reference prompts through
 *   (a) the CPU backend on the GPTQ folder (repacked to INT4 at load),
 *   (b) the CPU backend on the float32 folder,
 *   (c) the float32 calibration forward (quantize_fwd) on the GPTQ folder,
 *       which decodes the file with the README layout,
 * and requires all three to agree to 1e-4 of the row's largest logit.
 */
#include "tests/quant/quant_util.h"

#include "engine/backends.h"
#include "engine/model.h"

static float *engine_logits(const char *dir, const int32_t *tok, int32_t len, int32_t vocab)
{
    model *m = NULL;
    backend *b = NULL;
    lm_err err = {0};
    backend_options bo;
    backend_options_default(&bo);
    bo.threads = 2;
    bo.max_tokens = 64;
    int rc = model_load(dir, NULL, &m, &err);
    if (!rc)
        rc = backend_open(m, &bo, &b, &err);
    int32_t nb = (len + 15) / 16;
    if (!rc)
        rc = backend_kv_init(b, 16, nb, &err);
    float *lg = malloc(sizeof(float) * (size_t)len * vocab);
    int32_t *blocks = malloc(sizeof(int32_t) * (size_t)nb), *rows = malloc(sizeof(int32_t) * len);
    for (int32_t i = 0; i < nb; i++)
        blocks[i] = i;
    for (int32_t i = 0; i < len; i++)
        rows[i] = i;
    int32_t ss[2] = {0, len}, sp = 0;
    backend_batch bt = {1, len, tok, ss, &sp, blocks, nb, len, rows, lg, NULL, NULL, 0, NULL};
    if (!rc)
        rc = backend_forward(b, &bt, &err);
    if (rc) {
        fprintf(stderr, "%s: %s\n", dir, err.msg);
        free(lg);
        lg = NULL;
    }
    free(blocks);
    free(rows);
    backend_destroy(b);
    model_free(m);
    return lg;
}

static double max_rel(const float *a, const float *b, int32_t len, int32_t vocab)
{
    double worst = 0;
    for (int32_t r = 0; r < len; r++) {
        double mx = 0, md = 0;
        for (int32_t v = 0; v < vocab; v++) {
            mx = fmax(mx, fabs(a[(size_t)r * vocab + v]));
            md = fmax(md, fabs(a[(size_t)r * vocab + v] - b[(size_t)r * vocab + v]));
        }
        worst = fmax(worst, md / mx);
    }
    return worst;
}

/* float32 forward of dir with GPTQ Linears decoded */
static float *ref_logits(const char *dir, const int32_t *tok, int32_t len)
{
    qfwd_model m;
    lm_err err = {0};
    if (qfwd_model_open(dir, &m, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return NULL;
    }
    m.allow_gptq = 1;
    float *h = malloc(sizeof(float) * (size_t)len * m.cfg.hidden);
    float *lg = malloc(sizeof(float) * (size_t)len * m.cfg.vocab);
    int rc = qfwd_embed(&m, tok, len, h, &err);
    for (int32_t i = 0; !rc && i < m.cfg.n_layers; i++) {
        qfwd_layer l;
        rc = qfwd_layer_load(&m, i, &l, &err);
        if (!rc)
            rc = qfwd_layer_forward(&m, &l, h, 1, len, &err);
        qfwd_layer_free(&l);
    }
    if (!rc)
        rc = qfwd_logits(&m, h, len, lg, &err);
    free(h);
    qfwd_model_close(&m);
    if (rc) {
        fprintf(stderr, "%s: %s\n", dir, err.msg);
        free(lg);
        return NULL;
    }
    return lg;
}

int main(int argc, char **argv)
{
    const char *fix = argc > 1 ? argv[1] : "../shared/fixtures";
    const char *tmp = argc > 2 ? argv[2] : "/tmp";
    mkdir(tmp, 0755);
    char src[4096], out[4096], deq[4096], ref[4096];
    snprintf(src, sizeof src, "%s/qwen2moe-tiny", fix);
    snprintf(ref, sizeof ref, "%s/reference.safetensors", src);
    const int32_t vocab = 1536, ncal = 8, len_cal = 64; /* correctness, not quality */
    int32_t *cal = malloc(sizeof(int32_t) * (size_t)(ncal + 4) * len_cal);
    for (int32_t i = 0; i < (ncal + 4) * len_cal; i++)
        cal[i] = qu_rand_below(vocab);
    /* prompt: the fixture's p0 prompt + greedy tokens */
    safetensors_file *rf = NULL;
    lm_err err = {0};
    if (safetensors_open(ref, &rf, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    const safetensors_tensor *ti = safetensors_find(rf, "p0.input_ids"),
                             *tg = safetensors_find(rf, "p0.greedy_ids");
    int32_t len = (int32_t)(ti->numel + tg->numel);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)len);
    memcpy(tok, ti->data, ti->nbytes);
    memcpy(tok + ti->numel, tg->data, tg->nbytes);
    safetensors_close(rf);

    for (int c = 0; c < 2; c++) {
        quantize_opts o;
        memset(&o, 0, sizeof o);
        gptq_params_default(&o.gptq);
        o.gptq.group = 32;
        o.gptq.sym = c == 0;
        o.gptq.act_order = c == 1;
        o.model_dir = src;
        snprintf(out, sizeof out, "%s/eng-%d", tmp, c);
        snprintf(deq, sizeof deq, "%s/eng-%d-deq", tmp, c);
        o.out_dir = out;
        o.tokens = cal;
        o.n_calib = ncal;
        o.n_heldout = 4;
        o.seq_len = len_cal;
        qu_record rec = {0};
        o.on_linear = qu_on_linear;
        o.user = &rec;
        quantize_summary sum;
        int rc = quantize_run(&o, &sum, &err);
        QU_CHECK(rc == 0, "quantize: %s", err.msg);
        if (rc)
            continue;
        QU_CHECK(qu_write_dequant(src, &rec, deq) == 0, "dequant dir");
        qu_record_free(&rec);
        float *a = engine_logits(out, tok, len, vocab);
        float *b = engine_logits(deq, tok, len, vocab);
        float *r = ref_logits(out, tok, len);
        QU_CHECK(a && b && r, "case %d: logits", c);
        if (a && b && r) {
            double ab = max_rel(b, a, len, vocab), rb = max_rel(b, r, len, vocab);
            printf("%s: engine(GPTQ) vs engine(fp32 dequant) %.3g; ref(GPTQ) vs engine(fp32 "
                   "dequant) %.3g\n", c ? "asym act-order" : "sym", ab, rb);
            QU_CHECK(ab < 1e-4, "case %d: engine on GPTQ differs from its dequantized weights by "
                     "%g", c, ab);
            QU_CHECK(rb < 1e-4, "case %d: reference forward differs by %g", c, rb);
        }
        free(a);
        free(b);
        free(r);
    }
    free(cal);
    free(tok);
    if (qu_failures)
        return 1;
    printf("test_quant_engine: ok\n");
    return 0;
}
