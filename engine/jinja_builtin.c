/*
 * jinja_builtin.c: what templates may call: filters, tests, the globals of
 * transformers' chat environment (range, namespace, dict, raise_exception,
 * strftime_now) and the methods of strings, mappings, lists and `loop`.
 *
 * This list is the sandbox: nothing else is reachable. Attributes of data
 * are mapping keys; methods are the fixed non-mutating ones below; methods
 * that would modify data (list.append, dict.update, ...) are refused with a
 * message, as jinja2's ImmutableSandboxedEnvironment refuses them.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

#include "engine/jinja_int.h"

/* ---- argument helpers --------------------------------------------------------- */

typedef struct args {
    jval *pos;
    int32_t n;
    const char **kw_names;
    jval *kw;
    int32_t n_kw;
} args;

/* Argument `idx` (positional) or `name` (keyword); NULL when absent. */
static jval *arg_get(const args *a, int32_t idx, const char *name)
{
    if (idx >= 0 && idx < a->n) return &a->pos[idx];
    for (int32_t i = 0; name && i < a->n_kw; i++)
        if (strcmp(a->kw_names[i], name) == 0) return &a->kw[i];
    return NULL;
}

static void check_args(jctx *c, const jnode *at, const char *what, const args *a, int32_t max_pos,
                       const char *const *kw_ok)
{
    if (a->n > max_pos)
        jfail(c, at, "%s takes at most %d positional arguments, %d given", what, max_pos, a->n);
    for (int32_t i = 0; i < a->n_kw; i++) {
        int ok = 0;
        for (int k = 0; kw_ok && kw_ok[k]; k++)
            ok |= strcmp(kw_ok[k], a->kw_names[i]) == 0;
        if (!ok) jfail(c, at, "%s got an unexpected keyword argument '%s'", what, a->kw_names[i]);
    }
}

static jval need_str(jctx *c, const jnode *at, jval v, const char *what)
{
    if (v.t == JV_UNDEF) {
        if (v.u.undef_name) jfail(c, at, "%s: '%s' is undefined", what, v.u.undef_name);
        jfail(c, at, "%s: value is undefined", what);
    }
    if (v.t != JV_STR) jfail(c, at, "%s: expected a string, got %s", what, jv_type_name(v));
    return v;
}

static int64_t need_int(jctx *c, const jnode *at, jval v, const char *what)
{
    if (v.t == JV_INT) return v.u.i;
    if (v.t == JV_BOOL) return v.u.b;
    jfail(c, at, "%s: expected an integer, got %s", what, jv_type_name(v));
}

static jval list_val(jlist *l)
{
    jval r = {.t = JV_LIST};
    r.u.l = l;
    return r;
}

static jval dict_val(jdict *d, jtype t)
{
    jval r = {.t = t};
    r.u.d = d;
    return r;
}

/* jinja2's make_attrgetter: "a.b.0" looks up a, then b, then item 0 */
static jval attr_path(jctx *c, const jnode *at, jval v, const char *path)
{
    const char *p = path;
    while (*p) {
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        int digits = n > 0;
        for (size_t i = 0; i < n; i++)
            digits &= p[i] >= '0' && p[i] <= '9';
        if (digits) {
            v = jeval_getitem(c, at, v, jv_int(strtoll(p, NULL, 10)));
        } else {
            char *part = jalloc(c, at, n + 1);
            memcpy(part, p, n);
            part[n] = 0;
            v = v.t == JV_UNDEF ? v : jbuiltin_getattr(c, at, v, part);
        }
        if (!dot) break;
        p = dot + 1;
    }
    return v;
}

/* ---- Unicode helpers ---------------------------------------------------------- */

static uint32_t dec(const char *p, size_t n, size_t *i)
{
    utf8proc_int32_t cp;
    utf8proc_ssize_t k =
        utf8proc_iterate((const utf8proc_uint8_t *)p + *i, (utf8proc_ssize_t)(n - *i), &cp);
    if (k <= 0) {
        (*i)++;
        return 0xFFFD;
    }
    *i += (size_t)k;
    return (uint32_t)cp;
}

static void enc(jctx *c, const jnode *at, jbuf *b, uint32_t cp)
{
    utf8proc_uint8_t buf[4];
    utf8proc_ssize_t k = utf8proc_encode_char((utf8proc_int32_t)cp, buf);
    jbuf_put(c, at, b, (const char *)buf, (size_t)k);
}

