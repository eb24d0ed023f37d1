/*
 * gen.c: the text-generation pipeline (see gen.h for the contract).
 *
 * Per request (greq, allocated at submit, freed after FINISHED):
 *   detok   streaming detokenizer: token ids -> whole UTF-8 characters;
 *   pend    text decoded but not yet emitted: only ever the tail that
 *           could still grow into a stop string (held back) plus the
 *           newest chunk, so it stays shorter than the longest stop string
 *           plus one token's text;
 *   stopped a stop string matched: the scheduler request was cancelled and
 *           every later TOKEN event is dropped until FINISHED.
 *
 * Stop strings are matched on the decoded text, so a stop string split
 * over several tokens ("<|", "end", "|>") is found, and a token whose text
 * contains the end of a stop string and more after it is cut at the
 * match. Among several stop strings the earliest match in the text wins.
 *
 * Threads: gen_submit/gen_prepare/gen_cancel run on the caller's thread
 * and touch only the immutable gen; everything per request runs on the
 * scheduler's engine thread in its callback.
 */
#include "engine/gen.h"

#include <stdlib.h>
#include <string.h>

typedef struct greq {
    gen *g;
    gen_event_fn cb;
    void *user;
    tokenizer_detok *detok;
    int32_t n_stop;
    char *stop[GEN_MAX_STOP];
    size_t stop_len[GEN_MAX_STOP];
    int32_t *stop_ids; /* the request's stop ids */
    int32_t n_stop_ids;
    int ignore_eos;
    char *pend; /* held-back text, see above */
    size_t pend_n, pend_cap;
    int stopped;        /* by a stop string */
    int32_t stop_str;   /* index of the stop string that matched */
    int32_t stop_token; /* EOS / stop id seen, else -1 */
    int32_t n_tokens;   /* TOKEN events counted (up to a stop-string match) */
} greq;

struct gen {
    const tokenizer *tok;
    const chat_template *tmpl;
    sched *s;
    int32_t *eos;
    int32_t n_eos;
    int32_t vocab;
};

void gen_request_default(gen_request *req)
{
    memset(req, 0, sizeof *req);
    req->add_generation_prompt = 1;
    req->max_tokens = 16;
    sample_params_default(&req->sampling);
    req->skip_special_tokens = 1;
}

int gen_create(const gen_config *cfg, gen **ret, lm_err *err)
{
    *ret = NULL;
    if (!cfg || !cfg->tok || !cfg->sched)
        return lm_err_set(err, -EINVAL, "gen_create: a tokenizer and a scheduler are required");
    if (cfg->n_eos_ids < 0 || (cfg->n_eos_ids > 0 && !cfg->eos_ids))
        return lm_err_set(err, -EINVAL, "gen_create: bad EOS id list");
    gen *g = calloc(1, sizeof *g);
    if (!g) return lm_err_set(err, -ENOMEM, "gen_create: out of memory");
    g->tok = cfg->tok;
    g->tmpl = cfg->tmpl;
    g->s = cfg->sched;
    g->vocab = tokenizer_vocab_size(cfg->tok);
    if (cfg->n_eos_ids) {
        g->eos = malloc(sizeof(int32_t) * (size_t)cfg->n_eos_ids);
        if (!g->eos) {
            free(g);
            return lm_err_set(err, -ENOMEM, "gen_create: out of memory");
        }
        memcpy(g->eos, cfg->eos_ids, sizeof(int32_t) * (size_t)cfg->n_eos_ids);
        g->n_eos = cfg->n_eos_ids;
    }
    *ret = g;
    return 0;
}

void gen_destroy(gen *g)
{
    if (!g) return;
    free(g->eos);
    free(g);
}

/* ---- prompts ---------------------------------------------------------------- */

