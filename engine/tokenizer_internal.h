/*
 * tokenizer_internal.h: the pieces of the tokenizer shared by its files
 * (tokenizer.c: load, added tokens, encode/decode, streaming;
 * tokenizer_bpe.c: the BPE model; tokenizer_norm.c: normalizers;
 * tokenizer_pretok.c: pre-tokenizers; tokenizer_decode.c: decoders and
 * post-processors; tokenizer_util.c: strings, hash maps, UTF-8, regexes).
 * Not a contract: only engine/tokenizer*.c include it.
 *
 * Text travels between stages as a list of pieces, (offset, length) into
 * one growing byte arena (offsets, not pointers, because the arena moves
 * when it grows). Every stage reads pieces and appends new ones; nothing is
 * modified in place. All strings are valid UTF-8 (checked at the input).
 */
#ifndef LIGHTMOE_TOKENIZER_INTERNAL_H
#define LIGHTMOE_TOKENIZER_INTERNAL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "engine/err.h"
#include "engine/tokenizer.h"

#define TOK_MAX_ID (1 << 24)   /* ids past this are refused at load ("out of range") */

/* ---- growable byte buffer and piece lists -------------------------------- */

typedef struct tok_buf {
    char *data;
    size_t len, cap;
} tok_buf;

int tok_buf_reserve(tok_buf *b, size_t extra);
int tok_buf_put(tok_buf *b, const void *p, size_t n);
int tok_buf_putc(tok_buf *b, char c);
void tok_buf_free(tok_buf *b);

typedef struct tok_piece {
    size_t off, len;      /* bytes in the arena */
    int32_t id;           /* >= 0: already an added token's id; -1: text to tokenize */
    bool at_start;        /* starts at original offset 0 (Metaspace prepend_scheme "first") */
} tok_piece;

typedef struct tok_pieces {
    tok_piece *v;
    size_t n, cap;
} tok_pieces;

int tok_pieces_push(tok_pieces *p, size_t off, size_t len, int32_t id, bool at_start);
void tok_pieces_free(tok_pieces *p);

/* ---- string -> int32 map (open addressing, keys copied into a pool) ------ */

typedef struct tok_strmap {
    uint32_t *slots;      /* index+1 into keys, 0 = empty; capacity a power of two */
    size_t cap;
    size_t *key_off;      /* per entry: offset of key in pool */
    uint32_t *key_len;
    int32_t *val;
    size_t n, n_cap;
    tok_buf pool;
} tok_strmap;

uint64_t tok_hash_bytes(const void *p, size_t n);
/* Insert or overwrite (later wins, like a Rust HashMap collect). */
int tok_strmap_set(tok_strmap *m, const char *key, size_t len, int32_t val);
/* -1 if absent. */
int32_t tok_strmap_get(const tok_strmap *m, const char *key, size_t len);
void tok_strmap_free(tok_strmap *m);

/* ---- UTF-8 --------------------------------------------------------------- */

/* Decode one code point at s (valid UTF-8 assumed); *n gets its byte count. */
int32_t tok_utf8_decode(const char *s, size_t len, int *n);
int tok_utf8_encode(uint32_t cp, char out[4]);
/* Offset of the first invalid byte, or (size_t)-1 if all valid. */
size_t tok_utf8_invalid_at(const char *s, size_t len);
/* Append s to b, invalid sequences replaced by U+FFFD one per maximal
 * subpart (what Rust's String::from_utf8_lossy does). */
int tok_utf8_lossy(tok_buf *b, const char *s, size_t len);
bool tok_is_whitespace(int32_t cp);   /* Unicode White_Space (char::is_whitespace) */
bool tok_is_word_char(int32_t cp);    /* regex \w: letters, marks, Nd, Nl, Pc */
bool tok_is_numeric(int32_t cp);      /* char::is_numeric: Nd, Nl, No */
bool tok_is_punctuation(int32_t cp);  /* ASCII punctuation or P* */

/* GPT-2 byte <-> unicode table (bytes_to_unicode of openai/gpt-2). */
extern const uint16_t tok_byte_to_cp[256];
int tok_cp_to_byte(int32_t cp);       /* -1 if cp is not in the table */

/* ---- patterns (Split, Replace) ------------------------------------------- */

typedef struct tok_regex {
    pcre2_code *code;     /* PCRE2_UTF | PCRE2_UCP, JIT-compiled when possible */
    char *literal;        /* for {"String": s}: matched literally (NULL for regexes) */
    size_t literal_len;
} tok_regex;

/* pattern is the JSON {"String": s} or {"Regex": r}; `what` names the
 * component for messages. */
int tok_regex_parse(tok_regex *re, json_t *pattern, const char *what, lm_err *err);
void tok_regex_free(tok_regex *re);

/* A matched or unmatched span (the Rust `find_matches` output: spans cover
 * the whole text in order). */
typedef struct tok_span {
    size_t start, end;
    bool match;
} tok_span;

typedef struct tok_spans {
    tok_span *v;
    size_t n, cap;
} tok_spans;

int tok_spans_push(tok_spans *s, size_t start, size_t end, bool match);
void tok_spans_free(tok_spans *s);

