/*
 * jinja_value.c: values of the Jinja interpreter and their Python
 * behaviour: truthiness, ==, ordering, str(), repr() and json.dumps(), so
 * that `{{ x }}`, `x|string` and `x|tojson` print what Python would.
 *
 * Values are small structs passed by value; strings, lists and dicts point
 * into the render arena (jinja_int.h). Strings are UTF-8 with a length;
 * Python's "length of a string" is its number of code points.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/jinja_int.h"

_Noreturn void jfail(jctx *c, const jnode *at, const char *fmt, ...)
{
    char msg[LM_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (at)
        lm_err_set(c->err, -EINVAL, "%s:%d:%d: %s", c->tmpl->name, at->line, at->col, msg);
    else
        lm_err_set(c->err, -EINVAL, "%s: %s", c->tmpl->name, msg);
    longjmp(c->fail, 1);
}

void *jalloc(jctx *c, const jnode *at, size_t n)
{
    void *p = jarena_alloc(&c->arena, n ? n : 1);
    if (!p) jfail(c, at, "template used more than %zu bytes of memory", c->lim.max_memory);
    return p;
}

/* ---- constructors --------------------------------------------------------- */

jval jv_undef(const char *name)
{
    jval v = {.t = JV_UNDEF};
    v.u.undef_name = name;
    return v;
}
jval jv_none(void)
{
    return (jval){.t = JV_NONE};
}
jval jv_bool(int b)
{
    jval v = {.t = JV_BOOL};
    v.u.b = b != 0;
    return v;
}
jval jv_int(int64_t i)
{
    jval v = {.t = JV_INT};
    v.u.i = i;
    return v;
}
jval jv_float(double f)
{
    jval v = {.t = JV_FLOAT};
    v.u.f = f;
    return v;
}
jval jv_str(const char *p, size_t n)
{
    jval v = {.t = JV_STR};
    v.u.s.p = p;
    v.u.s.n = n;
    return v;
}
jval jv_cstr(const char *p)
{
    return jv_str(p, strlen(p));
}
jval jv_strdup(jctx *c, const jnode *at, const char *p, size_t n)
{
    char *s = jalloc(c, at, n + 1);
    if (n) memcpy(s, p, n);
    s[n] = 0;
    return jv_str(s, n);
}

jlist *jlist_new(jctx *c, const jnode *at, int32_t cap)
{
    jlist *l = jalloc(c, at, sizeof *l);
    memset(l, 0, sizeof *l);
    if (cap > 0) {
        l->v = jalloc(c, at, sizeof(jval) * (size_t)cap);
        l->cap = cap;
    }
    return l;
}

