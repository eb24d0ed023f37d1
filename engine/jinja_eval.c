/*
 * jinja_eval.c: the evaluator of the Jinja interpreter (jinja.h) and its
 * public entry points.
 *
 * Scoping follows jinja2: a for loop and a macro call open a scope (what
 * `set` writes inside them is gone after them, which is why templates use
 * namespace()); if blocks do not. The `loop` variable is the innermost
 * loop's. Names not found are Undefined, which prints as "" and is false
 * but fails when used in arithmetic, attribute access or calls, naming the
 * undefined variable.
 *
 * Limits (jinja_limits) are checked where a template could make the
 * interpreter work or allocate without bound: every loop iteration and
 * macro call counts a step, the arena refuses allocations past max_memory,
 * the output refuses bytes past max_output, macro recursion is bounded.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/jinja_int.h"

/* ---- scopes ----------------------------------------------------------------- */

static jscope *scope_push(jctx *c, const jnode *at, jscope *parent)
{
    jscope *s = jalloc(c, at, sizeof *s);
    memset(s, 0, sizeof *s);
    s->parent = parent;
    return s;
}

static void scope_set(jctx *c, const jnode *at, jscope *s, const char *name, jval v)
{
    for (int32_t i = 0; i < s->n; i++)
        if (strcmp(s->vars[i].name, name) == 0) {
            s->vars[i].v = v;
            return;
        }
    if (s->n == s->cap) {
        int32_t cap = s->cap ? s->cap * 2 : 8;
        jvar *nv = jalloc(c, at, sizeof(jvar) * (size_t)cap);
        if (s->n) memcpy(nv, s->vars, sizeof(jvar) * (size_t)s->n);
        s->vars = nv;
        s->cap = cap;
    }
    s->vars[s->n].name = name;
    s->vars[s->n].v = v;
    s->n++;
}

static jval lookup(jctx *c, const char *name)
{
    for (jscope *s = c->scope; s; s = s->parent)
        for (int32_t i = s->n - 1; i >= 0; i--)
            if (strcmp(s->vars[i].name, name) == 0) return s->vars[i].v;
    if (jbuiltin_has_global(name)) {
        jval f = {.t = JV_FUNC};
        f.u.fn.name = name;
        return f;
    }
    return jv_undef(name);
}

void jcount_step(jctx *c, const jnode *at)
{
    if (++c->steps > c->lim.max_steps)
        jfail(c, at, "template ran more than %llu loop iterations and calls",
              (unsigned long long)c->lim.max_steps);
}

_Noreturn static void fail_undef(jctx *c, const jnode *at, jval v)
{
    if (v.u.undef_name) jfail(c, at, "'%s' is undefined", v.u.undef_name);
    jfail(c, at, "use of an undefined value");
}

/* ---- iteration -------------------------------------------------------------- */

jlist *jiter_list(jctx *c, const jnode *at, jval v)
{
    switch (v.t) {
    case JV_LIST:
        return v.u.l;
    case JV_UNDEF:
        return jlist_new(c, at, 0);
    case JV_DICT:
    case JV_NS: {
        jlist *l = jlist_new(c, at, v.u.d->n);
        for (int32_t i = 0; i < v.u.d->n; i++)
            l->v[l->n++] = v.u.d->k[i];
        return l;
    }
    case JV_STR: {
        jlist *l = jlist_new(c, at, (int32_t)jutf8_len(v.u.s.p, v.u.s.n));
        size_t i = 0;
        while (i < v.u.s.n) {
            size_t j = i + 1;
            while (j < v.u.s.n && ((unsigned char)v.u.s.p[j] & 0xC0) == 0x80)
                j++;
            l->v[l->n++] = jv_str(v.u.s.p + i, j - i);
            i = j;
        }
        return l;
    }
    default:
        jfail(c, at, "'%s' object is not iterable", jv_type_name(v));
    }
}

/* ---- items and slices ------------------------------------------------------- */

