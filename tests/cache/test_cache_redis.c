/*
 * test_cache_redis.c: the Redis backend against real redis-server
 * processes started by redis_harness.c (free port, temp folder):
 * hit/miss and modes, TTL expiry, SELECT db, corrupt value -> miss and
 * overwrite, invalidation (SCAN + pipelined UNLINK), a pool used by 16
 * threads, Redis killed in the middle of 200 requests (no error reaches the
 * caller, answers right, one DOWN report), restarted (used again after the
 * back-off, one OK report), made slow by SIGSTOP and by DEBUG SLEEP (calls
 * return within their deadline), AUTH with a password and an ACL user
 * (and a wrong password: misses, DOWN with the reason), the unix socket;
 * pipelined lookups (cache_get_many): 128 GETs of hits and misses in one
 * batch, each answered once and right; on a stopped Redis each op answered
 * by its own bound, the shortest first; Redis killed under a warm pool:
 * every op a miss, no error to the caller, DOWN; cache_get_stream: a
 * lookup queued while the pipeline awaits Redis joins it (answered by its
 * own shorter bound before the first op).
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "redis_harness.h"
#include "testutil.h"

/* ---- state callback recorder ---- */
static pthread_mutex_t st_mu = PTHREAD_MUTEX_INITIALIZER;
static int n_down, n_ok;
static char last_why[512];

static void on_state(void *user, cache_state s, const char *why)
{
    pthread_mutex_lock(&st_mu);
    if (s == CACHE_STATE_DOWN)
        n_down++;
    else
        n_ok++;
    snprintf(last_why, sizeof last_why, "%s", why);
    pthread_mutex_unlock(&st_mu);
}

static void reset_states(void)
{
    pthread_mutex_lock(&st_mu);
    n_down = n_ok = 0;
    last_why[0] = 0;
    pthread_mutex_unlock(&st_mu);
}

static cache *make_ex(const char *url, int timeout_ms, int report)
{
    cache_config cfg;
    cache_config_default(&cfg);
    cfg.url = url;
    cfg.timeout_ms = timeout_ms;
    cfg.backoff_min_ms = 50;
    cfg.backoff_max_ms = 400;
    cfg.prefix_tokens = 4;
    cfg.on_state = report ? on_state : NULL;
    cache *c;
    lm_err e;
    lm_err_clear(&e);
    CHECK_MSG(cache_create(&cfg, &c, &e) == 0, "%s", e.msg);
    return c;
}

static cache *make(const char *url) { return make_ex(url, 50, 1); }

static redis_proc R; /* the main server */

static void url_of(const redis_proc *r, char *out, size_t n, const char *auth, int db)
{
    snprintf(out, n, "redis://%s127.0.0.1:%d/%d", auth ? auth : "", r->port, db);
}

