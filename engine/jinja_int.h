/*
 * jinja_int.h: the interpreter's internals shared by its files
 * (jinja_parse.c: lexer + parser, jinja_value.c: values, arena, Python
 * str()/repr()/json.dumps, jinja_eval.c: evaluator, jinja_builtin.c:
 * filters, tests, methods, globals). Not a public contract.
 *
 * Memory: everything built during one compile or render lives in an arena
 * (jarena) freed at once; errors unwind with longjmp to the entry point,
 * which frees the arena, so no code path needs to clean up after itself.
 */
#ifndef LIGHTMOE_JINJA_INT_H
#define LIGHTMOE_JINJA_INT_H

#include <setjmp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/jinja.h"

/* ---- arena ---------------------------------------------------------------- */

typedef struct jchunk jchunk;
typedef struct jarena {
    jchunk *head;
    size_t used;                /* bytes handed out (for the memory limit) */
    size_t limit;               /* 0 = none */
} jarena;

/* NULL when the limit is reached or malloc fails. */
void *jarena_alloc(jarena *a, size_t n);
void jarena_free(jarena *a);

/* ---- values --------------------------------------------------------------- */

typedef enum jtype {
    JV_UNDEF = 0,
    JV_NONE,
    JV_BOOL,
    JV_INT,
    JV_FLOAT,
    JV_STR,
    JV_LIST,                    /* also tuples (is_tuple) */
    JV_DICT,
    JV_NS,                      /* namespace(): a mutable dict */
    JV_LOOP,                    /* the `loop` variable */
    JV_FUNC,                    /* a global function (builtin) */
    JV_METHOD,                  /* a bound method: receiver + name */
    JV_MACRO,
} jtype;

typedef struct jlist jlist;
typedef struct jdict jdict;
typedef struct jloop jloop;
typedef struct jnode jnode;

typedef struct jval {
    jtype t;
    union {
        int b;
        int64_t i;
        double f;
        struct {
            const char *p;      /* UTF-8, not NUL-terminated */
            size_t n;
        } s;
        jlist *l;
        jdict *d;
        jloop *loop;
        const jnode *macro;
        struct {
            const char *name;   /* builtin function or method name */
            struct jval *self;  /* JV_METHOD receiver (arena) */
        } fn;
        const char *undef_name; /* JV_UNDEF: what was undefined, for messages (may be NULL) */
    } u;
} jval;

struct jlist {
    jval *v;
    int32_t n, cap;
    bool is_tuple;
};

struct jdict {
    jval *k;
    jval *v;
    int32_t n, cap;
};

struct jloop {
    jlist *items;               /* the (filtered) sequence, or NULL for a range */
    int64_t r_start, r_step;    /* range: item i is r_start + i * r_step */
    int32_t n;                  /* number of items */
    int32_t index0;
};

static inline jval jloop_item(const jloop *lp, int32_t i)
{
    if (lp->items)
        return lp->items->v[i];
    jval v = {.t = JV_INT};
    v.u.i = lp->r_start + (int64_t)i * lp->r_step;
    return v;
}

/* ---- AST ------------------------------------------------------------------ */

typedef enum jkind {
    /* expressions */
    JN_LIT = 1,                 /* lit */
    JN_NAME,                    /* name */
    JN_ATTR,                    /* a.name */
    JN_ITEM,                    /* a[b] */
    JN_SLICE,                   /* a[b:c:d], each of b c d may be NULL */
    JN_CALL,                    /* a(args..., kw=...) */
    JN_FILTER,                  /* a | name(args) ; a NULL for a filter block */
    JN_TEST,                    /* a is [not] name(args) ; op = negated */
    JN_UNARY,                   /* op a  ('-', '+') */
    JN_NOT,                     /* not a */
    JN_BINARY,                  /* a op b : + - * / // % ** ~ */
    JN_AND,
    JN_OR,
    JN_COMPARE,                 /* a ops[i] args[i] ... (chained) */
    JN_COND,                    /* b if a else c */
    JN_LIST,                    /* [args] */
    JN_TUPLE,                   /* (args,) */
    JN_DICT,                    /* {args[2i]: args[2i+1]} */
    /* statements */
    JN_BODY,                    /* args = statements */
    JN_TEXT,                    /* lit (string) */
    JN_OUTPUT,                  /* {{ a }} */
    JN_IF,                      /* args = cond0, body0, cond1, body1, ...; c = else body */
    JN_FOR,                     /* names (targets), a iter, b filter cond, c body, d else */
    JN_SET,                     /* names[0] (or a = ns expr + name attr), b value */
    JN_SETBLOCK,                /* names[0], c body, b filter chain or NULL */
    JN_MACRO,                   /* name, names params, args defaults (NULL = none), c body */
    JN_BREAK,
    JN_CONTINUE,
    JN_FILTERBLOCK,             /* b filter chain (with a NULL at its root), c body */
} jkind;

/* Comparison / binary operator codes (jnode.op, jnode.ops[]) */
enum {
    JOP_ADD = 1, JOP_SUB, JOP_MUL, JOP_DIV, JOP_FLOORDIV, JOP_MOD, JOP_POW, JOP_CONCAT,
    JOP_EQ, JOP_NE, JOP_LT, JOP_LE, JOP_GT, JOP_GE, JOP_IN, JOP_NOTIN,
};

