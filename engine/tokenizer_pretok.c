/*
 * tokenizer_pretok.c: pre-tokenizers of tokenizer.json ("pre_tokenizer").
 *
 * Supported: Split (regex or string; Removed, Isolated, MergedWithPrevious,
 * MergedWithNext, Contiguous; invert), ByteLevel (add_prefix_space,
 * use_regex with the GPT-2 pattern; maps every byte to its GPT-2 unicode
 * character), Metaspace (replacement, prepend_scheme first/always/never or
 * legacy add_prefix_space, split), Digits, Whitespace, WhitespaceSplit,
 * Punctuation, BertPreTokenizer, Sequence. Others are refused at load.
 *
 * Each step maps a list of pieces to a new list; like the Rust
 * PreTokenizedString, a step splits every piece independently and empty
 * pieces vanish. Pieces that are already added tokens pass untouched.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer_internal.h"

/* The pattern of GPT-2 (ByteLevel use_regex). */
static const char GPT2_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
/* Whitespace pre-tokenizer: words and punctuation runs, whitespace removed. */
static const char WS_RE[] = "\\w+|[^\\w\\s]+";

typedef enum {
    PT_SPLIT,
    PT_BYTELEVEL,
    PT_METASPACE,
    PT_DIGITS,
    PT_WHITESPACE,
    PT_WHITESPACE_SPLIT,
    PT_PUNCTUATION,
    PT_BERT,
    PT_SEQUENCE,
} pt_kind;

typedef enum { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER } prepend_scheme;

struct tok_pretok {
    pt_kind kind;
    tok_regex re;                /* Split pattern, GPT-2 or Whitespace regex */
    bool has_re;
    tok_split_behavior behavior;
    bool invert;
    bool add_prefix_space;       /* ByteLevel */
    char repl[5];                /* Metaspace replacement, UTF-8 */
    int repl_len;
    int32_t repl_cp;
    prepend_scheme prepend;
    bool split;                  /* Metaspace split */
    bool individual_digits;
    tok_pretok **subs;
    size_t n_subs;
};

void tok_pretok_free(tok_pretok *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n_subs; i++)
        tok_pretok_free(p->subs[i]);
    free(p->subs);
    tok_regex_free(&p->re);
    free(p);
}

static int compile_fixed(tok_regex *re, const char *pattern, lm_err *err)
{
    json_t *j = json_pack("{s:s}", "Regex", pattern);
    if (!j)
        return -ENOMEM;
    int rc = tok_regex_parse(re, j, "pre_tokenizer", err);
    json_decref(j);
    return rc;
}

