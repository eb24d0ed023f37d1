/*
 * tokenizer_util.c: the plumbing under the tokenizer: byte buffers, piece
 * lists, a string->id hash map, UTF-8 coding (including the lossy repair
 * Rust's from_utf8_lossy does), Unicode character classes through utf8proc,
 * the GPT-2 byte<->unicode table, and pattern matching (PCRE2 with UTF and
 * UCP, or literal strings) with the split behaviours of the Rust library's
 * NormalizedString::split. No state outside the objects passed in.
 */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "engine/tokenizer_internal.h"

/* ---- buffers ----------------------------------------------------------- */

int tok_buf_reserve(tok_buf *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d)
        return -ENOMEM;
    b->data = d;
    b->cap = cap;
    return 0;
}

int tok_buf_put(tok_buf *b, const void *p, size_t n)
{
    if (tok_buf_reserve(b, n))
        return -ENOMEM;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
    return 0;
}

int tok_buf_putc(tok_buf *b, char c)
{
    return tok_buf_put(b, &c, 1);
}

void tok_buf_free(tok_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}

int tok_pieces_push(tok_pieces *p, size_t off, size_t len, int32_t id, bool at_start)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 64;
        tok_piece *v = realloc(p->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        p->v = v;
        p->cap = cap;
    }
    p->v[p->n++] = (tok_piece){off, len, id, at_start};
    return 0;
}

void tok_pieces_free(tok_pieces *p)
{
    free(p->v);
    memset(p, 0, sizeof(*p));
}

int tok_ids_push(tok_ids *ids, int32_t id)
{
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 64;
        int32_t *v = realloc(ids->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return 0;
}

int tok_spans_push(tok_spans *s, size_t start, size_t end, bool match)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        tok_span *v = realloc(s->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = (tok_span){start, end, match};
    return 0;
}

void tok_spans_free(tok_spans *s)
{
    free(s->v);
    memset(s, 0, sizeof(*s));
}

/* ---- string map -------------------------------------------------------- */

uint64_t tok_hash_bytes(const void *p, size_t n)
{
    /* FNV-1a then a final avalanche: keys are short, this is cheap enough. */
    const unsigned char *s = p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 1099511628211ull;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static size_t strmap_find(const tok_strmap *m, const char *key, size_t len, uint64_t h)
{
    size_t mask = m->cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        uint32_t e = m->slots[i];
        if (!e)
            return i;
        e--;
        if (m->key_len[e] == len && !memcmp(m->pool.data + m->key_off[e], key, len))
            return i;
    }
}

static int strmap_grow(tok_strmap *m)
{
    size_t cap = m->cap ? m->cap * 2 : 1024;
    uint32_t *slots = calloc(cap, sizeof(*slots));
    if (!slots)
        return -ENOMEM;
    uint32_t *old = m->slots;
    size_t old_cap = m->cap;
    m->slots = slots;
    m->cap = cap;
    for (size_t i = 0; i < old_cap; i++) {
        if (!old[i])
            continue;
        uint32_t e = old[i] - 1;
        const char *k = m->pool.data + m->key_off[e];
        size_t j = strmap_find(m, k, m->key_len[e], tok_hash_bytes(k, m->key_len[e]));
        slots[j] = old[i];
    }
    free(old);
    return 0;
}

int tok_strmap_set(tok_strmap *m, const char *key, size_t len, int32_t val)
{
    if ((m->n + 1) * 2 > m->cap && strmap_grow(m))
        return -ENOMEM;
    size_t i = strmap_find(m, key, len, tok_hash_bytes(key, len));
    if (m->slots[i]) {
        m->val[m->slots[i] - 1] = val;
        return 0;
    }
    if (m->n == m->n_cap) {
        size_t nc = m->n_cap ? m->n_cap * 2 : 1024;
        size_t *ko = realloc(m->key_off, nc * sizeof(*ko));
        if (!ko)
            return -ENOMEM;
        m->key_off = ko;
        uint32_t *kl = realloc(m->key_len, nc * sizeof(*kl));
        if (!kl)
            return -ENOMEM;
        m->key_len = kl;
        int32_t *v = realloc(m->val, nc * sizeof(*v));
        if (!v)
            return -ENOMEM;
        m->val = v;
        m->n_cap = nc;
    }
    m->key_off[m->n] = m->pool.len;
    m->key_len[m->n] = (uint32_t)len;
    m->val[m->n] = val;
    if (tok_buf_put(&m->pool, key, len) || tok_buf_putc(&m->pool, 0))
        return -ENOMEM;
    m->slots[i] = (uint32_t)++m->n;
    return 0;
}

int32_t tok_strmap_get(const tok_strmap *m, const char *key, size_t len)
{
    if (!m->cap)
        return -1;
    size_t i = strmap_find(m, key, len, tok_hash_bytes(key, len));
    return m->slots[i] ? m->val[m->slots[i] - 1] : -1;
}

void tok_strmap_free(tok_strmap *m)
{
    free(m->slots);
    free(m->key_off);
    free(m->key_len);
    free(m->val);
    tok_buf_free(&m->pool);
    memset(m, 0, sizeof(*m));
}

/* ---- UTF-8 ------------------------------------------------------------- */

int32_t tok_utf8_decode(const char *s, size_t len, int *n)
{
    const unsigned char *u = (const unsigned char *)s;
    if (u[0] < 0x80 || len < 2) {
        *n = 1;
        return u[0];
    }
    if (u[0] < 0xE0) {
        *n = 2;
        return ((u[0] & 0x1F) << 6) | (u[1] & 0x3F);
    }
    if (u[0] < 0xF0 || len < 4) {
        *n = 3;
        return ((u[0] & 0x0F) << 12) | ((u[1] & 0x3F) << 6) | (u[2] & 0x3F);
    }
    *n = 4;
    return ((u[0] & 0x07) << 18) | ((u[1] & 0x3F) << 12) | ((u[2] & 0x3F) << 6) | (u[3] & 0x3F);
}

int tok_utf8_encode(uint32_t cp, char out[4])
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid sequence at s, or 0 if invalid; *sub gets the length
 * of the maximal subpart (the prefix that could still have been valid). */
static size_t utf8_valid_len(const unsigned char *s, size_t len, size_t *sub)
{
    unsigned char c = s[0];
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;
    *sub = 1;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0;
        if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0)
            lo = 0x90;
        if (c == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    for (size_t i = 1; i < need; i++) {
        if (i >= len)
            return 0;
        unsigned char d = s[i];
        if (i == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF))
            return 0;
        *sub = i + 1;
    }
    return need;
}

