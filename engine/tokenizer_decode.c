/*
 * tokenizer_decode.c: decoders ("decoder") and post-processors
 * ("post_processor") of tokenizer.json.
 *
 * Decoders turn the list of vocabulary strings of the ids into text, one
 * step after the other, exactly like the Rust Decoder::decode_chain:
 * ByteLevel (GPT-2 characters back to bytes, lossy UTF-8 repair), Replace,
 * ByteFallback (<0xXX> runs to bytes; an invalid run gives one U+FFFD per
 * byte), Fuse, Strip (per token), Metaspace (replacement -> space, dropped
 * in the first token unless prepend_scheme is never), BPEDecoder (suffix),
 * Sequence. The final tokens are concatenated; with no decoder at all they
 * are joined with spaces (the Rust default).
 *
 * Post-processors only matter with add_special_tokens: TemplateProcessing
 * ("single" template), BertProcessing / RobertaProcessing ([cls] A [sep]),
 * ByteLevel (no change to ids), Sequence.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer_internal.h"

typedef enum {
    DEC_BYTELEVEL,
    DEC_REPLACE,
    DEC_BYTEFALLBACK,
    DEC_FUSE,
    DEC_STRIP,
    DEC_METASPACE,
    DEC_BPE,
    DEC_SEQUENCE,
} dec_kind;

struct tok_decoder {
    dec_kind kind;
    tok_regex pattern;     /* Replace */
    char *text;            /* Replace content, Metaspace replacement, Strip content, BPE suffix */
    size_t text_len;
    int32_t cp;            /* Strip content / Metaspace replacement as a code point */
    long long start, stop; /* Strip */
    bool prepend_never;    /* Metaspace */
    tok_decoder **subs;
    size_t n_subs;
};

void tok_decoder_free(tok_decoder *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->n_subs; i++)
        tok_decoder_free(d->subs[i]);
    free(d->subs);
    free(d->text);
    tok_regex_free(&d->pattern);
    free(d);
}

static int set_text(tok_decoder *d, const char *s)
{
    d->text_len = strlen(s);
    d->text = strdup(s);
    if (!d->text)
        return -ENOMEM;
    int n;
    d->cp = d->text_len ? tok_utf8_decode(s, d->text_len, &n) : -1;
    return 0;
}

static int one_char(tok_decoder *d, const char *what, const char *key, lm_err *err)
{
    int n = 0;
    if (d->text_len)
        tok_utf8_decode(d->text, d->text_len, &n);
    if (!d->text_len || (size_t)n != d->text_len)
        return lm_err_set(err, -EINVAL, "%s: \"%s\" must be one character", what, key);
    return 0;
}

