/*
 * synth.c: synthetic hub checkpoints (synth.h).
 *
 * The tensor list is planned first (names, dtypes, shapes, how to fill),
 * split into shards, then each shard is streamed through a
 * safetensors_writer whose fill callback generates the bytes of one tensor
 * from a per-tensor RNG seeded by (seed, name): the same options always
 * give the same files, whatever the chunking.
 */
#include "engine/synth.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/half.h"
#include "engine/safetensors.h"

typedef struct preset {
    const char *name, *arch;
    int32_t vocab, hidden, layers, heads, kv, head_dim, inter, moe_inter, shared, experts, topk;
    int norm_topk;
    int32_t max_pos;
    double theta, eps;
} preset;

/* Published shapes (config.json of Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen3-30B-A3B,
 * mistralai/Mixtral-8x7B-v0.1) and small "tiny" ones per architecture. */
static const preset presets[] = {
    {"qwen1.5-moe-a2.7b", "qwen2_moe", 151936, 2048, 24, 16, 16, 0, 5632, 1408, 5632, 60, 4, 0,
     8192, 1e6, 1e-6},
    {"qwen3-30b-a3b", "qwen3_moe", 151936, 2048, 48, 32, 4, 128, 6144, 768, 0, 128, 8, 1, 40960,
     1e6, 1e-6},
    {"mixtral-8x7b", "mixtral", 32000, 4096, 32, 32, 8, 0, 14336, 14336, 0, 8, 2, 1, 32768, 1e6,
     1e-5},
    {"tiny", "qwen2_moe", 384, 256, 2, 4, 2, 0, 512, 128, 256, 8, 2, 0, 4096, 1e6, 1e-6},
    {"tiny", "qwen3_moe", 384, 256, 2, 4, 2, 64, 512, 128, 0, 8, 2, 1, 4096, 1e6, 1e-6},
    {"tiny", "mixtral", 384, 256, 2, 4, 1, 0, 256, 256, 0, 4, 2, 1, 4096, 1e6, 1e-5},
};

void synth_options_default(synth_options *o)
{
    memset(o, 0, sizeof *o);
    o->arch = "qwen2_moe";
    o->preset = "tiny";
    o->group = 128;
    o->seed = 1234;
}

/* ---- RNG -------------------------------------------------------------------- */

typedef struct rng {
    uint64_t s[4];
} rng;

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_seed(rng *r, uint64_t seed, const char *name)
{
    uint64_t h = seed ^ 0x5bd1e995u;
    for (const char *c = name; *c; c++)
        h = (h ^ (uint8_t)*c) * 0x100000001b3ull;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix(&h);
}

static uint64_t rng_next(rng *r)
{
    uint64_t *s = r->s, res = ((s[1] * 5) << 7 | (s[1] * 5) >> 57) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return res;
}

static double rng_unif(rng *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }

static float rng_normal(rng *r)
{
    double u = rng_unif(r), v = rng_unif(r);
    return (float)(sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v));
}

/* ---- plan --------------------------------------------------------------------- */

typedef enum fill_kind {
    F_NORMAL,                   /* N(mean, std) */
    F_QWEIGHT,                  /* random 4-bit codes */
    F_QZEROS,                   /* stored zero - 1: 7 (sym) or random 0..14 */
    F_SCALES,                   /* fp16 around std/4.6 */
    F_GIDX,                     /* k / group, or a random permutation of it */
} fill_kind;

typedef struct stensor {
    char name[112];
    st_dtype dt;
    int32_t ndim;
    int64_t shape[2];
    fill_kind kind;
    float mean, std;
    int32_t group;              /* F_GIDX */
    int32_t shard;
} stensor;

typedef struct plan {
    stensor *t;
    size_t n, cap;
    const synth_options *o;
    st_dtype fdt;               /* float dtype of unquantized tensors */
    int fail;
} plan;

static stensor *add(plan *p, st_dtype dt, int32_t ndim, int64_t d0, int64_t d1, fill_kind k,
                    float mean, float std, const char *fmt, ...) __attribute__((format(printf, 9, 10)));

