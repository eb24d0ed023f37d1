/*
 * tokenizer.c: loading tokenizer.json / tokenizer_config.json, added
 * tokens, and the encode / decode / streaming entry points of tokenizer.h.
 *
 * Added tokens are split out before normalization like the Rust
 * AddedVocabulary: first those with normalized == false on the raw text,
 * then those with normalized == true on each normalized piece. Matching is
 * leftmost-longest over all tokens of a set; single_word drops a match
 * glued to word characters, lstrip/rstrip swallow the whitespace next to it.
 *
 * Encoding allocates per call (the input decides how much) and shares no
 * mutable state, so concurrent calls on one tokenizer are safe.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer_internal.h"

typedef struct added_token {
    char *content;
    size_t len;
    char *norm;            /* content after the normalizer (normalized tokens only) */
    size_t norm_len;
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} added_token;

/* Tokens of one match set grouped by first byte, longest first. */
typedef struct match_set {
    uint32_t *idx;         /* indices into tok->added */
    uint32_t start[257];   /* bucket of first byte b: idx[start[b] .. start[b+1]) */
    bool normalized;       /* match against norm instead of content */
} match_set;

struct tokenizer {
    tok_normalizer *normalizer;
    tok_pretok *pretok;
    tok_bpe *model;
    tok_decoder *decoder;
    tok_postproc *post;
    added_token *added;
    size_t n_added;
    int32_t *added_of_id;  /* [vocab_size] index into added, -1 */
    match_set raw, norm;
    tok_strmap added_map;  /* content -> id (first token of a content wins) */
    tokenizer_info info;
    char *strings[4];      /* owned copies of bos/eos/pad/unk token strings */
    uint64_t fingerprint;
    bool byte_runs;        /* the decoder has ByteFallback */
};

/* ---- loading ------------------------------------------------------------- */

static void match_set_free(match_set *m)
{
    free(m->idx);
}

void tokenizer_free(tokenizer *tok)
{
    if (!tok)
        return;
    tok_normalizer_free(tok->normalizer);
    tok_pretok_free(tok->pretok);
    tok_bpe_free(tok->model);
    tok_decoder_free(tok->decoder);
    tok_postproc_free(tok->post);
    for (size_t i = 0; i < tok->n_added; i++) {
        free(tok->added[i].content);
        free(tok->added[i].norm);
    }
    free(tok->added);
    free(tok->added_of_id);
    match_set_free(&tok->raw);
    match_set_free(&tok->norm);
    tok_strmap_free(&tok->added_map);
    for (int i = 0; i < 4; i++)
        free(tok->strings[i]);
    free(tok);
}

static const char *at_str(const tokenizer *t, uint32_t i, bool norm, size_t *len)
{
    *len = norm ? t->added[i].norm_len : t->added[i].len;
    return norm ? t->added[i].norm : t->added[i].content;
}

typedef struct sort_ctx {
    const tokenizer *t;
    bool norm;
} sort_ctx;

/* by first byte, then longest first (leftmost-longest matching), then file order */
static int cmp_added(const void *a, const void *b, void *arg)
{
    const sort_ctx *c = arg;
    size_t la, lb;
    const char *sa = at_str(c->t, *(const uint32_t *)a, c->norm, &la);
    const char *sb = at_str(c->t, *(const uint32_t *)b, c->norm, &lb);
    if ((unsigned char)sa[0] != (unsigned char)sb[0])
        return (unsigned char)sa[0] - (unsigned char)sb[0];
    if (la != lb)
        return la > lb ? -1 : 1;
    return *(const uint32_t *)a < *(const uint32_t *)b ? -1 : 1;
}

static int build_set(tokenizer *t, match_set *m, bool normalized)
{
    m->normalized = normalized;
    m->idx = malloc((t->n_added + 1) * sizeof(*m->idx));
    if (!m->idx)
        return -ENOMEM;
    size_t n = 0;
    for (size_t i = 0; i < t->n_added; i++) {
        size_t len;
        at_str(t, (uint32_t)i, normalized, &len);
        if (t->added[i].normalized == normalized && len)
            m->idx[n++] = (uint32_t)i;
    }
    sort_ctx ctx = {t, normalized};
    qsort_r(m->idx, n, sizeof(*m->idx), cmp_added, &ctx);
    memset(m->start, 0, sizeof(m->start));
    for (size_t i = 0; i < n; i++) {
        size_t len;
        m->start[(unsigned char)at_str(t, m->idx[i], normalized, &len)[0] + 1]++;
    }
    for (int b = 0; b < 256; b++)
        m->start[b + 1] += m->start[b];
    return 0;
}

