/*
 * test_sched_cpu.c: the scheduler over the CPU backend on the reference
 * fixtures: greedy output must be identical token for token however a
 * request is scheduled.
 *
 *   test_sched_cpu FIXTURE_DIR
 *
 * For each reference prompt p{i} (reference.safetensors: p{i}.input_ids,
 * p{i}.greedy_ids, the transformers greedy decode) and for "branch"
 * prompts that share a prefix with them (p{i} cut short plus other
 * tokens, whose expected output is what the same scheduler produces for
 * them alone with prefix caching off), on a fresh scheduler each time:
 *   alone      one request at a time, no prefix cache (must equal the reference);
 *   batched    everything submitted at once (different lengths in one step);
 *   chunked    prefill_chunk 3, step budget 7: prompts arrive in pieces
 *              interleaved with other requests' decode tokens;
 *   prefix     block_size 4, prefix cache on: every prompt and branch three
 *              times, all at once (later copies hit the cache);
 *   prefix-seq the same, one request at a time, twice over;
 *   preempt    a KV cache barely larger than the largest request: the
 *              newest requests are preempted and recomputed;
 *   adaptive   the controller on with a 1 ms target (budgets move).
 * The KV cache must be back to nothing used after each. With `quick`
 * (sanitizer builds, where the forward is ~20x slower) only alone, chunked
 * and preempt+prefix run.
 */
#include "engine/backends.h"
#include "engine/model.h"
#include "engine/safetensors.h"

#include "tests/sched/harness.h"

#define MAX_P 8
#define MAX_T 256

typedef struct ref_prompt {
    int32_t n_prompt, n_new;
    int32_t prompt[MAX_T];
    int32_t expect[MAX_T];
} ref_prompt;

static ref_prompt P[2 * MAX_P];
static int n_ref, n_all;

static int read_ids(const safetensors_file *f, const char *name, int32_t *out, int32_t *n)
{
    const safetensors_tensor *t = safetensors_find(f, name);
    if (!t)
        return 0;
    CHECK(t->dtype == ST_I32 && t->numel > 0 && t->numel <= MAX_T, "%s: dtype %s numel %lld",
          name, st_dtype_name(t->dtype), (long long)t->numel);
    if (t->dtype != ST_I32 || t->numel <= 0 || t->numel > MAX_T)
        return 0;
    memcpy(out, t->data, (size_t)t->numel * sizeof(int32_t));
    *n = (int32_t)t->numel;
    return 1;
}

typedef struct scenario {
    const char *name;
    int32_t block_size, prefill_chunk, max_step_tokens, kv_blocks;
    int prefix_cache, sequential, repeat;
    double target;
} scenario;

static backend *open_cpu(const model *m)
{
    backend_options bo;
    backend_options_default(&bo);
    bo.threads = 2;
    backend *be = NULL;
    lm_err err = {0};
    int rc = backend_open(m, &bo, &be, &err);
    CHECK(rc == 0, "backend_open: %s", err.msg);
    return be;
}

/* Run the prompts [0, n) under a scenario; outputs into got[i]. */
static void run(const model *m, const scenario *sc, int n, rec *got, sched_stats *ret_st)
{
    backend *be = open_cpu(m);
    if (!be)
        return;
    backend_info info;
    backend_get_info(be, &info);
    sched_config cfg;
    sched_config_default(&cfg);
    cfg.block_size = sc->block_size;
    cfg.prefill_chunk = sc->prefill_chunk;
    cfg.max_step_tokens = sc->max_step_tokens;
    cfg.min_step_tokens = 1;
    cfg.target_itl_ms = sc->target;
    cfg.prefix_cache = sc->prefix_cache;
    cfg.max_running = 8;
    cfg.kv_bytes = (size_t)sc->kv_blocks * sc->block_size * info.kv_bytes_per_token;
    cfg.eos_ids = m->cfg.eos_ids;
    cfg.n_eos_ids = m->cfg.n_eos;
    sched *s = NULL;
    lm_err err = {0};
    int rc = sched_create(be, &cfg, &s, &err);
    CHECK(rc == 0, "%s: sched_create: %s", sc->name, err.msg);
    if (rc < 0) {
        backend_destroy(be);
        return;
    }
    h_n_finished = 0;
    int total = n * sc->repeat, done = 0;
    for (int k = 0; k < total; k++) {
        int i = k % n;
        sched_request q;
        rec_init(&got[k], P[i].n_new);
        h_request(&q, P[i].prompt, P[i].n_prompt, P[i].n_new, &got[k]);
        q.ignore_eos = 1; /* the references decode a fixed number of tokens */
        rc = sched_submit(s, &q, &got[k].id, &err);
        CHECK(rc == 0, "%s: submit %d: %s", sc->name, k, err.msg);
        if (sc->sequential)
            CHECK(h_wait_finished(++done, 60), "%s: request %d did not finish", sc->name, k);
    }
    CHECK(h_wait_finished(total, 120), "%s: %d of %d finished", sc->name, h_n_finished, total);
    for (int w = 0; w < 200; w++) {
        sched_get_stats(s, ret_st);
        if (!ret_st->kv_blocks_used && !ret_st->running)
            break;
        h_sleep_ms(1);
    }
    CHECK(ret_st->kv_blocks_used == 0, "%s: %d KV blocks leaked", sc->name,
          ret_st->kv_blocks_used);
    sched_destroy(s);
    backend_destroy(be);
}

