/*
 * test_quantize.c: `quantize_run` end to end on the qwen2moe-tiny fixture
 * (random weights; calibration and held-out prompts are random token ids).
 *
 * Checked:
 *  - the written file is standard: every Linear's qweight/qzeros/scales/
 *    g_idx, decoded with the README's layout text, gives back exactly the
 *    weights the quantizer reported (GPTQ sym, GPTQ asym + act-order, RTN);
 *  - everything else (embeddings, lm_head, norms, router, shared-expert
 *    gate, biases) is copied bit for bit; config.json carries
 *    quantization_config; quantize_config.json and tokenizer files exist;
 *  - GPTQ's held-out reconstruction error is below RTN's in every layer,
 *    and its final-logit KL to the bf16 model on held-out prompts is lower;
 *  - sharding writes shards + an index covering every tensor;
 *  - bad inputs: already quantized, unknown architecture, group not
 *    dividing K, group not a multiple of 32, GPTQ without calibration.
 */
#include "tests/quant/quant_util.h"

#include <jansson.h>

static const char *fixtures, *tmp;

typedef struct layer_log {
    int n;
    quantize_layer_stats st[64];
} layer_log;

typedef struct run_user {
    qu_record rec;
    layer_log log;
} run_user;

static void on_layer(void *user, const quantize_layer_stats *s)
{
    run_user *u = user;
    if (u->log.n < 64)
        u->log.st[u->log.n++] = *s;
}
static void on_linear(void *user, const char *name, const float *deq, int32_t n, int32_t k)
{
    qu_on_linear(&((run_user *)user)->rec, name, deq, n, k);
}

static int run(const char *model, const char *out, gptq_method method, int32_t group, int sym,
               int act, const int32_t *tok, int32_t ncal, int32_t nheld, int32_t len,
               size_t shard, run_user *u, lm_err *err)
{
    quantize_opts o;
    memset(&o, 0, sizeof o);
    gptq_params_default(&o.gptq);
    o.model_dir = model;
    o.out_dir = out;
    o.gptq.method = method;
    o.gptq.group = group;
    o.gptq.sym = sym;
    o.gptq.act_order = act;
    o.tokens = tok;
    o.n_calib = ncal;
    o.n_heldout = nheld;
    o.seq_len = len;
    o.max_shard_bytes = shard;
    o.on_layer = u ? on_layer : NULL;
    o.on_linear = u ? on_linear : NULL;
    o.user = u;
    quantize_summary sum;
    return quantize_run(&o, &sum, err);
}

/* Decode the GPTQ tensors of every recorded Linear from the written file
 * with the README's text, compare with what was reported; check copied
 * tensors against the source. */
