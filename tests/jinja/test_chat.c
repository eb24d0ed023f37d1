/*
 * test_chat.c: chat templates (engine/chat.h).
 *
 *  1. every fixture folder's template renders the `chat` cases of its
 *     tokenizer_cases.json exactly as transformers rendered them;
 *  2. where templates come from: chat_template.jinja, tokenizer_config.json
 *     (a string, or named templates with "default"), an override file, and
 *     the errors when none or a broken one is found;
 *  3. rendering with extra variables (Qwen3 enable_thinking) and with JSON
 *     messages + tools, against jinja2's renderings in expected.json;
 *  4. message validation for the daemon.
 * Usage: test_chat FIXTURES_DIR
 */
#include <dirent.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/chat.h"

#include "tests/check_msg.h"

/* tokenizer_config.json special token: "str" or {"content": "str"} */
static const char *special(json_t *cfg, const char *key)
{
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_string_value(v);
}

static void test_fixtures(const char *fixtures)
{
    DIR *d = opendir(fixtures);
    CHECK(d != NULL, "cannot open fixtures folder %s", fixtures);
    if (!d) return;
    struct dirent *e;
    int n_cases = 0, n_dirs = 0;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char dir[1024], path[1100];
        snprintf(dir, sizeof dir, "%s/%s", fixtures, e->d_name);
        snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
        json_t *cfg = json_load_file(path, JSON_DECODE_INT_AS_REAL, NULL);
        if (!cfg) continue;
        n_dirs++;
        chat_template *t = NULL;
        lm_err err = {0};
        int rc = chat_template_load(dir, NULL, special(cfg, "bos_token"), special(cfg, "eos_token"),
                                    &t, &err);
        CHECK(rc == 0, "%s: %s", dir, err.msg);
        snprintf(path, sizeof path, "%s/tokenizer_cases.json", dir);
        json_t *cases = json_load_file(path, 0, NULL);
        json_t *chat = json_object_get(cases, "chat");
        size_t i;
        json_t *c;
        json_array_foreach(chat, i, c)
        {
            json_t *msgs = json_object_get(c, "messages");
            chat_message m[16];
            int32_t n = 0;
            size_t k;
            json_t *jm;
            json_array_foreach(msgs, k, jm)
            {
                if (n < 16) {
                    m[n].role = json_string_value(json_object_get(jm, "role"));
                    m[n].content = json_string_value(json_object_get(jm, "content"));
                    n++;
                }
            }
            char *out = NULL;
            rc = t ? chat_render(t, m, n, 1, NULL, &out, NULL, &err) : -1;
            const char *want = json_string_value(json_object_get(c, "rendered"));
            CHECK(rc == 0 && strcmp(out, want) == 0,
                  "%s chat case %zu: rc %d %s\n got  %s\n want %s", e->d_name, i, rc, err.msg,
                  out ? out : "", want);
            n_cases++;
            free(out);
        }
        json_decref(cases);
        json_decref(cfg);
        chat_template_free(t);
    }
    closedir(d);
    CHECK(n_dirs >= 3, "only %d fixture folders with a tokenizer_config.json", n_dirs);
    CHECK(n_cases >= 6, "only %d fixture chat cases", n_cases);
    printf("chat: %d fixture folders, %d chat renderings checked\n", n_dirs, n_cases);
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void remove_file(const char *dir, const char *name)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
}

static char *render1(chat_template *t, const char *user)
{
    chat_message m = {"user", user};
    char *out = NULL;
    lm_err err = {0};
    if (chat_render(t, &m, 1, 1, NULL, &out, NULL, &err)) fprintf(stderr, "render: %s\n", err.msg);
    return out;
}

static void expect_load(const char *dir, const char *override, const char *want_out, int want_rc,
                        const char *want_msg)
{
    chat_template *t = NULL;
    lm_err err = {0};
    int rc = chat_template_load(dir, override, "<s>", "</s>", &t, &err);
    CHECK(rc == want_rc, "load %s (override %s): rc %d (%s), want %d", dir,
          override ? override : "-", rc, err.msg, want_rc);
    if (want_msg)
        CHECK(strstr(err.msg, want_msg) != NULL, "load message \"%s\" lacks \"%s\"", err.msg,
              want_msg);
    if (rc == 0 && want_out) {
        char *out = render1(t, "hi");
        CHECK(out && strcmp(out, want_out) == 0, "load %s rendered \"%s\", want \"%s\"", dir,
              out ? out : "(null)", want_out);
        free(out);
    }
    chat_template_free(t);
}

