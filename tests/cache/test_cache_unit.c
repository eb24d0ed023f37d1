/*
 * test_cache_unit.c: the cache without Redis: value encoding (round trip,
 * every truncation and every single-bit flip refused), URL parsing (good
 * and bad), keys and policy (parameters and models never share, modes),
 * the memory backend (hit/miss, TTL, LRU byte bound under random load,
 * invalidation by model and by prompt prefix) and single flight with 50
 * threads (compute runs once; a failed leader lets followers compute), and
 * with 50 parked followers (no thread each: cache_flight_park / unpark).
 */
#include <pthread.h>
#include <stdatomic.h>

#include "testutil.h"

static cache *make(const char *url, size_t mem, uint32_t ttl)
{
    cache_config cfg;
    cache_config_default(&cfg);
    cfg.url = url;
    if (mem)
        cfg.memory_bytes = mem;
    if (ttl)
        cfg.ttl_s = ttl;
    cfg.prefix_tokens = 4;
    cache *c;
    lm_err e;
    lm_err_clear(&e);
    int rc = cache_create(&cfg, &c, &e);
    CHECK_MSG(rc == 0, "%s", e.msg);
    return c;
}

/* ---- codec ---- */
static void test_codec(void)
{
    int32_t prompt[5] = {1, 2, 300, 40000, 7};
    int32_t toks[3] = {0, 127, 128};
    sample_result lp[3];
    memset(lp, 0, sizeof lp);
    for (int i = 0; i < 3; i++) {
        lp[i].token = toks[i];
        lp[i].logprob = -0.5f * (float)i;
        lp[i].n_top = i;
        for (int j = 0; j < i; j++) {
            lp[i].top_ids[j] = 1000 + j;
            lp[i].top_logprobs[j] = -1.0f - (float)j;
        }
    }
    cache_chunk ch[2] = {{6, 2}, {2, 1}};
    cache_entry e = {.text = "héllo\0x", .text_len = 8, .tokens = toks, .n_tokens = 3,
                     .prompt = prompt, .n_prompt = 5, .finish = 1, .prompt_tokens = 5,
                     .completion_tokens = 3, .logprobs = lp, .chunks = ch, .n_chunks = 2};
    uint8_t *v;
    size_t n;
    CHECK(cache_entry_encode(&e, &v, &n) == 0);
    cache_entry *d;
    lm_err err;
    CHECK(cache_entry_decode(v, n, &d, &err) == 0);
    CHECK(d->text_len == 8 && !memcmp(d->text, "héllo\0x", 8) && d->text[8] == 0);
    CHECK(d->n_tokens == 3 && !memcmp(d->tokens, toks, sizeof toks));
    CHECK(d->n_prompt == 5 && !memcmp(d->prompt, prompt, sizeof prompt));
    CHECK(d->finish == 1 && d->prompt_tokens == 5 && d->completion_tokens == 3);
    CHECK(d->logprobs && d->logprobs[2].n_top == 2 && d->logprobs[2].top_ids[1] == 1001 &&
          d->logprobs[2].top_logprobs[1] == -2.0f && d->logprobs[1].logprob == -0.5f);
    CHECK(d->n_chunks == 2 && d->chunks[0].text_len == 6 && d->chunks[1].n_tokens == 1);
    cache_entry_free(d);
    /* Chunks must add up. */
    {
        cache_chunk bad_ch[2] = {{6, 2}, {3, 1}};
        cache_entry eb2 = e;
        eb2.chunks = bad_ch;
        uint8_t *vb;
        size_t nb;
        CHECK(cache_entry_encode(&eb2, &vb, &nb) == -EINVAL);
    }
    /* Every truncation and every single-bit flip must be refused. */
    for (size_t k = 0; k < n; k++) {
        CHECK(cache_entry_decode(v, k, &d, &err) == -EBADMSG);
        for (int bit = 0; bit < 8; bit++) {
            v[k] ^= (uint8_t)(1 << bit);
            int rc = cache_entry_decode(v, n, &d, &err);
            CHECK_MSG(rc == -EBADMSG, "flip byte %zu bit %d decoded", k, bit);
            v[k] ^= (uint8_t)(1 << bit);
        }
    }
    /* Extended value. */
    uint8_t *v2 = malloc(n + 1);
    memcpy(v2, v, n);
    v2[n] = 0;
    CHECK(cache_entry_decode(v2, n + 1, &d, &err) == -EBADMSG);
    CHECK(strstr(err.msg, "length"));
    free(v2);
    free(v);
    /* Negative ids are refused at encode time. */
    int32_t bad[1] = {-1};
    cache_entry eb = {.text = "", .tokens = bad, .n_tokens = 1};
    CHECK(cache_entry_encode(&eb, &v, &n) == -EINVAL);
    /* Without logprobs, empty text. */
    cache_entry e0 = {.text = "", .tokens = toks, .n_tokens = 3};
    CHECK(cache_entry_encode(&e0, &v, &n) == 0);
    CHECK(cache_entry_decode(v, n, &d, &err) == 0 && d->logprobs == NULL && d->text_len == 0 &&
          d->chunks == NULL && d->n_chunks == 0);
    cache_entry_free(d);
    free(v);
}