static void check_output(const char *src, const char *out, const run_user *u, int sym, int act,
                         int32_t group, const char *what)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    safetensors_file *f = NULL;
    lm_err err = {0};
    if (safetensors_open(path, &f, &err)) {
        QU_CHECK(0, "%s: %s", what, err.msg);
        return;
    }
    int bad = 0, nonidentity = 0;
    for (int i = 0; i < u->rec.n; i++) {
        char name[512];
        const char *sfx[4] = {"qweight", "qzeros", "scales", "g_idx"};
        const safetensors_tensor *t[4];
        for (int j = 0; j < 4; j++) {
            snprintf(name, sizeof name, "%s.%s", u->rec.names[i], sfx[j]);
            t[j] = safetensors_find(f, name);
        }
        if (!t[0] || !t[1] || !t[2] || !t[3]) {
            QU_CHECK(0, "%s: %s: GPTQ tensors missing", what, u->rec.names[i]);
            continue;
        }
        int32_t n = u->rec.rows[i], k = u->rec.cols[i], ng = k / group;
        QU_CHECK(t[0]->dtype == ST_I32 && t[0]->shape[0] == k / 8 && t[0]->shape[1] == n,
                 "%s qweight shape", u->rec.names[i]);
        QU_CHECK(t[1]->dtype == ST_I32 && t[1]->shape[0] == ng && t[1]->shape[1] == n / 8,
                 "%s qzeros shape", u->rec.names[i]);
        QU_CHECK(t[2]->dtype == ST_F16 && t[2]->shape[0] == ng && t[2]->shape[1] == n,
                 "%s scales shape", u->rec.names[i]);
        QU_CHECK(t[3]->dtype == ST_I32 && t[3]->numel == k, "%s g_idx shape", u->rec.names[i]);
        const uint32_t *qw = t[0]->data, *qz = t[1]->data;
        const uint16_t *sc = t[2]->data;
        const int32_t *gi = t[3]->data;
        for (int32_t kk = 0; kk < k; kk++) {
            int32_t g = gi[kk];
            nonidentity |= g != kk / group;
            if (g < 0 || g >= ng) {
                bad++;
                continue;
            }
            for (int32_t nn = 0; nn < n; nn++) {
                /* README: (k, n) at bits 4*(k%8) of qweight[k/8][n]; zero
                 * (group, n) at bits 4*(n%8) of qzeros[group][n/8], + 1 */
                int q = (qw[(size_t)(kk / 8) * n + nn] >> (4 * (kk % 8))) & 15;
                int z = ((qz[(size_t)g * (n / 8) + nn / 8] >> (4 * (nn % 8))) & 15) + 1;
                if (sym && z != 8)
                    bad++;
                float wv = fp16_to_float(sc[(size_t)g * n + nn]) * (float)(q - z);
                if (wv != u->rec.w[i][(size_t)nn * k + kk])
                    bad++;
            }
        }
    }
    QU_CHECK(bad == 0, "%s: %d weights decode differently from the reported ones", what, bad);
    QU_CHECK(act ? nonidentity : !nonidentity, "%s: g_idx %s", what,
             act ? "is k/group despite act-order" : "is not k/group");
    /* copied tensors: identical bytes */
    qfwd_model m;
    if (qfwd_model_open(src, &m, &err) == 0) {
        int copied = 0, diff = 0;
        for (int fi = 0; fi < m.n_files; fi++)
            for (size_t i = 0; i < safetensors_count(m.files[fi]); i++) {
                const safetensors_tensor *s = safetensors_at(m.files[fi], i);
                if (qu_record_find(&u->rec, s->name) >= 0) {
                    QU_CHECK(!safetensors_find(f, s->name), "%s: %s still 16-bit", what, s->name);
                    continue;
                }
                const safetensors_tensor *o = safetensors_find(f, s->name);
                copied++;
                if (!o || o->dtype != s->dtype || o->nbytes != s->nbytes ||
                    memcmp(o->data, s->data, s->nbytes))
                    diff++;
            }
        QU_CHECK(diff == 0, "%s: %d of %d 16-bit tensors not copied exactly", what, diff, copied);
        QU_CHECK(copied > 0 && safetensors_find(f, "model.layers.0.mlp.gate.weight") &&
                     safetensors_find(f, "model.layers.0.mlp.shared_expert_gate.weight") &&
                     safetensors_find(f, "lm_head.weight"),
                 "%s: router / shared-expert gate / lm_head not kept", what);
        qfwd_model_close(&m);
    }
    safetensors_close(f);
    /* config files */
    snprintf(path, sizeof path, "%s/config.json", out);
    json_t *cfg = json_load_file(path, 0, NULL);
    json_t *q = cfg ? json_object_get(cfg, "quantization_config") : NULL;
    QU_CHECK(q && !strcmp(json_string_value(json_object_get(q, "quant_method")), "gptq") &&
                 json_integer_value(json_object_get(q, "bits")) == 4 &&
                 json_integer_value(json_object_get(q, "group_size")) == group &&
                 json_is_true(json_object_get(q, "sym")) == sym &&
                 json_is_true(json_object_get(q, "desc_act")) == act &&
                 !strcmp(json_string_value(json_object_get(q, "checkpoint_format")), "gptq"),
             "%s: config.json quantization_config", what);
    json_decref(cfg);
    const char *files[] = {"quantize_config.json", "tokenizer.json", "tokenizer_config.json",
                           "chat_template.jinja"};
    for (size_t i = 0; i < 4; i++) {
        struct stat sb;
        snprintf(path, sizeof path, "%s/%s", out, files[i]);
        QU_CHECK(stat(path, &sb) == 0, "%s: %s not written", what, files[i]);
    }
    /* the engine's config parser accepts the result as GPTQ */
    model_config mc;
    QU_CHECK(config_load(out, &mc, &err) == 0 && mc.quant.gptq && mc.quant.group_size == group,
             "%s: config_load of the output: %s", what, err.msg);
}

