/*
 * sample.h: choosing the next token from a row of logits.
 *
 * Order of operations (the one vLLM and transformers use): repetition
 * penalty (divide positive / multiply negative logits of tokens seen in the
 * prompt or output), presence and frequency penalties (subtract, counting
 * output tokens only), temperature, then top_k, top_p (nucleus) and min_p
 * filters, then a draw from the softmax. temperature == 0 (or below
 * SAMPLE_MIN_TEMPERATURE) is greedy (argmax, lowest id on ties) and ignores
 * the filters and the temperature. Log-probabilities reported are those of
 * the distribution after penalties and temperature, before the filters (as
 * OpenAI-style APIs report them).
 *
 * Determinism: a request's draws come from its own sample_rng seeded from
 * `seed`, so the same seed and request give the same output whatever else
 * is in the batch.
 *
 * The sampler uses a caller-provided scratch area sized once by
 * sample_scratch_bytes(vocab): no allocation per token.
 */
#ifndef LIGHTMOE_SAMPLE_H
#define LIGHTMOE_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SAMPLE_MAX_LOGPROBS 20

typedef struct sample_params {
    float temperature;          /* 0 = greedy (so is anything below SAMPLE_MIN_TEMPERATURE) */
    int32_t top_k;              /* 0 = off */
    float top_p;                /* 1 = off */
    float min_p;                /* 0 = off */
    float repetition_penalty;   /* 1 = off */
    float presence_penalty;     /* 0 = off */
    float frequency_penalty;    /* 0 = off */
    uint64_t seed;
    int32_t logprobs;           /* number of top alternatives to report, 0..SAMPLE_MAX_LOGPROBS */
} sample_params;

typedef struct sample_rng {
    uint64_t s[4];              /* xoshiro256** state */
} sample_rng;

typedef struct sample_result {
    int32_t token;
    float logprob;                              /* of the chosen token */
    int32_t n_top;
    int32_t top_ids[SAMPLE_MAX_LOGPROBS];
    float top_logprobs[SAMPLE_MAX_LOGPROBS];
} sample_result;

/* Defaults: greedy, every filter off. */
void sample_params_default(sample_params *p);

/* Check ranges; -EINVAL with a message naming the field otherwise. */
int sample_params_check(const sample_params *p, lm_err *err);

void sample_rng_seed(sample_rng *rng, uint64_t seed);
uint64_t sample_rng_next(sample_rng *rng);
/* Uniform in [0, 1). */
double sample_rng_uniform(sample_rng *rng);

size_t sample_scratch_bytes(int32_t vocab);

/*
 * The pieces of sample_pick, for a device that picks from logits it holds
 * (engine/cuda_sample.cuh follows them step for step and gives the same
 * token). sample_pick(logits, ...) is exactly:
 *   n = sample_penalty_list(p, prompt, .., output, .., vocab, scratch, list);
 *   sample_apply_penalties(logits, p, list, n);
 *   draw = temperature > 0 ? sample_rng_next(rng) : 0;
 *   sample_pick_drawn(logits, vocab, p, draw, scratch, ret, err);
 *
 * Draws, exactly (so that any device can repeat them bit for bit): every
 * token's weight is the integer fx(e) = trunc(e * 2^S), e = the float
 * exp(logit - max) (exp_le0 below, no fused multiply-add), S =
 * sample_fixed_shift(vocab), so that the weights of the whole vocabulary
 * sum below 2^62. Tokens of weight 0 (e < 2^-S) are never drawn. Tokens
 * are ranked by e descending, then id ascending.
 *   - top_k keeps the first top_k of the ranking; M1 = their weight;
 *   - top_p keeps the shortest non-empty prefix of that whose weight
 *     reaches max(1, trunc(top_p * M1)) (double product);
 *   - min_p keeps e >= min_p (e of the mode is 1);
 *   - the draw: U = (draw >> 11) * M / 2^53 (integer, M = the kept
 *     weight), the token = the first kept id, in id order, whose running
 *     weight exceeds U.
 * Integer sums do not depend on their order, so a parallel device gets the
 * same sets and the same token.
 */
typedef struct sample_penalty {
    int32_t id;     /* a distinct id of the prompt or output */
    int32_t count;  /* its occurrences in the output */
} sample_penalty;

/* exp(x) for x <= 0 as the sampler computes it (Cephes expf, ~1 ulp; 0
 * below -87): the e of sample.h's rule is sample_exp_le0(logit - max). */
float sample_exp_le0(float x);

/* Temperatures below this pick greedily, as 0 does (and take no draw):
 * a logit times 1 / temperature must stay finite. */
#define SAMPLE_MIN_TEMPERATURE 1e-5f

/* Whether a pick with p draws (temperature >= SAMPLE_MIN_TEMPERATURE): it
 * then takes one sample_rng_next() output; else it is greedy. */
int sample_draws(const sample_params *p);

/* Whether p asks for any penalty (else the list is always empty). */
int sample_has_penalties(const sample_params *p);

/* 62 - ceil(log2(vocab)): the shift of the draw weights (above). */
int sample_fixed_shift(int32_t vocab);

/* The most entries sample_penalty_list can write for these counts:
 * min(vocab, n_output + n_prompt with a repetition penalty); 0 without
 * penalties. */
int32_t sample_penalty_list_bound(const sample_params *p, int32_t n_prompt, int32_t n_output,
                                  int32_t vocab);

/* sample_pick's error for logits it cannot sample: the lowest NaN / +inf
 * token (bad_token >= 0) or every logit -inf (bad_token -1); -EINVAL. */
int sample_pick_error(lm_err *err, int32_t bad_token, float bad_value);

/*
 * The ids a pick's penalties touch, each once, with its count in the
 * output: the prompt's and output's ids with a repetition penalty, the
 * output's with presence/frequency penalties alone; none without
 * penalties. `out` has room for sample_penalty_list_bound() entries. Ids
 * must lie in [0, vocab) (sample_pick checks them). Returns the count.
 * Costs O(ids), not a pass over the vocabulary: the scratch keeps its
 * slots clear between calls (a header marks them so).
 */
int32_t sample_penalty_list(const sample_params *p, const int32_t *prompt, int32_t n_prompt,
                            const int32_t *output, int32_t n_output, int32_t vocab, void *scratch,
                            sample_penalty *out);

/* The penalties of sample.h's order on each listed id (repetition: divide
 * a positive logit, multiply a negative one; then subtract frequency *
 * count + presence where count > 0). */
void sample_apply_penalties(float *logits, const sample_params *p, const sample_penalty *pen,
                            int32_t n);

/*
 * sample_pick after the penalties: `draw` is the pick's sample_rng_next()
 * output (ignored at temperature 0). Checks the parameters and the logits
 * (NaN, +inf, all -inf: -EINVAL naming the token).
 */
int sample_pick_drawn(float *logits, int32_t vocab, const sample_params *p, uint64_t draw,
                      void *scratch, sample_result *ret, lm_err *err);

/*
 * Pick a token. `logits` [vocab] is modified in place (penalties and
 * temperature applied). `prompt`/`output` are the ids seen so far (for the
 * penalties). `scratch` is sample_scratch_bytes(vocab) bytes.
 */
int sample_pick(float *logits, int32_t vocab, const sample_params *p, sample_rng *rng,
                const int32_t *prompt, int32_t n_prompt, const int32_t *output,
                int32_t n_output, void *scratch, sample_result *ret, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