void jlist_push(jctx *c, const jnode *at, jlist *l, jval v)
{
    if (l->n == l->cap) {
        if (l->cap > (1 << 28)) jfail(c, at, "list too long");
        int32_t cap = l->cap ? l->cap * 2 : 4;
        jval *nv = jalloc(c, at, sizeof(jval) * (size_t)cap);
        if (l->n) memcpy(nv, l->v, sizeof(jval) * (size_t)l->n);
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}

jdict *jdict_new(jctx *c, const jnode *at, int32_t cap)
{
    jdict *d = jalloc(c, at, sizeof *d);
    memset(d, 0, sizeof *d);
    if (cap > 0) {
        d->k = jalloc(c, at, sizeof(jval) * (size_t)cap);
        d->v = jalloc(c, at, sizeof(jval) * (size_t)cap);
        d->cap = cap;
    }
    return d;
}

jval *jdict_get(jdict *d, jval k)
{
    for (int32_t i = 0; i < d->n; i++)
        if (jv_equal(d->k[i], k)) return &d->v[i];
    return NULL;
}

jval *jdict_get_str(jdict *d, const char *key)
{
    size_t n = strlen(key);
    for (int32_t i = 0; i < d->n; i++)
        if (d->k[i].t == JV_STR && d->k[i].u.s.n == n && memcmp(d->k[i].u.s.p, key, n) == 0)
            return &d->v[i];
    return NULL;
}

void jdict_set(jctx *c, const jnode *at, jdict *d, jval k, jval v)
{
    jval *old = jdict_get(d, k);
    if (old) {
        *old = v;
        return;
    }
    if (d->n == d->cap) {
        int32_t cap = d->cap ? d->cap * 2 : 4;
        jval *nk = jalloc(c, at, sizeof(jval) * (size_t)cap);
        jval *nv = jalloc(c, at, sizeof(jval) * (size_t)cap);
        if (d->n) {
            memcpy(nk, d->k, sizeof(jval) * (size_t)d->n);
            memcpy(nv, d->v, sizeof(jval) * (size_t)d->n);
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = k;
    d->v[d->n] = v;
    d->n++;
}

/* ---- Python behaviour ----------------------------------------------------- */

const char *jv_type_name(jval v)
{
    switch (v.t) {
    case JV_UNDEF:
        return "Undefined";
    case JV_NONE:
        return "NoneType";
    case JV_BOOL:
        return "bool";
    case JV_INT:
        return "int";
    case JV_FLOAT:
        return "float";
    case JV_STR:
        return "str";
    case JV_LIST:
        return v.u.l->is_tuple ? "tuple" : "list";
    case JV_DICT:
        return "dict";
    case JV_NS:
        return "Namespace";
    case JV_LOOP:
        return "LoopContext";
    case JV_FUNC:
        return "function";
    case JV_METHOD:
        return "method";
    case JV_MACRO:
        return "Macro";
    }
    return "?";
}

int jv_truthy(jval v)
{
    switch (v.t) {
    case JV_UNDEF:
    case JV_NONE:
        return 0;
    case JV_BOOL:
        return v.u.b;
    case JV_INT:
        return v.u.i != 0;
    case JV_FLOAT:
        return v.u.f != 0.0;
    case JV_STR:
        return v.u.s.n != 0;
    case JV_LIST:
        return v.u.l->n != 0;
    case JV_DICT:
        return v.u.d->n != 0;
    default:
        return 1;
    }
}

static int is_num(jval v)
{
    return v.t == JV_INT || v.t == JV_FLOAT || v.t == JV_BOOL;
}
static double num_f(jval v)
{
    return v.t == JV_FLOAT ? v.u.f : v.t == JV_INT ? (double)v.u.i : (double)v.u.b;
}
static int64_t num_i(jval v)
{
    return v.t == JV_INT ? v.u.i : (int64_t)v.u.b;
}

int jv_equal(jval a, jval b)
{
    if (is_num(a) && is_num(b)) {
        if (a.t == JV_FLOAT || b.t == JV_FLOAT) return num_f(a) == num_f(b);
        return num_i(a) == num_i(b);
    }
    if (a.t != b.t) {
        /* list and tuple never compare equal in Python */
        return 0;
    }
    switch (a.t) {
    case JV_UNDEF:
    case JV_NONE:
        return 1;
    case JV_STR:
        return a.u.s.n == b.u.s.n && memcmp(a.u.s.p, b.u.s.p, a.u.s.n) == 0;
    case JV_LIST:
        if (a.u.l->is_tuple != b.u.l->is_tuple || a.u.l->n != b.u.l->n) return 0;
        for (int32_t i = 0; i < a.u.l->n; i++)
            if (!jv_equal(a.u.l->v[i], b.u.l->v[i])) return 0;
        return 1;
    case JV_DICT:
    case JV_NS:
        if (a.t == JV_NS) return a.u.d == b.u.d;
        if (a.u.d->n != b.u.d->n) return 0;
        for (int32_t i = 0; i < a.u.d->n; i++) {
            jval *o = jdict_get(b.u.d, a.u.d->k[i]);
            if (!o || !jv_equal(a.u.d->v[i], *o)) return 0;
        }
        return 1;
    case JV_LOOP:
        return a.u.loop == b.u.loop;
    case JV_MACRO:
        return a.u.macro == b.u.macro;
    case JV_FUNC:
    case JV_METHOD:
        return a.u.fn.name == b.u.fn.name && a.u.fn.self == b.u.fn.self;
    default:
        return 0;
    }
}

int jv_compare(jctx *c, const jnode *at, jval a, jval b)
{
    if (is_num(a) && is_num(b)) {
        if (a.t == JV_FLOAT || b.t == JV_FLOAT) {
            double x = num_f(a), y = num_f(b);
            return x < y ? -1 : x > y ? 1 : 0;
        }
        int64_t x = num_i(a), y = num_i(b);
        return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a.t == JV_STR && b.t == JV_STR) {
        /* UTF-8 byte order is code point order */
        size_t n = a.u.s.n < b.u.s.n ? a.u.s.n : b.u.s.n;
        int r = memcmp(a.u.s.p, b.u.s.p, n);
        if (r) return r < 0 ? -1 : 1;
        return a.u.s.n < b.u.s.n ? -1 : a.u.s.n > b.u.s.n ? 1 : 0;
    }
    if (a.t == JV_LIST && b.t == JV_LIST && a.u.l->is_tuple == b.u.l->is_tuple) {
        int32_t n = a.u.l->n < b.u.l->n ? a.u.l->n : b.u.l->n;
        for (int32_t i = 0; i < n; i++) {
            if (jv_equal(a.u.l->v[i], b.u.l->v[i])) continue;
            return jv_compare(c, at, a.u.l->v[i], b.u.l->v[i]);
        }
        return a.u.l->n < b.u.l->n ? -1 : a.u.l->n > b.u.l->n ? 1 : 0;
    }
    if (a.t == JV_UNDEF || b.t == JV_UNDEF) {
        jval u = a.t == JV_UNDEF ? a : b;
        jfail(c, at, "'%s' is undefined", u.u.undef_name ? u.u.undef_name : "value");
    }
    jfail(c, at, "'<' not supported between instances of '%s' and '%s'", jv_type_name(a),
          jv_type_name(b));
}

jval jv_from_json(jctx *c, const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        jdict *d = jdict_new(c, NULL, (int32_t)json_object_size(j));
        const char *key;
        json_t *val;
        /* jansson keeps insertion order, as Python dicts do */
        json_object_foreach((json_t *)j, key, val)
        {
            jval k = jv_strdup(c, NULL, key, strlen(key));
            d->k[d->n] = k;
            d->v[d->n] = jv_from_json(c, val);
            d->n++;
        }
        jval v = {.t = JV_DICT};
        v.u.d = d;
        return v;
    }
    case JSON_ARRAY: {
        jlist *l = jlist_new(c, NULL, (int32_t)json_array_size(j));
        size_t i;
        json_t *val;
        json_array_foreach(j, i, val) l->v[l->n++] = jv_from_json(c, val);
        jval v = {.t = JV_LIST};
        v.u.l = l;
        return v;
    }
    case JSON_STRING:
        return jv_strdup(c, NULL, json_string_value(j), json_string_length(j));
    case JSON_INTEGER:
        return jv_int((int64_t)json_integer_value(j));
    case JSON_REAL:
        return jv_float(json_real_value(j));
    case JSON_TRUE:
        return jv_bool(1);
    case JSON_FALSE:
        return jv_bool(0);
    default:
        return jv_none();
    }
}

/* ---- output buffers ------------------------------------------------------- */

void jbuf_put(jctx *c, const jnode *at, jbuf *b, const char *p, size_t n)
{
    if (n == 0) return;
    if (b == c->out && c->out_total + n > c->lim.max_output)
        jfail(c, at, "rendered text exceeds the limit of %zu bytes", c->lim.max_output);
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->n + n)
            cap *= 2;
        char *np = jalloc(c, at, cap);
        if (b->n) memcpy(np, b->p, b->n);
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
    if (b == c->out) c->out_total += n;
}