static int parse_added(tokenizer *t, json_t *arr, lm_err *err)
{
    if (!arr || json_is_null(arr))
        return 0;
    if (!json_is_array(arr))
        return lm_err_set(err, -EINVAL, "\"added_tokens\" must be a list");
    t->added = calloc(json_array_size(arr) + 1, sizeof(*t->added));
    if (!t->added)
        return -ENOMEM;
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *e = json_array_get(arr, i);
        json_t *c = json_object_get(e, "content"), *id = json_object_get(e, "id");
        if (!json_is_string(c) || !json_is_integer(id))
            return lm_err_set(err, -EINVAL, "added_tokens[%zu]: needs \"content\" and \"id\"", i);
        if (json_integer_value(id) < 0 || json_integer_value(id) >= TOK_MAX_ID)
            return lm_err_set(err, -EINVAL, "added_tokens[%zu] \"%s\": id %lld is out of range",
                              i, json_string_value(c), (long long)json_integer_value(id));
        added_token *a = &t->added[t->n_added++];
        a->len = json_string_length(c);
        a->content = malloc(a->len + 1);
        if (!a->content)
            return -ENOMEM;
        memcpy(a->content, json_string_value(c), a->len + 1);
        /* Rust: a token the model knows keeps the model's id */
        int32_t mid = tok_bpe_lookup(t->model, a->content, a->len);
        a->id = mid >= 0 ? mid : (int32_t)json_integer_value(id);
        char what[64];
        snprintf(what, sizeof(what), "added_tokens[%zu]", i);
        int rc;
        if ((rc = tok_json_bool(e, "special", &a->special, what, err)))
            return rc;
        a->normalized = !a->special;
        if ((rc = tok_json_bool(e, "lstrip", &a->lstrip, what, err)) ||
            (rc = tok_json_bool(e, "rstrip", &a->rstrip, what, err)) ||
            (rc = tok_json_bool(e, "single_word", &a->single_word, what, err)) ||
            (rc = tok_json_bool(e, "normalized", &a->normalized, what, err)))
            return rc;
        if (a->normalized) {
            tok_buf nb = {0};
            tok_spans sp = {0};
            rc = t->normalizer ? tok_normalizer_run(t->normalizer, a->content, a->len, &nb, &sp)
                               : tok_buf_put(&nb, a->content, a->len);
            tok_spans_free(&sp);
            if (rc) {
                tok_buf_free(&nb);
                return rc;
            }
            if (!nb.data && tok_buf_put(&nb, "", 0))
                return -ENOMEM;
            a->norm = nb.data;
            a->norm_len = nb.len;
        }
    }
    return 0;
}

static int read_file(const char *path, char **ret, size_t *ret_len, lm_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return lm_err_set(err, -errno, "%s: cannot open: %s", path, strerror(errno));
    tok_buf b = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        if (tok_buf_put(&b, chunk, n)) {
            fclose(f);
            tok_buf_free(&b);
            return -ENOMEM;
        }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        tok_buf_free(&b);
        return lm_err_set(err, -EIO, "%s: read error", path);
    }
    if (!b.data && tok_buf_put(&b, "", 0))
        return -ENOMEM;
    *ret = b.data;
    *ret_len = b.len;
    return 0;
}

