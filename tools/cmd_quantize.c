/*
 * cmd_quantize.c: `lightmoe quantize`, a bf16/fp16 checkpoint -> a GPTQ
 * 4-bit checkpoint (v1 layout) with engine/quantize.h.
 *
 * Calibration: --calib FILE is either text (tokenized with the model's
 * tokenizer, no special tokens, cut into non-overlapping windows of
 * --seqlen tokens spread evenly over the text; the last --heldout windows
 * are held out for the error report) or a .safetensors file with an int32
 * `input_ids` [rows][len] tensor (rows used in order, first --nsamples for
 * calibration, the next --heldout held out). Progress goes to stderr, the
 * per-layer report and the summary to stdout.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/quantize.h"
#include "engine/safetensors.h"
#include "engine/tokenizer.h"
#include "tools/cmd.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: lightmoe quantize --model IN --out OUT [options]\n"
            "\n"
            "Quantize a bf16/fp16 MoE checkpoint to 4-bit GPTQ (checkpoint_format gptq).\n"
            "Router gates, shared-expert gate, norms, embeddings and lm_head stay 16-bit.\n"
            "\n"
            "  --method gptq|rtn       GPTQ (default; needs --calib) or round-to-nearest\n"
            "  --group N               inputs per scale/zero group, multiple of 32 (128)\n"
            "  --sym | --asym          symmetric (zero 8, default) or asymmetric zeros\n"
            "  --act-order             GPTQ: quantize inputs by decreasing activation (desc_act)\n"
            "  --calib FILE            calibration text, or .safetensors with int32 input_ids\n"
            "  --nsamples N            calibration sequences (128)\n"
            "  --seqlen L              tokens per sequence (512)\n"
            "  --heldout N             extra held-out sequences for the error report\n"
            "                          (nsamples/8, at least 1)\n"
            "  --damp F                GPTQ dampening, fraction of mean diag(H) (0.01)\n"
            "  --device cpu|cuda       where GPTQ runs each Linear: CPU (default) or the GPU\n"
            "                          (cuSOLVER/cuBLAS; needs a CUDA build and device)\n"
            "  --min-expert-tokens N   experts routed fewer calibration tokens are calibrated\n"
            "                          on all tokens of the layer (%d)\n"
            "  --max-shard-mb N        split model.safetensors above N MiB (4096)\n"
            "  --quiet                 no progress display\n",
            QUANTIZE_DEFAULT_MIN_EXPERT_TOKENS);
}

typedef struct cli_state {
    int quiet, tty;
    int last_layer;
} cli_state;

static void on_progress(void *user, const quantize_progress *p)
{
    cli_state *s = user;
    if (s->quiet)
        return;
    char item[32] = "";
    if (p->n_items)
        snprintf(item, sizeof item, " %d/%d", p->item, p->n_items);
    char eta[32] = "?";
    if (p->eta_s >= 0)
        snprintf(eta, sizeof eta, "%.0fs", p->eta_s);
    if (s->tty) {
        fprintf(stderr, "\r\033[K[layer %d/%d] %s%s  elapsed %.1fs  ETA %s",
                p->layer < p->n_layers ? p->layer + 1 : p->n_layers, p->n_layers, p->stage,
                item, p->elapsed_s, eta);
        if (!strcmp(p->stage, "writing"))
            fprintf(stderr, "\n");
    } else if (p->layer != s->last_layer) {
        fprintf(stderr, "[layer %d/%d] %s  elapsed %.1fs  ETA %s\n",
                p->layer < p->n_layers ? p->layer + 1 : p->n_layers, p->n_layers, p->stage,
                p->elapsed_s, eta);
    }
    s->last_layer = p->layer;
}

static void on_layer(void *user, const quantize_layer_stats *st)
{
    cli_state *s = user;
    if (s->tty && !s->quiet)
        fprintf(stderr, "\r\033[K");
    if (st->ref > 0) {
        printf("layer %2d: %3d linears  held-out rel. error %.4e (RTN %.4e, %.2fx)  "
               "worse than RTN: %d  min expert tokens %lld  fallback experts %d\n",
               st->layer, st->n_linears, st->err_method / st->ref, st->err_rtn / st->ref,
               st->err_method > 0 ? st->err_rtn / st->err_method : 0.0, st->worse_linears,
               (long long)(st->min_expert_tokens == INT64_MAX ? 0 : st->min_expert_tokens),
               st->n_fallback_experts);
    } else {
        printf("layer %2d: %3d linears quantized\n", st->layer, st->n_linears);
    }
    fflush(stdout);
}

static int ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

/* Calibration windows from a text file: *ret [(ncal + nheld) * len]. */
static int calib_text(const char *model, const char *path, int32_t ncal, int32_t nheld,
                      int32_t len, int32_t **ret, lm_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return lm_err_set(err, -errno, "%s: cannot open calibration text", path);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)(sz > 0 ? sz : 1));
    size_t got = text ? fread(text, 1, (size_t)sz, f) : 0;
    fclose(f);
    if (!text || got != (size_t)sz) {
        free(text);
        return lm_err_set(err, -EIO, "%s: cannot read", path);
    }
    tokenizer *tok = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = tokenizer_load(model, &tok, err);
    if (!rc)
        rc = tokenizer_encode(tok, text, got, false, &ids, &n, err);
    tokenizer_free(tok);
    free(text);
    if (rc)
        return lm_err_prefix(err, "%s", path);
    int64_t nwin = (int64_t)ncal + nheld, need = nwin * len;
    if ((int64_t)n < need) {
        free(ids);
        return lm_err_set(err, -EINVAL, "%s: calibration text too short: %zu tokens, need %lld "
                          "(%d + %d held-out sequences of %d); give a longer text or lower "
                          "--nsamples/--seqlen", path, n, (long long)need, ncal, nheld, len);
    }
    int32_t *out = malloc(sizeof(int32_t) * (size_t)need);
    if (!out) {
        free(ids);
        return lm_err_set(err, -ENOMEM, "out of memory");
    }
    int64_t stride = (int64_t)n / nwin; /* >= len: windows never overlap */
    for (int64_t w = 0; w < nwin; w++)
        memcpy(out + w * len, ids + w * stride, sizeof(int32_t) * (size_t)len);
    free(ids);
    *ret = out;
    fprintf(stderr, "calibration: %zu tokens of text, %d + %d windows of %d tokens\n", n, ncal,
            nheld, len);
    return 0;
}

