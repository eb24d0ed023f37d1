/*
 * config.c: config.json / generation_config.json -> model_config (config.h).
 *
 * Defaults are those of the transformers configuration classes, so that a
 * field absent from a hub config means what it means to transformers.
 */
#include "engine/config.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *config_arch_name(model_arch a)
{
    switch (a) {
    case MODEL_ARCH_QWEN2_MOE: return "qwen2_moe";
    case MODEL_ARCH_QWEN3_MOE: return "qwen3_moe";
    case MODEL_ARCH_MIXTRAL: return "mixtral";
    }
    return "?";
}

static int is_null(json_t *v) { return !v || json_is_null(v); }

/* Required positive integer field. */
static int get_pos_int(json_t *o, const char *key, const char *what, int32_t *ret, lm_err *err)
{
    json_t *v = json_object_get(o, key);
    if (is_null(v))
        return lm_err_set(err, -EINVAL, "%s: missing required field '%s'", what, key);
    if (!json_is_integer(v) || json_integer_value(v) <= 0 || json_integer_value(v) > (1 << 30))
        return lm_err_set(err, -EINVAL, "%s: field '%s' must be a positive integer", what, key);
    *ret = (int32_t)json_integer_value(v);
    return 0;
}

/* Optional non-negative integer, *ret untouched when absent/null. */
static int opt_int(json_t *o, const char *key, const char *what, int32_t *ret, lm_err *err)
{
    json_t *v = json_object_get(o, key);
    if (is_null(v))
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < -1 || json_integer_value(v) > (1 << 30))
        return lm_err_set(err, -EINVAL, "%s: field '%s' must be an integer", what, key);
    *ret = (int32_t)json_integer_value(v);
    return 0;
}

static int opt_bool(json_t *o, const char *key, const char *what, int *ret, lm_err *err)
{
    json_t *v = json_object_get(o, key);
    if (is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return lm_err_set(err, -EINVAL, "%s: field '%s' must be true or false", what, key);
    *ret = json_is_true(v);
    return 0;
}

static int opt_num(json_t *o, const char *key, const char *what, double *ret, lm_err *err)
{
    json_t *v = json_object_get(o, key);
    if (is_null(v))
        return 0;
    if (!json_is_number(v))
        return lm_err_set(err, -EINVAL, "%s: field '%s' must be a number", what, key);
    *ret = json_number_value(v);
    return 0;
}

/* eos_token_id: an int or a list of ints. */
static int parse_eos(json_t *v, const char *what, model_config *c, lm_err *err)
{
    if (is_null(v))
        return 0;
    c->n_eos = 0;
    if (json_is_integer(v)) {
        c->eos_ids[c->n_eos++] = (int32_t)json_integer_value(v);
        return 0;
    }
    if (!json_is_array(v))
        return lm_err_set(err, -EINVAL, "%s: eos_token_id must be an integer or a list", what);
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e)
    {
        if (!json_is_integer(e))
            return lm_err_set(err, -EINVAL, "%s: eos_token_id[%zu] is not an integer", what, i);
        if (c->n_eos < MODEL_MAX_EOS)
            c->eos_ids[c->n_eos++] = (int32_t)json_integer_value(e);
    }
    return 0;
}

/* RoPE: rope_parameters {rope_type, rope_theta} (transformers 5) or
 * rope_theta + rope_scaling (older). Only the default rope is implemented. */
static int parse_rope(json_t *o, const char *what, model_config *c, lm_err *err)
{
    double theta = c->rope_theta;
    int rc = opt_num(o, "rope_theta", what, &theta, err);
    if (rc)
        return rc;
    const char *names[2] = {"rope_parameters", "rope_scaling"};
    for (int i = 0; i < 2; i++) {
        json_t *rp = json_object_get(o, names[i]);
        if (is_null(rp))
            continue;
        if (!json_is_object(rp))
            return lm_err_set(err, -EINVAL, "%s: %s must be an object", what, names[i]);
        json_t *t = json_object_get(rp, "rope_type");
        if (is_null(t))
            t = json_object_get(rp, "type");
        if (!is_null(t)) {
            if (!json_is_string(t))
                return lm_err_set(err, -EINVAL, "%s: %s.rope_type must be a string", what,
                                  names[i]);
            if (strcmp(json_string_value(t), "default"))
                return lm_err_set(err, -ENOTSUP,
                                  "%s: %s.rope_type '%s' is not implemented (only 'default')",
                                  what, names[i], json_string_value(t));
        } else if (i == 1) {
            return lm_err_set(err, -ENOTSUP, "%s: rope_scaling without a type is not implemented",
                              what);
        }
        if ((rc = opt_num(rp, "rope_theta", what, &theta, err)))
            return rc;
    }
    if (!(theta > 0))
        return lm_err_set(err, -EINVAL, "%s: rope_theta must be positive", what);
    c->rope_theta = (float)theta;
    return 0;
}