static void test_errors(void)
{
    char src[4096], out[4096], dir[4096];
    snprintf(out, sizeof out, "%s/err_out", tmp);
    lm_err err = {0};
    int32_t tok[256] = {0};
    snprintf(src, sizeof src, "%s/qwen2moe-tiny-gptq", fixtures);
    int rc = run(src, out, GPTQ_METHOD_RTN, 32, 1, 0, NULL, 0, 0, 0, 0, NULL, &err);
    QU_CHECK(rc == -EINVAL && strstr(err.msg, "already quantized"), "gptq input: %d '%s'", rc,
             err.msg);
    snprintf(src, sizeof src, "%s/qwen2moe-tiny", fixtures);
    rc = run(src, out, GPTQ_METHOD_RTN, 64, 1, 0, NULL, 0, 0, 0, 0, NULL, &err);
    QU_CHECK(rc == -EINVAL && strstr(err.msg, "does not divide") && strstr(err.msg, "160"),
             "group 64 vs K 160: %d '%s'", rc, err.msg);
    rc = run(src, out, GPTQ_METHOD_RTN, 16, 1, 0, NULL, 0, 0, 0, 0, NULL, &err);
    QU_CHECK(rc == -EINVAL && strstr(err.msg, "multiple of 32"), "group 16: %d '%s'", rc,
             err.msg);
    rc = run(src, out, GPTQ_METHOD_GPTQ, 32, 1, 0, NULL, 0, 0, 0, 0, NULL, &err);
    QU_CHECK(rc == -EINVAL && strstr(err.msg, "calibration"), "gptq without tokens: %d '%s'", rc,
             err.msg);
    /* unknown architecture: a config with model_type llama */
    snprintf(dir, sizeof dir, "%s/llama_cfg", tmp);
    mkdir(dir, 0755);
    snprintf(out, sizeof out, "%s/config.json", dir);
    FILE *f = fopen(out, "w");
    fprintf(f, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"num_hidden_layers\": 1, "
               "\"num_attention_heads\": 2, \"vocab_size\": 64, \"intermediate_size\": 64}\n");
    fclose(f);
    rc = run(dir, out, GPTQ_METHOD_GPTQ, 32, 1, 0, tok, 1, 0, 64, 0, NULL, &err);
    QU_CHECK(rc < 0 && strstr(err.msg, "llama"), "unknown arch: %d '%s'", rc, err.msg);
}