/* A token in tokenizer_config.json: "str" or {"content": "str", ...}. */
static const char *config_token(json_t *cfg, const char *key)
{
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v))
        v = json_object_get(v, "content");
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int parse_config(tokenizer *t, const char *cfg_json, size_t cfg_len, lm_err *err)
{
    tokenizer_info *in = &t->info;
    in->bos_id = in->eos_id = in->pad_id = in->unk_id = -1;
    in->add_bos_token = in->add_eos_token = in->clean_up_tokenization_spaces = -1;
    if (!cfg_json)
        return 0;
    json_error_t je;
    json_t *cfg = json_loadb(cfg_json, cfg_len, JSON_DECODE_INT_AS_REAL, &je);
    if (!cfg || !json_is_object(cfg)) {
        json_decref(cfg);
        return lm_err_set(err, -EINVAL, "tokenizer_config.json: not a JSON object (line %d: %s)",
                          je.line, je.text);
    }
    const char *keys[4] = {"bos_token", "eos_token", "pad_token", "unk_token"};
    int32_t *ids[4] = {&in->bos_id, &in->eos_id, &in->pad_id, &in->unk_id};
    const char **strs[4] = {&in->bos_token, &in->eos_token, &in->pad_token, &in->unk_token};
    int rc = 0;
    for (int i = 0; i < 4; i++) {
        const char *s = config_token(cfg, keys[i]);
        if (!s)
            continue;
        if (!(t->strings[i] = strdup(s))) {
            rc = -ENOMEM;
            break;
        }
        *strs[i] = t->strings[i];
        *ids[i] = tokenizer_token_to_id(t, s, strlen(s));
    }
    json_t *v;
    if (json_is_boolean(v = json_object_get(cfg, "add_bos_token")))
        in->add_bos_token = json_is_true(v);
    if (json_is_boolean(v = json_object_get(cfg, "add_eos_token")))
        in->add_eos_token = json_is_true(v);
    if (json_is_boolean(v = json_object_get(cfg, "clean_up_tokenization_spaces")))
        in->clean_up_tokenization_spaces = json_is_true(v);
    json_decref(cfg);
    return rc;
}

int tokenizer_load_json(const char *tokenizer_json, size_t len, const char *config_json,
                        size_t config_len, tokenizer **ret, lm_err *err)
{
    *ret = NULL;
    tokenizer *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    int rc = 0;
    json_error_t je;
    json_t *root = json_loadb(tokenizer_json, len, 0, &je);
    if (!root) {
        rc = lm_err_set(err, -EINVAL, "tokenizer.json: not valid JSON (line %d column %d: %s)",
                        je.line, je.column, je.text);
        goto out;
    }
    if (!json_is_object(root)) {
        rc = lm_err_set(err, -EINVAL, "tokenizer.json: top level is not an object");
        goto out;
    }
    /* FNV-1a 64 of the file bytes: the cache key */
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)tokenizer_json[i]) * 1099511628211ull;
    t->fingerprint = h;

    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) {
        rc = lm_err_set(err, -EINVAL, "tokenizer.json: missing \"model\" object");
        goto out;
    }
    const char *mtype = NULL;
    if ((rc = tok_json_str(model, "type", &mtype, "model", err)))
        goto out;
    if (!mtype && json_object_get(model, "merges"))
        mtype = "BPE";   /* old files omit the tag */
    if (!mtype || strcmp(mtype, "BPE")) {
        rc = lm_err_set(err, -EINVAL, "tokenizer.json: model type '%s' is not supported (only BPE)",
                        mtype ? mtype : "(none)");
        goto out;
    }
    json_t *trunc = json_object_get(root, "truncation"), *pad = json_object_get(root, "padding");
    (void)trunc;
    (void)pad;   /* batch options of the Python API: they do not change single encodings */
    if ((rc = tok_bpe_parse(model, &t->model, err)) ||
        (rc = tok_normalizer_parse(json_object_get(root, "normalizer"), &t->normalizer, err)) ||
        (rc = tok_pretok_parse(json_object_get(root, "pre_tokenizer"), &t->pretok, err)) ||
        (rc = tok_postproc_parse(json_object_get(root, "post_processor"), &t->post, err)) ||
        (rc = tok_decoder_parse(json_object_get(root, "decoder"), &t->decoder, err)) ||
        (rc = parse_added(t, json_object_get(root, "added_tokens"), err))) {
        lm_err_prefix(err, "tokenizer.json");
        goto out;
    }
    int32_t max_id = tok_bpe_max_id(t->model);
    for (size_t i = 0; i < t->n_added; i++)
        if (t->added[i].id > max_id)
            max_id = t->added[i].id;
    t->info.vocab_size = max_id + 1;
    t->byte_runs = t->decoder && tok_decoder_has_bytefallback(t->decoder);
    t->added_of_id = malloc(((size_t)max_id + 1) * sizeof(*t->added_of_id) + 1);
    if (!t->added_of_id) {
        rc = -ENOMEM;
        goto out;
    }
    for (int32_t i = 0; i <= max_id; i++)
        t->added_of_id[i] = -1;
    for (size_t i = 0; i < t->n_added; i++) {
        const added_token *a = &t->added[i];
        if (t->added_of_id[a->id] < 0)
            t->added_of_id[a->id] = (int32_t)i;
        if (tok_strmap_get(&t->added_map, a->content, a->len) < 0 &&
            (rc = tok_strmap_set(&t->added_map, a->content, a->len, a->id)))
            goto out;
    }
    if ((rc = build_set(t, &t->raw, false)) || (rc = build_set(t, &t->norm, true)))
        goto out;
    if ((rc = parse_config(t, config_json, config_len, err)))
        goto out;