static void test_sources(void)
{
    char dir[] = "/tmp/lightmoe_chat_XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    /* nothing at all */
    expect_load(dir, NULL, NULL, -ENOENT, "no chat template");
    /* tokenizer_config.json without a template */
    write_file(dir, "tokenizer_config.json", "{\"bos_token\": \"<s>\"}");
    expect_load(dir, NULL, NULL, -ENOENT, "no chat template");
    /* a string */
    write_file(dir, "tokenizer_config.json",
               "{\"chat_template\": \"{{ bos_token }}{% for m in messages %}[{{ m.role }}]"
               "{{ m.content }}{% endfor %}{{ eos_token }}\"}");
    expect_load(dir, NULL, "<s>[user]hi</s>", 0, NULL);
    /* named templates: "default" wins */
    write_file(dir, "tokenizer_config.json",
               "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"TOOLS\"},"
               " {\"name\": \"default\", \"template\": \"DEFAULT {{ messages[0].content }}\"}]}");
    expect_load(dir, NULL, "DEFAULT hi", 0, NULL);
    write_file(dir, "tokenizer_config.json",
               "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"TOOLS\"}]}");
    expect_load(dir, NULL, NULL, -EINVAL, "no template named 'default' (has 'tool_use')");
    write_file(dir, "tokenizer_config.json", "{\"chat_template\": 42}");
    expect_load(dir, NULL, NULL, -EINVAL, "must be a string or a list");
    write_file(dir, "tokenizer_config.json", "{\"chat_template\": ");
    expect_load(dir, NULL, NULL, -EINVAL, "tokenizer_config.json");
    /* chat_template.jinja wins over tokenizer_config.json */
    write_file(dir, "tokenizer_config.json", "{\"chat_template\": \"CONFIG\"}");
    write_file(dir, "chat_template.jinja", "FILE {{ messages|length }}\n");
    expect_load(dir, NULL, "FILE 1", 0, NULL);
    /* a template that does not compile: error at load with file:line:col */
    write_file(dir, "chat_template.jinja", "ok\n{% for m in messages %}{{ m.content | nope }}");
    expect_load(dir, NULL, NULL, -EINVAL, "chat_template.jinja:2:39: no filter named 'nope'");
    /* ... and the override replaces it */
    write_file(dir, "override.jinja", "OVERRIDE {{ messages[0]['content'] }}");
    char ov[1100];
    snprintf(ov, sizeof ov, "%s/override.jinja", dir);
    expect_load(dir, ov, "OVERRIDE hi", 0, NULL);
    snprintf(ov, sizeof ov, "%s/missing.jinja", dir);
    expect_load(dir, ov, NULL, -ENOENT, "chat template override");
    expect_load(dir, dir, NULL, -EINVAL, "not a regular file");
    remove_file(dir, "override.jinja");
    remove_file(dir, "chat_template.jinja");
    remove_file(dir, "tokenizer_config.json");
    rmdir(dir);
}

/* expected.json case by name */
static json_t *expected_case(json_t *root, const char *name)
{
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(root, "cases"), i, c)
    {
        if (strcmp(json_string_value(json_object_get(c, "name")), name) == 0) return c;
    }
    return NULL;
}

