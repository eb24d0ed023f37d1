/*
 * cache_codec.c: the stored value format, version 1.
 *
 *   offset 0   'L' 'M' 'C' <version byte = 1>
 *          4   u32 LE  total length of the value (header included)
 *          8   u32 LE  CRC-32 (IEEE 802.3, reflected, poly 0xEDB88320) of bytes [12, end)
 *         12   body:
 *              varint finish, prompt_tokens, completion_tokens
 *              varint n_prompt, then n_prompt varint ids
 *              varint n_tokens, then n_tokens varint ids
 *              varint text_len, then text_len bytes
 *              u8 flags (bit 0: logprobs present, bit 1: chunks present; others 0)
 *              if logprobs, per generated token: f32 LE logprob, u8 n_top
 *                (<= SAMPLE_MAX_LOGPROBS), n_top x (varint id, f32 LE logprob)
 *              if chunks: varint n_chunks, n_chunks x (varint text_len, varint
 *                n_tokens), adding up exactly to text_len and n_tokens
 * Varints are unsigned LEB128 of at most 5 bytes and must fit in int32 (ids
 * and counts are never negative). Every count is checked against the bytes
 * left before anything is allocated, and the value must end exactly after
 * the body: a truncated, extended or bit-flipped value is -EBADMSG.
 *
 * Decoding makes two passes: one validates and sizes, the second fills one
 * allocation holding the entry and all its arrays (freed by one free()).
 */
#include <stdlib.h>
#include <string.h>

#include "cache/cache_internal.h"

#define HDR 12

/* ---- CRC-32 -------------------------------------------------------------- */

static uint32_t crc_table[256];
static atomic_int crc_ready;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

