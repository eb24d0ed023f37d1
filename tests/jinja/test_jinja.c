/*
 * test_jinja.c: the Jinja interpreter (engine/jinja.h).
 *
 *  1. expected.json: published chat templates (tests/jinja/templates/) and
 *     feature-by-feature inline templates, rendered once by jinja2 in the
 *     environment transformers uses (gen_expected.py); every rendering must
 *     match byte for byte, and every case where jinja2 raised must fail
 *     here too, with jinja2's message.
 *  2. sandbox: attribute escapes, data modification, unbounded loops,
 *     recursion and output must end in a clean error.
 *  3. malformed templates: a clear error with line:column at compile time.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/jinja.h"

#include "tests/check_msg.h"

static char *read_file(const char *path, size_t *ret_len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    size_t got = fread(buf, 1, (size_t)n, f);
    fclose(f);
    buf[got] = 0;
    if (ret_len) *ret_len = got;
    return buf;
}

/* Show where two renderings first differ. */
static void show_diff(const char *name, const char *got, const char *want)
{
    size_t i = 0;
    while (got[i] && got[i] == want[i])
        i++;
    size_t from = i > 40 ? i - 40 : 0;
    fprintf(stderr, "  %s: first difference at byte %zu\n    got:  \"%.*s\"\n    want: \"%.*s\"\n",
            name, i, 80, got + from, 80, want + from);
}

static void test_expected(void)
{
    json_error_t jerr;
    json_t *root = json_load_file(JINJA_TEST_DIR "/expected.json", 0, &jerr);
    CHECK(root != NULL, "expected.json: %s", jerr.text);
    if (!root) return;
    json_t *cases = json_object_get(root, "cases");
    size_t i;
    json_t *cs;
    int n_ok = 0;
    json_array_foreach(cases, i, cs)
    {
        const char *name = json_string_value(json_object_get(cs, "name"));
        const char *file = json_string_value(json_object_get(cs, "template_file"));
        char *src;
        size_t len;
        if (file) {
            char path[512];
            snprintf(path, sizeof path, "%s/templates/%s", JINJA_TEST_DIR, file);
            src = read_file(path, &len);
            CHECK(src != NULL, "%s: cannot read %s", name, path);
            if (!src) continue;
        } else {
            src = strdup(json_string_value(json_object_get(cs, "template")));
            len = strlen(src);
        }
        lm_err err = {0};
        jinja_template *t = NULL;
        int rc = jinja_compile(src, len, name, &t, &err);
        CHECK(rc == 0, "%s: compile failed: %s", name, err.msg);
        if (rc == 0) {
            char *out = NULL;
            size_t out_len = 0;
            rc = jinja_render(t, json_object_get(cs, "vars"), NULL, &out, &out_len, &err);
            const char *want = json_string_value(json_object_get(cs, "expected"));
            const char *want_err = json_string_value(json_object_get(cs, "error"));
            if (want) {
                CHECK(rc == 0, "%s: render failed: %s", name, err.msg);
                if (rc == 0) {
                    int same = out_len == strlen(want) && memcmp(out, want, out_len) == 0;
                    CHECK(same, "%s: rendering differs from jinja2", name);
                    if (!same) show_diff(name, out, want);
                    n_ok += same;
                }
            } else {
                CHECK(rc == -EINVAL, "%s: jinja2 raised \"%s\" but render returned %d", name,
                      want_err, rc);
                CHECK(strstr(err.msg, want_err) != NULL, "%s: message \"%s\" lacks \"%s\"", name,
                      err.msg, want_err);
                n_ok += rc == -EINVAL;
            }
            free(out);
        }
        jinja_free(t);
        free(src);
    }
    printf("jinja: %d of %zu jinja2 cases match\n", n_ok, json_array_size(cases));
    json_decref(root);
}

/* Render `src` with vars (JSON text or NULL); returns rc, *out malloc'ed. */
static int render(const char *src, const char *vars_json, const jinja_limits *lim, char **out,
                  lm_err *err)
{
    jinja_template *t = NULL;
    *out = NULL;
    int rc = jinja_compile(src, strlen(src), "t", &t, err);
    if (rc) return rc;
    json_t *vars = vars_json ? json_loads(vars_json, 0, NULL) : NULL;
    rc = jinja_render(t, vars, lim, out, NULL, err);
    json_decref(vars);
    jinja_free(t);
    return rc;
}

static void expect_fail(const char *src, const char *vars, const jinja_limits *lim,
                        const char *want_msg)
{
    char *out = NULL;
    lm_err err = {0};
    int rc = render(src, vars, lim, &out, &err);
    CHECK(rc < 0, "template %s rendered \"%s\" instead of failing", src, out ? out : "");
    CHECK(strstr(err.msg, want_msg) != NULL, "template %s: message \"%s\" lacks \"%s\"", src,
          err.msg, want_msg);
    free(out);
}