static void test_basic(void)
{
    char url[256];
    url_of(&R, url, sizeof url, NULL, 3);
    cache *c = make(url);
    treq a;
    treq_init(&a, "m", 1, 10);
    CHECK(serve(c, &a, ms_from_now(500)) == 0);
    CHECK(serve(c, &a, ms_from_now(500)) == 1);
    char out[256];
    CHECK(redis_admin(&R, out, sizeof out, "INFO keyspace") == 0 && strstr(out, "db3:keys=1"));
    treq b = a;
    b.sp.presence_penalty = 0.5f;
    CHECK(serve(c, &b, 0) == 0 && serve(c, &b, 0) == 1);
    b = a;
    snprintf(b.fp, sizeof b.fp, "m-new");
    CHECK(serve(c, &b, 0) == 0 && serve(c, &b, 0) == 1);
    /* modes */
    treq n = a;
    n.prompt[0] = 777;
    n.mode = CACHE_MODE_NO_STORE;
    CHECK(serve(c, &n, 0) == 0 && serve(c, &n, 0) == 0);
    n.mode = CACHE_MODE_REFRESH;
    CHECK(serve(c, &n, 0) == 0);
    n.mode = CACHE_MODE_NO_STORE;
    CHECK(serve(c, &n, 0) == 1);
    n.mode = CACHE_MODE_BYPASS;
    CHECK(serve(c, &n, 0) == 0);
    cache_stats s;
    cache_get_stats(c, &s);
    CHECK(s.errors == 0 && s.state == CACHE_STATE_OK && s.hits == 4 && s.bytes_written > 0 &&
          s.get_count > 0 && s.get_ns_sum > 0 && s.kind == CACHE_BACKEND_REDIS);
    /* TTL: the key carries EX and disappears. */
    treq t = a;
    t.prompt[1] = 4242;
    t.ttl_s = 1;
    CHECK(serve(c, &t, 0) == 0 && serve(c, &t, 0) == 1);
    cache_key k;
    CHECK(treq_key(c, &t, &k) == 0);
    sleep_ms(1200);
    CHECK(serve(c, &t, 0) == 0);
    /* Corrupt value: miss, counted, then overwritten by the store. */
    treq x = a;
    x.prompt[2] = 999;
    CHECK(treq_key(c, &x, &k) == 0);
    /* The harness' admin connection is on db 0: the scripts SELECT 3 themselves. */
    char cmd[600];
    snprintf(cmd, sizeof cmd, "%s", k.str);
    {
        /* Put a valid value, then flip a byte through SETRANGE on db 3 via EVAL. */
        tanswer ans;
        compute(&x, &ans);
        CHECK(cache_put(c, &k, &ans.e, 0) == 0);
        CHECK(redis_admin(&R, out, sizeof out,
                          "EVAL %s 1 %s", "redis.call('SELECT', 3); "
                          "return redis.call('SETRANGE', KEYS[1], 20, 'XYZ')", cmd) == 0);
    }
    cache_get_stats(c, &s);
    uint64_t corrupt0 = s.corrupt;
    CHECK(serve(c, &x, 0) == 0); /* corrupt -> miss, recomputed and stored again */
    cache_get_stats(c, &s);
    CHECK(s.corrupt == corrupt0 + 1);
    CHECK(serve(c, &x, 0) == 1);
    /* Garbage of another shape (not our format at all). */
    CHECK(redis_admin(&R, out, sizeof out, "EVAL %s 1 %s",
                      "redis.call('SELECT', 3); return redis.call('SET', KEYS[1], 'hello')",
                      cmd) == 0);
    CHECK(serve(c, &x, 0) == 0 && serve(c, &x, 0) == 1);
    /* Invalidation. */
    test_invalidate(c);
    cache_get_stats(c, &s);
    CHECK(s.errors == 0 && s.invalidated == 7);
    cache_destroy(c);
}

/* ---- pipelined lookups ---- */
#define MANY 129

typedef struct many_rec {
    treq t[MANY];
    cache_key k[MANY];
    cache_get_op op[MANY];
    int calls[MANY], hit[MANY];
    int order[MANY], n_done;
} many_rec;

/* Op i answered: counted, ordered, and a hit checked against the answer
 * its request computes. */
static void many_record(many_rec *m, int i, int hit, cache_entry *e)
{
    m->calls[i]++;
    m->hit[i] = hit;
    m->order[m->n_done++] = i;
    if (hit) {
        tanswer a;
        compute(&m->t[i], &a);
        CHECK_MSG(e && same_answer(e, &a), "op %d: wrong answer '%s' for '%s'", i,
                  e ? e->text : "(none)", a.text);
        cache_entry_free(e);
    } else {
        CHECK(e == NULL);
    }
}

static void many_done(void *user, cache_get_op *op, int hit, cache_entry *e)
{
    many_rec *m = user;
    int i = (int)(op - m->op);
    CHECK(i >= 0 && i < MANY && op->user == &m->calls[i]);
    many_record(m, i, hit, e);
}