out:
    json_decref(root);
    if (rc) {
        tokenizer_free(t);
        return rc;
    }
    *ret = t;
    return 0;
}

int tokenizer_load(const char *dir, tokenizer **ret, lm_err *err)
{
    *ret = NULL;
    char path[4096];
    char *tj = NULL, *cj = NULL;
    size_t tl = 0, cl = 0;
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    int rc = read_file(path, &tj, &tl, err);
    if (rc)
        return rc;
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    FILE *f = fopen(path, "rb");
    if (f) {
        fclose(f);
        if ((rc = read_file(path, &cj, &cl, err))) {
            free(tj);
            return rc;
        }
    }
    rc = tokenizer_load_json(tj, tl, cj, cl, ret, err);
    if (rc)
        lm_err_prefix(err, "%s", dir);
    free(tj);
    free(cj);
    return rc;
}

/* ---- lookups ------------------------------------------------------------- */

static const added_token *added_of(const tokenizer *t, int32_t id)
{
    if (id < 0 || id >= t->info.vocab_size || t->added_of_id[id] < 0)
        return NULL;
    return &t->added[t->added_of_id[id]];
}

/* An added token with normalized == true reads back as its normalized
 * content (the Rust library stores it so: "HeLLo" under Lowercase decodes
 * as "hello"). */
static const char *token_str(const tokenizer *tok, int32_t id, size_t *len)
{
    const added_token *a = added_of(tok, id);
    if (a) {
        *len = a->normalized ? a->norm_len : a->len;
        return a->normalized ? a->norm : a->content;
    }
    return tok_bpe_token(tok->model, id, len);
}

const char *tokenizer_id_to_token(const tokenizer *tok, int32_t id)
{
    size_t len;
    return token_str(tok, id, &len);
}

int32_t tokenizer_token_to_id(const tokenizer *tok, const char *token, size_t len)
{
    int32_t id = tok_strmap_get(&tok->added_map, token, len);
    return id >= 0 ? id : tok_bpe_lookup(tok->model, token, len);
}

bool tokenizer_is_special(const tokenizer *tok, int32_t id)
{
    const added_token *a = added_of(tok, id);
    return a && a->special;
}

int32_t tokenizer_vocab_size(const tokenizer *tok)
{
    return tok->info.vocab_size;
}

const tokenizer_info *tokenizer_get_info(const tokenizer *tok)
{
    return &tok->info;
}

uint64_t tokenizer_fingerprint(const tokenizer *tok)
{
    return tok->fingerprint;
}

int tokenizer_token_bytes(const tokenizer *tok, int32_t id, char *buf, size_t cap)
{
    size_t len;
    const char *s = token_str(tok, id, &len);
    if (!s)
        return -1;
    tok_buf out = {0};
    int rc = tok->decoder ? tok_decoder_token_bytes(tok->decoder, s, len, &out)
                          : tok_buf_put(&out, s, len);
    if (rc) {
        tok_buf_free(&out);
        return -1;
    }
    if (cap)
        memcpy(buf, out.data, out.len < cap ? out.len : cap);
    int n = (int)out.len;
    tok_buf_free(&out);
    return n;
}

/* ---- added tokens ---------------------------------------------------------- */

static int32_t cp_before(const char *s, size_t at)
{
    if (!at)
        return -1;
    size_t p = at - 1;
    while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80)
        p--;
    int n;
    return tok_utf8_decode(s + p, at - p, &n);
}

