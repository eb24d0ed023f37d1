/*
 * jinja_parse.c: lexer and parser of the Jinja interpreter (jinja.h).
 *
 * The lexer follows jinja2's (3.x) with transformers' settings:
 *   - newlines normalised to "\n" and one trailing newline dropped
 *     (keep_trailing_newline False);
 *   - `{%-`/`{{-`/`{#-` strip all whitespace before the tag, `-%}`/`-}}`/
 *     `-#}` all whitespace after it;
 *   - trim_blocks: the first newline after a block or comment tag is
 *     dropped (not after `}}`, not after `+%}`);
 *   - lstrip_blocks: spaces and tabs between the start of a line and a
 *     block or comment tag are dropped (not before `{{`, not for `{%+`);
 *   - inside a tag, an end marker only counts outside brackets, so dict
 *     literals may contain "}}".
 * The parser is recursive descent with jinja2's precedence (low to high):
 * conditional `x if c else y`, or, and, not, comparisons (in, not in,
 * ==, ...), + -, ~, * / // %, **, unary -, then primary with postfix
 * (.attr, [item], [a:b:c], call) and filters/tests (| f, is t) which bind
 * tighter than any binary operator (`a + b|trim` trims b only).
 *
 * Errors unwind by longjmp to jinja_parse, which reports "line:col: what";
 * the AST lives in the template's arena.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/jinja_int.h"

/* ---- arena ---------------------------------------------------------------- */

struct jchunk {
    jchunk *next;
    size_t cap, used;
    _Alignas(16) unsigned char data[];
};

void *jarena_alloc(jarena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (a->limit && a->used + n > a->limit) return NULL;
    jchunk *h = a->head;
    if (!h || h->cap - h->used < n) {
        size_t cap = n > 60000 ? n : 65536 - sizeof(jchunk);
        jchunk *nc = malloc(sizeof(jchunk) + cap);
        if (!nc) return NULL;
        nc->cap = cap;
        nc->used = 0;
        /* a big one-off block goes behind the current chunk so that the
         * current chunk's free space stays usable */
        if (h && n > 60000) {
            nc->next = h->next;
            h->next = nc;
        } else {
            nc->next = h;
            a->head = nc;
        }
        h = nc;
    }
    void *p = h->data + h->used;
    h->used += n;
    a->used += n;
    return p;
}

void jarena_free(jarena *a)
{
    jchunk *h = a->head;
    while (h) {
        jchunk *nx = h->next;
        free(h);
        h = nx;
    }
    a->head = NULL;
    a->used = 0;
}

/* ---- tokens --------------------------------------------------------------- */

typedef enum ttype {
    T_EOF = 0,
    T_TEXT,
    T_VBEGIN,
    T_VEND,
    T_BBEGIN,
    T_BEND,
    T_NAME,
    T_STR,
    T_INT,
    T_FLOAT,
    T_OP,
} ttype;

typedef struct tok {
    ttype t;
    int line, col;
    const char *p; /* text, name, op or decoded string */
    size_t n;
    int64_t i;
    double f;
} tok;

typedef struct pstate {
    jarena *arena;
    jmp_buf fail;
    lm_err *err;
    const char *name;
    const char *src; /* normalised source */
    size_t len;
    /* incremental line/column tracking for the lexer */
    size_t lc_off;
    int lc_line, lc_col;
    tok *toks;
    int32_t n_toks, cap_toks;
    int32_t pos; /* parser position */
    int depth;   /* expression nesting */
} pstate;

