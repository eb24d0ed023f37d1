/*
 * jinja.h: a small sandboxed Jinja2 interpreter, enough for the chat
 * templates models ship (tokenizer_config.json "chat_template").
 *
 * Semantics are those of transformers' apply_chat_template environment:
 * jinja2 ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks,
 * the loopcontrols extension (break/continue), `{% generation %}` blocks
 * rendered as plain text, a `tojson` filter that is Python's json.dumps
 * (ensure_ascii False, no key sorting, optional indent), and the globals
 * raise_exception, strftime_now, namespace, range, dict. Undefined values
 * print as "" and are false, as in Jinja's default Undefined.
 *
 * Sandbox: templates see only the data given to jinja_render. There is no
 * file or network access (include/import/extends are refused at compile
 * time), no attribute but mapping keys and a fixed list of harmless string,
 * mapping and list methods (an attribute starting with '_' is an error),
 * no way to modify given data (list.append and friends are refused), and
 * every resource is bounded: output bytes, memory, loop iterations plus
 * calls, and nesting depth (jinja_limits). A failure is an error with the
 * template line and column, never a crash.
 *
 * Ownership and threads: a compiled template is immutable; any number of
 * threads may render it at once (each render has its own arena).
 */
#ifndef LIGHTMOE_JINJA_H
#define LIGHTMOE_JINJA_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

typedef struct jinja_template jinja_template;

typedef struct jinja_limits {
    size_t max_output;          /* bytes of rendered text (default 16 MiB) */
    size_t max_memory;          /* bytes of values built while rendering (default 256 MiB) */
    uint64_t max_steps;         /* loop iterations + macro calls (default 10 million) */
    int32_t max_depth;          /* macro call nesting (default 64) */
} jinja_limits;

void jinja_limits_default(jinja_limits *lim);

/* Compile template source (UTF-8). `name` (may be NULL) prefixes error
 * messages. -EINVAL with "name:line:col: what" for a syntax error, an
 * unknown filter or test, or a refused statement. */
int jinja_compile(const char *src, size_t len, const char *name, jinja_template **ret,
                  lm_err *err);

/* Accepts NULL. */
void jinja_free(jinja_template *t);

/*
 * Render with the variables of JSON object `vars` (may be NULL): JSON
 * objects become mappings, arrays lists, strings, numbers, booleans and
 * null their Python counterparts. lim may be NULL (defaults). *ret_text is
 * malloc'ed and NUL-terminated; *ret_len (may be NULL) is its length.
 * -EINVAL for a template error (raise_exception's message, an undefined
 * operation, a limit reached) with line:col.
 */
int jinja_render(const jinja_template *t, const json_t *vars, const jinja_limits *lim,
                 char **ret_text, size_t *ret_len, lm_err *err);

#endif
