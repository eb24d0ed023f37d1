/*
 * rpc_api.c: the methods of lightmoe.v1.LightMoE, translating between the
 * protobuf-c messages and serve.h (the only place where generated message
 * code meets the request path).
 *
 * Generate and Complete share one handler. Deltas from the engine thread
 * are appended to the call's pending output under the call's lock, with
 * their boundaries; the send machinery (rpc.c) asks `produce` for the next
 * message whenever no send is in flight (one SEND_MESSAGE at a time is the
 * flow control). Generate sends one message per delta, so the chunks a
 * client sees do not depend on its speed (and a cache hit replays the
 * chunks of the original answer), then one last message with
 * finish_reason, usage and timing; what waits is bounded by max_tokens.
 * Complete produces its one message at the end.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/log.h"
#include "daemon/rpc_internal.h"
#include "daemon/serve.h"
#include "lightmoe/v1/lightmoe.pb-c.h"

typedef struct gen_call {
    Lightmoe__V1__GenerateRequest *req;     /* unpacked; serve_request points into it */
    serve_request sreq;
    runner_msg *msgs;
    int streaming;
    uint64_t job;
    int job_known, cancel_wanted;           /* guarded by c->mu */
    st_code cancel_code;
    /* pending output (guarded by c->mu) */
    char *text;
    size_t len, cap;
    int32_t *ids;
    int32_t n_ids, ids_cap;
    sample_result *lps;
    int32_t n_lps, lps_cap;
    struct piece {
        size_t text_end;                    /* cumulative ends in text/ids/lps */
        int32_t ids_end, lps_end;
    } *pieces;
    int32_t n_pieces, pieces_cap;
    int final_set, final_sent;
    serve_final fin;
    char fin_msg[1024];
} gen_call;

static int grow(void **p, size_t elem, int32_t *cap, int32_t need)
{
    if (need <= *cap)
        return 0;
    int32_t nc = *cap ? *cap : 16;
    while (nc < need)
        nc *= 2;
    void *q = realloc(*p, (size_t)nc * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = nc;
    return 0;
}

/* Serialize msg (whose field 1, text, is left empty) and append field 1
 * with the exact bytes text[0..len). Fields may come in any order on the
 * wire and the last value of a scalar field wins, so every parser reads the
 * text back whole, NUL bytes included. */
static grpc_byte_buffer *pack_with_text(const ProtobufCMessage *msg, const char *text, size_t len)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(n + (len ? 11 + len : 0));
    uint8_t *p = GRPC_SLICE_START_PTR(s);
    protobuf_c_message_pack(msg, p);
    if (len) {
        p[n++] = (1 << 3) | 2; /* field 1, length-delimited */
        size_t v = len;
        do {
            p[n] = (uint8_t)(v & 0x7f);
            v >>= 7;
            if (v)
                p[n] |= 0x80;
            n++;
        } while (v);
        memcpy(p + n, text, len);
        n += len;
    }
    grpc_slice sub = grpc_slice_sub(s, 0, n);
    grpc_slice_unref(s);
    grpc_byte_buffer *b = grpc_raw_byte_buffer_create(&sub, 1);
    grpc_slice_unref(sub);
    return b;
}

/* One message from the first text_len bytes, n_ids ids and n_lps logprobs
 * of the pending output (removed from it), with the final fields if `fin`. */
