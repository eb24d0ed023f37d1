/*
 * cmd_perplexity.c: `lightmoe perplexity`, the quality of a model (and of
 * its drift from a baseline) on a fixed token set.
 *
 * The eval file is a .safetensors with an int32 `input_ids` [rows][len].
 * Each row is one sequence from position 0; its logits at every position
 * come from one teacher-forced forward step of the backend (all rows of
 * logits). perplexity = exp(mean over rows and positions t < len-1 of
 * -log p(token t+1 | tokens <= t)), the definition of the fixtures README.
 * With --baseline, the same rows run through a second model and for every
 * position the KL divergence KL(baseline || model) of the two next-token
 * distributions and whether their argmax agree are averaged.
 *
 * Devices: cpu / cuda go through engine/backends.h (the serving backends,
 * weights as the engine loads them: 16-bit, GPTQ repacked to INT4, or RTN
 * INT4 at load with --quantize int4); `ref` is the float32 calibration
 * forward of engine/quantize_fwd.h (GPTQ weights dequantized), a second,
 * independent implementation for cross-checks. Log-sums are in double.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/backends.h"
#include "engine/model.h"
#include "engine/quantize_fwd.h"
#include "engine/safetensors.h"
#include "tools/cmd.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: lightmoe perplexity --model DIR --eval FILE.safetensors [options]\n"
            "\n"
            "Perplexity of next-token prediction over every row and position of the\n"
            "file's int32 input_ids [rows][len]; with --baseline, the mean KL divergence\n"
            "KL(baseline || model) of the next-token distributions and top-1 agreement.\n"
            "\n"
            "  --device cpu|cuda|ref   backend (cpu); ref = float32 reference forward\n"
            "  --tp N                  tensor-parallel ranks (1)\n"
            "  --threads N             cpu threads (0: all cores)\n"
            "  --quantize int4         quantize 16-bit weights to INT4 at load (RTN)\n"
            "  --group N               group size for --quantize int4 (128)\n"
            "  --baseline DIR          reference model for KL / top-1 agreement (loaded\n"
            "                          as is, same device)\n"
            "  --rows N                use only the first N rows\n"
            "  --expect PPL            exit 1 unless |ppl/PPL - 1| <= --expect-rtol (1e-3)\n");
}

/* ---- a model that produces logits for whole rows ---------------------- */

typedef struct runner {
    int ref;                    /* 1: quantize_fwd reference */
    model *m;
    backend *b;
    qfwd_model q;
    int32_t vocab;
    size_t weight_bytes;        /* as loaded (backends only) */
} runner;

static size_t model_weight_bytes(const model *m)
{
    size_t s = linear_bytes(&m->embed);
    if (!m->cfg.tie_embeddings)
        s += linear_bytes(&m->lm_head);
    for (int32_t i = 0; i < m->cfg.n_layers; i++) {
        const layer_weights *l = &m->layers[i];
        s += linear_bytes(&l->q) + linear_bytes(&l->k) + linear_bytes(&l->v) + linear_bytes(&l->o);
        const mlp_weights *mlps = l->is_moe ? l->experts : &l->mlp;
        int32_t n = l->is_moe ? m->cfg.n_experts : 1;
        for (int32_t e = 0; e < n; e++)
            s += linear_bytes(&mlps[e].gate) + linear_bytes(&mlps[e].up) +
                 linear_bytes(&mlps[e].down);
        if (l->is_moe)
            s += linear_bytes(&l->router);
        if (l->has_shared)
            s += linear_bytes(&l->shared.gate) + linear_bytes(&l->shared.up) +
                 linear_bytes(&l->shared.down) + linear_bytes(&l->shared_gate);
    }
    return s;
}