jval jeval_getitem(jctx *c, const jnode *at, jval obj, jval key)
{
    switch (obj.t) {
    case JV_UNDEF:
        fail_undef(c, at, obj);
    case JV_DICT:
    case JV_NS: {
        jval *v = jdict_get(obj.u.d, key);
        if (v) return *v;
        break;
    }
    case JV_LIST:
    case JV_STR: {
        if (key.t != JV_INT && key.t != JV_BOOL) break;
        int64_t i = key.t == JV_INT ? key.u.i : key.u.b;
        if (obj.t == JV_LIST) {
            int64_t n = obj.u.l->n;
            if (i < 0) i += n;
            if (i >= 0 && i < n) return obj.u.l->v[i];
        } else {
            int64_t n = (int64_t)jutf8_len(obj.u.s.p, obj.u.s.n);
            if (i < 0) i += n;
            if (i >= 0 && i < n) {
                size_t o = jutf8_offset(obj.u.s.p, obj.u.s.n, (size_t)i);
                size_t e = jutf8_offset(obj.u.s.p, obj.u.s.n, (size_t)i + 1);
                return jv_str(obj.u.s.p + o, e - o);
            }
        }
        return jv_undef(NULL);
    }
    case JV_LOOP:
        break;
    default:
        break;
    }
    /* jinja2 falls back to attribute lookup for string keys */
    if (key.t == JV_STR) {
        char name[128];
        size_t n = key.u.s.n < sizeof name - 1 ? key.u.s.n : sizeof name - 1;
        memcpy(name, key.u.s.p, n);
        name[n] = 0;
        if (name[0] == '_')
            jfail(c, at, "access to attribute '%s' of a %s is not allowed", name,
                  jv_type_name(obj));
        if (obj.t == JV_DICT || obj.t == JV_NS) {
            /* d['items'] is the key only; methods are reached with '.' */
            return jv_undef(NULL);
        }
        char *keep = jalloc(c, at, n + 1);
        memcpy(keep, name, n + 1);
        return jbuiltin_getattr(c, at, obj, keep);
    }
    return jv_undef(NULL);
}

static int64_t slice_arg(jctx *c, const jnode *at, const jnode *n, int *present)
{
    *present = 0;
    if (!n) return 0;
    jval v = jeval(c, n);
    if (v.t == JV_NONE) return 0;
    if (v.t != JV_INT && v.t != JV_BOOL)
        jfail(c, at, "slice indices must be integers or None, not %s", jv_type_name(v));
    *present = 1;
    return v.t == JV_INT ? v.u.i : v.u.b;
}

/* Python's PySlice_AdjustIndices; returns the number of items. */
static int64_t slice_adjust(int64_t n, int has_start, int64_t *start, int has_stop, int64_t *stop,
                            int64_t step)
{
    if (!has_start) {
        *start = step < 0 ? n - 1 : 0;
    } else if (*start < 0) {
        *start += n;
        if (*start < 0) *start = step < 0 ? -1 : 0;
    } else if (*start >= n) {
        *start = step < 0 ? n - 1 : n;
    }
    if (!has_stop) {
        *stop = step < 0 ? -1 : n;
    } else if (*stop < 0) {
        *stop += n;
        if (*stop < 0) *stop = step < 0 ? -1 : 0;
    } else if (*stop >= n) {
        *stop = step < 0 ? n - 1 : n;
    }
    if (step < 0) return *stop < *start ? (*start - *stop - 1) / (-step) + 1 : 0;
    return *start < *stop ? (*stop - *start - 1) / step + 1 : 0;
}

static jval eval_slice(jctx *c, const jnode *n)
{
    jval obj = jeval(c, n->a);
    int hs, he, hp;
    int64_t start = slice_arg(c, n, n->b, &hs);
    int64_t stop = slice_arg(c, n, n->c, &he);
    int64_t step = slice_arg(c, n, n->d, &hp);
    if (!hp) step = 1;
    if (step == 0) jfail(c, n, "slice step cannot be zero");
    if (obj.t == JV_UNDEF) fail_undef(c, n, obj);
    if (obj.t == JV_LIST) {
        int64_t cnt = slice_adjust(obj.u.l->n, hs, &start, he, &stop, step);
        jlist *l = jlist_new(c, n, (int32_t)cnt);
        l->is_tuple = obj.u.l->is_tuple;
        for (int64_t k = 0, i = start; k < cnt; k++, i += step)
            l->v[l->n++] = obj.u.l->v[i];
        jval r = {.t = JV_LIST};
        r.u.l = l;
        return r;
    }
    if (obj.t == JV_STR) {
        const char *p = obj.u.s.p;
        size_t len = obj.u.s.n;
        int64_t ncp = (int64_t)jutf8_len(p, len);
        /* code point start offsets, [ncp + 1] */
        size_t *off = jalloc(c, n, sizeof(size_t) * (size_t)(ncp + 1));
        int64_t k = 0;
        for (size_t i = 0; i < len; i++)
            if (((unsigned char)p[i] & 0xC0) != 0x80) off[k++] = i;
        off[ncp] = len;
        int64_t cnt = slice_adjust(ncp, hs, &start, he, &stop, step);
        if (step == 1) return jv_str(p + off[start], cnt ? off[start + cnt] - off[start] : 0);
        jbuf b = {0};
        for (int64_t j = 0, i = start; j < cnt; j++, i += step)
            jbuf_put(c, n, &b, p + off[i], off[i + 1] - off[i]);
        return jv_str(b.p ? b.p : "", b.n);
    }
    jfail(c, n, "'%s' object is not subscriptable", jv_type_name(obj));
}