/* Python str.isspace() for one code point */
static int py_space(uint32_t cp)
{
    return cp == ' ' || (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x1F) || cp == 0x85 ||
           cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
           cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

static int in_chars(uint32_t cp, jval chars)
{
    size_t i = 0;
    while (i < chars.u.s.n)
        if (dec(chars.u.s.p, chars.u.s.n, &i) == cp) return 1;
    return 0;
}

/* str.strip / lstrip / rstrip (chars: JV_STR or JV_NONE/absent = whitespace) */
static jval str_strip(jval s, jval chars, int left, int right)
{
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, b = 0, e = n;
    int ws = chars.t != JV_STR;
    if (left) {
        while (b < e) {
            size_t i = b;
            uint32_t cp = dec(p, n, &i);
            if (!(ws ? py_space(cp) : in_chars(cp, chars))) break;
            b = i;
        }
    }
    if (right) {
        while (e > b) {
            size_t s0 = e - 1;
            while (s0 > b && ((unsigned char)p[s0] & 0xC0) == 0x80)
                s0--;
            size_t i = s0;
            uint32_t cp = dec(p, n, &i);
            if (!(ws ? py_space(cp) : in_chars(cp, chars))) break;
            e = s0;
        }
    }
    return jv_str(p + b, e - b);
}

typedef enum { CASE_LOWER, CASE_UPPER, CASE_TITLE, CASE_CAPITALIZE } casemode;

static jval str_case(jctx *c, const jnode *at, jval s, casemode m)
{
    jbuf b = {0};
    size_t i = 0;
    int prev_cased = 0, first = 1;
    while (i < s.u.s.n) {
        uint32_t cp = dec(s.u.s.p, s.u.s.n, &i);
        uint32_t out;
        switch (m) {
        case CASE_LOWER:
            out = (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp);
            break;
        case CASE_UPPER:
            out = (uint32_t)utf8proc_toupper((utf8proc_int32_t)cp);
            break;
        case CASE_CAPITALIZE:
            out = first ? (uint32_t)utf8proc_toupper((utf8proc_int32_t)cp)
                        : (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp);
            break;
        default: {
            int cased = utf8proc_tolower((utf8proc_int32_t)cp) != (utf8proc_int32_t)cp ||
                        utf8proc_toupper((utf8proc_int32_t)cp) != (utf8proc_int32_t)cp;
            out = prev_cased ? (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp)
                             : (uint32_t)utf8proc_toupper((utf8proc_int32_t)cp);
            prev_cased = cased;
        }
        }
        first = 0;
        enc(c, at, &b, out);
    }
    return jv_str(b.p ? b.p : "", b.n);
}

static int str_has_case(jval s, int upper)
{
    size_t i = 0;
    int cased = 0;
    while (i < s.u.s.n) {
        uint32_t cp = dec(s.u.s.p, s.u.s.n, &i);
        utf8proc_int32_t lo = utf8proc_tolower((utf8proc_int32_t)cp),
                         up = utf8proc_toupper((utf8proc_int32_t)cp);
        if (lo == up) continue;
        cased = 1;
        if (upper ? (utf8proc_int32_t)cp != up : (utf8proc_int32_t)cp != lo) return 0;
    }
    return cased;
}

static jval str_replace(jctx *c, const jnode *at, jval s, jval old, jval neu, int64_t count)
{
    jbuf b = {0};
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, i = 0;
    int64_t done = 0;
    if (old.u.s.n == 0) {
        /* Python inserts `new` between every character and at both ends */
        while (count < 0 || done < count) {
            jbuf_put(c, at, &b, neu.u.s.p, neu.u.s.n);
            done++;
            if (i >= n) break;
            size_t j = i;
            dec(p, n, &j);
            jbuf_put(c, at, &b, p + i, j - i);
            i = j;
        }
        jbuf_put(c, at, &b, p + i, n - i);
        return jv_str(b.p ? b.p : "", b.n);
    }
    while (i < n) {
        const char *hit =
            (count < 0 || done < count) ? memmem(p + i, n - i, old.u.s.p, old.u.s.n) : NULL;
        if (!hit) {
            jbuf_put(c, at, &b, p + i, n - i);
            break;
        }
        jbuf_put(c, at, &b, p + i, (size_t)(hit - (p + i)));
        jbuf_put(c, at, &b, neu.u.s.p, neu.u.s.n);
        i = (size_t)(hit - p) + old.u.s.n;
        done++;
    }
    return jv_str(b.p ? b.p : "", b.n);
}

/* str.split / rsplit (sep JV_STR or whitespace) */
static jval str_split(jctx *c, const jnode *at, jval s, jval sep, int64_t maxsplit, int from_right)
{
    jlist *l = jlist_new(c, at, 4);
    const char *p = s.u.s.p;
    size_t n = s.u.s.n;
    if (sep.t == JV_STR) {
        if (sep.u.s.n == 0) jfail(c, at, "split: empty separator");
        if (!from_right) {
            size_t i = 0;
            int64_t done = 0;
            for (;;) {
                const char *hit = (maxsplit < 0 || done < maxsplit)
                                      ? memmem(p + i, n - i, sep.u.s.p, sep.u.s.n)
                                      : NULL;
                if (!hit) {
                    jlist_push(c, at, l, jv_str(p + i, n - i));
                    break;
                }
                jlist_push(c, at, l, jv_str(p + i, (size_t)(hit - (p + i))));
                i = (size_t)(hit - p) + sep.u.s.n;
                done++;
            }
            return list_val(l);
        }
        /* rsplit: collect from the right, then reverse */
        size_t e = n;
        int64_t done = 0;
        for (;;) {
            const char *hit = NULL;
            if ((maxsplit < 0 || done < maxsplit) && e >= sep.u.s.n)
                for (size_t k = e - sep.u.s.n + 1; k-- > 0;)
                    if (memcmp(p + k, sep.u.s.p, sep.u.s.n) == 0) {
                        hit = p + k;
                        break;
                    }
            if (!hit) {
                jlist_push(c, at, l, jv_str(p, e));
                break;
            }
            jlist_push(c, at, l, jv_str(hit + sep.u.s.n, (size_t)(p + e - hit) - sep.u.s.n));
            e = (size_t)(hit - p);
            done++;
        }
        for (int32_t a = 0, b = l->n - 1; a < b; a++, b--) {
            jval t = l->v[a];
            l->v[a] = l->v[b];
            l->v[b] = t;
        }
        return list_val(l);
    }
    /* whitespace split: runs of whitespace, no empty strings */
    size_t i = 0;
    int64_t done = 0;
    if (from_right && maxsplit >= 0) {
        /* rare: emulate by splitting fully then joining the head back */
        jval all = str_split(c, at, s, jv_none(), -1, 0);
        jlist *w = all.u.l;
        if (w->n <= maxsplit + 1) return all;
        /* head = text up to the start of word (n - maxsplit) */
        int32_t keep = (int32_t)(w->n - maxsplit);
        const char *start_rest = w->v[keep].u.s.p;
        jval head = str_strip(jv_str(p, (size_t)(start_rest - p)), jv_none(), 1, 1);
        jlist_push(c, at, l, head);
        for (int32_t k = keep; k < w->n; k++)
            jlist_push(c, at, l, w->v[k]);
        return list_val(l);
    }
    while (i < n) {
        size_t j = i;
        uint32_t cp = dec(p, n, &j);
        if (py_space(cp)) {
            i = j;
            continue;
        }
        if (maxsplit >= 0 && done >= maxsplit) {
            jval rest = str_strip(jv_str(p + i, n - i), jv_none(), 0, 1);
            jlist_push(c, at, l, rest);
            break;
        }
        size_t wstart = i;
        while (i < n) {
            size_t k = i;
            uint32_t ch = dec(p, n, &k);
            if (py_space(ch)) break;
            i = k;
        }
        jlist_push(c, at, l, jv_str(p + wstart, i - wstart));
        done++;
    }
    return list_val(l);
}

static int str_starts(jval s, jval prefix, int at_end)
{
    if (prefix.u.s.n > s.u.s.n) return 0;
    const char *p = at_end ? s.u.s.p + s.u.s.n - prefix.u.s.n : s.u.s.p;
    return memcmp(p, prefix.u.s.p, prefix.u.s.n) == 0;
}

/* '{}'.format(...): positional {} / {0} and keyword {name}, no format specs */
static jval str_format(jctx *c, const jnode *at, jval s, const args *a)
{
    jbuf b = {0};
    const char *p = s.u.s.p;
    size_t n = s.u.s.n;
    int32_t auto_idx = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '{' && i + 1 < n && p[i + 1] == '{') {
            jbuf_putc(c, at, &b, '{');
            i++;
            continue;
        }
        if (p[i] == '}' && i + 1 < n && p[i + 1] == '}') {
            jbuf_putc(c, at, &b, '}');
            i++;
            continue;
        }
        if (p[i] != '{') {
            jbuf_putc(c, at, &b, p[i]);
            continue;
        }
        size_t j = i + 1;
        while (j < n && p[j] != '}')
            j++;
        if (j >= n) jfail(c, at, "format: single '{' encountered in format string");
        char field[64];
        size_t fl = j - i - 1 < sizeof field - 1 ? j - i - 1 : sizeof field - 1;
        memcpy(field, p + i + 1, fl);
        field[fl] = 0;
        if (strchr(field, ':') || strchr(field, '!') || strchr(field, '.') || strchr(field, '['))
            jfail(c, at, "format: field '{%s}' with a format spec is not supported", field);
        jval *v;
        if (fl == 0) {
            v = arg_get(a, auto_idx++, NULL);
        } else if (field[0] >= '0' && field[0] <= '9') {
            v = arg_get(a, atoi(field), NULL);
        } else {
            v = NULL;
            for (int32_t k = 0; k < a->n_kw; k++)
                if (strcmp(a->kw_names[k], field) == 0) v = &a->kw[k];
        }
        if (!v) jfail(c, at, "format: no argument for field '{%s}'", field);
        jv_str_into(c, at, &b, *v);
        i = j;
    }
    return jv_str(b.p ? b.p : "", b.n);
}

/* ---- sorting ------------------------------------------------------------------ */

typedef struct sort_ctx {
    jctx *c;
    const jnode *at;
    int case_sensitive;
    const char *attribute; /* NULL: the item itself */
    int by_value;          /* dictsort: compare v instead of k */
} sort_ctx;

static jval sort_key(sort_ctx *s, jval v)
{
    if (s->attribute) v = attr_path(s->c, s->at, v, s->attribute);
    if (!s->case_sensitive && v.t == JV_STR) v = str_case(s->c, s->at, v, CASE_LOWER);
    return v;
}