static void many_run(cache *c, many_rec *m, int n)
{
    memset(m->calls, 0, sizeof m->calls);
    m->n_done = 0;
    cache_get_many(c, m->op, n, many_done, m);
    CHECK(m->n_done == n);
    for (int i = 0; i < n; i++)
        CHECK_MSG(m->calls[i] == 1, "op %d answered %d times", i, m->calls[i]);
}

/* One lookup of t through cache_get_many (the daemon's path): 1 on a hit. */
static int many_hit(cache *c, const treq *t)
{
    many_rec *m = calloc(1, sizeof *m);
    m->t[0] = *t;
    CHECK(treq_key(c, &m->t[0], &m->k[0]) == 0);
    m->op[0] = (cache_get_op){&m->k[0], ms_from_now(500), &m->calls[0]};
    many_run(c, m, 1);
    int hit = m->hit[0];
    free(m);
    return hit;
}

static void test_get_many(void)
{
    char url[256];
    url_of(&R, url, sizeof url, NULL, 4);
    cache *c = make(url);
    reset_states();
    many_rec *m = calloc(1, sizeof *m);
    /* 64 prompts, each twice; the even ones stored beforehand; the last op
     * is a bypass (no lookup). */
    for (int i = 0; i < MANY; i++) {
        treq_init(&m->t[i], "many", i % 64, 6);
        if (i == MANY - 1)
            m->t[i].mode = CACHE_MODE_BYPASS;
        if (i < 64 && i % 2 == 0)
            CHECK(serve(c, &m->t[i], 0) == 0);
        CHECK(treq_key(c, &m->t[i], &m->k[i]) == 0);
        m->op[i] = (cache_get_op){&m->k[i], i % 3 ? ms_from_now(2000) : 0, &m->calls[i]};
    }
    cache_stats s0, s;
    cache_get_stats(c, &s0);
    many_run(c, m, MANY);
    for (int i = 0; i < MANY; i++)
        CHECK_MSG(m->hit[i] == (i < MANY - 1 && (i % 64) % 2 == 0), "op %d hit %d", i,
                  m->hit[i]);
    cache_get_stats(c, &s);
    CHECK(s.hits - s0.hits == 64 && s.misses - s0.misses == 64 &&
          s.bypassed - s0.bypassed == 1 && s.errors == 0 && s.get_count - s0.get_count == 128);

    /* Redis stopped: each op is answered by its own bound (40 ms, 150 ms,
     * then timeout_ms = 400 ms), in that order, none a full second late. */
    cache *c2 = make_ex(url, 400, 0);
    CHECK(serve(c2, &m->t[0], 0) == 1); /* pool warm */
    CHECK(redis_pause(&R) == 0);
    int64_t t0 = cache_now_ns();
    int64_t dl[3] = {t0 + 150 * 1000000LL, 0, t0 + 40 * 1000000LL};
    for (int i = 0; i < 3; i++)
        m->op[i].deadline_ns = dl[i];
    cache_get_stats(c2, &s0);
    many_run(c2, m, 3);
    int64_t took = cache_now_ns() - t0;
    CHECK_MSG(redis_resume(&R) == 0, "redis-server was resumed while the test had it stopped");
    CHECK_MSG(m->order[0] == 2 && m->order[1] == 0 && m->order[2] == 1,
              "answered in the order %d %d %d", m->order[0], m->order[1], m->order[2]);
    CHECK(!m->hit[0] && !m->hit[1] && !m->hit[2]);
    CHECK_MSG(took < 1400 * 1000000LL, "the batch took %lld ms", (long long)(took / 1000000));
    cache_get_stats(c2, &s);
    CHECK(s.timeouts - s0.timeouts == 3 && s.misses - s0.misses == 3);
    cache_destroy(c2);

    /* Redis killed under a warm pool: the broken context is retried on a
     * fresh one, which cannot connect: every op a miss, DOWN once. */
    for (int i = 0; i < 8; i++)
        m->op[i].deadline_ns = ms_from_now(500);
    CHECK(serve(c, &m->t[0], 0) == 1);
    redis_kill(&R);
    many_run(c, m, 8);
    for (int i = 0; i < 8; i++)
        CHECK(!m->hit[i]);
    cache_get_stats(c, &s);
    CHECK(s.state == CACHE_STATE_DOWN && s.errors >= 1);
    pthread_mutex_lock(&st_mu);
    CHECK_MSG(n_down == 1, "down %d", n_down);
    pthread_mutex_unlock(&st_mu);
    CHECK(redis_start(&R, R.port, NULL) == 0);
    /* Back after the back-off; the store was lost with the old server. */
    int64_t until = ms_from_now(5000);
    do {
        sleep_ms(20);
        many_run(c, m, 1);
        cache_get_stats(c, &s);
    } while (s.state != CACHE_STATE_OK && cache_now_ns() < until);
    CHECK(s.state == CACHE_STATE_OK && !m->hit[0]);
    CHECK(serve(c, &m->t[0], 0) == 0);
    many_run(c, m, 2);
    CHECK(m->hit[0] && !m->hit[1]);
    free(m);
    cache_destroy(c);
}