int tok_pretok_parse(json_t *j, tok_pretok **ret, lm_err *err)
{
    *ret = NULL;
    if (!j || json_is_null(j))
        return 0;
    const char *type;
    int rc = tok_json_type(j, &type, "pre_tokenizer", err);
    if (rc)
        return rc;
    tok_pretok *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    char what[96];
    snprintf(what, sizeof(what), "pre_tokenizer %s", type);
    if (!strcmp(type, "Split")) {
        p->kind = PT_SPLIT;
        p->has_re = true;
        if ((rc = tok_regex_parse(&p->re, json_object_get(j, "pattern"), what, err)) ||
            (rc = tok_split_behavior_parse(json_object_get(j, "behavior"), &p->behavior, what,
                                           err)) ||
            (rc = tok_json_bool(j, "invert", &p->invert, what, err)))
            goto fail;
    } else if (!strcmp(type, "ByteLevel")) {
        p->kind = PT_BYTELEVEL;
        bool use_regex = true;
        p->add_prefix_space = true;
        if ((rc = tok_json_bool(j, "add_prefix_space", &p->add_prefix_space, what, err)) ||
            (rc = tok_json_bool(j, "use_regex", &use_regex, what, err)))
            goto fail;
        if (use_regex) {
            p->has_re = true;
            if ((rc = compile_fixed(&p->re, GPT2_RE, err)))
                goto fail;
        }
    } else if (!strcmp(type, "Metaspace")) {
        p->kind = PT_METASPACE;
        const char *r = "\xE2\x96\x81", *scheme = NULL;
        bool legacy_prefix = true, has_legacy = json_object_get(j, "add_prefix_space") != NULL;
        p->split = true;
        if ((rc = tok_json_str(j, "replacement", &r, what, err)) ||
            (rc = tok_json_str(j, "prepend_scheme", &scheme, what, err)) ||
            (rc = tok_json_bool(j, "add_prefix_space", &legacy_prefix, what, err)) ||
            (rc = tok_json_bool(j, "split", &p->split, what, err)))
            goto fail;
        int k;
        if (!*r || strlen(r) > 4 || (size_t)(tok_utf8_decode(r, strlen(r), &k), k) != strlen(r)) {
            rc = lm_err_set(err, -EINVAL, "%s: \"replacement\" must be one character", what);
            goto fail;
        }
        p->repl_cp = tok_utf8_decode(r, strlen(r), &k);
        p->repl_len = k;
        memcpy(p->repl, r, (size_t)k);
        if (!scheme)
            p->prepend = has_legacy && !legacy_prefix ? PREPEND_NEVER : PREPEND_ALWAYS;
        else if (!strcmp(scheme, "always"))
            p->prepend = PREPEND_ALWAYS;
        else if (!strcmp(scheme, "first"))
            p->prepend = PREPEND_FIRST;
        else if (!strcmp(scheme, "never"))
            p->prepend = PREPEND_NEVER;
        else {
            rc = lm_err_set(err, -EINVAL, "%s: unknown prepend_scheme '%s'", what, scheme);
            goto fail;
        }
    } else if (!strcmp(type, "Digits")) {
        p->kind = PT_DIGITS;
        if ((rc = tok_json_bool(j, "individual_digits", &p->individual_digits, what, err)))
            goto fail;
    } else if (!strcmp(type, "Whitespace")) {
        p->kind = PT_WHITESPACE;
        p->has_re = true;
        if ((rc = compile_fixed(&p->re, WS_RE, err)))
            goto fail;
    } else if (!strcmp(type, "WhitespaceSplit")) {
        p->kind = PT_WHITESPACE_SPLIT;
    } else if (!strcmp(type, "BertPreTokenizer")) {
        p->kind = PT_BERT;
    } else if (!strcmp(type, "Punctuation")) {
        p->kind = PT_PUNCTUATION;
        p->behavior = TOK_SPLIT_ISOLATED;
        json_t *b = json_object_get(j, "behavior");
        if (b && !json_is_null(b) &&
            (rc = tok_split_behavior_parse(b, &p->behavior, what, err)))
            goto fail;
    } else if (!strcmp(type, "Sequence")) {
        p->kind = PT_SEQUENCE;
        json_t *arr = json_object_get(j, "pretokenizers");
        if (!json_is_array(arr)) {
            rc = lm_err_set(err, -EINVAL, "%s: \"pretokenizers\" must be a list", what);
            goto fail;
        }
        p->subs = calloc(json_array_size(arr) + 1, sizeof(*p->subs));
        if (!p->subs) {
            rc = -ENOMEM;
            goto fail;
        }
        for (size_t i = 0; i < json_array_size(arr); i++) {
            if ((rc = tok_pretok_parse(json_array_get(arr, i), &p->subs[p->n_subs], err)))
                goto fail;
            if (p->subs[p->n_subs])
                p->n_subs++;
        }
    } else {
        rc = lm_err_set(err, -EINVAL, "pre_tokenizer type '%s' is not supported", type);
        goto fail;
    }
    *ret = p;
    return 0;
fail:
    tok_pretok_free(p);
    return rc;
}

static bool is_ws(int32_t c)
{
    return tok_is_whitespace(c);
}

