/*
 * fake_backend.c: see fake_backend.h.
 */
#include "tests/sched/fake_backend.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FAKE_H0 0x243f6a8885a308d3ull

static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

static uint64_t next_hash(uint64_t prev, int32_t tok, int32_t pos)
{
    return mix(mix(prev, (uint64_t)(uint32_t)tok), (uint64_t)pos);
}

/* Logits in [0, 8): peaked enough that greedy ties essentially never
 * happen, spread enough that sampling at temperature 1 varies. */
static void fill_logits(uint64_t h, int32_t vocab, float *row)
{
    for (int32_t v = 0; v < vocab; v++)
        row[v] = (float)(mix(h, (uint64_t)v) >> 40) / (float)(1 << 24) * 8.0f;
}

static void poison(const fake_backend *fb, int32_t pos, float *row)
{
    if (fb->poison_pos < 0 || pos != fb->poison_pos)
        return;
    if (fb->poison_token >= 0)
        row[fb->poison_token] = NAN;
    else
        for (int32_t v = 0; v < fb->vocab; v++)
            row[v] = -INFINITY;
}

/* The pick a device makes of the row at position pos (backend.h): the
 * sampler's pieces, and on failure what the device reports instead of a
 * message (the lowest NaN / +inf token, or -1 when every logit is -inf). */
static void fake_pick(fake_backend *fb, const backend_batch *bt, int32_t i, uint64_t h,
                      int32_t pos)
{
    const backend_pick *pk = &bt->picks[i];
    backend_pick_out *o = &bt->picks_out[i];
    float *row = fb->pick_row;
    fill_logits(h, fb->vocab, row);
    poison(fb, pos, row);
    sample_apply_penalties(row, pk->p, bt->penalties + pk->pen_begin, pk->n_pen);
    memset(o, 0, sizeof *o);
    o->bad_token = -1;
    o->bad_value = -INFINITY;
    for (int32_t v = 0; v < fb->vocab; v++)
        if (isnan(row[v]) || row[v] == INFINITY) {
            o->bad_token = v;
            o->bad_value = row[v];
            break;
        }
    o->status = sample_pick_drawn(row, fb->vocab, pk->p, pk->draw, fb->pick_scratch, &o->r, NULL);
}

/* Check a batch's picks against what the backend reported (backend.h). */
static int check_picks(fake_backend *fb, const backend_batch *bt)
{
    if (!fb->device_sampling)
        return -1;
    if (!bt->picks_out || bt->n_penalties < 0 || bt->n_penalties > fb->max_penalties ||
        (bt->n_penalties > 0 && !bt->penalties))
        return -1;
    for (int32_t i = 0; i < bt->n_logits; i++) {
        const backend_pick *pk = &bt->picks[i];
        if (!pk->p || pk->n_pen < 0 || pk->pen_begin < 0 ||
            pk->pen_begin + pk->n_pen > bt->n_penalties)
            return -1;
    }
    for (int32_t k = 0; k < bt->n_penalties; k++)
        if (bt->penalties[k].id < 0 || bt->penalties[k].id >= fb->vocab ||
            bt->penalties[k].count < 0)
            return -1;
    return 0;
}

static int fail(fake_backend *fb, lm_err *err, const char *msg, int a, int b)
{
    char buf[256];
    snprintf(buf, sizeof buf, msg, a, b);
    if (!fb->protocol_errors++)
        snprintf(fb->first_error, sizeof fb->first_error, "%s", buf);
    return lm_err_set(err, -EPROTO, "fake backend: %s", buf);
}

static int fake_kv_init(backend *b, int32_t block_size, int32_t n_blocks, lm_err *err)
{
    fake_backend *fb = (fake_backend *)b;
    if (fb->slot_hash)
        return lm_err_set(err, -EINVAL, "fake backend: kv_init called twice");
    size_t n = (size_t)block_size * n_blocks;
    fb->slot_hash = calloc(n, sizeof *fb->slot_hash);
    fb->slot_pos = malloc(n * sizeof *fb->slot_pos);
    if (!fb->slot_hash || !fb->slot_pos)
        return lm_err_set(err, -ENOMEM, "fake backend: no memory for %d blocks", n_blocks);
    memset(fb->slot_pos, 0xff, n * sizeof *fb->slot_pos);
    fb->block_size = block_size;
    fb->n_blocks = n_blocks;
    return 0;
}