int gen_prepare(gen *g, const gen_request *req, int32_t **ret_ids, int32_t *ret_n, lm_err *err)
{
    *ret_ids = NULL;
    *ret_n = 0;
    if (!g || !req) return lm_err_set(err, -EINVAL, "gen_prepare: no request");
    int kinds = (req->prompt != NULL) + (req->messages != NULL || req->n_messages > 0) +
                (req->prompt_ids != NULL || req->n_prompt_ids > 0);
    if (kinds != 1)
        return lm_err_set(err, -EINVAL,
                          kinds ? "request has more than one of prompt, messages and prompt ids"
                                : "request has no prompt, messages or prompt ids");
    if (req->prompt_ids || req->n_prompt_ids) {
        if (req->n_prompt_ids <= 0 || !req->prompt_ids)
            return lm_err_set(err, -EINVAL, "prompt ids: empty list");
        for (int32_t i = 0; i < req->n_prompt_ids; i++)
            if (req->prompt_ids[i] < 0 || req->prompt_ids[i] >= g->vocab)
                return lm_err_set(err, -EINVAL,
                                  "prompt ids: token %d at position %d outside the vocabulary "
                                  "[0, %d)",
                                  req->prompt_ids[i], i, g->vocab);
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)req->n_prompt_ids);
        if (!ids) return lm_err_set(err, -ENOMEM, "gen_prepare: out of memory");
        memcpy(ids, req->prompt_ids, sizeof(int32_t) * (size_t)req->n_prompt_ids);
        *ret_ids = ids;
        *ret_n = req->n_prompt_ids;
        return 0;
    }
    char *text = NULL;
    size_t len = 0;
    int rc;
    if (req->prompt) {
        /* a plain prompt gets BOS/EOS as the tokenizer's post-processor adds them */
        int32_t *ids = NULL;
        size_t n = 0;
        rc = tokenizer_encode(g->tok, req->prompt, strlen(req->prompt), true, &ids, &n, err);
        if (rc) return lm_err_prefix(err, "prompt");
        if (n == 0) {
            free(ids);
            return lm_err_set(err, -EINVAL, "prompt: empty (no tokens)");
        }
        *ret_ids = ids;
        *ret_n = (int32_t)n;
        return 0;
    }
    if (!g->tmpl) return lm_err_set(err, -EINVAL, "chat request: this model has no chat template");
    if (req->n_messages <= 0 || !req->messages)
        return lm_err_set(err, -EINVAL, "chat request: no messages");
    rc = chat_render(g->tmpl, req->messages, req->n_messages, req->add_generation_prompt,
                     req->chat_extra_json, &text, &len, err);
    if (rc) return rc;
    /* the template wrote the special tokens itself (apply_chat_template) */
    int32_t *ids = NULL;
    size_t n = 0;
    rc = tokenizer_encode(g->tok, text, len, false, &ids, &n, err);
    free(text);
    if (rc) return lm_err_prefix(err, "rendered chat prompt");
    if (n == 0) {
        free(ids);
        return lm_err_set(err, -EINVAL, "chat prompt: empty (no tokens)");
    }
    *ret_ids = ids;
    *ret_n = (int32_t)n;
    return 0;
}

/* ---- per-request state ----------------------------------------------------- */

static void greq_free(greq *r)
{
    if (!r) return;
    tokenizer_detok_free(r->detok);
    for (int32_t i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->stop_ids);
    free(r->pend);
    free(r);
}

static int pend_append(greq *r, const char *p, size_t n)
{
    if (n == 0) return 0;
    if (r->pend_n + n > r->pend_cap) {
        size_t cap = r->pend_cap ? r->pend_cap * 2 : 256;
        while (cap < r->pend_n + n)
            cap *= 2;
        char *np = realloc(r->pend, cap);
        if (!np) return -ENOMEM;
        r->pend = np;
        r->pend_cap = cap;
    }
    memcpy(r->pend + r->pend_n, p, n);
    r->pend_n += n;
    return 0;
}

/* Earliest stop string occurrence in pend: its offset, or -1. */
static long find_stop(greq *r, int32_t *ret_which)
{
    long best = -1;
    if (!r->pend_n) return -1;
    for (int32_t i = 0; i < r->n_stop; i++) {
        const char *hit = memmem(r->pend, r->pend_n, r->stop[i], r->stop_len[i]);
        if (hit && (best < 0 || hit - r->pend < best)) {
            best = hit - r->pend;
            *ret_which = i;
        }
    }
    return best;
}

/* Bytes at the end of pend that are a proper prefix of some stop string. */
static size_t held_back(greq *r)
{
    size_t keep = 0;
    for (int32_t i = 0; i < r->n_stop; i++) {
        size_t max = r->stop_len[i] - 1 < r->pend_n ? r->stop_len[i] - 1 : r->pend_n;
        for (size_t k = max; k > keep; k--)
            if (memcmp(r->pend + r->pend_n - k, r->stop[i], k) == 0) {
                keep = k;
                break;
            }
    }
    return keep;
}

static int is_in(const int32_t *ids, int32_t n, int32_t id)
{
    for (int32_t i = 0; i < n; i++)
        if (ids[i] == id) return 1;
    return 0;
}

