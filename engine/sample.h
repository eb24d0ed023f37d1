/*
 * sample.h: choosing the next token from a row of logits.
 *
 * Order of operations (the one vLLM and transformers use): repetition
 * penalty (divide positive / multiply negative logits of tokens seen in the
 * prompt or output), presence and frequency penalties (subtract, counting
 * output tokens only), temperature, then top_k, top_p (nucleus) and min_p
 * filters, then a draw from the softmax. temperature == 0 is greedy (argmax,
 * lowest id on ties) and ignores the filters. Log-probabilities reported
 * are those of the distribution after penalties and temperature, before
 * the filters (as OpenAI-style APIs report them).
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

#define SAMPLE_MAX_LOGPROBS 20

typedef struct sample_params {
    float temperature;          /* 0 = greedy */
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
 * Pick a token. `logits` [vocab] is modified in place (penalties and
 * temperature applied). `prompt`/`output` are the ids seen so far (for the
 * penalties). `scratch` is sample_scratch_bytes(vocab) bytes.
 */
int sample_pick(float *logits, int32_t vocab, const sample_params *p, sample_rng *rng,
                const int32_t *prompt, int32_t n_prompt, const int32_t *output,
                int32_t n_output, void *scratch, sample_result *ret, lm_err *err);

#endif