static int calib_safetensors(const char *path, int32_t ncal, int32_t nheld, int32_t len,
                             int32_t **ret, lm_err *err)
{
    safetensors_file *f = NULL;
    int rc = safetensors_open(path, &f, err);
    if (rc)
        return rc;
    const safetensors_tensor *t = safetensors_find(f, "input_ids");
    if (!t || t->dtype != ST_I32 || t->ndim != 2) {
        safetensors_close(f);
        return lm_err_set(err, -EINVAL, "%s: needs an int32 'input_ids' tensor [rows][len]",
                          path);
    }
    int64_t rows = t->shape[0], cols = t->shape[1];
    if (rows < (int64_t)ncal + nheld || cols < len) {
        safetensors_close(f);
        return lm_err_set(err, -EINVAL, "%s: calibration too short: input_ids is [%lld][%lld], "
                          "need %d + %d rows of at least %d tokens", path, (long long)rows,
                          (long long)cols, ncal, nheld, len);
    }
    int32_t *out = malloc(sizeof(int32_t) * (size_t)(ncal + nheld) * len);
    if (!out) {
        safetensors_close(f);
        return lm_err_set(err, -ENOMEM, "out of memory");
    }
    for (int32_t r = 0; r < ncal + nheld; r++)
        memcpy(out + (int64_t)r * len, (const int32_t *)t->data + r * cols,
               sizeof(int32_t) * (size_t)len);
    safetensors_close(f);
    *ret = out;
    return 0;
}

static int parse_int(const char *s, int32_t lo, int32_t *ret)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end || v < lo || v > (1L << 30))
        return -1;
    *ret = (int32_t)v;
    return 0;
}

