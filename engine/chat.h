/*
 * chat.h: a model's chat template, loaded from its folder and rendered
 * exactly as transformers' apply_chat_template renders it.
 *
 * Source of the template, first found wins:
 *   1. an override file given by the caller (a configuration option, for
 *      models whose template this interpreter cannot run or that ship a
 *      wrong one);
 *   2. DIR/chat_template.jinja;
 *   3. DIR/tokenizer_config.json "chat_template": a string, or a list of
 *      {"name", "template"} objects of which "default" is used.
 * The template is compiled at load (engine/jinja.h), so a syntax error or a
 * filter/test this interpreter does not know is an error at load, with its
 * line and column, not at the first request.
 *
 * Rendering passes the variables transformers passes: messages (a list of
 * {role, content} mappings), add_generation_prompt, bos_token and eos_token
 * (when the model has them), tools (none unless given), plus any extra
 * keyword arguments (e.g. {"enable_thinking": false} for Qwen3). Unknown
 * roles are the template's business (many raise_exception); the daemon can
 * refuse them earlier with chat_check_messages.
 *
 * Ownership and threads: a chat_template is immutable after load and may be
 * rendered from any number of threads at once; each render uses its own
 * memory. Rendered text is malloc'ed and owned by the caller.
 */
#ifndef LIGHTMOE_CHAT_H
#define LIGHTMOE_CHAT_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

typedef struct chat_template chat_template;

typedef struct chat_message {
    const char *role;           /* "system", "user", "assistant", "tool", ... */
    const char *content;        /* UTF-8 text */
} chat_message;

/*
 * Load the template of model folder `dir` (see above for the order);
 * `override_path` (may be NULL) wins over the folder. bos_token/eos_token
 * are the model's special token strings (tokenizer_get_info), NULL when it
 * has none (the variable is then undefined, as in transformers).
 * -ENOENT when no template exists anywhere (message says where it looked),
 * -EINVAL for an unreadable or malformed one (message has line:column).
 */
int chat_template_load(const char *dir, const char *override_path, const char *bos_token,
                       const char *eos_token, chat_template **ret, lm_err *err);

/* The same from template source text (tests, embedded templates). */
int chat_template_from_string(const char *source, const char *bos_token, const char *eos_token,
                              chat_template **ret, lm_err *err);

/* Accepts NULL. */
void chat_template_free(chat_template *t);

/* Where the template came from ("DIR/chat_template.jinja", ...). */
const char *chat_template_source(const chat_template *t);

/*
 * Render messages[n]. extra_json: a JSON object text of extra template
 * variables (e.g. "{\"enable_thinking\": false}"), or NULL. *ret_text is
 * malloc'ed, NUL-terminated; *ret_len (may be NULL) its length. A template
 * error (raise_exception, undefined operation, limits) is -EINVAL with the
 * template's message and line:column.
 */
int chat_render(const chat_template *t, const chat_message *messages, int32_t n,
                int add_generation_prompt, const char *extra_json, char **ret_text,
                size_t *ret_len, lm_err *err);

/*
 * The same with messages and tools as JSON text (an array of message
 * objects, which may carry tool_calls, reasoning_content, ...; tools_json
 * an array or NULL for none). For API layers that pass messages through.
 */
int chat_render_json(const chat_template *t, const char *messages_json, const char *tools_json,
                     int add_generation_prompt, const char *extra_json, char **ret_text,
                     size_t *ret_len, lm_err *err);

/* 1 if role is one the common templates know (system, user, assistant,
 * tool), else 0. */
int chat_role_known(const char *role);

/* Check messages before rendering: non-NULL role and content, valid UTF-8,
 * known roles. -EINVAL naming the message index and the problem. */
int chat_check_messages(const chat_message *messages, int32_t n, lm_err *err);

#endif
