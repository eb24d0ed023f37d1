/*
 * test_model.c: the loader on synthesized checkpoints and on broken ones.
 *
 *  - GPTQ unpacking: synthesize tiny GPTQ checkpoints (sym / asym zeros,
 *    with / without act-order g_idx), load them, and check every checked
 *    linear against the GPTQ formula applied to the raw file tensors
 *    (weight(k, n) = scales[g_idx[k]][n] * (q(k, n) - (qzeros(g, n) + 1))).
 *  - Errors: missing tensor, wrong shape, missing shard, bad config,
 *    unknown model_type, --quantize group that does not fit; each message
 *    names the file/tensor and the problem.
 *  - A forward pass on each synthesized architecture gives finite, peaked
 *    logits; quantize-at-load makes INT4 linears but keeps router/lm_head.
 */
#include "engine/backends.h"
#include "engine/half.h"
#include "engine/model.h"
#include "engine/ops_cpu.h"
#include "engine/safetensors.h"
#include "engine/synth.h"
#include "tests/engine/check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmp[256];

static const char *sub(const char *name)
{
    static char p[32][512];
    static int i;
    i = (i + 1) % 32;
    snprintf(p[i], sizeof p[i], "%s/%s", tmp, name);
    return p[i];
}

static uint32_t rd32(const void *p, size_t i)
{
    uint32_t v;
    memcpy(&v, (const uint8_t *)p + 4 * i, 4);
    return v;
}

/* Check one GPTQ linear of the loaded model against the raw file tensors. */
static void check_gptq_linear(const safetensors_file *f, const char *prefix, const linear *l,
                              int32_t group, int expect_perm)
{
    char n[256];
    snprintf(n, sizeof n, "%s.qweight", prefix);
    const safetensors_tensor *qw = safetensors_find(f, n);
    snprintf(n, sizeof n, "%s.qzeros", prefix);
    const safetensors_tensor *qz = safetensors_find(f, n);
    snprintf(n, sizeof n, "%s.scales", prefix);
    const safetensors_tensor *sc = safetensors_find(f, n);
    snprintf(n, sizeof n, "%s.g_idx", prefix);
    const safetensors_tensor *gi = safetensors_find(f, n);
    CHECK(qw && qz && sc && gi && l->kind == LINEAR_INT4);
    if (!qw || !qz || !sc || !gi || l->kind != LINEAR_INT4)
        return;
    CHECK((l->q.perm != NULL) == expect_perm);
    int32_t K = l->k, N = l->n;
    float *x = malloc(sizeof(float) * (size_t)K), *y = malloc(sizeof(float) * (size_t)N);
    for (int32_t k = 0; k < K; k++)
        x[k] = sinf((float)k * 0.37f) + 0.1f;
    op_linear_naive(l, x, 1, y);
    double worst = 0, ref_max = 0;
    for (int32_t c = 0; c < N; c++) {
        double acc = 0;
        for (int32_t k = 0; k < K; k++) {
            int32_t g = (int32_t)rd32(gi->data, (size_t)k);
            uint32_t q = (rd32(qw->data, (size_t)(k / 8) * (size_t)N + (size_t)c) >> (4 * (k % 8))) & 15;
            uint32_t z = ((rd32(qz->data, (size_t)g * (size_t)(N / 8) + (size_t)(c / 8)) >>
                           (4 * (c % 8))) & 15) + 1;
            float s = fp16_to_float(((const uint16_t *)sc->data)[(size_t)g * (size_t)N + (size_t)c]);
            acc += (double)(s * (float)((int)q - (int)z)) * x[k];
        }
        if (l->bias)
            acc += l->bias[c];
        worst = fabs(acc - y[c]) > worst ? fabs(acc - y[c]) : worst;
        ref_max = fabs(acc) > ref_max ? fabs(acc) : ref_max;
    }
    if (worst > 1e-5 * (ref_max + 1))
        fprintf(stderr, "%s: GPTQ mismatch %g (ref max %g)\n", prefix, worst, ref_max);
    CHECK(worst <= 1e-5 * (ref_max + 1));
    CHECK(l->q.group == group);
    free(x);
    free(y);
}