/* AddedVocabulary::find_matches + split_with_indices on one piece. */
static int split_added(const tokenizer *t, const match_set *m, const tok_buf *arena,
                       const tok_piece *pc, tok_pieces *out)
{
    const char *s = arena->data + pc->off;
    size_t len = pc->len, start_off = 0;
    if (m->start[256] == 0 || !len)
        return tok_pieces_push(out, pc->off, pc->len, pc->id, pc->at_start);
    for (size_t i = 0; i < len;) {
        unsigned char b = (unsigned char)s[i];
        const added_token *hit = NULL;
        size_t hit_len = 0;
        for (uint32_t k = m->start[b]; k < m->start[b + 1]; k++) {
            size_t l;
            const char *c = at_str(t, m->idx[k], m->normalized, &l);
            if (l <= len - i && !memcmp(s + i, c, l)) {
                hit = &t->added[m->idx[k]];
                hit_len = l;
                break;   /* longest first */
            }
        }
        if (!hit) {
            i++;
            continue;
        }
        size_t st = i, en = i + hit_len;
        i = en;   /* matches never overlap, also when one is dropped below */
        if (hit->single_word) {
            int n;
            bool start_ok = st == 0 || !tok_is_word_char(cp_before(s, st));
            bool stop_ok = en == len || !tok_is_word_char(tok_utf8_decode(s + en, len - en, &n));
            if (!start_ok || !stop_ok)
                continue;
        }
        if (hit->lstrip) {
            size_t ns = st;
            while (ns > 0) {
                size_t p = ns - 1;
                while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80)
                    p--;
                int n;
                if (!tok_is_whitespace(tok_utf8_decode(s + p, ns - p, &n)))
                    break;
                ns = p;
            }
            st = ns > start_off ? ns : start_off;
        }
        if (hit->rstrip) {
            while (en < len) {
                int n;
                if (!tok_is_whitespace(tok_utf8_decode(s + en, len - en, &n)))
                    break;
                en += (size_t)n;
            }
            i = en;
        }
        if (start_off < st &&
            tok_pieces_push(out, pc->off + start_off, st - start_off, -1,
                            pc->at_start && start_off == 0))
            return -ENOMEM;
        if (tok_pieces_push(out, pc->off + st, en - st, hit->id, pc->at_start && st == 0))
            return -ENOMEM;
        start_off = en;
    }
    if (start_off != len &&
        tok_pieces_push(out, pc->off + start_off, len - start_off, -1,
                        pc->at_start && start_off == 0))
        return -ENOMEM;
    return 0;
}

/* ---- encode --------------------------------------------------------------- */

int tokenizer_encode(const tokenizer *tok, const char *text, size_t len, bool add_special_tokens,
                     int32_t **ret_ids, size_t *ret_n, lm_err *err)
{
    *ret_ids = NULL;
    *ret_n = 0;
    size_t bad = tok_utf8_invalid_at(text, len);
    if (bad != (size_t)-1)
        return lm_err_set(err, -EINVAL, "tokenizer: input is not valid UTF-8 at byte %zu", bad);
    tok_buf arena = {0}, tmp = {0};
    tok_pieces a = {0}, b = {0};
    tok_spans sp = {0};
    tok_ids ids = {0}, out = {0};
    void *scratch = tok_bpe_scratch_new();
    int rc = scratch ? tok_buf_put(&arena, text, len) : -ENOMEM;
    if (rc)
        goto done;
    tok_piece whole = {0, len, -1, true};
    /* 1. added tokens on the raw text */
    if (len && (rc = split_added(tok, &tok->raw, &arena, &whole, &a)))
        goto done;
    /* 2. normalize the rest, then added tokens on the normalized text */
    for (size_t i = 0; i < a.n; i++) {
        tok_piece pc = a.v[i];
        if (pc.id < 0 && tok->normalizer) {
            tmp.len = 0;
            if ((rc = tok_normalizer_run(tok->normalizer, arena.data + pc.off, pc.len, &tmp, &sp)))
                goto done;
            pc.off = arena.len;
            pc.len = tmp.len;
            if ((rc = tok_buf_put(&arena, tmp.data, tmp.len)))
                goto done;
        }
        if (pc.id >= 0)
            rc = tok_pieces_push(&b, pc.off, pc.len, pc.id, pc.at_start);
        else if (pc.len)
            rc = split_added(tok, &tok->norm, &arena, &pc, &b);
        if (rc)
            goto done;
    }
    /* 3. pre-tokenize */
    tok_pieces *words = &b;
    if (tok->pretok) {
        a.n = 0;
        if ((rc = tok_pretok_run(tok->pretok, &arena, &b, &a)))
            goto done;
        words = &a;
    }
    /* 4. the model */
    for (size_t i = 0; i < words->n; i++) {
        const tok_piece *w = &words->v[i];
        rc = w->id >= 0 ? tok_ids_push(&ids, w->id)
                        : tok_bpe_word(tok->model, arena.data + w->off, w->len, &ids, scratch, err);
        if (rc)
            goto done;
    }
    /* 5. post-process */
    if (add_special_tokens && tok->post) {
        if ((rc = tok_postproc_run(tok->post, &ids, &out)))
            goto done;
        free(ids.v);
        ids = out;
        out = (tok_ids){0};
    }
    *ret_ids = ids.v;
    *ret_n = ids.n;
    ids.v = NULL;
done:
    if (rc == -ENOMEM)
        lm_err_set(err, rc, "tokenizer: out of memory encoding %zu bytes", len);
    else if (rc == -ERANGE)
        lm_err_set(err, rc, "tokenizer: a pre-tokenizer/normalizer regex hit a PCRE2 match "
                   "limit on this %zu-byte input", len);
    tok_buf_free(&arena);
    tok_buf_free(&tmp);
    tok_pieces_free(&a);
    tok_pieces_free(&b);
    tok_spans_free(&sp);
    free(ids.v);
    free(out.v);
    tok_bpe_scratch_free(scratch);
    return rc;
}