static grpc_byte_buffer *take_message(rpc_call *c, gen_call *g, size_t text_len, int32_t n_ids,
                                      int32_t n_lps, int fin)
{
    Lightmoe__V1__GenerateResponse r = LIGHTMOE__V1__GENERATE_RESPONSE__INIT;
    Lightmoe__V1__Usage u = LIGHTMOE__V1__USAGE__INIT;
    Lightmoe__V1__Timing t = LIGHTMOE__V1__TIMING__INIT;
    /* text goes in by hand (pack_with_text): it may hold U+0000, which a
     * protobuf-c string (a C string) would cut. */
    r.text = "";
    r.n_token_ids = (size_t)n_ids;
    r.token_ids = g->ids;
    r.request_id = c->request_id;
    Lightmoe__V1__TokenLogprob *tl = NULL, **tlp = NULL;
    Lightmoe__V1__TopLogprob *top = NULL, **topp = NULL;
    if (n_lps > 0) {
        tl = calloc((size_t)n_lps, sizeof *tl);
        tlp = calloc((size_t)n_lps, sizeof *tlp);
        top = calloc((size_t)n_lps * SAMPLE_MAX_LOGPROBS, sizeof *top);
        topp = calloc((size_t)n_lps * SAMPLE_MAX_LOGPROBS, sizeof *topp);
        if (tl && tlp && top && topp) {
            for (int32_t i = 0; i < n_lps; i++) {
                const sample_result *s = &g->lps[i];
                lightmoe__v1__token_logprob__init(&tl[i]);
                tl[i].token_id = s->token;
                tl[i].logprob = s->logprob;
                int32_t nt = s->n_top < SAMPLE_MAX_LOGPROBS ? s->n_top : SAMPLE_MAX_LOGPROBS;
                for (int32_t k = 0; k < nt; k++) {
                    Lightmoe__V1__TopLogprob *e = &top[i * SAMPLE_MAX_LOGPROBS + k];
                    lightmoe__v1__top_logprob__init(e);
                    e->token_id = s->top_ids[k];
                    e->logprob = s->top_logprobs[k];
                    topp[i * SAMPLE_MAX_LOGPROBS + k] = e;
                }
                tl[i].n_top = (size_t)nt;
                tl[i].top = &topp[i * SAMPLE_MAX_LOGPROBS];
                tlp[i] = &tl[i];
            }
            r.n_logprobs = (size_t)n_lps;
            r.logprobs = tlp;
        }
    }
    if (fin) {
        r.finish_reason = (char *)g->fin.finish_reason;
        u.prompt_tokens = g->fin.prompt_tokens;
        u.completion_tokens = g->fin.completion_tokens;
        u.cached_prompt_tokens = g->fin.cached_prompt_tokens;
        t.time_to_first_token = g->fin.ttft_s;
        t.total = g->fin.total_s;
        r.usage = &u;
        r.timing = &t;
        r.cached = g->fin.cached;
        g->final_sent = 1;
    }
    grpc_byte_buffer *b = pack_with_text(&r.base, g->text, text_len);
    free(tl);
    free(tlp);
    free(top);
    free(topp);
    /* Drop what was sent (pieces are few per send: the shift is cheap). */
    if (text_len < g->len)
        memmove(g->text, g->text + text_len, g->len - text_len);
    g->len -= text_len;
    if (n_ids < g->n_ids)
        memmove(g->ids, g->ids + n_ids, (size_t)(g->n_ids - n_ids) * sizeof *g->ids);
    g->n_ids -= n_ids;
    if (n_lps < g->n_lps)
        memmove(g->lps, g->lps + n_lps, (size_t)(g->n_lps - n_lps) * sizeof *g->lps);
    g->n_lps -= n_lps;
    return b;
}

/* Under c->mu (rpc.c): the next message, or NULL when none is ready. */
static grpc_byte_buffer *gen_produce(rpc_call *c)
{
    gen_call *g = c->state;
    int final_ok = g->final_set && !g->final_sent && g->fin.code == ST_OK;
    if (g->final_sent)
        return NULL;
    if (!g->streaming) /* Complete: everything at once, at the end */
        return final_ok ? take_message(c, g, g->len, g->n_ids, g->n_lps, 1) : NULL;
    if (g->n_pieces > 0) {
        struct piece p = g->pieces[0];
        memmove(g->pieces, g->pieces + 1, (size_t)(g->n_pieces - 1) * sizeof *g->pieces);
        g->n_pieces--;
        for (int32_t i = 0; i < g->n_pieces; i++) {
            g->pieces[i].text_end -= p.text_end;
            g->pieces[i].ids_end -= p.ids_end;
            g->pieces[i].lps_end -= p.lps_end;
        }
        return take_message(c, g, p.text_end, p.ids_end, p.lps_end, 0);
    }
    /* The final fields always travel in a message of their own (empty text):
     * whether the last delta was already sent when the request finished is
     * a matter of timing, and the shape of a stream should not be. */
    return final_ok ? take_message(c, g, 0, 0, 0, 1) : NULL;
}

/* Under c->mu: does produce hold more messages? (The status waits for them.) */
static int gen_has_more(rpc_call *c)
{
    gen_call *g = c->state;
    if (g->final_sent)
        return 0;
    if (!g->streaming)
        return g->final_set && g->fin.code == ST_OK;
    return g->n_pieces > 0 || (g->final_set && g->fin.code == ST_OK);
}