static void merge_sort(sort_ctx *s, jval *v, jval *keys, int32_t n, jval *tmpv, jval *tmpk)
{
    if (n < 2) return;
    int32_t h = n / 2;
    merge_sort(s, v, keys, h, tmpv, tmpk);
    merge_sort(s, v + h, keys + h, n - h, tmpv, tmpk);
    int32_t i = 0, j = h, o = 0;
    while (i < h && j < n) {
        if (jv_compare(s->c, s->at, keys[j], keys[i]) < 0) {
            tmpv[o] = v[j];
            tmpk[o++] = keys[j++];
        } else {
            tmpv[o] = v[i];
            tmpk[o++] = keys[i++];
        }
    }
    while (i < h) {
        tmpv[o] = v[i];
        tmpk[o++] = keys[i++];
    }
    while (j < n) {
        tmpv[o] = v[j];
        tmpk[o++] = keys[j++];
    }
    memcpy(v, tmpv, sizeof(jval) * (size_t)n);
    memcpy(keys, tmpk, sizeof(jval) * (size_t)n);
}

static jlist *sorted(sort_ctx *s, jlist *in, int reverse)
{
    jctx *c = s->c;
    int32_t n = in->n;
    jlist *l = jlist_new(c, s->at, n);
    jval *keys = jalloc(c, s->at, sizeof(jval) * (size_t)(n ? n : 1));
    jval *tv = jalloc(c, s->at, sizeof(jval) * (size_t)(n ? n : 1));
    jval *tk = jalloc(c, s->at, sizeof(jval) * (size_t)(n ? n : 1));
    for (int32_t i = 0; i < n; i++) {
        l->v[i] = in->v[i];
        keys[i] = sort_key(s, in->v[i]);
    }
    l->n = n;
    if (reverse) /* stable descending: reverse, sort, reverse */
        for (int32_t a = 0, b = n - 1; a < b; a++, b--) {
            jval t = l->v[a];
            l->v[a] = l->v[b];
            l->v[b] = t;
            t = keys[a];
            keys[a] = keys[b];
            keys[b] = t;
        }
    merge_sort(s, l->v, keys, n, tv, tk);
    if (reverse)
        for (int32_t a = 0, b = n - 1; a < b; a++, b--) {
            jval t = l->v[a];
            l->v[a] = l->v[b];
            l->v[b] = t;
        }
    return l;
}

/* ---- tests ---------------------------------------------------------------------- */

static const char *const TESTS[] = {
    "defined", "undefined",   "none",    "boolean", "true",     "false",    "integer",
    "float",   "number",      "string",  "mapping", "iterable", "sequence", "callable",
    "sameas",  "eq",          "equalto", "ne",      "lt",       "lessthan", "le",
    "gt",      "greaterthan", "ge",      "in",      "odd",      "even",     "divisibleby",
    "lower",   "upper",       "escaped", "filter",  "test",     NULL};

int jbuiltin_has_test(const char *name)
{
    for (int i = 0; TESTS[i]; i++)
        if (strcmp(TESTS[i], name) == 0) return 1;
    return 0;
}

static jval test_arg(jctx *c, const jnode *at, const char *name, jval *a, int32_t n)
{
    if (n < 1) jfail(c, at, "test '%s' needs an argument", name);
    return a[0];
}

int jbuiltin_test(jctx *c, const jnode *at, const char *name, jval v, jval *a, int32_t n)
{
#define IS(s) (strcmp(name, s) == 0)
    if (IS("defined")) return v.t != JV_UNDEF;
    if (IS("undefined")) return v.t == JV_UNDEF;
    if (IS("none")) return v.t == JV_NONE;
    if (IS("boolean")) return v.t == JV_BOOL;
    if (IS("true")) return v.t == JV_BOOL && v.u.b;
    if (IS("false")) return v.t == JV_BOOL && !v.u.b;
    if (IS("integer")) return v.t == JV_INT;
    if (IS("float")) return v.t == JV_FLOAT;
    if (IS("number")) return v.t == JV_INT || v.t == JV_FLOAT || v.t == JV_BOOL;
    if (IS("string")) return v.t == JV_STR;
    if (IS("mapping")) return v.t == JV_DICT;
    if (IS("iterable")) return v.t == JV_STR || v.t == JV_LIST || v.t == JV_DICT || v.t == JV_UNDEF;
    if (IS("sequence")) return v.t == JV_STR || v.t == JV_LIST || v.t == JV_DICT;
    if (IS("callable")) return v.t == JV_FUNC || v.t == JV_METHOD || v.t == JV_MACRO;
    if (IS("sameas")) {
        jval o = test_arg(c, at, name, a, n);
        if (v.t != o.t) return 0;
        if (v.t == JV_NONE || v.t == JV_UNDEF) return 1;
        if (v.t == JV_BOOL) return v.u.b == o.u.b;
        return jv_equal(v, o) &&
               (v.t == JV_INT || v.t == JV_FLOAT || (v.t == JV_STR && v.u.s.p == o.u.s.p) ||
                (v.t == JV_LIST && v.u.l == o.u.l) ||
                ((v.t == JV_DICT || v.t == JV_NS) && v.u.d == o.u.d));
    }
    if (IS("eq") || IS("equalto")) return jv_equal(v, test_arg(c, at, name, a, n));
    if (IS("ne")) return !jv_equal(v, test_arg(c, at, name, a, n));
    if (IS("lt") || IS("lessthan")) return jv_compare(c, at, v, test_arg(c, at, name, a, n)) < 0;
    if (IS("le")) return jv_compare(c, at, v, test_arg(c, at, name, a, n)) <= 0;
    if (IS("gt") || IS("greaterthan")) return jv_compare(c, at, v, test_arg(c, at, name, a, n)) > 0;
    if (IS("ge")) return jv_compare(c, at, v, test_arg(c, at, name, a, n)) >= 0;
    if (IS("in")) {
        jval o = test_arg(c, at, name, a, n);
        if (o.t == JV_STR && v.t == JV_STR)
            return v.u.s.n == 0 || memmem(o.u.s.p, o.u.s.n, v.u.s.p, v.u.s.n) != NULL;
        if (o.t == JV_DICT) return jdict_get(o.u.d, v) != NULL;
        jlist *l = jiter_list(c, at, o);
        for (int32_t i = 0; i < l->n; i++)
            if (jv_equal(l->v[i], v)) return 1;
        return 0;
    }
    if (IS("odd") || IS("even") || IS("divisibleby")) {
        int64_t x = need_int(c, at, v, name);
        if (IS("odd")) return ((x % 2) + 2) % 2 == 1;
        if (IS("even")) return x % 2 == 0;
        int64_t d = need_int(c, at, test_arg(c, at, name, a, n), name);
        if (d == 0) jfail(c, at, "divisibleby: division by zero");
        return x % d == 0;
    }
    if (IS("lower") || IS("upper")) return v.t == JV_STR && str_has_case(v, IS("upper"));
    if (IS("escaped")) return 0;
    if (IS("filter")) return v.t == JV_STR && jbuiltin_has_filter(jv_to_str(c, at, v).u.s.p);
    if (IS("test")) return v.t == JV_STR && jbuiltin_has_test(jv_to_str(c, at, v).u.s.p);
#undef IS
    jfail(c, at, "no test named '%s'", name);
}

/* Python's printf-style `fmt % args` for %s %r %d %i %f %x %% (optionally
 * with a width and, for %f, a precision): what chat templates use. */