size_t tok_utf8_invalid_at(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, sub;
    while (i < len) {
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        size_t n = utf8_valid_len(u + i, len - i, &sub);
        if (!n)
            return i;
        i += n;
    }
    return (size_t)-1;
}

int tok_utf8_lossy(tok_buf *b, const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, run = 0, sub;
    if (tok_buf_reserve(b, len))
        return -ENOMEM;
    while (i < len) {
        size_t n = u[i] < 0x80 ? 1 : utf8_valid_len(u + i, len - i, &sub);
        if (n) {
            i += n;
            continue;
        }
        if (tok_buf_put(b, s + run, i - run) || tok_buf_put(b, "\xEF\xBF\xBD", 3))
            return -ENOMEM;
        i += sub;
        run = i;
    }
    return tok_buf_put(b, s + run, len - run);
}

bool tok_is_whitespace(int32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

bool tok_is_word_char(int32_t c)
{
    if (c < 0x80)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
               c == '_';
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return c == 0x200C || c == 0x200D;   /* Join_Control */
    }
}

bool tok_is_numeric(int32_t c)
{
    if (c < 0x80)
        return c >= '0' && c <= '9';
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

bool tok_is_punctuation(int32_t c)
{
    if (c < 0x80)
        return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
               (c >= 0x7B && c <= 0x7E);
    utf8proc_category_t k = utf8proc_category(c);
    return k >= UTF8PROC_CATEGORY_PC && k <= UTF8PROC_CATEGORY_PO;
}

/* bytes_to_unicode(): printable Latin-1 bytes stand for themselves, the
 * other 68 bytes take the code points 256.. in byte order. */
const uint16_t tok_byte_to_cp[256] = {
#define R4(b) M(b), M(b + 1), M(b + 2), M(b + 3)
#define R16(b) R4(b), R4(b + 4), R4(b + 8), R4(b + 12)
#define KEEP(b) (((b) >= 33 && (b) <= 126) || ((b) >= 161 && (b) <= 172) || ((b) >= 174))
/* rank of b among the remapped bytes = b minus kept bytes below b */
#define BELOW(b) ((b) <= 33 ? 0 : (b) <= 127 ? (b) - 33 : (b) <= 161 ? 94 : (b) <= 173 ? 94 + (b) - 161 : 106 + (b) - 174)
#define M(b) (KEEP(b) ? (b) : 256 + (b) - BELOW(b))
    R16(0), R16(16), R16(32), R16(48), R16(64), R16(80), R16(96), R16(112),
    R16(128), R16(144), R16(160), R16(176), R16(192), R16(208), R16(224), R16(240),
#undef M
#undef BELOW
#undef KEEP
#undef R16
#undef R4
};

int tok_cp_to_byte(int32_t cp)
{
    static int16_t rev[324];
    static int ready;   /* filled once; benign race: every writer stores the same values */
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {
        for (int i = 0; i < 324; i++)
            rev[i] = -1;
        for (int b = 0; b < 256; b++)
            rev[tok_byte_to_cp[b]] = (int16_t)b;
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    }
    return cp >= 0 && cp < 324 ? rev[cp] : -1;
}

/* ---- patterns ------------------------------------------------------------ */

/*
 * The Rust library's regexes are Oniguruma's, whose Unicode \w is Letter,
 * Mark, Decimal_Number and Connector_Punctuation; PCRE2 (10.42) with UCP
 * takes letters, all numbers and '_'. Spell \w / \W out so both agree
 * (e.g. "e\u0301" stays one word, "\u2460" is not a word character).
 */
#define WORD_SET "\\p{L}\\p{M}\\p{Nd}\\p{Pc}"
static int rewrite_word_class(const char *p, size_t len, tok_buf *out)
{
    bool in_class = false;
    int rc = 0;
    for (size_t i = 0; i < len && !rc; i++) {
        char c = p[i];
        if (c == '\\' && i + 1 < len) {
            char e = p[++i];
            if (e == 'w')
                rc = tok_buf_put(out, in_class ? WORD_SET : "[" WORD_SET "]",
                                 in_class ? strlen(WORD_SET) : strlen(WORD_SET) + 2);
            else if (e == 'W' && !in_class)
                rc = tok_buf_put(out, "[^" WORD_SET "]", strlen(WORD_SET) + 3);
            else
                rc = tok_buf_putc(out, c) || tok_buf_putc(out, e) ? -ENOMEM : 0;
            continue;
        }
        if (c == '[' && !in_class) {
            in_class = true;
            rc = tok_buf_putc(out, c);
            /* a ']' right after '[' or '[^' is a literal member */
            if (!rc && i + 1 < len && p[i + 1] == '^')
                rc = tok_buf_putc(out, p[++i]);
            if (!rc && i + 1 < len && p[i + 1] == ']')
                rc = tok_buf_putc(out, p[++i]);
            continue;
        }
        if (c == ']' && in_class)
            in_class = false;
        rc = tok_buf_putc(out, c);
    }
    if (!rc && !out->data)
        rc = tok_buf_put(out, "", 0);
    return rc;
}

int tok_regex_parse(tok_regex *re, json_t *pattern, const char *what, lm_err *err)
{
    memset(re, 0, sizeof(*re));
    json_t *s = json_is_object(pattern) ? json_object_get(pattern, "String") : NULL;
    json_t *r = json_is_object(pattern) ? json_object_get(pattern, "Regex") : NULL;
    if (json_is_string(s)) {
        re->literal_len = json_string_length(s);
        re->literal = malloc(re->literal_len + 1);
        if (!re->literal)
            return -ENOMEM;
        memcpy(re->literal, json_string_value(s), re->literal_len + 1);
        return 0;
    }
    if (!json_is_string(r))
        return lm_err_set(err, -EINVAL, "%s: pattern must be {\"String\": s} or {\"Regex\": r}",
                          what);
    int code;
    PCRE2_SIZE at;
    tok_buf pat = {0};
    if (rewrite_word_class(json_string_value(r), json_string_length(r), &pat))
        return -ENOMEM;
    re->code = pcre2_compile((PCRE2_SPTR)pat.data, pat.len, PCRE2_UTF | PCRE2_UCP, &code, &at,
                             NULL);
    tok_buf_free(&pat);
    if (!re->code) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(code, msg, sizeof(msg));
        return lm_err_set(err, -EINVAL, "%s: regex /%s/ does not compile at offset %zu: %s", what,
                          json_string_value(r), (size_t)at, (char *)msg);
    }
    pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);   /* interpreter if JIT is unavailable */
    return 0;
}

