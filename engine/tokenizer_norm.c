/*
 * tokenizer_norm.c: normalizers of tokenizer.json ("normalizer" field).
 *
 * Supported: NFC, NFD, NFKC, NFKD (utf8proc), Lowercase, Strip, StripAccents,
 * Prepend, Replace (string or regex), Sequence. Each maps one string to
 * another; offsets are not tracked (lightmoe needs ids, not offsets). Any
 * other type (BertNormalizer, Precompiled, ...) is refused at load with its
 * name. A parsed normalizer is immutable and may be shared across threads.
 */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "engine/tokenizer_internal.h"

typedef enum {
    NORM_NFC,
    NORM_NFD,
    NORM_NFKC,
    NORM_NFKD,
    NORM_LOWERCASE,
    NORM_STRIP,
    NORM_STRIP_ACCENTS,
    NORM_PREPEND,
    NORM_REPLACE,
    NORM_SEQUENCE,
} norm_kind;

struct tok_normalizer {
    norm_kind kind;
    bool left, right;          /* Strip */
    char *text;                /* Prepend: prepend; Replace: content */
    size_t text_len;
    tok_regex pattern;         /* Replace */
    tok_normalizer **subs;     /* Sequence */
    size_t n_subs;
};

void tok_normalizer_free(tok_normalizer *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->n_subs; i++)
        tok_normalizer_free(n->subs[i]);
    free(n->subs);
    free(n->text);
    tok_regex_free(&n->pattern);
    free(n);
}

static int dup_str(const char *s, char **ret, size_t *ret_len)
{
    size_t n = strlen(s);
    *ret = malloc(n + 1);
    if (!*ret)
        return -ENOMEM;
    memcpy(*ret, s, n + 1);
    *ret_len = n;
    return 0;
}

int tok_normalizer_parse(json_t *j, tok_normalizer **ret, lm_err *err)
{
    *ret = NULL;
    if (!j || json_is_null(j))
        return 0;
    const char *type;
    int rc = tok_json_type(j, &type, "normalizer", err);
    if (rc)
        return rc;
    tok_normalizer *n = calloc(1, sizeof(*n));
    if (!n)
        return -ENOMEM;
    static const struct {
        const char *name;
        norm_kind kind;
    } simple[] = {{"NFC", NORM_NFC},           {"NFD", NORM_NFD},
                  {"NFKC", NORM_NFKC},         {"NFKD", NORM_NFKD},
                  {"Lowercase", NORM_LOWERCASE}, {"StripAccents", NORM_STRIP_ACCENTS}};
    for (size_t i = 0; i < sizeof(simple) / sizeof(simple[0]); i++)
        if (!strcmp(type, simple[i].name)) {
            n->kind = simple[i].kind;
            *ret = n;
            return 0;
        }
    if (!strcmp(type, "Strip")) {
        n->kind = NORM_STRIP;
        n->left = n->right = true;
        if ((rc = tok_json_bool(j, "strip_left", &n->left, "normalizer Strip", err)) ||
            (rc = tok_json_bool(j, "strip_right", &n->right, "normalizer Strip", err)))
            goto fail;
    } else if (!strcmp(type, "Prepend")) {
        n->kind = NORM_PREPEND;
        const char *p = NULL;
        if ((rc = tok_json_str(j, "prepend", &p, "normalizer Prepend", err)))
            goto fail;
        if (!p) {
            rc = lm_err_set(err, -EINVAL, "normalizer Prepend: missing \"prepend\" string");
            goto fail;
        }
        if ((rc = dup_str(p, &n->text, &n->text_len)))
            goto fail;
    } else if (!strcmp(type, "Replace")) {
        n->kind = NORM_REPLACE;
        const char *c = NULL;
        if ((rc = tok_json_str(j, "content", &c, "normalizer Replace", err)))
            goto fail;
        if (!c) {
            rc = lm_err_set(err, -EINVAL, "normalizer Replace: missing \"content\" string");
            goto fail;
        }
        if ((rc = dup_str(c, &n->text, &n->text_len)) ||
            (rc = tok_regex_parse(&n->pattern, json_object_get(j, "pattern"),
                                  "normalizer Replace", err)))
            goto fail;
    } else if (!strcmp(type, "Sequence")) {
        n->kind = NORM_SEQUENCE;
        json_t *arr = json_object_get(j, "normalizers");
        if (!json_is_array(arr)) {
            rc = lm_err_set(err, -EINVAL, "normalizer Sequence: \"normalizers\" must be a list");
            goto fail;
        }
        n->subs = calloc(json_array_size(arr) + 1, sizeof(*n->subs));
        if (!n->subs) {
            rc = -ENOMEM;
            goto fail;
        }
        for (size_t i = 0; i < json_array_size(arr); i++) {
            if ((rc = tok_normalizer_parse(json_array_get(arr, i), &n->subs[n->n_subs], err)))
                goto fail;
            if (n->subs[n->n_subs])
                n->n_subs++;
        }
    } else {
        rc = lm_err_set(err, -EINVAL, "normalizer type '%s' is not supported", type);
        goto fail;
    }
    *ret = n;
    return 0;
fail:
    tok_normalizer_free(n);
    return rc;
}

