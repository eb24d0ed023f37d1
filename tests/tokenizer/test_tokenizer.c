/*
 * test_tokenizer.c: unit tests of engine/tokenizer.h.
 *
 *   test_tokenizer SUBTEST FIXTURES_DIR DATA_DIR
 *
 * roundtrip   random Unicode strings through the byte-level fixture:
 *             decode(encode(s)) == NFC(s)
 * detok       streaming detokenizer on random id sequences of both fixtures:
 *             every chunk valid UTF-8, concatenation == decode of all ids
 * malformed   broken tokenizer.json files each end in a clear error
 * components  hand-written tokenizer.json files (data/components.json, ids
 *             computed by the `tokenizers` library, see gen_components.py)
 * long        100k-character inputs (time printed, never asserted)
 * api         lookups, special ids, fingerprint, token bytes, bad input
 * threads     one tokenizer encoding/decoding from 4 threads at once gives
 *             the single-threaded results
 */
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

#include "engine/tokenizer.h"

#include "tests/check_msg.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static tokenizer *load_fixture(const char *fixtures, const char *name)
{
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s/%s", fixtures, name);
    tokenizer *tok = NULL;
    lm_err err = {0};
    if (tokenizer_load(dir, &tok, &err)) {
        fprintf(stderr, "cannot load %s: %s\n", dir, err.msg);
        exit(1);
    }
    return tok;
}

static bool valid_utf8(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t n = utf8proc_iterate((const utf8proc_uint8_t *)s + i,
                                              (utf8proc_ssize_t)(len - i), &cp);
        if (n <= 0)
            return false;
        i += (size_t)n;
    }
    return true;
}

/* A random code point from ranges real text uses, plus a few awkward ones. */
static int32_t random_cp(void)
{
    static const int32_t ranges[][2] = {
        {0x20, 0x7E},       {0x09, 0x0D},     {0xA0, 0x24F},   {0x300, 0x36F},
        {0x370, 0x3FF},     {0x400, 0x4FF},   {0x590, 0x6FF},  {0x900, 0x97F},
        {0x3040, 0x30FF},   {0x4E00, 0x9FFF}, {0xAC00, 0xD7A3}, {0xFF00, 0xFFEF},
        {0x1F300, 0x1FAFF}, {0x2000, 0x206F}, {0x10000, 0x10FFF}};
    int r = (int)(rnd() % 15);
    int32_t lo = ranges[r][0], hi = ranges[r][1];
    return lo + (int32_t)(rnd() % (uint32_t)(hi - lo + 1));
}

static size_t random_text(char *buf, size_t max_chars)
{
    size_t n = rnd() % (max_chars + 1), len = 0;
    for (size_t i = 0; i < n; i++)
        len += (size_t)utf8proc_encode_char(random_cp(), (utf8proc_uint8_t *)buf + len);
    buf[len] = 0;
    return len;
}

static int test_roundtrip(const char *fixtures)
{
    tokenizer *tok = load_fixture(fixtures, "qwen2moe-tiny");
    char text[64 * 4 + 1];
    lm_err err = {0};
    for (int iter = 0; iter < 3000; iter++) {
        size_t len = random_text(text, 64);
        int32_t *ids = NULL;
        size_t n = 0;
        int rc = tokenizer_encode(tok, text, len, true, &ids, &n, &err);
        CHECK(rc == 0, "encode: %s", err.msg);
        char *out = NULL;
        size_t olen = 0;
        rc = tokenizer_decode(tok, ids, n, false, &out, &olen, &err);
        CHECK(rc == 0, "decode: %s", err.msg);
        utf8proc_uint8_t *nfc = utf8proc_NFC((const utf8proc_uint8_t *)text);
        CHECK(nfc && strlen((char *)nfc) == olen && !memcmp(nfc, out, olen),
              "round trip of \"%s\" gave \"%s\"", text, out);
        free(nfc);
        free(out);
        free(ids);
    }
    tokenizer_free(tok);
    return failures;
}

