/*
 * test_sched_ctl.c: the adaptive controller against simulated devices.
 *
 * A simulated device takes step_ms = a + b * tokens (+ noise). Load is
 * saturating (every step uses the whole budget), the hardest case for the
 * latency target. Checks: the p95 of step times after convergence stays
 * under the target; the budget is not needlessly small (>= 70% of the
 * largest budget that meets the target on average); when the device slows
 * down (b doubles) the controller follows within a few dozen steps; off
 * mode is fixed; bounds are honoured.
 */
#include "engine/sched_ctl.h"

#include <math.h>

#include "tests/sched/harness.h"

static uint64_t rng = 88172645463325252ull;
static double uniform(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Run n steps; return the p95 of the step times of the last `tail` steps. */
static double simulate(sched_ctl *c, int n, int tail, double a, double b, double noise,
                       double *ret_mean_budget)
{
    double *t = malloc((size_t)tail * sizeof *t);
    double sum_budget = 0;
    for (int i = 0; i < n; i++) {
        int32_t tok = c->budget;
        double ms = (a + b * tok) * (1 + noise * (2 * uniform() - 1));
        if (uniform() < 0.01)
            ms *= 1.5; /* rare hiccup (another process) */
        sched_ctl_observe(c, tok, ms, 1);
        if (i >= n - tail) {
            t[i - (n - tail)] = ms;
            sum_budget += tok;
        }
    }
    qsort(t, (size_t)tail, sizeof *t, cmp_double);
    double p95 = t[(int)(0.95 * (tail - 1))];
    free(t);
    if (ret_mean_budget)
        *ret_mean_budget = sum_budget / tail;
    return p95;
}

int main(void)
{
    sched_ctl c;
    /* Off: fixed. */
    sched_ctl_init(&c, 0, 8, 512, 64);
    CHECK(c.budget == 512 && c.limit == 64, "off: budget %d limit %d", c.budget, c.limit);
    sched_ctl_observe(&c, 512, 1000, 1);
    CHECK(c.budget == 512 && c.limit == 64, "off mode adapted: %d %d", c.budget, c.limit);

    /* a = 4 ms, b = 0.05 ms/token, target 20 ms: best budget ~ 320. */
    double a = 4, b = 0.05, target = 20, mean_budget;
    sched_ctl_init(&c, target, 8, 2048, 256);
    double p95 = simulate(&c, 2000, 1000, a, b, 0.1, &mean_budget);
    double best = (target - a) / b;
    printf("steady: p95 %.2f ms (target %.0f), mean budget %.0f (best-on-average %.0f), "
           "a %.2f b %.4f margin %.2f\n",
           p95, target, mean_budget, best, c.a, c.b, c.margin);
    CHECK(p95 <= target, "p95 %.2f ms over the target %.0f", p95, target);
    CHECK(mean_budget >= 0.7 * best, "budget %.0f far below %.0f", mean_budget, best);
    CHECK(fabs(c.b - b) < 0.3 * b, "fitted slope %.4f, true %.4f", c.b, b);
    CHECK(c.limit <= c.budget && c.limit <= 256, "limit %d budget %d", c.limit, c.budget);

    /* The device gets twice slower per token: budget must roughly halve. */
    int32_t before = c.budget;
    p95 = simulate(&c, 600, 500, a, 2 * b, 0.1, &mean_budget);
    printf("slower: p95 %.2f ms, budget %d -> %d\n", p95, before, c.budget);
    CHECK(p95 <= target, "after slowdown p95 %.2f over %.0f", p95, target);
    CHECK(mean_budget < 0.7 * before, "budget did not follow the slowdown: %.0f vs %d",
          mean_budget, before);

    /* Faster again: budget grows back. */
    before = c.budget;
    simulate(&c, 600, 100, a, b / 2, 0.1, &mean_budget);
    CHECK(mean_budget > 1.5 * before, "budget did not grow back: %.0f vs %d", mean_budget,
          before);

    /* A fixed cost over the target: the budget sits at min_tokens. */
    sched_ctl_init(&c, 10, 8, 512, 64);
    simulate(&c, 200, 10, 15, 0.01, 0, NULL);
    CHECK(c.budget == 8 && c.limit == 8, "impossible target: budget %d limit %d", c.budget,
          c.limit);

    /* Tiny budgets bound the batch limit too. */
    sched_ctl_init(&c, 20, 1, 4, 64);
    simulate(&c, 50, 10, 1, 0.01, 0, NULL);
    CHECK(c.budget == 4 && c.limit == 4, "max bound: budget %d limit %d", c.budget, c.limit);

    if (failures)
        fprintf(stderr, "test_sched_ctl: %d failures\n", failures);
    return failures ? 1 : 0;
}
