/*
 * tokenizer_bpe.c: the BPE model of tokenizer.json ("model": {"type": "BPE"}).
 *
 * A word is split into characters (each looked up in the vocabulary, with
 * continuing_subword_prefix / end_of_word_suffix added where configured;
 * unknown ones become <0xXX> byte tokens with byte_fallback, else the unk
 * token, fused with fuse_unk), then merged: every adjacent pair that has a
 * merge rule goes into a min-heap keyed by (rank, position); the best is
 * applied, stale entries are skipped, and the new symbol's pairs with its
 * neighbours are pushed. That is the Rust library's Word::merge_all, and it
 * costs O(n log n) per word instead of rescanning the word per merge.
 * ignore_merges (Llama-3): a word that is itself in the vocabulary is one token.
 *
 * Merges load from both spellings: "a b" strings and ["a", "b"] pairs. A
 * merge whose parts or result are not in the vocabulary is a load error, as
 * in the Rust library; a duplicate pair keeps the later rank (HashMap collect).
 *
 * The model is immutable after load; encoding uses a caller-owned scratch.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer_internal.h"

typedef struct merge_slot {
    uint64_t key;        /* (left id << 32 | right id) + 1; 0 = empty */
    uint32_t rank;
    int32_t new_id;
} merge_slot;

struct tok_bpe {
    tok_strmap vocab;
    size_t *tok_off;      /* [max_id+1] offset into vocab.pool, or SIZE_MAX */
    uint32_t *tok_len;
    int32_t max_id;
    merge_slot *merges;   /* open addressing, capacity power of two */
    size_t merges_cap;
    int32_t *cp_id;       /* [0x10000] id of the one-character token, -1; NULL with prefix/suffix */
    int32_t byte_id[256]; /* "<0xXX>" ids (byte_fallback), -1 */
    int32_t unk_id;       /* -1: no unk token */
    char *unk_token;      /* the configured name (unk may be missing from vocab) */
    bool fuse_unk, byte_fallback, ignore_merges;
    char *prefix, *suffix;
    size_t prefix_len, suffix_len;
};

typedef struct sym {
    int32_t id;
    int32_t prev, next;
    uint32_t len;         /* bytes of the word covered; 0 = merged away */
} sym;

typedef struct heap_ent {
    uint32_t rank;
    uint32_t pos;
    int32_t new_id;
} heap_ent;

typedef struct bpe_scratch {
    sym *syms;
    size_t syms_cap;
    heap_ent *heap;
    size_t heap_n, heap_cap;
    tok_buf tmp;
} bpe_scratch;

void *tok_bpe_scratch_new(void)
{
    return calloc(1, sizeof(bpe_scratch));
}

void tok_bpe_scratch_free(void *p)
{
    bpe_scratch *s = p;
    if (!s)
        return;
    free(s->syms);
    free(s->heap);
    tok_buf_free(&s->tmp);
    free(s);
}

