/*
 * cmd_verify.c: `lightmoe verify`: check a backend against reference
 * outputs computed by transformers.
 *
 * DIR holds a hub checkpoint plus reference.safetensors (p{i}.input_ids,
 * p{i}.greedy_ids, p{i}.logits [T+N][V]) and reference.json (prompts).
 * For each prompt:
 *   1. teacher-forced through the incremental path: the prompt as one
 *      prefill piece (logits of every row), then each reference greedy
 *      token as a one-token decode step; every row is compared with the
 *      reference logits (max |delta|, and relative: max |delta| / max |ref|
 *      of the row);
 *   2. an independent greedy decode of N tokens from the prompt, compared
 *      with the reference greedy tokens.
 * --batch runs all prompts together in one backend batch per step and also
 * checks that the batched logits are bit-identical to the prompt run alone.
 * Exit 0 iff every prompt is within tolerance and greedy-identical.
 *
 * --row-tol R (reduced-precision backends, e.g. CUDA in fp16): a row passes
 * if ||got - ref||_2 <= R ||ref||_2 and, wherever the reference's top-1
 * margin exceeds twice the row's max |delta|, the top-1 tokens agree; the
 * greedy decode must match up to the first position whose reference margin
 * is within twice the observed error there (an honest tie for that
 * precision, reported as such); --batch compares batched with alone by the
 * same row criterion instead of bit equality. Either way a prompt's line
 * says how far batched is from alone where they differ (the row with the
 * largest relative L2 difference: prompt rows first, then decode rows).
 */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backends.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "tools/cmd.h"

#define BLOCK 16
#define MAXP 64 /* prompts per reference file */

typedef struct prompt {
    const int32_t *ids;         /* [T] */
    int32_t T;
    const int32_t *greedy;      /* [N] */
    int32_t N;
    const float *ref;           /* [T+N][V] */
    float *got;                 /* [T+N][V] teacher-forced logits */
    float *alone;               /* [T+N][V] (--batch: the per-prompt run) */
    int32_t *dec;               /* [N] greedy decode */
    int32_t *table;             /* [max_blocks] */
} prompt;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: lightmoe verify --model DIR [--device cpu|cuda] [--tp N] [--devices LIST]\n"
            "                       [--batch]\n"
            "                       [--threads N] [--tol ABS] [--rel-tol REL] [--row-tol R]\n"
            "                       [--portable]\n"
            "                       [--quiet]\n"
            "  --tol ABS       pass if max |logit - reference| <= ABS (default 1e-3)\n"
            "  --rel-tol REL   pass if max |delta| / max |reference| of every row <= REL\n"
            "                  (replaces --tol; for reduced-precision backends)\n"
            "  --row-tol R     reduced precision: ||delta||_2 <= R ||ref||_2 per row, top-1\n"
            "                  agreement where the reference margin exceeds 2 max|delta|\n"
            "  --portable      scalar kernels (cpu) / no arch-specific kernels (cuda)\n"
            "  --devices LIST  cuda: device of each rank, e.g. 0,1 (NCCL) or 0,0 (two ranks\n"
            "                  on one GPU through the host communicator)\n");
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t b = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* One step over k pieces: piece i = tokens toks[i][0..len[i]) at pos[i] of
 * prompt idx[i]; logits of every row to out[i] (rows consecutive). */
static int step(backend *be, prompt *P, int32_t max_blocks, int32_t V, int k, const int *idx,
                const int32_t *const *toks, const int32_t *len, const int32_t *pos,
                float *const *out, lm_err *err)
{
    int32_t n = 0;
    for (int i = 0; i < k; i++)
        n += len[i];
    int32_t *tokens = malloc((size_t)n * sizeof *tokens), *ss = malloc((size_t)(k + 1) * sizeof *ss),
            *sp = malloc((size_t)k * sizeof *sp), *bt = malloc((size_t)k * (size_t)max_blocks * 4),
            *rows = malloc((size_t)n * sizeof *rows);
    float *lg = malloc((size_t)n * (size_t)V * sizeof *lg);
    int rc = -ENOMEM;
    if (tokens && ss && sp && bt && rows && lg) {
        ss[0] = 0;
        for (int i = 0; i < k; i++) {
            memcpy(tokens + ss[i], toks[i], (size_t)len[i] * sizeof *tokens);
            ss[i + 1] = ss[i] + len[i];
            sp[i] = pos[i];
            memcpy(bt + (size_t)i * (size_t)max_blocks, P[idx[i]].table,
                   (size_t)max_blocks * sizeof *bt);
        }
        for (int32_t r = 0; r < n; r++)
            rows[r] = r;
        backend_batch b = {.n_seqs = k, .n_tokens = n, .tokens = tokens, .seq_start = ss,
                           .start_pos = sp, .block_table = bt, .max_blocks = max_blocks,
                           .n_logits = n, .logit_rows = rows, .logits = lg};
        rc = backend_forward(be, &b, err);
        for (int i = 0; !rc && i < k; i++)
            memcpy(out[i], lg + (size_t)ss[i] * (size_t)V, (size_t)len[i] * (size_t)V * 4);
    } else {
        lm_err_set(err, -ENOMEM, "verify: out of memory");
    }
    free(tokens);
    free(ss);
    free(sp);
    free(bt);
    free(rows);
    free(lg);
    return rc;
}