/* ---- operators ---------------------------------------------------------------- */

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

static const char *op_name(int op)
{
    switch (op) {
    case JOP_ADD:
        return "+";
    case JOP_SUB:
        return "-";
    case JOP_MUL:
        return "*";
    case JOP_DIV:
        return "/";
    case JOP_FLOORDIV:
        return "//";
    case JOP_MOD:
        return "%";
    case JOP_POW:
        return "**";
    default:
        return "?";
    }
}

static jval repeat(jctx *c, const jnode *at, jval seq, int64_t times)
{
    if (times < 0) times = 0;
    if (seq.t == JV_STR) {
        if (seq.u.s.n && (uint64_t)times > c->lim.max_output / seq.u.s.n)
            jfail(c, at, "string repetition of %lld copies is too large", (long long)times);
        size_t total = seq.u.s.n * (size_t)times;
        char *p = jalloc(c, at, total + 1);
        for (int64_t i = 0; i < times; i++)
            memcpy(p + (size_t)i * seq.u.s.n, seq.u.s.p, seq.u.s.n);
        return jv_str(p, total);
    }
    jlist *src = seq.u.l;
    if (src->n && times > (1 << 24) / src->n)
        jfail(c, at, "list repetition of %lld copies is too large", (long long)times);
    jlist *l = jlist_new(c, at, (int32_t)(src->n * times));
    l->is_tuple = src->is_tuple;
    for (int64_t i = 0; i < times; i++)
        for (int32_t k = 0; k < src->n; k++)
            l->v[l->n++] = src->v[k];
    jval r = {.t = JV_LIST};
    r.u.l = l;
    return r;
}