static void gen_on_delta(void *user, const serve_delta *d)
{
    rpc_call *c = user;
    gen_call *g = c->state;
    pthread_mutex_lock(&c->mu);
    if (g->len + d->len + 1 > g->cap) {
        size_t nc = (g->cap ? g->cap * 2 : 256) + d->len;
        char *t = realloc(g->text, nc);
        if (t) {
            g->text = t;
            g->cap = nc;
        }
    }
    if (d->len && g->len + d->len + 1 <= g->cap) {
        memcpy(g->text + g->len, d->text, d->len);
        g->len += d->len;
    }
    if (d->n_tokens > 0 &&
        !grow((void **)&g->ids, sizeof *g->ids, &g->ids_cap, g->n_ids + d->n_tokens)) {
        memcpy(g->ids + g->n_ids, d->token_ids, (size_t)d->n_tokens * sizeof *g->ids);
        g->n_ids += d->n_tokens;
    }
    if (d->logprobs && d->n_tokens > 0 &&
        !grow((void **)&g->lps, sizeof *g->lps, &g->lps_cap, g->n_lps + d->n_tokens)) {
        memcpy(g->lps + g->n_lps, d->logprobs, (size_t)d->n_tokens * sizeof *g->lps);
        g->n_lps += d->n_tokens;
    }
    if (g->streaming &&
        !grow((void **)&g->pieces, sizeof *g->pieces, &g->pieces_cap, g->n_pieces + 1))
        g->pieces[g->n_pieces++] = (struct piece){g->len, g->n_ids, g->n_lps};
    pthread_mutex_unlock(&c->mu);
    if (g->streaming)
        rpc_kick(c);
}

static void gen_on_final(void *user, const serve_final *f)
{
    rpc_call *c = user;
    gen_call *g = c->state;
    pthread_mutex_lock(&c->mu);
    g->fin = *f;
    if (f->message) {
        snprintf(g->fin_msg, sizeof g->fin_msg, "%s", f->message);
        g->fin.message = g->fin_msg;
    }
    g->final_set = 1;
    pthread_mutex_unlock(&c->mu);
    if (f->code == ST_OK) {
        log_msg(LL_DEBUG, c->request_id, "finish=%s prompt=%d completion=%d ttft=%.3fs%s",
                f->finish_reason, f->prompt_tokens, f->completion_tokens, f->ttft_s,
                f->cached ? " cached" : "");
        rpc_finish(c, GRPC_STATUS_OK, NULL);
    } else {
        rpc_finish(c, (int)f->code, "%s", g->fin_msg);
    }
    rpc_call_unref(c); /* the job's reference */
}

static void gen_on_cancel(rpc_call *c)
{
    gen_call *g = c->state;
    int past_deadline = c->deadline_ns && rpc_now_ns() >= c->deadline_ns;
    st_code code = past_deadline ? ST_DEADLINE_EXCEEDED : ST_CANCELLED;
    const char *msg = past_deadline ? "deadline exceeded" : "cancelled by the client";
    pthread_mutex_lock(&c->mu);
    int known = g->job_known;
    if (!known) {
        g->cancel_wanted = 1;
        g->cancel_code = code;
    }
    uint64_t job = g->job;
    pthread_mutex_unlock(&c->mu);
    if (known)
        serve_cancel(rpc_serve(c->srv), job, code, msg);
}

static void gen_cleanup(rpc_call *c)
{
    gen_call *g = c->state;
    if (!g)
        return;
    if (g->req)
        protobuf_c_message_free_unpacked(&g->req->base, NULL);
    free(g->msgs);
    free(g->text);
    free(g->ids);
    free(g->lps);
    free(g->pieces);
    free(g);
}

static uint64_t random_seed(rpc_call *c)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t x = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ (uint64_t)(uintptr_t)c;
    x ^= x >> 33; /* splitmix finaliser */
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

/* Request ids go into log lines: keep them printable and short. */
static void set_request_id(rpc_call *c, const char *rid)
{
    if (!rid || !rid[0])
        return;
    char old[sizeof c->request_id];
    snprintf(old, sizeof old, "%s", c->request_id);
    size_t n = 0;
    for (; rid[n] && n < 64; n++)
        c->request_id[n] = (rid[n] > ' ' && rid[n] < 127) ? rid[n] : '_';
    c->request_id[n] = 0;
    /* Links the call's first line (logged under `old`) to the client's id. */
    log_msg(LL_DEBUG, c->request_id, "%s: request_id from the client (call %s)", c->m->name, old);
}

static int to_messages(size_t n, Lightmoe__V1__ChatMessage **in, runner_msg **ret)
{
    *ret = NULL;
    if (!n)
        return 0;
    runner_msg *m = calloc(n, sizeof *m);
    if (!m)
        return -1;
    for (size_t i = 0; i < n; i++) {
        m[i].role = in[i]->role;
        m[i].content = in[i]->content;
    }
    *ret = m;
    return 0;
}