/* cache_get_stream: a lookup queued while the pipeline awaits replies
 * joins it. Redis stopped: op 0 (bound 400 ms) is sent, then op 1 (bound
 * 60 ms) is queued 50 ms later: op 1 is answered first (it did not wait
 * for op 0's batch). Redis running: ops queued meanwhile are hits. */
typedef struct stream_src {
    pthread_mutex_t mu;
    int efd;
    int queued, taken;          /* ops [taken, queued) of rec are waiting */
    many_rec *m;
    int delay_ms;
} stream_src;

static stream_src *S; /* the test's source (take has the rec as user) */

static int stream_take2(void *user, cache_get_op *ops, int max)
{
    (void)user;
    pthread_mutex_lock(&S->mu);
    int n = 0;
    while (S->taken < S->queued && n < max) {
        ops[n] = S->m->op[S->taken++];
        ops[n].user = &S->m->calls[S->taken - 1];
        n++;
    }
    pthread_mutex_unlock(&S->mu);
    return n;
}

static void stream_done(void *user, cache_get_op *op, int hit, cache_entry *e)
{
    many_rec *m = user;
    int i = (int)((int *)op->user - m->calls); /* ops may be copies: find by user */
    CHECK(i >= 0 && i < MANY);
    many_record(m, i, hit, e);
}

static void *stream_feeder(void *p)
{
    stream_src *src = p;
    for (int k = 1; k < 3; k++) {
        sleep_ms(src->delay_ms);
        pthread_mutex_lock(&src->mu);
        src->m->op[k].deadline_ns = k == 1 ? ms_from_now(60) : ms_from_now(2000);
        src->queued = k + 1;
        pthread_mutex_unlock(&src->mu);
        uint64_t one = 1;
        CHECK(write(src->efd, &one, sizeof one) == sizeof one);
    }
    return NULL;
}

static void stream_run(cache *c, many_rec *m, stream_src *src)
{
    cache_get_op ops[8];
    memset(m->calls, 0, sizeof m->calls);
    m->n_done = 0;
    src->queued = 1;
    src->taken = 0;
    S = src;
    int n = stream_take2(NULL, ops, 8);
    pthread_t th;
    pthread_create(&th, NULL, stream_feeder, src);
    cache_get_more more = {src->efd, stream_take2};
    void *scratch = malloc(cache_get_stream_scratch(8)); /* the daemon's reader makes it once */
    CHECK(scratch != NULL);
    cache_get_stream(c, ops, n, 8, &more, scratch, stream_done, m);
    pthread_join(th, NULL);
    if (src->taken < src->queued) { /* came after the stream ended: a new one */
        n = stream_take2(NULL, ops, 8);
        cache_get_stream(c, ops, n, 8, &more, NULL, stream_done, m);
    }
    free(scratch);
    for (int i = 0; i < 3; i++)
        CHECK_MSG(m->calls[i] == 1, "op %d answered %d times", i, m->calls[i]);
}