static int runner_open(runner *r, const char *dir, const char *device, int tp, int threads,
                       int quant_int4, int32_t group, int32_t len, lm_err *err)
{
    memset(r, 0, sizeof *r);
    if (!strcmp(device, "ref")) {
        if (quant_int4 || tp > 1)
            return lm_err_set(err, -EINVAL, "device ref: no --quantize or --tp");
        int rc = qfwd_model_open(dir, &r->q, err);
        if (rc)
            return rc;
        r->q.allow_gptq = 1;
        r->ref = 1;
        r->vocab = r->q.cfg.vocab;
        return 0;
    }
    model_load_options mo;
    model_load_options_default(&mo);
    mo.quantize_int4 = quant_int4;
    if (group > 0)
        mo.group = group;
    int rc = model_load(dir, &mo, &r->m, err);
    if (rc)
        return rc;
    backend_options bo;
    backend_options_default(&bo);
    bo.device = device;
    bo.tp = tp;
    bo.threads = threads;
    bo.max_tokens = len;
    rc = backend_open(r->m, &bo, &r->b, err);
    int32_t bs = 16;
    if (!rc)
        rc = backend_kv_init(r->b, bs, (len + bs - 1) / bs, err);
    if (rc)
        return rc;
    backend_info info;
    backend_get_info(r->b, &info);
    r->vocab = info.vocab;
    r->weight_bytes = model_weight_bytes(r->m);
    return 0;
}

static void runner_close(runner *r)
{
    backend_destroy(r->b);
    model_free(r->m);
    qfwd_model_close(&r->q);
    memset(r, 0, sizeof *r);
}

/* logits [n_rows*len][vocab] for n_rows sequences tokens [n_rows][len]. */
static int runner_logits(runner *r, const int32_t *tokens, int32_t n_rows, int32_t len,
                         float *logits, lm_err *err)
{
    if (r->ref) {
        const qfwd_model *m = &r->q;
        int64_t t = (int64_t)n_rows * len;
        float *h = malloc(sizeof(float) * (size_t)t * m->cfg.hidden);
        if (!h)
            return lm_err_set(err, -ENOMEM, "out of memory");
        int rc = qfwd_embed(m, tokens, t, h, err);
        for (int32_t i = 0; !rc && i < m->cfg.n_layers; i++) {
            qfwd_layer l;
            rc = qfwd_layer_load(m, i, &l, err);
            if (!rc)
                rc = qfwd_layer_forward(m, &l, h, n_rows, len, err);
            qfwd_layer_free(&l);
        }
        if (!rc)
            rc = qfwd_logits(m, h, t, logits, err);
        free(h);
        return rc;
    }
    int32_t nb = (len + 15) / 16;
    int32_t *blocks = malloc(sizeof(int32_t) * (size_t)nb);
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)len);
    if (!blocks || !rows) {
        free(blocks);
        free(rows);
        return lm_err_set(err, -ENOMEM, "out of memory");
    }
    for (int32_t i = 0; i < nb; i++)
        blocks[i] = i;
    for (int32_t i = 0; i < len; i++)
        rows[i] = i;
    int rc = 0;
    for (int32_t s = 0; s < n_rows && !rc; s++) {
        int32_t seq_start[2] = {0, len}, start_pos = 0;
        backend_batch b = {.n_seqs = 1,
                           .n_tokens = len,
                           .tokens = tokens + (int64_t)s * len,
                           .seq_start = seq_start,
                           .start_pos = &start_pos,
                           .block_table = blocks,
                           .max_blocks = nb,
                           .n_logits = len,
                           .logit_rows = rows,
                           .logits = logits + (int64_t)s * len * r->vocab};
        rc = backend_forward(r->b, &b, err);
    }
    free(blocks);
    free(rows);
    return rc;
}

/* ---- statistics --------------------------------------------------------- */

/* log-softmax of row into out (double), returns nothing */
static void log_softmax(const float *row, int32_t v, double *out)
{
    double mx = row[0], s = 0;
    for (int32_t i = 1; i < v; i++)
        mx = row[i] > mx ? row[i] : mx;
    for (int32_t i = 0; i < v; i++)
        s += exp((double)row[i] - mx);
    double lse = mx + log(s);
    for (int32_t i = 0; i < v; i++)
        out[i] = (double)row[i] - lse;
}