static void test_published(void)
{
    json_t *root = json_load_file(JINJA_TEST_DIR "/expected.json", 0, NULL);
    CHECK(root != NULL, "expected.json");
    if (!root) return;
    struct {
        const char *name, *file, *bos, *eos, *extra;
    } cases[] = {
        {"qwen3/think-last/enable_thinking=False", "Qwen-Qwen3-0.6B.jinja", NULL, "<|im_end|>",
         "{\"enable_thinking\": false}"},
        {"qwen3/think-history/default", "Qwen-Qwen3-0.6B.jinja", NULL, "<|im_end|>", NULL},
        {"qwen3/reasoning-field/enable_thinking=True", "Qwen-Qwen3-0.6B.jinja", NULL, "<|im_end|>",
         "{\"enable_thinking\": true}"},
        {"qwen2.5/tools", "Qwen-Qwen2.5-7B-Instruct.jinja", NULL, "<|im_end|>", NULL},
        {"llama3.3/tools", "meta-llama-Llama-3.3-70B-Instruct.jinja", "<|begin_of_text|>",
         "<|eot_id|>", NULL},
        {"mistral-nemo/tools2", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>", NULL},
        {"mixtral/system/agp=1", "mistralai-Mixtral-8x7B-Instruct-v0.1.jinja", "<s>", "</s>", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *c = expected_case(root, cases[i].name);
        CHECK(c != NULL, "expected.json has no case %s", cases[i].name);
        if (!c) continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/templates/%s", JINJA_TEST_DIR, cases[i].file);
        chat_template *t = NULL;
        lm_err err = {0};
        int rc = chat_template_load(NULL, path, cases[i].bos, cases[i].eos, &t, &err);
        CHECK(rc == 0, "%s: %s", path, err.msg);
        if (rc) continue;
        json_t *vars = json_object_get(c, "vars");
        char *msgs = json_dumps(json_object_get(vars, "messages"), 0);
        json_t *tools = json_object_get(vars, "tools");
        char *tools_s = tools && !json_is_null(tools) ? json_dumps(tools, 0) : NULL;
        char *out = NULL;
        rc = chat_render_json(t, msgs, tools_s, 1, cases[i].extra, &out, NULL, &err);
        const char *want = json_string_value(json_object_get(c, "expected"));
        CHECK(rc == 0 && want && strcmp(out, want) == 0, "%s: rc %d %s\n got  %s\n want %s",
              cases[i].name, rc, err.msg, out ? out : "", want ? want : "");
        free(out);
        free(msgs);
        free(tools_s);
        chat_template_free(t);
    }
    /* the template's own error (Mixtral refuses two user turns in a row) */
    chat_template *t = NULL;
    lm_err err = {0};
    CHECK(chat_template_load(NULL,
                             JINJA_TEST_DIR "/templates/mistralai-Mixtral-8x7B-Instruct-v0.1.jinja",
                             "<s>", "</s>", &t, &err) == 0,
          "mixtral: %s", err.msg);
    chat_message two[2] = {{"user", "a"}, {"user", "b"}};
    char *out = NULL;
    int rc = chat_render(t, two, 2, 1, NULL, &out, NULL, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "mistralai-Mixtral-8x7B-Instruct-v0.1.jinja:11:") &&
              strstr(err.msg, "conversation roles must alternate"),
          "mixtral two users: rc %d %s", rc, err.msg);
    free(out);
    /* bad extra variables */
    chat_message one = {"user", "a"};
    rc = chat_render(t, &one, 1, 1, "[1]", &out, NULL, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "not a JSON object"), "extra [1]: %d %s", rc, err.msg);
    rc = chat_render(t, &one, 1, 1, "{bad", &out, NULL, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "not a JSON object"), "extra {bad: %d %s", rc, err.msg);
    rc = chat_render_json(t, "{\"role\": \"user\"}", NULL, 1, NULL, &out, NULL, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "not a JSON array"), "messages object: %d %s", rc,
          err.msg);
    chat_message badutf = {"user", "\xff\xfe"};
    rc = chat_render(t, &badutf, 1, 1, NULL, &out, NULL, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, "UTF-8"), "bad UTF-8: %d %s", rc, err.msg);
    chat_template_free(t);
    json_decref(root);
}

static void test_check_messages(void)
{
    lm_err err = {0};
    chat_message ok[3] = {{"system", "s"}, {"user", "u"}, {"assistant", "a"}};
    CHECK(chat_check_messages(ok, 3, &err) == 0, "valid messages refused: %s", err.msg);
    chat_message bad_role[2] = {{"user", "u"}, {"wizard", "x"}};
    CHECK(chat_check_messages(bad_role, 2, &err) == -EINVAL &&
              strstr(err.msg, "message 1: unknown role 'wizard'"),
          "%s", err.msg);
    chat_message no_content = {"user", NULL};
    CHECK(chat_check_messages(&no_content, 1, &err) == -EINVAL && strstr(err.msg, "no content"),
          "%s", err.msg);
    chat_message bad_utf8[1] = {{"user", "caf\xc3"}};
    CHECK(chat_check_messages(bad_utf8, 1, &err) == -EINVAL && strstr(err.msg, "UTF-8"), "%s",
          err.msg);
    chat_message overlong[1] = {{"user", "\xc0\xaf"}};
    CHECK(chat_check_messages(overlong, 1, &err) == -EINVAL, "overlong UTF-8 accepted");
    CHECK(chat_check_messages(ok, 0, &err) == -EINVAL && strstr(err.msg, "no chat messages"), "%s",
          err.msg);
    CHECK(chat_role_known("tool") && !chat_role_known("developer") && !chat_role_known(NULL),
          "chat_role_known");
}

int main(int argc, char **argv)
{
    const char *fixtures = argc > 1 ? argv[1] : "../shared/fixtures";
    test_fixtures(fixtures);
    test_sources();
    test_published();
    test_check_messages();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("chat: all checks passed\n");
    return 0;
}
