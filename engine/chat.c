/*
 * chat.c: chat templates (see chat.h): finding a model's template,
 * compiling it once, and rendering conversations with the variables
 * transformers' apply_chat_template passes (messages, tools and documents
 * as None unless given, add_generation_prompt, the special tokens, extra
 * keyword arguments last so that they win).
 */
#include "engine/chat.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/jinja.h"

struct chat_template {
    jinja_template *jt;
    char *bos, *eos; /* NULL when the model has none */
    char source[512];
};

/* Largest template file accepted (published templates are < 20 KB). */
#define CHAT_MAX_TEMPLATE (4u << 20)

static int read_text(const char *path, char **ret, size_t *ret_len, lm_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) return lm_err_set(err, -errno, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return lm_err_set(err, -EINVAL, "%s: not a regular file", path);
    }
    if ((size_t)st.st_size > CHAT_MAX_TEMPLATE) {
        fclose(f);
        return lm_err_set(err, -EINVAL, "%s: %lld bytes, more than the %u a template may have",
                          path, (long long)st.st_size, CHAT_MAX_TEMPLATE);
    }
    char *buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        fclose(f);
        return lm_err_set(err, -ENOMEM, "%s: out of memory", path);
    }
    size_t n = fread(buf, 1, (size_t)st.st_size, f);
    fclose(f);
    buf[n] = 0;
    *ret = buf;
    *ret_len = n;
    return 0;
}

static int file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int build(const char *src, size_t len, const char *source, const char *bos, const char *eos,
                 chat_template **ret, lm_err *err)
{
    chat_template *t = calloc(1, sizeof *t);
    if (!t) return lm_err_set(err, -ENOMEM, "chat template: out of memory");
    snprintf(t->source, sizeof t->source, "%s", source);
    int rc = jinja_compile(src, len, source, &t->jt, err);
    if (rc == 0 && bos && !(t->bos = strdup(bos)))
        rc = lm_err_set(err, -ENOMEM, "chat template: out of memory");
    if (rc == 0 && eos && !(t->eos = strdup(eos)))
        rc = lm_err_set(err, -ENOMEM, "chat template: out of memory");
    if (rc) {
        chat_template_free(t);
        return rc;
    }
    *ret = t;
    return 0;
}

/* tokenizer_config.json "chat_template": a string, or [{name, template}] */
static int template_from_config(const char *path, char **ret_src, lm_err *err)
{
    json_error_t jerr;
    /* INT_AS_REAL: model_max_length is often 1e30, past int64 */
    json_t *root = json_load_file(path, JSON_DECODE_INT_AS_REAL, &jerr);
    if (!root) return lm_err_set(err, -EINVAL, "%s:%d: %s", path, jerr.line, jerr.text);
    int rc = 0;
    json_t *ct = json_object_get(root, "chat_template");
    const char *src = NULL;
    if (!ct || json_is_null(ct)) {
        rc = -ENOENT;
    } else if (json_is_string(ct)) {
        src = json_string_value(ct);
    } else if (json_is_array(ct)) {
        size_t i;
        json_t *e;
        char names[256] = "";
        json_array_foreach(ct, i, e)
        {
            const char *name = json_string_value(json_object_get(e, "name"));
            const char *tmpl = json_string_value(json_object_get(e, "template"));
            if (!name || !tmpl) {
                rc = lm_err_set(err, -EINVAL,
                                "%s: chat_template[%zu] is not a {\"name\", \"template\"} object",
                                path, i);
                break;
            }
            if (strcmp(name, "default") == 0) src = tmpl;
            size_t l = strlen(names);
            snprintf(names + l, sizeof names - l, "%s'%s'", l ? ", " : "", name);
        }
        if (!rc && !src)
            rc = lm_err_set(err, -EINVAL,
                            "%s: chat_template has no template named 'default' (has %s)", path,
                            names);
    } else {
        rc = lm_err_set(err, -EINVAL, "%s: chat_template must be a string or a list", path);
    }
    if (src && !(*ret_src = strdup(src))) rc = lm_err_set(err, -ENOMEM, "%s: out of memory", path);
    json_decref(root);
    return rc;
}

