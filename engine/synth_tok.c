/*
 * synth_tok.c: the small byte-level BPE tokenizer of synthetic checkpoints
 * (synth.h): the 256 byte tokens spelled as GPT-2's bytes_to_unicode and
 * ordered as its table (ids 0..255), a few dozen merges of common English
 * pairs, and <|endoftext|>, <|im_start|>, <|im_end|> as added special
 * tokens at the last three ids of the model's vocabulary. Pre-tokenizer,
 * decoder and post-processor are those of Qwen2 (regex split + ByteLevel).
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "engine/synth.h"

/* Merges as raw text pairs (a space is the byte 0x20). Each operand must
 * be a byte or an earlier merge's result. */
static const char *const merges[][2] = {
    {" ", "t"}, {" ", "a"}, {"h", "e"},  {"i", "n"},   {"r", "e"},  {"o", "n"},   {" t", "he"},
    {"e", "r"}, {" ", "s"}, {"a", "t"},  {" ", "w"},   {" ", "o"},  {"e", "n"},   {" ", "c"},
    {"i", "t"}, {"i", "s"}, {"a", "n"},  {"o", "r"},   {"e", "s"},  {" ", "b"},   {"e", "d"},
    {" ", "f"}, {"in", "g"}, {" ", "p"}, {"o", "u"},   {" a", "n"}, {"a", "l"},   {"a", "r"},
    {" t", "o"}, {" ", "m"}, {" o", "f"}, {" ", "i"},  {"l", "e"},  {" ", "d"},   {" ", "h"},
    {" an", "d"}, {"i", "c"}, {"a", "s"}, {" ", "l"},  {"o", "m"},  {"l", "l"},   {" i", "n"},
    {" ", "e"}, {"s", "t"}, {" i", "s"}, {"i", "on"},  {" ", "n"},  {" w", "h"},  {"e", "x"},
    {" ", "T"}, {"o", "w"}, {" ", "r"},  {"l", "y"},   {" b", "e"}, {" c", "on"}, {"en", "t"},
};
#define N_MERGES (sizeof merges / sizeof *merges)

/* GPT-2 bytes_to_unicode: byte -> code point, and the table order. */
static void byte_table(int cp_of_byte[256], int order[256])
{
    int n = 0, extra = 0, in_bs[256] = {0};
    for (int b = 0; b < 256; b++)
        in_bs[b] = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    for (int b = 0; b < 256; b++)
        if (in_bs[b]) {
            cp_of_byte[b] = b;
            order[n++] = b;
        }
    for (int b = 0; b < 256; b++)
        if (!in_bs[b]) {
            cp_of_byte[b] = 256 + extra++;
            order[n++] = b;
        }
}