static void detok_check(const tokenizer *tok, const int32_t *ids, size_t n, bool skip)
{
    lm_err err = {0};
    tokenizer_detok *d = NULL;
    CHECK(tokenizer_detok_new(tok, skip, &d, &err) == 0, "%s", err.msg);
    size_t cap = 1024, len = 0;
    char *cat = malloc(cap);
    for (size_t i = 0; i <= n; i++) {
        const char *chunk;
        size_t clen;
        int rc = i < n ? tokenizer_detok_push(d, ids[i], &chunk, &clen, &err)
                       : tokenizer_detok_finish(d, &chunk, &clen, &err);
        CHECK(rc == 0, "detok: %s", err.msg);
        CHECK(valid_utf8(chunk, clen), "chunk %zu is not valid UTF-8", i);
        while (len + clen + 1 > cap)
            cat = realloc(cat, cap *= 2);
        memcpy(cat + len, chunk, clen);
        len += clen;
    }
    char *full = NULL;
    size_t flen = 0;
    CHECK(tokenizer_decode(tok, ids, n, skip, &full, &flen, &err) == 0, "%s", err.msg);
    CHECK(flen == len && !memcmp(full, cat, len), "stream \"%.*s\" != decode \"%s\"", (int)len,
          cat, full);
    if (getenv("TOK_DEBUG") && !(flen == len && !memcmp(full, cat, len))) {
        for (size_t i = 0; i < n; i++)
            fprintf(stderr, "%d,", ids[i]);
        fprintf(stderr, " skip=%d\n", skip);
        exit(1);
    }
    free(full);
    free(cat);
    tokenizer_detok_free(d);
}

/* Every hand-written tokenizer of components.json (Metaspace, Strip,
 * BPEDecoder, ByteFallback, no decoder, ...) on random ids. */
static void detok_components(const char *data)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/components.json", data);
    json_error_t je;
    json_t *doc = json_load_file(path, 0, &je);
    CHECK(doc != NULL, "%s: %s", path, je.text);
    json_t *tests = json_object_get(doc, "tests");
    for (size_t t = 0; t < json_array_size(tests); t++) {
        json_t *e = json_array_get(tests, t);
        char *tj = json_dumps(json_object_get(e, "tokenizer"), JSON_COMPACT);
        tokenizer *tok = NULL;
        lm_err err = {0};
        CHECK(tokenizer_load_json(tj, strlen(tj), NULL, 0, &tok, &err) == 0, "%s", err.msg);
        free(tj);
        if (!tok)
            continue;
        int32_t ids[24];
        for (int iter = 0; iter < 100; iter++) {
            size_t n = rnd() % 24;
            for (size_t i = 0; i < n; i++)
                ids[i] = (int32_t)(rnd() % (uint32_t)tokenizer_vocab_size(tok));
            detok_check(tok, ids, n, iter % 2);
        }
        tokenizer_free(tok);
    }
    json_decref(doc);
}

static int test_detok(const char *fixtures, const char *data)
{
    detok_components(data);
    const char *names[2] = {"qwen2moe-tiny", "mixtral-tiny"};
    for (int f = 0; f < 2; f++) {
        tokenizer *tok = load_fixture(fixtures, names[f]);
        int32_t vocab = tokenizer_vocab_size(tok);
        int32_t ids[48];
        for (int iter = 0; iter < 600; iter++) {
            size_t n = rnd() % 48;
            for (size_t i = 0; i < n; i++)
                ids[i] = (int32_t)(rnd() % (uint32_t)vocab);
            detok_check(tok, ids, n, iter % 2);
        }
        /* and on real text: the encoding of random strings */
        char text[40 * 4 + 1];
        lm_err err = {0};
        for (int iter = 0; iter < 300; iter++) {
            size_t len = random_text(text, 40);
            int32_t *enc = NULL;
            size_t n = 0;
            CHECK(tokenizer_encode(tok, text, len, true, &enc, &n, &err) == 0, "%s", err.msg);
            detok_check(tok, enc, n, iter % 2);
            free(enc);
        }
        tokenizer_free(tok);
    }
    return failures;
}