/* Teacher-forced run of prompts idx[0..k) together; logits into dst(prompt). */
static int run_forced(backend *be, prompt *P, int32_t mb, int32_t V, int k, const int *idx,
                      int use_alone, lm_err *err)
{
    const int32_t *toks[MAXP] = {0};
    int32_t len[MAXP] = {0}, pos[MAXP] = {0};
    float *out[MAXP] = {0};
    int at[MAXP] = {0};
    for (int i = 0; i < k; i++) {
        prompt *p = &P[idx[i]];
        toks[i] = p->ids;
        len[i] = p->T;
        pos[i] = 0;
        out[i] = use_alone ? p->alone : p->got;
        at[i] = idx[i];
    }
    int rc = step(be, P, mb, V, k, at, toks, len, pos, out, err);
    for (int32_t j = 0; !rc; j++) { /* decode steps: prompts with greedy tokens left */
        int m = 0;
        for (int i = 0; i < k; i++) {
            prompt *p = &P[idx[i]];
            if (j >= p->N)
                continue;
            at[m] = idx[i];
            toks[m] = p->greedy + j;
            len[m] = 1;
            pos[m] = p->T + j;
            out[m] = (use_alone ? p->alone : p->got) + (size_t)(p->T + j) * (size_t)V;
            m++;
        }
        if (!m)
            break;
        rc = step(be, P, mb, V, m, at, toks, len, pos, out, err);
    }
    return rc;
}

/* Greedy decode of prompts idx[0..k) together. */
static int run_greedy(backend *be, prompt *P, int32_t mb, int32_t V, int k, const int *idx,
                      float *scratch, lm_err *err)
{
    const int32_t *toks[MAXP] = {0};
    int32_t len[MAXP] = {0}, pos[MAXP] = {0}, cur[MAXP] = {0};
    float *out[MAXP] = {0};
    int at[MAXP] = {0};
    for (int i = 0; i < k; i++) {
        prompt *p = &P[idx[i]];
        toks[i] = p->ids;
        len[i] = p->T;
        pos[i] = 0;
        at[i] = idx[i];
    }
    /* prefill logits of every row (the last one matters), then one row per step */
    float *bufs[MAXP] = {0};
    size_t off = 0;
    for (int i = 0; i < k; i++) {
        bufs[i] = scratch + off;
        off += (size_t)P[idx[i]].T * (size_t)V;
        out[i] = bufs[i];
    }
    int rc = step(be, P, mb, V, k, at, toks, len, pos, out, err);
    for (int i = 0; !rc && i < k; i++) {
        prompt *p = &P[idx[i]];
        cur[i] = argmax(bufs[i] + (size_t)(p->T - 1) * (size_t)V, V);
        if (p->N > 0)
            p->dec[0] = cur[i];
    }
    for (int32_t j = 1; !rc; j++) {
        int m = 0;
        int who[MAXP] = {0};
        for (int i = 0; i < k; i++) {
            prompt *p = &P[idx[i]];
            if (j >= p->N)
                continue;
            at[m] = idx[i];
            toks[m] = &p->dec[j - 1];
            len[m] = 1;
            pos[m] = p->T + j - 1;
            out[m] = bufs[m];
            who[m] = i;
            m++;
        }
        if (!m)
            break;
        rc = step(be, P, mb, V, m, at, toks, len, pos, out, err);
        for (int i = 0; !rc && i < m; i++)
            P[idx[who[i]]].dec[j] = argmax(out[i], V);
    }
    return rc;
}