jval jbuiltin_percent(jctx *c, const jnode *at, jval fmt, jval *args, int32_t n)
{
    jbuf b = {0};
    int32_t next = 0;
    const char *p = fmt.u.s.p;
    size_t len = fmt.u.s.n;
    for (size_t i = 0; i < len; i++) {
        if (p[i] != '%') {
            jbuf_putc(c, at, &b, p[i]);
            continue;
        }
        if (++i >= len) jfail(c, at, "format: incomplete format");
        if (p[i] == '%') {
            jbuf_putc(c, at, &b, '%');
            continue;
        }
        int left = 0, width = 0, prec = -1;
        if (p[i] == '-') {
            left = 1;
            i++;
        }
        while (i < len && p[i] >= '0' && p[i] <= '9' && width < 1000)
            width = width * 10 + (p[i++] - '0');
        if (i < len && p[i] == '.') {
            prec = 0;
            i++;
            while (i < len && p[i] >= '0' && p[i] <= '9' && prec < 100)
                prec = prec * 10 + (p[i++] - '0');
        }
        if (i >= len) jfail(c, at, "format: incomplete format");
        if (next >= n) jfail(c, at, "format: not enough arguments for format string");
        jval v = args[next++];
        jbuf piece = {0};
        char num[128];
        switch (p[i]) {
        case 's':
            jv_str_into(c, at, &piece, v);
            break;
        case 'r':
            jv_repr_into(c, at, &piece, v);
            break;
        case 'd':
        case 'i':
        case 'x':
            if (v.t != JV_INT && v.t != JV_BOOL && v.t != JV_FLOAT)
                jfail(c, at, "format: %%%c needs a number, not %s", p[i], jv_type_name(v));
            snprintf(num, sizeof num, p[i] == 'x' ? "%llx" : "%lld",
                     (long long)(v.t == JV_FLOAT ? (int64_t)v.u.f
                                 : v.t == JV_INT ? v.u.i
                                                 : v.u.b));
            jbuf_put(c, at, &piece, num, strlen(num));
            break;
        case 'f':
            if (v.t != JV_INT && v.t != JV_BOOL && v.t != JV_FLOAT)
                jfail(c, at, "format: %%f needs a number, not %s", jv_type_name(v));
            snprintf(num, sizeof num, "%.*f", prec < 0 ? 6 : prec,
                     v.t == JV_FLOAT ? v.u.f
                     : v.t == JV_INT ? (double)v.u.i
                                     : (double)v.u.b);
            jbuf_put(c, at, &piece, num, strlen(num));
            break;
        default:
            jfail(c, at, "format: unsupported conversion '%%%c'", p[i]);
        }
        size_t w = jutf8_len(piece.p ? piece.p : "", piece.n);
        for (size_t k = w; !left && k < (size_t)width; k++)
            jbuf_putc(c, at, &b, ' ');
        jbuf_put(c, at, &b, piece.p, piece.n);
        for (size_t k = w; left && k < (size_t)width; k++)
            jbuf_putc(c, at, &b, ' ');
    }
    if (next < n) jfail(c, at, "format: not all arguments converted during string formatting");
    return jv_str(b.p ? b.p : "", b.n);
}

/* ---- filters -------------------------------------------------------------------- */

static const char *const FILTERS[] = {
    "abs",    "attr",   "capitalize", "count",      "d",         "default", "dictsort",
    "e",      "escape", "first",      "float",      "format",    "indent",  "int",
    "items",  "join",   "last",       "length",     "list",      "lower",   "map",
    "max",    "min",    "reject",     "rejectattr", "replace",   "reverse", "round",
    "safe",   "select", "selectattr", "sort",       "string",    "sum",     "title",
    "tojson", "trim",   "unique",     "upper",      "wordcount", NULL};

int jbuiltin_has_filter(const char *name)
{
    for (int i = 0; FILTERS[i]; i++)
        if (strcmp(FILTERS[i], name) == 0) return 1;
    return 0;
}

static int64_t length_of(jctx *c, const jnode *at, jval v)
{
    switch (v.t) {
    case JV_STR:
        return (int64_t)jutf8_len(v.u.s.p, v.u.s.n);
    case JV_LIST:
        return v.u.l->n;
    case JV_DICT:
    case JV_NS:
        return v.u.d->n;
    case JV_UNDEF:
        return 0;
    default:
        jfail(c, at, "object of type '%s' has no len()", jv_type_name(v));
    }
}

/* select/reject/selectattr/rejectattr */
static jval filter_select(jctx *c, const jnode *at, jval v, const args *a, int by_attr, int keep_if)
{
    jlist *in = jiter_list(c, at, v);
    int32_t first = 0;
    const char *attr = NULL;
    if (by_attr) {
        jval *an = arg_get(a, 0, NULL);
        if (!an) jfail(c, at, "%s needs an attribute name", keep_if ? "selectattr" : "rejectattr");
        jval s = need_str(c, at, *an, "selectattr attribute");
        attr = jv_strdup(c, at, s.u.s.p, s.u.s.n).u.s.p;
        first = 1;
    }
    const char *test = NULL;
    if (a->n > first) {
        jval s = need_str(c, at, a->pos[first], "test name");
        test = jv_strdup(c, at, s.u.s.p, s.u.s.n).u.s.p;
        if (!jbuiltin_has_test(test)) jfail(c, at, "no test named '%s'", test);
    }
    jlist *out = jlist_new(c, at, in->n);
    for (int32_t i = 0; i < in->n; i++) {
        jval item = in->v[i];
        jval x = attr ? attr_path(c, at, item, attr) : item;
        int r = test ? jbuiltin_test(c, at, test, x, a->pos + first + 1, a->n - first - 1)
                     : jv_truthy(x);
        if (r == keep_if) out->v[out->n++] = item;
    }
    return list_val(out);
}

static jval filter_indent(jctx *c, const jnode *at, jval s, const args *a)
{
    jval *w = arg_get(a, 0, "width");
    jval *first = arg_get(a, 1, "first");
    jval *blank = arg_get(a, 2, "blank");
    jval ind;
    if (w && w->t == JV_STR) {
        ind = *w;
    } else {
        int64_t n = w ? need_int(c, at, *w, "indent width") : 4;
        if (n < 0 || n > 1000) jfail(c, at, "indent: width %lld out of range", (long long)n);
        char *sp = jalloc(c, at, (size_t)n + 1);
        memset(sp, ' ', (size_t)n);
        ind = jv_str(sp, (size_t)n);
    }
    /* jinja2: s += "\n"; then lines = s.splitlines() */
    jbuf b = {0};
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, i = 0;
    int line_no = 0;
    /* lines of s + "\n" split on "\n": the pieces of s split on "\n" (the
     * final piece is dropped when s ends in "\n") */
    while (i <= n) {
        const char *nl = memchr(p + i, '\n', n - i);
        size_t e = nl ? (size_t)(nl - p) : n;
        if (!nl && i == n && line_no > 0) break;
        int empty = e == i;
        if (line_no > 0) jbuf_putc(c, at, &b, '\n');
        if ((line_no > 0 || (first && jv_truthy(*first))) &&
            (!empty || (blank && jv_truthy(*blank))))
            jbuf_put(c, at, &b, ind.u.s.p, ind.u.s.n);
        jbuf_put(c, at, &b, p + i, e - i);
        line_no++;
        if (!nl) break;
        i = e + 1;
    }
    return jv_str(b.p ? b.p : "", b.n);
}

static jval filter_tojson(jctx *c, const jnode *at, jval v, const args *a)
{
    static const char *const kw[] = {"ensure_ascii", "indent", "separators", "sort_keys", NULL};
    check_args(c, at, "tojson", a, 4, kw);
    jval *ea = arg_get(a, 0, "ensure_ascii");
    jval *ind = arg_get(a, 1, "indent");
    jval *sep = arg_get(a, 2, "separators");
    jval *sk = arg_get(a, 3, "sort_keys");
    int indent = -1;
    if (ind && ind->t != JV_NONE) {
        if (ind->t == JV_STR) jfail(c, at, "tojson: string indent is not supported");
        indent = (int)need_int(c, at, *ind, "tojson indent");
        if (indent < 0) indent = 0;
        if (indent > 64) jfail(c, at, "tojson: indent %d too large", indent);
    }
    const char *item_sep = indent >= 0 ? "," : ", ", *key_sep = ": ";
    if (sep && sep->t != JV_NONE) {
        if (sep->t != JV_LIST || sep->u.l->n != 2 || sep->u.l->v[0].t != JV_STR ||
            sep->u.l->v[1].t != JV_STR)
            jfail(c, at, "tojson: separators must be a pair of strings");
        item_sep = jv_strdup(c, at, sep->u.l->v[0].u.s.p, sep->u.l->v[0].u.s.n).u.s.p;
        key_sep = jv_strdup(c, at, sep->u.l->v[1].u.s.p, sep->u.l->v[1].u.s.n).u.s.p;
    }
    jbuf b = {0};
    jv_json_into(c, at, &b, v, ea && jv_truthy(*ea), indent, item_sep, key_sep,
                 sk && jv_truthy(*sk), 0);
    return jv_str(b.p ? b.p : "", b.n);
}