static void expect_error(const char *name, const char *json, const char *needle)
{
    tokenizer *tok = NULL;
    lm_err err = {0};
    int rc = tokenizer_load_json(json, strlen(json), NULL, 0, &tok, &err);
    CHECK(rc < 0 && tok == NULL, "%s: loaded although broken", name);
    CHECK(strstr(err.msg, needle) != NULL, "%s: message \"%s\" does not mention \"%s\"", name,
          err.msg, needle);
    printf("%-24s -> %s\n", name, err.msg);
    tokenizer_free(tok);
}

#define MODEL_OK "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, " \
                 "\"merges\": [\"a b\"]}"

static int test_malformed(void)
{
    /* sanity: the base is loadable */
    tokenizer *tok = NULL;
    lm_err err = {0};
    const char *ok = "{" MODEL_OK "}";
    CHECK(tokenizer_load_json(ok, strlen(ok), NULL, 0, &tok, &err) == 0, "%s", err.msg);
    tokenizer_free(tok);

    expect_error("not json", "{\"model\": {", "not valid JSON");
    expect_error("not an object", "[1, 2]", "not an object");
    expect_error("missing model", "{\"normalizer\": null}", "missing \"model\"");
    expect_error("model not BPE", "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}",
                 "model type 'Unigram' is not supported");
    expect_error("missing vocab", "{\"model\": {\"type\": \"BPE\", \"merges\": []}}",
                 "missing \"vocab\"");
    expect_error("merge part not in vocab",
                 "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a c\"]}}",
                 "merges[0]: token \"c\" is not in the vocab");
    expect_error("merge result not in vocab",
                 "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": "
                 "[[\"a\", \"b\"]]}}",
                 "merged token \"ab\" is not in the vocab");
    expect_error("merge without space",
                 "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"ab\"]}}",
                 "merges[0] \"ab\" is not \"left right\"");
    expect_error("merge of wrong shape",
                 "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [[\"a\"]]}}",
                 "merges[0] must be");
    expect_error("vocab id negative",
                 "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -1}, \"merges\": []}}",
                 "vocab id of \"a\" is out of range");
    expect_error("vocab id huge",
                 "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 99999999999}, \"merges\": []}}",
                 "out of range");
    expect_error("vocab id not integer",
                 "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": \"0\"}, \"merges\": []}}",
                 "out of range");
    expect_error("unknown normalizer", "{" MODEL_OK ", \"normalizer\": {\"type\": \"Precompiled\"}}",
                 "normalizer type 'Precompiled' is not supported");
    expect_error("unknown pre_tokenizer",
                 "{" MODEL_OK ", \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": "
                 "[{\"type\": \"UnicodeScripts\"}]}}",
                 "pre_tokenizer type 'UnicodeScripts' is not supported");
    expect_error("unknown decoder", "{" MODEL_OK ", \"decoder\": {\"type\": \"CTC\"}}",
                 "decoder type 'CTC' is not supported");
    expect_error("unknown post_processor",
                 "{" MODEL_OK ", \"post_processor\": {\"type\": \"Frobnicate\"}}",
                 "post_processor type 'Frobnicate' is not supported");
    expect_error("component without type", "{" MODEL_OK ", \"decoder\": {\"x\": 1}}",
                 "without a \"type\"");
    expect_error("bad regex",
                 "{" MODEL_OK ", \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": "
                 "\"(unclosed\"}, \"behavior\": \"Isolated\", \"invert\": false}}",
                 "does not compile");
    expect_error("bad split behavior",
                 "{" MODEL_OK ", \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"String\": "
                 "\" \"}, \"behavior\": \"Sideways\", \"invert\": false}}",
                 "unknown split behavior 'Sideways'");
    expect_error("bad prepend_scheme",
                 "{" MODEL_OK ", \"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": "
                 "\"_\", \"prepend_scheme\": \"sometimes\"}}",
                 "unknown prepend_scheme 'sometimes'");
    expect_error("template unknown special",
                 "{" MODEL_OK ", \"post_processor\": {\"type\": \"TemplateProcessing\", "
                 "\"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}], "
                 "\"special_tokens\": {}}}",
                 "special token \"<s>\"");
    expect_error("added token id out of range",
                 "{" MODEL_OK ", \"added_tokens\": [{\"id\": -5, \"content\": \"<x>\"}]}",
                 "out of range");
    expect_error("dropout", "{\"model\": {\"type\": \"BPE\", \"dropout\": 0.1, \"vocab\": {}, "
                 "\"merges\": []}}",
                 "dropout");
    expect_error("bool of wrong type",
                 "{\"model\": {\"type\": \"BPE\", \"byte_fallback\": \"yes\", \"vocab\": {}, "
                 "\"merges\": []}}",
                 "\"byte_fallback\" must be true or false");

    /* a missing folder names the file */
    CHECK(tokenizer_load("/nonexistent-dir", &tok, &err) == -ENOENT, "missing dir");
    CHECK(strstr(err.msg, "/nonexistent-dir/tokenizer.json") != NULL, "%s", err.msg);
    /* unk token configured but absent from the vocab: an encode error, as in Rust */
    const char *unk = "{\"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"vocab\": "
                      "{\"a\": 0}, \"merges\": []}}";
    CHECK(tokenizer_load_json(unk, strlen(unk), NULL, 0, &tok, &err) == 0, "%s", err.msg);
    int32_t *ids = NULL;
    size_t n;
    CHECK(tokenizer_encode(tok, "ab", 2, true, &ids, &n, &err) == -EINVAL, "unk missing");
    CHECK(strstr(err.msg, "unk_token \"<unk>\" is not in the vocabulary") != NULL, "%s", err.msg);
    free(ids);
    tokenizer_free(tok);
    return failures;
}