void tok_regex_free(tok_regex *re)
{
    if (re->code)
        pcre2_code_free(re->code);
    free(re->literal);
    memset(re, 0, sizeof(*re));
}

/* Rust find_matches: non-matching gaps and matches, in order, covering s. */
int tok_regex_find(const tok_regex *re, const char *s, size_t len, tok_spans *out)
{
    out->n = 0;
    if (!len)
        return tok_spans_push(out, 0, 0, false);
    size_t prev = 0;
    if (re->literal) {
        if (!re->literal_len)
            return tok_spans_push(out, 0, len, false);
        const char *p = s, *end = s + len;
        while ((p = memmem(p, (size_t)(end - p), re->literal, re->literal_len))) {
            size_t st = (size_t)(p - s);
            if (st != prev && tok_spans_push(out, prev, st, false))
                return -ENOMEM;
            if (tok_spans_push(out, st, st + re->literal_len, true))
                return -ENOMEM;
            prev = st + re->literal_len;
            p += re->literal_len;
        }
    } else {
        pcre2_match_data *md = pcre2_match_data_create_from_pattern(re->code, NULL);
        if (!md)
            return -ENOMEM;
        size_t at = 0;
        while (at <= len) {
            int rc = pcre2_match(re->code, (PCRE2_SPTR)s, len, at, PCRE2_NO_UTF_CHECK, md, NULL);
            if (rc == PCRE2_ERROR_NOMATCH)
                break;
            if (rc < 0) {   /* a match or depth limit: refuse rather than split wrongly */
                pcre2_match_data_free(md);
                return -ERANGE;
            }
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            size_t st = ov[0], en = ov[1];
            if (st != prev && tok_spans_push(out, prev, st, false))
                goto oom;
            if (tok_spans_push(out, st, en, true))
                goto oom;
            prev = en;
            if (en > st) {
                at = en;
            } else {   /* empty match: step over one character */
                if (en >= len)
                    break;
                int n;
                tok_utf8_decode(s + en, len - en, &n);
                at = en + (size_t)n;
            }
        }
        pcre2_match_data_free(md);
    }
    if (prev != len)
        return tok_spans_push(out, prev, len, false);
    return 0;
oom:
    return -ENOMEM;
}