void tok_bpe_free(tok_bpe *m)
{
    if (!m)
        return;
    tok_strmap_free(&m->vocab);
    free(m->tok_off);
    free(m->tok_len);
    free(m->merges);
    free(m->cp_id);
    free(m->unk_token);
    free(m->prefix);
    free(m->suffix);
    free(m);
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static const merge_slot *merge_get(const tok_bpe *m, int32_t a, int32_t b)
{
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    size_t mask = m->merges_cap - 1;
    for (size_t i = mix64(key) & mask;; i = (i + 1) & mask) {
        if (m->merges[i].key == key)
            return &m->merges[i];
        if (!m->merges[i].key)
            return NULL;
    }
}

static void merge_put(tok_bpe *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id)
{
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    size_t mask = m->merges_cap - 1;
    size_t i = mix64(key) & mask;
    while (m->merges[i].key && m->merges[i].key != key)
        i = (i + 1) & mask;
    m->merges[i] = (merge_slot){key, rank, new_id};
}

int32_t tok_bpe_lookup(const tok_bpe *m, const char *s, size_t len)
{
    return tok_strmap_get(&m->vocab, s, len);
}

const char *tok_bpe_token(const tok_bpe *m, int32_t id, size_t *len)
{
    if (id < 0 || id > m->max_id || m->tok_off[id] == SIZE_MAX)
        return NULL;
    if (len)
        *len = m->tok_len[id];
    return m->vocab.pool.data + m->tok_off[id];
}

int32_t tok_bpe_max_id(const tok_bpe *m)
{
    return m->max_id;
}

static int opt_str(json_t *j, const char *key, char **ret, size_t *ret_len, lm_err *err)
{
    const char *s = NULL;
    int rc = tok_json_str(j, key, &s, "model BPE", err);
    if (rc || !s || !*s)
        return rc;
    *ret_len = strlen(s);
    *ret = strdup(s);
    return *ret ? 0 : -ENOMEM;
}

/* Parse one merge entry into its two parts. */
static int merge_parts(json_t *e, size_t idx, const char **a, size_t *al, const char **b,
                       size_t *bl, lm_err *err)
{
    if (json_is_string(e)) {
        const char *s = json_string_value(e);
        const char *sp = strchr(s, ' ');
        if (!sp)
            return lm_err_set(err, -EINVAL, "model BPE: merges[%zu] \"%s\" is not \"left right\"",
                              idx, s);
        *a = s;
        *al = (size_t)(sp - s);
        *b = sp + 1;
        *bl = strlen(sp + 1);
        return 0;
    }
    if (json_is_array(e) && json_array_size(e) == 2 && json_is_string(json_array_get(e, 0)) &&
        json_is_string(json_array_get(e, 1))) {
        *a = json_string_value(json_array_get(e, 0));
        *al = json_string_length(json_array_get(e, 0));
        *b = json_string_value(json_array_get(e, 1));
        *bl = json_string_length(json_array_get(e, 1));
        return 0;
    }
    return lm_err_set(err, -EINVAL,
                      "model BPE: merges[%zu] must be a \"left right\" string or a pair of strings",
                      idx);
}

int tok_bpe_parse(json_t *j, tok_bpe **ret, lm_err *err)
{
    *ret = NULL;
    tok_bpe *m = calloc(1, sizeof(*m));
    if (!m)
        return -ENOMEM;
    int rc = 0;
    m->unk_id = -1;
    m->max_id = -1;
    for (int i = 0; i < 256; i++)
        m->byte_id[i] = -1;
    json_t *dropout = json_object_get(j, "dropout");
    if (dropout && !json_is_null(dropout) && json_number_value(dropout) != 0.0) {
        rc = lm_err_set(err, -EINVAL, "model BPE: dropout %g is not supported (inference only)",
                        json_number_value(dropout));
        goto fail;
    }
    if ((rc = tok_json_bool(j, "fuse_unk", &m->fuse_unk, "model BPE", err)) ||
        (rc = tok_json_bool(j, "byte_fallback", &m->byte_fallback, "model BPE", err)) ||
        (rc = tok_json_bool(j, "ignore_merges", &m->ignore_merges, "model BPE", err)) ||
        (rc = opt_str(j, "continuing_subword_prefix", &m->prefix, &m->prefix_len, err)) ||
        (rc = opt_str(j, "end_of_word_suffix", &m->suffix, &m->suffix_len, err)))
        goto fail;
    size_t unk_len = 0;
    if ((rc = opt_str(j, "unk_token", &m->unk_token, &unk_len, err)))
        goto fail;

    json_t *vocab = json_object_get(j, "vocab");
    if (!json_is_object(vocab)) {
        rc = lm_err_set(err, -EINVAL, "model BPE: missing \"vocab\" object");
        goto fail;
    }
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val)
    {
        if (!json_is_integer(val) || json_integer_value(val) < 0 ||
            json_integer_value(val) >= TOK_MAX_ID) {
            rc = lm_err_set(err, -EINVAL,
                            "model BPE: vocab id of \"%s\" is out of range (must be an integer "
                            "in [0, %d))",
                            key, TOK_MAX_ID);
            goto fail;
        }
        int32_t id = (int32_t)json_integer_value(val);
        if ((rc = tok_strmap_set(&m->vocab, key, strlen(key), id)))
            goto fail;
        if (id > m->max_id)
            m->max_id = id;
    }
    /* id -> string; the first key per id wins (json_object_foreach order is
     * insertion order, i.e. file order) */
    size_t n_ids = (size_t)m->max_id + 1;
    m->tok_off = malloc((n_ids ? n_ids : 1) * sizeof(*m->tok_off));
    m->tok_len = calloc(n_ids ? n_ids : 1, sizeof(*m->tok_len));
    if (!m->tok_off || !m->tok_len) {
        rc = -ENOMEM;
        goto fail;
    }
    for (size_t i = 0; i < n_ids; i++)
        m->tok_off[i] = SIZE_MAX;
    for (size_t e = 0; e < m->vocab.n; e++) {
        int32_t id = m->vocab.val[e];
        if (m->tok_off[id] == SIZE_MAX) {
            m->tok_off[id] = m->vocab.key_off[e];
            m->tok_len[id] = m->vocab.key_len[e];
        }
    }
    if (m->unk_token)
        m->unk_id = tok_strmap_get(&m->vocab, m->unk_token, unk_len);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof(name), "<0x%02X>", b);
        m->byte_id[b] = tok_strmap_get(&m->vocab, name, 6);
    }
    if (!m->prefix && !m->suffix) {
        m->cp_id = malloc(0x10000 * sizeof(*m->cp_id));
        if (!m->cp_id) {
            rc = -ENOMEM;
            goto fail;
        }
        for (int32_t cp = 0; cp < 0x10000; cp++) {
            char enc[4];
            int n = (cp >= 0xD800 && cp < 0xE000) ? 0 : tok_utf8_encode((uint32_t)cp, enc);
            m->cp_id[cp] = n ? tok_strmap_get(&m->vocab, enc, (size_t)n) : -1;
        }
    }

    json_t *merges = json_object_get(j, "merges");
    if (merges && !json_is_null(merges) && !json_is_array(merges)) {
        rc = lm_err_set(err, -EINVAL, "model BPE: \"merges\" must be a list");
        goto fail;
    }
    size_t n_merges = merges ? json_array_size(merges) : 0;
    m->merges_cap = 16;
    while (m->merges_cap < n_merges * 2 + 16)
        m->merges_cap *= 2;
    m->merges = calloc(m->merges_cap, sizeof(*m->merges));
    if (!m->merges) {
        rc = -ENOMEM;
        goto fail;
    }
    tok_buf cat = {0};
    for (size_t i = 0; i < n_merges; i++) {
        const char *a = NULL, *b = NULL;
        size_t al = 0, bl = 0;
        if ((rc = merge_parts(json_array_get(merges, i), i, &a, &al, &b, &bl, err)))
            break;
        int32_t ia = tok_strmap_get(&m->vocab, a, al), ib = tok_strmap_get(&m->vocab, b, bl);
        if (ia < 0 || ib < 0) {
            rc = lm_err_set(err, -EINVAL, "model BPE: merges[%zu]: token \"%.*s\" is not in the vocab",
                            i, (int)(ia < 0 ? al : bl), ia < 0 ? a : b);
            break;
        }
        /* the result drops the continuing_subword_prefix of the right part */
        size_t skip = m->prefix_len;
        if (skip > bl) {
            rc = lm_err_set(err, -EINVAL, "model BPE: merges[%zu]: right part shorter than the "
                            "continuing_subword_prefix", i);
            break;
        }
        cat.len = 0;
        if ((rc = tok_buf_put(&cat, a, al)) || (rc = tok_buf_put(&cat, b + skip, bl - skip)))
            break;
        int32_t inew = tok_strmap_get(&m->vocab, cat.data, cat.len);
        if (inew < 0) {
            rc = lm_err_set(err, -EINVAL,
                            "model BPE: merges[%zu]: merged token \"%s\" is not in the vocab", i,
                            cat.data);
            break;
        }
        merge_put(m, ia, ib, (uint32_t)i, inew);
    }
    tok_buf_free(&cat);
    if (rc)
        goto fail;
    *ret = m;
    return 0;
