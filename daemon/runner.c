/*
 * runner.c: the daemon's adapter over the engine (see runner.h).
 */
#include "daemon/runner.h"

#include <stdlib.h>
#include <string.h>

#include "daemon/config.h"

int runner_load(const struct daemon_config *cfg, runner_progress_fn progress, void *puser,
               void (*tick)(void *), void *tick_user, runner **ret, lm_err *err)
{
    return lm_err_set(err, -ENOSYS, "%s: the engine is not built into this lightmoed yet",
                      cfg->model);
}
int runner_warmup(runner *m, lm_err *err) { return -ENOSYS; }
int runner_render(runner *m, const runner_msg *msgs, int32_t n, char **ret_text, lm_err *err) { return -ENOSYS; }
int runner_prepare(runner *m, const char *p, const runner_msg *msgs, int32_t n, int32_t **ret_ids, int32_t *ret_n, lm_err *err) { return -ENOSYS; }
int runner_generate(runner *m, const runner_gen *g, uint64_t *ret_id, lm_err *err) { return -ENOSYS; }
void runner_cancel(runner *m, uint64_t id) {}
void runner_get_info(runner *m, runner_info *ret) { memset(ret, 0, sizeof *ret); }
void runner_get_stats(runner *m, sched_stats *ret) { memset(ret, 0, sizeof *ret); }
void runner_destroy(runner *m) {}
#if !__has_include("engine/sample.c")
/* TEMPORARY until engine/sample.c lands */
void sample_params_default(sample_params *p)
{
    memset(p, 0, sizeof *p);
    p->top_p = 1;
    p->repetition_penalty = 1;
}
int sample_params_check(const sample_params *p, lm_err *err)
{
    if (p->temperature < 0)
        return lm_err_set(err, -EINVAL, "temperature must be >= 0 (got %g)", p->temperature);
    if (!(p->top_p > 0 && p->top_p <= 1))
        return lm_err_set(err, -EINVAL, "top_p must be in (0, 1] (got %g)", p->top_p);
    return 0;
}
#endif