static void emit_error_finish(greq *r, uint64_t id, const sched_event *ev, const char *msg)
{
    gen_event out = {.type = GEN_EVENT_FINISHED,
                     .id = id,
                     .text = "",
                     .finish = SCHED_FINISH_ERROR,
                     .stop_token = -1,
                     .message = msg};
    if (ev) {
        out.prompt_tokens = ev->prompt_tokens;
        out.completion_tokens = ev->completion_tokens;
        out.cached_prompt_tokens = ev->cached_prompt_tokens;
    }
    r->cb(r->user, &out);
}

static void on_token(greq *r, const sched_event *ev)
{
    if (r->stopped) return; /* after a stop string: the cancel is on its way */
    r->n_tokens++;
    int32_t id = ev->tok.token;
    gen_event out = {
        .type = GEN_EVENT_DELTA, .id = ev->id, .text = "", .tok = &ev->tok, .stop_token = -1};
    if ((!r->ignore_eos && is_in(r->g->eos, r->g->n_eos, id)) ||
        is_in(r->stop_ids, r->n_stop_ids, id)) {
        /* the scheduler finishes the request after this token; its text is not output */
        r->stop_token = id;
        r->cb(r->user, &out);
        return;
    }
    const char *chunk = NULL;
    size_t chunk_n = 0;
    lm_err err = {0};
    if (tokenizer_detok_push(r->detok, id, &chunk, &chunk_n, &err) < 0 ||
        pend_append(r, chunk, chunk_n) < 0) {
        /* cannot decode: stop the request; FINISHED reports the error */
        r->stopped = 2;
        sched_cancel(r->g->s, ev->id);
        r->cb(r->user, &out);
        return;
    }
    if (r->n_stop) {
        int32_t which = 0;
        long at = find_stop(r, &which);
        if (at >= 0) {
            out.text = r->pend;
            out.len = (size_t)at;
            r->stopped = 1;
            r->stop_str = which;
            r->pend_n = 0;
            sched_cancel(r->g->s, ev->id);
            r->cb(r->user, &out);
            return;
        }
    }
    size_t keep = held_back(r);
    out.text = r->pend;
    out.len = r->pend_n - keep;
    r->cb(r->user, &out);
    if (keep) memmove(r->pend, r->pend + r->pend_n - keep, keep);
    r->pend_n = keep;
}

static void on_finished(greq *r, const sched_event *ev)
{
    if (r->stopped == 2) {
        emit_error_finish(r, ev->id, ev, "detokenization failed");
        greq_free(r);
        return;
    }
    gen_event out = {.type = GEN_EVENT_FINISHED,
                     .id = ev->id,
                     .text = "",
                     .finish = ev->finish,
                     .stop_token = -1,
                     .prompt_tokens = ev->prompt_tokens,
                     .completion_tokens = ev->completion_tokens,
                     .cached_prompt_tokens = ev->cached_prompt_tokens,
                     .message = ev->message};
    if (!r->stopped) {
        const char *rest = NULL;
        size_t rest_n = 0;
        lm_err err = {0};
        if (tokenizer_detok_finish(r->detok, &rest, &rest_n, &err) == 0 && rest_n)
            pend_append(r, rest, rest_n);
        int32_t which = 0;
        long at = r->n_stop ? find_stop(r, &which) : -1;
        if (at >= 0) {
            r->stopped = 1;
            r->stop_str = which;
            r->pend_n = (size_t)at;
        }
        out.text = r->pend ? r->pend : "";
        out.len = r->pend_n;
    }
    if (r->stopped == 1) {
        out.finish = SCHED_FINISH_STOP;
        out.stop = r->stop[r->stop_str];
        out.completion_tokens = r->n_tokens;
        out.message = NULL;
    } else if (ev->finish == SCHED_FINISH_STOP) {
        out.stop_token = r->stop_token;
    }
    r->cb(r->user, &out);
    greq_free(r);
}

static void on_sched_event(void *user, const sched_event *ev)
{
    greq *r = user;
    if (ev->type == SCHED_EVENT_TOKEN)
        on_token(r, ev);
    else
        on_finished(r, ev);
}

/* ---- submit / cancel -------------------------------------------------------- */