/* Fill spans (cleared first) with the matches of re in s[0..len). */
int tok_regex_find(const tok_regex *re, const char *s, size_t len, tok_spans *out);
/* Same for a per-character predicate: every matching char is its own match. */
int tok_char_find(bool (*pred)(int32_t), const char *s, size_t len, tok_spans *out);

typedef enum tok_split_behavior {
    TOK_SPLIT_REMOVED,
    TOK_SPLIT_ISOLATED,
    TOK_SPLIT_MERGED_PREV,
    TOK_SPLIT_MERGED_NEXT,
    TOK_SPLIT_CONTIGUOUS,
} tok_split_behavior;

int tok_split_behavior_parse(json_t *v, tok_split_behavior *ret, const char *what, lm_err *err);
/* Turn spans into kept sub-ranges following the behavior (in place: spans
 * afterwards hold the kept ranges, empty ones dropped). */
void tok_spans_apply(tok_spans *s, tok_split_behavior b, bool invert);

/* Replace every match of re in s by content, appending the result to out. */
int tok_regex_replace(const tok_regex *re, const char *s, size_t len, const char *content,
                      size_t content_len, tok_buf *out, tok_spans *scratch);

/* ---- JSON helpers -------------------------------------------------------- */

/* Optional typed fields: return 0 and leave *ret when absent or null;
 * -EINVAL naming `what`.key when of the wrong type. */
int tok_json_bool(json_t *obj, const char *key, bool *ret, const char *what, lm_err *err);
int tok_json_str(json_t *obj, const char *key, const char **ret, const char *what, lm_err *err);
int tok_json_int(json_t *obj, const char *key, long long *ret, const char *what, lm_err *err);
/* The "type" string of a component, -EINVAL if missing. */
int tok_json_type(json_t *obj, const char **ret, const char *what, lm_err *err);

/* ---- components ---------------------------------------------------------- */

typedef struct tok_normalizer tok_normalizer;
typedef struct tok_pretok tok_pretok;
typedef struct tok_decoder tok_decoder;
typedef struct tok_postproc tok_postproc;
typedef struct tok_bpe tok_bpe;

/* NULL json (or json null) gives a NULL component: the stage does nothing. */
int tok_normalizer_parse(json_t *j, tok_normalizer **ret, lm_err *err);
void tok_normalizer_free(tok_normalizer *n);
/* Normalize s, appending the result to out. */
int tok_normalizer_run(const tok_normalizer *n, const char *s, size_t len, tok_buf *out,
                       tok_spans *scratch);

int tok_pretok_parse(json_t *j, tok_pretok **ret, lm_err *err);
void tok_pretok_free(tok_pretok *p);
/* Split every text piece (id < 0) of `in` into words, appending to `out`;
 * new strings go into arena. Added-token pieces are copied through. */
int tok_pretok_run(const tok_pretok *p, tok_buf *arena, const tok_pieces *in, tok_pieces *out);

/* BPE model: vocab, merges, options. */
int tok_bpe_parse(json_t *j, tok_bpe **ret, lm_err *err);
void tok_bpe_free(tok_bpe *m);
/* Append the ids of one word to ids; -EINVAL if the unk token is needed but
 * not in the vocabulary. */
typedef struct tok_ids {
    int32_t *v;
    size_t n, cap;
} tok_ids;
int tok_ids_push(tok_ids *ids, int32_t id);
int tok_bpe_word(const tok_bpe *m, const char *s, size_t len, tok_ids *ids, void *scratch,
                 lm_err *err);
void *tok_bpe_scratch_new(void);
void tok_bpe_scratch_free(void *scratch);
int32_t tok_bpe_lookup(const tok_bpe *m, const char *s, size_t len);
/* id -> vocabulary string (NULL if none). */
const char *tok_bpe_token(const tok_bpe *m, int32_t id, size_t *len);
int32_t tok_bpe_max_id(const tok_bpe *m);   /* -1 if empty */

/* Decoders work on a list of tokens (pieces of an arena); the result is a
 * new list. */
int tok_decoder_parse(json_t *j, tok_decoder **ret, lm_err *err);
void tok_decoder_free(tok_decoder *d);
/* Run the chain on `toks` (arena strings); result in *toks. */
int tok_decoder_run(const tok_decoder *d, tok_buf *arena, tok_pieces *toks);
/* Whether the chain has a ByteFallback step (a run of <0xXX> tokens decodes
 * as a whole: the streaming detokenizer holds text back while one is open). */
bool tok_decoder_has_bytefallback(const tok_decoder *d);
/* Raw bytes of one token in mid-text position (tokenizer_token_bytes). */
int tok_decoder_token_bytes(const tok_decoder *d, const char *s, size_t len, tok_buf *out);

/* lookup resolves special token strings of TemplateProcessing. */
int tok_postproc_parse(json_t *j, tok_postproc **ret, lm_err *err);
void tok_postproc_free(tok_postproc *p);
/* Apply to a single sequence's ids (add_special_tokens == true). */
int tok_postproc_run(const tok_postproc *p, const tok_ids *in, tok_ids *out);

#endif