int tok_char_find(bool (*pred)(int32_t), const char *s, size_t len, tok_spans *out)
{
    out->n = 0;
    if (!len)
        return tok_spans_push(out, 0, 0, false);
    size_t last = 0;
    for (size_t i = 0; i < len;) {
        int n;
        int32_t cp = tok_utf8_decode(s + i, len - i, &n);
        if (pred(cp)) {
            if (last < i && tok_spans_push(out, last, i, false))
                return -ENOMEM;
            if (tok_spans_push(out, i, i + (size_t)n, true))
                return -ENOMEM;
            last = i + (size_t)n;
        }
        i += (size_t)n;
    }
    if (len > last)
        return tok_spans_push(out, last, len, false);
    return 0;
}

int tok_split_behavior_parse(json_t *v, tok_split_behavior *ret, const char *what, lm_err *err)
{
    static const struct {
        const char *name;
        tok_split_behavior b;
    } names[] = {{"Removed", TOK_SPLIT_REMOVED},
                 {"Isolated", TOK_SPLIT_ISOLATED},
                 {"MergedWithPrevious", TOK_SPLIT_MERGED_PREV},
                 {"MergedWithNext", TOK_SPLIT_MERGED_NEXT},
                 {"Contiguous", TOK_SPLIT_CONTIGUOUS}};
    if (!json_is_string(v))
        return lm_err_set(err, -EINVAL, "%s: \"behavior\" must be a string", what);
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!strcmp(json_string_value(v), names[i].name)) {
            *ret = names[i].b;
            return 0;
        }
    return lm_err_set(err, -EINVAL, "%s: unknown split behavior '%s'", what, json_string_value(v));
}