_Noreturn static void pfail(pstate *ps, int line, int col, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

_Noreturn static void pfail(pstate *ps, int line, int col, const char *fmt, ...)
{
    char msg[LM_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lm_err_set(ps->err, -EINVAL, "%s:%d:%d: %s", ps->name, line, col, msg);
    longjmp(ps->fail, 1);
}

static void *palloc(pstate *ps, size_t n)
{
    void *p = jarena_alloc(ps->arena, n);
    if (!p) {
        lm_err_set(ps->err, -ENOMEM, "%s: out of memory compiling the template", ps->name);
        longjmp(ps->fail, 1);
    }
    memset(p, 0, n);
    return p;
}

static void where(pstate *ps, size_t off, int *line, int *col)
{
    if (off < ps->lc_off) {
        ps->lc_off = 0;
        ps->lc_line = 1;
        ps->lc_col = 1;
    }
    for (; ps->lc_off < off && ps->lc_off < ps->len; ps->lc_off++) {
        if (ps->src[ps->lc_off] == '\n') {
            ps->lc_line++;
            ps->lc_col = 1;
        } else if (((unsigned char)ps->src[ps->lc_off] & 0xC0) != 0x80) {
            ps->lc_col++;
        }
    }
    *line = ps->lc_line;
    *col = ps->lc_col;
}

static tok *push_tok(pstate *ps, ttype t, size_t off)
{
    if (ps->n_toks == ps->cap_toks) {
        int32_t cap = ps->cap_toks ? ps->cap_toks * 2 : 256;
        tok *nt = palloc(ps, sizeof(tok) * (size_t)cap);
        if (ps->n_toks) memcpy(nt, ps->toks, sizeof(tok) * (size_t)ps->n_toks);
        ps->toks = nt;
        ps->cap_toks = cap;
    }
    tok *k = &ps->toks[ps->n_toks++];
    memset(k, 0, sizeof *k);
    k->t = t;
    where(ps, off, &k->line, &k->col);
    return k;
}

static int is_ws(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v';
}
static int is_name_start(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_';
}
static int is_digit(char ch)
{
    return ch >= '0' && ch <= '9';
}
static int is_name_char(char ch)
{
    return is_name_start(ch) || is_digit(ch);
}

static void put_utf8(char *out, size_t *n, uint32_t cp)
{
    if (cp < 0x80) {
        out[(*n)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*n)++] = (char)(0xC0 | (cp >> 6));
        out[(*n)++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out[(*n)++] = (char)(0xE0 | (cp >> 12));
        out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*n)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        out[(*n)++] = (char)(0xF0 | (cp >> 18));
        out[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*n)++] = (char)(0x80 | (cp & 0x3F));
    }
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Lex a string literal starting at src[i] (the quote). Python escapes as
 * jinja2 decodes them (unicode-escape); unknown escapes stay as written. */
static size_t lex_string(pstate *ps, size_t i)
{
    char q = ps->src[i];
    size_t start = i;
    size_t j = i + 1;
    while (j < ps->len && ps->src[j] != q) {
        if (ps->src[j] == '\\' && j + 1 < ps->len) j++;
        j++;
    }
    tok *k = push_tok(ps, T_STR, start);
    if (j >= ps->len) pfail(ps, k->line, k->col, "unterminated string literal");
    char *out = palloc(ps, j - start + 1);
    size_t n = 0;
    for (size_t x = start + 1; x < j; x++) {
        char ch = ps->src[x];
        if (ch != '\\') {
            out[n++] = ch;
            continue;
        }
        char e = ps->src[++x];
        int digits = 0;
        switch (e) {
        case 'n':
            out[n++] = '\n';
            break;
        case 't':
            out[n++] = '\t';
            break;
        case 'r':
            out[n++] = '\r';
            break;
        case '\\':
            out[n++] = '\\';
            break;
        case '\'':
            out[n++] = '\'';
            break;
        case '"':
            out[n++] = '"';
            break;
        case 'a':
            out[n++] = '\a';
            break;
        case 'b':
            out[n++] = '\b';
            break;
        case 'f':
            out[n++] = '\f';
            break;
        case 'v':
            out[n++] = '\v';
            break;
        case '\n':
            break; /* line continuation */
        case 'x':
            digits = 2;
            break;
        case 'u':
            digits = 4;
            break;
        case 'U':
            digits = 8;
            break;
        default:
            if (e >= '0' && e <= '7') {
                uint32_t v = 0;
                int c = 0;
                while (c < 3 && x < j && ps->src[x] >= '0' && ps->src[x] <= '7') {
                    v = v * 8 + (uint32_t)(ps->src[x] - '0');
                    x++;
                    c++;
                }
                x--;
                put_utf8(out, &n, v);
            } else {
                out[n++] = '\\';
                out[n++] = e;
            }
        }
        if (digits) {
            uint32_t v = 0;
            for (int d = 0; d < digits; d++) {
                int h = x + 1 + (size_t)d < j ? hexval(ps->src[x + 1 + (size_t)d]) : -1;
                if (h < 0) pfail(ps, k->line, k->col, "bad \\%c escape in string literal", e);
                v = v * 16 + (uint32_t)h;
            }
            if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
                pfail(ps, k->line, k->col, "escape \\%c%X is not a valid character", e, v);
            x += (size_t)digits;
            put_utf8(out, &n, v);
        }
    }
    k->p = out;
    k->n = n;
    return j + 1;
}

/* Lex the inside of a tag from src[i] until its end marker; returns the
 * offset after the marker (and whatever whitespace control consumed). */
static size_t lex_tag(pstate *ps, size_t i, int is_block, int begin_line, int begin_col)
{
    int depth = 0;
    char stack[256]; /* expected closers of open brackets */
    const char end1 = is_block ? '%' : '}';
    for (;;) {
        while (i < ps->len && is_ws(ps->src[i]))
            i++;
        if (i >= ps->len)
            pfail(ps, begin_line, begin_col, "tag opened here is never closed (missing '%s')",
                  is_block ? "%}" : "}}");
        const char *s = ps->src + i;
        size_t rest = ps->len - i;
        if (depth == 0) {
            int sign = 0;
            size_t m = 0;
            if (rest >= 3 && (s[0] == '-' || s[0] == '+') && s[1] == end1 && s[2] == '}') {
                sign = s[0];
                m = 3;
            } else if (rest >= 2 && s[0] == end1 && s[1] == '}') {
                m = 2;
            }
            if (m) {
                push_tok(ps, is_block ? T_BEND : T_VEND, i);
                i += m;
                if (sign == '-') {
                    while (i < ps->len && is_ws(ps->src[i]))
                        i++;
                } else if (is_block && sign != '+' && i < ps->len && ps->src[i] == '\n') {
                    i++; /* trim_blocks */
                }
                return i;
            }
        }
        char ch = s[0];
        if (ch == '\'' || ch == '"') {
            i = lex_string(ps, i);
            continue;
        }
        if (is_digit(ch)) {
            size_t j = i;
            int is_float = 0;
            while (j < ps->len && (is_digit(ps->src[j]) || ps->src[j] == '_'))
                j++;
            if (j + 1 < ps->len && ps->src[j] == '.' && is_digit(ps->src[j + 1])) {
                is_float = 1;
                j++;
                while (j < ps->len && (is_digit(ps->src[j]) || ps->src[j] == '_'))
                    j++;
            }
            if (j < ps->len && (ps->src[j] == 'e' || ps->src[j] == 'E')) {
                size_t e = j + 1;
                if (e < ps->len && (ps->src[e] == '+' || ps->src[e] == '-')) e++;
                if (e < ps->len && is_digit(ps->src[e])) {
                    is_float = 1;
                    j = e;
                    while (j < ps->len && is_digit(ps->src[j]))
                        j++;
                }
            }
            char buf[64];
            size_t bn = 0;
            for (size_t x = i; x < j && bn < sizeof buf - 1; x++)
                if (ps->src[x] != '_') buf[bn++] = ps->src[x];
            buf[bn] = 0;
            tok *k = push_tok(ps, is_float ? T_FLOAT : T_INT, i);
            if (is_float) {
                k->f = strtod(buf, NULL);
            } else {
                errno = 0;
                k->i = strtoll(buf, NULL, 10);
                if (errno) pfail(ps, k->line, k->col, "integer literal %s is too large", buf);
            }
            i = j;
            continue;
        }
        if (is_name_start(ch)) {
            size_t j = i;
            while (j < ps->len && is_name_char(ps->src[j]))
                j++;
            tok *k = push_tok(ps, T_NAME, i);
            k->p = ps->src + i;
            k->n = j - i;
            i = j;
            continue;
        }
        static const char *two[] = {"//", "**", "==", "!=", "<=", ">="};
        size_t m = 0;
        for (size_t x = 0; x < sizeof two / sizeof two[0]; x++)
            if (rest >= 2 && s[0] == two[x][0] && s[1] == two[x][1]) m = 2;
        if (!m && strchr("+-*/%~<>=()[]{},.:|;", ch)) m = 1;
        if (!m) {
            int line, col;
            where(ps, i, &line, &col);
            pfail(ps, line, col, "unexpected character '%c' in tag", ch);
        }
        if (m == 1 && (ch == '(' || ch == '[' || ch == '{')) {
            if (depth == (int)sizeof stack) {
                int line, col;
                where(ps, i, &line, &col);
                pfail(ps, line, col, "brackets nested too deeply");
            }
            stack[depth++] = ch == '(' ? ')' : ch == '[' ? ']' : '}';
        }
        if (m == 1 && (ch == ')' || ch == ']' || ch == '}')) {
            int line, col;
            if (depth == 0) {
                where(ps, i, &line, &col);
                pfail(ps, line, col, "unbalanced '%c'", ch);
            }
            if (stack[depth - 1] != ch) {
                where(ps, i, &line, &col);
                pfail(ps, line, col, "unexpected '%c', expected '%c'", ch, stack[depth - 1]);
            }
            depth--;
        }
        tok *k = push_tok(ps, T_OP, i);
        k->p = ps->src + i;
        k->n = m;
        i += m;
    }
}

static void emit_text(pstate *ps, size_t off, const char *p, size_t n)
{
    if (n == 0) return;
    tok *k = push_tok(ps, T_TEXT, off);
    k->p = p;
    k->n = n;
}

/* `{% raw %}` at src[k]? Returns the offset after its end marker (and the
 * raw text in ret_off, ret_n) or 0. */
static size_t lex_raw(pstate *ps, size_t k, size_t after_begin, size_t *ret_off, size_t *ret_n)
{
    size_t i = after_begin;
    while (i < ps->len && is_ws(ps->src[i]))
        i++;
    if (ps->len - i < 3 || memcmp(ps->src + i, "raw", 3) != 0 ||
        (i + 3 < ps->len && is_name_char(ps->src[i + 3])))
        return 0;
    i += 3;
    while (i < ps->len && is_ws(ps->src[i]))
        i++;
    int strip_after = 0;
    if (i < ps->len && ps->src[i] == '-') {
        strip_after = 1;
        i++;
    }
    if (ps->len - i < 2 || ps->src[i] != '%' || ps->src[i + 1] != '}') return 0;
    i += 2;
    if (strip_after)
        while (i < ps->len && is_ws(ps->src[i]))
            i++;
    /* find {% endraw %} */
    for (size_t j = i; j + 1 < ps->len; j++) {
        if (ps->src[j] != '{' || ps->src[j + 1] != '%') continue;
        size_t x = j + 2;
        int strip_before = 0;
        if (x < ps->len && (ps->src[x] == '-' || ps->src[x] == '+'))
            strip_before = ps->src[x++] == '-';
        while (x < ps->len && is_ws(ps->src[x]))
            x++;
        if (ps->len - x < 6 || memcmp(ps->src + x, "endraw", 6) != 0) continue;
        x += 6;
        while (x < ps->len && is_ws(ps->src[x]))
            x++;
        int sign = 0;
        if (x < ps->len && (ps->src[x] == '-' || ps->src[x] == '+')) sign = ps->src[x++];
        if (ps->len - x < 2 || ps->src[x] != '%' || ps->src[x + 1] != '}') continue;
        x += 2;
        size_t n = j - i;
        if (strip_before)
            while (n > 0 && is_ws(ps->src[i + n - 1]))
                n--;
        *ret_off = i;
        *ret_n = n;
        if (sign == '-')
            while (x < ps->len && is_ws(ps->src[x]))
                x++;
        else if (sign != '+' && x < ps->len && ps->src[x] == '\n')
            x++;
        return x;
    }
    int line, col;
    where(ps, k, &line, &col);
    pfail(ps, line, col, "{%% raw %%} is never closed by {%% endraw %%}");
}

static void lex(pstate *ps)
{
    size_t pos = 0;
    while (pos < ps->len) {
        size_t k = pos;
        while (k + 1 < ps->len &&
               !(ps->src[k] == '{' &&
                 (ps->src[k + 1] == '{' || ps->src[k + 1] == '%' || ps->src[k + 1] == '#')))
            k++;
        if (k + 1 >= ps->len) {
            emit_text(ps, pos, ps->src + pos, ps->len - pos);
            break;
        }
        char kind = ps->src[k + 1];
        char sign = 0;
        if (k + 2 < ps->len && (ps->src[k + 2] == '-' || ps->src[k + 2] == '+'))
            sign = ps->src[k + 2];
        size_t tlen = k - pos;
        if (sign == '-') {
            while (tlen > 0 && is_ws(ps->src[pos + tlen - 1]))
                tlen--;
        } else if (sign != '+' && kind != '{') {
            /* lstrip_blocks */
            size_t l = tlen;
            while (l > 0 && ps->src[pos + l - 1] != '\n')
                l--;
            int line_starting = pos == 0 || ps->src[pos - 1] == '\n';
            if (l > 0 || line_starting) {
                int all_ws = 1;
                for (size_t x = l; x < tlen; x++)
                    if (!is_ws(ps->src[pos + x])) all_ws = 0;
                if (all_ws) tlen = l;
            }
        }
        if (kind == '%') {
            size_t raw_off = 0, raw_n = 0;
            size_t after = lex_raw(ps, k, k + 2 + (sign ? 1 : 0), &raw_off, &raw_n);
            if (after) {
                emit_text(ps, pos, ps->src + pos, tlen);
                emit_text(ps, raw_off, ps->src + raw_off, raw_n);
                pos = after;
                continue;
            }
        }
        emit_text(ps, pos, ps->src + pos, tlen);
        if (kind == '#') {
            size_t j = k + 2;
            while (j + 1 < ps->len && !(ps->src[j] == '#' && ps->src[j + 1] == '}'))
                j++;
            if (j + 1 >= ps->len) {
                int line, col;
                where(ps, k, &line, &col);
                pfail(ps, line, col, "comment is never closed (missing '#}')");
            }
            char esign = j > k + 2 ? ps->src[j - 1] : 0;
            pos = j + 2;
            if (esign == '-') {
                while (pos < ps->len && is_ws(ps->src[pos]))
                    pos++;
            } else if (esign != '+' && pos < ps->len && ps->src[pos] == '\n') {
                pos++;
            }
            continue;
        }
        tok *b = push_tok(ps, kind == '%' ? T_BBEGIN : T_VBEGIN, k);
        pos = lex_tag(ps, k + 2 + (sign ? 1 : 0), kind == '%', b->line, b->col);
    }
    push_tok(ps, T_EOF, ps->len);
}

/* ---- parser helpers ------------------------------------------------------- */

static tok *cur(pstate *ps)
{
    return &ps->toks[ps->pos];
}
static tok *peek(pstate *ps, int ahead)
{
    int32_t p = ps->pos + ahead;
    return p < ps->n_toks ? &ps->toks[p] : &ps->toks[ps->n_toks - 1];
}
static int is_op(tok *k, const char *op)
{
    return k->t == T_OP && k->n == strlen(op) && memcmp(k->p, op, k->n) == 0;
}
static int is_name(tok *k, const char *name)
{
    return k->t == T_NAME && k->n == strlen(name) && memcmp(k->p, name, k->n) == 0;
}

static const char *tok_desc(tok *k, char *buf, size_t cap)
{
    switch (k->t) {
    case T_EOF:
        return "end of template";
    case T_TEXT:
        return "template text";
    case T_VBEGIN:
        return "'{{'";
    case T_VEND:
        return "'}}'";
    case T_BBEGIN:
        return "'{%'";
    case T_BEND:
        return "'%}'";
    case T_STR:
        return "a string";
    case T_INT:
        return "an integer";
    case T_FLOAT:
        return "a number";
    default:
        snprintf(buf, cap, "'%.*s'", (int)(k->n > 40 ? 40 : k->n), k->p);
        return buf;
    }
}

_Noreturn static void unexpected(pstate *ps, const char *expected)
{
    char buf[64];
    tok *k = cur(ps);
    pfail(ps, k->line, k->col, "expected %s, found %s", expected, tok_desc(k, buf, sizeof buf));
}

static void expect_op(pstate *ps, const char *op)
{
    if (!is_op(cur(ps), op)) {
        char what[16];
        snprintf(what, sizeof what, "'%s'", op);
        unexpected(ps, what);
    }
    ps->pos++;
}

static void expect_t(pstate *ps, ttype t, const char *what)
{
    if (cur(ps)->t != t) unexpected(ps, what);
    ps->pos++;
}

static const char *tok_name(pstate *ps, tok *k)
{
    char *s = palloc(ps, k->n + 1);
    memcpy(s, k->p, k->n);
    return s;
}

static const char *expect_name(pstate *ps, const char *what)
{
    if (cur(ps)->t != T_NAME) unexpected(ps, what);
    return tok_name(ps, &ps->toks[ps->pos++]);
}

static jnode *node(pstate *ps, jkind kind, tok *at)
{
    jnode *n = palloc(ps, sizeof *n);
    n->kind = kind;
    n->line = at->line;
    n->col = at->col;
    return n;
}

/* growable node arrays while parsing */
typedef struct nvec {
    jnode **v;
    const char **names;
    int32_t n, cap;
} nvec;

static void nvec_push(pstate *ps, nvec *a, jnode *n, const char *name)
{
    if (a->n == a->cap) {
        int32_t cap = a->cap ? a->cap * 2 : 4;
        jnode **nv = palloc(ps, sizeof(jnode *) * (size_t)cap);
        const char **nn = palloc(ps, sizeof(char *) * (size_t)cap);
        if (a->n) {
            memcpy(nv, a->v, sizeof(jnode *) * (size_t)a->n);
            memcpy(nn, a->names, sizeof(char *) * (size_t)a->n);
        }
        a->v = nv;
        a->names = nn;
        a->cap = cap;
    }
    a->v[a->n] = n;
    a->names[a->n] = name;
    a->n++;
}

/* ---- expressions ---------------------------------------------------------- */

static jnode *parse_expr(pstate *ps);
static jnode *parse_or(pstate *ps);
static jnode *parse_unary(pstate *ps, int with_filter);
static jnode *parse_primary(pstate *ps);
static jnode *parse_postfix(pstate *ps, jnode *n);

static int is_keyword_stop(tok *k)
{
    static const char *kw[] = {"else", "or", "and", "if", "in", "not", "is"};
    for (size_t i = 0; i < sizeof kw / sizeof kw[0]; i++)
        if (is_name(k, kw[i])) return 1;
    return 0;
}

/* '(' args ')' into n->args / n->kw */
static void parse_call_args(pstate *ps, jnode *n)
{
    expect_op(ps, "(");
    nvec pos = {0}, kw = {0};
    while (!is_op(cur(ps), ")")) {
        if (is_op(cur(ps), "*") || is_op(cur(ps), "**"))
            pfail(ps, cur(ps)->line, cur(ps)->col, "*args and **kwargs calls are not supported");
        if (cur(ps)->t == T_NAME && is_op(peek(ps, 1), "=")) {
            const char *name = tok_name(ps, cur(ps));
            ps->pos += 2;
            nvec_push(ps, &kw, parse_expr(ps), name);
        } else {
            if (kw.n)
                pfail(ps, cur(ps)->line, cur(ps)->col,
                      "positional argument after keyword argument");
            nvec_push(ps, &pos, parse_expr(ps), NULL);
        }
        if (!is_op(cur(ps), ",")) break;
        ps->pos++;
    }
    expect_op(ps, ")");
    n->args = pos.v;
    n->n_args = pos.n;
    n->kw = kw.v;
    n->kw_names = kw.names;
    n->n_kw = kw.n;
}

static jnode *parse_filter(pstate *ps, jnode *target)
{
    tok *at = cur(ps);
    const char *name = expect_name(ps, "a filter name");
    if (!jbuiltin_has_filter(name)) pfail(ps, at->line, at->col, "no filter named '%s'", name);
    jnode *f = node(ps, JN_FILTER, at);
    f->name = name;
    f->a = target;
    if (is_op(cur(ps), "(")) parse_call_args(ps, f);
    return f;
}

static jnode *parse_test(pstate *ps, jnode *target)
{
    tok *at = cur(ps);
    int negated = 0;
    if (is_name(cur(ps), "not")) {
        negated = 1;
        ps->pos++;
    }
    const char *name = expect_name(ps, "a test name");
    if (!jbuiltin_has_test(name)) pfail(ps, at->line, at->col, "no test named '%s'", name);
    jnode *t = node(ps, JN_TEST, at);
    t->name = name;
    t->a = target;
    t->op = negated;
    tok *k = cur(ps);
    if (is_op(k, "(")) {
        parse_call_args(ps, t);
    } else if ((k->t == T_NAME || k->t == T_STR || k->t == T_INT || k->t == T_FLOAT ||
                is_op(k, "[") || is_op(k, "{")) &&
               !is_keyword_stop(k)) {
        jnode *arg = parse_postfix(ps, parse_primary(ps));
        t->args = palloc(ps, sizeof(jnode *));
        t->args[0] = arg;
        t->n_args = 1;
    }
    return t;
}

static jnode *parse_filter_expr(pstate *ps, jnode *n)
{
    for (;;) {
        tok *k = cur(ps);
        if (is_op(k, "|")) {
            ps->pos++;
            n = parse_filter(ps, n);
        } else if (is_name(k, "is")) {
            ps->pos++;
            n = parse_test(ps, n);
        } else if (is_op(k, "(")) {
            jnode *c = node(ps, JN_CALL, k);
            c->line = n->line;
            c->col = n->col;
            c->a = n;
            parse_call_args(ps, c);
            n = c;
        } else {
            return n;
        }
    }
}

static jnode *parse_subscript(pstate *ps, jnode *obj, tok *at)
{
    /* after '[' */
    jnode *start = NULL, *stop = NULL, *step = NULL;
    if (!is_op(cur(ps), ":")) start = parse_expr(ps);
    if (is_op(cur(ps), "]")) {
        ps->pos++;
        jnode *n = node(ps, JN_ITEM, at);
        n->a = obj;
        n->b = start;
        return n;
    }
    expect_op(ps, ":");
    if (!is_op(cur(ps), ":") && !is_op(cur(ps), "]")) stop = parse_expr(ps);
    if (is_op(cur(ps), ":")) {
        ps->pos++;
        if (!is_op(cur(ps), "]")) step = parse_expr(ps);
    }
    expect_op(ps, "]");
    jnode *n = node(ps, JN_SLICE, at);
    n->a = obj;
    n->b = start;
    n->c = stop;
    n->d = step;
    return n;
}

static jnode *parse_postfix(pstate *ps, jnode *n)
{
    for (;;) {
        tok *k = cur(ps);
        if (is_op(k, ".")) {
            ps->pos++;
            tok *a = cur(ps);
            if (a->t == T_INT) {
                /* foo.0 is foo[0] */
                ps->pos++;
                jnode *it = node(ps, JN_ITEM, k);
                it->a = n;
                it->b = node(ps, JN_LIT, a);
                it->b->lit = jv_int(a->i);
                n = it;
                continue;
            }
            const char *name = expect_name(ps, "an attribute name");
            jnode *at = node(ps, JN_ATTR, k);
            at->a = n;
            at->name = name;
            n = at;
        } else if (is_op(k, "[")) {
            ps->pos++;
            n = parse_subscript(ps, n, k);
        } else if (is_op(k, "(")) {
            jnode *c = node(ps, JN_CALL, k);
            c->line = n->line;
            c->col = n->col;
            c->a = n;
            parse_call_args(ps, c);
            n = c;
        } else {
            return n;
        }
    }
}

static jnode *parse_primary(pstate *ps)
{
    tok *k = cur(ps);
    if (++ps->depth > 200) pfail(ps, k->line, k->col, "expression nested too deeply");
    jnode *n;
    if (k->t == T_NAME) {
        ps->pos++;
        n = node(ps, JN_LIT, k);
        if (is_name(k, "true") || is_name(k, "True"))
            n->lit = jv_bool(1);
        else if (is_name(k, "false") || is_name(k, "False"))
            n->lit = jv_bool(0);
        else if (is_name(k, "none") || is_name(k, "None"))
            n->lit = jv_none();
        else {
            n->kind = JN_NAME;
            n->name = tok_name(ps, k);
        }
    } else if (k->t == T_STR) {
        /* adjacent literals concatenate, as in Python */
        size_t total = 0;
        int32_t j = ps->pos;
        while (ps->toks[j].t == T_STR)
            total += ps->toks[j++].n;
        char *s = palloc(ps, total + 1);
        size_t o = 0;
        while (cur(ps)->t == T_STR) {
            memcpy(s + o, cur(ps)->p, cur(ps)->n);
            o += cur(ps)->n;
            ps->pos++;
        }
        n = node(ps, JN_LIT, k);
        n->lit = jv_str(s, total);
    } else if (k->t == T_INT) {
        ps->pos++;
        n = node(ps, JN_LIT, k);
        n->lit = jv_int(k->i);
    } else if (k->t == T_FLOAT) {
        ps->pos++;
        n = node(ps, JN_LIT, k);
        n->lit = jv_float(k->f);
    } else if (is_op(k, "(")) {
        ps->pos++;
        if (is_op(cur(ps), ")")) {
            ps->pos++;
            n = node(ps, JN_TUPLE, k);
        } else {
            jnode *first = parse_expr(ps);
            if (is_op(cur(ps), ",")) {
                nvec items = {0};
                nvec_push(ps, &items, first, NULL);
                while (is_op(cur(ps), ",")) {
                    ps->pos++;
                    if (is_op(cur(ps), ")")) break;
                    nvec_push(ps, &items, parse_expr(ps), NULL);
                }
                n = node(ps, JN_TUPLE, k);
                n->args = items.v;
                n->n_args = items.n;
            } else {
                n = first;
            }
            expect_op(ps, ")");
        }
    } else if (is_op(k, "[")) {
        ps->pos++;
        nvec items = {0};
        while (!is_op(cur(ps), "]")) {
            nvec_push(ps, &items, parse_expr(ps), NULL);
            if (!is_op(cur(ps), ",")) break;
            ps->pos++;
        }
        expect_op(ps, "]");
        n = node(ps, JN_LIST, k);
        n->args = items.v;
        n->n_args = items.n;
    } else if (is_op(k, "{")) {
        ps->pos++;
        nvec items = {0};
        while (!is_op(cur(ps), "}")) {
            nvec_push(ps, &items, parse_expr(ps), NULL);
            expect_op(ps, ":");
            nvec_push(ps, &items, parse_expr(ps), NULL);
            if (!is_op(cur(ps), ",")) break;
            ps->pos++;
        }
        expect_op(ps, "}");
        n = node(ps, JN_DICT, k);
        n->args = items.v;
        n->n_args = items.n;
    } else {
        unexpected(ps, "an expression");
    }
    ps->depth--;
    return n;
}

static jnode *parse_unary(pstate *ps, int with_filter)
{
    tok *k = cur(ps);
    jnode *n;
    if (is_op(k, "-") || is_op(k, "+")) {
        ps->pos++;
        if (++ps->depth > 200) pfail(ps, k->line, k->col, "expression nested too deeply");
        n = node(ps, JN_UNARY, k);
        n->op = k->p[0];
        n->a = parse_unary(ps, 0);
        ps->depth--;
    } else {
        n = parse_postfix(ps, parse_primary(ps));
    }
    if (with_filter) n = parse_filter_expr(ps, n);
    return n;
}

static jnode *binary(pstate *ps, tok *at, int op, jnode *l, jnode *r)
{
    jnode *n = node(ps, JN_BINARY, at);
    n->op = op;
    n->a = l;
    n->b = r;
    return n;
}

static jnode *parse_pow(pstate *ps)
{
    jnode *n = parse_unary(ps, 1);
    while (is_op(cur(ps), "**")) {
        tok *k = &ps->toks[ps->pos++];
        n = binary(ps, k, JOP_POW, n, parse_unary(ps, 1));
    }
    return n;
}

static jnode *parse_math2(pstate *ps)
{
    jnode *n = parse_pow(ps);
    for (;;) {
        tok *k = cur(ps);
        int op = is_op(k, "*")    ? JOP_MUL
                 : is_op(k, "/")  ? JOP_DIV
                 : is_op(k, "//") ? JOP_FLOORDIV
                 : is_op(k, "%")  ? JOP_MOD
                                  : 0;
        if (!op) return n;
        ps->pos++;
        n = binary(ps, k, op, n, parse_pow(ps));
    }
}

static jnode *parse_concat(pstate *ps)
{
    jnode *n = parse_math2(ps);
    while (is_op(cur(ps), "~")) {
        tok *k = &ps->toks[ps->pos++];
        n = binary(ps, k, JOP_CONCAT, n, parse_math2(ps));
    }
    return n;
}

static jnode *parse_math1(pstate *ps)
{
    jnode *n = parse_concat(ps);
    for (;;) {
        tok *k = cur(ps);
        int op = is_op(k, "+") ? JOP_ADD : is_op(k, "-") ? JOP_SUB : 0;
        if (!op) return n;
        ps->pos++;
        n = binary(ps, k, op, n, parse_concat(ps));
    }
}

static jnode *parse_compare(pstate *ps)
{
    tok *at = cur(ps);
    jnode *first = parse_math1(ps);
    nvec rhs = {0};
    int ops[64];
    for (;;) {
        tok *k = cur(ps);
        int op = 0;
        if (is_op(k, "=="))
            op = JOP_EQ;
        else if (is_op(k, "!="))
            op = JOP_NE;
        else if (is_op(k, "<"))
            op = JOP_LT;
        else if (is_op(k, "<="))
            op = JOP_LE;
        else if (is_op(k, ">"))
            op = JOP_GT;
        else if (is_op(k, ">="))
            op = JOP_GE;
        else if (is_name(k, "in"))
            op = JOP_IN;
        else if (is_name(k, "not") && is_name(peek(ps, 1), "in")) {
            op = JOP_NOTIN;
            ps->pos++;
        }
        if (!op) break;
        if (rhs.n == 64) pfail(ps, k->line, k->col, "comparison chain too long");
        ps->pos++;
        ops[rhs.n] = op;
        nvec_push(ps, &rhs, parse_math1(ps), NULL);
    }
    if (!rhs.n) return first;
    jnode *n = node(ps, JN_COMPARE, at);
    n->a = first;
    n->args = rhs.v;
    n->n_args = rhs.n;
    n->ops = palloc(ps, sizeof(int) * (size_t)rhs.n);
    memcpy(n->ops, ops, sizeof(int) * (size_t)rhs.n);
    return n;
}

static jnode *parse_not(pstate *ps)
{
    tok *k = cur(ps);
    if (is_name(k, "not")) {
        ps->pos++;
        if (++ps->depth > 200) pfail(ps, k->line, k->col, "expression nested too deeply");
        jnode *n = node(ps, JN_NOT, k);
        n->a = parse_not(ps);
        ps->depth--;
        return n;
    }
    return parse_compare(ps);
}

/* A left-associative chain `operand (word operand)*` of node type t. */
static jnode *parse_chain(pstate *ps, const char *word, jkind t, jnode *(*operand)(pstate *))
{
    jnode *n = operand(ps);
    while (is_name(cur(ps), word)) {
        tok *k = &ps->toks[ps->pos++];
        jnode *b = node(ps, t, k);
        b->a = n;
        b->b = operand(ps);
        n = b;
    }
    return n;
}

static jnode *parse_and(pstate *ps)
{
    return parse_chain(ps, "and", JN_AND, parse_not);
}

static jnode *parse_or(pstate *ps)
{
    return parse_chain(ps, "or", JN_OR, parse_and);
}

static jnode *parse_expr(pstate *ps)
{
    jnode *n = parse_or(ps);
    while (is_name(cur(ps), "if")) {
        tok *k = &ps->toks[ps->pos++];
        jnode *c = node(ps, JN_COND, k);
        c->a = parse_or(ps);
        c->b = n;
        if (is_name(cur(ps), "else")) {
            ps->pos++;
            c->c = parse_expr(ps);
        }
        n = c;
    }
    return n;
}

/* expr (',' expr)* : a tuple when there is a comma */
static jnode *parse_tuple_expr(pstate *ps)
{
    tok *at = cur(ps);
    jnode *first = parse_expr(ps);
    if (!is_op(cur(ps), ",")) return first;
    nvec items = {0};
    nvec_push(ps, &items, first, NULL);
    while (is_op(cur(ps), ",")) {
        ps->pos++;
        if (cur(ps)->t == T_VEND || cur(ps)->t == T_BEND) break;
        nvec_push(ps, &items, parse_expr(ps), NULL);
    }
    jnode *n = node(ps, JN_TUPLE, at);
    n->args = items.v;
    n->n_args = items.n;
    return n;
}

/* ---- statements ----------------------------------------------------------- */

static jnode *parse_body(pstate *ps, const char *const *ends, int n_ends, const char **ret_end);

static void expect_bend(pstate *ps)
{
    expect_t(ps, T_BEND, "'%}'");
}

static jnode *parse_if(pstate *ps, tok *at)
{
    jnode *n = node(ps, JN_IF, at);
    nvec parts = {0};
    static const char *const ends[] = {"elif", "else", "endif"};
    for (;;) {
        jnode *cond = parse_tuple_expr(ps);
        expect_bend(ps);
        const char *end;
        jnode *body = parse_body(ps, ends, 3, &end);
        nvec_push(ps, &parts, cond, NULL);
        nvec_push(ps, &parts, body, NULL);
        if (strcmp(end, "elif") == 0) continue;
        if (strcmp(end, "else") == 0) {
            expect_bend(ps);
            static const char *const endif[] = {"endif"};
            n->c = parse_body(ps, endif, 1, &end);
        }
        expect_bend(ps);
        break;
    }
    n->args = parts.v;
    n->n_args = parts.n;
    return n;
}

static jnode *parse_for(pstate *ps, tok *at)
{
    jnode *n = node(ps, JN_FOR, at);
    nvec targets = {0};
    int paren = 0;
    if (is_op(cur(ps), "(")) {
        paren = 1;
        ps->pos++;
    }
    for (;;) {
        nvec_push(ps, &targets, NULL, expect_name(ps, "a loop variable name"));
        if (!is_op(cur(ps), ",")) break;
        ps->pos++;
    }
    if (paren) expect_op(ps, ")");
    n->names = targets.names;
    n->n_names = targets.n;
    if (!is_name(cur(ps), "in")) unexpected(ps, "'in'");
    ps->pos++;
    /* the iterable has no conditional expression: `if` filters the loop */
    n->a = parse_or(ps);
    if (is_op(cur(ps), ",")) {
        jnode *t = node(ps, JN_TUPLE, cur(ps));
        nvec items = {0};
        nvec_push(ps, &items, n->a, NULL);
        while (is_op(cur(ps), ",")) {
            ps->pos++;
            nvec_push(ps, &items, parse_or(ps), NULL);
        }
        t->args = items.v;
        t->n_args = items.n;
        n->a = t;
    }
    if (is_name(cur(ps), "if")) {
        ps->pos++;
        n->b = parse_expr(ps);
    }
    if (is_name(cur(ps), "recursive"))
        pfail(ps, cur(ps)->line, cur(ps)->col, "recursive loops are not supported");
    expect_bend(ps);
    static const char *const ends[] = {"else", "endfor"};
    const char *end;
    n->c = parse_body(ps, ends, 2, &end);
    if (strcmp(end, "else") == 0) {
        expect_bend(ps);
        static const char *const endfor[] = {"endfor"};
        n->d = parse_body(ps, endfor, 1, &end);
    }
    expect_bend(ps);
    return n;
}

/* filter chain for {% set x | f %} and {% filter f %}: root a = NULL */
static jnode *parse_filter_chain(pstate *ps)
{
    jnode *n = parse_filter(ps, NULL);
    while (is_op(cur(ps), "|")) {
        ps->pos++;
        n = parse_filter(ps, n);
    }
    return n;
}

static jnode *parse_set(pstate *ps, tok *at)
{
    jnode *n = node(ps, JN_SET, at);
    const char *first = expect_name(ps, "a variable name");
    if (is_op(cur(ps), ".")) {
        /* set ns.attr = value */
        ps->pos++;
        jnode *obj = node(ps, JN_NAME, at);
        obj->name = first;
        n->a = obj;
        n->name = expect_name(ps, "an attribute name");
        expect_op(ps, "=");
        n->b = parse_tuple_expr(ps);
        expect_bend(ps);
        return n;
    }
    nvec targets = {0};
    nvec_push(ps, &targets, NULL, first);
    while (is_op(cur(ps), ",")) {
        ps->pos++;
        nvec_push(ps, &targets, NULL, expect_name(ps, "a variable name"));
    }
    n->names = targets.names;
    n->n_names = targets.n;
    if (is_op(cur(ps), "=")) {
        ps->pos++;
        n->b = parse_tuple_expr(ps);
        expect_bend(ps);
        return n;
    }
    if (targets.n != 1) unexpected(ps, "'='");
    n->kind = JN_SETBLOCK;
    if (is_op(cur(ps), "|")) {
        ps->pos++;
        n->b = parse_filter_chain(ps);
    }
    expect_bend(ps);
    static const char *const ends[] = {"endset"};
    const char *end;
    n->c = parse_body(ps, ends, 1, &end);
    expect_bend(ps);
    return n;
}

static jnode *parse_macro(pstate *ps, tok *at)
{
    jnode *n = node(ps, JN_MACRO, at);
    n->name = expect_name(ps, "a macro name");
    expect_op(ps, "(");
    nvec params = {0};
    int have_default = 0;
    while (!is_op(cur(ps), ")")) {
        tok *pk = cur(ps);
        const char *p = expect_name(ps, "a parameter name");
        jnode *def = NULL;
        if (is_op(cur(ps), "=")) {
            ps->pos++;
            def = parse_expr(ps);
            have_default = 1;
        } else if (have_default) {
            pfail(ps, pk->line, pk->col, "parameter '%s' without default after one with", p);
        }
        nvec_push(ps, &params, def, p);
        if (!is_op(cur(ps), ",")) break;
        ps->pos++;
    }
    expect_op(ps, ")");
    expect_bend(ps);
    n->names = params.names;
    n->args = params.v;
    n->n_names = n->n_args = params.n;
    static const char *const ends[] = {"endmacro"};
    const char *end;
    n->c = parse_body(ps, ends, 1, &end);
    expect_bend(ps);
    return n;
}

static jnode *parse_statement(pstate *ps)
{
    tok *at = cur(ps);
    if (at->t != T_NAME) unexpected(ps, "a statement name");
    ps->pos++;
    if (is_name(at, "if")) return parse_if(ps, at);
    if (is_name(at, "for")) return parse_for(ps, at);
    if (is_name(at, "set")) return parse_set(ps, at);
    if (is_name(at, "macro")) return parse_macro(ps, at);
    if (is_name(at, "break") || is_name(at, "continue")) {
        jnode *n = node(ps, is_name(at, "break") ? JN_BREAK : JN_CONTINUE, at);
        expect_bend(ps);
        return n;
    }
    if (is_name(at, "generation")) {
        /* transformers' AssistantTracker: the body renders as is */
        expect_bend(ps);
        static const char *const ends[] = {"endgeneration"};
        const char *end;
        jnode *body = parse_body(ps, ends, 1, &end);
        expect_bend(ps);
        return body;
    }
    if (is_name(at, "filter")) {
        jnode *n = node(ps, JN_FILTERBLOCK, at);
        n->b = parse_filter_chain(ps);
        expect_bend(ps);
        static const char *const ends[] = {"endfilter"};
        const char *end;
        n->c = parse_body(ps, ends, 1, &end);
        expect_bend(ps);
        return n;
    }
    static const char *const refused[] = {"include", "import", "from",       "extends", "block",
                                          "call",    "with",   "autoescape", "do"};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++)
        if (is_name(at, refused[i]))
            pfail(ps, at->line, at->col,
                  "statement '%s' is not supported (templates may not load other templates or "
                  "run code)",
                  refused[i]);
    pfail(ps, at->line, at->col, "unknown statement '%.*s'", (int)(at->n > 40 ? 40 : at->n), at->p);
}