int tok_decoder_parse(json_t *j, tok_decoder **ret, lm_err *err)
{
    *ret = NULL;
    if (!j || json_is_null(j))
        return 0;
    const char *type;
    int rc = tok_json_type(j, &type, "decoder", err);
    if (rc)
        return rc;
    tok_decoder *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    char what[96];
    snprintf(what, sizeof(what), "decoder %s", type);
    if (!strcmp(type, "ByteLevel")) {
        d->kind = DEC_BYTELEVEL;
    } else if (!strcmp(type, "ByteFallback")) {
        d->kind = DEC_BYTEFALLBACK;
    } else if (!strcmp(type, "Fuse")) {
        d->kind = DEC_FUSE;
    } else if (!strcmp(type, "Replace")) {
        d->kind = DEC_REPLACE;
        const char *c = NULL;
        if ((rc = tok_json_str(j, "content", &c, what, err)))
            goto fail;
        if (!c) {
            rc = lm_err_set(err, -EINVAL, "%s: missing \"content\" string", what);
            goto fail;
        }
        if ((rc = set_text(d, c)) ||
            (rc = tok_regex_parse(&d->pattern, json_object_get(j, "pattern"), what, err)))
            goto fail;
    } else if (!strcmp(type, "Strip")) {
        d->kind = DEC_STRIP;
        const char *c = NULL;
        if ((rc = tok_json_str(j, "content", &c, what, err)) ||
            (rc = tok_json_int(j, "start", &d->start, what, err)) ||
            (rc = tok_json_int(j, "stop", &d->stop, what, err)))
            goto fail;
        if ((rc = set_text(d, c ? c : " ")) || (rc = one_char(d, what, "content", err)))
            goto fail;
        if (d->start < 0 || d->stop < 0) {
            rc = lm_err_set(err, -EINVAL, "%s: start/stop must not be negative", what);
            goto fail;
        }
    } else if (!strcmp(type, "Metaspace")) {
        d->kind = DEC_METASPACE;
        const char *r = "\xE2\x96\x81", *scheme = NULL;
        bool legacy = true;
        if ((rc = tok_json_str(j, "replacement", &r, what, err)) ||
            (rc = tok_json_str(j, "prepend_scheme", &scheme, what, err)) ||
            (rc = tok_json_bool(j, "add_prefix_space", &legacy, what, err)))
            goto fail;
        if ((rc = set_text(d, r)) || (rc = one_char(d, what, "replacement", err)))
            goto fail;
        if (scheme && strcmp(scheme, "always") && strcmp(scheme, "first") &&
            strcmp(scheme, "never")) {
            rc = lm_err_set(err, -EINVAL, "%s: unknown prepend_scheme '%s'", what, scheme);
            goto fail;
        }
        d->prepend_never = scheme ? !strcmp(scheme, "never") : !legacy;
    } else if (!strcmp(type, "BPEDecoder")) {
        d->kind = DEC_BPE;
        const char *s = "</w>";
        if ((rc = tok_json_str(j, "suffix", &s, what, err)) || (rc = set_text(d, s)))
            goto fail;
    } else if (!strcmp(type, "Sequence")) {
        d->kind = DEC_SEQUENCE;
        json_t *arr = json_object_get(j, "decoders");
        if (!json_is_array(arr)) {
            rc = lm_err_set(err, -EINVAL, "%s: \"decoders\" must be a list", what);
            goto fail;
        }
        d->subs = calloc(json_array_size(arr) + 1, sizeof(*d->subs));
        if (!d->subs) {
            rc = -ENOMEM;
            goto fail;
        }
        for (size_t i = 0; i < json_array_size(arr); i++) {
            if ((rc = tok_decoder_parse(json_array_get(arr, i), &d->subs[d->n_subs], err)))
                goto fail;
            if (d->subs[d->n_subs])
                d->n_subs++;
        }
    } else {
        rc = lm_err_set(err, -EINVAL, "decoder type '%s' is not supported", type);
        goto fail;
    }
    *ret = d;
    return 0;
fail:
    tok_decoder_free(d);
    return rc;
}

/* Append tmp to the arena as a new token of out. */
static int emit(tok_buf *arena, tok_pieces *out, const tok_buf *tmp)
{
    size_t off = arena->len;
    if (tok_buf_put(arena, tmp->data, tmp->len))
        return -ENOMEM;
    return tok_pieces_push(out, off, tmp->len, -1, false);
}

/* ByteLevel for one token: its characters as bytes if all are in the
 * table, else its UTF-8 bytes unchanged. */
static int bytelevel_token(const char *s, size_t len, tok_buf *out)
{
    size_t mark = out->len;
    for (size_t i = 0; i < len;) {
        int k;
        int b = tok_cp_to_byte(tok_utf8_decode(s + i, len - i, &k));
        if (b < 0) {
            out->len = mark;
            return tok_buf_put(out, s, len);
        }
        if (tok_buf_putc(out, (char)b))
            return -ENOMEM;
        i += (size_t)k;
    }
    return 0;
}