/* The fold of NormalizedString::split, spans rewritten in place. */
void tok_spans_apply(tok_spans *s, tok_split_behavior b, bool invert)
{
    if (invert)
        for (size_t i = 0; i < s->n; i++)
            s->v[i].match = !s->v[i].match;
    size_t k = 0;
    bool prev_match = false;
    switch (b) {
    case TOK_SPLIT_ISOLATED:
        k = s->n;
        break;
    case TOK_SPLIT_REMOVED:
        for (size_t i = 0; i < s->n; i++)
            if (!s->v[i].match)
                s->v[k++] = s->v[i];
        break;
    case TOK_SPLIT_CONTIGUOUS:
    case TOK_SPLIT_MERGED_PREV:
        for (size_t i = 0; i < s->n; i++) {
            tok_span sp = s->v[i];
            bool merge = b == TOK_SPLIT_CONTIGUOUS ? sp.match == prev_match
                                                   : (sp.match && !prev_match);
            if (merge && k)
                s->v[k - 1].end = sp.end;
            else
                s->v[k++] = sp;
            prev_match = sp.match;
        }
        break;
    case TOK_SPLIT_MERGED_NEXT: {
        /* fold from the right, then the kept spans are already in order
         * when written from the end of the array backwards */
        size_t w = s->n;
        for (size_t i = s->n; i-- > 0;) {
            tok_span sp = s->v[i];
            if (sp.match && !prev_match && w < s->n)
                s->v[w].start = sp.start;
            else
                s->v[--w] = sp;
            prev_match = sp.match;
        }
        memmove(s->v, s->v + w, (s->n - w) * sizeof(*s->v));
        k = s->n - w;
        break;
    }
    }
    size_t out = 0;
    for (size_t i = 0; i < k; i++)
        if (s->v[i].end > s->v[i].start)
            s->v[out++] = s->v[i];
    s->n = out;
}

int tok_regex_replace(const tok_regex *re, const char *s, size_t len, const char *content,
                      size_t content_len, tok_buf *out, tok_spans *scratch)
{
    int rc = tok_regex_find(re, s, len, scratch);
    if (rc)
        return rc;
    for (size_t i = 0; i < scratch->n; i++) {
        tok_span sp = scratch->v[i];
        rc = sp.match ? tok_buf_put(out, content, content_len)
                      : tok_buf_put(out, s + sp.start, sp.end - sp.start);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- JSON -------------------------------------------------------------- */

int tok_json_bool(json_t *obj, const char *key, bool *ret, const char *what, lm_err *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return lm_err_set(err, -EINVAL, "%s: \"%s\" must be true or false", what, key);
    *ret = json_is_true(v);
    return 0;
}

int tok_json_str(json_t *obj, const char *key, const char **ret, const char *what, lm_err *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return lm_err_set(err, -EINVAL, "%s: \"%s\" must be a string", what, key);
    *ret = json_string_value(v);
    return 0;
}

int tok_json_int(json_t *obj, const char *key, long long *ret, const char *what, lm_err *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return lm_err_set(err, -EINVAL, "%s: \"%s\" must be an integer", what, key);
    *ret = json_integer_value(v);
    return 0;
}

int tok_json_type(json_t *obj, const char **ret, const char *what, lm_err *err)
{
    json_t *t = json_is_object(obj) ? json_object_get(obj, "type") : NULL;
    if (!json_is_string(t))
        return lm_err_set(err, -EINVAL, "%s: component without a \"type\" string", what);
    *ret = json_string_value(t);
    return 0;
}