static int parse_quant(json_t *q, const char *what, model_config *c, lm_err *err)
{
    if (is_null(q))
        return 0;
    if (!json_is_object(q))
        return lm_err_set(err, -EINVAL, "%s: quantization_config must be an object", what);
    json_t *m = json_object_get(q, "quant_method");
    const char *method = json_is_string(m) ? json_string_value(m) : "gptq";
    if (strcmp(method, "gptq"))
        return lm_err_set(err, -ENOTSUP, "%s: quantization method '%s' is not implemented (only gptq)",
                          what, method);
    model_quant_config *qc = &c->quant;
    qc->gptq = 1;
    qc->bits = 4;
    qc->group_size = 128;
    qc->sym = 1;
    qc->desc_act = 0;
    snprintf(qc->checkpoint_format, sizeof qc->checkpoint_format, "gptq");
    int rc;
    if ((rc = opt_int(q, "bits", what, &qc->bits, err)) ||
        (rc = opt_int(q, "group_size", what, &qc->group_size, err)) ||
        (rc = opt_bool(q, "sym", what, &qc->sym, err)) ||
        (rc = opt_bool(q, "desc_act", what, &qc->desc_act, err)))
        return rc;
    if (qc->bits != 4)
        return lm_err_set(err, -ENOTSUP, "%s: GPTQ bits=%d is not implemented (only 4)", what,
                          qc->bits);
    if (qc->group_size == -1)
        qc->group_size = 0;
    json_t *f = json_object_get(q, "checkpoint_format");
    if (!is_null(f)) {
        if (!json_is_string(f) || strcmp(json_string_value(f), "gptq"))
            return lm_err_set(err, -ENOTSUP,
                              "%s: GPTQ checkpoint_format '%s' is not implemented (only 'gptq')",
                              what, json_is_string(f) ? json_string_value(f) : "?");
    }
    return 0;
}