/* ---- URLs ---- */
static void test_urls(void)
{
    cache_url u;
    lm_err e;
    CHECK(cache_url_parse("memory", &u, &e) == 0 && u.kind == CACHE_BACKEND_MEMORY);
    CHECK(cache_url_parse("off", &u, &e) == 0 && u.kind == CACHE_BACKEND_OFF);
    CHECK(cache_url_parse("redis://localhost", &u, &e) == 0 && u.kind == CACHE_BACKEND_REDIS &&
          !strcmp(u.host, "localhost") && u.port == 6379 && u.db == 0 && !u.password[0]);
    CHECK(cache_url_parse("redis://127.0.0.1:7000/3", &u, &e) == 0 && u.port == 7000 &&
          u.db == 3);
    CHECK(cache_url_parse("redis://:s%40cret@h:1/0", &u, &e) == 0 && !u.user[0] &&
          !strcmp(u.password, "s@cret"));
    CHECK(cache_url_parse("redis://alice:pw@h:2/5", &u, &e) == 0 && !strcmp(u.user, "alice") &&
          !strcmp(u.password, "pw") && u.db == 5);
    CHECK(cache_url_parse("redis://[::1]:6380", &u, &e) == 0 && !strcmp(u.host, "::1") &&
          u.port == 6380);
    CHECK(cache_url_parse("unix:///run/redis.sock?db=2&password=x", &u, &e) == 0 &&
          u.kind == CACHE_BACKEND_REDIS_UNIX && !strcmp(u.path, "/run/redis.sock") &&
          u.db == 2 && !strcmp(u.password, "x"));
    struct {
        const char *url, *msg;
    } bad[] = {
        {"redis://", "no host"},
        {"redis://h:0", "port"},
        {"redis://h:65536", "port"},
        {"redis://h:12x", "port"},
        {"redis://h/abc", "database"},
        {"redis://h/-1", "database"},
        {"redis://h?db=1", "query"},
        {"redis://alice@h", NULL}, /* lone userinfo = password: accepted */
        {"redis://u:p%zz@h", "password"},
        {"redis://h o", "bad character"},
        {"redis://[::1", "']'"},
        {"unix://relative.sock", "absolute"},
        {"unix:///", "no socket path"},
        {"unix:///s?db=x", "db"},
        {"unix:///s?foo=1", "unknown query"},
        {"unix:///s?user=u", "without a password"},
        {"rediss://h", "TLS"},
        {"http://h", "expected"},
        {"memcached", "expected"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        lm_err_clear(&e);
        int rc = cache_url_parse(bad[i].url, &u, &e);
        if (!bad[i].msg) {
            CHECK(rc == 0 && !strcmp(u.password, "alice") && !u.user[0]);
            continue;
        }
        CHECK_MSG(rc == -EINVAL && strstr(e.msg, bad[i].msg) && strstr(e.msg, bad[i].url),
                  "'%s' -> %d '%s'", bad[i].url, rc, e.msg);
    }
    /* Bad configuration is refused by cache_create with the message. */
    cache_config cfg;
    cache_config_default(&cfg);
    cfg.url = "redis://h:99999";
    cache *c;
    CHECK(cache_create(&cfg, &c, &e) == -EINVAL && strstr(e.msg, "port"));
    cache_config_default(&cfg);
    cfg.ttl_s = 100;
    cfg.max_ttl_s = 10;
    CHECK(cache_create(&cfg, &c, &e) == -EINVAL && strstr(e.msg, "max ttl"));
    cache_config_default(&cfg);
    cfg.prefix = "a b";
    CHECK(cache_create(&cfg, &c, &e) == -EINVAL && strstr(e.msg, "prefix"));
}

/* ---- keys and policy ---- */
static void test_keys(void)
{
    cache *c = make("memory", 0, 0);
    treq a;
    treq_init(&a, "modelA", 1, 10);
    cache_key k0, k1;
    CHECK(treq_key(c, &a, &k0) == 0 && k0.lookup && k0.store && k0.ttl_s == 3600);
    CHECK(!strncmp(k0.str, "lightmoe:v1:", 12) && k0.len == strlen(k0.str));
    /* Each output-affecting change gives another key. */
    treq b = a;
    b.max_tokens = 17;
    CHECK(treq_key(c, &b, &k1) == 0 && strcmp(k0.str, k1.str));
    b = a;
    b.prompt[9]++;
    CHECK(treq_key(c, &b, &k1) == 0 && strcmp(k0.str, k1.str));
    b = a;
    b.sp.repetition_penalty = 1.1f;
    CHECK(treq_key(c, &b, &k1) == 0 && strcmp(k0.str, k1.str));
    b = a;
    b.sp.logprobs = 2;
    CHECK(treq_key(c, &b, &k1) == 0 && strcmp(k0.str, k1.str));
    b = a;
    snprintf(b.fp, sizeof b.fp, "modelB");
    CHECK(treq_key(c, &b, &k1) == 0 && strcmp(k0.str, k1.str));
    CHECK(strncmp(k0.str, k1.str, 12 + 16) != 0); /* model part differs */
    /* Greedy ignores seed and filters: same key (sample.h's promise). */
    b = a;
    b.sp.seed = 99;
    b.sp.top_k = 5;
    CHECK(treq_key(c, &b, &k1) == 0 && !strcmp(k0.str, k1.str));
    /* Sampled without a fixed seed: never looked up nor stored. */
    b = a;
    b.sp.temperature = 0.7f;
    CHECK(treq_key(c, &b, &k1) == 0 && !k1.lookup && !k1.store && strcmp(k0.str, k1.str));
    cache_request r;
    memset(&r, 0, sizeof r);
    r.model_fp = "m";
    r.sampling = &b.sp;
    r.seed_fixed = 1;
    CHECK(cache_key_make(c, &r, &k1, NULL) == 0 && k1.lookup && k1.store);
    cache_key k2;
    b.sp.seed = 5;
    CHECK(cache_key_make(c, &r, &k2, NULL) == 0 && strcmp(k1.str, k2.str)); /* seed counts */
    {
        /* cache_nondeterministic: sampled requests with random seeds share a key. */
        cache_config cfg;
        cache_config_default(&cfg);
        cfg.cache_nondeterministic = 1;
        cache *cn;
        CHECK(cache_create(&cfg, &cn, NULL) == 0);
        r.seed_fixed = 0;
        b.sp.seed = 1;
        CHECK(cache_key_make(cn, &r, &k1, NULL) == 0 && k1.lookup && k1.store);
        b.sp.seed = 2;
        CHECK(cache_key_make(cn, &r, &k2, NULL) == 0 && !strcmp(k1.str, k2.str));
        cache_destroy(cn);
        r.seed_fixed = 1;
    }
    /* Stop strings and stop ids and extra bytes count. */
    const char *stops[2] = {"\n\n", "END"};
    int32_t sid[1] = {7};
    r.seed_fixed = 0;
    r.sampling = &a.sp;
    CHECK(cache_key_make(c, &r, &k1, NULL) == 0);
    r.stop = stops;
    r.n_stop = 1;
    CHECK(cache_key_make(c, &r, &k2, NULL) == 0 && strcmp(k1.str, k2.str));
    r.n_stop = 2;
    cache_key k3;
    CHECK(cache_key_make(c, &r, &k3, NULL) == 0 && strcmp(k3.str, k2.str));
    r.stop_ids = sid;
    r.n_stop_ids = 1;
    CHECK(cache_key_make(c, &r, &k2, NULL) == 0 && strcmp(k3.str, k2.str));
    r.extra = "chat";
    r.n_extra = 4;
    CHECK(cache_key_make(c, &r, &k3, NULL) == 0 && strcmp(k3.str, k2.str));
    /* Modes. */
    b = a;
    b.mode = CACHE_MODE_BYPASS;
    CHECK(treq_key(c, &b, &k1) == 0 && !k1.lookup && !k1.store && !strcmp(k1.str, k0.str));
    b.mode = CACHE_MODE_REFRESH;
    CHECK(treq_key(c, &b, &k1) == 0 && !k1.lookup && k1.store);
    b.mode = CACHE_MODE_NO_STORE;
    CHECK(treq_key(c, &b, &k1) == 0 && k1.lookup && !k1.store);
    /* TTL capped. */
    b = a;
    b.ttl_s = 1000000;
    CHECK(treq_key(c, &b, &k1) == 0 && k1.ttl_s == 86400);
    b.ttl_s = 5;
    CHECK(treq_key(c, &b, &k1) == 0 && k1.ttl_s == 5);
    /* Malformed requests. */
    lm_err e;
    r.n_prompt = -1;
    CHECK(cache_key_make(c, &r, &k1, &e) == -EINVAL && strstr(e.msg, "negative"));
    r.n_prompt = 0;
    r.model_fp = NULL;
    CHECK(cache_key_make(c, &r, &k1, &e) == -EINVAL);
    cache_destroy(c);
    /* off: nothing is looked up. */
    c = make("off", 0, 0);
    CHECK(treq_key(c, &a, &k1) == 0 && !k1.lookup && !k1.store);
    cache_entry *got;
    CHECK(cache_get(c, &k1, 0, &got) == 0);
    cache_destroy(c);
}

static void test_memory(void)
{
    cache *c = make("memory", 1 << 20, 0);
    treq a;
    treq_init(&a, "m", 1, 10);
    CHECK(serve(c, &a, 0) == 0);
    CHECK(serve(c, &a, 0) == 1);
    cache_stats s;
    cache_get_stats(c, &s);
    CHECK(s.hits == 1 && s.misses == 1 && s.stores == 1 && s.bytes_read > 0 && s.errors == 0);
    /* Different params and models never share. */
    treq b = a;
    b.sp.repetition_penalty = 1.3f;
    CHECK(serve(c, &b, 0) == 0 && serve(c, &b, 0) == 1);
    b = a;
    snprintf(b.fp, sizeof b.fp, "m2");
    CHECK(serve(c, &b, 0) == 0 && serve(c, &b, 0) == 1);
    /* Modes: bypass neither reads nor writes; no_store reads only; refresh overwrites. */
    treq n = a;
    n.prompt[0] = 555;
    n.mode = CACHE_MODE_NO_STORE;
    CHECK(serve(c, &n, 0) == 0 && serve(c, &n, 0) == 0);
    n.mode = CACHE_MODE_BYPASS;
    CHECK(serve(c, &n, 0) == 0);
    n.mode = CACHE_MODE_USE;
    CHECK(serve(c, &n, 0) == 0 && serve(c, &n, 0) == 1);
    n.mode = CACHE_MODE_NO_STORE;
    CHECK(serve(c, &n, 0) == 1);
    n.mode = CACHE_MODE_BYPASS;
    CHECK(serve(c, &n, 0) == 0);
    /* Refresh: store a wrong answer, refresh puts the right one back. */
    cache_key k;
    n.mode = CACHE_MODE_USE;
    CHECK(treq_key(c, &n, &k) == 0);
    tanswer wrong;
    compute(&a, &wrong);
    CHECK(cache_put(c, &k, &wrong.e, 0) == 0);
    cache_entry *e;
    CHECK(cache_get(c, &k, 0, &e) == 1 && !strcmp(e->text, wrong.text));
    cache_entry_free(e);
    n.mode = CACHE_MODE_REFRESH;
    CHECK(serve(c, &n, 0) == 0); /* recomputed, overwritten */
    n.mode = CACHE_MODE_USE;
    CHECK(serve(c, &n, 0) == 1); /* serve() checks the text is right */
    /* Values over max_value_bytes are not stored. */
    cache_destroy(c);
    cache_config cfg;
    cache_config_default(&cfg);
    cfg.max_value_bytes = 100;
    CHECK(cache_create(&cfg, &c, NULL) == 0);
    CHECK(treq_key(c, &a, &k) == 0);
    tanswer big;
    compute(&a, &big);
    big.e.n_prompt = 60; /* value grows past 100 bytes */
    int32_t p60[60] = {0};
    big.e.prompt = p60;
    CHECK(cache_put(c, &k, &big.e, 0) == -E2BIG);
    CHECK(cache_get(c, &k, 0, &e) == 0);
    cache_destroy(c);
}

static void test_ttl(void)
{
    cache *c = make("memory", 0, 0);
    treq a;
    treq_init(&a, "m", 2, 5);
    a.ttl_s = 1;
    CHECK(serve(c, &a, 0) == 0 && serve(c, &a, 0) == 1);
    sleep_ms(1100);
    CHECK(serve(c, &a, 0) == 0);
    cache_destroy(c);
}

static void test_lru_bound(void)
{
    const size_t bound = 256 * 1024;
    cache *c = make("memory", bound, 0);
    unsigned seed = 12345;
    uint64_t max_seen = 0;
    for (int i = 0; i < 20000; i++) {
        treq t;
        treq_init(&t, "m", (int)(rand_r(&seed) % 3000), 1 + (int32_t)(rand_r(&seed) % 64));
        serve(c, &t, 0);
        if (i % 100 == 0) {
            cache_stats s;
            cache_get_stats(c, &s);
            if (s.mem_bytes > max_seen)
                max_seen = s.mem_bytes;
            CHECK_MSG(s.mem_bytes <= bound, "memory %llu over bound %zu",
                      (unsigned long long)s.mem_bytes, bound);
        }
    }
    cache_stats s;
    cache_get_stats(c, &s);
    CHECK(s.mem_evictions > 0 && s.hits > 0 && s.mem_bytes <= bound);
    CHECK(max_seen > bound / 2); /* it did fill up */
    /* Most recently used stays. */
    treq t;
    treq_init(&t, "m", 1, 8);
    serve(c, &t, 0);
    CHECK(serve(c, &t, 0) == 1);
    cache_destroy(c);
}

/* ---- single flight ---- */
typedef struct flight_arg {
    cache *c;
    treq t;
    atomic_int *computes;
    int fail_leader;
    int ok;
} flight_arg;

static pthread_barrier_t barrier;

static void *flight_thread(void *p)
{
    flight_arg *fa = p;
    cache_key k;
    CHECK(treq_key(fa->c, &fa->t, &k) == 0);
    tanswer a;
    compute(&fa->t, &a);
    pthread_barrier_wait(&barrier);
    for (int round = 0; round < 3; round++) {
        cache_entry *e;
        if (cache_get(fa->c, &k, 0, &e) == 1) {
            fa->ok = same_answer(e, &a);
            cache_entry_free(e);
            return NULL;
        }
        cache_flight *f;
        int role = cache_flight_join(fa->c, &k, &f);
        if (role == CACHE_FLIGHT_LEADER) {
            atomic_fetch_add(fa->computes, 1);
            sleep_ms(100); /* the "engine" */
            if (fa->fail_leader && round == 0) {
                cache_flight_publish(fa->c, f, NULL);
                fa->fail_leader = 0;
                continue;
            }
            cache_put(fa->c, &k, &a.e, 0);
            cache_flight_publish(fa->c, f, &a.e);
            fa->ok = 1;
            return NULL;
        }
        CHECK(role == CACHE_FLIGHT_FOLLOWER);
        int rc = cache_flight_wait(fa->c, f, ms_from_now(5000), &e);
        if (rc == 0) {
            fa->ok = same_answer(e, &a);
            cache_entry_free(e);
            return NULL;
        }
        CHECK(rc == -EAGAIN); /* leader failed: go round again */
    }
    return NULL;
}

static void run_flight(int fail_leader, int want_computes)
{
    cache *c = make("memory", 0, 0);
    enum { N = 50 };
    pthread_t th[N];
    flight_arg fa[N];
    atomic_int computes = 0;
    pthread_barrier_init(&barrier, NULL, N);
    for (int i = 0; i < N; i++) {
        fa[i].c = c;
        treq_init(&fa[i].t, "m", 42, 12);
        fa[i].computes = &computes;
        fa[i].fail_leader = fail_leader;
        fa[i].ok = 0;
        pthread_create(&th[i], NULL, flight_thread, &fa[i]);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        CHECK(fa[i].ok);
    }
    pthread_barrier_destroy(&barrier);
    CHECK_MSG(atomic_load(&computes) == want_computes, "computes %d, want %d",
              atomic_load(&computes), want_computes);
    cache_stats s;
    cache_get_stats(c, &s);
    CHECK(s.flight_leaders == (uint64_t)want_computes);
    cache_destroy(c);
}

static void test_flight_timeout(void)
{
    cache *c = make("memory", 0, 0);
    treq a;
    treq_init(&a, "m", 7, 3);
    cache_key k;
    CHECK(treq_key(c, &a, &k) == 0);
    cache_flight *lead, *fol;
    CHECK(cache_flight_join(c, &k, &lead) == CACHE_FLIGHT_LEADER);
    CHECK(cache_flight_join(c, &k, &fol) == CACHE_FLIGHT_FOLLOWER);
    cache_entry *e;
    int64_t t0 = cache_now_ns();
    CHECK(cache_flight_wait(c, fol, ms_from_now(50), &e) == -ETIMEDOUT);
    int64_t dt = (cache_now_ns() - t0) / 1000000;
    CHECK(dt >= 45 && dt < 1000);
    cache_flight_publish(c, lead, NULL); /* no followers left: frees */
    CHECK(cache_flight_join(c, &k, &lead) == CACHE_FLIGHT_LEADER);
    cache_flight_publish(c, lead, NULL);
    cache_destroy(c);
}

/* Parked followers (cache_flight_park): no thread waits. 50 are parked on
 * one flight; 3 are taken back before the leader publishes (their done is
 * never called); the rest each get their own copy of the answer exactly
 * once, from the publishing thread. A second flight fails: its followers
 * get -EAGAIN. Parking on a flight that has already ended answers at once.
 * Nothing may leak (ASan). */
typedef struct pwait {
    cache_flight_waiter w;
    int calls, rc;
    cache_entry *e;
} pwait;

static void pwait_done(cache_flight_waiter *w, int rc, cache_entry *e)
{
    pwait *p = (pwait *)w;
    p->calls++;
    p->rc = rc;
    p->e = e;
}

static void test_flight_park(void)
{
    cache *c = make("memory", 0, 0);
    treq t;
    treq_init(&t, "m", 9, 5);
    cache_key k;
    CHECK(treq_key(c, &t, &k) == 0);
    tanswer a;
    compute(&t, &a);
    enum { N = 50 };
    static pwait pw[N];
    for (int round = 0; round < 2; round++) {
        int fail = round == 1;
        memset(pw, 0, sizeof pw);
        cache_flight *lead, *fol[N];
        CHECK(cache_flight_join(c, &k, &lead) == CACHE_FLIGHT_LEADER);
        for (int i = 0; i < N; i++) {
            CHECK(cache_flight_join(c, &k, &fol[i]) == CACHE_FLIGHT_FOLLOWER);
            pw[i].w.done = pwait_done;
            cache_flight_park(c, fol[i], &pw[i].w);
            CHECK(pw[i].calls == 0);
        }
        for (int i = 0; i < 3; i++)
            CHECK(cache_flight_unpark(c, fol[i], &pw[i].w) == 1);
        CHECK(cache_flight_unpark(c, fol[0], &pw[0].w) == 0); /* only once */
        cache_flight_publish(c, lead, fail ? NULL : &a.e);
        for (int i = 0; i < N; i++) {
            CHECK_MSG(pw[i].calls == (i < 3 ? 0 : 1), "waiter %d: %d calls", i, pw[i].calls);
            if (i < 3)
                continue;
            if (fail) {
                CHECK(pw[i].rc == -EAGAIN && !pw[i].e);
            } else {
                CHECK(pw[i].rc == 0 && pw[i].e && same_answer(pw[i].e, &a));
                cache_entry_free(pw[i].e);
            }
        }
    }
    /* A follower that parks after the leader published (its flight already
     * left the table) is answered from park itself. */
    cache_flight *lead, *fol;
    CHECK(cache_flight_join(c, &k, &lead) == CACHE_FLIGHT_LEADER);
    CHECK(cache_flight_join(c, &k, &fol) == CACHE_FLIGHT_FOLLOWER);
    cache_flight_publish(c, lead, &a.e);
    pwait late = {.w.done = pwait_done};
    cache_flight_park(c, fol, &late.w);
    CHECK(late.calls == 1 && late.rc == 0 && same_answer(late.e, &a));
    cache_entry_free(late.e);
    cache_stats s;
    cache_get_stats(c, &s);
    CHECK(s.flight_failed == 1);
    cache_destroy(c);
}

int main(void)
{
    test_codec();
    test_urls();
    test_keys();
    test_memory();
    test_ttl();
    test_lru_bound();
    cache *c = make("memory", 0, 0);
    test_invalidate(c);
    cache_destroy(c);
    run_flight(0, 1);
    run_flight(1, 2);
    test_flight_timeout();
    test_flight_park();
    printf("cache unit tests ok\n");
    return 0;
}