#include <stdarg.h>
static stensor *add(plan *p, st_dtype dt, int32_t ndim, int64_t d0, int64_t d1, fill_kind k,
                    float mean, float std, const char *fmt, ...)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 1024;
        stensor *nt = realloc(p->t, cap * sizeof *nt);
        if (!nt) {
            p->fail = 1;
            return NULL;
        }
        p->t = nt;
        p->cap = cap;
    }
    stensor *t = &p->t[p->n++];
    memset(t, 0, sizeof *t);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->dt = dt;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->kind = k;
    t->mean = mean;
    t->std = std;
    return t;
}

/* A linear `prefix` with n outputs and k inputs; quant: may be GPTQ. */
static void add_linear(plan *p, const char *prefix, int32_t n, int32_t k, int bias, int quant)
{
    float std = 1.f / sqrtf((float)k);
    if (quant && p->o->gptq) {
        int32_t g = p->o->group;
        add(p, ST_I32, 2, k / 8, n, F_QWEIGHT, 0, 0, "%s.qweight", prefix);
        add(p, ST_I32, 2, k / g, n / 8, F_QZEROS, 0, 0, "%s.qzeros", prefix);
        add(p, ST_F16, 2, k / g, n, F_SCALES, 0, std, "%s.scales", prefix);
        stensor *gi = add(p, ST_I32, 1, k, 0, F_GIDX, 0, 0, "%s.g_idx", prefix);
        if (gi)
            gi->group = g;
    } else {
        add(p, p->fdt, 2, n, k, F_NORMAL, 0, std, "%s.weight", prefix);
    }
    if (bias)
        add(p, p->fdt, 1, n, 0, F_NORMAL, 0, 0.02f, "%s.bias", prefix);
}

static void add_mlp(plan *p, const char *prefix, const char *g, const char *u, const char *d,
                    int32_t width, int32_t hidden)
{
    char b[320];
    snprintf(b, sizeof b, "%s.%s", prefix, g);
    add_linear(p, b, width, hidden, 0, 1);
    snprintf(b, sizeof b, "%s.%s", prefix, u);
    add_linear(p, b, width, hidden, 0, 1);
    snprintf(b, sizeof b, "%s.%s", prefix, d);
    add_linear(p, b, hidden, width, 0, 1);
}