int config_parse(const char *config_json, const char *generation_json, const char *what,
                 model_config *ret, lm_err *err)
{
    model_config c;
    memset(&c, 0, sizeof c);
    json_error_t je;
    json_t *o = json_loads(config_json, 0, &je);
    json_t *g = NULL;
    int rc = 0;
    if (!o || !json_is_object(o)) {
        rc = lm_err_set(err, -EINVAL, "%s: not a JSON object: %s (line %d)", what,
                        o ? "wrong type" : je.text, o ? 0 : je.line);
        goto out;
    }
    json_t *mt = json_object_get(o, "model_type");
    if (!json_is_string(mt)) {
        rc = lm_err_set(err, -EINVAL, "%s: missing required field 'model_type'", what);
        goto out;
    }
    const char *type = json_string_value(mt);
    if (!strcmp(type, "qwen2_moe"))
        c.arch = MODEL_ARCH_QWEN2_MOE;
    else if (!strcmp(type, "qwen3_moe"))
        c.arch = MODEL_ARCH_QWEN3_MOE;
    else if (!strcmp(type, "mixtral"))
        c.arch = MODEL_ARCH_MIXTRAL;
    else {
        rc = lm_err_set(err, -ENOTSUP,
                        "%s: model_type '%s' is not implemented (qwen2_moe, qwen3_moe, mixtral)",
                        what, type);
        goto out;
    }
    snprintf(c.model_type, sizeof c.model_type, "%s", type);
    json_t *act = json_object_get(o, "hidden_act");
    if (!is_null(act) && (!json_is_string(act) || strcmp(json_string_value(act), "silu"))) {
        rc = lm_err_set(err, -ENOTSUP, "%s: hidden_act '%s' is not implemented (only silu)", what,
                        json_is_string(act) ? json_string_value(act) : "?");
        goto out;
    }
    if ((rc = get_pos_int(o, "vocab_size", what, &c.vocab, err)) ||
        (rc = get_pos_int(o, "hidden_size", what, &c.hidden, err)) ||
        (rc = get_pos_int(o, "num_hidden_layers", what, &c.n_layers, err)) ||
        (rc = get_pos_int(o, "num_attention_heads", what, &c.n_heads, err)) ||
        (rc = get_pos_int(o, "intermediate_size", what, &c.intermediate, err)) ||
        (rc = get_pos_int(o, "num_experts_per_tok", what, &c.top_k, err)))
        goto out;
    c.n_kv_heads = c.n_heads;
    if ((rc = opt_int(o, "num_key_value_heads", what, &c.n_kv_heads, err)))
        goto out;
    c.head_dim = c.hidden / c.n_heads;
    if ((rc = opt_int(o, "head_dim", what, &c.head_dim, err)))
        goto out;
    c.n_experts = 0;
    if ((rc = opt_int(o, "num_local_experts", what, &c.n_experts, err)) ||
        (rc = opt_int(o, "num_experts", what, &c.n_experts, err)))
        goto out;
    if (c.n_experts <= 0) {
        rc = lm_err_set(err, -EINVAL, "%s: missing required field 'num_experts' / "
                        "'num_local_experts'", what);
        goto out;
    }
    double eps = c.arch == MODEL_ARCH_MIXTRAL ? 1e-5 : 1e-6;
    if ((rc = opt_num(o, "rms_norm_eps", what, &eps, err)))
        goto out;
    c.rms_eps = (float)eps;
    c.rope_theta = c.arch == MODEL_ARCH_MIXTRAL ? 1e6f : 10000.f;
    if ((rc = parse_rope(o, what, &c, err)))
        goto out;
    c.max_position = c.arch == MODEL_ARCH_MIXTRAL ? 32768 : 32768;
    if ((rc = opt_int(o, "max_position_embeddings", what, &c.max_position, err)))
        goto out;
    if ((rc = opt_bool(o, "tie_word_embeddings", what, &c.tie_embeddings, err)))
        goto out;

    /* Sliding window: refused when it would change the computation. */
    int use_sw = 0;
    if ((rc = opt_bool(o, "use_sliding_window", what, &use_sw, err)))
        goto out;
    json_t *sw = json_object_get(o, "sliding_window");
    int32_t swv = 0;
    if (!is_null(sw) && json_is_integer(sw))
        swv = (int32_t)json_integer_value(sw);
    if ((c.arch == MODEL_ARCH_MIXTRAL && swv > 0 && swv < c.max_position) ||
        (c.arch != MODEL_ARCH_MIXTRAL && use_sw && swv > 0)) {
        rc = lm_err_set(err, -ENOTSUP, "%s: sliding_window %d is active and not implemented",
                        what, swv);
        goto out;
    }
    json_t *lt = json_object_get(o, "layer_types");
    if (json_is_array(lt)) {
        size_t i;
        json_t *e;
        json_array_foreach(lt, i, e) if (json_is_string(e) &&
                                         strcmp(json_string_value(e), "full_attention"))
        {
            rc = lm_err_set(err, -ENOTSUP, "%s: layer_types[%zu] '%s' is not implemented", what,
                            i, json_string_value(e));
            goto out;
        }
    }

    /* Per-architecture fields. */
    int32_t sparse_step = 1;
    if (c.arch == MODEL_ARCH_MIXTRAL) {
        c.moe_intermediate = c.intermediate;
        c.norm_topk_prob = 1;
    } else {
        if ((rc = get_pos_int(o, "moe_intermediate_size", what, &c.moe_intermediate, err)))
            goto out;
        if ((rc = opt_bool(o, "norm_topk_prob", what, &c.norm_topk_prob, err)) ||
            (rc = opt_int(o, "decoder_sparse_step", what, &sparse_step, err)))
            goto out;
        if (sparse_step <= 0) {
            rc = lm_err_set(err, -EINVAL, "%s: decoder_sparse_step must be positive", what);
            goto out;
        }
    }
    if (c.arch == MODEL_ARCH_QWEN2_MOE) {
        c.qkv_bias = 1;
        if ((rc = get_pos_int(o, "shared_expert_intermediate_size", what,
                              &c.shared_intermediate, err)) ||
            (rc = opt_bool(o, "qkv_bias", what, &c.qkv_bias, err)))
            goto out;
    }
    if (c.arch == MODEL_ARCH_QWEN3_MOE) {
        c.qk_norm = 1;
        int ab = 0;
        if ((rc = opt_bool(o, "attention_bias", what, &ab, err)))
            goto out;
        c.qkv_bias = c.o_bias = ab;
    }
    if (c.n_layers > MODEL_MAX_LAYERS) {
        rc = lm_err_set(err, -ENOTSUP, "%s: %d layers, more than the %d supported", what,
                        c.n_layers, MODEL_MAX_LAYERS);
        goto out;
    }
    for (int32_t i = 0; i < c.n_layers; i++)
        c.layer_moe[i] = (uint8_t)((i + 1) % sparse_step == 0);
    json_t *mo = json_object_get(o, "mlp_only_layers");
    if (!is_null(mo) && c.arch != MODEL_ARCH_MIXTRAL) {
        if (!json_is_array(mo)) {
            rc = lm_err_set(err, -EINVAL, "%s: mlp_only_layers must be a list", what);
            goto out;
        }
        size_t i;
        json_t *e;
        json_array_foreach(mo, i, e)
        {
            if (!json_is_integer(e) || json_integer_value(e) < 0 ||
                json_integer_value(e) >= c.n_layers) {
                rc = lm_err_set(err, -EINVAL, "%s: mlp_only_layers[%zu] is not a layer index",
                                what, i);
                goto out;
            }
            c.layer_moe[json_integer_value(e)] = 0;
        }
    }

    /* Consistency. */
    if (c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads) {
        rc = lm_err_set(err, -EINVAL, "%s: num_attention_heads %d is not a multiple of "
                        "num_key_value_heads %d", what, c.n_heads, c.n_kv_heads);
        goto out;
    }
    if (c.head_dim <= 0 || c.head_dim % 2) {
        rc = lm_err_set(err, -EINVAL, "%s: head_dim %d must be positive and even", what,
                        c.head_dim);
        goto out;
    }
    if (c.top_k > c.n_experts) {
        rc = lm_err_set(err, -EINVAL, "%s: num_experts_per_tok %d > number of experts %d", what,
                        c.top_k, c.n_experts);
        goto out;
    }
    c.bos_id = -1;
    if ((rc = opt_int(o, "bos_token_id", what, &c.bos_id, err)) ||
        (rc = parse_eos(json_object_get(o, "eos_token_id"), what, &c, err)))
        goto out;
    if ((rc = parse_quant(json_object_get(o, "quantization_config"), what, &c, err)))
        goto out;
    if (generation_json) {
        g = json_loads(generation_json, 0, &je);
        if (!g || !json_is_object(g)) {
            rc = lm_err_set(err, -EINVAL, "%s: generation_config.json is not a JSON object", what);
            goto out;
        }
        if ((rc = parse_eos(json_object_get(g, "eos_token_id"), what, &c, err)) ||
            (rc = opt_int(g, "bos_token_id", what, &c.bos_id, err)))
            goto out;
    }
    *ret = c;
out:
    json_decref(o);
    json_decref(g);
    return rc;
}