static void print_ids(const char *what, json_t *want, const int32_t *got, size_t n)
{
    char *w = json_dumps(want, JSON_COMPACT);
    fprintf(stderr, "  %s want %s\n  got ", what, w);
    for (size_t i = 0; i < n; i++)
        fprintf(stderr, "%s%d", i ? "," : "[", got[i]);
    fprintf(stderr, "]\n");
    free(w);
}

static int test_components(const char *data)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/components.json", data);
    json_error_t je;
    json_t *doc = json_load_file(path, 0, &je);
    if (!doc) {
        fprintf(stderr, "%s: %s\n", path, je.text);
        return 1;
    }
    json_t *tests = json_object_get(doc, "tests");
    printf("components.json from tokenizers %s: %zu tokenizers\n",
           json_string_value(json_object_get(doc, "tokenizers_version")), json_array_size(tests));
    size_t n_cases = 0;
    for (size_t t = 0; t < json_array_size(tests); t++) {
        json_t *e = json_array_get(tests, t);
        const char *name = json_string_value(json_object_get(e, "name"));
        bool add_special = json_is_true(json_object_get(e, "add_special_tokens"));
        char *tj = json_dumps(json_object_get(e, "tokenizer"), JSON_COMPACT);
        tokenizer *tok = NULL;
        lm_err err = {0};
        int rc = tokenizer_load_json(tj, strlen(tj), NULL, 0, &tok, &err);
        free(tj);
        CHECK(rc == 0, "%s: load: %s", name, err.msg);
        if (rc)
            continue;
        json_t *cases = json_object_get(e, "cases");
        for (size_t c = 0; c < json_array_size(cases); c++) {
            json_t *k = json_array_get(cases, c);
            json_t *text = json_object_get(k, "text"), *want = json_object_get(k, "ids");
            int32_t *ids = NULL;
            size_t n = 0;
            rc = tokenizer_encode(tok, json_string_value(text), json_string_length(text),
                                  add_special, &ids, &n, &err);
            CHECK(rc == 0, "%s: encode: %s", name, err.msg);
            bool same = n == json_array_size(want);
            for (size_t i = 0; same && i < n; i++)
                same = json_integer_value(json_array_get(want, i)) == ids[i];
            CHECK(same, "%s: ids of \"%s\"", name, json_string_value(text));
            if (!same)
                print_ids(name, want, ids, n);
            free(ids);
            /* decode the expected ids both ways */
            size_t wn = json_array_size(want);
            int32_t *w = malloc((wn + 1) * sizeof(*w));
            for (size_t i = 0; i < wn; i++)
                w[i] = (int32_t)json_integer_value(json_array_get(want, i));
            const char *keys[2] = {"decoded", "decoded_skip"};
            for (int s = 0; s < 2; s++) {
                json_t *d = json_object_get(k, keys[s]);
                char *out = NULL;
                size_t olen = 0;
                CHECK(tokenizer_decode(tok, w, wn, s == 1, &out, &olen, &err) == 0, "%s",
                      err.msg);
                CHECK(out && olen == json_string_length(d) &&
                          !memcmp(out, json_string_value(d), olen),
                      "%s: %s of \"%s\": want \"%s\" got \"%s\"", name, keys[s],
                      json_string_value(text), json_string_value(d), out);
                free(out);
            }
            free(w);
            n_cases++;
        }
        tokenizer_free(tok);
    }
    printf("%zu cases checked\n", n_cases);
    json_decref(doc);
    return failures;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void long_one(const tokenizer *tok, const char *what, const char *text, size_t len)
{
    lm_err err = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    double t0 = now();
    CHECK(tokenizer_encode(tok, text, len, false, &ids, &n, &err) == 0, "%s", err.msg);
    double t1 = now();
    char *out = NULL;
    size_t olen = 0;
    CHECK(tokenizer_decode(tok, ids, n, false, &out, &olen, &err) == 0, "%s", err.msg);
    CHECK(olen == len && !memcmp(out, text, len), "%s: 100k round trip differs", what);
    printf("%-28s %zu bytes -> %zu ids in %.3f s (not asserted)\n", what, len, n, t1 - t0);
    free(out);
    free(ids);
}