static jval binop(jctx *c, const jnode *at, int op, jval a, jval b)
{
    if (op == JOP_CONCAT) {
        jbuf buf = {0};
        jv_str_into(c, at, &buf, a);
        jv_str_into(c, at, &buf, b);
        return jv_str(buf.p ? buf.p : "", buf.n);
    }
    if (a.t == JV_UNDEF) fail_undef(c, at, a);
    if (b.t == JV_UNDEF) fail_undef(c, at, b);
    if (is_num(a) && is_num(b)) {
        int fl = a.t == JV_FLOAT || b.t == JV_FLOAT;
        int64_t x = num_i(a), y = num_i(b), r;
        double fx = num_f(a), fy = num_f(b);
        switch (op) {
        case JOP_ADD:
            if (fl) return jv_float(fx + fy);
            if (__builtin_add_overflow(x, y, &r)) jfail(c, at, "integer overflow in +");
            return jv_int(r);
        case JOP_SUB:
            if (fl) return jv_float(fx - fy);
            if (__builtin_sub_overflow(x, y, &r)) jfail(c, at, "integer overflow in -");
            return jv_int(r);
        case JOP_MUL:
            if (fl) return jv_float(fx * fy);
            if (__builtin_mul_overflow(x, y, &r)) jfail(c, at, "integer overflow in *");
            return jv_int(r);
        case JOP_DIV:
            if (fy == 0.0) jfail(c, at, "division by zero");
            return jv_float(fx / fy);
        case JOP_FLOORDIV:
        case JOP_MOD:
            if (fl) {
                if (fy == 0.0) jfail(c, at, "float division by zero");
                double q = floor(fx / fy);
                if (op == JOP_FLOORDIV) return jv_float(q);
                double m = fmod(fx, fy);
                if (m != 0.0 && ((m < 0) != (fy < 0))) m += fy;
                return jv_float(m);
            }
            if (y == 0) jfail(c, at, "integer division or modulo by zero");
            if (x == INT64_MIN && y == -1) jfail(c, at, "integer overflow in %s", op_name(op));
            {
                int64_t q = x / y, m = x % y;
                if (m != 0 && ((m < 0) != (y < 0))) {
                    q -= 1;
                    m += y;
                }
                return jv_int(op == JOP_FLOORDIV ? q : m);
            }
        case JOP_POW:
            if (!fl && y >= 0) {
                int64_t acc = 1, base = x;
                for (int64_t e = y; e > 0; e--)
                    if (__builtin_mul_overflow(acc, base, &acc))
                        jfail(c, at, "integer overflow in **");
                return jv_int(acc);
            }
            return jv_float(pow(fx, fy));
        }
    }
    if (op == JOP_ADD && a.t == JV_STR && b.t == JV_STR) {
        size_t n = a.u.s.n + b.u.s.n;
        char *p = jalloc(c, at, n + 1);
        memcpy(p, a.u.s.p, a.u.s.n);
        memcpy(p + a.u.s.n, b.u.s.p, b.u.s.n);
        return jv_str(p, n);
    }
    if (op == JOP_ADD && a.t == JV_LIST && b.t == JV_LIST && a.u.l->is_tuple == b.u.l->is_tuple) {
        jlist *l = jlist_new(c, at, a.u.l->n + b.u.l->n);
        l->is_tuple = a.u.l->is_tuple;
        memcpy(l->v, a.u.l->v, sizeof(jval) * (size_t)a.u.l->n);
        memcpy(l->v + a.u.l->n, b.u.l->v, sizeof(jval) * (size_t)b.u.l->n);
        l->n = a.u.l->n + b.u.l->n;
        jval r = {.t = JV_LIST};
        r.u.l = l;
        return r;
    }
    if (op == JOP_MUL && (a.t == JV_STR || a.t == JV_LIST) && (b.t == JV_INT || b.t == JV_BOOL))
        return repeat(c, at, a, num_i(b));
    if (op == JOP_MUL && (b.t == JV_STR || b.t == JV_LIST) && (a.t == JV_INT || a.t == JV_BOOL))
        return repeat(c, at, b, num_i(a));
    if (op == JOP_MOD && a.t == JV_STR) {
        /* 'fmt' % x or 'fmt' % (x, y) */
        if (b.t == JV_LIST && b.u.l->is_tuple)
            return jbuiltin_percent(c, at, a, b.u.l->v, b.u.l->n);
        return jbuiltin_percent(c, at, a, &b, 1);
    }
    jfail(c, at, "unsupported operand type(s) for %s: '%s' and '%s'", op_name(op), jv_type_name(a),
          jv_type_name(b));
}

static int contains(jctx *c, const jnode *at, jval container, jval item)
{
    switch (container.t) {
    case JV_STR:
        if (item.t != JV_STR)
            jfail(c, at, "'in <string>' requires string as left operand, not %s",
                  jv_type_name(item));
        if (item.u.s.n == 0) return 1;
        return memmem(container.u.s.p, container.u.s.n, item.u.s.p, item.u.s.n) != NULL;
    case JV_LIST:
        for (int32_t i = 0; i < container.u.l->n; i++)
            if (jv_equal(container.u.l->v[i], item)) return 1;
        return 0;
    case JV_DICT:
    case JV_NS:
        return jdict_get(container.u.d, item) != NULL;
    case JV_UNDEF:
        return 0;
    default:
        jfail(c, at, "argument of type '%s' is not iterable", jv_type_name(container));
    }
}

static int compare_op(jctx *c, const jnode *at, int op, jval a, jval b)
{
    switch (op) {
    case JOP_EQ:
        return jv_equal(a, b);
    case JOP_NE:
        return !jv_equal(a, b);
    case JOP_LT:
        return jv_compare(c, at, a, b) < 0;
    case JOP_LE:
        return jv_compare(c, at, a, b) <= 0;
    case JOP_GT:
        return jv_compare(c, at, a, b) > 0;
    case JOP_GE:
        return jv_compare(c, at, a, b) >= 0;
    case JOP_IN:
        return contains(c, at, b, a);
    case JOP_NOTIN:
        return !contains(c, at, b, a);
    }
    return 0;
}

