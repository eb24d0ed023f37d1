/*
 * test_gen.c: engine/gen.c over the CPU backend on a reference fixture.
 *
 *   test_gen FIXTURE_DIR
 *
 *  prepare   the prompt ids of every reference prompt (text, or chat
 *            messages through the chat template) equal p{i}.input_ids;
 *  greedy    generating p{i} greedily gives p{i}.greedy_ids and a text
 *            equal to decoding them;
 *  stop      stop strings that straddle token boundaries cut the text at
 *            their first occurrence, are never emitted, and finish the
 *            request with STOP; near-misses are held back, then released;
 *            the earliest of several wins; a stop id ends with its id;
 *  seed      same seed = same tokens, another seed = other tokens;
 *  cancel    from inside the callback;
 *  errors    bad requests are refused with a message, before any event.
 */
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backends.h"
#include "engine/chat.h"
#include "engine/gen.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "engine/tokenizer.h"

#include "tests/check_msg.h"

#define MAX_TOK 512

/* ---- recording a request ---------------------------------------------------- */

typedef struct grec {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    char text[8192];
    size_t n;
    int32_t toks[MAX_TOK];
    int32_t n_tok;
    int events_after_finish;
    sched_finish finish;
    int32_t stop_token, completion_tokens, prompt_tokens;
    char stop[300];
    int has_stop;
    char message[256];
    float logprob0;
    int32_t n_top0;
    gen *g;
    int cancel_after; /* > 0: gen_cancel after this many deltas */
    uint64_t id;
} grec;

static void rec_init(grec *r)
{
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
}

static void rec_destroy(grec *r)
{
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
}