static int test_long(const char *fixtures)
{
    const size_t N = 100000;
    char *text = malloc(N * 4 + 1);
    const char *names[2] = {"qwen2moe-tiny", "mixtral-tiny"};
    for (int f = 0; f < 2; f++) {
        tokenizer *tok = load_fixture(fixtures, names[f]);
        char what[64];
        /* one 100k-letter word: the worst case of a rescanning BPE */
        memset(text, 'x', N);
        snprintf(what, sizeof(what), "%s: 'x' * 100k", names[f]);
        long_one(tok, what, text, N);
        /* alternating two letters */
        for (size_t i = 0; i < N; i++)
            text[i] = "ab"[i % 2];
        snprintf(what, sizeof(what), "%s: 'ab' * 50k", names[f]);
        long_one(tok, what, text, N);
        /* 100k Chinese characters (no spaces) */
        size_t len = 0;
        for (size_t i = 0; i < N; i++)
            len += (size_t)utf8proc_encode_char(0x4E00 + (int32_t)(rnd() % 2000),
                                                (utf8proc_uint8_t *)text + len);
        snprintf(what, sizeof(what), "%s: 100k CJK chars", names[f]);
        long_one(tok, what, text, len);
        tokenizer_free(tok);
    }
    free(text);
    return failures;
}