uint32_t cache_crc32(const uint8_t *p, size_t n)
{
    /* The table is the same whoever builds it, so a race only repeats work. */
    if (!atomic_load_explicit(&crc_ready, memory_order_acquire)) {
        crc_init();
        atomic_store_explicit(&crc_ready, 1, memory_order_release);
    }
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ---- writer --------------------------------------------------------------- */

typedef struct wbuf {
    uint8_t *p;
    size_t n, cap;
    int oom;
} wbuf;

static void w_need(wbuf *w, size_t more)
{
    if (w->oom || w->n + more <= w->cap)
        return;
    size_t cap = w->cap ? w->cap : 256;
    while (cap < w->n + more)
        cap *= 2;
    uint8_t *np = realloc(w->p, cap);
    if (!np) {
        w->oom = 1;
        return;
    }
    w->p = np;
    w->cap = cap;
}

static void w_bytes(wbuf *w, const void *b, size_t n)
{
    w_need(w, n);
    if (!w->oom && n) {
        memcpy(w->p + w->n, b, n);
        w->n += n;
    }
}

static void w_varint(wbuf *w, uint32_t v)
{
    uint8_t b[5];
    int k = 0;
    do {
        b[k] = (uint8_t)(v & 0x7F);
        v >>= 7;
        if (v)
            b[k] |= 0x80;
        k++;
    } while (v);
    w_bytes(w, b, (size_t)k);
}

static void w_u32(wbuf *w, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    w_bytes(w, b, 4);
}

static void w_f32(wbuf *w, float f)
{
    uint32_t v;
    memcpy(&v, &f, 4);
    w_u32(w, v);
}

int cache_entry_encode(const cache_entry *e, uint8_t **ret, size_t *ret_n)
{
    if (!e || e->n_tokens < 0 || e->n_prompt < 0 || e->finish < 0 || e->prompt_tokens < 0 ||
        e->completion_tokens < 0 || (e->n_tokens && !e->tokens) || (e->n_prompt && !e->prompt) ||
        (e->text_len && !e->text) || e->text_len > INT32_MAX)
        return -EINVAL;
    for (int32_t i = 0; i < e->n_prompt; i++)
        if (e->prompt[i] < 0)
            return -EINVAL;
    for (int32_t i = 0; i < e->n_tokens; i++)
        if (e->tokens[i] < 0)
            return -EINVAL;
    wbuf w = {0};
    const uint8_t magic[4] = {'L', 'M', 'C', CACHE_FORMAT_VERSION};
    w_bytes(&w, magic, 4);
    w_u32(&w, 0); /* length, patched below */
    w_u32(&w, 0); /* crc, patched below */
    w_varint(&w, (uint32_t)e->finish);
    w_varint(&w, (uint32_t)e->prompt_tokens);
    w_varint(&w, (uint32_t)e->completion_tokens);
    w_varint(&w, (uint32_t)e->n_prompt);
    for (int32_t i = 0; i < e->n_prompt; i++)
        w_varint(&w, (uint32_t)e->prompt[i]);
    w_varint(&w, (uint32_t)e->n_tokens);
    for (int32_t i = 0; i < e->n_tokens; i++)
        w_varint(&w, (uint32_t)e->tokens[i]);
    w_varint(&w, (uint32_t)e->text_len);
    w_bytes(&w, e->text, e->text_len);
    if (e->n_chunks < 0 || (e->n_chunks && !e->chunks)) {
        free(w.p);
        return -EINVAL;
    }
    if (e->n_chunks) {
        uint64_t tl = 0, nt = 0;
        for (int32_t i = 0; i < e->n_chunks; i++) {
            if (e->chunks[i].n_tokens < 0 || e->chunks[i].text_len > INT32_MAX) {
                free(w.p);
                return -EINVAL;
            }
            tl += e->chunks[i].text_len;
            nt += (uint64_t)e->chunks[i].n_tokens;
        }
        if (tl != e->text_len || nt != (uint64_t)e->n_tokens) {
            free(w.p);
            return -EINVAL;
        }
    }
    uint8_t flags = (e->logprobs ? 1 : 0) | (e->n_chunks ? 2 : 0);
    w_bytes(&w, &flags, 1);
    if (e->logprobs) {
        for (int32_t i = 0; i < e->n_tokens; i++) {
            const sample_result *r = &e->logprobs[i];
            if (r->n_top < 0 || r->n_top > SAMPLE_MAX_LOGPROBS) {
                free(w.p);
                return -EINVAL;
            }
            w_f32(&w, r->logprob);
            uint8_t nt = (uint8_t)r->n_top;
            w_bytes(&w, &nt, 1);
            for (int32_t j = 0; j < r->n_top; j++) {
                if (r->top_ids[j] < 0) {
                    free(w.p);
                    return -EINVAL;
                }
                w_varint(&w, (uint32_t)r->top_ids[j]);
                w_f32(&w, r->top_logprobs[j]);
            }
        }
    }
    if (e->n_chunks) {
        w_varint(&w, (uint32_t)e->n_chunks);
        for (int32_t i = 0; i < e->n_chunks; i++) {
            w_varint(&w, e->chunks[i].text_len);
            w_varint(&w, (uint32_t)e->chunks[i].n_tokens);
        }
    }
    if (w.oom || w.n > UINT32_MAX) {
        free(w.p);
        return -ENOMEM;
    }
    uint32_t len = (uint32_t)w.n, crc = cache_crc32(w.p + HDR, w.n - HDR);
    for (int i = 0; i < 4; i++) {
        w.p[4 + i] = (uint8_t)(len >> (8 * i));
        w.p[8 + i] = (uint8_t)(crc >> (8 * i));
    }
    *ret = w.p;
    *ret_n = w.n;
    return 0;
}

/* ---- reader --------------------------------------------------------------- */

typedef struct rbuf {
    const uint8_t *p;
    size_t n, off;
    const char *bad; /* first problem found */
} rbuf;

static uint32_t rd_u32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int32_t r_varint(rbuf *r, const char *what)
{
    uint32_t v = 0;
    for (int k = 0; k < 5; k++) {
        if (r->off >= r->n) {
            if (!r->bad)
                r->bad = what;
            return -1;
        }
        uint8_t b = r->p[r->off++];
        v |= (uint32_t)(b & 0x7F) << (7 * k);
        if (!(b & 0x80)) {
            if (v > INT32_MAX && !r->bad)
                r->bad = what;
            return r->bad ? -1 : (int32_t)v;
        }
    }
    if (!r->bad)
        r->bad = what;
    return -1;
}

static int r_take(rbuf *r, size_t n, const char *what, const uint8_t **ret)
{
    if (r->bad || n > r->n - r->off) {
        if (!r->bad)
            r->bad = what;
        return -1;
    }
    *ret = r->p + r->off;
    r->off += n;
    return 0;
}

static float r_f32(rbuf *r, const char *what)
{
    const uint8_t *b;
    if (r_take(r, 4, what, &b))
        return 0;
    uint32_t v = rd_u32le(b);
    float f;
    memcpy(&f, &v, 4);
    return f;
}

/* Check the header; on success r is positioned at the body. */
static int check_header(rbuf *r, lm_err *err)
{
    if (r->n < HDR)
        return lm_err_set(err, -EBADMSG, "cache value: %zu bytes, shorter than the header", r->n);
    if (r->p[0] != 'L' || r->p[1] != 'M' || r->p[2] != 'C')
        return lm_err_set(err, -EBADMSG, "cache value: bad magic");
    if (r->p[3] != CACHE_FORMAT_VERSION)
        return lm_err_set(err, -EBADMSG, "cache value: format version %u, expected %u", r->p[3],
                          CACHE_FORMAT_VERSION);
    uint32_t len = rd_u32le(r->p + 4);
    if (len != r->n)
        return lm_err_set(err, -EBADMSG, "cache value: length field %u, value has %zu bytes", len,
                          r->n);
    if (rd_u32le(r->p + 8) != cache_crc32(r->p + HDR, r->n - HDR))
        return lm_err_set(err, -EBADMSG, "cache value: CRC mismatch");
    r->off = HDR;
    return 0;
}

/* One pass over the body. With out == NULL it only validates and returns
 * the sizes; with out it fills the arrays that follow *out. */
typedef struct sizes {
    int32_t n_prompt, n_tokens, n_chunks;
    size_t text_len;
    int has_lp;
} sizes;

static int parse_body(rbuf *r, sizes *sz, cache_entry *out, int32_t *prompt, int32_t *tokens,
                      char *text, sample_result *lp, cache_chunk *chunks)
{
    int32_t finish = r_varint(r, "finish");
    int32_t pt = r_varint(r, "prompt_tokens");
    int32_t ct = r_varint(r, "completion_tokens");
    int32_t np = r_varint(r, "n_prompt");
    if (np >= 0 && (size_t)np > r->n - r->off && !r->bad)
        r->bad = "n_prompt larger than the value";
    for (int32_t i = 0; !r->bad && i < np; i++) {
        int32_t id = r_varint(r, "prompt id");
        if (prompt)
            prompt[i] = id;
    }
    int32_t nt = r_varint(r, "n_tokens");
    if (nt >= 0 && (size_t)nt > r->n - r->off && !r->bad)
        r->bad = "n_tokens larger than the value";
    for (int32_t i = 0; !r->bad && i < nt; i++) {
        int32_t id = r_varint(r, "token id");
        if (tokens)
            tokens[i] = id;
    }
    int32_t tl = r_varint(r, "text_len");
    const uint8_t *tb = NULL;
    if (!r->bad)
        r_take(r, (size_t)tl, "text", &tb);
    const uint8_t *fl = NULL;
    r_take(r, 1, "flags", &fl);
    if (!r->bad && (*fl & ~3u))
        r->bad = "unknown flags";
    int has_lp = !r->bad && (*fl & 1);
    for (int32_t i = 0; has_lp && !r->bad && i < nt; i++) {
        float l = r_f32(r, "logprob");
        const uint8_t *nb = NULL;
        r_take(r, 1, "n_top", &nb);
        if (r->bad)
            break;
        if (*nb > SAMPLE_MAX_LOGPROBS) {
            r->bad = "n_top over SAMPLE_MAX_LOGPROBS";
            break;
        }
        sample_result *s = lp ? &lp[i] : NULL;
        if (s) {
            memset(s, 0, sizeof *s);
            s->token = tokens[i];
            s->logprob = l;
            s->n_top = *nb;
        }
        for (int j = 0; j < *nb && !r->bad; j++) {
            int32_t id = r_varint(r, "top id");
            float tlp = r_f32(r, "top logprob");
            if (s) {
                s->top_ids[j] = id;
                s->top_logprobs[j] = tlp;
            }
        }
    }
    int32_t nc = 0;
    if (!r->bad && (*fl & 2)) {
        nc = r_varint(r, "n_chunks");
        if (nc >= 0 && (size_t)nc > (r->n - r->off) / 2 && !r->bad)
            r->bad = "n_chunks larger than the value";
        if (nc == 0 && !r->bad)
            r->bad = "chunk flag with no chunks";
        int64_t sum_t = 0, sum_n = 0;
        for (int32_t i = 0; !r->bad && i < nc; i++) {
            int32_t l = r_varint(r, "chunk text_len");
            int32_t k = r_varint(r, "chunk n_tokens");
            sum_t += l;
            sum_n += k;
            if (chunks) {
                chunks[i].text_len = (uint32_t)l;
                chunks[i].n_tokens = k;
            }
        }
        if (!r->bad && (sum_t != tl || sum_n != nt))
            r->bad = "chunks that do not add up to the text and tokens";
    }
    if (!r->bad && r->off != r->n)
        r->bad = "trailing bytes after the body";
    if (r->bad)
        return -EBADMSG;
    sz->n_prompt = np;
    sz->n_tokens = nt;
    sz->text_len = (size_t)tl;
    sz->has_lp = has_lp;
    sz->n_chunks = nc;
    if (out) {
        out->finish = finish;
        out->prompt_tokens = pt;
        out->completion_tokens = ct;
        if (text) {
            memcpy(text, tb, (size_t)tl);
            text[tl] = '\0';
        }
    }
    return 0;
}

static size_t align8(size_t n) { return (n + 7) & ~(size_t)7; }

int cache_entry_decode(const uint8_t *buf, size_t n, cache_entry **ret, lm_err *err)
{
    rbuf r = {.p = buf, .n = n};
    int rc = check_header(&r, err);
    if (rc)
        return rc;
    sizes sz;
    if (parse_body(&r, &sz, NULL, NULL, NULL, NULL, NULL, NULL))
        return lm_err_set(err, -EBADMSG, "cache value: bad %s at byte %zu", r.bad, r.off);
    size_t o_lp = align8(sizeof(cache_entry));
    size_t o_prompt = o_lp + (sz.has_lp ? (size_t)sz.n_tokens * sizeof(sample_result) : 0);
    size_t o_tok = align8(o_prompt + (size_t)sz.n_prompt * sizeof(int32_t));
    size_t o_text = align8(o_tok + (size_t)sz.n_tokens * sizeof(int32_t));
    size_t o_chunks = align8(o_text + sz.text_len + 1);
    size_t total = o_chunks + (size_t)sz.n_chunks * sizeof(cache_chunk);
    uint8_t *blk = malloc(total);
    if (!blk)
        return lm_err_set(err, -ENOMEM, "cache value: out of memory (%zu bytes)", total);
    cache_entry *e = (cache_entry *)blk;
    memset(e, 0, sizeof *e);
    int32_t *prompt = (int32_t *)(blk + o_prompt);
    int32_t *tokens = (int32_t *)(blk + o_tok);
    char *text = (char *)(blk + o_text);
    sample_result *lp = sz.has_lp ? (sample_result *)(blk + o_lp) : NULL;
    r.off = HDR;
    r.bad = NULL;
    cache_chunk *chunks = sz.n_chunks ? (cache_chunk *)(blk + o_chunks) : NULL;
    parse_body(&r, &sz, e, prompt, tokens, text, lp, chunks); /* cannot fail: same bytes */
    e->chunks = chunks;
    e->n_chunks = sz.n_chunks;
    e->prompt = prompt;
    e->n_prompt = sz.n_prompt;
    e->tokens = tokens;
    e->n_tokens = sz.n_tokens;
    e->text = text;
    e->text_len = sz.text_len;
    e->logprobs = lp;
    *ret = e;
    return 0;
}

void cache_entry_free(cache_entry *e) { free(e); }

int cache_value_prompt(const uint8_t *val, size_t n, int32_t **ret, int32_t *ret_n)
{
    cache_entry *e;
    int rc = cache_entry_decode(val, n, &e, NULL);
    if (rc)
        return rc;
    int32_t *p = malloc((size_t)(e->n_prompt ? e->n_prompt : 1) * sizeof(int32_t));
    if (!p) {
        cache_entry_free(e);
        return -ENOMEM;
    }
    if (e->n_prompt)
        memcpy(p, e->prompt, (size_t)e->n_prompt * sizeof(int32_t));
    *ret = p;
    *ret_n = e->n_prompt;
    cache_entry_free(e);
    return 0;
}