static int parse_byte_token(const char *s, size_t len)
{
    if (len != 6 || memcmp(s, "<0x", 3) || s[5] != '>')
        return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static int flush_bytes(tok_buf *arena, tok_pieces *out, tok_buf *bytes, tok_buf *tmp)
{
    int rc = 0;
    if (!bytes->len)
        return 0;
    if (tok_utf8_invalid_at(bytes->data, bytes->len) == (size_t)-1) {
        rc = emit(arena, out, bytes);
    } else {
        tmp->len = 0;
        tok_buf_put(tmp, "\xEF\xBF\xBD", 3);
        for (size_t i = 0; i < bytes->len && !rc; i++)
            rc = emit(arena, out, tmp);
    }
    bytes->len = 0;
    return rc;
}

static int step(const tok_decoder *d, tok_buf *arena, const tok_pieces *in, tok_pieces *out)
{
    tok_buf tmp = {0}, bytes = {0};
    tok_spans sp = {0};
    int rc = 0;
    switch (d->kind) {
    case DEC_BYTELEVEL:
        for (size_t i = 0; i < in->n && !rc; i++)
            rc = bytelevel_token(arena->data + in->v[i].off, in->v[i].len, &bytes);
        if (!rc)
            rc = tok_utf8_lossy(&tmp, bytes.data ? bytes.data : "", bytes.len);
        if (!rc)
            rc = emit(arena, out, &tmp);
        break;
    case DEC_FUSE:
        for (size_t i = 0; i < in->n && !rc; i++)
            rc = tok_buf_put(&tmp, arena->data + in->v[i].off, in->v[i].len);
        if (!rc)
            rc = emit(arena, out, &tmp);
        break;
    case DEC_BYTEFALLBACK:
        for (size_t i = 0; i < in->n && !rc; i++) {
            int b = parse_byte_token(arena->data + in->v[i].off, in->v[i].len);
            if (b >= 0) {
                rc = tok_buf_putc(&bytes, (char)b);
                continue;
            }
            if ((rc = flush_bytes(arena, out, &bytes, &tmp)))
                break;
            rc = tok_pieces_push(out, in->v[i].off, in->v[i].len, -1, false);
        }
        if (!rc)
            rc = flush_bytes(arena, out, &bytes, &tmp);
        break;
    case DEC_REPLACE:
        for (size_t i = 0; i < in->n && !rc; i++) {
            tmp.len = 0;
            rc = tok_regex_replace(&d->pattern, arena->data + in->v[i].off, in->v[i].len,
                                   d->text, d->text_len, &tmp, &sp);
            if (!rc)
                rc = emit(arena, out, &tmp);
        }
        break;
    case DEC_STRIP:
        for (size_t i = 0; i < in->n && !rc; i++) {
            const char *s = arena->data + in->v[i].off;
            size_t len = in->v[i].len, a = 0, b = len;
            for (long long k = 0; k < d->start && a < b; k++) {
                int n;
                if (tok_utf8_decode(s + a, b - a, &n) != d->cp)
                    break;
                a += (size_t)n;
            }
            for (long long k = 0; k < d->stop && b > a; k++) {
                size_t p = b - 1;
                while (p > a && ((unsigned char)s[p] & 0xC0) == 0x80)
                    p--;
                int n;
                if (tok_utf8_decode(s + p, b - p, &n) != d->cp)
                    break;
                b = p;
            }
            rc = tok_pieces_push(out, in->v[i].off + a, b - a, -1, false);
        }
        break;
    case DEC_METASPACE:
        for (size_t i = 0; i < in->n && !rc; i++) {
            const char *s;
            size_t len = in->v[i].len;
            tmp.len = 0;
            for (size_t p = 0; p < len && !rc;) {
                int n;
                s = arena->data + in->v[i].off;
                int32_t cp = tok_utf8_decode(s + p, len - p, &n);
                if (cp != d->cp)
                    rc = tok_buf_put(&tmp, s + p, (size_t)n);
                else if (i != 0 || d->prepend_never)
                    rc = tok_buf_putc(&tmp, ' ');
                p += (size_t)n;
            }
            if (!rc)
                rc = emit(arena, out, &tmp);
        }
        break;
    case DEC_BPE:
        for (size_t i = 0; i < in->n && !rc; i++) {
            tok_regex lit = {.literal = d->text, .literal_len = d->text_len};
            tmp.len = 0;
            rc = tok_regex_replace(&lit, arena->data + in->v[i].off, in->v[i].len,
                                   i + 1 == in->n ? "" : " ", i + 1 == in->n ? 0 : 1, &tmp, &sp);
            if (!rc)
                rc = emit(arena, out, &tmp);
        }
        break;
    case DEC_SEQUENCE: {
        tok_pieces a = {0}, b = {0};
        const tok_pieces *cur = in;
        for (size_t i = 0; i < d->n_subs && !rc; i++) {
            tok_pieces *dst = i + 1 == d->n_subs ? out : (i % 2 ? &b : &a);
            dst->n = 0;
            rc = step(d->subs[i], arena, cur, dst);
            cur = dst;
        }
        if (!rc && !d->n_subs)
            for (size_t i = 0; i < in->n && !rc; i++)
                rc = tok_pieces_push(out, in->v[i].off, in->v[i].len, -1, false);
        tok_pieces_free(&a);
        tok_pieces_free(&b);
        break;
    }
    }
    tok_buf_free(&tmp);
    tok_buf_free(&bytes);
    tok_spans_free(&sp);
    return rc;
}

int tok_decoder_run(const tok_decoder *d, tok_buf *arena, tok_pieces *toks)
{
    tok_pieces out = {0};
    int rc = step(d, arena, toks, &out);
    if (rc) {
        tok_pieces_free(&out);
        return rc;
    }
    tok_pieces_free(toks);
    *toks = out;
    return 0;
}

bool tok_decoder_has_bytefallback(const tok_decoder *d)
{
    if (d->kind == DEC_BYTEFALLBACK)
        return true;
    for (size_t i = 0; i < d->n_subs; i++)
        if (tok_decoder_has_bytefallback(d->subs[i]))
            return true;
    return false;
}

int tok_decoder_token_bytes(const tok_decoder *d, const char *s, size_t len, tok_buf *out)
{
    /* One token in mid-text: raw bytes, no UTF-8 repair, no start/end rules. */
    tok_buf cur = {0}, next = {0};
    tok_spans sp = {0};
    int rc = tok_buf_put(&cur, s, len);
    const tok_decoder *single[1] = {d};
    const tok_decoder *const *steps = d->kind == DEC_SEQUENCE
                                          ? (const tok_decoder *const *)d->subs : single;
    size_t n = d->kind == DEC_SEQUENCE ? d->n_subs : 1;
    for (size_t i = 0; i < n && !rc; i++) {
        const tok_decoder *st = steps[i];
        next.len = 0;
        switch (st->kind) {
        case DEC_BYTELEVEL:
            rc = bytelevel_token(cur.data, cur.len, &next);
            break;
        case DEC_BYTEFALLBACK: {
            int b = parse_byte_token(cur.data, cur.len);
            rc = b >= 0 ? tok_buf_putc(&next, (char)b) : tok_buf_put(&next, cur.data, cur.len);
            break;
        }
        case DEC_REPLACE:
            if (tok_utf8_invalid_at(cur.data, cur.len) == (size_t)-1)
                rc = tok_regex_replace(&st->pattern, cur.data, cur.len, st->text, st->text_len,
                                       &next, &sp);
            else
                rc = tok_buf_put(&next, cur.data, cur.len);
            break;
        case DEC_METASPACE:
            for (size_t p = 0; p < cur.len && !rc;) {
                int k;
                int32_t cp = tok_utf8_decode(cur.data + p, cur.len - p, &k);
                rc = cp == st->cp ? tok_buf_putc(&next, ' ')
                                  : tok_buf_put(&next, cur.data + p, (size_t)k);
                p += (size_t)k;
            }
            break;
        case DEC_BPE: {
            tok_regex lit = {.literal = st->text, .literal_len = st->text_len};
            rc = tok_regex_replace(&lit, cur.data, cur.len, " ", 1, &next, &sp);
            break;
        }
        default:   /* Fuse, Strip, nested Sequence: no effect on one mid-text token */
            rc = tok_buf_put(&next, cur.data, cur.len);
            break;
        }
        tok_buf t = cur;
        cur = next;
        next = t;
    }
    if (!rc)
        rc = tok_buf_put(out, cur.data, cur.len);
    tok_buf_free(&cur);
    tok_buf_free(&next);
    tok_spans_free(&sp);
    return rc;
}

/* ---- post-processors ----------------------------------------------------- */

#define PP_SEQ_A INT32_MIN

typedef enum { PP_NONE, PP_TEMPLATE, PP_SEQUENCE } pp_kind;

struct tok_postproc {
    pp_kind kind;
    tok_ids single;        /* ids, PP_SEQ_A where the sequence goes */
    tok_postproc **subs;
    size_t n_subs;
};

void tok_postproc_free(tok_postproc *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n_subs; i++)
        tok_postproc_free(p->subs[i]);
    free(p->subs);
    free(p->single.v);
    free(p);
}