static int test_api(const char *fixtures)
{
    tokenizer *q = load_fixture(fixtures, "qwen2moe-tiny");
    tokenizer *m = load_fixture(fixtures, "mixtral-tiny");
    tokenizer *q2 = load_fixture(fixtures, "qwen2moe-tiny");
    const tokenizer_info *qi = tokenizer_get_info(q), *mi = tokenizer_get_info(m);
    CHECK(tokenizer_vocab_size(q) == 1536, "qwen vocab %d", tokenizer_vocab_size(q));
    CHECK(qi->eos_id == 1535 && !strcmp(qi->eos_token, "<|im_end|>"), "qwen eos %d", qi->eos_id);
    CHECK(qi->pad_id == 1533 && qi->bos_id == -1 && qi->bos_token == NULL, "qwen pad/bos");
    CHECK(qi->add_bos_token == -1, "qwen add_bos_token absent");
    CHECK(mi->bos_id == 1 && mi->eos_id == 2 && mi->unk_id == 0, "mixtral bos/eos/unk");
    CHECK(tokenizer_token_to_id(q, "<|im_end|>", 10) == 1535, "token_to_id im_end");
    CHECK(tokenizer_token_to_id(q, "Ġ", 2) == 220, "token_to_id Ġ");
    CHECK(tokenizer_token_to_id(q, "no such token", 13) == -1, "token_to_id missing");
    CHECK(!strcmp(tokenizer_id_to_token(q, 1534), "<|im_start|>"), "id_to_token");
    CHECK(tokenizer_id_to_token(q, 999999) == NULL && tokenizer_id_to_token(q, -1) == NULL,
          "id_to_token out of range");
    CHECK(tokenizer_is_special(q, 1535) && !tokenizer_is_special(q, 220), "is_special");
    /* fingerprint: stable across loads, different across files */
    CHECK(tokenizer_fingerprint(q) == tokenizer_fingerprint(q2), "fingerprint stable");
    CHECK(tokenizer_fingerprint(q) != tokenizer_fingerprint(m), "fingerprint differs");
    /* token bytes: byte-level and byte-fallback pieces are raw bytes */
    char buf[16];
    CHECK(tokenizer_token_bytes(q, 220, buf, sizeof(buf)) == 1 && buf[0] == ' ', "Ġ -> space");
    CHECK(tokenizer_token_bytes(q, 198, buf, sizeof(buf)) == 1 && buf[0] == '\n', "Ċ -> \\n");
    int32_t b = tokenizer_token_to_id(m, "<0xE4>", 6);
    CHECK(b >= 0 && tokenizer_token_bytes(m, b, buf, sizeof(buf)) == 1 &&
              (unsigned char)buf[0] == 0xE4, "<0xE4> -> byte");
    CHECK(tokenizer_token_bytes(m, 382, buf, sizeof(buf)) == 2 && !memcmp(buf, " a", 2),
          "▁a -> \" a\"");
    CHECK(tokenizer_token_bytes(q, -3, buf, sizeof(buf)) == -1, "unknown id");
    /* bad input */
    lm_err err = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(tokenizer_encode(q, "ab\xC3(", 4, true, &ids, &n, &err) == -EINVAL && ids == NULL,
          "invalid UTF-8 accepted");
    CHECK(strstr(err.msg, "byte 2") != NULL, "%s", err.msg);
    /* unknown ids are skipped by decode, like the Rust library */
    int32_t odd[3] = {39, 999999, -1};
    char *out = NULL;
    CHECK(tokenizer_decode(q, odd, 3, false, &out, NULL, &err) == 0 && !strcmp(out, "H"),
          "decode with unknown ids: \"%s\"", out);
    free(out);
    /* special tokens: skip_special_tokens drops them */
    int32_t sp[3] = {1534, 39, 1535};
    CHECK(tokenizer_decode(q, sp, 3, true, &out, NULL, &err) == 0 && !strcmp(out, "H"),
          "skip special: \"%s\"", out);
    free(out);
    /* the empty text: mixtral still gets its BOS from the template */
    CHECK(tokenizer_encode(m, "", 0, true, &ids, &n, &err) == 0 && n == 1 && ids[0] == 1,
          "empty text");
    free(ids);
    CHECK(tokenizer_encode(m, "", 0, false, &ids, &n, &err) == 0 && n == 0, "empty, no special");
    free(ids);
    /* transformers' clean_up_tokenization, expected output from its Python code */
    const char *raw = "a , b . c ? d ! e ' f don 't I 'm it 's we 've they 're x n't  .";
    const char *want = "a, b. c? d! e'f don 't I'm it's we've they're xn't .";
    char *clean = NULL;
    size_t clen = 0;
    CHECK(tokenizer_clean_up_spaces(raw, strlen(raw), &clean, &clen, &err) == 0 &&
              !strcmp(clean, want) && clen == strlen(want),
          "clean up gave \"%s\"", clean);
    free(clean);
    CHECK(qi->clean_up_tokenization_spaces == -1, "qwen clean_up absent");
    const char *tj = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}";
    const char *cj = "{\"clean_up_tokenization_spaces\": true, \"add_bos_token\": false, "
                     "\"bos_token\": {\"content\": \"a\", \"lstrip\": false}}";
    tokenizer *c = NULL;
    CHECK(tokenizer_load_json(tj, strlen(tj), cj, strlen(cj), &c, &err) == 0, "%s", err.msg);
    if (c) {
        const tokenizer_info *ci = tokenizer_get_info(c);
        CHECK(ci->clean_up_tokenization_spaces == 1 && ci->add_bos_token == 0 &&
                  ci->bos_id == 0 && !strcmp(ci->bos_token, "a"),
              "config flags");
    }
    tokenizer_free(c);
    tokenizer_free(q);
    tokenizer_free(q2);
    tokenizer_free(m);
    return failures;
}