static void test_gptq(int act_order, int asym)
{
    synth_options o;
    synth_options_default(&o);
    o.arch = "qwen2_moe";
    o.gptq = 1;
    o.group = 64;
    o.act_order = act_order;
    o.asym = asym;
    o.seed = 7 + (uint64_t)act_order * 2 + (uint64_t)asym;
    lm_err err = {0};
    const char *dir = sub("gptq");
    CHECK(synth_write(dir, &o, &err) == 0);
    model *m = NULL;
    int rc = model_load(dir, NULL, &m, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    CHECK(rc == 0);
    safetensors_file *f = NULL;
    CHECK(safetensors_open(sub("gptq/model.safetensors"), &f, &err) == 0);
    if (m && f) {
        CHECK(m->int4 && m->lm_head.kind == LINEAR_DENSE && m->layers[0].router.kind == LINEAR_DENSE);
        check_gptq_linear(f, "model.layers.0.self_attn.q_proj", &m->layers[0].q, 64, act_order);
        check_gptq_linear(f, "model.layers.1.self_attn.o_proj", &m->layers[1].o, 64, act_order);
        check_gptq_linear(f, "model.layers.0.mlp.experts.3.down_proj",
                          &m->layers[0].experts[3].down, 64, act_order);
        check_gptq_linear(f, "model.layers.1.mlp.shared_expert.gate_proj",
                          &m->layers[1].shared.gate, 64, act_order);
        int non8 = 0;
        const int4_matrix *q = &m->layers[0].q.q;
        for (int32_t i = 0; i < q->n * (q->k / q->group); i++)
            non8 |= q->zeros[i] != 8;
        CHECK(non8 == asym);
    }
    safetensors_close(f);
    model_free(m);
}

/* Copy DIR/model.safetensors to DIR2 without tensor `drop`, or with it
 * flattened to 1-D when `flatten`. */
static void rewrite(const char *src, const char *dst_dir, const char *drop, int flatten)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && cp '%s'/*.json '%s'/", dst_dir,
             dst_dir, src, dst_dir);
    CHECK(system(cmd) == 0);
    lm_err err = {0};
    char p[600];
    snprintf(p, sizeof p, "%s/model.safetensors", src);
    safetensors_file *f = NULL;
    safetensors_writer *w = NULL;
    CHECK(safetensors_open(p, &f, &err) == 0 && safetensors_writer_create(&w, &err) == 0);
    for (size_t i = 0; f && i < safetensors_count(f); i++) {
        const safetensors_tensor *t = safetensors_at(f, i);
        int64_t flat[1] = {t->numel};
        if (!strcmp(t->name, drop)) {
            if (flatten)
                safetensors_writer_add(w, t->name, t->dtype, 1, flat, t->data, &err);
            continue;
        }
        safetensors_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data, &err);
    }
    snprintf(p, sizeof p, "%s/model.safetensors", dst_dir);
    CHECK(safetensors_writer_write(w, p, NULL, NULL, &err) == 0);
    safetensors_writer_free(w);
    safetensors_close(f);
}

static void test_errors(void)
{
    synth_options o;
    synth_options_default(&o);
    o.arch = "mixtral";
    lm_err err = {0};
    const char *good = sub("mix");
    CHECK(synth_write(good, &o, &err) == 0);
    model *m = NULL;
    const char *miss = sub("missing");
    rewrite(good, miss, "model.layers.1.block_sparse_moe.experts.2.w3.weight", 0);
    CHECK_ERR(model_load(miss, NULL, &m, &err), err, -EINVAL,
              "tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight' is missing");
    const char *shp = sub("shape");
    rewrite(good, shp, "model.layers.0.self_attn.k_proj.weight", 1);
    CHECK_ERR(model_load(shp, NULL, &m, &err), err, -EINVAL,
              "'model.layers.0.self_attn.k_proj.weight': shape [16384], expected [64, 256]");
    CHECK(strstr(err.msg, "model.safetensors") != NULL);

    /* tied embeddings: no lm_head.weight needed, lm_head reads embed_tokens */
    const char *tied = sub("tied");
    rewrite(good, tied, "lm_head.weight", 0);
    CHECK_ERR(model_load(tied, NULL, &m, &err), err, -EINVAL, "tensor 'lm_head.weight' is missing");
    char sed[700];
    snprintf(sed, sizeof sed, "sed -i 's/\"tie_word_embeddings\": false/\"tie_word_embeddings\": true/' "
             "'%s/config.json'", tied);
    CHECK(system(sed) == 0);
    CHECK(model_load(tied, NULL, &m, &err) == 0);
    if (m)
        CHECK(m->cfg.tie_embeddings && m->lm_head.w == m->embed.w);
    model_free(m);
    m = NULL;

    /* sharded: remove a shard */
    o.shard_bytes = 1 << 20;
    const char *sh = sub("sharded");
    CHECK(synth_write(sh, &o, &err) == 0);
    CHECK(model_load(sh, NULL, &m, &err) == 0);
    model_free(m);
    m = NULL;
    char p[1200];
    snprintf(p, sizeof p, "cd '%s' && ls model-00003-of-*.safetensors >/dev/null && "
             "rm model-00002-of-*.safetensors", sh);
    CHECK(system(p) == 0);
    CHECK_ERR(model_load(sh, NULL, &m, &err), err, -ENOENT, "shard 'model-00002-of-");
    /* an empty shard is named with its problem */
    snprintf(p, sizeof p, "cd '%s' && f=$(ls model-00001-of-*) && : > \"${f%%%%-of-*}\"-of-${f##*-of-}"
             " && : > model-00002-of-${f##*-of-}", sh);
    CHECK(system(p) == 0);
    CHECK_ERR(model_load(sh, NULL, &m, &err), err, -EINVAL, "truncated file");

    /* config problems through model_load */
    const char *bad = sub("badcfg");
    snprintf(p, sizeof p, "rm -rf '%s' && cp -r '%s' '%s' && sed -i 's/\"mixtral\"/\"gpt2\"/' '%s/config.json'",
             bad, good, bad, bad);
    CHECK(system(p) == 0);
    CHECK_ERR(model_load(bad, NULL, &m, &err), err, -ENOTSUP, "model_type 'gpt2'");
    snprintf(p, sizeof p, "sed -i 's/\"gpt2\"/\"mixtral\"/; s/\"hidden_size\"/\"hidden_sz\"/' '%s/config.json'", bad);
    CHECK(system(p) == 0);
    CHECK_ERR(model_load(bad, NULL, &m, &err), err, -EINVAL, "'hidden_size'");
    CHECK_ERR(model_load(sub("nowhere"), NULL, &m, &err), err, -ENOENT, "config.json");

    /* quantize at load: a group that does not divide K is refused */
    model_load_options lo;
    model_load_options_default(&lo);
    lo.quantize_int4 = 1;
    lo.group = 96;
    CHECK_ERR(model_load(good, &lo, &m, &err), err, -EINVAL, "group 96 does not fit K=256");
    lo.group = 64;
    CHECK(model_load(good, &lo, &m, &err) == 0);
    if (m) {
        CHECK(m->layers[0].q.kind == LINEAR_INT4 && m->layers[1].experts[0].down.kind == LINEAR_INT4);
        CHECK(m->layers[0].router.kind == LINEAR_DENSE && m->lm_head.kind == LINEAR_DENSE &&
              m->embed.kind == LINEAR_DENSE);
        CHECK(m->int4_group == 64);
    }
    model_free(m);
}