/* ---- decode --------------------------------------------------------------- */

static int decode_into(const tokenizer *tok, const int32_t *ids, size_t n, bool skip, tok_buf *res)
{
    tok_buf arena = {0};
    tok_pieces toks = {0};
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        size_t len;
        const char *s = token_str(tok, ids[i], &len);
        if (!s || (skip && tokenizer_is_special(tok, ids[i])))
            continue;
        size_t off = arena.len;
        rc = tok_buf_put(&arena, s, len);
        if (!rc)
            rc = tok_pieces_push(&toks, off, len, -1, false);
    }
    if (!rc && tok->decoder)
        rc = tok_decoder_run(tok->decoder, &arena, &toks);
    for (size_t i = 0; i < toks.n && !rc; i++) {
        if (!tok->decoder && i && (rc = tok_buf_putc(res, ' ')))
            break;
        rc = tok_buf_put(res, arena.data + toks.v[i].off, toks.v[i].len);
    }
    if (!rc && !res->data)
        rc = tok_buf_put(res, "", 0);
    tok_buf_free(&arena);
    tok_pieces_free(&toks);
    return rc;
}

int tokenizer_decode(const tokenizer *tok, const int32_t *ids, size_t n, bool skip_special_tokens,
                     char **ret_text, size_t *ret_len, lm_err *err)
{
    tok_buf res = {0};
    *ret_text = NULL;
    int rc = decode_into(tok, ids, n, skip_special_tokens, &res);
    if (rc) {
        tok_buf_free(&res);
        return lm_err_set(err, rc, rc == -ERANGE ? "tokenizer: a decoder regex hit a PCRE2 "
                          "match limit decoding %zu ids" : "tokenizer: out of memory decoding "
                          "%zu ids", n);
    }
    *ret_text = res.data;
    if (ret_len)
        *ret_len = res.len;
    return 0;
}

int tokenizer_clean_up_spaces(const char *text, size_t len, char **ret_text, size_t *ret_len,
                              lm_err *err)
{
    /* the replacements of transformers' clean_up_tokenization, applied one
     * after the other over the whole text, in this order */
    static const char *const from[] = {" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's",
                                       " 've", " 're"};
    static const char *const to[] = {".", "?", "!", ",", "'", "n't", "'m", "'s", "'ve", "'re"};
    tok_buf a = {0}, b = {0};
    int rc = tok_buf_put(&a, text, len);
    for (size_t r = 0; r < sizeof(from) / sizeof(from[0]) && !rc; r++) {
        tok_regex lit = {.literal = (char *)from[r], .literal_len = strlen(from[r])};
        tok_spans sp = {0};
        b.len = 0;
        rc = tok_regex_replace(&lit, a.data, a.len, to[r], strlen(to[r]), &b, &sp);
        if (!rc && !b.data)
            rc = tok_buf_put(&b, "", 0);
        tok_spans_free(&sp);
        tok_buf t = a;
        a = b;
        b = t;
    }
    tok_buf_free(&b);
    if (rc) {
        tok_buf_free(&a);
        return lm_err_set(err, rc, "tokenizer: out of memory cleaning up %zu bytes", len);
    }
    *ret_text = a.data;
    if (ret_len)
        *ret_len = a.len;
    return 0;
}