static void test_get_stream(void)
{
    char url[256];
    url_of(&R, url, sizeof url, NULL, 5);
    cache *c = make_ex(url, 400, 0);
    many_rec *m = calloc(1, sizeof *m);
    stream_src src = {PTHREAD_MUTEX_INITIALIZER, eventfd(0, EFD_NONBLOCK), 0, 0, m, 50};
    CHECK(src.efd >= 0);
    for (int i = 0; i < 3; i++) {
        treq_init(&m->t[i], "stream", i, 6);
        CHECK(serve(c, &m->t[i], 0) == 0); /* stored: hits below */
        CHECK(treq_key(c, &m->t[i], &m->k[i]) == 0);
        m->op[i] = (cache_get_op){&m->k[i], ms_from_now(2000), &m->calls[i]};
    }
    /* Running Redis: the ops fed meanwhile (or after) are all hits. */
    src.delay_ms = 5;
    stream_run(c, m, &src);
    CHECK(m->hit[0] && m->hit[1] && m->hit[2]);
    /* Stopped Redis: op 1 (60 ms bound, queued 50 ms in) is answered
     * before op 0 (400 ms), so it joined the pipeline in flight. */
    src.delay_ms = 50;
    m->op[0].deadline_ns = 0;
    CHECK(redis_pause(&R) == 0);
    stream_run(c, m, &src);
    CHECK_MSG(redis_resume(&R) == 0, "redis-server was resumed while the test had it stopped");
    CHECK(!m->hit[0] && !m->hit[1] && !m->hit[2]);
    CHECK_MSG(m->order[0] == 1, "answered in the order %d %d %d", m->order[0], m->order[1],
              m->order[2]);
    close(src.efd);
    free(m);
    cache_destroy(c);
}

/* ---- many threads ---- */
typedef struct load_arg {
    cache *c;
    int id, n;
    atomic_int *done;
    int64_t worst_ns;
    int hits;
    int deadline_ms;
} load_arg;

static void *load_thread(void *p)
{
    load_arg *la = p;
    for (int i = 0; i < la->n; i++) {
        treq t;
        treq_init(&t, "load", (la->id * 7 + i) % 10, 6); /* 10 distinct prompts: many hits */
        int64_t t0 = cache_now_ns();
        int64_t dl = la->deadline_ms ? t0 + (int64_t)la->deadline_ms * 1000000 : 0;
        la->hits += serve(la->c, &t, dl);
        int64_t dt = cache_now_ns() - t0;
        if (dt > la->worst_ns)
            la->worst_ns = dt;
        atomic_fetch_add(la->done, 1);
        sleep_ms(2);
    }
    return NULL;
}

static void run_load(cache *c, int threads, int per, int deadline_ms, atomic_int *done,
                     load_arg *la, pthread_t *th)
{
    for (int i = 0; i < threads; i++) {
        la[i] = (load_arg){.c = c, .id = i, .n = per, .done = done, .deadline_ms = deadline_ms};
        pthread_create(&th[i], NULL, load_thread, &la[i]);
    }
}

static void test_pool(void)
{
    char url[256];
    url_of(&R, url, sizeof url, NULL, 0);
    cache *c = make_ex(url, 2000, 1); /* correctness of the pool, not its speed */
    atomic_int done = 0;
    load_arg la[16];
    pthread_t th[16];
    run_load(c, 16, 40, 0, &done, la, th);
    int hits = 0;
    for (int i = 0; i < 16; i++) {
        pthread_join(th[i], NULL);
        hits += la[i].hits;
    }
    cache_stats s;
    cache_get_stats(c, &s);
    CHECK_MSG(s.errors == 0 && hits >= 16 * 40 - 10 * 16, "errors %llu hits %d",
              (unsigned long long)s.errors, hits);
    cache_destroy(c);
}