int chat_template_load(const char *dir, const char *override_path, const char *bos_token,
                       const char *eos_token, chat_template **ret, lm_err *err)
{
    *ret = NULL;
    char path[512];
    char *src = NULL;
    size_t len = 0;
    int rc;
    if (override_path && *override_path) {
        rc = read_text(override_path, &src, &len, err);
        if (rc) return lm_err_prefix(err, "chat template override");
        snprintf(path, sizeof path, "%s", override_path);
    } else {
        if (!dir) return lm_err_set(err, -EINVAL, "chat_template_load: no model folder");
        snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
        if (file_exists(path)) {
            rc = read_text(path, &src, &len, err);
            if (rc) return rc;
        } else {
            snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
            rc = file_exists(path) ? template_from_config(path, &src, err) : -ENOENT;
            if (rc == -ENOENT)
                return lm_err_set(err, -ENOENT,
                                  "%s: no chat template (looked for chat_template.jinja and "
                                  "\"chat_template\" in tokenizer_config.json); give one with "
                                  "the chat template option",
                                  dir);
            if (rc) return rc;
            len = strlen(src);
        }
    }
    rc = build(src, len, path, bos_token, eos_token, ret, err);
    free(src);
    return rc;
}

int chat_template_from_string(const char *source, const char *bos_token, const char *eos_token,
                              chat_template **ret, lm_err *err)
{
    *ret = NULL;
    if (!source) return lm_err_set(err, -EINVAL, "chat_template_from_string: no source");
    return build(source, strlen(source), "chat_template", bos_token, eos_token, ret, err);
}

void chat_template_free(chat_template *t)
{
    if (!t) return;
    jinja_free(t->jt);
    free(t->bos);
    free(t->eos);
    free(t);
}

const char *chat_template_source(const chat_template *t)
{
    return t ? t->source : "";
}

/* Render with messages (an array, stolen) and tools (stolen, may be NULL). */
static int render_vars(const chat_template *t, json_t *messages, json_t *tools,
                       int add_generation_prompt, const char *extra_json, char **ret_text,
                       size_t *ret_len, lm_err *err)
{
    json_t *vars = json_object();
    json_object_set_new(vars, "messages", messages);
    json_object_set_new(vars, "tools", tools ? tools : json_null());
    json_object_set_new(vars, "documents", json_null());
    json_object_set_new(vars, "add_generation_prompt", json_boolean(add_generation_prompt));
    if (t->bos) json_object_set_new(vars, "bos_token", json_string(t->bos));
    if (t->eos) json_object_set_new(vars, "eos_token", json_string(t->eos));
    if (extra_json && *extra_json) {
        json_error_t jerr;
        json_t *extra = json_loads(extra_json, 0, &jerr);
        if (!extra || !json_is_object(extra)) {
            int rc = extra ? lm_err_set(err, -EINVAL,
                                        "chat template variables: not a JSON object (got a "
                                        "JSON %s)",
                                        json_is_array(extra) ? "array" : "scalar")
                           : lm_err_set(err, -EINVAL,
                                        "chat template variables: not a JSON object (%s at "
                                        "column %d)",
                                        jerr.text, jerr.column);
            json_decref(extra);
            json_decref(vars);
            return rc;
        }
        json_object_update(vars, extra);
        json_decref(extra);
    }
    int rc = jinja_render(t->jt, vars, NULL, ret_text, ret_len, err);
    json_decref(vars);
    return rc;
}