fail:
    tok_bpe_free(m);
    return rc;
}

/* ---- min-heap on (rank, pos) --------------------------------------------- */

static bool heap_less(heap_ent a, heap_ent b)
{
    return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static int heap_push(bpe_scratch *s, heap_ent e)
{
    if (s->heap_n == s->heap_cap) {
        size_t cap = s->heap_cap ? s->heap_cap * 2 : 64;
        heap_ent *h = realloc(s->heap, cap * sizeof(*h));
        if (!h)
            return -ENOMEM;
        s->heap = h;
        s->heap_cap = cap;
    }
    size_t i = s->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(e, s->heap[p]))
            break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = e;
    return 0;
}

static heap_ent heap_pop(bpe_scratch *s)
{
    heap_ent top = s->heap[0];
    heap_ent last = s->heap[--s->heap_n];
    size_t i = 0, n = s->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && heap_less(s->heap[c + 1], s->heap[c]))
            c++;
        if (!heap_less(s->heap[c], last))
            break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n)
        s->heap[i] = last;
    return top;
}

/* ---- encoding one word --------------------------------------------------- */

static int sym_add(bpe_scratch *s, size_t *n, int32_t id, uint32_t len)
{
    if (*n == s->syms_cap) {
        size_t cap = s->syms_cap ? s->syms_cap * 2 : 256;
        sym *v = realloc(s->syms, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        s->syms = v;
        s->syms_cap = cap;
    }
    int32_t i = (int32_t)*n;
    s->syms[i] = (sym){id, i - 1, -1, len};
    if (i > 0)
        s->syms[i - 1].next = i;
    (*n)++;
    return 0;
}

/* Look up one character (with prefix/suffix as configured). */
static int32_t char_id(const tok_bpe *m, bpe_scratch *s, const char *c, int n, int32_t cp,
                       bool first, bool last)
{
    if (m->cp_id)
        return cp < 0x10000 ? m->cp_id[cp] : tok_strmap_get(&m->vocab, c, (size_t)n);
    s->tmp.len = 0;
    if (!first && m->prefix)
        tok_buf_put(&s->tmp, m->prefix, m->prefix_len);
    tok_buf_put(&s->tmp, c, (size_t)n);
    if (last && m->suffix)
        tok_buf_put(&s->tmp, m->suffix, m->suffix_len);
    return tok_strmap_get(&m->vocab, s->tmp.data, s->tmp.len);
}

int tok_bpe_word(const tok_bpe *m, const char *w, size_t len, tok_ids *ids, void *scratch,
                 lm_err *err)
{
    bpe_scratch *s = scratch;
    int rc;
    if (!len)
        return 0;
    if (m->ignore_merges) {
        int32_t id = tok_strmap_get(&m->vocab, w, len);
        if (id >= 0)
            return tok_ids_push(ids, id);
    }
    size_t n = 0;
    int32_t unk = -1;         /* pending unk (Rust keeps one to fuse) */
    uint32_t unk_len = 0;
    for (size_t i = 0; i < len;) {
        int k;
        int32_t cp = tok_utf8_decode(w + i, len - i, &k);
        bool first = i == 0, last = i + (size_t)k == len;
        int32_t id = char_id(m, s, w + i, k, cp, first, last);
        if (id >= 0) {
            if (unk >= 0 && (rc = sym_add(s, &n, unk, unk_len)))
                return rc;
            unk = -1;
            if ((rc = sym_add(s, &n, id, (uint32_t)k)))
                return rc;
            i += (size_t)k;
            continue;
        }
        if (m->byte_fallback) {
            /* every byte of the (prefixed) character must have a <0xXX> token */
            const char *src = w + i;
            size_t sl = (size_t)k;
            if (!m->cp_id) {
                src = s->tmp.data;
                sl = s->tmp.len;
            }
            bool ok = true;
            for (size_t b = 0; b < sl; b++)
                ok = ok && m->byte_id[(unsigned char)src[b]] >= 0;
            if (ok) {
                for (size_t b = 0; b < sl; b++)
                    if ((rc = sym_add(s, &n, m->byte_id[(unsigned char)src[b]], 1)))
                        return rc;
                i += (size_t)k;
                continue;
            }
        }
        if (m->unk_token) {
            if (m->unk_id < 0)
                return lm_err_set(err, -EINVAL, "BPE: unk_token \"%s\" is not in the vocabulary",
                                  m->unk_token);
            if (unk >= 0 && m->fuse_unk) {
                unk_len += (uint32_t)k;
            } else {
                if (unk >= 0 && (rc = sym_add(s, &n, unk, unk_len)))
                    return rc;
                unk = m->unk_id;
                unk_len = (uint32_t)k;
            }
        }
        i += (size_t)k;
    }
    if (unk >= 0 && (rc = sym_add(s, &n, unk, unk_len)))
        return rc;

    /* merge_all */
    s->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        const merge_slot *ms = merge_get(m, s->syms[i].id, s->syms[i + 1].id);
        if (ms && (rc = heap_push(s, (heap_ent){ms->rank, (uint32_t)i, ms->new_id})))
            return rc;
    }
    sym *v = s->syms;
    while (s->heap_n) {
        heap_ent top = heap_pop(s);
        sym *cur = &v[top.pos];
        if (cur->len == 0 || cur->next < 0)
            continue;
        int32_t nx = cur->next;
        const merge_slot *ms = merge_get(m, cur->id, v[nx].id);
        if (!ms || ms->new_id != top.new_id)
            continue;   /* stale entry */
        cur->id = top.new_id;
        cur->len += v[nx].len;
        cur->next = v[nx].next;
        v[nx].len = 0;
        if (cur->next >= 0)
            v[cur->next].prev = (int32_t)top.pos;
        if (cur->prev >= 0) {
            ms = merge_get(m, v[cur->prev].id, cur->id);
            if (ms && (rc = heap_push(s, (heap_ent){ms->rank, (uint32_t)cur->prev, ms->new_id})))
                return rc;
        }
        if (cur->next >= 0) {
            ms = merge_get(m, cur->id, v[cur->next].id);
            if (ms && (rc = heap_push(s, (heap_ent){ms->rank, top.pos, ms->new_id})))
                return rc;
        }
    }
    for (size_t i = 0; i < n; i++)
        if (v[i].len && (rc = tok_ids_push(ids, v[i].id)))
            return rc;
    return 0;
}