static void make_plan(plan *p, const preset *ps, int32_t layers)
{
    int mix = !strcmp(ps->arch, "mixtral"), q2 = !strcmp(ps->arch, "qwen2_moe"),
        q3 = !strcmp(ps->arch, "qwen3_moe");
    int32_t H = ps->hidden, D = ps->head_dim ? ps->head_dim : H / ps->heads;
    add(p, p->fdt, 2, ps->vocab, H, F_NORMAL, 0, 1.f, "model.embed_tokens.weight");
    for (int32_t i = 0; i < layers; i++) {
        char pre[64], b[192];
        snprintf(pre, sizeof pre, "model.layers.%d", i);
        add(p, p->fdt, 1, H, 0, F_NORMAL, 1.f, 0.05f, "%s.input_layernorm.weight", pre);
        add(p, p->fdt, 1, H, 0, F_NORMAL, 1.f, 0.05f, "%s.post_attention_layernorm.weight", pre);
        const char *proj[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
        int32_t outs[4] = {ps->heads * D, ps->kv * D, ps->kv * D, H};
        int32_t ins[4] = {H, H, H, ps->heads * D};
        for (int j = 0; j < 4; j++) {
            snprintf(b, sizeof b, "%s.self_attn.%s", pre, proj[j]);
            add_linear(p, b, outs[j], ins[j], q2 && j < 3, 1);
        }
        if (q3) {
            add(p, p->fdt, 1, D, 0, F_NORMAL, 1.f, 0.05f, "%s.self_attn.q_norm.weight", pre);
            add(p, p->fdt, 1, D, 0, F_NORMAL, 1.f, 0.05f, "%s.self_attn.k_norm.weight", pre);
        }
        const char *blk = mix ? "block_sparse_moe" : "mlp";
        add(p, p->fdt, 2, ps->experts, H, F_NORMAL, 0, 2.f / sqrtf((float)H), "%s.%s.gate.weight",
            pre, blk);
        for (int32_t e = 0; e < ps->experts; e++) {
            snprintf(b, sizeof b, "%s.%s.experts.%d", pre, blk, e);
            if (mix)
                add_mlp(p, b, "w1", "w3", "w2", ps->moe_inter, H);
            else
                add_mlp(p, b, "gate_proj", "up_proj", "down_proj", ps->moe_inter, H);
        }
        if (ps->shared) {
            snprintf(b, sizeof b, "%s.mlp.shared_expert", pre);
            add_mlp(p, b, "gate_proj", "up_proj", "down_proj", ps->shared, H);
            add(p, p->fdt, 2, 1, H, F_NORMAL, 0, 1.f / sqrtf((float)H),
                "%s.mlp.shared_expert_gate.weight", pre);
        }
    }
    add(p, p->fdt, 1, H, 0, F_NORMAL, 1.f, 0.05f, "model.norm.weight");
    add(p, p->fdt, 2, ps->vocab, H, F_NORMAL, 0, 3.f / sqrtf((float)H), "lm_head.weight");
}

static size_t tensor_bytes(const stensor *t)
{
    size_t n = st_dtype_size(t->dt);
    for (int32_t d = 0; d < t->ndim; d++)
        n *= (size_t)t->shape[d];
    return n;
}

/* ---- fill --------------------------------------------------------------------- */

typedef struct fill_ctx {
    plan *p;
    size_t *map;                /* writer-local index -> plan index */
    rng r;
    size_t cur;
} fill_ctx;

static int fill(void *user, size_t index, void *buf, size_t offset, size_t len, lm_err *err)
{
    fill_ctx *f = user;
    const stensor *t = &f->p->t[f->map[index]];
    const synth_options *o = f->p->o;
    if (offset == 0 || f->cur != index) {
        rng_seed(&f->r, o->seed, t->name);
        f->cur = index;
    }
    rng *r = &f->r;
    switch (t->kind) {
    case F_NORMAL:
        for (size_t i = 0; i < len / 2 && t->dt != ST_F32; i++) {
            float v = t->mean + t->std * rng_normal(r);
            ((uint16_t *)buf)[i] = t->dt == ST_BF16 ? float_to_bf16(v) : float_to_fp16(v);
        }
        break;
    case F_QWEIGHT:
        for (size_t i = 0; i < len / 4; i++)
            ((uint32_t *)buf)[i] = (uint32_t)rng_next(r);
        break;
    case F_QZEROS:
        for (size_t i = 0; i < len / 4; i++) {
            uint32_t w = 0;
            for (int j = 0; j < 8; j++)
                w |= (o->asym ? (uint32_t)(rng_next(r) % 15) : 7u) << (4 * j);
            ((uint32_t *)buf)[i] = w;
        }
        break;
    case F_SCALES:
        /* uniform codes 0..15 around the zero have std ~4.6 */
        for (size_t i = 0; i < len / 2; i++)
            ((uint16_t *)buf)[i] =
                float_to_fp16(t->std / 4.6f * (float)(0.8 + 0.4 * rng_unif(r)));
        break;
    case F_GIDX: {
        int32_t k = (int32_t)t->shape[0], *g = buf;
        if (offset || len != (size_t)k * 4)
            return lm_err_set(err, -EINVAL, "synth: g_idx '%s' split across chunks", t->name);
        for (int32_t j = 0; j < k; j++)
            g[j] = j / t->group;
        if (o->act_order) /* shuffle: any assignment with `group` inputs per group */
            for (int32_t j = k - 1; j > 0; j--) {
                int32_t s = (int32_t)(rng_next(r) % (uint64_t)(j + 1)), tmp = g[j];
                g[j] = g[s];
                g[s] = tmp;
            }
        break;
    }
    }
    return 0;
}

/* ---- files -------------------------------------------------------------------- */

static int write_json(const char *dir, const char *name, json_t *j, lm_err *err)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int rc = json_dump_file(j, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(j);
    return rc ? lm_err_set(err, -EIO, "%s: cannot write", path) : 0;
}

static json_t *config_json(const preset *ps, const synth_options *o, int32_t layers)
{
    json_t *c = json_object();
    int mix = !strcmp(ps->arch, "mixtral"), q2 = !strcmp(ps->arch, "qwen2_moe");
    const char *archs = mix ? "MixtralForCausalLM" : q2 ? "Qwen2MoeForCausalLM" : "Qwen3MoeForCausalLM";
    json_object_set_new(c, "architectures", json_pack("[s]", archs));
    json_object_set_new(c, "model_type", json_string(ps->arch));
    json_object_set_new(c, "vocab_size", json_integer(ps->vocab));
    json_object_set_new(c, "hidden_size", json_integer(ps->hidden));
    json_object_set_new(c, "intermediate_size", json_integer(ps->inter));
    json_object_set_new(c, "num_hidden_layers", json_integer(layers));
    json_object_set_new(c, "num_attention_heads", json_integer(ps->heads));
    json_object_set_new(c, "num_key_value_heads", json_integer(ps->kv));
    if (ps->head_dim)
        json_object_set_new(c, "head_dim", json_integer(ps->head_dim));
    json_object_set_new(c, "hidden_act", json_string("silu"));
    json_object_set_new(c, "max_position_embeddings", json_integer(ps->max_pos));
    json_object_set_new(c, "rms_norm_eps", json_real(ps->eps));
    json_object_set_new(c, "rope_theta", json_real(ps->theta));
    json_object_set_new(c, "num_experts_per_tok", json_integer(ps->topk));
    json_object_set_new(c, "tie_word_embeddings", json_false());
    json_object_set_new(c, "bos_token_id", json_integer(ps->vocab - 3));
    json_object_set_new(c, "eos_token_id", json_integer(ps->vocab - 1));
    json_object_set_new(c, "torch_dtype", json_string(o->gptq ? "float16" : "bfloat16"));
    if (mix) {
        json_object_set_new(c, "num_local_experts", json_integer(ps->experts));
        json_object_set_new(c, "sliding_window", json_null());
    } else {
        json_object_set_new(c, "num_experts", json_integer(ps->experts));
        json_object_set_new(c, "moe_intermediate_size", json_integer(ps->moe_inter));
        json_object_set_new(c, "norm_topk_prob", json_boolean(ps->norm_topk));
        json_object_set_new(c, "decoder_sparse_step", json_integer(1));
        json_object_set_new(c, "mlp_only_layers", json_array());
        json_object_set_new(c, "use_sliding_window", json_false());
    }
    if (q2) {
        json_object_set_new(c, "shared_expert_intermediate_size", json_integer(ps->shared));
        json_object_set_new(c, "qkv_bias", json_true());
    }
    if (!mix && !q2)
        json_object_set_new(c, "attention_bias", json_false());
    if (o->gptq)
        json_object_set_new(c, "quantization_config",
                            json_pack("{s:s, s:i, s:i, s:b, s:b, s:s}", "quant_method", "gptq",
                                      "bits", 4, "group_size", (int)o->group, "desc_act",
                                      o->act_order, "sym", !o->asym, "checkpoint_format", "gptq"));
    return c;
}

int synth_write(const char *outdir, const synth_options *opt, lm_err *err)
{
    synth_options o = *opt;
    if (o.group <= 0)
        o.group = 128;
    const preset *ps = NULL;
    for (size_t i = 0; i < sizeof presets / sizeof *presets; i++)
        if (!strcmp(presets[i].name, o.preset) && (!o.arch || !strcmp(presets[i].arch, o.arch)))
            ps = &presets[i];
    if (!ps)
        return lm_err_set(err, -EINVAL, "synth: no preset '%s' for arch '%s' (presets: tiny for "
                          "qwen2_moe/qwen3_moe/mixtral, qwen1.5-moe-a2.7b (qwen2_moe), "
                          "qwen3-30b-a3b (qwen3_moe), mixtral-8x7b (mixtral))",
                          o.preset, o.arch ? o.arch : "?");
    int32_t layers = o.layers > 0 ? o.layers : ps->layers;
    int32_t dims[4] = {ps->hidden, ps->moe_inter, ps->shared ? ps->shared : ps->hidden,
                       ps->heads * (ps->head_dim ? ps->head_dim : ps->hidden / ps->heads)};
    for (int i = 0; o.gptq && i < 4; i++)
        if (o.group % 32 || dims[i] % o.group)
            return lm_err_set(err, -EINVAL, "synth: GPTQ group %d does not divide %d (a layer "
                              "width of preset %s)", o.group, dims[i], ps->name);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", outdir);
    for (char *c = tmp + 1;; c++) { /* mkdir -p */
        char save = *c;
        if (save != '/' && save != '\0')
            continue;
        *c = '\0';
        if (mkdir(tmp, 0755) && errno != EEXIST)
            return lm_err_set(err, -errno, "%s: cannot create: %s", tmp, strerror(errno));
        *c = save;
        if (!save)
            break;
    }
    plan p = {.o = &o, .fdt = o.gptq ? ST_F16 : ST_BF16};
    make_plan(&p, ps, layers);
    if (p.fail) {
        free(p.t);
        return lm_err_set(err, -ENOMEM, "synth: out of memory");
    }
    /* shards */
    size_t limit = o.shard_bytes ? o.shard_bytes : ((size_t)2 << 30), cur = 0, total = 0;
    int32_t n_shards = 1;
    for (size_t i = 0; i < p.n; i++) {
        size_t b = tensor_bytes(&p.t[i]);
        if (cur && cur + b > limit) {
            n_shards++;
            cur = 0;
        }
        p.t[i].shard = n_shards - 1;
        cur += b;
        total += b;
    }
    int rc = 0;
    size_t *map = malloc(p.n * sizeof *map);
    json_t *wm = json_object();
    for (int32_t s = 0; !rc && s < n_shards; s++) {
        char fname[64], path[4096];
        if (n_shards == 1)
            snprintf(fname, sizeof fname, "model.safetensors");
        else
            snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", s + 1, n_shards);
        snprintf(path, sizeof path, "%s/%s", outdir, fname);
        safetensors_writer *w = NULL;
        if (!map || (rc = safetensors_writer_create(&w, err)))
            rc = rc ? rc : lm_err_set(err, -ENOMEM, "synth: out of memory");
        size_t nw = 0;
        for (size_t i = 0; !rc && i < p.n; i++) {
            if (p.t[i].shard != s)
                continue;
            int idx = safetensors_writer_add(w, p.t[i].name, p.t[i].dt, p.t[i].ndim, p.t[i].shape,
                                             NULL, err);
            if (idx < 0)
                rc = idx;
            map[nw++] = i;
            json_object_set_new(wm, p.t[i].name, json_string(fname));
        }
        fill_ctx fc = {.p = &p, .map = map, .cur = (size_t)-1};
        if (!rc)
            rc = safetensors_writer_write(w, path, fill, &fc, err);
        safetensors_writer_free(w);
    }
    if (!rc && n_shards > 1) {
        json_t *idx = json_object();
        json_object_set_new(idx, "metadata", json_pack("{s:I}", "total_size", (json_int_t)total));
        json_object_set(idx, "weight_map", wm);
        rc = write_json(outdir, "model.safetensors.index.json", idx, err);
    }
    json_decref(wm);
    free(map);
    free(p.t);
    if (!rc)
        rc = write_json(outdir, "config.json", config_json(ps, &o, layers), err);
    if (!rc)
        rc = write_json(outdir, "generation_config.json",
                        json_pack("{s:i, s:[i, i], s:b}", "bos_token_id", ps->vocab - 3,
                                  "eos_token_id", ps->vocab - 1, ps->vocab - 3, "do_sample", 0),
                        err);
    if (!rc && o.gptq)
        rc = write_json(outdir, "quantize_config.json",
                        json_pack("{s:i, s:i, s:b, s:b, s:s, s:s}", "bits", 4, "group_size",
                                  (int)o.group, "desc_act", o.act_order, "sym", !o.asym,
                                  "quant_method", "gptq", "checkpoint_format", "gptq"),
                        err);
    if (!rc)
        rc = synth_write_tokenizer(outdir, ps->vocab, err);
    return rc;
}