static int quantize_main(int argc, char **argv)
{
    quantize_opts o;
    memset(&o, 0, sizeof o);
    gptq_params_default(&o.gptq);
    const char *calib = NULL;
    int32_t nsamples = 128, seqlen = 512, heldout = -1, shard_mb = 0;
    cli_state st = {0, isatty(2), -1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--sym")) {
            o.gptq.sym = 1;
        } else if (!strcmp(a, "--asym")) {
            o.gptq.sym = 0;
        } else if (!strcmp(a, "--act-order")) {
            o.gptq.act_order = 1;
        } else if (!strcmp(a, "--quiet")) {
            st.quiet = 1;
        } else if (!v) {
            fprintf(stderr, "lightmoe quantize: unknown option or missing value: %s\n", a);
            usage(stderr);
            return 2;
        } else {
            i++;
            if (!strcmp(a, "--model"))
                o.model_dir = v;
            else if (!strcmp(a, "--out"))
                o.out_dir = v;
            else if (!strcmp(a, "--calib"))
                calib = v;
            else if (!strcmp(a, "--device")) {
                if (!strcmp(v, "cpu"))
                    o.gptq_cuda = 0;
                else if (!strcmp(v, "cuda"))
                    o.gptq_cuda = 1;
                else
                    bad = 1;
            } else if (!strcmp(a, "--method")) {
                if (!strcmp(v, "gptq"))
                    o.gptq.method = GPTQ_METHOD_GPTQ;
                else if (!strcmp(v, "rtn"))
                    o.gptq.method = GPTQ_METHOD_RTN;
                else
                    bad = 1;
            } else if (!strcmp(a, "--group"))
                bad = parse_int(v, 1, &o.gptq.group);
            else if (!strcmp(a, "--nsamples"))
                bad = parse_int(v, 1, &nsamples);
            else if (!strcmp(a, "--seqlen"))
                bad = parse_int(v, 2, &seqlen);
            else if (!strcmp(a, "--heldout"))
                bad = parse_int(v, 0, &heldout);
            else if (!strcmp(a, "--min-expert-tokens"))
                bad = parse_int(v, 1, &o.min_expert_tokens);
            else if (!strcmp(a, "--max-shard-mb"))
                bad = parse_int(v, 1, &shard_mb);
            else if (!strcmp(a, "--damp")) {
                char *end;
                o.gptq.percdamp = strtod(v, &end);
                bad = *end || !(o.gptq.percdamp > 0 && o.gptq.percdamp < 10);
            } else {
                fprintf(stderr, "lightmoe quantize: unknown option %s\n", a);
                usage(stderr);
                return 2;
            }
            if (bad) {
                fprintf(stderr, "lightmoe quantize: bad value for %s: '%s'\n", a, v);
                return 2;
            }
        }
    }
    if (!o.model_dir || !o.out_dir) {
        fprintf(stderr, "lightmoe quantize: --model and --out are required\n");
        usage(stderr);
        return 2;
    }
    if (o.gptq.method == GPTQ_METHOD_GPTQ && !calib) {
        fprintf(stderr, "lightmoe quantize: GPTQ needs calibration text: --calib FILE "
                        "(or --method rtn)\n");
        return 2;
    }
    if (o.gptq.method == GPTQ_METHOD_RTN && o.gptq.act_order) {
        fprintf(stderr, "lightmoe quantize: --act-order applies to GPTQ only\n");
        return 2;
    }
    if (heldout < 0)
        heldout = nsamples / 8 > 0 ? nsamples / 8 : 1;
    o.max_shard_bytes = (size_t)shard_mb << 20;
    o.on_progress = on_progress;
    o.on_layer = on_layer;
    o.user = &st;

    lm_err err = {0};
    int32_t *tokens = NULL;
    /* cheap checks first: a bad model or group fails before tokenizing */
    quantize_opts pre = o;
    int32_t dummy[2] = {0, 0};
    if (calib) {
        pre.tokens = dummy;
        pre.n_calib = 1;
        pre.seq_len = 2;
    }
    int rc = quantize_check(&pre, &err);
    if (!rc && calib)
        rc = ends_with(calib, ".safetensors")
                 ? calib_safetensors(calib, nsamples, heldout, seqlen, &tokens, &err)
                 : calib_text(o.model_dir, calib, nsamples, heldout, seqlen, &tokens, &err);
    if (rc) {
        fprintf(stderr, "lightmoe quantize: %s\n", err.msg);
        return 2;
    }
    o.tokens = tokens;
    o.n_calib = tokens ? nsamples : 0;
    o.n_heldout = tokens ? heldout : 0;
    o.seq_len = tokens ? seqlen : 0;
    printf("quantize %s -> %s: %s, group %d, %s%s%s\n", o.model_dir, o.out_dir,
           o.gptq.method == GPTQ_METHOD_GPTQ ? "GPTQ" : "RTN", o.gptq.group,
           o.gptq.sym ? "sym" : "asym", o.gptq.act_order ? ", act-order" : "",
           o.gptq_cuda ? ", on the GPU" : "");
    quantize_summary sum;
    rc = quantize_run(&o, &sum, &err);
    free(tokens);
    if (rc) {
        if (st.tty && !st.quiet)
            fprintf(stderr, "\n");
        fprintf(stderr, "lightmoe quantize: %s\n", err.msg);
        return rc == -EINVAL || rc == -ENOTSUP || rc == -ENOENT ? 2 : 1;
    }
    printf("wrote %s: %d shard(s), %zu bytes of tensors (source %zu, %.1f%% smaller)\n",
           o.out_dir, sum.n_shards, sum.bytes_out, sum.bytes_in,
           100.0 * (1.0 - (double)sum.bytes_out / (double)sum.bytes_in));
    printf("quantized linears: %d, %zu bytes incl. scales/zeros/g_idx (16-bit: %zu, %.1f%% "
           "smaller)\n", sum.n_linears, sum.bytes_linear_out, sum.bytes_linear_in,
           100.0 * (1.0 - (double)sum.bytes_linear_out / (double)sum.bytes_linear_in));
    return 0;
}

CMD_REGISTER(quantize, "quantize", "quantize a bf16/fp16 checkpoint to 4-bit GPTQ",
             quantize_main)