static jval to_int(jctx *c, const jnode *at, jval v, jval dflt, int base)
{
    switch (v.t) {
    case JV_INT:
        return v;
    case JV_BOOL:
        return jv_int(v.u.b);
    case JV_FLOAT:
        if (!isfinite(v.u.f) || fabs(v.u.f) > 9.2e18) return dflt;
        return jv_int((int64_t)v.u.f);
    case JV_STR: {
        char buf[64];
        jval t = str_strip(v, jv_none(), 1, 1);
        if (t.u.s.n == 0 || t.u.s.n >= sizeof buf) return dflt;
        memcpy(buf, t.u.s.p, t.u.s.n);
        buf[t.u.s.n] = 0;
        char *end;
        errno = 0;
        long long x = strtoll(buf, &end, base);
        if (*end == 0 && !errno) return jv_int(x);
        double f = strtod(buf, &end);
        if (*end == 0 && isfinite(f) && fabs(f) < 9.2e18) return jv_int((int64_t)f);
        return dflt;
    }
    default:
        (void)c;
        (void)at;
        return dflt;
    }
}

static jval to_float(jval v, jval dflt)
{
    switch (v.t) {
    case JV_INT:
        return jv_float((double)v.u.i);
    case JV_BOOL:
        return jv_float(v.u.b);
    case JV_FLOAT:
        return v;
    case JV_STR: {
        char buf[64];
        if (v.u.s.n == 0 || v.u.s.n >= sizeof buf) return dflt;
        memcpy(buf, v.u.s.p, v.u.s.n);
        buf[v.u.s.n] = 0;
        char *end;
        double f = strtod(buf, &end);
        while (*end == ' ' || *end == '\t' || *end == '\n')
            end++;
        return *end == 0 ? jv_float(f) : dflt;
    }
    default:
        return dflt;
    }
}