void jbuf_putc(jctx *c, const jnode *at, jbuf *b, char ch)
{
    jbuf_put(c, at, b, &ch, 1);
}

static void jbuf_puts(jctx *c, const jnode *at, jbuf *b, const char *s)
{
    jbuf_put(c, at, b, s, strlen(s));
}

/* Python's float repr: the shortest digits that round-trip. */
void jfloat_repr(double f, char *buf, size_t cap)
{
    if (isnan(f)) {
        snprintf(buf, cap, "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(buf, cap, f < 0 ? "-inf" : "inf");
        return;
    }
    char tmp[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f) break;
    }
    /* tmp = d.ddde[+-]XX ; Python uses positional notation for 1e-4 <= |f| < 1e16 */
    char *e = strchr(tmp, 'e');
    int exp10 = atoi(e + 1);
    char digits[24];
    size_t nd = 0;
    int neg = tmp[0] == '-';
    for (char *p = tmp + neg; p < e; p++)
        if (*p != '.') digits[nd++] = *p;
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = 0;
    size_t o = 0;
    char out[64];
    if (neg) out[o++] = '-';
    if (exp10 >= -4 && exp10 < 16) {
        if (exp10 < 0) {
            out[o++] = '0';
            out[o++] = '.';
            for (int z = 0; z < -exp10 - 1; z++)
                out[o++] = '0';
            for (size_t k = 0; k < nd; k++)
                out[o++] = digits[k];
        } else {
            for (int k = 0; k <= exp10; k++)
                out[o++] = (size_t)k < nd ? digits[k] : '0';
            out[o++] = '.';
            if ((size_t)exp10 + 1 < nd)
                for (size_t k = (size_t)exp10 + 1; k < nd; k++)
                    out[o++] = digits[k];
            else
                out[o++] = '0';
        }
        out[o] = 0;
    } else {
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (size_t k = 1; k < nd; k++)
                out[o++] = digits[k];
        }
        o += (size_t)snprintf(out + o, sizeof out - o, "e%c%02d", exp10 < 0 ? '-' : '+',
                              exp10 < 0 ? -exp10 : exp10);
    }
    snprintf(buf, cap, "%s", out);
}

