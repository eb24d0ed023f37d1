/*
 * tokenizer.h: text <-> token ids, exactly as Hugging Face `tokenizers` does
 * it for a model folder's tokenizer.json (+ tokenizer_config.json).
 *
 * Pipeline of tokenizer_encode (the order of the Rust library):
 *   1. added tokens (special or not) whose `normalized` is false are split
 *      out of the raw text (leftmost-longest; lstrip/rstrip/single_word);
 *   2. every other piece is normalized (NFC, NFKC, Prepend, Replace, ...),
 *      then added tokens with `normalized` true are split out of it;
 *   3. the remaining pieces are pre-tokenized (Split, ByteLevel, Metaspace,
 *      Digits, Whitespace, Punctuation, Sequence) into words;
 *   4. the model (BPE: merges by rank through a priority queue, byte
 *      fallback, unk/fuse_unk, ignore_merges) turns each word into ids;
 *   5. with add_special_tokens, the post-processor adds BOS/EOS
 *      (TemplateProcessing) -- ByteLevel post-processing changes no ids.
 * tokenizer_decode maps ids back to vocabulary strings and runs the decoder
 * chain (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, ...).
 * A component type this code does not know is refused at load with its
 * name: never a silent approximation. Known and refused: models other than
 * BPE (WordPiece, Unigram, WordLevel), BPE dropout, the Precompiled and
 * BertNormalizer normalizers, UnicodeScripts / CharDelimiterSplit
 * pre-tokenizers, WordPiece / CTC decoders. tokenizer_config.json's
 * add_bos_token / add_eos_token are reported (tokenizer_info), not applied:
 * the post-processor of tokenizer.json decides, as in transformers 5 for
 * the fixtures' models. Offsets are not computed.
 *
 * Ownership: a tokenizer is immutable after tokenizer_load and owned by the
 * caller (tokenizer_free). Strings it returns (tokens, info) live as long as
 * it does. Arrays and texts returned through ret_* are malloc'ed and owned
 * by the caller (free()).
 *
 * Threads: encode/decode/lookups on one tokenizer may run concurrently from
 * any number of threads. A tokenizer_detok belongs to one thread at a time.
 */
#ifndef LIGHTMOE_TOKENIZER_H
#define LIGHTMOE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

typedef struct tokenizer tokenizer;

/* Special tokens and flags, from tokenizer_config.json (strings or
 * {"content": ...} objects) resolved against the vocabulary. An id is -1
 * and a string NULL when the model has no such token. */
typedef struct tokenizer_info {
    int32_t bos_id, eos_id, pad_id, unk_id;
    const char *bos_token, *eos_token, *pad_token, *unk_token;
    int add_bos_token;          /* tokenizer_config.json value: 1, 0, or -1 if absent */
    int add_eos_token;          /* same */
    int32_t vocab_size;         /* max id over vocabulary and added tokens, + 1 */
    int clean_up_tokenization_spaces;   /* tokenizer_config.json: 1, 0, or -1 if absent */
} tokenizer_info;

/* Load DIR/tokenizer.json and (if present) DIR/tokenizer_config.json.
 * -ENOENT / -EINVAL with a message naming the file and the offending field
 * or component type. */
int tokenizer_load(const char *dir, tokenizer **ret, lm_err *err);

/* The same from memory (tests, embedded tokenizers): config_json may be NULL. */
int tokenizer_load_json(const char *tokenizer_json, size_t len, const char *config_json,
                        size_t config_len, tokenizer **ret, lm_err *err);

/* Accepts NULL and half-built tokenizers. */
void tokenizer_free(tokenizer *tok);

/* Encode `len` bytes of UTF-8 text. *ret_ids is malloc'ed (caller frees; may
 * be NULL when *ret_n is 0). -EINVAL if text is not valid UTF-8 (message
 * gives the byte offset); -ENOMEM. add_special_tokens as in transformers'
 * tokenizer(text, add_special_tokens=...). */