int chat_render(const chat_template *t, const chat_message *messages, int32_t n,
                int add_generation_prompt, const char *extra_json, char **ret_text, size_t *ret_len,
                lm_err *err)
{
    *ret_text = NULL;
    if (!t) return lm_err_set(err, -EINVAL, "chat_render: no template");
    if (n < 0 || (n > 0 && !messages))
        return lm_err_set(err, -EINVAL, "chat_render: bad message list");
    json_t *arr = json_array();
    for (int32_t i = 0; i < n; i++) {
        if (!messages[i].role || !messages[i].content) {
            json_decref(arr);
            return lm_err_set(err, -EINVAL, "message %d: missing role or content", i);
        }
        json_t *m = json_object();
        json_t *role = json_string(messages[i].role);
        json_t *content = json_string(messages[i].content);
        if (!role || !content) {
            json_decref(role);
            json_decref(content);
            json_decref(m);
            json_decref(arr);
            return lm_err_set(err, -EINVAL, "message %d: %s is not valid UTF-8", i,
                              role ? "content" : "role");
        }
        json_object_set_new(m, "role", role);
        json_object_set_new(m, "content", content);
        json_array_append_new(arr, m);
    }
    return render_vars(t, arr, NULL, add_generation_prompt, extra_json, ret_text, ret_len, err);
}

int chat_render_json(const chat_template *t, const char *messages_json, const char *tools_json,
                     int add_generation_prompt, const char *extra_json, char **ret_text,
                     size_t *ret_len, lm_err *err)
{
    *ret_text = NULL;
    if (!t || !messages_json)
        return lm_err_set(err, -EINVAL, "chat_render_json: no template or messages");
    json_error_t jerr;
    json_t *msgs = json_loads(messages_json, 0, &jerr);
    if (!msgs || !json_is_array(msgs)) {
        json_decref(msgs);
        return lm_err_set(err, -EINVAL, "chat messages: not a JSON array (%s)",
                          msgs ? "other JSON value" : jerr.text);
    }
    json_t *tools = NULL;
    if (tools_json && *tools_json) {
        tools = json_loads(tools_json, 0, &jerr);
        if (!tools || !(json_is_array(tools) || json_is_null(tools))) {
            json_decref(tools);
            json_decref(msgs);
            return lm_err_set(err, -EINVAL, "chat tools: not a JSON array (%s)",
                              tools ? "other JSON value" : jerr.text);
        }
    }
    return render_vars(t, msgs, tools, add_generation_prompt, extra_json, ret_text, ret_len, err);
}

int chat_role_known(const char *role)
{
    static const char *const roles[] = {"system", "user", "assistant", "tool", NULL};
    for (int i = 0; role && roles[i]; i++)
        if (strcmp(role, roles[i]) == 0) return 1;
    return 0;
}

static int utf8_valid(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        int n;
        uint32_t cp;
        if (*p < 0x80) {
            p++;
            continue;
        } else if ((*p & 0xE0) == 0xC0) {
            n = 1;
            cp = *p & 0x1F;
        } else if ((*p & 0xF0) == 0xE0) {
            n = 2;
            cp = *p & 0x0F;
        } else if ((*p & 0xF8) == 0xF0) {
            n = 3;
            cp = *p & 0x07;
        } else {
            return 0;
        }
        p++;
        for (int k = 0; k < n; k++, p++) {
            if ((*p & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (*p & 0x3F);
        }
        if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
    }
    return 1;
}

int chat_check_messages(const chat_message *messages, int32_t n, lm_err *err)
{
    if (n <= 0 || !messages) return lm_err_set(err, -EINVAL, "no chat messages");
    for (int32_t i = 0; i < n; i++) {
        const chat_message *m = &messages[i];
        if (!m->role || !*m->role) return lm_err_set(err, -EINVAL, "message %d: no role", i);
        if (!m->content) return lm_err_set(err, -EINVAL, "message %d: no content", i);
        if (!utf8_valid(m->role) || !utf8_valid(m->content))
            return lm_err_set(err, -EINVAL, "message %d: not valid UTF-8", i);
        if (!chat_role_known(m->role))
            return lm_err_set(err, -EINVAL,
                              "message %d: unknown role '%.40s' (system, user, assistant or tool)",
                              i, m->role);
    }
    return 0;
}