/* Split piece `pc` by spans computed over its text, keeping the results. */
static int push_spans(const tok_piece *pc, const tok_spans *sp, tok_pieces *out)
{
    for (size_t i = 0; i < sp->n; i++)
        if (tok_pieces_push(out, pc->off + sp->v[i].start, sp->v[i].end - sp->v[i].start, -1,
                            pc->at_start && sp->v[i].start == 0))
            return -ENOMEM;
    return 0;
}

static int split_chars(bool (*pred)(int32_t), tok_split_behavior b, const tok_buf *arena,
                       const tok_piece *pc, tok_spans *sp, tok_pieces *out)
{
    int rc = tok_char_find(pred, arena->data + pc->off, pc->len, sp);
    if (rc)
        return rc;
    tok_spans_apply(sp, b, false);
    return push_spans(pc, sp, out);
}

/* One non-Sequence step on one text piece. */
static int step_piece(const tok_pretok *p, tok_buf *arena, const tok_piece *pc, tok_spans *sp,
                      tok_pieces *out)
{
    int rc;
    switch (p->kind) {
    case PT_SPLIT:
    case PT_WHITESPACE:
        if ((rc = tok_regex_find(&p->re, arena->data + pc->off, pc->len, sp)))
            return rc;
        if (p->kind == PT_SPLIT)
            tok_spans_apply(sp, p->behavior, p->invert);
        else
            tok_spans_apply(sp, TOK_SPLIT_REMOVED, true);
        return push_spans(pc, sp, out);
    case PT_DIGITS:
        return split_chars(tok_is_numeric,
                           p->individual_digits ? TOK_SPLIT_ISOLATED : TOK_SPLIT_CONTIGUOUS,
                           arena, pc, sp, out);
    case PT_WHITESPACE_SPLIT:
        return split_chars(is_ws, TOK_SPLIT_REMOVED, arena, pc, sp, out);
    case PT_PUNCTUATION:
        return split_chars(tok_is_punctuation, p->behavior, arena, pc, sp, out);
    case PT_BERT: {
        tok_pieces tmp = {0};
        rc = split_chars(is_ws, TOK_SPLIT_REMOVED, arena, pc, sp, &tmp);
        for (size_t i = 0; !rc && i < tmp.n; i++)
            rc = split_chars(tok_is_punctuation, TOK_SPLIT_ISOLATED, arena, &tmp.v[i], sp, out);
        tok_pieces_free(&tmp);
        return rc;
    }
    case PT_BYTELEVEL: {
        /* optional " " prefix, optional GPT-2 split, then bytes -> chars */
        tok_piece base = *pc;
        if (p->add_prefix_space && arena->data[pc->off] != ' ') {
            if ((rc = tok_buf_reserve(arena, pc->len + 1)))
                return rc;
            size_t off = arena->len;
            tok_buf_putc(arena, ' ');
            tok_buf_put(arena, arena->data + pc->off, pc->len);
            base.off = off;
            base.len = pc->len + 1;
        }
        tok_pieces words = {0};
        if (p->has_re) {
            rc = tok_regex_find(&p->re, arena->data + base.off, base.len, sp);
            if (!rc) {
                tok_spans_apply(sp, TOK_SPLIT_ISOLATED, false);
                rc = push_spans(&base, sp, &words);
            }
        } else {
            rc = tok_pieces_push(&words, base.off, base.len, -1, base.at_start);
        }
        for (size_t i = 0; !rc && i < words.n; i++) {
            tok_piece w = words.v[i];
            if ((rc = tok_buf_reserve(arena, 2 * w.len)))
                break;
            size_t off = arena->len;
            char *dst = arena->data + off;
            const unsigned char *src = (const unsigned char *)arena->data + w.off;
            size_t k = 0;
            for (size_t b = 0; b < w.len; b++) {
                uint16_t cp = tok_byte_to_cp[src[b]];
                if (cp < 0x80) {
                    dst[k++] = (char)cp;
                } else {
                    dst[k++] = (char)(0xC0 | (cp >> 6));
                    dst[k++] = (char)(0x80 | (cp & 0x3F));
                }
            }
            arena->len += k;
            arena->data[arena->len] = 0;
            rc = tok_pieces_push(out, off, k, -1, w.at_start);
        }
        tok_pieces_free(&words);
        return rc;
    }
    case PT_METASPACE: {
        /* ' ' -> replacement, then the prepend rule, then optional split */
        if ((rc = tok_buf_reserve(arena, pc->len * 4 + 4)))
            return rc;
        const char *src = arena->data + pc->off;
        size_t off = arena->len;
        bool starts = pc->len && (src[0] == ' ' || (pc->len >= (size_t)p->repl_len &&
                                                    !memcmp(src, p->repl, (size_t)p->repl_len)));
        if (!starts && (p->prepend == PREPEND_ALWAYS ||
                        (p->prepend == PREPEND_FIRST && pc->at_start)))
            tok_buf_put(arena, p->repl, (size_t)p->repl_len);
        for (size_t b = 0; b < pc->len; b++) {
            if (src[b] == ' ')
                tok_buf_put(arena, p->repl, (size_t)p->repl_len);
            else
                tok_buf_putc(arena, src[b]);
        }
        tok_piece np = {off, arena->len - off, -1, pc->at_start};
        if (!p->split)
            return tok_pieces_push(out, np.off, np.len, -1, np.at_start);
        /* char pattern == replacement, MergedWithNext */
        const char *s = arena->data + np.off;
        sp->n = 0;
        size_t last = 0;
        for (size_t i = 0; i < np.len;) {
            int k;
            int32_t cp = tok_utf8_decode(s + i, np.len - i, &k);
            if (cp == p->repl_cp) {
                if (last < i && (rc = tok_spans_push(sp, last, i, false)))
                    return rc;
                if ((rc = tok_spans_push(sp, i, i + (size_t)k, true)))
                    return rc;
                last = i + (size_t)k;
            }
            i += (size_t)k;
        }
        if (np.len > last && (rc = tok_spans_push(sp, last, np.len, false)))
            return rc;
        tok_spans_apply(sp, TOK_SPLIT_MERGED_NEXT, false);
        return push_spans(&np, sp, out);
    }
    case PT_SEQUENCE:
        break;
    }
    return 0;
}

