/*
 * cmd_tokenize.c: `lightmoe tokenize`, the tokenizer from the command line.
 *
 *   lightmoe tokenize --model DIR --text TEXT [--no-special]   ids of TEXT
 *   lightmoe tokenize --model DIR --decode "1 2 3" [--skip-special]
 *   lightmoe tokenize --model DIR --check tokenizer_cases.json
 *
 * --check compares against what transformers produced (format in
 * shared/fixtures/README.md): every `cases` entry's ids (add_special_tokens
 * on) and decoded text (skip_special_tokens off), and every `chat` entry:
 * its messages rendered with the model's chat template (engine/chat.h,
 * add_generation_prompt on) must give `rendered` exactly, and the rendered
 * prompt encoded without adding special tokens (apply_chat_template's
 * tokenization) must give `ids`. Each mismatch is printed; exit 0 iff none.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/chat.h"
#include "engine/tokenizer.h"
#include "tools/cmd.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: lightmoe tokenize --model DIR (--text TEXT [--no-special] | --decode \"IDS\" "
               "[--skip-special] | --check CASES.json)\n");
}

/* Print s as a JSON string (escapes control characters). */
static void print_quoted(FILE *f, const char *s, size_t len)
{
    json_t *j = json_stringn(s, len);
    char *d = j ? json_dumps(j, JSON_ENCODE_ANY) : NULL;
    fputs(d ? d : "(unprintable)", f);
    free(d);
    json_decref(j);
}

static void print_ids(FILE *f, const int32_t *ids, size_t n)
{
    fputc('[', f);
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%s%d", i ? ", " : "", ids[i]);
    fputc(']', f);
}

/* Compare ids with a JSON array; print a report when they differ. */
static int compare_ids(const char *what, size_t idx, const char *text, const int32_t *got,
                       size_t n, json_t *want)
{
    size_t wn = json_array_size(want), first = 0;
    bool same = wn == n;
    for (size_t i = 0; i < n && i < wn; i++)
        if (json_integer_value(json_array_get(want, i)) != got[i]) {
            same = false;
            first = i;
            break;
        } else {
            first = i + 1;
        }
    if (same)
        return 0;
    printf("MISMATCH %s[%zu] ids (first difference at position %zu): text ", what, idx, first);
    print_quoted(stdout, text, strlen(text));
    printf("\n  want ");
    char *d = json_dumps(want, JSON_COMPACT);
    printf("%s\n  got  ", d ? d : "?");
    free(d);
    print_ids(stdout, got, n);
    printf("\n");
    return 1;
}