static void fill_request(rpc_call *c, gen_call *g, const Lightmoe__V1__GenerateRequest *q,
                         serve_request *r)
{
    memset(r, 0, sizeof *r);
    r->request_id = c->request_id;
    r->prompt = q->prompt;
    r->messages = g->msgs;
    r->n_messages = (int32_t)q->n_messages;
    r->has_max_tokens = q->_max_tokens_case == LIGHTMOE__V1__GENERATE_REQUEST___MAX_TOKENS_MAX_TOKENS;
    r->max_tokens = q->max_tokens;
    sample_params_default(&r->sampling);
#define OPT(field, FIELD, dflt)                                                             \
    (q->_##field##_case == LIGHTMOE__V1__GENERATE_REQUEST___##FIELD##_##FIELD ? q->field : (dflt))
    r->sampling.temperature = OPT(temperature, TEMPERATURE, 1.0f);
    r->sampling.top_p = OPT(top_p, TOP_P, 1.0f);
    r->sampling.top_k = OPT(top_k, TOP_K, 0);
    r->sampling.min_p = OPT(min_p, MIN_P, 0.0f);
    r->sampling.repetition_penalty = OPT(repetition_penalty, REPETITION_PENALTY, 1.0f);
    r->sampling.presence_penalty = OPT(presence_penalty, PRESENCE_PENALTY, 0.0f);
    r->sampling.frequency_penalty = OPT(frequency_penalty, FREQUENCY_PENALTY, 0.0f);
    r->sampling.seed = OPT(seed, SEED, random_seed(c));
    r->has_seed = q->_seed_case == LIGHTMOE__V1__GENERATE_REQUEST___SEED_SEED;
#undef OPT
    r->sampling.logprobs = q->logprobs;
    r->stop = (const char *const *)q->stop;
    r->n_stop = (int32_t)q->n_stop;
    r->deadline_ns = c->deadline_ns;
    r->arrival_ns = c->start_ns;
    r->cache_mode = (serve_cache_mode)q->cache_mode;
    r->cache_ttl_seconds = q->cache_ttl_seconds;
}

static void generate_common(rpc_call *c, int streaming)
{
    Lightmoe__V1__GenerateRequest *q = (Lightmoe__V1__GenerateRequest *)rpc_unpack(
        c, &lightmoe__v1__generate_request__descriptor);
    if (!q)
        return;
    gen_call *g = calloc(1, sizeof *g);
    if (!g || to_messages(q->n_messages, q->messages, &g->msgs)) {
        free(g);
        protobuf_c_message_free_unpacked(&q->base, NULL);
        rpc_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    g->req = q;
    g->streaming = streaming;
    c->state = g;
    c->cleanup = gen_cleanup;
    set_request_id(c, q->request_id);
    if ((int)q->cache_mode < 0 || q->cache_mode > 3) {
        rpc_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "cache_mode %d is unknown (0..3)",
                   (int)q->cache_mode);
        return;
    }
    fill_request(c, g, q, &g->sreq);
    c->produce = gen_produce;
    c->has_more = gen_has_more;
    c->on_cancel = gen_on_cancel;
    serve_sink sink = {gen_on_delta, gen_on_final};
    char msg[1024];
    uint64_t job = 0;
    rpc_call_ref(c); /* the job's reference, dropped in gen_on_final */
    st_code code = serve_generate(rpc_serve(c->srv), &g->sreq, &sink, c, &job, msg, sizeof msg);
    if (code != ST_OK) {
        rpc_call_unref(c);
        rpc_finish(c, (int)code, "%s", msg);
        return;
    }
    pthread_mutex_lock(&c->mu);
    g->job = job;
    g->job_known = 1;
    int cancel = g->cancel_wanted && !g->final_set;
    st_code cc = g->cancel_code;
    pthread_mutex_unlock(&c->mu);
    if (cancel)
        serve_cancel(rpc_serve(c->srv), job, cc,
                     cc == ST_DEADLINE_EXCEEDED ? "deadline exceeded" : "cancelled by the client");
}

static void generate(rpc_call *c)
{
    generate_common(c, 1);
}

static void complete(rpc_call *c)
{
    generate_common(c, 0);
}

static void tokenize(rpc_call *c)
{
    Lightmoe__V1__TokenizeRequest *q = (Lightmoe__V1__TokenizeRequest *)rpc_unpack(
        c, &lightmoe__v1__tokenize_request__descriptor);
    if (!q)
        return;
    runner_msg *msgs = NULL;
    int32_t *ids = NULL, n = 0;
    char *rendered = NULL, msg[1024];
    if (to_messages(q->n_messages, q->messages, &msgs)) {
        rpc_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    } else {
        st_code code = serve_tokenize(rpc_serve(c->srv), q->text, msgs, (int32_t)q->n_messages,
                                      &ids, &n, &rendered, msg, sizeof msg);
        if (code) {
            rpc_finish(c, (int)code, "%s", msg);
        } else {
            Lightmoe__V1__TokenizeResponse r = LIGHTMOE__V1__TOKENIZE_RESPONSE__INIT;
            r.n_token_ids = (size_t)n;
            r.token_ids = ids;
            r.rendered = rendered;
            rpc_send(c, &r.base);
            rpc_finish(c, GRPC_STATUS_OK, NULL);
        }
    }
    free(ids);
    free(rendered);
    free(msgs);
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void get_model_info(rpc_call *c)
{
    Lightmoe__V1__GetModelInfoRequest *q = (Lightmoe__V1__GetModelInfoRequest *)rpc_unpack(
        c, &lightmoe__v1__get_model_info_request__descriptor);
    if (!q)
        return;
    protobuf_c_message_free_unpacked(&q->base, NULL);
    runner_info info;
    char msg[512];
    st_code code = serve_model_info(rpc_serve(c->srv), &info, msg, sizeof msg);
    if (code) {
        rpc_finish(c, (int)code, "%s", msg);
        return;
    }
    Lightmoe__V1__ModelInfo r = LIGHTMOE__V1__MODEL_INFO__INIT;
    char *dev = info.device;
    r.name = info.name;
    r.architecture = info.architecture;
    r.quantization = info.quantization;
    r.context_length = info.context_length;
    r.n_devices = 1;
    r.devices = &dev;
    r.tensor_parallel_size = info.tensor_parallel;
    r.build_version = (char *)LIGHTMOE_VERSION;
    r.vocab_size = info.vocab_size;
    rpc_send(c, &r.base);
    rpc_finish(c, GRPC_STATUS_OK, NULL);
}

static void invalidate_cache(rpc_call *c)
{
    Lightmoe__V1__InvalidateCacheRequest *q = (Lightmoe__V1__InvalidateCacheRequest *)rpc_unpack(
        c, &lightmoe__v1__invalidate_cache_request__descriptor);
    if (!q)
        return;
    char msg[1024];
    int64_t removed = 0;
    st_code code;
    if ((q->all != 0) + (q->request != NULL) + (q->n_prefix_token_ids > 0) > 1) {
        code = ST_INVALID_ARGUMENT;
        snprintf(msg, sizeof msg,
                 "set one of `all`, `request` or `prefix_token_ids`, not several");
    } else if (q->all) {
        code = serve_invalidate(rpc_serve(c->srv), 1, NULL, &removed, msg, sizeof msg);
    } else if (q->n_prefix_token_ids > 0) {
        code = serve_invalidate_prefix(rpc_serve(c->srv), q->prefix_token_ids,
                                       (int32_t)q->n_prefix_token_ids, &removed, msg, sizeof msg);
    } else if (!q->request) {
        code = ST_INVALID_ARGUMENT;
        snprintf(msg, sizeof msg,
                 "set `all`, give the `request` whose answer to drop, or `prefix_token_ids`");
    } else {
        gen_call g = {0};
        serve_request r;
        if (to_messages(q->request->n_messages, q->request->messages, &g.msgs)) {
            code = ST_RESOURCE_EXHAUSTED;
            snprintf(msg, sizeof msg, "out of memory");
        } else {
            fill_request(c, &g, q->request, &r);
            code = serve_invalidate(rpc_serve(c->srv), 0, &r, &removed, msg, sizeof msg);
        }
        free(g.msgs);
    }
    if (code) {
        rpc_finish(c, (int)code, "%s", msg);
    } else {
        Lightmoe__V1__InvalidateCacheResponse r = LIGHTMOE__V1__INVALIDATE_CACHE_RESPONSE__INIT;
        r.removed = removed;
        rpc_send(c, &r.base);
        rpc_finish(c, GRPC_STATUS_OK, NULL);
    }
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

const rpc_method rpc_api_methods[] = {
    {"/lightmoe.v1.LightMoE/Generate", "Generate", 1, 1, generate, NULL},
    {"/lightmoe.v1.LightMoE/Complete", "Complete", 1, 1, complete, NULL},
    {"/lightmoe.v1.LightMoE/Tokenize", "Tokenize", 1, 1, tokenize, NULL},
    {"/lightmoe.v1.LightMoE/GetModelInfo", "GetModelInfo", 1, 1, get_model_info, NULL},
    {"/lightmoe.v1.LightMoE/InvalidateCache", "InvalidateCache", 1, 1, invalidate_cache, NULL},
};
const int rpc_api_n_methods = 5;