/* ---- calls ---------------------------------------------------------------------- */

typedef struct call_args {
    jval *pos;
    int32_t n;
    const char **kw_names;
    jval *kw;
    int32_t n_kw;
} call_args;

static call_args eval_args(jctx *c, const jnode *n)
{
    call_args a = {0};
    a.n = n->n_args;
    a.n_kw = n->n_kw;
    a.kw_names = n->kw_names;
    if (a.n) {
        a.pos = jalloc(c, n, sizeof(jval) * (size_t)a.n);
        for (int32_t i = 0; i < a.n; i++)
            a.pos[i] = jeval(c, n->args[i]);
    }
    if (a.n_kw) {
        a.kw = jalloc(c, n, sizeof(jval) * (size_t)a.n_kw);
        for (int32_t i = 0; i < a.n_kw; i++)
            a.kw[i] = jeval(c, n->kw[i]);
    }
    return a;
}

static void exec_body(jctx *c, const jnode *body);

jval jcall_macro(jctx *c, const jnode *at, const jnode *m, jval *args, int32_t n,
                 const char **kw_names, jval *kw, int32_t n_kw)
{
    jcount_step(c, at);
    if (c->depth >= c->lim.max_depth)
        jfail(c, at, "macro calls nested deeper than %d", c->lim.max_depth);
    if (n > m->n_names)
        jfail(c, at, "macro '%s' takes %d arguments, %d given", m->name, m->n_names, n);
    jscope *saved_scope = c->scope;
    jbuf *saved_out = c->out;
    jscope *s = scope_push(c, at, c->globals);
    for (int32_t i = 0; i < m->n_names; i++) {
        jval v;
        int found = 0;
        if (i < n) {
            v = args[i];
            found = 1;
        }
        for (int32_t k = 0; k < n_kw; k++)
            if (strcmp(kw_names[k], m->names[i]) == 0) {
                if (found) jfail(c, at, "macro '%s' got argument '%s' twice", m->name, m->names[i]);
                v = kw[k];
                found = 1;
            }
        if (!found) {
            c->scope = s;
            v = m->args[i] ? jeval(c, m->args[i]) : jv_undef(m->names[i]);
        }
        scope_set(c, at, s, m->names[i], v);
    }
    for (int32_t k = 0; k < n_kw; k++) {
        int known = 0;
        for (int32_t i = 0; i < m->n_names; i++)
            known |= strcmp(kw_names[k], m->names[i]) == 0;
        if (!known) jfail(c, at, "macro '%s' has no parameter '%s'", m->name, kw_names[k]);
    }
    jbuf out = {0};
    c->scope = s;
    c->out = &out;
    c->depth++;
    exec_body(c, m->c);
    c->depth--;
    c->out = saved_out;
    c->scope = saved_scope;
    c->loop_ctl = 0;
    return jv_str(out.p ? out.p : "", out.n);
}

static jval eval_call(jctx *c, const jnode *n)
{
    jval f = jeval(c, n->a);
    call_args a = eval_args(c, n);
    switch (f.t) {
    case JV_FUNC:
    case JV_METHOD:
        return jbuiltin_call(c, n, f, a.pos, a.n, a.kw_names, a.kw, a.n_kw);
    case JV_MACRO:
        return jcall_macro(c, n, f.u.macro, a.pos, a.n, a.kw_names, a.kw, a.n_kw);
    case JV_UNDEF:
        fail_undef(c, n, f);
    default:
        jfail(c, n, "'%s' object is not callable", jv_type_name(f));
    }
}

/* a filter chain: the innermost filter with a NULL target gets `input` */
static jval eval_filter(jctx *c, const jnode *n, const jval *input)
{
    jval v;
    if (n->a)
        v = n->a->kind == JN_FILTER ? eval_filter(c, n->a, input) : jeval(c, n->a);
    else
        v = input ? *input : jv_undef(NULL);
    call_args a = eval_args(c, n);
    return jbuiltin_filter(c, n, n->name, v, a.pos, a.n, a.kw_names, a.kw, a.n_kw);
}

/* ---- expressions ------------------------------------------------------------------ */

