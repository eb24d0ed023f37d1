/*
 * sched_ctl.h: the adaptive controller of the scheduler's step size.
 *
 * The scheduler asks two numbers before every step: the token budget (how
 * many tokens, decode plus prefill chunks, the step may forward) and the
 * batch limit (how many sequences may be running). A sequence that decodes
 * gets one token per step, so its inter-token latency (ITL) is the step
 * time. The controller keeps the p95 step time under target_ms while making
 * steps as large as that allows (larger steps = more throughput, since the
 * weights are read once per step whatever its size).
 *
 * How (docs/SCHEDULER.md has the reasoning):
 *  1. A cost model step_ms = a + b * tokens, fitted by exponentially
 *     weighted least squares over recent steps (forgetting factor 0.97, so
 *     about the last 30 steps count), which follows changes in load, in
 *     the mix of experts touched, in other processes on the machine.
 *  2. The budget is the largest token count whose predicted time is under
 *     margin * target: (margin * target - a) / b, clamped to
 *     [min_tokens, max_tokens]; the batch limit is min(max_seqs, budget)
 *     so that a step of pure decodes always fits.
 *  3. margin closes the loop on the p95 itself: an EWMA of "step took
 *     longer than target" (about the last 50 steps) is kept under 3%: above
 *     3%, every over-target step cuts margin by 5% (multiplicative
 *     decrease), below it margin grows by 0.005 a step (additive
 *     increase), within [0.3, 1]. Only steps in which some sequence was
 *     decoding count (a prefill-only step delays no token).
 * With target_ms == 0 the controller is off: budget = max_tokens,
 * limit = max_seqs, always.
 *
 * Plain data, no allocation, one thread (the engine thread); the scheduler
 * copies its numbers into sched_stats.
 */
#ifndef LIGHTMOE_SCHED_CTL_H
#define LIGHTMOE_SCHED_CTL_H

#include <stdint.h>

typedef struct sched_ctl {
    double target_ms;                   /* 0 = off */
    int32_t min_tokens, max_tokens;     /* budget range */
    int32_t max_seqs;                   /* batch limit upper bound */
    double sw, sx, sy, sxx, sxy;        /* weighted sums of 1, x, y, x^2, xy */
    double a, b;                        /* fitted step_ms = a + b * tokens */
    double margin;                      /* fraction of target aimed at */
    double over_ewma;                   /* EWMA of (step_ms > target) */
    int64_t n_obs, n_steps;
    int32_t budget, limit;              /* current outputs */
} sched_ctl;

void sched_ctl_init(sched_ctl *c, double target_ms, int32_t min_tokens, int32_t max_tokens,
                    int32_t max_seqs);

/* Record one step: it forwarded `tokens` tokens and took step_ms; updates
 * budget and limit. `decoding` says whether any sequence in it was
 * decoding: steps of prefill only (run at full size, since no one's
 * inter-token latency is at stake) feed the cost fit but not the
 * over-target rate. Steps of 0 tokens are ignored. */
void sched_ctl_observe(sched_ctl *c, int32_t tokens, double step_ms, int decoding);

#endif