/* Kill in the middle of 200 requests, then restart. */
static void test_kill_restart(void)
{
    char url[256];
    url_of(&R, url, sizeof url, NULL, 1);
    cache *c = make(url);
    reset_states();
    atomic_int done = 0;
    load_arg la[4];
    pthread_t th[4];
    run_load(c, 4, 50, 300, &done, la, th);
    while (atomic_load(&done) < 100)
        sleep_ms(1);
    redis_kill(&R);
    int64_t worst = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL); /* serve() CHECKs every answer */
        if (la[i].worst_ns > worst)
            worst = la[i].worst_ns;
    }
    CHECK(atomic_load(&done) == 200);
    cache_stats s;
    cache_get_stats(c, &s);
    pthread_mutex_lock(&st_mu);
    CHECK_MSG(n_down == 1 && n_ok == 0, "down %d ok %d", n_down, n_ok);
    pthread_mutex_unlock(&st_mu);
    CHECK(s.state == CACHE_STATE_DOWN && s.errors >= 1 && s.unavailable > 0);
    CHECK_MSG(worst < 300 * 1000000LL, "a request took %lld ms", (long long)(worst / 1000000));
    fprintf(stderr, "kill: errors %llu unavailable %llu worst %lld ms, why '%s'\n",
            (unsigned long long)s.errors, (unsigned long long)s.unavailable,
            (long long)(worst / 1000000), last_why);
    /* While down, a lookup returns at once. */
    treq t;
    treq_init(&t, "load", 3, 6);
    int64_t t0 = cache_now_ns();
    CHECK(serve(c, &t, ms_from_now(300)) == 0);
    CHECK(cache_now_ns() - t0 < 100 * 1000000LL);
    /* Restart on the same port: after the back-off it is used again. */
    CHECK(redis_start(&R, R.port, NULL) == 0);
    int hit = 0;
    int64_t until = ms_from_now(5000);
    while (!hit && cache_now_ns() < until) {
        hit = serve(c, &t, ms_from_now(300));
        sleep_ms(20);
    }
    CHECK(hit);
    cache_get_stats(c, &s);
    pthread_mutex_lock(&st_mu);
    CHECK_MSG(n_down == 1 && n_ok == 1, "down %d ok %d", n_down, n_ok);
    pthread_mutex_unlock(&st_mu);
    CHECK(s.state == CACHE_STATE_OK);
    cache_destroy(c);
}

/* Slow Redis: calls return within their deadline (or timeout_ms). */
/* Each call on a stalled Redis must return by its deadline. The machine
 * running the tests may be loaded (2 cores, many jobs, ASan), so a thread
 * is sometimes scheduled tens of ms late: the test asks that the median
 * call that waited for Redis on a 30 ms deadline return by deadline + 5 ms
 * (the backend aims 1 ms early; waiting for timeout_ms = 50 ms instead
 * would put the median 20 ms late) and that no call be more than 1 s late (a
 * backend that waited for the Redis stall itself would be). */