static jval make_list(jctx *c, const jnode *n, int tuple)
{
    jlist *l = jlist_new(c, n, n->n_args);
    l->is_tuple = tuple;
    for (int32_t i = 0; i < n->n_args; i++)
        l->v[l->n++] = jeval(c, n->args[i]);
    jval r = {.t = JV_LIST};
    r.u.l = l;
    return r;
}

jval jeval(jctx *c, const jnode *n)
{
    switch (n->kind) {
    case JN_LIT:
        return n->lit;
    case JN_NAME:
        return lookup(c, n->name);
    case JN_ATTR: {
        jval obj = jeval(c, n->a);
        if (n->name[0] == '_')
            jfail(c, n, "access to attribute '%s' of a %s is not allowed", n->name,
                  jv_type_name(obj));
        if (obj.t == JV_UNDEF) fail_undef(c, n, obj);
        return jbuiltin_getattr(c, n, obj, n->name);
    }
    case JN_ITEM: {
        jval obj = jeval(c, n->a);
        jval key = jeval(c, n->b);
        return jeval_getitem(c, n, obj, key);
    }
    case JN_SLICE:
        return eval_slice(c, n);
    case JN_CALL:
        return eval_call(c, n);
    case JN_FILTER:
        return eval_filter(c, n, NULL);
    case JN_TEST: {
        jval v = jeval(c, n->a);
        call_args a = eval_args(c, n);
        int r = jbuiltin_test(c, n, n->name, v, a.pos, a.n);
        return jv_bool(n->op ? !r : r);
    }
    case JN_UNARY: {
        jval v = jeval(c, n->a);
        if (v.t == JV_UNDEF) fail_undef(c, n, v);
        if (v.t == JV_FLOAT) return jv_float(n->op == '-' ? -v.u.f : v.u.f);
        if (v.t == JV_INT || v.t == JV_BOOL) {
            int64_t i = num_i(v);
            if (n->op == '-' && i == INT64_MIN) jfail(c, n, "integer overflow in unary -");
            return jv_int(n->op == '-' ? -i : i);
        }
        jfail(c, n, "bad operand type for unary %c: '%s'", n->op, jv_type_name(v));
    }
    case JN_NOT:
        return jv_bool(!jv_truthy(jeval(c, n->a)));
    case JN_BINARY: {
        jval a = jeval(c, n->a);
        jval b = jeval(c, n->b);
        return binop(c, n, n->op, a, b);
    }
    case JN_AND: {
        jval a = jeval(c, n->a);
        return jv_truthy(a) ? jeval(c, n->b) : a;
    }
    case JN_OR: {
        jval a = jeval(c, n->a);
        return jv_truthy(a) ? a : jeval(c, n->b);
    }
    case JN_COMPARE: {
        jval left = jeval(c, n->a);
        for (int32_t i = 0; i < n->n_args; i++) {
            jval right = jeval(c, n->args[i]);
            if (!compare_op(c, n, n->ops[i], left, right)) return jv_bool(0);
            left = right;
        }
        return jv_bool(1);
    }
    case JN_COND:
        if (jv_truthy(jeval(c, n->a))) return jeval(c, n->b);
        return n->c ? jeval(c, n->c) : jv_undef(NULL);
    case JN_LIST:
        return make_list(c, n, 0);
    case JN_TUPLE:
        return make_list(c, n, 1);
    case JN_DICT: {
        jdict *d = jdict_new(c, n, n->n_args / 2);
        for (int32_t i = 0; i + 1 < n->n_args; i += 2) {
            jval k = jeval(c, n->args[i]);
            if (k.t == JV_LIST && !k.u.l->is_tuple) jfail(c, n, "unhashable type: 'list'");
            if (k.t == JV_DICT || k.t == JV_NS) jfail(c, n, "unhashable type: 'dict'");
            jdict_set(c, n, d, k, jeval(c, n->args[i + 1]));
        }
        jval r = {.t = JV_DICT};
        r.u.d = d;
        return r;
    }
    default:
        jfail(c, n, "internal error: statement node %d in an expression", (int)n->kind);
    }
}

/* ---- statements -------------------------------------------------------------------- */