static void put_repr_str(jctx *c, const jnode *at, jbuf *b, const char *p, size_t n)
{
    int has_sq = memchr(p, '\'', n) != NULL, has_dq = memchr(p, '"', n) != NULL;
    char q = has_sq && !has_dq ? '"' : '\'';
    jbuf_putc(c, at, b, q);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)p[i];
        char esc[8];
        if (ch == '\\' || ch == (unsigned char)q) {
            esc[0] = '\\';
            esc[1] = (char)ch;
            jbuf_put(c, at, b, esc, 2);
        } else if (ch == '\n') {
            jbuf_puts(c, at, b, "\\n");
        } else if (ch == '\r') {
            jbuf_puts(c, at, b, "\\r");
        } else if (ch == '\t') {
            jbuf_puts(c, at, b, "\\t");
        } else if (ch < 0x20 || ch == 0x7f) {
            snprintf(esc, sizeof esc, "\\x%02x", ch);
            jbuf_puts(c, at, b, esc);
        } else {
            jbuf_putc(c, at, b, (char)ch);
        }
    }
    jbuf_putc(c, at, b, q);
}

void jv_repr_into(jctx *c, const jnode *at, jbuf *b, jval v)
{
    char num[64];
    switch (v.t) {
    case JV_STR:
        put_repr_str(c, at, b, v.u.s.p, v.u.s.n);
        return;
    case JV_LIST: {
        jlist *l = v.u.l;
        jbuf_putc(c, at, b, l->is_tuple ? '(' : '[');
        for (int32_t i = 0; i < l->n; i++) {
            if (i) jbuf_puts(c, at, b, ", ");
            jv_repr_into(c, at, b, l->v[i]);
        }
        if (l->is_tuple && l->n == 1) jbuf_putc(c, at, b, ',');
        jbuf_putc(c, at, b, l->is_tuple ? ')' : ']');
        return;
    }
    case JV_DICT:
    case JV_NS: {
        jdict *d = v.u.d;
        if (v.t == JV_NS) jbuf_puts(c, at, b, "<Namespace ");
        jbuf_putc(c, at, b, '{');
        for (int32_t i = 0; i < d->n; i++) {
            if (i) jbuf_puts(c, at, b, ", ");
            jv_repr_into(c, at, b, d->k[i]);
            jbuf_puts(c, at, b, ": ");
            jv_repr_into(c, at, b, d->v[i]);
        }
        jbuf_putc(c, at, b, '}');
        if (v.t == JV_NS) jbuf_putc(c, at, b, '>');
        return;
    }
    case JV_UNDEF:
        return; /* str(Undefined) is "" */
    case JV_NONE:
        jbuf_puts(c, at, b, "None");
        return;
    case JV_BOOL:
        jbuf_puts(c, at, b, v.u.b ? "True" : "False");
        return;
    case JV_INT:
        snprintf(num, sizeof num, "%lld", (long long)v.u.i);
        jbuf_puts(c, at, b, num);
        return;
    case JV_FLOAT:
        jfloat_repr(v.u.f, num, sizeof num);
        jbuf_puts(c, at, b, num);
        return;
    default:
        snprintf(num, sizeof num, "<%s>", jv_type_name(v));
        jbuf_puts(c, at, b, num);
        return;
    }
}