static int parse_template(json_t *j, tok_postproc *p, lm_err *err)
{
    json_t *single = json_object_get(j, "single");
    json_t *specials = json_object_get(j, "special_tokens");
    if (!json_is_array(single))
        return lm_err_set(err, -EINVAL, "post_processor TemplateProcessing: \"single\" must be "
                          "a list of pieces");
    for (size_t i = 0; i < json_array_size(single); i++) {
        json_t *it = json_array_get(single, i);
        json_t *seq = json_object_get(it, "Sequence");
        json_t *sp = json_object_get(it, "SpecialToken");
        int rc;
        if (json_is_object(seq)) {
            json_t *id = json_object_get(seq, "id");
            if (!json_is_string(id) || strcmp(json_string_value(id), "A"))
                return lm_err_set(err, -EINVAL, "post_processor TemplateProcessing: single "
                                  "template may only use sequence A");
            if ((rc = tok_ids_push(&p->single, PP_SEQ_A)))
                return rc;
        } else if (json_is_object(sp) && json_is_string(json_object_get(sp, "id"))) {
            const char *name = json_string_value(json_object_get(sp, "id"));
            json_t *def = json_object_get(specials, name);
            json_t *ids = json_object_get(def, "ids");
            if (!json_is_array(ids))
                return lm_err_set(err, -EINVAL, "post_processor TemplateProcessing: special "
                                  "token \"%s\" has no entry with \"ids\" in special_tokens",
                                  name);
            for (size_t k = 0; k < json_array_size(ids); k++) {
                json_t *v = json_array_get(ids, k);
                if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                    json_integer_value(v) >= TOK_MAX_ID)
                    return lm_err_set(err, -EINVAL, "post_processor TemplateProcessing: id of "
                                      "special token \"%s\" is out of range", name);
                if ((rc = tok_ids_push(&p->single, (int32_t)json_integer_value(v))))
                    return rc;
            }
        } else {
            return lm_err_set(err, -EINVAL, "post_processor TemplateProcessing: single[%zu] is "
                              "neither {\"Sequence\": ...} nor {\"SpecialToken\": ...}", i);
        }
    }
    return 0;
}