jval jbuiltin_filter(jctx *c, const jnode *at, const char *name, jval v, jval *pos, int32_t n,
                     const char **kw_names, jval *kw, int32_t n_kw)
{
    args a = {pos, n, kw_names, kw, n_kw};
#define IS(s) (strcmp(name, s) == 0)
    if (IS("default") || IS("d")) {
        jval *dv = arg_get(&a, 0, "default_value");
        jval *bo = arg_get(&a, 1, "boolean");
        int use = v.t == JV_UNDEF || (bo && jv_truthy(*bo) && !jv_truthy(v));
        return use ? (dv ? *dv : jv_cstr("")) : v;
    }
    if (IS("length") || IS("count")) return jv_int(length_of(c, at, v));
    if (IS("string")) return jv_to_str(c, at, v);
    if (IS("tojson")) return filter_tojson(c, at, v, &a);
    if (IS("safe")) return v;
    if (IS("list")) {
        jlist *src = jiter_list(c, at, v);
        jlist *l = jlist_new(c, at, src->n);
        memcpy(l->v, src->v, sizeof(jval) * (size_t)src->n);
        l->n = src->n;
        return list_val(l);
    }
    if (IS("items")) {
        if (v.t == JV_UNDEF) return list_val(jlist_new(c, at, 0));
        if (v.t != JV_DICT && v.t != JV_NS)
            jfail(c, at, "items: expected a mapping, got %s", jv_type_name(v));
        jlist *l = jlist_new(c, at, v.u.d->n);
        for (int32_t i = 0; i < v.u.d->n; i++) {
            jlist *t = jlist_new(c, at, 2);
            t->is_tuple = 1;
            t->v[0] = v.u.d->k[i];
            t->v[1] = v.u.d->v[i];
            t->n = 2;
            l->v[l->n++] = list_val(t);
        }
        return list_val(l);
    }
    if (IS("first") || IS("last")) {
        jlist *l = jiter_list(c, at, v);
        if (l->n == 0) return jv_undef(NULL);
        return IS("first") ? l->v[0] : l->v[l->n - 1];
    }
    if (IS("reverse")) {
        if (v.t == JV_STR) {
            jlist *chars = jiter_list(c, at, v);
            jbuf b = {0};
            for (int32_t i = chars->n - 1; i >= 0; i--)
                jbuf_put(c, at, &b, chars->v[i].u.s.p, chars->v[i].u.s.n);
            return jv_str(b.p ? b.p : "", b.n);
        }
        jlist *src = jiter_list(c, at, v);
        jlist *l = jlist_new(c, at, src->n);
        for (int32_t i = src->n - 1; i >= 0; i--)
            l->v[l->n++] = src->v[i];
        return list_val(l);
    }
    if (IS("join")) {
        jval *d = arg_get(&a, 0, "d");
        jval *attr = arg_get(&a, 1, "attribute");
        jval sep = d ? need_str(c, at, jv_to_str(c, at, *d), "join separator") : jv_cstr("");
        const char *an = NULL;
        if (attr) {
            jval s = need_str(c, at, *attr, "join attribute");
            an = jv_strdup(c, at, s.u.s.p, s.u.s.n).u.s.p;
        }
        jlist *l = jiter_list(c, at, v);
        jbuf b = {0};
        for (int32_t i = 0; i < l->n; i++) {
            if (i) jbuf_put(c, at, &b, sep.u.s.p, sep.u.s.n);
            jv_str_into(c, at, &b, an ? attr_path(c, at, l->v[i], an) : l->v[i]);
        }
        return jv_str(b.p ? b.p : "", b.n);
    }
    if (IS("map")) {
        jlist *l = jiter_list(c, at, v);
        jlist *out = jlist_new(c, at, l->n);
        jval *attr = arg_get(&a, -1, "attribute");
        if (attr) {
            jval s = need_str(c, at, *attr, "map attribute");
            const char *an = jv_strdup(c, at, s.u.s.p, s.u.s.n).u.s.p;
            jval *dflt = arg_get(&a, -1, "default");
            for (int32_t i = 0; i < l->n; i++) {
                jval x = attr_path(c, at, l->v[i], an);
                out->v[out->n++] = x.t == JV_UNDEF && dflt ? *dflt : x;
            }
            return list_val(out);
        }
        if (a.n < 1) jfail(c, at, "map needs a filter name or attribute=");
        jval fs = need_str(c, at, a.pos[0], "map filter name");
        const char *fname = jv_strdup(c, at, fs.u.s.p, fs.u.s.n).u.s.p;
        if (!jbuiltin_has_filter(fname)) jfail(c, at, "no filter named '%s'", fname);
        for (int32_t i = 0; i < l->n; i++)
            out->v[out->n++] = jbuiltin_filter(c, at, fname, l->v[i], a.pos + 1, a.n - 1,
                                               a.kw_names, a.kw, a.n_kw);
        return list_val(out);
    }
    if (IS("select")) return filter_select(c, at, v, &a, 0, 1);
    if (IS("reject")) return filter_select(c, at, v, &a, 0, 0);
    if (IS("selectattr")) return filter_select(c, at, v, &a, 1, 1);
    if (IS("rejectattr")) return filter_select(c, at, v, &a, 1, 0);
    if (IS("attr")) {
        jval s = need_str(c, at, a.n ? a.pos[0] : jv_undef(NULL), "attr name");
        const char *an = jv_strdup(c, at, s.u.s.p, s.u.s.n).u.s.p;
        if (an[0] == '_')
            jfail(c, at, "access to attribute '%s' of a %s is not allowed", an, jv_type_name(v));
        return jbuiltin_getattr(c, at, v, an);
    }
    if (IS("sort") || IS("unique") || IS("max") || IS("min") || IS("dictsort")) {
        jval *rev = arg_get(&a, IS("sort") ? 0 : -1, "reverse");
        jval *cs = arg_get(&a, IS("sort") ? 1 : 0, "case_sensitive");
        jval *attr = arg_get(&a, IS("sort") ? 2 : -1, "attribute");
        sort_ctx s = {c, at, cs && jv_truthy(*cs), NULL, 0};
        if (attr) {
            jval an = need_str(c, at, *attr, "attribute");
            s.attribute = jv_strdup(c, at, an.u.s.p, an.u.s.n).u.s.p;
        }
        if (IS("dictsort")) {
            if (v.t != JV_DICT)
                jfail(c, at, "dictsort: expected a mapping, got %s", jv_type_name(v));
            jval by = arg_get(&a, 1, "by") ? *arg_get(&a, 1, "by") : jv_cstr("key");
            jval items = jbuiltin_filter(c, at, "items", v, NULL, 0, NULL, NULL, 0);
            jval *rv = arg_get(&a, 2, "reverse");
            s.attribute =
                (by.t == JV_STR && by.u.s.n == 5 && memcmp(by.u.s.p, "value", 5) == 0) ? "1" : "0";
            return list_val(sorted(&s, items.u.l, rv && jv_truthy(*rv)));
        }
        jlist *l = jiter_list(c, at, v);
        if (IS("sort")) return list_val(sorted(&s, l, rev && jv_truthy(*rev)));
        if (IS("unique")) {
            jlist *out = jlist_new(c, at, l->n);
            jlist *seen = jlist_new(c, at, l->n);
            for (int32_t i = 0; i < l->n; i++) {
                jval k = sort_key(&s, l->v[i]);
                int dup = 0;
                for (int32_t j = 0; j < seen->n && !dup; j++)
                    dup = jv_equal(seen->v[j], k);
                if (!dup) {
                    seen->v[seen->n++] = k;
                    out->v[out->n++] = l->v[i];
                }
            }
            return list_val(out);
        }
        if (l->n == 0) return jv_undef(NULL);
        int32_t best = 0;
        jval bk = sort_key(&s, l->v[0]);
        for (int32_t i = 1; i < l->n; i++) {
            jval k = sort_key(&s, l->v[i]);
            int r = jv_compare(c, at, k, bk);
            if (IS("max") ? r > 0 : r < 0) {
                best = i;
                bk = k;
            }
        }
        return l->v[best];
    }
    if (IS("sum")) {
        jval *attr = arg_get(&a, 0, "attribute");
        jval *start = arg_get(&a, 1, "start");
        const char *an = NULL;
        if (attr && attr->t != JV_NONE) {
            jval s = need_str(c, at, *attr, "sum attribute");
            an = jv_strdup(c, at, s.u.s.p, s.u.s.n).u.s.p;
        }
        jval acc = start ? *start : jv_int(0);
        jlist *l = jiter_list(c, at, v);
        for (int32_t i = 0; i < l->n; i++) {
            jval x = an ? attr_path(c, at, l->v[i], an) : l->v[i];
            if (!((acc.t == JV_INT || acc.t == JV_FLOAT || acc.t == JV_BOOL) &&
                  (x.t == JV_INT || x.t == JV_FLOAT || x.t == JV_BOOL)))
                jfail(c, at, "sum: cannot add %s and %s", jv_type_name(acc), jv_type_name(x));
            if (acc.t == JV_FLOAT || x.t == JV_FLOAT)
                acc = jv_float(
                    (acc.t == JV_FLOAT ? acc.u.f : (double)(acc.t == JV_INT ? acc.u.i : acc.u.b)) +
                    (x.t == JV_FLOAT ? x.u.f : (double)(x.t == JV_INT ? x.u.i : x.u.b)));
            else
                acc =
                    jv_int((acc.t == JV_INT ? acc.u.i : acc.u.b) + (x.t == JV_INT ? x.u.i : x.u.b));
        }
        return acc;
    }
    if (IS("abs")) {
        if (v.t == JV_INT) return jv_int(v.u.i < 0 ? -v.u.i : v.u.i);
        if (v.t == JV_FLOAT) return jv_float(fabs(v.u.f));
        if (v.t == JV_BOOL) return jv_int(v.u.b);
        jfail(c, at, "abs: bad operand type '%s'", jv_type_name(v));
    }
    if (IS("int")) {
        jval *d = arg_get(&a, 0, "default");
        jval *base = arg_get(&a, 1, "base");
        return to_int(c, at, v, d ? *d : jv_int(0),
                      base ? (int)need_int(c, at, *base, "base") : 10);
    }
    if (IS("float")) {
        jval *d = arg_get(&a, 0, "default");
        return to_float(v, d ? *d : jv_float(0.0));
    }
    if (IS("round")) {
        jval *pr = arg_get(&a, 0, "precision");
        jval *me = arg_get(&a, 1, "method");
        int64_t p = pr ? need_int(c, at, *pr, "round precision") : 0;
        jval f = to_float(v, jv_undef(NULL));
        if (f.t == JV_UNDEF) jfail(c, at, "round: expected a number, got %s", jv_type_name(v));
        double m = pow(10.0, (double)p), x = f.u.f * m;
        const char *method = "common";
        if (me) {
            jval s = need_str(c, at, *me, "round method");
            method = jv_strdup(c, at, s.u.s.p, s.u.s.n).u.s.p;
        }
        if (strcmp(method, "common") == 0)
            x = rint(x); /* Python's round: half to even */
        else if (strcmp(method, "ceil") == 0)
            x = ceil(x);
        else if (strcmp(method, "floor") == 0)
            x = floor(x);
        else
            jfail(c, at, "round: method must be common, ceil or floor");
        return jv_float(x / m);
    }
    if (IS("indent")) return filter_indent(c, at, jv_to_str(c, at, v), &a);
    if (IS("format")) return jbuiltin_percent(c, at, need_str(c, at, v, "format"), a.pos, a.n);
    if (IS("wordcount")) {
        jval w = str_split(c, at, jv_to_str(c, at, v), jv_none(), -1, 0);
        return jv_int(w.u.l->n);
    }
    /* string filters: the value is converted with str() first, as jinja2 does */
    jval s = v.t == JV_UNDEF ? jv_cstr("") : jv_to_str(c, at, v);
    if (IS("trim")) {
        jval *chars = arg_get(&a, 0, "chars");
        return str_strip(s, chars ? *chars : jv_none(), 1, 1);
    }
    if (IS("lower")) return str_case(c, at, s, CASE_LOWER);
    if (IS("upper")) return str_case(c, at, s, CASE_UPPER);
    if (IS("title")) return str_case(c, at, s, CASE_TITLE);
    if (IS("capitalize")) return str_case(c, at, s, CASE_CAPITALIZE);
    if (IS("replace")) {
        jval *o = arg_get(&a, 0, "old");
        jval *nw = arg_get(&a, 1, "new");
        jval *cnt = arg_get(&a, 2, "count");
        if (!o || !nw) jfail(c, at, "replace needs old and new strings");
        return str_replace(c, at, s, need_str(c, at, jv_to_str(c, at, *o), "replace"),
                           need_str(c, at, jv_to_str(c, at, *nw), "replace"),
                           cnt && cnt->t != JV_NONE ? need_int(c, at, *cnt, "replace count") : -1);
    }
    if (IS("escape") || IS("e")) {
        jbuf b = {0};
        for (size_t i = 0; i < s.u.s.n; i++) {
            char ch = s.u.s.p[i];
            const char *r = ch == '&'    ? "&amp;"
                            : ch == '<'  ? "&lt;"
                            : ch == '>'  ? "&gt;"
                            : ch == '"'  ? "&#34;"
                            : ch == '\'' ? "&#39;"
                                         : NULL;
            if (r)
                jbuf_put(c, at, &b, r, strlen(r));
            else
                jbuf_putc(c, at, &b, ch);
        }
        return jv_str(b.p ? b.p : "", b.n);
    }
#undef IS
    jfail(c, at, "no filter named '%s'", name);
}