static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void check_bounded(const char *url, cache *c, const char *what)
{
    int64_t over_w[64];
    int waited = 0, late = 0;
    for (int i = 0; i < 16; i++) {
        /* Fresh caches (each connects anew, so each really waits), then the
         * shared one (which goes DOWN and then fails at once). */
        cache *fc = i < 8 ? make_ex(url, 50, 0) : c;
        treq t;
        treq_init(&t, "slow", i % 4, 5);
        cache_key k;
        CHECK(treq_key(fc, &t, &k) == 0);
        for (int op = 0; op < 2; op++) {
            int64_t t0 = cache_now_ns();
            /* 30 ms: under timeout_ms, the deadline bounds it (first on a fresh
             * cache: a full 50 ms timeout turns the backend DOWN) */
            int short_dl = fc != c ? op == 0 : (i + op) % 2;
            int64_t dl = t0 + (int64_t)(short_dl ? 30 : 80) * 1000000;
            if (op == 0) {
                cache_entry *e = NULL;
                CHECK(cache_get(fc, &k, dl, &e) == 0); /* a miss: Redis cannot answer */
            } else {
                tanswer a;
                compute(&t, &a);
                cache_put(fc, &k, &a.e, dl);
            }
            int64_t end = cache_now_ns(), over = end - dl;
            late += over > 0;
            if (short_dl && end - t0 > 5000000)
                over_w[waited++] = over;
            CHECK_MSG(over < 1000000000LL, "%s: a call returned %lld ms after its deadline",
                      what, (long long)(over / 1000000));
        }
        if (fc != c)
            cache_destroy(fc);
    }
    CHECK_MSG(waited >= 8, "%s: only %d short-deadline calls waited for Redis", what, waited);
    qsort(over_w, (size_t)waited, sizeof *over_w, cmp_i64);
    int64_t med = over_w[waited / 2], worst = over_w[waited - 1];
    fprintf(stderr, "%s: %d 30-ms calls waited; median %.1f ms, worst %.1f ms relative to the deadline;"
            " %d of 32 late\n", what, waited, (double)med / 1e6, (double)worst / 1e6, late);
    CHECK_MSG(med <= 5000000, "%s: the median call returned %.1f ms after its deadline", what,
              (double)med / 1e6);
}

/* 1 if Redis answers PING within ms. */
static int redis_responsive(const redis_proc *r, int ms)
{
    struct timeval tv = {0, 200000};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", r->port, tv);
    if (!c || c->err) {
        if (c)
            redisFree(c);
        return 0;
    }
    struct timeval t2 = {0, ms * 1000};
    redisSetTimeout(c, t2);
    redisReply *rep = redisCommand(c, "PING");
    int ok = rep != NULL;
    if (rep)
        freeReplyObject(rep);
    redisFree(c);
    return ok;
}

static void *debug_sleep(void *p)
{
    redis_admin(&R, NULL, 0, "DEBUG SLEEP 3");
    return NULL;
}

static void wait_ok(cache *c)
{
    treq t;
    treq_init(&t, "slow", 99, 5);
    int64_t until = ms_from_now(5000);
    cache_stats s;
    do {
        serve(c, &t, ms_from_now(200));
        cache_get_stats(c, &s);
        sleep_ms(20);
    } while (s.state != CACHE_STATE_OK && cache_now_ns() < until);
    CHECK(s.state == CACHE_STATE_OK);
}

static void test_slow(void)
{
    char url[256];
    url_of(&R, url, sizeof url, NULL, 0);
    cache *c = make(url);
    reset_states();
    treq t;
    treq_init(&t, "slow", 0, 5);
    CHECK(serve(c, &t, 0) == 0 && serve(c, &t, 0) == 1); /* pool warm */
    CHECK(redis_pause(&R) == 0);
    check_bounded(url, c, "SIGSTOP");
    cache_stats s;
    cache_get_stats(c, &s);
    CHECK(s.timeouts >= 1 && s.state == CACHE_STATE_DOWN);
    CHECK_MSG(redis_resume(&R) == 0, "redis-server was resumed while the test had it stopped");
    wait_ok(c);
    /* Stores sent while Redis was stopped ran when it resumed: start empty. */
    CHECK(redis_admin(&R, NULL, 0, "FLUSHALL") == 0);
    pthread_t th;
    pthread_create(&th, NULL, debug_sleep, NULL);
    int64_t until = ms_from_now(5000);
    while (redis_responsive(&R, 30) && cache_now_ns() < until)
        sleep_ms(5); /* until DEBUG SLEEP has begun */
    check_bounded(url, c, "DEBUG SLEEP");
    pthread_join(th, NULL);
    wait_ok(c);
    pthread_mutex_lock(&st_mu);
    CHECK_MSG(n_down == 2 && n_ok == 2, "down %d ok %d", n_down, n_ok);
    pthread_mutex_unlock(&st_mu);
    cache_destroy(c);
}