static int fake_kv_copy(backend *b, int32_t src, int32_t dst, lm_err *err)
{
    fake_backend *fb = (fake_backend *)b;
    size_t bs = (size_t)fb->block_size;
    memcpy(fb->slot_hash + dst * bs, fb->slot_hash + src * bs, bs * sizeof *fb->slot_hash);
    memcpy(fb->slot_pos + dst * bs, fb->slot_pos + src * bs, bs * sizeof *fb->slot_pos);
    return 0;
}

static int fake_forward(backend *b, const backend_batch *bt, lm_err *err)
{
    fake_backend *fb = (fake_backend *)b;
    while (atomic_load(&fb->gate_closed)) {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    if (fb->fail_forwards > 0) {
        fb->fail_forwards--;
        return lm_err_set(err, -EIO, "fake backend: injected failure");
    }
    if (!fb->slot_hash)
        return fail(fb, err, "forward before kv_init (%d %d)", 0, 0);
    if (bt->n_seqs < 1 || bt->seq_start[0] != 0 || bt->seq_start[bt->n_seqs] != bt->n_tokens)
        return fail(fb, err, "bad batch shape: %d seqs, %d tokens", bt->n_seqs, bt->n_tokens);
    if (bt->picks && check_picks(fb, bt) < 0)
        return fail(fb, err, "bad picks: %d penalty entries (device sampling %d)",
                    bt->n_penalties, fb->device_sampling);
    if (!bt->picks && bt->n_logits > 0 && !bt->logits)
        return fail(fb, err, "no logits buffer and no picks for %d rows of %d seqs", bt->n_logits,
                    bt->n_seqs);
    int32_t bs = fb->block_size, r = 0;
    for (int32_t s = 0; s < bt->n_seqs; s++) {
        const int32_t *table = bt->block_table + (size_t)s * bt->max_blocks;
        int32_t p0 = bt->start_pos[s];
        int32_t len = bt->seq_start[s + 1] - bt->seq_start[s];
        if (len < 1)
            return fail(fb, err, "piece %d has %d tokens", s, len);
        if (p0 + len > fb->max_context)
            return fail(fb, err, "piece %d runs past the context to %d", s, p0 + len);
        /* All earlier positions must be in the cache; read the last one. */
        uint64_t h = FAKE_H0;
        for (int32_t p = 0; p < p0; p++) {
            int32_t blk = table[p / bs];
            if (blk < 0 || blk >= fb->n_blocks)
                return fail(fb, err, "block id %d out of range at position %d", blk, p);
            if (fb->slot_pos[(size_t)blk * bs + p % bs] != p)
                return fail(fb, err, "position %d missing from the cache (piece %d)", p, s);
        }
        if (p0 > 0)
            h = fb->slot_hash[(size_t)table[(p0 - 1) / bs] * bs + (p0 - 1) % bs];
        for (int32_t i = 0; i < len; i++) {
            int32_t p = p0 + i, row = bt->seq_start[s] + i;
            int32_t blk = table[p / bs];
            if (blk < 0 || blk >= fb->n_blocks)
                return fail(fb, err, "block id %d out of range at position %d", blk, p);
            int32_t tok = bt->tokens[row];
            if (tok < 0 || tok >= fb->vocab)
                return fail(fb, err, "token %d out of range at row %d", tok, row);
            h = next_hash(h, tok, p);
            fb->slot_hash[(size_t)blk * bs + p % bs] = h;
            fb->slot_pos[(size_t)blk * bs + p % bs] = p;
            if (r < bt->n_logits && bt->logit_rows[r] == row) {
                if (bt->picks) {
                    fake_pick(fb, bt, r++, h, p);
                } else {
                    float *out = bt->logits + (size_t)r++ * fb->vocab;
                    fill_logits(h, fb->vocab, out);
                    poison(fb, p, out);
                }
            }
        }
    }
    if (r != bt->n_logits)
        return fail(fb, err, "logit rows not in token order (%d of %d filled)", r, bt->n_logits);
    fb->forwards++;
    fb->tokens += bt->n_tokens;
    if (bt->n_logits > 0 && bt->picks)
        fb->pick_forwards++;
    else if (bt->n_logits > 0)
        fb->logit_forwards++;
    if (bt->n_penalties > fb->max_penalties_seen)
        fb->max_penalties_seen = bt->n_penalties;
    if (bt->n_tokens > fb->max_step_tokens_seen)
        fb->max_step_tokens_seen = bt->n_tokens;
    if (bt->n_seqs > fb->max_step_seqs_seen)
        fb->max_step_seqs_seen = bt->n_seqs;
    double us = fb->a_us + fb->b_us * bt->n_tokens;
    if (us > 0) {
        struct timespec ts = {(time_t)(us / 1e6), (long)((us - (time_t)(us / 1e6) * 1e6) * 1e3)};
        nanosleep(&ts, NULL);
    }
    return 0;
}

static void fake_info(const backend *b, backend_info *ret)
{
    const fake_backend *fb = (const fake_backend *)b;
    *ret = (backend_info){
        .name = "fake",
        .vocab = fb->vocab,
        .max_context = fb->max_context,
        .tensor_parallel = 1,
        .kv_bytes_per_token = fb->kv_bytes_per_token,
        .device_memory_free = fb->device_memory_free,
        .device_sampling = fb->device_sampling,
        .max_penalties = fb->max_penalties,
    };
}

static void fake_destroy(backend *b)
{
    fake_backend *fb = (fake_backend *)b;
    free(fb->slot_hash);
    free(fb->slot_pos);
    free(fb->pick_row);
    free(fb->pick_scratch);
    free(fb);
}

static const backend_ops fake_ops = {
    .kv_init = fake_kv_init,
    .kv_copy = fake_kv_copy,
    .forward = fake_forward,
    .info = fake_info,
    .destroy = fake_destroy,
};

fake_backend *fake_backend_create(int32_t vocab, int32_t max_context, double a_us, double b_us)
{
    fake_backend *fb = calloc(1, sizeof *fb);
    if (!fb)
        return NULL;
    fb->base.ops = &fake_ops;
    fb->vocab = vocab;
    fb->max_context = max_context;
    fb->kv_bytes_per_token = 1024;
    fb->a_us = a_us;
    fb->b_us = b_us;
    fb->poison_pos = -1;
    fb->pick_row = malloc((size_t)vocab * sizeof *fb->pick_row);
    fb->pick_scratch = malloc(sample_scratch_bytes(vocab));
    if (!fb->pick_row || !fb->pick_scratch) {
        fake_destroy(&fb->base);
        return NULL;
    }
    return fb;
}

int32_t fake_reference(const fake_backend *fb, const int32_t *prompt, int32_t n_prompt,
                       int32_t max_tokens, const sample_params *sp, const int32_t *stop,
                       int32_t n_stop, int32_t *out)
{
    int32_t cap = n_prompt + max_tokens;
    int32_t *hist = malloc((size_t)cap * sizeof *hist);
    float *row = malloc((size_t)fb->vocab * sizeof *row);
    void *scratch = malloc(sample_scratch_bytes(fb->vocab));
    memcpy(hist, prompt, (size_t)n_prompt * sizeof *hist);
    sample_rng rng;
    sample_rng_seed(&rng, sp->seed);
    uint64_t h = FAKE_H0;
    int32_t n = n_prompt, n_out = 0;
    for (int32_t p = 0; p < n_prompt - 1; p++)
        h = next_hash(h, hist[p], p);
    while (n_out < max_tokens) {
        h = next_hash(h, hist[n - 1], n - 1);
        fill_logits(h, fb->vocab, row);
        sample_result res;
        if (sample_pick(row, fb->vocab, sp, &rng, hist, n_prompt, hist + n_prompt, n_out,
                        scratch, &res, NULL) < 0)
            break;
        hist[n++] = res.token;
        out[n_out++] = res.token;
        int stopped = 0;
        for (int32_t i = 0; i < n_stop; i++)
            stopped |= stop[i] == res.token;
        if (stopped)
            break;
    }
    free(hist);
    free(row);
    free(scratch);
    return n_out;
}