/* Read a whole small text file; NULL with errno set on failure. */
static char *read_text(const char *path, size_t limit)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 8192;
            char *nb = realloc(buf, cap);
            if (!nb || cap > limit) {
                free(nb ? nb : buf);
                fclose(f);
                errno = nb ? EFBIG : ENOMEM;
                return NULL;
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, 4096, f);
        n += r;
        if (r < 4096)
            break;
    }
    fclose(f);
    buf[n] = '\0';
    return buf;
}

int config_load(const char *dir, model_config *ret, lm_err *err)
{
    char path[4096], gpath[4096], qpath[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    snprintf(gpath, sizeof gpath, "%s/generation_config.json", dir);
    snprintf(qpath, sizeof qpath, "%s/quantize_config.json", dir);
    char *cj = read_text(path, 16u << 20);
    if (!cj)
        return lm_err_set(err, -errno, "%s: cannot read: %s", path, strerror(errno));
    char *gj = read_text(gpath, 16u << 20); /* optional */
    int rc = config_parse(cj, gj, path, ret, err);
    /* Older GPTQ checkpoints carry the settings only in quantize_config.json. */
    if (!rc && !ret->quant.gptq) {
        char *qj = read_text(qpath, 1u << 20);
        if (qj) {
            json_t *q = json_loads(qj, 0, NULL);
            if (!q)
                rc = lm_err_set(err, -EINVAL, "%s: not valid JSON", qpath);
            else
                rc = parse_quant(q, qpath, ret, err);
            json_decref(q);
            free(qj);
        }
    }
    free(cj);
    free(gj);
    return rc;
}
