/*
 * fake_backend.h: a backend (engine/backend.h) for scheduler tests.
 *
 * Its "KV cache" stores, for every slot, a rolling hash of the whole token
 * history up to that position (h_p = mix(h_{p-1}, token_p, p)), just as
 * real KV depends on everything before it. Logits are a pseudo-random
 * function of that hash. So the output of a sequence is a deterministic
 * function of its tokens, and any mistake of the scheduler (a wrong block
 * table, a shared block overwritten, a position skipped or fed twice, a
 * preempted sequence resumed wrongly) changes the output, which the tests
 * compare with fake_reference(), a plain sequential computation.
 *
 * A forward also checks what it can see directly (positions before a piece
 * present in the cache, block ids in range, batch shape) and fails with
 * -EPROTO and a message when something is off. Each step sleeps
 * cost_us = a_us + b_us * n_tokens so that timing-dependent code runs.
 *
 * With device_sampling set (before sched_create, which reads the info) the
 * backend reports backend_info.device_sampling and max_penalties and, for
 * a batch with picks, makes each pick itself as a device would: the fake
 * logits row, sample_apply_penalties with the row's entries, then
 * sample_pick_drawn with the pick's draw; only picks_out comes back. A
 * batch without picks gets logits as before (the scheduler's fallback).
 * poison_pos >= 0 spoils every logits row made at that position (both
 * paths): token poison_token becomes NaN, or with poison_token < 0 every
 * logit becomes -inf.
 */
#ifndef TESTS_SCHED_FAKE_BACKEND_H
#define TESTS_SCHED_FAKE_BACKEND_H

#include <stdatomic.h>
#include <stdint.h>

#include "engine/backend.h"
#include "engine/sample.h"

typedef struct fake_backend {
    backend base;
    int32_t vocab, max_context;
    size_t kv_bytes_per_token, device_memory_free;
    double a_us, b_us;          /* step cost model (sleep) */
    int32_t block_size, n_blocks;
    uint64_t *slot_hash;        /* [n_blocks * block_size] */
    int32_t *slot_pos;          /* [n_blocks * block_size], -1 = never written */
    /* Observations (written by the engine thread; read after it stops or
     * with care). */
    int64_t forwards, tokens;
    int32_t max_step_tokens_seen, max_step_seqs_seen;
    int32_t protocol_errors;
    char first_error[256];
    int fail_forwards;          /* > 0: the next forwards fail with -EIO */
    atomic_int gate_closed;     /* while set, forward waits (lets a test queue work) */
    /* Device sampling (see above): settings, then observations. */
    int device_sampling;
    int32_t max_penalties;
    int32_t poison_pos;         /* -1 (default): off */
    int32_t poison_token;
    int64_t pick_forwards;      /* forwards with logit rows that came with picks */
    int64_t logit_forwards;     /* forwards with logit rows that came without */
    int32_t max_penalties_seen; /* largest n_penalties of a batch */
    float *pick_row;            /* [vocab] the row being picked */
    void *pick_scratch;         /* sample_scratch_bytes(vocab) */
} fake_backend;

/* vocab >= 2, max_context >= 1. Returns NULL on out of memory. */
fake_backend *fake_backend_create(int32_t vocab, int32_t max_context, double a_us, double b_us);

/*
 * What the scheduler should produce for this request: the tokens sampled
 * one at a time from the fake logits with sample_pick, stopping at a token
 * in stop[] (n_stop of them; included in the output, like the scheduler)
 * or after max_tokens. Returns the number of tokens written to out.
 * Device sampling and poison do not apply: this is the host's clean run.
 */
int32_t fake_reference(const fake_backend *fb, const int32_t *prompt, int32_t n_prompt,
                       int32_t max_tokens, const sample_params *sp, const int32_t *stop,
                       int32_t n_stop, int32_t *out);

#endif