static void assign_targets(jctx *c, const jnode *at, jscope *s, const char *const *names, int32_t n,
                           jval v)
{
    if (n == 1) {
        scope_set(c, at, s, names[0], v);
        return;
    }
    jlist *l = jiter_list(c, at, v);
    if (l->n != n) jfail(c, at, "cannot unpack %d values into %d names", l->n, n);
    for (int32_t i = 0; i < n; i++)
        scope_set(c, at, s, names[i], l->v[i]);
}

/* One scope serves every iteration: emptied at the start of each, which is
 * jinja2's rule (a `set` in the body is seen neither after the loop nor by
 * the next iteration) without allocating per iteration. */
static void scope_reset(jscope *s)
{
    s->n = 0;
}

static void exec_for(jctx *c, const jnode *n)
{
    jscope *saved = c->scope;
    jscope *s = scope_push(c, n, saved);
    jloop *lp = jalloc(c, n, sizeof *lp);
    memset(lp, 0, sizeof *lp);
    /* `for i in range(...)` iterates without building the list */
    int lazy = 0;
    if (!n->b && n->a->kind == JN_CALL && n->a->a->kind == JN_NAME && n->a->n_kw == 0) {
        jval f = jeval(c, n->a->a);
        if (f.t == JV_FUNC && strcmp(f.u.fn.name, "range") == 0) {
            jval args[3];
            int32_t na = n->a->n_args;
            if (na < 1 || na > 3) jfail(c, n->a, "range expected 1 to 3 arguments, got %d", na);
            for (int32_t i = 0; i < na; i++)
                args[i] = jeval(c, n->a->args[i]);
            int64_t count;
            jbuiltin_range(c, n->a, args, na, &lp->r_start, &lp->r_step, &count);
            lp->n = (int32_t)count;
            lazy = 1;
        }
    }
    if (!lazy) {
        jlist *items = jiter_list(c, n, jeval(c, n->a));
        if (n->b) {
            /* `for x in xs if cond`: filter first, so loop.* see the filtered list */
            jlist *kept = jlist_new(c, n, items->n);
            c->scope = s;
            for (int32_t i = 0; i < items->n; i++) {
                jcount_step(c, n);
                scope_reset(s);
                assign_targets(c, n, s, n->names, n->n_names, items->v[i]);
                if (jv_truthy(jeval(c, n->b))) kept->v[kept->n++] = items->v[i];
            }
            c->scope = saved;
            items = kept;
        }
        lp->items = items;
        lp->n = items->n;
    }
    jval lv = {.t = JV_LOOP};
    lv.u.loop = lp;
    c->scope = s;
    for (int32_t i = 0; i < lp->n; i++) {
        jcount_step(c, n);
        lp->index0 = i;
        scope_reset(s);
        scope_set(c, n, s, "loop", lv);
        assign_targets(c, n, s, n->names, n->n_names, jloop_item(lp, i));
        exec_body(c, n->c);
        if (c->loop_ctl == 1) {
            c->loop_ctl = 0;
            break;
        }
        c->loop_ctl = 0;
    }
    c->scope = saved;
    if (lp->n == 0 && n->d) exec_body(c, n->d);
}

static void exec_stmt(jctx *c, const jnode *n)
{
    switch (n->kind) {
    case JN_TEXT:
        jbuf_put(c, n, c->out, n->lit.u.s.p, n->lit.u.s.n);
        return;
    case JN_OUTPUT:
        jv_str_into(c, n, c->out, jeval(c, n->a));
        return;
    case JN_BODY:
        exec_body(c, n);
        return;
    case JN_IF:
        for (int32_t i = 0; i + 1 < n->n_args; i += 2)
            if (jv_truthy(jeval(c, n->args[i]))) {
                exec_body(c, n->args[i + 1]);
                return;
            }
        if (n->c) exec_body(c, n->c);
        return;
    case JN_FOR:
        exec_for(c, n);
        return;
    case JN_SET: {
        jval v = jeval(c, n->b);
        if (n->a) {
            jval ns = jeval(c, n->a);
            if (ns.t != JV_NS)
                jfail(c, n, "cannot assign attribute '%s' on a %s (only namespace objects)",
                      n->name, jv_type_name(ns));
            jdict_set(c, n, ns.u.d, jv_cstr(n->name), v);
            return;
        }
        assign_targets(c, n, c->scope, n->names, n->n_names, v);
        return;
    }
    case JN_SETBLOCK: {
        jbuf buf = {0};
        jbuf *saved = c->out;
        c->out = &buf;
        exec_body(c, n->c);
        c->out = saved;
        jval v = jv_str(buf.p ? buf.p : "", buf.n);
        if (n->b) v = eval_filter(c, n->b, &v);
        scope_set(c, n, c->scope, n->names[0], v);
        return;
    }
    case JN_FILTERBLOCK: {
        jbuf buf = {0};
        jbuf *saved = c->out;
        c->out = &buf;
        exec_body(c, n->c);
        c->out = saved;
        jval v = jv_str(buf.p ? buf.p : "", buf.n);
        jv_str_into(c, n, c->out, eval_filter(c, n->b, &v));
        return;
    }
    case JN_MACRO: {
        jval m = {.t = JV_MACRO};
        m.u.macro = n;
        scope_set(c, n, c->scope, n->name, m);
        return;
    }
    case JN_BREAK:
        c->loop_ctl = 1;
        return;
    case JN_CONTINUE:
        c->loop_ctl = 2;
        return;
    default:
        jfail(c, n, "internal error: expression node %d as a statement", (int)n->kind);
    }
}