static int32_t argmax(const float *row, int32_t v)
{
    int32_t b = 0;
    for (int32_t i = 1; i < v; i++)
        if (row[i] > row[b])
            b = i;
    return b;
}

typedef struct stats {
    double nll, nll_base, kl;
    int64_t n, agree;
} stats;

static void accumulate(stats *st, const int32_t *tok, int32_t len, const float *lg,
                       const float *base, int32_t v, double *lp, double *lq)
{
    for (int32_t t = 0; t + 1 < len; t++) {
        const float *row = lg + (int64_t)t * v;
        log_softmax(row, v, lq);
        st->nll -= lq[tok[t + 1]];
        st->n++;
        if (base) {
            const float *brow = base + (int64_t)t * v;
            log_softmax(brow, v, lp);
            st->nll_base -= lp[tok[t + 1]];
            double kl = 0;
            for (int32_t i = 0; i < v; i++)
                kl += exp(lp[i]) * (lp[i] - lq[i]);
            st->kl += kl;
            st->agree += argmax(row, v) == argmax(brow, v);
        }
    }
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int perplexity_main(int argc, char **argv)
{
    const char *model_dir = NULL, *eval = NULL, *baseline = NULL, *device = "cpu";
    int tp = 1, threads = 0, quant = 0;
    int32_t group = 0, max_rows = 0;
    double expect = 0, rtol = 1e-3;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!v) {
            fprintf(stderr, "lightmoe perplexity: unknown option or missing value: %s\n", a);
            usage(stderr);
            return 2;
        }
        i++;
        char *end = NULL;
        if (!strcmp(a, "--model"))
            model_dir = v;
        else if (!strcmp(a, "--eval"))
            eval = v;
        else if (!strcmp(a, "--baseline"))
            baseline = v;
        else if (!strcmp(a, "--device"))
            device = v;
        else if (!strcmp(a, "--tp"))
            tp = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--threads"))
            threads = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--group"))
            group = (int32_t)strtol(v, &end, 10);
        else if (!strcmp(a, "--rows"))
            max_rows = (int32_t)strtol(v, &end, 10);
        else if (!strcmp(a, "--expect"))
            expect = strtod(v, &end);
        else if (!strcmp(a, "--expect-rtol"))
            rtol = strtod(v, &end);
        else if (!strcmp(a, "--quantize")) {
            if (strcmp(v, "int4")) {
                fprintf(stderr, "lightmoe perplexity: --quantize takes int4, not '%s'\n", v);
                return 2;
            }
            quant = 1;
        } else {
            fprintf(stderr, "lightmoe perplexity: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
        if (end && (*end || end == v || tp < 1 || threads < 0 || group < 0 || max_rows < 0)) {
            fprintf(stderr, "lightmoe perplexity: bad value for %s: '%s'\n", a, v);
            return 2;
        }
    }
    if (!model_dir || !eval) {
        fprintf(stderr, "lightmoe perplexity: --model and --eval are required\n");
        usage(stderr);
        return 2;
    }
    if (group && !quant) {
        fprintf(stderr, "lightmoe perplexity: --group applies to --quantize int4\n");
        return 2;
    }
    lm_err err = {0};
    safetensors_file *ef = NULL;
    if (safetensors_open(eval, &ef, &err)) {
        fprintf(stderr, "lightmoe perplexity: %s\n", err.msg);
        return 2;
    }
    const safetensors_tensor *it = safetensors_find(ef, "input_ids");
    if (!it || it->dtype != ST_I32 || it->ndim != 2 || it->shape[0] < 1 || it->shape[1] < 2) {
        fprintf(stderr, "lightmoe perplexity: %s: needs an int32 'input_ids' tensor [rows][len] "
                        "with len >= 2\n", eval);
        safetensors_close(ef);
        return 2;
    }
    int32_t rows = (int32_t)it->shape[0], len = (int32_t)it->shape[1];
    if (max_rows > 0 && max_rows < rows)
        rows = max_rows;
    const int32_t *tokens = it->data;

    runner mr, br;
    memset(&br, 0, sizeof br);
    int rc = runner_open(&mr, model_dir, device, tp, threads, quant, group, len, &err);
    if (!rc && baseline)
        rc = runner_open(&br, baseline, device, tp, threads, 0, 0, len, &err);
    if (!rc && baseline && br.vocab != mr.vocab)
        rc = lm_err_set(&err, -EINVAL, "baseline vocabulary %d differs from the model's %d",
                        br.vocab, mr.vocab);
    int32_t v = mr.vocab;
    for (int64_t i = 0; !rc && i < (int64_t)rows * len; i++)
        if (tokens[i] < 0 || tokens[i] >= v)
            rc = lm_err_set(&err, -EINVAL, "%s: input_ids[%lld][%lld] = %d outside the "
                            "vocabulary (%d)", eval, (long long)(i / len), (long long)(i % len),
                            tokens[i], v);
    if (rc) {
        fprintf(stderr, "lightmoe perplexity: %s\n", err.msg);
        runner_close(&mr);
        runner_close(&br);
        safetensors_close(ef);
        return rc == -ENODEV || rc == -EINVAL || rc == -ENOENT || rc == -ENOTSUP ? 2 : 1;
    }
    /* rows in batches (the ref device runs a batch as one block) */
    int32_t batch = mr.ref ? 8 : 1;
    float *lg = malloc(sizeof(float) * (size_t)batch * len * v);
    float *bl = baseline ? malloc(sizeof(float) * (size_t)batch * len * v) : NULL;
    double *lp = malloc(sizeof(double) * (size_t)v), *lq = malloc(sizeof(double) * (size_t)v);
    stats st = {0};
    double t0 = now();
    int tty = isatty(2);
    for (int32_t r0 = 0; r0 < rows && !rc; r0 += batch) {
        int32_t nr = rows - r0 < batch ? rows - r0 : batch;
        const int32_t *tk = tokens + (int64_t)r0 * len;
        rc = runner_logits(&mr, tk, nr, len, lg, &err);
        if (!rc && baseline)
            rc = runner_logits(&br, tk, nr, len, bl, &err);
        for (int32_t r = 0; !rc && r < nr; r++)
            accumulate(&st, tk + (int64_t)r * len, len, lg + (int64_t)r * len * v,
                       bl ? bl + (int64_t)r * len * v : NULL, v, lp, lq);
        if (tty)
            fprintf(stderr, "\r\033[Krows %d/%d  %.1fs", r0 + nr, rows, now() - t0);
    }
    if (tty)
        fprintf(stderr, "\n");
    int ret = 0;
    if (rc) {
        fprintf(stderr, "lightmoe perplexity: %s\n", err.msg);
        ret = 1;
    } else {
        double ppl = exp(st.nll / (double)st.n);
        printf("model %s (%s%s)\n", model_dir, device, quant ? ", --quantize int4" : "");
        printf("perplexity %.4f over %lld tokens (%d rows x %d predictions)\n", ppl,
               (long long)st.n, rows, len - 1);
        if (mr.weight_bytes)
            printf("weight bytes as loaded: %zu\n", mr.weight_bytes);
        if (baseline) {
            double bppl = exp(st.nll_base / (double)st.n);
            printf("baseline %s perplexity %.4f; ratio %.4f\n", baseline, bppl, ppl / bppl);
            printf("KL(baseline || model) %.5f nats/token; top-1 agreement %.2f%%\n",
                   st.kl / (double)st.n, 100.0 * (double)st.agree / (double)st.n);
        }
        if (expect > 0) {
            double rel = fabs(ppl / expect - 1);
            printf("expected %.4f: relative difference %.2e (tolerance %.1e) %s\n", expect, rel,
                   rtol, rel <= rtol ? "ok" : "FAILED");
            ret = rel <= rtol ? 0 : 1;
        }
    }
    free(lg);
    free(bl);
    free(lp);
    free(lq);
    runner_close(&mr);
    runner_close(&br);
    safetensors_close(ef);
    return ret;
}

CMD_REGISTER(perplexity, "perplexity", "perplexity, KL and top-1 agreement on a token set",
             perplexity_main)