/* Bert/Roberta: "cls": [token, id], "sep": [token, id]; single = cls A sep. */
static int parse_cls_sep(json_t *j, tok_postproc *p, const char *what, lm_err *err)
{
    const char *keys[2] = {"cls", "sep"};
    int32_t id[2];
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(j, keys[i]);
        json_t *n = json_array_get(v, 1);
        if (!json_is_integer(n) || json_integer_value(n) < 0 || json_integer_value(n) >= TOK_MAX_ID)
            return lm_err_set(err, -EINVAL, "post_processor %s: \"%s\" must be [token, id]", what,
                              keys[i]);
        id[i] = (int32_t)json_integer_value(n);
    }
    int rc;
    if ((rc = tok_ids_push(&p->single, id[0])) || (rc = tok_ids_push(&p->single, PP_SEQ_A)) ||
        (rc = tok_ids_push(&p->single, id[1])))
        return rc;
    return 0;
}

int tok_postproc_parse(json_t *j, tok_postproc **ret, lm_err *err)
{
    *ret = NULL;
    if (!j || json_is_null(j))
        return 0;
    const char *type;
    int rc = tok_json_type(j, &type, "post_processor", err);
    if (rc)
        return rc;
    tok_postproc *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    if (!strcmp(type, "ByteLevel")) {
        p->kind = PP_NONE;
    } else if (!strcmp(type, "TemplateProcessing")) {
        p->kind = PP_TEMPLATE;
        rc = parse_template(j, p, err);
    } else if (!strcmp(type, "BertProcessing") || !strcmp(type, "RobertaProcessing")) {
        p->kind = PP_TEMPLATE;
        rc = parse_cls_sep(j, p, type, err);
    } else if (!strcmp(type, "Sequence")) {
        p->kind = PP_SEQUENCE;
        json_t *arr = json_object_get(j, "processors");
        if (!json_is_array(arr)) {
            rc = lm_err_set(err, -EINVAL, "post_processor Sequence: \"processors\" must be a list");
        } else if (!(p->subs = calloc(json_array_size(arr) + 1, sizeof(*p->subs)))) {
            rc = -ENOMEM;
        } else {
            for (size_t i = 0; i < json_array_size(arr) && !rc; i++) {
                rc = tok_postproc_parse(json_array_get(arr, i), &p->subs[p->n_subs], err);
                if (!rc && p->subs[p->n_subs])
                    p->n_subs++;
            }
        }
    } else {
        rc = lm_err_set(err, -EINVAL, "post_processor type '%s' is not supported", type);
    }
    if (rc) {
        tok_postproc_free(p);
        return rc;
    }
    *ret = p;
    return 0;
}

int tok_postproc_run(const tok_postproc *p, const tok_ids *in, tok_ids *out)
{
    int rc = 0;
    switch (p->kind) {
    case PP_NONE:
        for (size_t i = 0; i < in->n && !rc; i++)
            rc = tok_ids_push(out, in->v[i]);
        return rc;
    case PP_TEMPLATE:
        for (size_t k = 0; k < p->single.n && !rc; k++) {
            if (p->single.v[k] != PP_SEQ_A) {
                rc = tok_ids_push(out, p->single.v[k]);
                continue;
            }
            for (size_t i = 0; i < in->n && !rc; i++)
                rc = tok_ids_push(out, in->v[i]);
        }
        return rc;
    case PP_SEQUENCE: {
        tok_ids cur = {0}, next = {0};
        for (size_t i = 0; i < in->n && !rc; i++)
            rc = tok_ids_push(&cur, in->v[i]);
        for (size_t s = 0; s < p->n_subs && !rc; s++) {
            next.n = 0;
            rc = tok_postproc_run(p->subs[s], &cur, &next);
            tok_ids t = cur;
            cur = next;
            next = t;
        }
        for (size_t i = 0; i < cur.n && !rc; i++)
            rc = tok_ids_push(out, cur.v[i]);
        free(cur.v);
        free(next.v);
        return rc;
    }
    }
    return 0;
}
