/*
 * sched_ctl.c: adaptive step budget (see sched_ctl.h for the method).
 */
#include "engine/sched_ctl.h"

#include <math.h>

#define CTL_FORGET 0.97     /* weight of the past per step in the cost fit */
#define CTL_OVER_ALPHA 0.02 /* EWMA step of the over-target rate */
#define CTL_OVER_GOAL 0.03  /* p95 with headroom: aim at 3% of steps over target */
#define CTL_MARGIN_MIN 0.3
#define CTL_MARGIN_MAX 1.0
#define CTL_WARMUP 4        /* observations before the fit is trusted */

static int32_t clamp_i32(double v, int32_t lo, int32_t hi)
{
    if (!(v >= lo)) /* also NaN */
        return lo;
    if (v > hi)
        return hi;
    return (int32_t)v;
}

void sched_ctl_init(sched_ctl *c, double target_ms, int32_t min_tokens, int32_t max_tokens,
                    int32_t max_seqs)
{
    *c = (sched_ctl){0};
    if (min_tokens < 1)
        min_tokens = 1;
    if (max_tokens < min_tokens)
        max_tokens = min_tokens;
    c->target_ms = target_ms > 0 ? target_ms : 0;
    c->min_tokens = min_tokens;
    c->max_tokens = max_tokens;
    c->max_seqs = max_seqs;
    c->margin = 0.8;
    if (c->target_ms == 0) {
        c->budget = max_tokens;
        c->limit = max_seqs < max_tokens ? max_seqs : max_tokens;
        return;
    }
    /* Until steps have been measured, start at a quarter of the range: not
     * so large that the first steps blow the target on a slow device. */
    c->budget = clamp_i32(min_tokens + (max_tokens - min_tokens) / 4.0, min_tokens, max_tokens);
    c->limit = c->budget < max_seqs ? c->budget : max_seqs;
}

void sched_ctl_observe(sched_ctl *c, int32_t tokens, double step_ms, int decoding)
{
    if (c->target_ms == 0 || tokens <= 0 || !(step_ms >= 0))
        return;
    c->n_steps++;
    if (c->n_steps == 1)
        return; /* the first forward pays one-time costs (page faults, thread start) */
    double x = tokens, y = step_ms;
    /* A step far slower than predicted is most likely the machine, not the
     * step size (another process, a page fault): it still counts against
     * the target below, but the fit only sees it clipped to twice the
     * prediction, so one hiccup does not halve the budget for 30 steps. */
    if (c->n_obs >= CTL_WARMUP) {
        double pred = c->a + c->b * x;
        if (y > 2 * pred + 1)
            y = 2 * pred + 1;
    }
    c->sw = CTL_FORGET * c->sw + 1;
    c->sx = CTL_FORGET * c->sx + x;
    c->sy = CTL_FORGET * c->sy + y;
    c->sxx = CTL_FORGET * c->sxx + x * x;
    c->sxy = CTL_FORGET * c->sxy + x * y;
    c->n_obs++;

    /* Weighted least squares. With too little spread in x (all steps the
     * same size) the slope is unidentifiable: then assume the fixed cost
     * is the part that does not scale, i.e. keep the last intercept and
     * take the slope from the mean. */
    double mx = c->sx / c->sw, my = c->sy / c->sw;
    double var = c->sxx / c->sw - mx * mx;
    double cov = c->sxy / c->sw - mx * my;
    if (var > 0.25 + 1e-3 * mx * mx) {
        c->b = cov / var;
        c->a = my - c->b * mx;
    } else {
        c->a = c->a < my ? c->a : 0;
        c->b = (my - c->a) / mx;
    }
    if (c->a < 0) { /* a negative fixed cost is noise: refit through zero */
        c->a = 0;
        c->b = c->sxy / c->sxx;
    }
    if (!(c->b > 1e-6))
        c->b = 1e-6;

    if (decoding) {
        double over = step_ms > c->target_ms; /* the real time, not the clipped one */
        c->over_ewma += CTL_OVER_ALPHA * (over - c->over_ewma);
        if (c->over_ewma > CTL_OVER_GOAL)
            c->margin *= over ? 0.95 : 1.0; /* back off on each miss while too many */
        else
            c->margin += 0.005;
    }
    if (c->margin < CTL_MARGIN_MIN)
        c->margin = CTL_MARGIN_MIN;
    if (c->margin > CTL_MARGIN_MAX)
        c->margin = CTL_MARGIN_MAX;

    if (c->n_obs < CTL_WARMUP)
        return;
    double want = (c->margin * c->target_ms - c->a) / c->b;
    int32_t budget = clamp_i32(floor(want), c->min_tokens, c->max_tokens);
    /* Grow at most 2x per step: the fit extrapolates beyond what was seen. */
    if (budget > 2 * c->budget)
        budget = 2 * c->budget;
    c->budget = budget;
    c->limit = budget < c->max_seqs ? budget : c->max_seqs;
}