static int utf8_ok(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        size_t k = c < 0x80                   ? 0
                   : (c >= 0xC2 && c <= 0xDF) ? 1
                   : (c & 0xF0) == 0xE0       ? 2
                   : (c >= 0xF0 && c <= 0xF4) ? 3
                                              : 9;
        if (k == 9 || i + k >= n + (k == 0)) return 0;
        for (size_t j = 1; j <= k; j++)
            if ((p[i + j] & 0xC0) != 0x80) return 0;
        i += k + 1;
    }
    return 1;
}

int gen_submit(gen *g, const gen_request *req, uint64_t *ret_id, lm_err *err)
{
    if (!g || !req || !ret_id) return lm_err_set(err, -EINVAL, "gen_submit: no request");
    if (!req->on_event) return lm_err_set(err, -EINVAL, "gen_submit: no on_event callback");
    if (req->max_tokens <= 0)
        return lm_err_set(err, -EINVAL, "max_tokens %d must be > 0", req->max_tokens);
    if (req->n_stop < 0 || req->n_stop > GEN_MAX_STOP || (req->n_stop && !req->stop))
        return lm_err_set(err, -EINVAL, "stop: %d strings, at most %d", req->n_stop, GEN_MAX_STOP);
    for (int32_t i = 0; i < req->n_stop; i++) {
        size_t n = req->stop[i] ? strlen(req->stop[i]) : 0;
        if (n == 0) return lm_err_set(err, -EINVAL, "stop string %d is empty", i);
        if (n > GEN_MAX_STOP_LEN)
            return lm_err_set(err, -EINVAL, "stop string %d: %zu bytes, at most %d", i, n,
                              GEN_MAX_STOP_LEN);
        if (!utf8_ok(req->stop[i], n))
            return lm_err_set(err, -EINVAL, "stop string %d is not valid UTF-8", i);
    }
    if (req->n_stop_ids < 0 || (req->n_stop_ids && !req->stop_ids))
        return lm_err_set(err, -EINVAL, "bad stop id list");
    for (int32_t i = 0; i < req->n_stop_ids; i++)
        if (req->stop_ids[i] < 0 || req->stop_ids[i] >= g->vocab)
            return lm_err_set(err, -EINVAL, "stop id %d outside the vocabulary [0, %d)",
                              req->stop_ids[i], g->vocab);
    int rc = sample_params_check(&req->sampling, err);
    if (rc) return rc;

    int32_t *ids = NULL, n_ids = 0;
    rc = gen_prepare(g, req, &ids, &n_ids, err);
    if (rc) return rc;

    greq *r = calloc(1, sizeof *r);
    if (!r) {
        free(ids);
        return lm_err_set(err, -ENOMEM, "gen_submit: out of memory");
    }
    r->g = g;
    r->cb = req->on_event;
    r->user = req->user;
    r->ignore_eos = req->ignore_eos;
    r->stop_token = -1;
    rc = tokenizer_detok_new(g->tok, req->skip_special_tokens != 0, &r->detok, err);
    for (int32_t i = 0; rc == 0 && i < req->n_stop; i++) {
        r->stop_len[i] = strlen(req->stop[i]);
        if (!(r->stop[i] = strdup(req->stop[i])))
            rc = lm_err_set(err, -ENOMEM, "gen_submit: out of memory");
        r->n_stop = i + 1;
    }
    if (rc == 0 && req->n_stop_ids) {
        r->stop_ids = malloc(sizeof(int32_t) * (size_t)req->n_stop_ids);
        if (!r->stop_ids)
            rc = lm_err_set(err, -ENOMEM, "gen_submit: out of memory");
        else
            memcpy(r->stop_ids, req->stop_ids, sizeof(int32_t) * (size_t)req->n_stop_ids);
        r->n_stop_ids = req->n_stop_ids;
    }
    if (rc) {
        free(ids);
        greq_free(r);
        return rc;
    }
    sched_request sr = {
        .prompt = ids,
        .n_prompt = n_ids,
        .max_tokens = req->max_tokens,
        .sampling = req->sampling,
        .stop_ids = req->stop_ids,
        .n_stop_ids = req->n_stop_ids,
        .ignore_eos = req->ignore_eos,
        .deadline_ns = req->deadline_ns,
        .on_event = on_sched_event,
        .user = r,
    };
    rc = sched_submit(g->s, &sr, ret_id, err);
    free(ids);
    if (rc) {
        greq_free(r); /* no event is ever delivered for a refused request */
        return rc;
    }
    return 0;
}

int gen_cancel(gen *g, uint64_t id)
{
    return g ? sched_cancel(g->s, id) : -EINVAL;
}