static bool all_ascii(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] >= 0x80)
            return false;
    return true;
}

static int run_unicode(norm_kind k, const char *s, size_t len, tok_buf *out)
{
    /* ASCII is invariant under every normalization form. */
    if (all_ascii(s, len))
        return tok_buf_put(out, s, len);
    utf8proc_option_t opt = UTF8PROC_STABLE;
    switch (k) {
    case NORM_NFC: opt |= UTF8PROC_COMPOSE; break;
    case NORM_NFD: opt |= UTF8PROC_DECOMPOSE; break;
    case NORM_NFKC: opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
    case NORM_NFKD: opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
    default: break;
    }
    utf8proc_uint8_t *res = NULL;
    utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)len, &res, opt);
    if (n < 0)
        return n == UTF8PROC_ERROR_NOMEM ? -ENOMEM : -EINVAL;
    int rc = tok_buf_put(out, res, (size_t)n);
    free(res);
    return rc;
}

int tok_normalizer_run(const tok_normalizer *n, const char *s, size_t len, tok_buf *out,
                       tok_spans *scratch)
{
    int rc = 0;
    switch (n->kind) {
    case NORM_NFC:
    case NORM_NFD:
    case NORM_NFKC:
    case NORM_NFKD:
        return run_unicode(n->kind, s, len, out);
    case NORM_LOWERCASE:
        /* char::to_lowercase per character: simple mappings, except U+0130
         * whose full lowercase is two characters. */
        for (size_t i = 0; i < len;) {
            int k;
            int32_t cp = tok_utf8_decode(s + i, len - i, &k);
            char enc[4];
            if (cp == 0x130) {
                rc = tok_buf_put(out, "i\xCC\x87", 3);
            } else {
                int32_t lc = cp < 0x80 ? (cp >= 'A' && cp <= 'Z' ? cp + 32 : cp)
                                       : utf8proc_tolower(cp);
                rc = tok_buf_put(out, enc, (size_t)tok_utf8_encode((uint32_t)lc, enc));
            }
            if (rc)
                return rc;
            i += (size_t)k;
        }
        return 0;
    case NORM_STRIP: {
        size_t a = 0, b = len;
        while (n->left && a < b) {
            int k;
            if (!tok_is_whitespace(tok_utf8_decode(s + a, b - a, &k)))
                break;
            a += (size_t)k;
        }
        while (n->right && b > a) {
            size_t p = b - 1;
            while (p > a && ((unsigned char)s[p] & 0xC0) == 0x80)
                p--;
            int k;
            if (!tok_is_whitespace(tok_utf8_decode(s + p, b - p, &k)))
                break;
            b = p;
        }
        return tok_buf_put(out, s + a, b - a);
    }
    case NORM_STRIP_ACCENTS:
        for (size_t i = 0; i < len;) {
            int k;
            int32_t cp = tok_utf8_decode(s + i, len - i, &k);
            if (cp < 0x80 || utf8proc_category(cp) != UTF8PROC_CATEGORY_MN)
                if ((rc = tok_buf_put(out, s + i, (size_t)k)))
                    return rc;
            i += (size_t)k;
        }
        return 0;
    case NORM_PREPEND:
        if (len && (rc = tok_buf_put(out, n->text, n->text_len)))
            return rc;
        return tok_buf_put(out, s, len);
    case NORM_REPLACE:
        return tok_regex_replace(&n->pattern, s, len, n->text, n->text_len, out, scratch);
    case NORM_SEQUENCE: {
        /* ping-pong between two temporaries, the last step writes to out */
        tok_buf a = {0}, b = {0};
        const char *cur = s;
        size_t cur_len = len;
        for (size_t i = 0; i < n->n_subs && !rc; i++) {
            tok_buf *dst = i + 1 == n->n_subs ? out : (i % 2 ? &b : &a);
            size_t base = dst->len;
            if (dst != out)
                dst->len = 0, base = 0;
            rc = tok_normalizer_run(n->subs[i], cur, cur_len, dst, scratch);
            cur = dst->data + base;
            cur_len = dst->len - base;
            if (dst == out)
                break;
        }
        if (!rc && n->n_subs == 0)
            rc = tok_buf_put(out, s, len);
        tok_buf_free(&a);
        tok_buf_free(&b);
        return rc;
    }
    }
    return 0;
}
