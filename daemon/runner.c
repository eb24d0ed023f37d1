/*
 * runner.c: the daemon's adapter over the engine (see runner.h): loads the
 * checkpoint, opens the backend, tokenizer and chat template, starts the
 * scheduler and the text pipeline (gen), and maps gen's events to the
 * daemon's two callbacks.
 */
#include "daemon/runner.h"

#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/config.h"
#include "engine/backends.h"
#include "engine/chat.h"
#include "engine/gen.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

/* runner_msg is passed to the engine as chat_message. */
_Static_assert(sizeof(runner_msg) == sizeof(chat_message) &&
                   offsetof(runner_msg, role) == offsetof(chat_message, role) &&
                   offsetof(runner_msg, content) == offsetof(chat_message, content),
               "runner_msg and chat_message must have the same layout");

struct runner {
    model *mdl;
    backend *be;
    tokenizer *tok;
    chat_template *tmpl;            /* NULL when the model has none */
    sched *sch;
    gen *g;
    runner_info info;
};

/* One request in flight: gen's user pointer. */
typedef struct req_ctx {
    void (*on_delta)(void *, const char *, size_t, const int32_t *, int32_t,
                     const sample_result *);
    void (*on_finish)(void *, const runner_finish *);
    void *user;
} req_ctx;

static void on_gen_event(void *user, const gen_event *ev)
{
    req_ctx *c = user;
    if (ev->type == GEN_EVENT_DELTA) {
        c->on_delta(c->user, ev->text ? ev->text : "", ev->len, &ev->tok->token, 1, ev->tok);
        return;
    }
    if (ev->len)
        c->on_delta(c->user, ev->text, ev->len, NULL, 0, NULL);
    runner_finish f = {ev->finish, ev->prompt_tokens, ev->completion_tokens,
                       ev->cached_prompt_tokens, ev->message};
    c->on_finish(c->user, &f);
    free(c);
}

/* FNV-1a over a file's bytes (model identity for cache keys). */
static uint64_t hash_file(const char *path, uint64_t h)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return h;
    int ch;
    while ((ch = fgetc(f)) != EOF) {
        h ^= (uint8_t)ch;
        h *= 0x100000001b3ULL;
    }
    fclose(f);
    return h;
}

static void fill_info(runner *r, const char *dir, const char *device)
{
    runner_info *i = &r->info;
    const char *base = strrchr(dir, '/');
    size_t dl = strlen(dir);
    while (base && base[1] == 0 && base > dir) { /* trailing slash */
        dl = (size_t)(base - dir);
        base = memrchr(dir, '/', dl);
    }
    base = base ? base + 1 : dir;
    snprintf(i->name, sizeof i->name, "%.*s", (int)(dir + dl - base), base);
    snprintf(i->architecture, sizeof i->architecture, "%s", r->mdl->cfg.model_type);
    if (r->mdl->cfg.quant.gptq)
        snprintf(i->quantization, sizeof i->quantization, "gptq-int%d-g%d",
                 r->mdl->cfg.quant.bits, r->mdl->int4_group);
    else if (r->mdl->int4)
        snprintf(i->quantization, sizeof i->quantization, "int4-rtn-g%d", r->mdl->int4_group);
    else
        snprintf(i->quantization, sizeof i->quantization, "none (16-bit)");
    backend_info bi;
    backend_get_info(r->be, &bi);
    snprintf(i->device, sizeof i->device, "%s", bi.name ? bi.name : device);
    i->context_length = bi.max_context > 0 ? bi.max_context : r->mdl->cfg.max_position;
    i->vocab_size = r->mdl->cfg.vocab;
    i->tensor_parallel = bi.tensor_parallel > 0 ? bi.tensor_parallel : 1;
    char p[CONFIG_STR_MAX + 32];
    snprintf(p, sizeof p, "%s/config.json", dir);
    uint64_t h = hash_file(p, 0xcbf29ce484222325ULL);
    h ^= tokenizer_fingerprint(r->tok);
    h *= 0x100000001b3ULL;
    snprintf(i->id, sizeof i->id, "%s@%016llx%s", i->name, (unsigned long long)h,
             r->mdl->int4 ? "-int4" : "");
}