static int verify_main(int argc, char **argv)
{
    const char *dir = NULL;
    backend_options bo;
    backend_options_default(&bo);
    double tol = 1e-3, rel_tol = -1, row_tol = -1;
    int batch = 0, quiet = 0;
    int dev_ids[64], n_dev = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--batch")) {
            batch = 1;
        } else if (!strcmp(a, "--portable")) {
            bo.force_portable = 1;
        } else if (!strcmp(a, "--quiet")) {
            quiet = 1;
        } else if (v && !strcmp(a, "--model")) {
            dir = v;
            i++;
        } else if (v && !strcmp(a, "--device")) {
            bo.device = v;
            i++;
        } else if (v && !strcmp(a, "--tp")) {
            bo.tp = atoi(v);
            i++;
        } else if (v && !strcmp(a, "--devices")) {
            const char *q = v;
            n_dev = 0;
            for (;;) {
                char *end;
                long id = strtol(q, &end, 10);
                if (end == q || id < 0 || id > 4096 || n_dev == 64 || (*end && *end != ',')) {
                    fprintf(stderr, "verify: --devices '%s': expected comma-separated device "
                            "ids such as 0,1 (at most 64)\n", v);
                    return 2;
                }
                dev_ids[n_dev++] = (int)id;
                if (!*end)
                    break;
                q = end + 1;
            }
            bo.devices = dev_ids;
            i++;
        } else if (v && !strcmp(a, "--threads")) {
            bo.threads = atoi(v);
            i++;
        } else if (v && !strcmp(a, "--tol")) {
            tol = atof(v);
            i++;
        } else if (v && !strcmp(a, "--rel-tol")) {
            rel_tol = atof(v);
            i++;
        } else if (v && !strcmp(a, "--row-tol")) {
            row_tol = atof(v);
            i++;
        } else {
            fprintf(stderr, "verify: unknown or incomplete argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!dir || bo.tp < 1) {
        usage(stderr);
        return 2;
    }
    if (n_dev && n_dev != bo.tp) {
        fprintf(stderr, "verify: --devices gives %d ids for --tp %d (one per rank)\n", n_dev,
                bo.tp);
        return 2;
    }
    lm_err err = {0};
    char path[4096];
    snprintf(path, sizeof path, "%s/reference.json", dir);
    json_error_t je;
    json_t *rj = json_load_file(path, 0, &je);
    json_t *pa = rj ? json_object_get(rj, "prompts") : NULL;
    if (!json_is_array(pa)) {
        fprintf(stderr, "verify: %s: no 'prompts' list (%s)\n", path, rj ? "" : je.text);
        json_decref(rj);
        return 2;
    }
    int np = (int)json_array_size(pa);
    json_decref(rj);
    if (np > MAXP) {
        fprintf(stderr, "verify: %s: %d prompts, at most %d supported\n", path, np, MAXP);
        return 2;
    }
    snprintf(path, sizeof path, "%s/reference.safetensors", dir);
    safetensors_file *ref = NULL;
    model *m = NULL;
    backend *be = NULL;
    prompt *P = calloc((size_t)(np ? np : 1), sizeof *P);
    float *scratch = NULL;
    int *idx_all = NULL;
    int status = 2;
    if (safetensors_open(path, &ref, &err) || model_load(dir, NULL, &m, &err))
        goto out;
    int32_t V = m->cfg.vocab, maxlen = 0, tot = 0;
    for (int i = 0; i < np; i++) {
        char n1[64], n2[64], n3[64];
        snprintf(n1, sizeof n1, "p%d.input_ids", i);
        snprintf(n2, sizeof n2, "p%d.greedy_ids", i);
        snprintf(n3, sizeof n3, "p%d.logits", i);
        const safetensors_tensor *a = safetensors_find(ref, n1), *g = safetensors_find(ref, n2),
                                 *l = safetensors_find(ref, n3);
        if (!a || !g || !l || a->dtype != ST_I32 || g->dtype != ST_I32 || l->dtype != ST_F32 ||
            a->ndim != 1 || g->ndim != 1 || l->ndim != 2 || a->shape[0] < 1 ||
            l->shape[0] != a->shape[0] + g->shape[0] || l->shape[1] != V) {
            lm_err_set(&err, -EINVAL, "%s: prompt %d: missing or inconsistent p%d.input_ids / "
                       "greedy_ids / logits (vocab %d)", path, i, i, V);
            goto out;
        }
        prompt *p = &P[i];
        p->ids = a->data;
        p->T = (int32_t)a->shape[0];
        p->greedy = g->data;
        p->N = (int32_t)g->shape[0];
        p->ref = l->data;
        for (int32_t j = 0; j < p->T; j++)
            if (p->ids[j] < 0 || p->ids[j] >= V) {
                lm_err_set(&err, -EINVAL, "%s: p%d.input_ids[%d] = %d outside vocab", path, i, j,
                           p->ids[j]);
                goto out;
            }
        size_t rows = (size_t)(p->T + p->N);
        p->got = calloc(rows * (size_t)V, sizeof(float));
        p->alone = calloc(rows * (size_t)V, sizeof(float));
        p->dec = calloc((size_t)p->N + 1, sizeof(int32_t));
        maxlen = p->T + p->N > maxlen ? p->T + p->N : maxlen;
        tot += p->T;
        if (!p->got || !p->alone || !p->dec) {
            lm_err_set(&err, -ENOMEM, "verify: out of memory");
            goto out;
        }
    }
    int32_t mb = (maxlen + BLOCK) / BLOCK + 1;
    for (int i = 0; i < np; i++) {
        P[i].table = calloc((size_t)mb, sizeof(int32_t));
        if (!P[i].table) {
            lm_err_set(&err, -ENOMEM, "verify: out of memory");
            goto out;
        }
        for (int32_t j = 0; j < mb; j++) /* reversed, interleaved ids: exercises the paging */
            P[i].table[j] = (mb - 1 - j) * np + i;
    }
    scratch = calloc((size_t)tot * (size_t)V, sizeof(float));
    if (!scratch) {
        lm_err_set(&err, -ENOMEM, "verify: out of memory");
        goto out;
    }
    if (backend_open(m, &bo, &be, &err) || backend_kv_init(be, BLOCK, mb * np, &err))
        goto out;
    backend_info info;
    backend_get_info(be, &info);
    int all = np > 0;
    idx_all = calloc((size_t)(np ? np : 1), sizeof *idx_all);
    if (!idx_all) {
        lm_err_set(&err, -ENOMEM, "verify: out of memory");
        goto out;
    }
    for (int i = 0; i < np; i++)
        idx_all[i] = i;
    if (batch) {
        if (run_forced(be, P, mb, V, np, idx_all, 0, &err) ||
            run_greedy(be, P, mb, V, np, idx_all, scratch, &err))
            goto out;
    }
    for (int i = 0; i < np; i++) {
        int one[1] = {i};
        if (run_forced(be, P, mb, V, 1, one, batch, &err))
            goto out;
        if (!batch && run_greedy(be, P, mb, V, 1, one, scratch, &err))
            goto out;
    }
    for (int i = 0; i < np; i++) {
        prompt *p = &P[i];
        double mx = 0, rel = 0, rel2 = 0, rel2b = 0;
        size_t row_b = 0; /* the row of rel2b: where batched and alone differ most */
        int top1_bad = 0, same_rows = 1, shown = 0;
        size_t rows = (size_t)(p->T + p->N);
        double *row_err = calloc(rows, sizeof(double)), *margin = calloc(rows, sizeof(double));
        for (size_t r = 0; r < rows; r++) {
            double rmx = 0, rref = 0, dn = 0, rn = 0, bn = 0, t1 = -INFINITY, t2 = -INFINITY;
            for (int32_t v = 0; v < V; v++) {
                double d = fabs((double)p->got[r * V + v] - p->ref[r * V + v]);
                if (!(d <= rmx)) /* NaN propagates */
                    rmx = d;
                double a = fabs(p->ref[r * V + v]);
                rref = a > rref ? a : rref;
                dn += d * d;
                rn += (double)p->ref[r * V + v] * p->ref[r * V + v];
                double db = (double)p->got[r * V + v] - p->alone[r * V + v];
                bn += db * db;
                double x = p->ref[r * V + v];
                if (x > t1) {
                    t2 = t1;
                    t1 = x;
                } else if (x > t2) {
                    t2 = x;
                }
            }
            mx = rmx > mx || isnan(rmx) ? rmx : mx;
            double rr = rref > 0 ? rmx / rref : rmx;
            rel = rr > rel || isnan(rr) ? rr : rel;
            double r2 = rn > 0 ? sqrt(dn / rn) : sqrt(dn);
            rel2 = r2 > rel2 || isnan(r2) ? r2 : rel2;
            double r2b = rn > 0 ? sqrt(bn / rn) : sqrt(bn);
            if (r2b > rel2b || (isnan(r2b) && !isnan(rel2b))) {
                rel2b = r2b;
                row_b = r;
            }
            if (row_err)
                row_err[r] = rmx;
            if (margin)
                margin[r] = t1 - t2;
            if (t1 - t2 > 2 * rmx && argmax(p->got + r * V, V) != argmax(p->ref + r * V, V))
                top1_bad++;
            if (row_tol >= 0 && !quiet && !(r2 <= row_tol) && shown < 8) { /* say which rows */
                printf("  p%d row %zu: row rel-L2 %.3g max|dlogit| %.3g\n", i, r, r2, rmx);
                shown++;
            }
        }
        int32_t match = 0;
        while (match < p->N && p->dec[match] == p->greedy[match])
            match++;
        /* with --row-tol a divergence at a reference near-tie is accepted */
        int tie = 0;
        if (row_tol >= 0 && match < p->N && row_err && margin) {
            size_t r = (size_t)(p->T - 1 + match);
            tie = margin[r] <= 2 * row_err[r];
        }
        free(row_err);
        free(margin);
        int same = 1;
        if (batch && row_tol >= 0)
            same = same_rows = rel2b <= row_tol;
        else if (batch)
            same = !memcmp(p->got, p->alone, rows * (size_t)V * sizeof(float));
        /* how far batched is from alone, and where (rows: prompt, then decode) */
        char bdiff[96] = "";
        if (batch && (row_tol >= 0 || !same)) {
            if (rel2b == 0) /* equal values (bit mode: differing only as -0 and +0) */
                snprintf(bdiff, sizeof bdiff, " (equal values)");
            else
                snprintf(bdiff, sizeof bdiff, " (row %zu rel-L2 %.3g)", row_b, rel2b);
        }
        int ok_l = row_tol >= 0 ? (rel2 <= row_tol && !top1_bad)
                   : rel_tol >= 0 ? rel <= rel_tol : mx <= tol;
        int ok = ok_l && (match == p->N || tie) && same;
        all &= ok;
        if (!quiet || !ok) {
            if (row_tol >= 0)
                printf("%s p%d: %d+%d tokens  max|dlogit| %.3g  row rel-L2 %.3g  top1 miss %d  "
                       "greedy %d/%d%s%s%s  %s\n",
                       info.name, i, p->T, p->N, mx, rel2, top1_bad, match, p->N,
                       tie ? " (then a reference near-tie)" : "",
                       batch ? (same_rows ? "  batched~alone" : "  BATCHED != ALONE") : "", bdiff,
                       ok ? "OK" : "FAIL");
            else
                printf("%s p%d: %d+%d tokens  max|dlogit| %.3g  rel %.3g  greedy %d/%d%s%s  %s\n",
                       info.name, i, p->T, p->N, mx, rel, match, p->N,
                       batch ? (same ? "  batched==alone" : "  BATCHED != ALONE") : "", bdiff,
                       ok ? "OK" : "FAIL");
        }
    }
    printf("verify %s: %s (%d prompts, %s, %s %g)\n", dir, all ? "PASS" : "FAIL", np, info.name,
           row_tol >= 0 ? "row-tol" : rel_tol >= 0 ? "rel-tol" : "tol",
           row_tol >= 0 ? row_tol : rel_tol >= 0 ? rel_tol : tol);
    status = all ? 0 : 1;
out:
    if (status == 2)
        fprintf(stderr, "verify: %s\n", err.msg[0] ? err.msg : "failed");
    backend_destroy(be);
    model_free(m);
    safetensors_close(ref);
    for (int i = 0; i < np; i++) {
        free(P[i].got);
        free(P[i].alone);
        free(P[i].dec);
        free(P[i].table);
    }
    free(P);
    free(scratch);
    free(idx_all);
    return status;
}

CMD_REGISTER(verify, "verify",
             "check a backend against reference logits and greedy tokens (reference.safetensors)",
             verify_main)