int tokenizer_encode(const tokenizer *tok, const char *text, size_t len, bool add_special_tokens,
                     int32_t **ret_ids, size_t *ret_n, lm_err *err);

/* Decode ids to text (NUL-terminated, malloc'ed, *ret_len bytes without the
 * NUL; ret_len may be NULL). Ids the tokenizer does not know are skipped (as
 * the Rust library does). Invalid byte sequences become U+FFFD, so the
 * result is always valid UTF-8. */
int tokenizer_decode(const tokenizer *tok, const int32_t *ids, size_t n, bool skip_special_tokens,
                     char **ret_text, size_t *ret_len, lm_err *err);

/* transformers' clean_up_tokenization (" ." -> ".", " n't" -> "n't", ...),
 * which its decode() applies when tokenizer_config.json sets
 * clean_up_tokenization_spaces. tokenizer_decode never applies it (it is
 * lossy: "a != b" becomes "a!= b"); callers that must reproduce
 * transformers' decode exactly do. *ret_text is malloc'ed, NUL-terminated. */
int tokenizer_clean_up_spaces(const char *text, size_t len, char **ret_text, size_t *ret_len,
                              lm_err *err);

/* The vocabulary string of id ("Ġhello", "<0x0A>", "<|im_end|>"), NULL if
 * the id is unknown. An added token with normalized == true reads back as
 * its normalized content (as in the Rust library). */
const char *tokenizer_id_to_token(const tokenizer *tok, int32_t id);

/* The id of a vocabulary or added-token string such as "<|im_end|>"; -1 if
 * none. len is the string length (use strlen for C strings). */
int32_t tokenizer_token_to_id(const tokenizer *tok, const char *token, size_t len);

/* The bytes token `id` stands for in the middle of a text (byte-level and
 * <0xXX> tokens map to their raw byte, "▁" to a space; possibly a partial
 * UTF-8 sequence). Writes at most cap bytes, returns the full length, or -1
 * for an unknown id. For stop-string matching and grammar checks. */
int tokenizer_token_bytes(const tokenizer *tok, int32_t id, char *buf, size_t cap);

bool tokenizer_is_special(const tokenizer *tok, int32_t id);
int32_t tokenizer_vocab_size(const tokenizer *tok);
const tokenizer_info *tokenizer_get_info(const tokenizer *tok);

/* FNV-1a 64 of the exact bytes of tokenizer.json: equal files give equal
 * fingerprints on every machine and run (the answer cache keys on it). */
uint64_t tokenizer_fingerprint(const tokenizer *tok);

/*
 * Streaming detokenizer: push ids one at a time as they are generated and
 * get the text they add. A chunk is never a broken UTF-8 sequence (bytes
 * that may still complete a character are held back), and the
 * concatenation of every chunk plus tokenizer_detok_finish equals
 * tokenizer_decode of all pushed ids (same skip_special_tokens). Text is
 * held back while it ends in U+FFFD (bytes of a character still to come)
 * and, with a ByteFallback decoder, while a run of <0xXX> tokens is open.
 * Each push decodes only the last few tokens (cost independent of the
 * stream's length while text flows).
 */
typedef struct tokenizer_detok tokenizer_detok;

int tokenizer_detok_new(const tokenizer *tok, bool skip_special_tokens, tokenizer_detok **ret,
                        lm_err *err);
/* *ret_text (maybe "" with *ret_len 0) points into the detok and stays
 * valid until the next call on it. */
int tokenizer_detok_push(tokenizer_detok *d, int32_t id, const char **ret_text, size_t *ret_len,
                         lm_err *err);
/* End of stream: the held-back rest (e.g. a final incomplete character as
 * U+FFFD). Same lifetime rule as push. */
int tokenizer_detok_finish(tokenizer_detok *d, const char **ret_text, size_t *ret_len,
                           lm_err *err);
void tokenizer_detok_free(tokenizer_detok *d);

#endif