/* One forward over a synthesized model: finite and peaked logits. */
static void test_forward(const char *arch, int gptq)
{
    synth_options o;
    synth_options_default(&o);
    o.arch = arch;
    o.gptq = gptq;
    lm_err err = {0};
    const char *dir = sub("fwd");
    CHECK(synth_write(dir, &o, &err) == 0);
    model *m = NULL;
    backend *be = NULL;
    CHECK(model_load(dir, NULL, &m, &err) == 0);
    if (!m)
        return;
    CHECK(backend_open(m, NULL, &be, &err) == 0 && backend_kv_init(be, 4, 8, &err) == 0);
    int32_t toks[6] = {1, 256, 262, 40, 7, 300}, ss[2] = {0, 6}, sp[1] = {0},
            bt[8] = {3, 1, 4, 0, 2, 5, 6, 7}, rows[6] = {0, 1, 2, 3, 4, 5};
    int32_t V = m->cfg.vocab;
    float *lg = malloc(sizeof(float) * 6 * (size_t)V);
    backend_batch b = {1, 6, toks, ss, sp, bt, 8, 6, rows, lg, NULL, NULL, 0, NULL};
    CHECK(backend_forward(be, &b, &err) == 0);
    for (int r = 0; r < 6; r++) { /* peaked: top-1 probability well above uniform */
        double mx = -1e30, z = 0;
        for (int32_t v = 0; v < V; v++) {
            float x = lg[(size_t)r * (size_t)V + (size_t)v];
            CHECK(isfinite(x));
            mx = x > mx ? x : mx;
        }
        for (int32_t v = 0; v < V; v++)
            z += exp(lg[(size_t)r * (size_t)V + (size_t)v] - mx);
        if (!(1 / z > 10.0 / V))
            fprintf(stderr, "%s%s row %d: top-1 probability %g\n", arch, gptq ? " gptq" : "", r,
                    1 / z);
        CHECK(1 / z > 10.0 / V);
    }
    /* an out-of-range token and block are refused */
    toks[2] = V;
    CHECK_ERR(backend_forward(be, &b, &err), err, -EINVAL, "outside vocabulary");
    toks[2] = 5;
    bt[1] = 99;
    CHECK_ERR(backend_forward(be, &b, &err), err, -EINVAL, "block_table[1] = 99");
    bt[1] = 1;
    sp[0] = 30; /* 36 positions do not fit 8 blocks of 4 */
    CHECK_ERR(backend_forward(be, &b, &err), err, -EINVAL, "positions [30, 36) exceed");
    free(lg);
    backend_destroy(be);
    model_free(m);
}

int main(void)
{
    snprintf(tmp, sizeof tmp, "/tmp/lm_model_XXXXXX");
    if (!mkdtemp(tmp))
        return 2;
    test_gptq(0, 0);
    test_gptq(1, 1);
    test_gptq(1, 0);
    test_errors();
    const char *archs[3] = {"qwen2_moe", "qwen3_moe", "mixtral"};
    for (int i = 0; i < 3; i++) {
        test_forward(archs[i], 0);
        test_forward(archs[i], 1);
    }
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0)
        return 2;
    CHECK_DONE();
}