static jnode *parse_body(pstate *ps, const char *const *ends, int n_ends, const char **ret_end)
{
    tok *start = cur(ps);
    jnode *body = node(ps, JN_BODY, start);
    nvec items = {0};
    if (++ps->depth > 200) pfail(ps, start->line, start->col, "statements nested too deeply");
    for (;;) {
        tok *k = cur(ps);
        if (k->t == T_EOF) {
            if (n_ends == 0) break;
            pfail(ps, k->line, k->col, "unexpected end of template: missing {%% %s %%}",
                  ends[n_ends - 1]);
        }
        if (k->t == T_TEXT) {
            jnode *t = node(ps, JN_TEXT, k);
            t->lit = jv_str(k->p, k->n);
            nvec_push(ps, &items, t, NULL);
            ps->pos++;
        } else if (k->t == T_VBEGIN) {
            ps->pos++;
            jnode *o = node(ps, JN_OUTPUT, k);
            o->a = parse_tuple_expr(ps);
            expect_t(ps, T_VEND, "'}}'");
            nvec_push(ps, &items, o, NULL);
        } else if (k->t == T_BBEGIN) {
            tok *nk = peek(ps, 1);
            int found = -1;
            for (int i = 0; i < n_ends; i++)
                if (is_name(nk, ends[i])) found = i;
            if (found >= 0) {
                ps->pos += 2;
                *ret_end = ends[found];
                break;
            }
            static const char *const stray[] = {"endif",     "endfor",        "else",
                                                "elif",      "endset",        "endmacro",
                                                "endfilter", "endgeneration", "endraw"};
            for (size_t i = 0; i < sizeof stray / sizeof stray[0]; i++)
                if (is_name(nk, stray[i]))
                    pfail(ps, nk->line, nk->col, "unexpected {%% %s %%}%s%s", stray[i],
                          n_ends ? ": expected {% " : "", n_ends ? ends[n_ends - 1] : "");
            ps->pos++;
            nvec_push(ps, &items, parse_statement(ps), NULL);
        } else {
            char buf[64];
            pfail(ps, k->line, k->col, "unexpected %s", tok_desc(k, buf, sizeof buf));
        }
    }
    ps->depth--;
    body->args = items.v;
    body->n_args = items.n;
    return body;
}

int jinja_parse(jinja_template *t, const char *src, size_t len, lm_err *err)
{
    pstate ps;
    memset(&ps, 0, sizeof ps);
    ps.arena = &t->arena;
    ps.err = err;
    ps.name = t->name;
    ps.lc_line = ps.lc_col = 1;
    if (setjmp(ps.fail)) return err && err->code ? err->code : -EINVAL;
    /* normalise newlines, drop one trailing newline */
    char *s = palloc(&ps, len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') i++;
        } else {
            s[n++] = src[i];
        }
    }
    if (n > 0 && s[n - 1] == '\n') n--;
    ps.src = s;
    ps.len = n;
    lex(&ps);
    const char *end = NULL;
    t->root = parse_body(&ps, NULL, 0, &end);
    return 0;
}