/* Raw bytes -> byte-level unicode spelling, UTF-8 encoded. */
static void spell(const char *raw, const int cp_of_byte[256], char *out, size_t cap)
{
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)raw; *p && o + 3 < cap; p++) {
        int cp = cp_of_byte[*p];
        if (cp < 0x80) {
            out[o++] = (char)cp;
        } else {
            out[o++] = (char)(0xC0 | (cp >> 6));
            out[o++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    out[o] = '\0';
}

static const char chat_template[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' "
    "}}{% endif %}";

int synth_write_tokenizer(const char *outdir, int32_t vocab, lm_err *err)
{
    int32_t n_base = 256 + (int32_t)N_MERGES;
    if (vocab < n_base + 3)
        return lm_err_set(err, -EINVAL, "synth: vocabulary %d too small for the %d-token tokenizer",
                          vocab, n_base + 3);
    int cp_of_byte[256], order[256];
    byte_table(cp_of_byte, order);
    json_t *voc = json_object(), *mg = json_array();
    char a[64], b[64], ab[128];
    for (int i = 0; i < 256; i++) {
        char raw[2] = {(char)order[i], 0};
        if (order[i] == 0) { /* NUL: spell by code point directly */
            int cp = cp_of_byte[0];
            snprintf(a, sizeof a, "%c%c", (char)(0xC0 | (cp >> 6)), (char)(0x80 | (cp & 0x3F)));
        } else {
            spell(raw, cp_of_byte, a, sizeof a);
        }
        json_object_set_new(voc, a, json_integer(i));
    }
    for (size_t i = 0; i < N_MERGES; i++) {
        char raw[64];
        spell(merges[i][0], cp_of_byte, a, sizeof a);
        spell(merges[i][1], cp_of_byte, b, sizeof b);
        snprintf(raw, sizeof raw, "%s%s", merges[i][0], merges[i][1]);
        spell(raw, cp_of_byte, ab, sizeof ab);
        if (!json_object_get(voc, a) || !json_object_get(voc, b) || json_object_get(voc, ab)) {
            json_decref(voc);
            json_decref(mg);
            return lm_err_set(err, -EINVAL, "synth: merge %zu ('%s' + '%s') is inconsistent", i,
                              merges[i][0], merges[i][1]);
        }
        json_object_set_new(voc, ab, json_integer(256 + (json_int_t)i));
        json_array_append_new(mg, json_pack("[s, s]", a, b));
    }
    const char *specials[3] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    json_t *added = json_array(), *dec = json_object();
    for (int i = 0; i < 3; i++) {
        json_t *t = json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", vocab - 3 + i, "content",
                              specials[i], "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized",
                              0, "special", 1);
        json_array_append(added, t);
        char id[16];
        snprintf(id, sizeof id, "%d", vocab - 3 + i);
        json_t *d = json_deep_copy(t);
        json_object_del(d, "id");
        json_object_set_new(dec, id, d);
        json_decref(t);
    }
    json_t *model = json_pack("{s:s, s:n, s:n, s:n, s:n, s:b, s:b, s:b, s:o, s:o}", "type", "BPE",
                              "dropout", "unk_token", "continuing_subword_prefix",
                              "end_of_word_suffix", "fuse_unk", 0, "byte_fallback", 0,
                              "ignore_merges", 0, "vocab", voc, "merges", mg);
    const char *regex = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                        "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    json_t *tok = json_pack(
        "{s:s, s:n, s:n, s:o, s:{s:s}, s:{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, {s:s, s:b, s:b, s:b}]},"
        " s:{s:s, s:b, s:b, s:b}, s:{s:s, s:b, s:b, s:b}, s:o}",
        "version", "1.0", "truncation", "padding", "added_tokens", added, "normalizer", "type",
        "NFC", "pre_tokenizer", "type", "Sequence", "pretokenizers", "type", "Split", "pattern",
        "Regex", regex, "behavior", "Isolated", "invert", 0, "type", "ByteLevel",
        "add_prefix_space", 0, "trim_offsets", 0, "use_regex", 0, "post_processor", "type",
        "ByteLevel", "add_prefix_space", 1, "trim_offsets", 0, "use_regex", 1, "decoder", "type",
        "ByteLevel", "add_prefix_space", 1, "trim_offsets", 1, "use_regex", 1, "model", model);
    if (!tok) {
        json_decref(dec);
        return lm_err_set(err, -ENOMEM, "synth: cannot build tokenizer.json");
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", outdir);
    int rc = json_dump_file(tok, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII);
    json_decref(tok);
    if (rc) {
        json_decref(dec);
        return lm_err_set(err, -EIO, "%s: cannot write", path);
    }
    json_t *cfg = json_pack("{s:b, s:s, s:s, s:s, s:o, s:s, s:I, s:s}", "add_bos_token", 0,
                            "bos_token", "<|endoftext|>", "eos_token", "<|im_end|>", "pad_token",
                            "<|endoftext|>", "added_tokens_decoder", dec, "chat_template",
                            chat_template, "model_max_length", (json_int_t)32768,
                            "tokenizer_class", "Qwen2Tokenizer");
    snprintf(path, sizeof path, "%s/tokenizer_config.json", outdir);
    rc = cfg ? json_dump_file(cfg, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : -1;
    json_decref(cfg);
    if (rc)
        return lm_err_set(err, -EIO, "%s: cannot write", path);
    snprintf(path, sizeof path, "%s/chat_template.jinja", outdir);
    FILE *f = fopen(path, "w");
    if (!f || fputs(chat_template, f) < 0) {
        if (f)
            fclose(f);
        return lm_err_set(err, -EIO, "%s: cannot write", path);
    }
    fclose(f);
    return 0;
}