/* ---- attributes and methods ------------------------------------------------------ */

static const char *const STR_METHODS[] = {
    "startswith", "endswith", "split",   "rsplit",     "strip",   "lstrip",  "rstrip",
    "upper",      "lower",    "title",   "capitalize", "replace", "find",    "rfind",
    "count",      "join",     "format",  "splitlines", "isdigit", "isalpha", "isalnum",
    "isspace",    "islower",  "isupper", NULL};
static const char *const DICT_METHODS[] = {"get", "items", "keys", "values", NULL};
static const char *const LIST_METHODS[] = {"index", "count", NULL};
static const char *const MUTATORS[] = {"append",  "extend", "insert",  "pop",    "remove",
                                       "clear",   "sort",   "reverse", "update", "setdefault",
                                       "popitem", "add",    "discard", NULL};

static int in_list(const char *const *l, const char *name)
{
    for (int i = 0; l[i]; i++)
        if (strcmp(l[i], name) == 0) return 1;
    return 0;
}

static jval method(jctx *c, const jnode *at, jval self, const char *name)
{
    jval m = {.t = JV_METHOD};
    m.u.fn.name = name;
    m.u.fn.self = jalloc(c, at, sizeof(jval));
    *m.u.fn.self = self;
    return m;
}

jval jbuiltin_getattr(jctx *c, const jnode *at, jval obj, const char *name)
{
    if (name[0] == '_')
        jfail(c, at, "access to attribute '%s' of a %s is not allowed", name, jv_type_name(obj));
    switch (obj.t) {
    case JV_DICT:
        if (in_list(DICT_METHODS, name)) return method(c, at, obj, name);
        if (in_list(MUTATORS, name))
            jfail(c, at, "dict.%s would modify data: not allowed in templates", name);
        {
            jval *v = jdict_get_str(obj.u.d, name);
            return v ? *v : jv_undef(name);
        }
    case JV_NS: {
        jval *v = jdict_get_str(obj.u.d, name);
        return v ? *v : jv_undef(name);
    }
    case JV_STR:
        if (in_list(STR_METHODS, name)) return method(c, at, obj, name);
        return jv_undef(name);
    case JV_LIST:
        if (in_list(LIST_METHODS, name)) return method(c, at, obj, name);
        if (in_list(MUTATORS, name))
            jfail(c, at, "list.%s would modify data: not allowed in templates", name);
        return jv_undef(name);
    case JV_LOOP: {
        jloop *lp = obj.u.loop;
        int32_t i = lp->index0, n = lp->n;
        if (strcmp(name, "index") == 0) return jv_int(i + 1);
        if (strcmp(name, "index0") == 0) return jv_int(i);
        if (strcmp(name, "revindex") == 0) return jv_int(n - i);
        if (strcmp(name, "revindex0") == 0) return jv_int(n - i - 1);
        if (strcmp(name, "first") == 0) return jv_bool(i == 0);
        if (strcmp(name, "last") == 0) return jv_bool(i == n - 1);
        if (strcmp(name, "length") == 0) return jv_int(n);
        if (strcmp(name, "depth") == 0) return jv_int(1);
        if (strcmp(name, "depth0") == 0) return jv_int(0);
        if (strcmp(name, "previtem") == 0)
            return i > 0 ? jloop_item(lp, i - 1) : jv_undef("loop.previtem");
        if (strcmp(name, "nextitem") == 0)
            return i + 1 < n ? jloop_item(lp, i + 1) : jv_undef("loop.nextitem");
        if (strcmp(name, "cycle") == 0) return method(c, at, obj, "cycle");
        return jv_undef(name);
    }
    case JV_UNDEF:
        if (obj.u.undef_name) jfail(c, at, "'%s' is undefined", obj.u.undef_name);
        jfail(c, at, "attribute '%s' of an undefined value", name);
    default:
        return jv_undef(name);
    }
}