static int step_all(const tok_pretok *p, tok_buf *arena, const tok_pieces *in, tok_pieces *out,
                    tok_spans *sp)
{
    if (p->kind == PT_SEQUENCE) {
        tok_pieces a = {0}, b = {0};
        const tok_pieces *cur = in;
        int rc = 0;
        for (size_t i = 0; i < p->n_subs && !rc; i++) {
            tok_pieces *dst = i + 1 == p->n_subs ? out : (i % 2 ? &b : &a);
            if (dst != out)
                dst->n = 0;
            rc = step_all(p->subs[i], arena, cur, dst, sp);
            cur = dst;
        }
        if (!rc && p->n_subs == 0)
            for (size_t i = 0; !rc && i < in->n; i++)
                rc = tok_pieces_push(out, in->v[i].off, in->v[i].len, in->v[i].id,
                                     in->v[i].at_start);
        tok_pieces_free(&a);
        tok_pieces_free(&b);
        return rc;
    }
    for (size_t i = 0; i < in->n; i++) {
        const tok_piece *pc = &in->v[i];
        int rc;
        if (pc->id >= 0 || !pc->len)
            rc = pc->len || pc->id >= 0
                     ? tok_pieces_push(out, pc->off, pc->len, pc->id, pc->at_start)
                     : 0;
        else
            rc = step_piece(p, arena, pc, sp, out);
        if (rc)
            return rc;
    }
    return 0;
}

int tok_pretok_run(const tok_pretok *p, tok_buf *arena, const tok_pieces *in, tok_pieces *out)
{
    tok_spans sp = {0};
    int rc = step_all(p, arena, in, out, &sp);
    tok_spans_free(&sp);
    return rc;
}