static void exec_body(jctx *c, const jnode *body)
{
    for (int32_t i = 0; i < body->n_args && !c->loop_ctl; i++)
        exec_stmt(c, body->args[i]);
}

/* ---- public API ---------------------------------------------------------------------- */

void jinja_limits_default(jinja_limits *lim)
{
    lim->max_output = 16u << 20;
    lim->max_memory = 256u << 20;
    lim->max_steps = 10000000;
    lim->max_depth = 64;
}

int jinja_compile(const char *src, size_t len, const char *name, jinja_template **ret, lm_err *err)
{
    *ret = NULL;
    if (!src) return lm_err_set(err, -EINVAL, "jinja_compile: no template source");
    jinja_template *t = calloc(1, sizeof *t);
    if (!t) return lm_err_set(err, -ENOMEM, "jinja_compile: out of memory");
    snprintf(t->name, sizeof t->name, "%s", name ? name : "template");
    t->arena.limit = 64u << 20;
    int rc = jinja_parse(t, src, len, err);
    if (rc) {
        jinja_free(t);
        return rc;
    }
    *ret = t;
    return 0;
}

void jinja_free(jinja_template *t)
{
    if (!t) return;
    jarena_free(&t->arena);
    free(t);
}

int jinja_render(const jinja_template *t, const json_t *vars, const jinja_limits *lim,
                 char **ret_text, size_t *ret_len, lm_err *err)
{
    *ret_text = NULL;
    if (ret_len) *ret_len = 0;
    if (!t) return lm_err_set(err, -EINVAL, "jinja_render: no template");
    if (vars && !json_is_object(vars))
        return lm_err_set(err, -EINVAL, "jinja_render: variables must be a JSON object");
    jctx *c = calloc(1, sizeof *c);
    if (!c) return lm_err_set(err, -ENOMEM, "jinja_render: out of memory");
    if (lim)
        c->lim = *lim;
    else
        jinja_limits_default(&c->lim);
    c->arena.limit = c->lim.max_memory;
    c->err = err;
    c->tmpl = t;
    int rc = 0;
    if (setjmp(c->fail)) {
        rc = err && err->code ? err->code : -EINVAL;
        jarena_free(&c->arena);
        free(c);
        return rc;
    }
    jbuf out = {0};
    c->out = &out;
    c->globals = scope_push(c, NULL, NULL);
    c->scope = c->globals;
    if (vars) {
        const char *key;
        json_t *val;
        json_object_foreach((json_t *)vars, key, val)
        {
            jval k = jv_strdup(c, NULL, key, strlen(key));
            scope_set(c, NULL, c->globals, k.u.s.p, jv_from_json(c, val));
        }
    }
    exec_body(c, t->root);
    char *text = malloc(out.n + 1);
    if (!text) {
        rc = lm_err_set(err, -ENOMEM, "jinja_render: out of memory");
    } else {
        if (out.n) memcpy(text, out.p, out.n);
        text[out.n] = 0;
        *ret_text = text;
        if (ret_len) *ret_len = out.n;
    }
    jarena_free(&c->arena);
    free(c);
    return rc;
}