void jv_str_into(jctx *c, const jnode *at, jbuf *b, jval v)
{
    if (v.t == JV_STR)
        jbuf_put(c, at, b, v.u.s.p, v.u.s.n);
    else
        jv_repr_into(c, at, b, v);
}

jval jv_to_str(jctx *c, const jnode *at, jval v)
{
    if (v.t == JV_STR) return v;
    jbuf b = {0};
    jv_str_into(c, at, &b, v);
    return jv_str(b.p ? b.p : "", b.n);
}

/* ---- json.dumps ------------------------------------------------------------ */

static uint32_t utf8_next(const char *p, size_t n, size_t *i)
{
    unsigned char ch = (unsigned char)p[*i];
    uint32_t cp;
    int extra;
    if (ch < 0x80) {
        (*i)++;
        return ch;
    } else if ((ch & 0xE0) == 0xC0) {
        cp = ch & 0x1F;
        extra = 1;
    } else if ((ch & 0xF0) == 0xE0) {
        cp = ch & 0x0F;
        extra = 2;
    } else {
        cp = ch & 0x07;
        extra = 3;
    }
    (*i)++;
    for (int k = 0; k < extra && *i < n; k++)
        cp = (cp << 6) | ((unsigned char)p[(*i)++] & 0x3F);
    return cp;
}

static void put_json_str(jctx *c, const jnode *at, jbuf *b, const char *p, size_t n,
                         int ensure_ascii)
{
    jbuf_putc(c, at, b, '"');
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        uint32_t cp = utf8_next(p, n, &i);
        char esc[16];
        switch (cp) {
        case '"':
            jbuf_puts(c, at, b, "\\\"");
            continue;
        case '\\':
            jbuf_puts(c, at, b, "\\\\");
            continue;
        case '\n':
            jbuf_puts(c, at, b, "\\n");
            continue;
        case '\r':
            jbuf_puts(c, at, b, "\\r");
            continue;
        case '\t':
            jbuf_puts(c, at, b, "\\t");
            continue;
        case '\b':
            jbuf_puts(c, at, b, "\\b");
            continue;
        case '\f':
            jbuf_puts(c, at, b, "\\f");
            continue;
        default:
            break;
        }
        if (cp < 0x20 || (ensure_ascii && cp > 0x7e)) {
            if (cp >= 0x10000) {
                uint32_t v = cp - 0x10000;
                snprintf(esc, sizeof esc, "\\u%04x\\u%04x", 0xD800 + (v >> 10),
                         0xDC00 + (v & 0x3FF));
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", cp);
            }
            jbuf_puts(c, at, b, esc);
        } else {
            jbuf_put(c, at, b, p + start, i - start);
        }
    }
    jbuf_putc(c, at, b, '"');
}

static void put_newline_indent(jctx *c, const jnode *at, jbuf *b, int indent, int level)
{
    jbuf_putc(c, at, b, '\n');
    for (int i = 0; i < indent * level; i++)
        jbuf_putc(c, at, b, ' ');
}

static int cmp_keys(const void *a, const void *b)
{
    const jval *x = *(const jval *const *)a, *y = *(const jval *const *)b;
    size_t n = x->u.s.n < y->u.s.n ? x->u.s.n : y->u.s.n;
    int r = memcmp(x->u.s.p, y->u.s.p, n);
    if (r) return r;
    return x->u.s.n < y->u.s.n ? -1 : x->u.s.n > y->u.s.n;
}