static void on_event(void *user, const gen_event *ev)
{
    grec *r = user;
    pthread_mutex_lock(&r->mu);
    if (r->done) r->events_after_finish++;
    if (ev->len && r->n + ev->len < sizeof r->text) {
        memcpy(r->text + r->n, ev->text, ev->len);
        r->n += ev->len;
        r->text[r->n] = 0;
    }
    if (ev->type == GEN_EVENT_DELTA) {
        if (r->n_tok < MAX_TOK) r->toks[r->n_tok++] = ev->tok->token;
        if (r->n_tok == 1) {
            r->logprob0 = ev->tok->logprob;
            r->n_top0 = ev->tok->n_top;
        }
        if (r->cancel_after && r->n_tok == r->cancel_after) gen_cancel(r->g, ev->id);
    } else {
        r->finish = ev->finish;
        r->stop_token = ev->stop_token;
        r->completion_tokens = ev->completion_tokens;
        r->prompt_tokens = ev->prompt_tokens;
        r->has_stop = ev->stop != NULL;
        if (ev->stop) snprintf(r->stop, sizeof r->stop, "%s", ev->stop);
        if (ev->message) snprintf(r->message, sizeof r->message, "%s", ev->message);
        r->done = 1;
        pthread_cond_broadcast(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
}

static void rec_wait(grec *r)
{
    pthread_mutex_lock(&r->mu);
    while (!r->done)
        pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
}

/* ---- fixture ------------------------------------------------------------------ */

typedef struct fixture {
    model *m;
    backend *be;
    tokenizer *tok;
    chat_template *tmpl;
    sched *s;
    gen *g;
    safetensors_file *ref;
    json_t *refjson;
} fixture;

static int fixture_open(fixture *fx, const char *dir)
{
    memset(fx, 0, sizeof *fx);
    lm_err err = {0};
    int rc = model_load(dir, NULL, &fx->m, &err);
    CHECK(rc == 0, "model_load: %s", err.msg);
    if (rc) return rc;
    backend_options bo;
    backend_options_default(&bo);
    bo.threads = 2;
    rc = backend_open(fx->m, &bo, &fx->be, &err);
    CHECK(rc == 0, "backend_open: %s", err.msg);
    if (rc) return rc;
    rc = tokenizer_load(dir, &fx->tok, &err);
    CHECK(rc == 0, "tokenizer_load: %s", err.msg);
    if (rc) return rc;
    const tokenizer_info *ti = tokenizer_get_info(fx->tok);
    rc = chat_template_load(dir, NULL, ti->bos_token, ti->eos_token, &fx->tmpl, &err);
    CHECK(rc == 0, "chat_template_load: %s", err.msg);
    if (rc) return rc;
    sched_config sc;
    sched_config_default(&sc);
    sc.eos_ids = fx->m->cfg.eos_ids;
    sc.n_eos_ids = fx->m->cfg.n_eos;
    sc.kv_bytes = 64u << 20;
    rc = sched_create(fx->be, &sc, &fx->s, &err);
    CHECK(rc == 0, "sched_create: %s", err.msg);
    if (rc) return rc;
    gen_config gc = {fx->tok, fx->tmpl, fx->s, fx->m->cfg.eos_ids, fx->m->cfg.n_eos};
    rc = gen_create(&gc, &fx->g, &err);
    CHECK(rc == 0, "gen_create: %s", err.msg);
    if (rc) return rc;
    char path[1024];
    snprintf(path, sizeof path, "%s/reference.safetensors", dir);
    rc = safetensors_open(path, &fx->ref, &err);
    CHECK(rc == 0, "%s: %s", path, err.msg);
    snprintf(path, sizeof path, "%s/reference.json", dir);
    fx->refjson = json_load_file(path, 0, NULL);
    CHECK(fx->refjson != NULL, "%s", path);
    return rc || !fx->refjson ? -1 : 0;
}

static void fixture_close(fixture *fx)
{
    sched_destroy(fx->s); /* first: it finishes every request */
    gen_destroy(fx->g);
    backend_destroy(fx->be);
    model_free(fx->m);
    chat_template_free(fx->tmpl);
    tokenizer_free(fx->tok);
    safetensors_close(fx->ref);
    json_decref(fx->refjson);
}

static int32_t read_ids(fixture *fx, const char *name, int32_t *out, int32_t cap)
{
    const safetensors_tensor *t = safetensors_find(fx->ref, name);
    CHECK(t && t->dtype == ST_I32 && t->numel <= cap, "%s missing or too long", name);
    if (!t || t->dtype != ST_I32 || t->numel > cap) return 0;
    memcpy(out, t->data, sizeof(int32_t) * (size_t)t->numel);
    return (int32_t)t->numel;
}

/* The request for reference prompt i (text or chat). */
static void ref_request(fixture *fx, int i, gen_request *q, chat_message *msgs, int32_t *n_msgs)
{
    gen_request_default(q);
    json_t *p = json_object_get(json_array_get(json_object_get(fx->refjson, "prompts"), (size_t)i),
                                "prompt");
    if (json_is_string(p)) {
        q->prompt = json_string_value(p);
    } else {
        *n_msgs = 0;
        size_t k;
        json_t *m;
        json_array_foreach(p, k, m)
        {
            msgs[*n_msgs].role = json_string_value(json_object_get(m, "role"));
            msgs[*n_msgs].content = json_string_value(json_object_get(m, "content"));
            (*n_msgs)++;
        }
        q->messages = msgs;
        q->n_messages = *n_msgs;
    }
}

static int run(fixture *fx, const gen_request *q0, grec *r)
{
    gen_request q = *q0;
    q.on_event = on_event;
    q.user = r;
    r->g = fx->g;
    lm_err err = {0};
    int rc = gen_submit(fx->g, &q, &r->id, &err);
    CHECK(rc == 0, "gen_submit: %s", err.msg);
    if (rc) return rc;
    rec_wait(r);
    return 0;
}

static char *decode(fixture *fx, const int32_t *ids, int32_t n)
{
    char *t = NULL;
    lm_err err = {0};
    CHECK(tokenizer_decode(fx->tok, ids, (size_t)n, true, &t, NULL, &err) == 0, "%s", err.msg);
    return t;
}

/* ---- tests -------------------------------------------------------------------------- */

static int32_t G[MAX_TOK], nG; /* greedy reference of prompt 0 */

static void test_prepare_and_greedy(fixture *fx)
{
    int n_prompts = (int)json_array_size(json_object_get(fx->refjson, "prompts"));
    CHECK(n_prompts >= 3, "only %d reference prompts", n_prompts);
    for (int i = 0; i < n_prompts; i++) {
        char name[64];
        int32_t want_in[MAX_TOK], want_out[MAX_TOK];
        snprintf(name, sizeof name, "p%d.input_ids", i);
        int32_t n_in = read_ids(fx, name, want_in, MAX_TOK);
        snprintf(name, sizeof name, "p%d.greedy_ids", i);
        int32_t n_out = read_ids(fx, name, want_out, MAX_TOK);
        gen_request q;
        chat_message msgs[8];
        int32_t n_msgs = 0;
        ref_request(fx, i, &q, msgs, &n_msgs);
        int32_t *ids = NULL, n = 0;
        lm_err err = {0};
        int rc = gen_prepare(fx->g, &q, &ids, &n, &err);
        CHECK(rc == 0 && n == n_in && memcmp(ids, want_in, sizeof(int32_t) * (size_t)n) == 0,
              "prompt %d (%s): prepared %d ids (%s), reference %d", i, q.prompt ? "text" : "chat",
              n, err.msg, n_in);
        free(ids);

        q.max_tokens = n_out;
        q.ignore_eos = 1; /* the reference decodes a fixed number of tokens */
        q.sampling.logprobs = 3;
        grec r;
        rec_init(&r);
        run(fx, &q, &r);
        int same =
            r.n_tok == n_out && memcmp(r.toks, want_out, sizeof(int32_t) * (size_t)n_out) == 0;
        CHECK(same, "prompt %d: greedy tokens differ from the reference (%d of %d)", i, r.n_tok,
              n_out);
        CHECK(r.finish == SCHED_FINISH_LENGTH && r.completion_tokens == n_out &&
                  r.prompt_tokens == n_in,
              "prompt %d: finish %d, %d completion / %d prompt tokens", i, r.finish,
              r.completion_tokens, r.prompt_tokens);
        CHECK(r.n_top0 == 3 && r.logprob0 <= 0, "prompt %d: logprobs %g, %d alternatives", i,
              r.logprob0, r.n_top0);
        char *want_text = decode(fx, want_out, n_out);
        CHECK(want_text && strcmp(r.text, want_text) == 0,
              "prompt %d: streamed text differs from decoding the ids:\n got  %s\n want %s", i,
              r.text, want_text);
        free(want_text);
        CHECK(r.events_after_finish == 0, "events after FINISHED");
        rec_destroy(&r);
        if (i == 0) {
            memcpy(G, want_out, sizeof(int32_t) * (size_t)n_out);
            nG = n_out;
        }
    }
    printf("gen: %d reference prompts prepared and decoded greedily\n", n_prompts);
}

/* utf-8 length of the character starting at s[0] */
static size_t ch_len(const char *s)
{
    unsigned char c = (unsigned char)*s;
    return c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : 4;
}

/* Generate prompt 0 greedily with stop strings; compare with what the
 * reference text says should happen. */
static void check_stop(fixture *fx, const char *const *stops, int n_stops, const char *what)
{
    char *full = decode(fx, G, nG);
    /* expected: cut at the earliest occurrence of any stop string, and the
     * number of tokens needed for that occurrence to be decoded */
    long cut = -1;
    for (int i = 0; i < n_stops; i++) {
        char *h = strstr(full, stops[i]);
        if (h && (cut < 0 || h - full < cut)) cut = h - full;
    }
    /* tokens needed: the first token after which the streamed text (the
     * streaming detokenizer holds back incomplete characters, sometimes
     * with the whole token) contains a stop string */
    int32_t need = nG;
    if (cut >= 0) {
        tokenizer_detok *d = NULL;
        lm_err err = {0};
        CHECK(tokenizer_detok_new(fx->tok, true, &d, &err) == 0, "%s", err.msg);
        char acc[8192];
        size_t n_acc = 0;
        for (int32_t t = 0; t < nG && d; t++) {
            const char *p;
            size_t n;
            CHECK(tokenizer_detok_push(d, G[t], &p, &n, &err) == 0, "%s", err.msg);
            if (n_acc + n < sizeof acc) {
                memcpy(acc + n_acc, p, n);
                n_acc += n;
            }
            acc[n_acc] = 0;
            int hit = 0;
            for (int i = 0; i < n_stops; i++)
                hit |= strstr(acc, stops[i]) != NULL;
            if (hit) {
                need = t + 1;
                break;
            }
        }
        tokenizer_detok_free(d);
    }
    gen_request q;
    chat_message msgs[8];
    int32_t n_msgs;
    ref_request(fx, 0, &q, msgs, &n_msgs);
    q.max_tokens = nG;
    q.ignore_eos = 1;
    q.stop = stops;
    q.n_stop = n_stops;
    grec r;
    rec_init(&r);
    run(fx, &q, &r);
    if (cut >= 0) {
        CHECK(r.n == (size_t)cut && memcmp(r.text, full, (size_t)cut) == 0,
              "%s: text \"%s\", want the first %ld bytes of \"%s\"", what, r.text, cut, full);
        CHECK(r.finish == SCHED_FINISH_STOP && r.has_stop, "%s: finish %d", what, r.finish);
        CHECK(r.completion_tokens == need, "%s: %d completion tokens, want %d", what,
              r.completion_tokens, need);
        CHECK(r.n_tok == need, "%s: %d deltas, want %d", what, r.n_tok, need);
    } else {
        CHECK(strcmp(r.text, full) == 0, "%s: text \"%s\", want \"%s\"", what, r.text, full);
        CHECK(r.finish == SCHED_FINISH_LENGTH && !r.has_stop, "%s: finish %d", what, r.finish);
    }
    rec_destroy(&r);
    free(full);
}

static void test_stop(fixture *fx)
{
    /* per-token pieces of the reference text */
    size_t bound[MAX_TOK + 1];
    bound[0] = 0;
    char *full = decode(fx, G, nG);
    for (int32_t t = 1; t <= nG; t++) {
        char *pre = decode(fx, G, t);
        bound[t] = strlen(pre);
        free(pre);
    }
    int tested = 0;
    /* a stop string = last character of token k's piece + first character of
     * token k+1's piece: it straddles the boundary */
    for (int32_t k = 1; k + 1 <= nG && tested < 3; k++) {
        size_t b = bound[k];
        if (bound[k - 1] == b || bound[k + 1] == b || b == 0) continue;
        size_t s0 = b - 1;
        while (s0 > bound[k - 1] && ((unsigned char)full[s0] & 0xC0) == 0x80)
            s0--;
        size_t l2 = ch_len(full + b);
        if (b + l2 > bound[k + 1] || s0 < bound[k - 1]) continue;
        char stop[32];
        size_t len = b + l2 - s0;
        if (len >= sizeof stop) continue;
        memcpy(stop, full + s0, len);
        stop[len] = 0;
        const char *stops[1] = {stop};
        check_stop(fx, stops, 1, "stop across a token boundary");
        /* the same with a longer stop string covering 3 tokens, when possible */
        if (k + 2 <= nG && bound[k + 2] > bound[k + 1] && bound[k + 2] - s0 < sizeof stop) {
            memcpy(stop, full + s0, bound[k + 2] - s0);
            stop[bound[k + 2] - s0] = 0;
            check_stop(fx, stops, 1, "stop over three tokens");
        }
        /* a near miss: same start, different end: held back, then released */
        char miss[40];
        snprintf(miss, sizeof miss, "%.*s\x01", (int)(b - s0), full + s0);
        const char *misses[1] = {miss};
        check_stop(fx, misses, 1, "near-miss stop string");
        tested++;
    }
    CHECK(tested > 0, "no token boundary usable for a stop string in \"%s\"", full);
    /* several stop strings: the earliest occurrence wins, whatever the order */
    int32_t k1 = 1;
    while (k1 < nG && bound[k1] >= bound[nG])
        k1++;
    if (bound[nG] >= 4 && k1 < nG) {
        char late[16], early[16];
        snprintf(early, sizeof early, "%.*s", (int)ch_len(full + bound[k1]), full + bound[k1]);
        size_t lpos = bound[nG] - 1;
        while (lpos > 0 && ((unsigned char)full[lpos] & 0xC0) == 0x80)
            lpos--;
        snprintf(late, sizeof late, "%s", full + lpos);
        const char *two[2] = {late, early};
        check_stop(fx, two, 2, "earliest of two stop strings");
    }
    /* the last character + something never generated: held back at the
     * end and flushed in FINISHED */
    size_t last = bound[nG] - 1;
    while (last > 0 && ((unsigned char)full[last] & 0xC0) == 0x80)
        last--;
    char tail[32];
    snprintf(tail, sizeof tail, "%sNEVER", full + last);
    const char *tails[1] = {tail};
    check_stop(fx, tails, 1, "stop prefix at the end of the output");
    free(full);

    /* a stop id: the request ends with that token; its text is not emitted */
    int32_t j = 2;
    for (; j < nG; j++) {
        int seen = 0;
        for (int32_t k = 0; k < j; k++)
            seen |= G[k] == G[j];
        if (!seen) break;
    }
    if (j < nG) {
        gen_request q;
        chat_message msgs[8];
        int32_t n_msgs;
        ref_request(fx, 0, &q, msgs, &n_msgs);
        q.max_tokens = nG;
        q.ignore_eos = 1;
        q.stop_ids = &G[j];
        q.n_stop_ids = 1;
        grec r;
        rec_init(&r);
        run(fx, &q, &r);
        char *want = decode(fx, G, j);
        CHECK(r.finish == SCHED_FINISH_STOP && r.stop_token == G[j] && r.n_tok == j + 1 &&
                  strcmp(r.text, want) == 0,
              "stop id %d: finish %d stop_token %d, %d tokens, text \"%s\" (want \"%s\")", G[j],
              r.finish, r.stop_token, r.n_tok, r.text, want);
        free(want);
        rec_destroy(&r);
    }
}

static void test_seed(fixture *fx)
{
    grec r[3];
    uint64_t seeds[3] = {7, 7, 8};
    for (int k = 0; k < 3; k++) {
        gen_request q;
        chat_message msgs[8];
        int32_t n_msgs;
        ref_request(fx, 0, &q, msgs, &n_msgs);
        q.max_tokens = 32;
        q.ignore_eos = 1;
        q.sampling.temperature = 3.0f;
        q.sampling.top_p = 0.99f;
        q.sampling.seed = seeds[k];
        rec_init(&r[k]);
        run(fx, &q, &r[k]);
    }
    CHECK(r[0].n_tok == 32 && r[0].n_tok == r[1].n_tok &&
              memcmp(r[0].toks, r[1].toks, sizeof(int32_t) * 32) == 0 &&
              strcmp(r[0].text, r[1].text) == 0,
          "same seed, different output");
    CHECK(memcmp(r[0].toks, r[2].toks, sizeof(int32_t) * 32) != 0,
          "seeds 7 and 8 gave the same 32 tokens at temperature 3");
    for (int k = 0; k < 3; k++)
        rec_destroy(&r[k]);
}

static void test_cancel(fixture *fx)
{
    gen_request q;
    chat_message msgs[8];
    int32_t n_msgs;
    ref_request(fx, 0, &q, msgs, &n_msgs);
    q.max_tokens = 200;
    q.ignore_eos = 1;
    grec r;
    rec_init(&r);
    r.cancel_after = 2;
    run(fx, &q, &r);
    CHECK(r.finish == SCHED_FINISH_CANCELLED && r.n_tok >= 2 && r.n_tok < 200,
          "cancel: finish %d after %d tokens", r.finish, r.n_tok);
    CHECK(gen_cancel(fx->g, r.id) == -ENOENT, "cancel of a finished request");
    rec_destroy(&r);
}

static void expect_refused(fixture *fx, gen *g, const gen_request *q0, const char *want)
{
    gen_request q = *q0;
    grec r;
    rec_init(&r);
    q.on_event = on_event;
    q.user = &r;
    uint64_t id = 0;
    lm_err err = {0};
    int rc = gen_submit(g, &q, &id, &err);
    CHECK(rc == -EINVAL && strstr(err.msg, want), "refusal: rc %d \"%s\", want \"%s\"", rc, err.msg,
          want);
    CHECK(r.done == 0 && r.n_tok == 0, "events for a refused request");
    rec_destroy(&r);
    (void)fx;
}

static void test_errors(fixture *fx)
{
    gen_request q;
    gen_request_default(&q);
    expect_refused(fx, fx->g, &q, "no prompt, messages or prompt ids");
    chat_message m = {"user", "hi"};
    q.prompt = "x";
    q.messages = &m;
    q.n_messages = 1;
    expect_refused(fx, fx->g, &q, "more than one");
    gen_request_default(&q);
    q.prompt = "x";
    q.max_tokens = 0;
    expect_refused(fx, fx->g, &q, "max_tokens");
    q.max_tokens = 4;
    const char *empty[1] = {""};
    q.stop = empty;
    q.n_stop = 1;
    expect_refused(fx, fx->g, &q, "stop string 0 is empty");
    const char *bad[1] = {"\xff"};
    q.stop = bad;
    expect_refused(fx, fx->g, &q, "not valid UTF-8");
    const char *many[GEN_MAX_STOP + 1];
    for (int i = 0; i <= GEN_MAX_STOP; i++)
        many[i] = "z";
    q.stop = many;
    q.n_stop = GEN_MAX_STOP + 1;
    expect_refused(fx, fx->g, &q, "at most");
    q.n_stop = 0;
    q.sampling.top_p = 2;
    expect_refused(fx, fx->g, &q, "top_p");
    gen_request_default(&q);
    int32_t ids[2] = {1, 1 << 30};
    q.prompt_ids = ids;
    q.n_prompt_ids = 2;
    expect_refused(fx, fx->g, &q, "outside the vocabulary");
    gen_request_default(&q);
    q.prompt = "bad \xc3";
    expect_refused(fx, fx->g, &q, "prompt");
    gen_request_default(&q);
    chat_message two[2] = {{"user", "a"}, {"user", "b"}};
    q.messages = two;
    q.n_messages = 2;
    q.chat_extra_json = "[]";
    expect_refused(fx, fx->g, &q, "not a JSON object");
    /* a gen without a chat template refuses chat requests */
    gen *g2 = NULL;
    gen_config gc = {fx->tok, NULL, fx->s, NULL, 0};
    lm_err err = {0};
    CHECK(gen_create(&gc, &g2, &err) == 0, "%s", err.msg);
    gen_request_default(&q);
    q.messages = &m;
    q.n_messages = 1;
    expect_refused(fx, g2, &q, "no chat template");
    gen_destroy(g2);
    gen_config none = {NULL, NULL, NULL, NULL, 0};
    CHECK(gen_create(&none, &g2, &err) == -EINVAL, "gen_create without tokenizer");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_gen FIXTURE_DIR\n");
        return 2;
    }
    fixture fx;
    if (fixture_open(&fx, argv[1]) == 0) {
        test_prepare_and_greedy(&fx);
        if (nG > 3) {
            test_stop(&fx);
            test_seed(&fx);
            test_cancel(&fx);
        }
        test_errors(&fx);
    }
    fixture_close(&fx);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("gen: all checks passed\n");
    return 0;
}