int runner_load(const struct daemon_config *cfg, runner_progress_fn progress, void *puser,
                void (*tick)(void *), void *tick_user, runner **ret, lm_err *err)
{
    runner *r = calloc(1, sizeof *r);
    if (!r)
        return lm_err_set(err, -ENOMEM, "out of memory");
    int rc;
    progress(puser, "reading weights", 1, 4);
    model_load_options mo;
    model_load_options_default(&mo);
    mo.quantize_int4 = cfg->quantize_int4;
    if ((rc = model_load(cfg->model, &mo, &r->mdl, err)))
        goto fail;
    progress(puser, "opening the backend", 2, 4);
    backend_options bo;
    backend_options_default(&bo);
    bo.device = cfg->device;
    bo.threads = (int)cfg->threads;
    bo.tp = (int)cfg->tensor_parallel;
    int dev_ids[64], n_dev = 0;
    char derr[256];
    if (cfg->devices[0]) {
        if (dconf_parse_devices(cfg->devices, dev_ids, 64, &n_dev, derr, sizeof derr)) {
            rc = lm_err_set(err, -EINVAL, "%s", derr);
            goto fail;
        }
        bo.devices = dev_ids;
    }
    sched_config sc;
    sched_config_default(&sc);
    bo.max_tokens = sc.max_step_tokens;
    if ((rc = backend_open(r->mdl, &bo, &r->be, err)))
        goto fail;
    progress(puser, "tokenizer and chat template", 3, 4);
    if ((rc = tokenizer_load(cfg->model, &r->tok, err)))
        goto fail;
    const tokenizer_info *ti = tokenizer_get_info(r->tok);
    lm_err terr = {0};
    rc = chat_template_load(cfg->model, NULL, ti->bos_token, ti->eos_token, &r->tmpl, &terr);
    if (rc == -ENOENT) {
        r->tmpl = NULL; /* chat requests will be refused with the reason */
    } else if (rc) {
        *err = terr;
        goto fail;
    }
    progress(puser, "starting the engine", 4, 4);
    sc.max_running = (int32_t)cfg->max_batch;
    sc.sample_threads = (int32_t)cfg->sample_threads;
    sc.max_queue = (int32_t)cfg->max_queue;
    sc.kv_bytes = (size_t)cfg->kv_cache_mb << 20;
    if (!sc.kv_bytes && strcmp(cfg->device, "cuda"))
        sc.kv_bytes = (size_t)1024 << 20; /* host RAM is shared: no fraction of it */
    sc.eos_ids = r->mdl->cfg.eos_ids;
    sc.n_eos_ids = r->mdl->cfg.n_eos;
    sc.on_tick = tick;
    sc.tick_user = tick_user;
    if ((rc = sched_create(r->be, &sc, &r->sch, err)))
        goto fail;
    gen_config gc = {r->tok, r->tmpl, r->sch, r->mdl->cfg.eos_ids, r->mdl->cfg.n_eos};
    if ((rc = gen_create(&gc, &r->g, err)))
        goto fail;
    fill_info(r, cfg->model, cfg->device);
    *ret = r;
    return 0;
fail:
    runner_destroy(r);
    return rc;
}

typedef struct warm {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    int done;
    sched_finish finish;
    char msg[LM_ERR_MSG_MAX];
} warm;

static void warm_delta(void *u, const char *t, size_t n, const int32_t *ids, int32_t k,
                       const sample_result *lp)
{
}

static void warm_finish(void *u, const runner_finish *f)
{
    warm *w = u;
    pthread_mutex_lock(&w->mu);
    w->done = 1;
    w->finish = f->reason;
    snprintf(w->msg, sizeof w->msg, "%s", f->message ? f->message : "");
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

int runner_warmup(runner *r, lm_err *err)
{
    int32_t *ids = NULL, n = 0;
    int rc = runner_prepare(r, "Hello", NULL, 0, &ids, &n, err);
    if (rc)
        return lm_err_prefix(err, "warm-up");
    warm w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, ""};
    runner_gen g = {.prompt_ids = ids, .n_prompt = n, .max_tokens = 2, .on_delta = warm_delta,
                    .on_finish = warm_finish, .user = &w};
    sample_params_default(&g.sampling);
    uint64_t id;
    rc = runner_generate(r, &g, &id, err);
    free(ids);
    if (rc)
        return lm_err_prefix(err, "warm-up");
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cond, &w.mu);
    pthread_mutex_unlock(&w.mu);
    if (w.finish == SCHED_FINISH_ERROR)
        return lm_err_set(err, -EIO, "warm-up generation failed: %s", w.msg);
    return 0;
}

int runner_render(runner *r, const runner_msg *msgs, int32_t n, char **ret_text, lm_err *err)
{
    if (!r->tmpl)
        return lm_err_set(err, -EINVAL, "this model has no chat template: send `prompt`, not "
                          "`messages`");
    return chat_render(r->tmpl, (const chat_message *)msgs, n, 1, NULL, ret_text, NULL, err);
}

int runner_prepare(runner *r, const char *prompt, const runner_msg *msgs, int32_t n,
                   int32_t **ret_ids, int32_t *ret_n, lm_err *err)
{
    if (n > 0 && !r->tmpl)
        return lm_err_set(err, -EINVAL, "this model has no chat template: send `prompt`, not "
                          "`messages`");
    gen_request q;
    gen_request_default(&q);
    q.prompt = n > 0 ? NULL : prompt;
    q.messages = (const chat_message *)msgs;
    q.n_messages = n;
    return gen_prepare(r->g, &q, ret_ids, ret_n, err);
}

int runner_generate(runner *r, const runner_gen *g, uint64_t *ret_id, lm_err *err)
{
    req_ctx *c = malloc(sizeof *c);
    if (!c)
        return lm_err_set(err, -ENOMEM, "out of memory");
    c->on_delta = g->on_delta;
    c->on_finish = g->on_finish;
    c->user = g->user;
    gen_request q;
    gen_request_default(&q);
    q.prompt_ids = g->prompt_ids;
    q.n_prompt_ids = g->n_prompt;
    q.max_tokens = g->max_tokens;
    q.sampling = g->sampling;
    q.stop = g->stop;
    q.n_stop = g->n_stop;
    q.deadline_ns = g->deadline_ns;
    q.on_event = on_gen_event;
    q.user = c;
    int rc = gen_submit(r->g, &q, ret_id, err);
    if (rc)
        free(c); /* no event will come */
    return rc;
}

void runner_cancel(runner *r, uint64_t id)
{
    if (r)
        gen_cancel(r->g, id);
}

void runner_get_info(runner *r, runner_info *ret)
{
    *ret = r->info;
}

void runner_get_stats(runner *r, sched_stats *ret)
{
    sched_get_stats(r->sch, ret);
}

void runner_destroy(runner *r)
{
    if (!r)
        return;
    sched_destroy(r->sch); /* finishes every request first (gen.h's order) */
    gen_destroy(r->g);
    chat_template_free(r->tmpl);
    tokenizer_free(r->tok);
    backend_destroy(r->be);
    model_free(r->mdl);
    free(r);
}