void jv_json_into(jctx *c, const jnode *at, jbuf *b, jval v, int ensure_ascii, int indent,
                  const char *item_sep, const char *key_sep, int sort_keys, int level)
{
    char num[64];
    if (level > 200) jfail(c, at, "tojson: value nested too deeply");
    switch (v.t) {
    case JV_NONE:
        jbuf_puts(c, at, b, "null");
        return;
    case JV_BOOL:
        jbuf_puts(c, at, b, v.u.b ? "true" : "false");
        return;
    case JV_INT:
        snprintf(num, sizeof num, "%lld", (long long)v.u.i);
        jbuf_puts(c, at, b, num);
        return;
    case JV_FLOAT:
        if (isnan(v.u.f))
            snprintf(num, sizeof num, "NaN");
        else if (isinf(v.u.f))
            snprintf(num, sizeof num, v.u.f < 0 ? "-Infinity" : "Infinity");
        else
            jfloat_repr(v.u.f, num, sizeof num);
        jbuf_puts(c, at, b, num);
        return;
    case JV_STR:
        put_json_str(c, at, b, v.u.s.p, v.u.s.n, ensure_ascii);
        return;
    case JV_LIST: {
        jlist *l = v.u.l;
        if (l->n == 0) {
            jbuf_puts(c, at, b, "[]");
            return;
        }
        jbuf_putc(c, at, b, '[');
        for (int32_t i = 0; i < l->n; i++) {
            if (i) jbuf_puts(c, at, b, item_sep);
            if (indent >= 0) put_newline_indent(c, at, b, indent, level + 1);
            jv_json_into(c, at, b, l->v[i], ensure_ascii, indent, item_sep, key_sep, sort_keys,
                         level + 1);
        }
        if (indent >= 0) put_newline_indent(c, at, b, indent, level);
        jbuf_putc(c, at, b, ']');
        return;
    }
    case JV_DICT: {
        jdict *d = v.u.d;
        if (d->n == 0) {
            jbuf_puts(c, at, b, "{}");
            return;
        }
        /* keys as json.dumps converts them: str as is, numbers/bools/None to text */
        jval *keys = jalloc(c, at, sizeof(jval) * (size_t)d->n);
        jval **order = jalloc(c, at, sizeof(jval *) * (size_t)d->n);
        for (int32_t i = 0; i < d->n; i++) {
            jval k = d->k[i];
            if (k.t == JV_BOOL)
                k = jv_cstr(k.u.b ? "true" : "false");
            else if (k.t == JV_NONE)
                k = jv_cstr("null");
            else if (k.t == JV_INT || k.t == JV_FLOAT)
                k = jv_to_str(c, at, k);
            else if (k.t != JV_STR)
                jfail(c, at, "tojson: keys must be str, int, float, bool or None, not %s",
                      jv_type_name(k));
            keys[i] = k;
            order[i] = &keys[i];
        }
        if (sort_keys) qsort(order, (size_t)d->n, sizeof(jval *), cmp_keys);
        jbuf_putc(c, at, b, '{');
        for (int32_t i = 0; i < d->n; i++) {
            int32_t idx = (int32_t)(order[i] - keys);
            if (i) jbuf_puts(c, at, b, item_sep);
            if (indent >= 0) put_newline_indent(c, at, b, indent, level + 1);
            put_json_str(c, at, b, keys[idx].u.s.p, keys[idx].u.s.n, ensure_ascii);
            jbuf_puts(c, at, b, key_sep);
            jv_json_into(c, at, b, d->v[idx], ensure_ascii, indent, item_sep, key_sep, sort_keys,
                         level + 1);
        }
        if (indent >= 0) put_newline_indent(c, at, b, indent, level);
        jbuf_putc(c, at, b, '}');
        return;
    }
    case JV_UNDEF:
        jfail(c, at, "tojson: '%s' is undefined", v.u.undef_name ? v.u.undef_name : "value");
    default:
        jfail(c, at, "tojson: object of type %s is not JSON serializable", jv_type_name(v));
    }
}

/* ---- UTF-8 ------------------------------------------------------------------ */

size_t jutf8_len(const char *p, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)p[i] & 0xC0) != 0x80) k++;
    return k;
}

size_t jutf8_offset(const char *p, size_t n, size_t idx)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (((unsigned char)p[i] & 0xC0) != 0x80) {
            if (k == idx) return i;
            k++;
        }
    }
    return n;
}