int main(int argc, char **argv)
{
    fixtures = argc > 1 ? argv[1] : "../shared/fixtures";
    tmp = argc > 2 ? argv[2] : "/tmp";
    mkdir(tmp, 0755);
    test_errors();

    char src[4096], out[4096], deq[4096];
    snprintf(src, sizeof src, "%s/qwen2moe-tiny", fixtures);
    /* "quick" (sanitizer builds): a small calibration set, layout and error
     * checks only; the quality comparisons need the full size */
    int quick = argc > 3 && !strcmp(argv[3], "quick");
    const int32_t len = quick ? 64 : 128, ncal = quick ? 8 : 64, nheld = quick ? 2 : 8,
                  nprompt = 4, plen = 64, vocab = 1536;
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(ncal + nheld) * len);
    int32_t *prompts = malloc(sizeof(int32_t) * (size_t)nprompt * plen);
    for (int32_t i = 0; i < (ncal + nheld) * len; i++)
        tok[i] = qu_rand_below(vocab);
    for (int32_t i = 0; i < nprompt * plen; i++)
        prompts[i] = qu_rand_below(vocab);
    float *ref = qu_logits(src, prompts, nprompt, plen);
    QU_CHECK(ref, "bf16 logits");

    struct {
        const char *name;
        gptq_method method;
        int sym, act;
        double kl;
    } cases[] = {{"rtn-sym", GPTQ_METHOD_RTN, 1, 0, 0},
                 {"gptq-sym", GPTQ_METHOD_GPTQ, 1, 0, 0},
                 {"gptq-asym-act", GPTQ_METHOD_GPTQ, 0, 1, 0}};
    for (int c = 0; c < 3; c++) {
        lm_err err = {0};
        run_user u;
        memset(&u, 0, sizeof u);
        snprintf(out, sizeof out, "%s/q2-%s", tmp, cases[c].name);
        int rc = run(src, out, cases[c].method, 32, cases[c].sym, cases[c].act, tok, ncal, nheld,
                     len, 0, &u, &err);
        QU_CHECK(rc == 0, "%s: %s", cases[c].name, err.msg);
        if (rc)
            continue;
        QU_CHECK(u.rec.n == 3 * (4 + 8 * 3 + 3), "%s: %d linears reported", cases[c].name,
                 u.rec.n);
        check_output(src, out, &u, cases[c].sym, cases[c].act, 32, cases[c].name);
        for (int l = 0; l < u.log.n; l++) {
            const quantize_layer_stats *s = &u.log.st[l];
            printf("%-14s layer %d: held-out rel. error %.4e, RTN %.4e, linears worse %d\n",
                   cases[c].name, s->layer, s->err_method / s->ref, s->err_rtn / s->ref,
                   s->worse_linears);
            if (cases[c].method == GPTQ_METHOD_GPTQ && !quick)
                QU_CHECK(s->err_method < s->err_rtn, "%s layer %d: GPTQ %g not below RTN %g",
                         cases[c].name, s->layer, s->err_method, s->err_rtn);
        }
        if (c == 2 || quick) { /* layout checks only: the KL comparison is sym vs sym */
            qu_record_free(&u.rec);
            continue;
        }
        snprintf(deq, sizeof deq, "%s/q2-%s-deq", tmp, cases[c].name);
        QU_CHECK(qu_write_dequant(src, &u.rec, deq) == 0, "dequant dir");
        float *lg = qu_logits(deq, prompts, nprompt, plen);
        cases[c].kl = lg && ref ? qu_mean_kl(ref, lg, (int64_t)nprompt * plen, vocab) : NAN;
        printf("%-14s final-logit KL(bf16 || quantized) on held-out prompts: %.5f\n",
               cases[c].name, cases[c].kl);
        free(lg);
        qu_record_free(&u.rec);
    }
    QU_CHECK(quick || cases[1].kl < cases[0].kl, "KL: GPTQ sym %g not below RTN sym %g", cases[1].kl,
             cases[0].kl);

    /* sharding: 1 MiB shards, index covering every tensor */
    lm_err err = {0};
    snprintf(out, sizeof out, "%s/q2-sharded", tmp);
    QU_CHECK(run(src, out, GPTQ_METHOD_RTN, 32, 1, 0, NULL, 0, 0, 0, 1 << 20, NULL, &err) == 0,
             "sharded: %s", err.msg);
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", out);
    json_t *idx = json_load_file(path, 0, NULL);
    json_t *map = idx ? json_object_get(idx, "weight_map") : NULL;
    QU_CHECK(map && json_object_size(map) > 0, "sharded: index");
    size_t found = 0;
    const char *key;
    json_t *val;
    if (map)
        json_object_foreach(map, key, val)
        {
            snprintf(path, sizeof path, "%s/%s", out, json_string_value(val));
            safetensors_file *sf = NULL;
            if (safetensors_open(path, &sf, &err) == 0) {
                found += safetensors_find(sf, key) != NULL;
                safetensors_close(sf);
            }
        }
    QU_CHECK(map && found == json_object_size(map) && found > 300,
             "sharded: %zu of %zu indexed tensors found", found, map ? json_object_size(map) : 0);
    json_decref(idx);
    free(ref);
    free(tok);
    free(prompts);
    if (qu_failures) {
        fprintf(stderr, "test_quantize: %d failure(s)\n", qu_failures);
        return 1;
    }
    printf("test_quantize: ok\n");
    return 0;
}