static int same_output(const rec *r, const ref_prompt *p, const char *fixture, const char *sc,
                       int k)
{
    int32_t d = 0;
    while (d < p->n_new && d < r->n && r->tokens[d] == p->expect[d])
        d++;
    int ok = r->n == p->n_new && d == p->n_new && r->finish == SCHED_FINISH_LENGTH;
    CHECK(ok, "%s %s request %d: %d of %d tokens, first difference at %d (finish %d %s)",
          fixture, sc, k, r->n, p->n_new, d, r->finish, r->message);
    return ok;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "quick"))) {
        fprintf(stderr, "usage: test_sched_cpu FIXTURE_DIR [quick]\n");
        return 2;
    }
    int quick = argc == 3; /* sanitizer builds: the scenarios that matter most */
    const char *dir = argv[1];
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress lines as they happen */
    const char *fixture = strrchr(dir, '/') ? strrchr(dir, '/') + 1 : dir;
    char path[1024];
    snprintf(path, sizeof path, "%s/reference.safetensors", dir);
    safetensors_file *ref = NULL;
    lm_err err = {0};
    if (safetensors_open(path, &ref, &err) < 0) {
        fprintf(stderr, "test_sched_cpu: %s\n", err.msg);
        return 1;
    }
    for (n_ref = 0; n_ref < MAX_P; n_ref++) {
        char name[64];
        snprintf(name, sizeof name, "p%d.input_ids", n_ref);
        if (!read_ids(ref, name, P[n_ref].prompt, &P[n_ref].n_prompt))
            break;
        snprintf(name, sizeof name, "p%d.greedy_ids", n_ref);
        CHECK(read_ids(ref, name, P[n_ref].expect, &P[n_ref].n_new), "%s missing", name);
    }
    safetensors_close(ref);
    CHECK(n_ref > 0, "%s: no prompts in reference.safetensors", dir);
    model *m = NULL;
    int rc = model_load(dir, NULL, &m, &err);
    CHECK(rc == 0, "model_load: %s", err.msg);
    if (rc < 0 || failures)
        return 1;

    /* Branches: p{i}'s first 9 tokens (two full blocks of 4 and one more),
     * then p{i+1}'s tokens. */
    n_all = n_ref;
    for (int i = 0; i < n_ref; i++) {
        ref_prompt *b = &P[n_all++];
        const ref_prompt *a = &P[i], *c = &P[(i + 1) % n_ref];
        int32_t keep = a->n_prompt < 9 ? a->n_prompt : 9;
        memcpy(b->prompt, a->prompt, (size_t)keep * sizeof(int32_t));
        memcpy(b->prompt + keep, c->prompt, (size_t)c->n_prompt * sizeof(int32_t));
        b->n_prompt = keep + c->n_prompt;
        b->n_new = 12;
    }
    int32_t max_total = 0;
    for (int i = 0; i < n_all; i++)
        if (P[i].n_prompt + P[i].n_new > max_total)
            max_total = P[i].n_prompt + P[i].n_new;

    static rec got[6 * MAX_P];
    sched_stats st;

    /* alone: the references, and the branches' expected outputs. */
    scenario alone = {"alone", 16, 256, 512, 64, 0, 1, 1, 0};
    run(m, &alone, n_all, got, &st);
    int ref_ok = 1;
    for (int i = 0; i < n_ref; i++)
        ref_ok &= same_output(&got[i], &P[i], fixture, "alone vs reference", i);
    for (int i = n_ref; i < n_all; i++) {
        CHECK(got[i].n == P[i].n_new, "branch %d: %d tokens", i, got[i].n);
        memcpy(P[i].expect, got[i].tokens, (size_t)P[i].n_new * sizeof(int32_t));
    }
    for (int i = 0; i < n_all; i++)
        rec_free(&got[i]);
    printf("%s %-15s %s: %d prompts one at a time equal the transformers greedy ids\n",
           fixture, "alone", ref_ok ? "ok" : "FAILED", n_ref);

    int32_t tight = (max_total + 3) / 4 + 2; /* blocks of 4 */
    const scenario scs[] = {
        {"batched", 16, 256, 512, 64, 0, 0, 1, 0},
        {"chunked", 16, 3, 7, 64, 0, 0, 1, 0},
        {"prefix", 4, 256, 512, 256, 1, 0, 3, 0},
        {"prefix-seq", 4, 256, 512, 256, 1, 1, 2, 0},
        {"preempt", 4, 8, 64, tight, 0, 0, 1, 0},
        {"preempt+prefix", 4, 8, 64, tight, 1, 0, 2, 0},
        {"adaptive", 16, 16, 256, 64, 1, 0, 2, 1.0},
    };
    for (size_t k = 0; k < sizeof scs / sizeof scs[0]; k++) {
        const scenario *sc = &scs[k];
        if (quick && strcmp(sc->name, "chunked") && strcmp(sc->name, "preempt+prefix"))
            continue;
        int before = failures;
        run(m, sc, n_all, got, &st);
        int total = n_all * sc->repeat;
        for (int r = 0; r < total; r++)
            same_output(&got[r], &P[r % n_all], fixture, sc->name, r);
        if (!strncmp(sc->name, "prefix", 6)) {
            CHECK(st.prefix_tokens_reused > 0, "prefix: nothing reused");
            int hits = 0;
            for (int r = n_all; r < total; r++)
                hits += got[r].cached_prompt_tokens > 0;
            CHECK(hits > 0, "prefix: no repeated request was served from the cache");
        }
        if (!strncmp(sc->name, "preempt", 7))
            CHECK(st.preemptions > 0, "%s: no preemption with %d blocks", sc->name, tight);
        printf("%s %-15s %s: %d requests, %llu steps, %llu preemptions, %llu prefix tokens "
               "reused\n",
               fixture, sc->name, failures == before ? "ok" : "FAILED", total,
               (unsigned long long)st.steps, (unsigned long long)st.preemptions,
               (unsigned long long)st.prefix_tokens_reused);
        for (int r = 0; r < total; r++)
            rec_free(&got[r]);
    }
    model_free(m);
    return failures ? 1 : 0;
}