static void expect_out(const char *src, const char *vars, const char *want)
{
    char *out = NULL;
    lm_err err = {0};
    int rc = render(src, vars, NULL, &out, &err);
    CHECK(rc == 0 && out && strcmp(out, want) == 0, "template %s: rc %d \"%s\" (%s), want \"%s\"",
          src, rc, out ? out : "", err.msg, want);
    free(out);
}

static void test_sandbox(void)
{
    /* attribute escapes of the SSTI kind */
    expect_fail("{{ ''.__class__ }}", NULL, NULL, "attribute '__class__'");
    expect_fail("{{ ''.__class__.__mro__[1].__subclasses__() }}", NULL, NULL, "not allowed");
    expect_fail("{{ cycler.__init__.__globals__.os }}", NULL, NULL, "not allowed");
    expect_fail("{{ joiner.__init__ }}", NULL, NULL, "not allowed");
    expect_fail("{{ namespace.__init__ }}", NULL, NULL, "not allowed");
    expect_fail("{{ messages.__len__() }}", "{\"messages\": []}", NULL, "not allowed");
    expect_fail("{{ messages['__class__'] }}", "{\"messages\": []}", NULL, "not allowed");
    expect_fail("{{ raise_exception.__globals__ }}", NULL, NULL, "not allowed");
    expect_fail("{{ x|attr('__class__') }}", "{\"x\": 1}", NULL, "not allowed");
    expect_fail("{{ self }}{{ self.__init__ }}", NULL, NULL, "not allowed");
    /* unknown names are undefined, and calling them fails */
    expect_fail("{{ lipsum() }}", NULL, NULL, "'lipsum' is undefined");
    expect_fail("{{ config.items() }}", NULL, NULL, "'config' is undefined");
    expect_out("{{ request }}{{ config }}{{ os }}", NULL, "");
    /* no loading of other templates */
    expect_fail("{% include '/etc/passwd' %}", NULL, NULL, "'include' is not supported");
    expect_fail("{% import 'x' as y %}", NULL, NULL, "'import' is not supported");
    expect_fail("{% extends 'base' %}", NULL, NULL, "'extends' is not supported");
    /* given data cannot be modified */
    expect_fail("{{ messages.append(1) }}", "{\"messages\": []}", NULL, "list.append");
    expect_fail("{% set _ = d.update({'a': 1}) %}", "{\"d\": {}}", NULL, "dict.update");
    expect_fail("{% set ns = namespace() %}{% set messages.x = 1 %}", "{\"messages\": []}", NULL,
                "only namespace");
    /* unbounded work */
    expect_fail("{% for i in range(100000000) %}{% endfor %}", NULL, NULL, "exceeds");
    expect_fail("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                NULL, NULL, "loop iterations");
    expect_fail("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", NULL, NULL,
                "nested deeper");
    expect_fail("{{ 'x' * 10000000000 }}", NULL, NULL, "too large");
    jinja_limits lim;
    jinja_limits_default(&lim);
    lim.max_output = 1000;
    expect_fail("{% for i in range(2000) %}ab{% endfor %}", NULL, &lim, "exceeds the limit");
    lim.max_output = 16u << 20;
    lim.max_memory = 1 << 20;
    expect_fail("{% set ns = namespace(s='x') %}{% for i in range(100) %}"
                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                NULL, &lim, "memory");
    jinja_limits_default(&lim);
    lim.max_steps = 50;
    expect_fail("{% for i in range(10) %}{% for j in range(10) %}{% endfor %}{% endfor %}", NULL,
                &lim, "more than 50");
    /* errors in arithmetic and undefined use */
    expect_fail("{{ 1 / 0 }}", NULL, NULL, "division by zero");
    expect_fail("{{ 9223372036854775807 + 1 }}", NULL, NULL, "overflow");
    expect_fail("{{ undefined_thing + 'x' }}", NULL, NULL, "'undefined_thing' is undefined");
    expect_fail("{{ 'a' + 1 }}", NULL, NULL, "unsupported operand");
    expect_fail("{{ none.x.y }}", NULL, NULL, "'x' is undefined");
    expect_fail("{{ raise_exception('Bad role: ' ~ r) }}", "{\"r\": \"robot\"}", NULL,
                "t:1:4: Bad role: robot");
}

static void expect_compile_error(const char *src, const char *want)
{
    jinja_template *t = NULL;
    lm_err err = {0};
    int rc = jinja_compile(src, strlen(src), "bad.jinja", &t, &err);
    CHECK(rc == -EINVAL, "malformed template %s compiled (rc %d)", src, rc);
    CHECK(strstr(err.msg, want) != NULL, "template %s: message \"%s\" lacks \"%s\"", src, err.msg,
          want);
    jinja_free(t);
}

static void test_malformed(void)
{
    expect_compile_error("{% if x %}unclosed", "bad.jinja:1:19: unexpected end of template: "
                                               "missing {% endif %}");
    expect_compile_error("line1\n{{ a + }}", "bad.jinja:2:8: expected an expression, found '}}'");
    expect_compile_error("{{ x|nosuchfilter }}", "bad.jinja:1:6: no filter named 'nosuchfilter'");
    expect_compile_error("{{ x is nosuchtest }}", "no test named 'nosuchtest'");
    expect_compile_error("{{ 'unterminated }}", "unterminated string literal");
    expect_compile_error("a\n\n  {% endfor %}", "bad.jinja:3:6: unexpected {% endfor %}");
    expect_compile_error("{% frobnicate %}", "unknown statement 'frobnicate'");
    expect_compile_error("{{ x ", "bad.jinja:1:1: tag opened here is never closed");
    expect_compile_error("{# never closed", "comment is never closed");
    expect_compile_error("{% for x in %}{% endfor %}", "expected an expression");
    expect_compile_error("{% for x of y %}{% endfor %}", "expected 'in'");
    expect_compile_error("{% if a %}{% endfor %}", "unexpected {% endfor %}: expected {% endif");
    expect_compile_error("{{ (1, 2 }}", "unexpected '}', expected ')'");
    expect_compile_error("{{ a ] }}", "unbalanced ']'");
    expect_compile_error("{{ 'a' $ 1 }}", "unexpected character '$'");
    expect_compile_error("{% set %}", "expected a variable name");
    expect_compile_error("{% macro m(a=1, b) %}{% endmacro %}", "without default");
    expect_compile_error("{{ '\\u12' }}", "bad \\u escape");
    expect_compile_error("{% for x in y recursive %}{% endfor %}", "recursive loops");
    /* deep nesting is refused, not a stack overflow */
    char deep[4200];
    size_t o = 0;
    o += (size_t)snprintf(deep + o, sizeof deep - o, "{{ ");
    for (int i = 0; i < 1000; i++)
        deep[o++] = '(';
    deep[o++] = '1';
    for (int i = 0; i < 1000; i++)
        deep[o++] = ')';
    snprintf(deep + o, sizeof deep - o, " }}");
    expect_compile_error(deep, "nested too deeply");
    /* not-a-template inputs */
    jinja_template *t = NULL;
    lm_err err = {0};
    CHECK(jinja_compile(NULL, 0, "x", &t, &err) == -EINVAL, "NULL source accepted");
    char *out = NULL;
    json_t *arr = json_array();
    CHECK(jinja_compile("x", 1, "x", &t, &err) == 0, "compile x");
    CHECK(jinja_render(t, arr, NULL, &out, NULL, &err) == -EINVAL && strstr(err.msg, "JSON object"),
          "non-object vars accepted: %s", err.msg);
    json_decref(arr);
    jinja_free(t);
}

/* One compiled template rendered by 4 threads at once gives the same text
 * every time (each render has its own arena; the AST is read-only). */
typedef struct par {
    const jinja_template *t;
    json_t *vars;
    const char *want;
    int bad;
} par;

static void *par_run(void *arg)
{
    par *p = arg;
    for (int i = 0; i < 50; i++) {
        char *out = NULL;
        lm_err err = {0};
        if (jinja_render(p->t, p->vars, NULL, &out, NULL, &err) != 0 || strcmp(out, p->want) != 0)
            p->bad++;
        free(out);
    }
    return NULL;
}

static void test_threads(void)
{
    json_t *root = json_load_file(JINJA_TEST_DIR "/expected.json", 0, NULL);
    json_t *cs = NULL;
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(root, "cases"), i, c)
    {
        if (strcmp(json_string_value(json_object_get(c, "name")), "qwen3/think-history/default") ==
            0)
            cs = c;
    }
    CHECK(cs != NULL, "no qwen3 case for the thread test");
    size_t len;
    char *src = read_file(JINJA_TEST_DIR "/templates/Qwen-Qwen3-0.6B.jinja", &len);
    jinja_template *t = NULL;
    lm_err err = {0};
    if (cs && src && jinja_compile(src, len, "qwen3", &t, &err) == 0) {
        par p[4];
        pthread_t th[4];
        for (int k = 0; k < 4; k++) {
            p[k] = (par){t, json_object_get(cs, "vars"),
                         json_string_value(json_object_get(cs, "expected")), 0};
            pthread_create(&th[k], NULL, par_run, &p[k]);
        }
        for (int k = 0; k < 4; k++) {
            pthread_join(th[k], NULL);
            CHECK(p[k].bad == 0, "thread %d: %d of 50 renders wrong", k, p[k].bad);
        }
    }
    jinja_free(t);
    free(src);
    json_decref(root);
}

int main(void)
{
    test_expected();
    test_sandbox();
    test_malformed();
    test_threads();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("jinja: all checks passed\n");
    return 0;
}