typedef struct thread_job {
    const tokenizer *tok;
    json_t *cases;
    int bad;
} thread_job;

static void *thread_main(void *arg)
{
    thread_job *j = arg;
    lm_err err = {0};
    for (int rep = 0; rep < 20; rep++)
        for (size_t c = 0; c < json_array_size(j->cases); c++) {
            json_t *k = json_array_get(j->cases, c);
            json_t *text = json_object_get(k, "text"), *want = json_object_get(k, "ids");
            int32_t *ids = NULL;
            size_t n = 0;
            if (tokenizer_encode(j->tok, json_string_value(text), json_string_length(text), true,
                                 &ids, &n, &err)) {
                j->bad++;
                continue;
            }
            bool same = n == json_array_size(want);
            for (size_t i = 0; same && i < n; i++)
                same = json_integer_value(json_array_get(want, i)) == ids[i];
            char *out = NULL;
            if (tokenizer_decode(j->tok, ids, n, false, &out, NULL, &err) ||
                strcmp(out, json_string_value(json_object_get(k, "decoded"))))
                same = false;
            j->bad += !same;
            free(out);
            free(ids);
        }
    return NULL;
}

static int test_threads(const char *fixtures)
{
    const char *names[2] = {"qwen2moe-tiny", "mixtral-tiny"};
    for (int f = 0; f < 2; f++) {
        tokenizer *tok = load_fixture(fixtures, names[f]);
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s/tokenizer_cases.json", fixtures, names[f]);
        json_error_t je;
        json_t *doc = json_load_file(path, 0, &je);
        CHECK(doc != NULL, "%s: %s", path, je.text);
        thread_job jobs[4];
        pthread_t th[4];
        for (int i = 0; i < 4; i++) {
            jobs[i] = (thread_job){tok, json_object_get(doc, "cases"), 0};
            CHECK(pthread_create(&th[i], NULL, thread_main, &jobs[i]) == 0, "pthread_create");
        }
        for (int i = 0; i < 4; i++) {
            pthread_join(th[i], NULL);
            CHECK(jobs[i].bad == 0, "%s: thread %d saw %d wrong results", names[f], i,
                  jobs[i].bad);
        }
        json_decref(doc);
        tokenizer_free(tok);
    }
    return failures;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: test_tokenizer SUBTEST FIXTURES_DIR DATA_DIR\n");
        return 2;
    }
    const char *t = argv[1];
    int rc;
    if (!strcmp(t, "roundtrip"))
        rc = test_roundtrip(argv[2]);
    else if (!strcmp(t, "detok"))
        rc = test_detok(argv[2], argv[3]);
    else if (!strcmp(t, "malformed"))
        rc = test_malformed();
    else if (!strcmp(t, "components"))
        rc = test_components(argv[3]);
    else if (!strcmp(t, "long"))
        rc = test_long(argv[2]);
    else if (!strcmp(t, "threads"))
        rc = test_threads(argv[2]);
    else if (!strcmp(t, "api"))
        rc = test_api(argv[2]);
    else {
        fprintf(stderr, "unknown subtest %s\n", t);
        return 2;
    }
    if (rc)
        fprintf(stderr, "%s: %d failure(s)\n", t, rc);
    return rc ? 1 : 0;
}