static int check(const tokenizer *tok, const char *model, const char *path)
{
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) {
        fprintf(stderr, "lightmoe tokenize: %s: %s (line %d)\n", path, je.text, je.line);
        return 2;
    }
    json_t *cases = json_object_get(root, "cases"), *chat = json_object_get(root, "chat");
    if (!json_is_array(cases)) {
        fprintf(stderr, "lightmoe tokenize: %s: no \"cases\" list\n", path);
        json_decref(root);
        return 2;
    }
    int bad = 0, n_checked = 0;
    lm_err err = {0};
    for (size_t i = 0; i < json_array_size(cases); i++) {
        json_t *c = json_array_get(cases, i);
        json_t *text = json_object_get(c, "text"), *ids = json_object_get(c, "ids");
        json_t *dec = json_object_get(c, "decoded");
        if (!json_is_string(text) || !json_is_array(ids)) {
            fprintf(stderr, "lightmoe tokenize: %s: cases[%zu] lacks text/ids\n", path, i);
            bad++;
            continue;
        }
        int32_t *got = NULL;
        size_t n = 0;
        if (tokenizer_encode(tok, json_string_value(text), json_string_length(text), true, &got,
                             &n, &err)) {
            printf("ERROR cases[%zu]: %s\n", i, err.msg);
            bad++;
            continue;
        }
        bad += compare_ids("cases", i, json_string_value(text), got, n, ids);
        free(got);
        if (json_is_string(dec)) {
            /* decode the expected ids, so a decode check does not depend on encode */
            size_t wn = json_array_size(ids);
            int32_t *want = malloc((wn + 1) * sizeof(*want));
            for (size_t k = 0; want && k < wn; k++)
                want[k] = (int32_t)json_integer_value(json_array_get(ids, k));
            char *out = NULL;
            size_t olen = 0;
            int rc = !want ? -ENOMEM : tokenizer_decode(tok, want, wn, false, &out, &olen, &err);
            if (!rc && tokenizer_get_info(tok)->clean_up_tokenization_spaces == 1) {
                char *raw = out;   /* transformers' decode cleans up when configured to */
                rc = tokenizer_clean_up_spaces(raw, olen, &out, &olen, &err);
                free(raw);
            }
            if (rc) {
                printf("ERROR cases[%zu] decode: %s\n", i, err.msg);
                bad++;
            } else if (olen != json_string_length(dec) ||
                       memcmp(out, json_string_value(dec), olen)) {
                printf("MISMATCH cases[%zu] decoded:\n  want ", i);
                print_quoted(stdout, json_string_value(dec), json_string_length(dec));
                printf("\n  got  ");
                print_quoted(stdout, out, olen);
                printf("\n");
                bad++;
            }
            free(out);
            free(want);
        }
        n_checked++;
    }
    chat_template *ct = NULL;
    if (json_array_size(chat)) {
        const tokenizer_info *info = tokenizer_get_info(tok);
        if (chat_template_load(model, NULL, info->bos_token, info->eos_token, &ct, &err)) {
            printf("ERROR chat template: %s\n", err.msg);
            bad++;
        }
    }
    for (size_t i = 0; i < json_array_size(chat); i++) {
        json_t *c = json_array_get(chat, i);
        json_t *rendered = json_object_get(c, "rendered"), *ids = json_object_get(c, "ids");
        json_t *messages = json_object_get(c, "messages");
        if (!json_is_string(rendered) || !json_is_array(ids) || !json_is_array(messages)) {
            fprintf(stderr, "lightmoe tokenize: %s: chat[%zu] lacks messages/rendered/ids\n",
                    path, i);
            bad++;
            continue;
        }
        if (ct) {
            char *mj = json_dumps(messages, JSON_COMPACT), *text = NULL;
            size_t tlen = 0;
            if (!mj || chat_render_json(ct, mj, NULL, 1, NULL, &text, &tlen, &err)) {
                printf("ERROR chat[%zu] render: %s\n", i, mj ? err.msg : "out of memory");
                bad++;
            } else if (tlen != json_string_length(rendered) ||
                       memcmp(text, json_string_value(rendered), tlen)) {
                printf("MISMATCH chat[%zu] rendered:\n  want ", i);
                print_quoted(stdout, json_string_value(rendered), json_string_length(rendered));
                printf("\n  got  ");
                print_quoted(stdout, text, tlen);
                printf("\n");
                bad++;
            }
            free(text);
            free(mj);
        }
        /* ids of the expected rendering (a render mismatch is reported above) */
        int32_t *got = NULL;
        size_t n = 0;
        if (tokenizer_encode(tok, json_string_value(rendered), json_string_length(rendered), false,
                             &got, &n, &err)) {
            printf("ERROR chat[%zu]: %s\n", i, err.msg);
            bad++;
            continue;
        }
        bad += compare_ids("chat", i, json_string_value(rendered), got, n, ids);
        free(got);
        n_checked++;
    }
    printf("%s: %d checked, %d mismatches\n", path, n_checked, bad);
    chat_template_free(ct);
    json_decref(root);
    return bad ? 1 : 0;
}

static int cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL, *text = NULL, *check_path = NULL, *decode = NULL;
    bool special = true, skip = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--no-special")) {
            special = false;
        } else if (!strcmp(a, "--skip-special")) {
            skip = true;
        } else if (i + 1 < argc && !strcmp(a, "--model")) {
            model = argv[++i];
        } else if (i + 1 < argc && !strcmp(a, "--text")) {
            text = argv[++i];
        } else if (i + 1 < argc && !strcmp(a, "--check")) {
            check_path = argv[++i];
        } else if (i + 1 < argc && !strcmp(a, "--decode")) {
            decode = argv[++i];
        } else {
            fprintf(stderr, "lightmoe tokenize: unknown or incomplete argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!model || (!text && !check_path && !decode)) {
        usage(stderr);
        return 2;
    }
    lm_err err = {0};
    tokenizer *tok = NULL;
    if (tokenizer_load(model, &tok, &err)) {
        fprintf(stderr, "lightmoe tokenize: %s\n", err.msg);
        return 2;
    }
    int rc = 0;
    if (check_path) {
        rc = check(tok, model, check_path);
    } else if (text) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (tokenizer_encode(tok, text, strlen(text), special, &ids, &n, &err)) {
            fprintf(stderr, "lightmoe tokenize: %s\n", err.msg);
            rc = 2;
        } else {
            print_ids(stdout, ids, n);
            printf("\n");
        }
        free(ids);
    } else {
        size_t cap = strlen(decode) / 2 + 2, n = 0;
        int32_t *ids = malloc(cap * sizeof(*ids));
        char *end;
        const char *p = decode;
        while (ids && *p) {
            long v = strtol(p, &end, 10);
            if (end == p) {
                if (*p == ' ' || *p == ',' || *p == '[' || *p == ']') {
                    p++;
                    continue;
                }
                fprintf(stderr, "lightmoe tokenize: --decode: bad id list at '%s'\n", p);
                rc = 2;
                break;
            }
            ids[n++] = (int32_t)v;
            p = end;
        }
        char *out = NULL;
        if (!rc && tokenizer_decode(tok, ids, n, skip, &out, NULL, &err) == 0)
            printf("%s\n", out);
        free(out);
        free(ids);
    }
    tokenizer_free(tok);
    return rc;
}

CMD_REGISTER(tokenize, "tokenize", "encode/decode text, or --check a tokenizer_cases.json",
             cmd_tokenize)