static jval call_method(jctx *c, const jnode *at, jval self, const char *name, const args *a)
{
#define IS(s) (strcmp(name, s) == 0)
    if (self.t == JV_LOOP && IS("cycle")) {
        if (a->n == 0) jfail(c, at, "loop.cycle needs at least one argument");
        return a->pos[self.u.loop->index0 % a->n];
    }
    if (self.t == JV_DICT) {
        if (IS("get")) {
            jval *k = arg_get(a, 0, "key");
            jval *d = arg_get(a, 1, "default");
            if (!k) jfail(c, at, "dict.get needs a key");
            jval *v = jdict_get(self.u.d, *k);
            return v ? *v : d ? *d : jv_none();
        }
        jlist *l = jlist_new(c, at, self.u.d->n);
        for (int32_t i = 0; i < self.u.d->n; i++) {
            if (IS("keys")) {
                l->v[l->n++] = self.u.d->k[i];
            } else if (IS("values")) {
                l->v[l->n++] = self.u.d->v[i];
            } else {
                jlist *t = jlist_new(c, at, 2);
                t->is_tuple = 1;
                t->v[0] = self.u.d->k[i];
                t->v[1] = self.u.d->v[i];
                t->n = 2;
                l->v[l->n++] = list_val(t);
            }
        }
        return list_val(l);
    }
    if (self.t == JV_LIST) {
        jval *x = arg_get(a, 0, NULL);
        if (!x) jfail(c, at, "list.%s needs an argument", name);
        int64_t cnt = 0;
        for (int32_t i = 0; i < self.u.l->n; i++)
            if (jv_equal(self.u.l->v[i], *x)) {
                if (IS("index")) return jv_int(i);
                cnt++;
            }
        if (IS("index")) jfail(c, at, "list.index: value is not in list");
        return jv_int(cnt);
    }
    /* strings */
    jval s = self;
    jval *a0 = arg_get(a, 0, NULL);
    if (IS("startswith") || IS("endswith")) {
        if (!a0) jfail(c, at, "%s needs an argument", name);
        int end = IS("endswith");
        if (a0->t == JV_LIST) {
            for (int32_t i = 0; i < a0->u.l->n; i++)
                if (str_starts(s, need_str(c, at, a0->u.l->v[i], name), end)) return jv_bool(1);
            return jv_bool(0);
        }
        return jv_bool(str_starts(s, need_str(c, at, *a0, name), end));
    }
    if (IS("split") || IS("rsplit")) {
        jval *sep = arg_get(a, 0, "sep");
        jval *mx = arg_get(a, 1, "maxsplit");
        jval sv = sep && sep->t != JV_NONE ? need_str(c, at, *sep, "split separator") : jv_none();
        return str_split(c, at, s, sv, mx ? need_int(c, at, *mx, "maxsplit") : -1, IS("rsplit"));
    }
    if (IS("strip") || IS("lstrip") || IS("rstrip")) {
        jval ch = a0 && a0->t != JV_NONE ? need_str(c, at, *a0, name) : jv_none();
        return str_strip(s, ch, !IS("rstrip"), !IS("lstrip"));
    }
    if (IS("upper")) return str_case(c, at, s, CASE_UPPER);
    if (IS("lower")) return str_case(c, at, s, CASE_LOWER);
    if (IS("title")) return str_case(c, at, s, CASE_TITLE);
    if (IS("capitalize")) return str_case(c, at, s, CASE_CAPITALIZE);
    if (IS("replace")) {
        jval *nw = arg_get(a, 1, NULL);
        jval *cnt = arg_get(a, 2, "count");
        if (!a0 || !nw) jfail(c, at, "replace needs old and new strings");
        return str_replace(c, at, s, need_str(c, at, *a0, "replace"),
                           need_str(c, at, *nw, "replace"),
                           cnt ? need_int(c, at, *cnt, "replace count") : -1);
    }
    if (IS("find") || IS("rfind") || IS("count")) {
        if (!a0) jfail(c, at, "%s needs an argument", name);
        jval sub = need_str(c, at, *a0, name);
        if (IS("count")) {
            if (sub.u.s.n == 0) return jv_int((int64_t)jutf8_len(s.u.s.p, s.u.s.n) + 1);
            int64_t cnt = 0;
            size_t i = 0;
            const char *h;
            while ((h = memmem(s.u.s.p + i, s.u.s.n - i, sub.u.s.p, sub.u.s.n))) {
                cnt++;
                i = (size_t)(h - s.u.s.p) + sub.u.s.n;
            }
            return jv_int(cnt);
        }
        const char *hit = NULL;
        if (IS("find")) {
            hit = memmem(s.u.s.p, s.u.s.n, sub.u.s.p, sub.u.s.n);
        } else if (sub.u.s.n <= s.u.s.n) {
            for (size_t k = s.u.s.n - sub.u.s.n + 1; k-- > 0;)
                if (memcmp(s.u.s.p + k, sub.u.s.p, sub.u.s.n) == 0) {
                    hit = s.u.s.p + k;
                    break;
                }
        }
        return jv_int(hit ? (int64_t)jutf8_len(s.u.s.p, (size_t)(hit - s.u.s.p)) : -1);
    }
    if (IS("join")) {
        if (!a0) jfail(c, at, "join needs an iterable");
        jlist *l = jiter_list(c, at, *a0);
        jbuf b = {0};
        for (int32_t i = 0; i < l->n; i++) {
            if (i) jbuf_put(c, at, &b, s.u.s.p, s.u.s.n);
            jval x = need_str(c, at, l->v[i], "str.join item");
            jbuf_put(c, at, &b, x.u.s.p, x.u.s.n);
        }
        return jv_str(b.p ? b.p : "", b.n);
    }
    if (IS("format")) return str_format(c, at, s, a);
    if (IS("splitlines")) {
        jlist *l = jlist_new(c, at, 4);
        size_t i = 0;
        while (i < s.u.s.n) {
            const char *nl = memchr(s.u.s.p + i, '\n', s.u.s.n - i);
            size_t e = nl ? (size_t)(nl - s.u.s.p) : s.u.s.n;
            size_t ee = e > i && s.u.s.p[e - 1] == '\r' ? e - 1 : e;
            jlist_push(c, at, l, jv_str(s.u.s.p + i, ee - i));
            i = nl ? e + 1 : e;
        }
        return list_val(l);
    }
    if (IS("isdigit") || IS("isalpha") || IS("isalnum") || IS("isspace")) {
        if (s.u.s.n == 0) return jv_bool(0);
        size_t i = 0;
        while (i < s.u.s.n) {
            uint32_t cp = dec(s.u.s.p, s.u.s.n, &i);
            utf8proc_category_t cat = utf8proc_category((utf8proc_int32_t)cp);
            int digit = cat == UTF8PROC_CATEGORY_ND;
            int alpha = cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
            int ok = IS("isdigit")   ? digit
                     : IS("isalpha") ? alpha
                     : IS("isalnum") ? (digit || alpha)
                                     : py_space(cp);
            if (!ok) return jv_bool(0);
        }
        return jv_bool(1);
    }
    if (IS("islower") || IS("isupper")) return jv_bool(str_has_case(s, IS("isupper")));
#undef IS
    jfail(c, at, "%s.%s is not callable", jv_type_name(self), name);
}

/* ---- globals ---------------------------------------------------------------------- */

static const char *const GLOBALS[] = {"range",           "namespace",    "dict",
                                      "raise_exception", "strftime_now", NULL};

int jbuiltin_has_global(const char *name)
{
    return in_list(GLOBALS, name);
}

void jbuiltin_range(jctx *c, const jnode *at, const jval *pos, int32_t n, int64_t *ret_start,
                    int64_t *ret_step, int64_t *ret_count)
{
    if (n == 0 || n > 3) jfail(c, at, "range expected 1 to 3 arguments, got %d", n);
    int64_t start = 0, stop, step = 1;
    if (n == 1) {
        stop = need_int(c, at, pos[0], "range");
    } else {
        start = need_int(c, at, pos[0], "range");
        stop = need_int(c, at, pos[1], "range");
        if (n == 3) step = need_int(c, at, pos[2], "range");
    }
    if (step == 0) jfail(c, at, "range() arg 3 must not be zero");
    double count = step > 0 ? ceil(((double)stop - (double)start) / (double)step)
                            : ceil(((double)start - (double)stop) / (double)-step);
    if (count < 0) count = 0;
    if (count > (double)c->lim.max_steps || count > 1e8)
        jfail(c, at, "range of %.0f items exceeds the template limits", count);
    *ret_start = start;
    *ret_step = step;
    *ret_count = (int64_t)count;
}

jval jbuiltin_call(jctx *c, const jnode *at, jval fn, jval *pos, int32_t n, const char **kw_names,
                   jval *kw, int32_t n_kw)
{
    args a = {pos, n, kw_names, kw, n_kw};
    const char *name = fn.u.fn.name;
    if (fn.t == JV_METHOD) return call_method(c, at, *fn.u.fn.self, name, &a);
    if (strcmp(name, "raise_exception") == 0) {
        jval msg = n ? jv_to_str(c, at, pos[0]) : jv_cstr("raise_exception called");
        jfail(c, at, "%.*s", (int)(msg.u.s.n > 400 ? 400 : msg.u.s.n), msg.u.s.p);
    }
    if (strcmp(name, "range") == 0) {
        int64_t start, step, count;
        jbuiltin_range(c, at, pos, n, &start, &step, &count);
        jlist *l = jlist_new(c, at, (int32_t)count);
        for (int64_t i = 0; i < count; i++)
            l->v[l->n++] = jv_int(start + i * step);
        return list_val(l);
    }
    if (strcmp(name, "namespace") == 0 || strcmp(name, "dict") == 0) {
        jdict *d = jdict_new(c, at, n_kw + 4);
        for (int32_t i = 0; i < n; i++) {
            if (pos[i].t != JV_DICT && pos[i].t != JV_NS)
                jfail(c, at, "%s() positional arguments must be mappings", name);
            for (int32_t k = 0; k < pos[i].u.d->n; k++)
                jdict_set(c, at, d, pos[i].u.d->k[k], pos[i].u.d->v[k]);
        }
        for (int32_t k = 0; k < n_kw; k++)
            jdict_set(c, at, d, jv_cstr(kw_names[k]), kw[k]);
        return dict_val(d, strcmp(name, "namespace") == 0 ? JV_NS : JV_DICT);
    }
    if (strcmp(name, "strftime_now") == 0) {
        if (n != 1) jfail(c, at, "strftime_now takes one format string");
        jval f = need_str(c, at, jv_to_str(c, at, pos[0]), "strftime_now");
        char fmt[128], out[256];
        if (f.u.s.n >= sizeof fmt) jfail(c, at, "strftime_now: format too long");
        memcpy(fmt, f.u.s.p, f.u.s.n);
        fmt[f.u.s.n] = 0;
        time_t now = time(NULL);
        struct tm tmv;
        localtime_r(&now, &tmv);
        size_t k = strftime(out, sizeof out, fmt, &tmv);
        return jv_strdup(c, at, out, k);
    }
    jfail(c, at, "'%s' is not callable", name);
}