static void test_auth(void)
{
    redis_proc A = {0};
    CHECK(redis_start(&A, 0, "s3cret") == 0);
    char url[512];
    /* password */
    url_of(&A, url, sizeof url, ":s3cret@", 0);
    cache *c = make(url);
    treq t;
    treq_init(&t, "auth", 1, 5);
    CHECK(serve(c, &t, 0) == 0 && serve(c, &t, 0) == 1);
    CHECK(many_hit(c, &t));
    cache_destroy(c);
    /* wrong password: misses, no error to the caller, DOWN with the reason */
    reset_states();
    url_of(&A, url, sizeof url, ":wrong@", 0);
    c = make(url);
    CHECK(serve(c, &t, 0) == 0 && serve(c, &t, 0) == 0);
    CHECK(!many_hit(c, &t));
    pthread_mutex_lock(&st_mu);
    CHECK_MSG(n_down == 1 && strstr(last_why, "AUTH"), "why '%s'", last_why);
    pthread_mutex_unlock(&st_mu);
    cache_destroy(c);
    /* ACL user limited to the cache's keys */
    char out[256];
    CHECK(redis_admin(&A, out, sizeof out,
                      "ACL SETUSER alice on >alicepw ~lightmoe:* +get +set +scan +unlink +ping "
                      "+select +auth") == 0);
    url_of(&A, url, sizeof url, "alice:alicepw@", 0);
    c = make(url);
    treq_init(&t, "acl", 1, 5);
    CHECK(serve(c, &t, 0) == 0 && serve(c, &t, 0) == 1);
    CHECK(many_hit(c, &t));
    test_invalidate(c);
    cache_stats s;
    cache_get_stats(c, &s);
    CHECK(s.errors == 0 && s.state == CACHE_STATE_OK);
    cache_destroy(c);
    /* unix socket, with password and db */
    snprintf(url, sizeof url, "unix://%s?db=2&password=s3cret", A.sock);
    c = make(url);
    treq_init(&t, "unix", 1, 5);
    CHECK(serve(c, &t, 0) == 0 && serve(c, &t, 0) == 1);
    CHECK(many_hit(c, &t));
    CHECK(redis_admin(&A, out, sizeof out, "INFO keyspace") == 0 && strstr(out, "db2:keys=1"));
    cache_get_stats(c, &s);
    CHECK(s.errors == 0 && s.kind == CACHE_BACKEND_REDIS_UNIX);
    cache_destroy(c);
    redis_cleanup(&A);
}

static void test_down_at_start(void)
{
    /* Nothing listens: every call is a fast miss; one DOWN report. */
    redis_proc D = {0};
    CHECK(redis_start(&D, 0, NULL) == 0);
    int port = D.port;
    redis_cleanup(&D);
    char url[128];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    reset_states();
    cache *c = make(url);
    treq t;
    treq_init(&t, "down", 1, 5);
    for (int i = 0; i < 50; i++) {
        int64_t t0 = cache_now_ns();
        CHECK(serve(c, &t, ms_from_now(200)) == 0);
        CHECK(cache_now_ns() - t0 < 60 * 1000000LL);
    }
    pthread_mutex_lock(&st_mu);
    CHECK(n_down == 1 && strstr(last_why, "connect"));
    pthread_mutex_unlock(&st_mu);
    uint64_t n;
    lm_err e;
    CHECK(cache_invalidate(c, "down", NULL, 0, ms_from_now(100), &n, &e) < 0 &&
          strstr(e.msg, "unavailable"));
    cache_destroy(c);
}

int main(void)
{
    CHECK_MSG(redis_start(&R, 0, NULL) == 0, "cannot start redis-server");
    test_basic();
    test_get_many();
    test_get_stream();
    test_pool();
    test_slow();
    test_kill_restart();
    test_auth();
    test_down_at_start();
    redis_cleanup(&R);
    printf("cache redis tests ok\n");
    return 0;
}