/* ---- streaming ------------------------------------------------------------- */

/*
 * The text of ids[prefix..read) was emitted; a push decodes ids[prefix..)
 * and emits what it adds past the text of ids[prefix..read), unless that
 * ends in U+FFFD (a character whose bytes have not all arrived). Decoding
 * from `prefix` (one emitted step back) keeps the context that decoders use
 * at the start of a text (Metaspace / Strip drop a leading space there).
 * With ByteFallback, an open run of <0xXX> tokens is held back too: an
 * invalid run decodes to one U+FFFD per byte, so a later byte can change
 * how the earlier ones read.
 */
struct tokenizer_detok {
    const tokenizer *tok;
    bool skip;
    tok_ids ids;
    size_t prefix, read;
    tok_buf a, b, out;
};

int tokenizer_detok_new(const tokenizer *tok, bool skip_special_tokens, tokenizer_detok **ret,
                        lm_err *err)
{
    *ret = calloc(1, sizeof(**ret));
    if (!*ret)
        return lm_err_set(err, -ENOMEM, "tokenizer: out of memory");
    (*ret)->tok = tok;
    (*ret)->skip = skip_special_tokens;
    return 0;
}

void tokenizer_detok_free(tokenizer_detok *d)
{
    if (!d)
        return;
    free(d->ids.v);
    tok_buf_free(&d->a);
    tok_buf_free(&d->b);
    tok_buf_free(&d->out);
    free(d);
}

static bool ends_incomplete(const tok_buf *b)
{
    return b->len >= 3 && !memcmp(b->data + b->len - 3, "\xEF\xBF\xBD", 3);
}

static int detok_step(tokenizer_detok *d, bool final, const char **ret_text, size_t *ret_len,
                      lm_err *err)
{
    d->a.len = d->b.len = d->out.len = 0;
    int rc = decode_into(d->tok, d->ids.v + d->prefix, d->read - d->prefix, d->skip, &d->a);
    if (!rc)
        rc = decode_into(d->tok, d->ids.v + d->prefix, d->ids.n - d->prefix, d->skip, &d->b);
    if (!rc)
        rc = tok_buf_put(&d->out, "", 0);
    if (rc)
        return lm_err_set(err, rc, "tokenizer: streaming decode failed (%s)", strerror(-rc));
    bool open_run = false;
    for (size_t i = d->ids.n; !final && d->tok->byte_runs && i-- > d->read;) {
        size_t len;
        const char *s = token_str(d->tok, d->ids.v[i], &len);
        if (!s || (d->skip && tokenizer_is_special(d->tok, d->ids.v[i])))
            continue;   /* not decoded: look at the token before */
        open_run = len == 6 && !memcmp(s, "<0x", 3) && s[5] == '>';
        break;
    }
    if (d->b.len > d->a.len && (final || (!ends_incomplete(&d->b) && !open_run)) &&
        !memcmp(d->a.data, d->b.data, d->a.len)) {
        if ((rc = tok_buf_put(&d->out, d->b.data + d->a.len, d->b.len - d->a.len)))
            return lm_err_set(err, rc, "tokenizer: out of memory in streaming decode");
        d->prefix = d->read;
        d->read = d->ids.n;
    }
    *ret_text = d->out.data;
    *ret_len = d->out.len;
    return 0;
}

int tokenizer_detok_push(tokenizer_detok *d, int32_t id, const char **ret_text, size_t *ret_len,
                         lm_err *err)
{
    if (tok_ids_push(&d->ids, id))
        return lm_err_set(err, -ENOMEM, "tokenizer: out of memory in streaming decode");
    return detok_step(d, false, ret_text, ret_len, err);
}

int tokenizer_detok_finish(tokenizer_detok *d, const char **ret_text, size_t *ret_len, lm_err *err)
{
    return detok_step(d, true, ret_text, ret_len, err);
}