struct jnode {
    jkind kind;
    int line, col;
    int op;
    const char *name;           /* identifier, attribute, filter or test name */
    jval lit;
    jnode *a, *b, *c, *d;
    jnode **args;               /* positional arguments / children */
    int32_t n_args;
    const char **kw_names;      /* keyword argument names, parallel to kw */
    jnode **kw;
    int32_t n_kw;
    const char **names;         /* for/set targets, macro parameters */
    int32_t n_names;
    int *ops;                   /* JN_COMPARE: n_args operators */
};

struct jinja_template {
    jarena arena;               /* owns the AST */
    jnode *root;                /* JN_BODY */
    char name[128];
};

/* Compile (jinja_parse.c). */
int jinja_parse(jinja_template *t, const char *src, size_t len, lm_err *err);

/* ---- render context ------------------------------------------------------- */

typedef struct jvar {
    const char *name;
    jval v;
} jvar;

typedef struct jscope {
    struct jscope *parent;
    jvar *vars;
    int32_t n, cap;
} jscope;

typedef struct jbuf {
    char *p;                    /* arena memory */
    size_t n, cap;
} jbuf;

typedef struct jctx {
    jarena arena;
    jmp_buf fail;
    lm_err *err;
    const jinja_template *tmpl;
    jinja_limits lim;
    uint64_t steps;
    int32_t depth;
    jscope *globals;
    jscope *scope;              /* innermost */
    jbuf *out;                  /* current output (block set redirects it) */
    size_t out_total;           /* bytes written to the top-level output */
    int loop_ctl;               /* 1 break, 2 continue pending */
} jctx;

/* Raise a template error at node (may be NULL): never returns. */
_Noreturn void jfail(jctx *c, const jnode *at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

void *jalloc(jctx *c, const jnode *at, size_t n);

/* value constructors and helpers (jinja_value.c) */
jval jv_undef(const char *name);
jval jv_none(void);
jval jv_bool(int b);
jval jv_int(int64_t i);
jval jv_float(double f);
jval jv_str(const char *p, size_t n);                  /* no copy */
jval jv_strdup(jctx *c, const jnode *at, const char *p, size_t n);
jval jv_cstr(const char *p);                           /* no copy, static or arena */
jlist *jlist_new(jctx *c, const jnode *at, int32_t cap);
void jlist_push(jctx *c, const jnode *at, jlist *l, jval v);
jdict *jdict_new(jctx *c, const jnode *at, int32_t cap);
void jdict_set(jctx *c, const jnode *at, jdict *d, jval k, jval v);
/* NULL when absent */
jval *jdict_get(jdict *d, jval k);
jval *jdict_get_str(jdict *d, const char *key);

const char *jv_type_name(jval v);
int jv_truthy(jval v);
int jv_equal(jval a, jval b);
/* -1 / 0 / 1, or fails for unorderable types */
int jv_compare(jctx *c, const jnode *at, jval a, jval b);
jval jv_from_json(jctx *c, const json_t *j);

void jbuf_put(jctx *c, const jnode *at, jbuf *b, const char *p, size_t n);
void jbuf_putc(jctx *c, const jnode *at, jbuf *b, char ch);
/* Python str(v) / repr(v) appended to b */
void jv_str_into(jctx *c, const jnode *at, jbuf *b, jval v);
void jv_repr_into(jctx *c, const jnode *at, jbuf *b, jval v);
jval jv_to_str(jctx *c, const jnode *at, jval v);
/* json.dumps(v, ensure_ascii, indent (<0: none), separators, sort_keys) */
void jv_json_into(jctx *c, const jnode *at, jbuf *b, jval v, int ensure_ascii, int indent,
                  const char *item_sep, const char *key_sep, int sort_keys, int level);
/* Python float repr */
void jfloat_repr(double f, char *buf, size_t cap);

/* UTF-8 helpers */
size_t jutf8_len(const char *p, size_t n);              /* code points */
/* byte offset of code point index i (clamped to n) */
size_t jutf8_offset(const char *p, size_t n, size_t i);

/* builtins (jinja_builtin.c) */
int jbuiltin_has_filter(const char *name);
int jbuiltin_has_test(const char *name);
int jbuiltin_has_global(const char *name);
jval jbuiltin_filter(jctx *c, const jnode *at, const char *name, jval v, jval *args, int32_t n,
                     const char **kw_names, jval *kw, int32_t n_kw);
int jbuiltin_test(jctx *c, const jnode *at, const char *name, jval v, jval *args, int32_t n);
/* Python's `fmt % args` (the format filter and the % operator on strings) */
jval jbuiltin_percent(jctx *c, const jnode *at, jval fmt, jval *args, int32_t n);
/* range(args): start, step and count, failing past the limits */
void jbuiltin_range(jctx *c, const jnode *at, const jval *args, int32_t n, int64_t *ret_start,
                    int64_t *ret_step, int64_t *ret_count);
jval jbuiltin_call(jctx *c, const jnode *at, jval fn, jval *args, int32_t n,
                   const char **kw_names, jval *kw, int32_t n_kw);
/* attribute access on a value (methods, mapping keys, loop fields, ...) */
jval jbuiltin_getattr(jctx *c, const jnode *at, jval obj, const char *name);

/* evaluator pieces used by builtins */
jval jeval(jctx *c, const jnode *n);
jval jeval_getitem(jctx *c, const jnode *at, jval obj, jval key);
void jcount_step(jctx *c, const jnode *at);
/* materialise an iterable as a list (fails for non-iterables) */
jlist *jiter_list(jctx *c, const jnode *at, jval v);
jval jcall_macro(jctx *c, const jnode *at, const jnode *macro, jval *args, int32_t n,
                 const char **kw_names, jval *kw, int32_t n_kw);

#endif
