/*
 * sched_pool.c: the scheduler's sampling threads (see sched_pool.h).
 *
 * A run: the caller, under mu, waits until no worker is still inside the
 * previous run (a worker that took its last row leaves at once), posts
 * fn/ctx/n_rows and the number of workers that may join (`places`),
 * resets the counters, bumps gen and wakes that many workers; then it
 * takes rows itself. A worker that wakes joins the run (active++) only
 * while places and rows are left, so a late one never touches a run that
 * is over, and the counters are never reset under a worker inside.
 * The thread finishing the last row wakes the caller, who waits for rows
 * taken, never for a worker to wake up.
 *
 * Memory order: fn/ctx/n_rows and whatever the caller wrote before the run
 * are published by mu (posted under it, read after taking it); each row's
 * writes precede its `done` increment, which the caller reads before it
 * returns.
 */
#include "engine/sched_pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

typedef struct pool_worker {
    sched_pool *p;
    int32_t idx;
} pool_worker;

struct sched_pool {
    int32_t n;                  /* threads, the caller included */
    int32_t started;            /* workers running: threads 1..started */
    pthread_t *th;              /* [n] (th[0] unused: the caller) */
    pool_worker *w;             /* [n] each worker's argument */
    void **scratch;             /* [n] scratch_bytes each */
    pthread_mutex_t mu;
    pthread_cond_t cv_start;    /* a run was posted, or stop */
    pthread_cond_t cv_done;     /* the last row finished, or the last worker left */
    uint64_t gen;               /* runs posted, under mu */
    int stop;                   /* under mu */
    int32_t active;             /* workers inside the current run, under mu */
    int32_t places;             /* workers that may still join the current run, under mu */
    /* The current run: written under mu, fixed while active > 0. */
    sched_pool_fn fn;
    void *ctx;
    int32_t n_rows;
    atomic_int next;            /* first row not yet taken (runs past n_rows) */
    atomic_int done;            /* rows finished */
};

/* Take rows of the current run until none is left. */
static void take_rows(sched_pool *p, int32_t t)
{
    for (;;) {
        int32_t r = atomic_fetch_add(&p->next, 1);
        if (r >= p->n_rows)
            return;
        p->fn(p->ctx, r, t, p->scratch[t]);
        if (atomic_fetch_add(&p->done, 1) + 1 == p->n_rows) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_broadcast(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

static void *worker_main(void *arg)
{
    pool_worker *w = arg;
    sched_pool *p = w->p;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->gen == seen)
            pthread_cond_wait(&p->cv_start, &p->mu);
        if (p->stop)
            break;
        seen = p->gen;
        if (!p->places || atomic_load(&p->next) >= p->n_rows)
            continue; /* not wanted, or too late: the others took every row */
        p->places--;
        p->active++;
        pthread_mutex_unlock(&p->mu);
        take_rows(p, w->idx);
        pthread_mutex_lock(&p->mu);
        if (--p->active == 0)
            pthread_cond_broadcast(&p->cv_done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int sched_pool_create(int32_t n_threads, size_t scratch_bytes, sched_pool **ret, lm_err *err)
{
    *ret = NULL;
    if (n_threads < 1 || n_threads > SCHED_POOL_MAX_THREADS)
        return lm_err_set(err, -EINVAL, "sched_pool: %d threads out of range [1, %d]", n_threads,
                          SCHED_POOL_MAX_THREADS);
    sched_pool *p = calloc(1, sizeof *p);
    if (!p)
        return lm_err_set(err, -ENOMEM, "sched_pool: out of memory");
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_start, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    p->th = calloc((size_t)n_threads, sizeof *p->th);
    p->w = calloc((size_t)n_threads, sizeof *p->w);
    p->scratch = calloc((size_t)n_threads, sizeof *p->scratch);
    int ok = p->th && p->w && p->scratch;
    for (int32_t i = 0; ok && i < n_threads; i++)
        ok = (p->scratch[i] = malloc(scratch_bytes ? scratch_bytes : 1)) != NULL;
    if (!ok) {
        sched_pool_destroy(p);
        return lm_err_set(err, -ENOMEM, "sched_pool: out of memory for %d scratch areas of %zu bytes",
                          n_threads, scratch_bytes);
    }
    for (int32_t i = 1; i < n_threads; i++) {
        p->w[i] = (pool_worker){p, i};
        int rc = pthread_create(&p->th[i], NULL, worker_main, &p->w[i]);
        if (rc) {
            sched_pool_destroy(p);
            return lm_err_set(err, -rc, "sched_pool: cannot start sampling thread %d of %d", i,
                              n_threads - 1);
        }
        pthread_setname_np(p->th[i], "lm-sample");
        p->started = i;
    }
    *ret = p;
    return 0;
}

int32_t sched_pool_threads(const sched_pool *p)
{
    return p->n;
}

void *sched_pool_scratch(sched_pool *p, int32_t thread)
{
    return p->scratch[thread];
}

void sched_pool_run(sched_pool *p, int32_t n_rows, int32_t n_threads, sched_pool_fn fn,
                    void *ctx)
{
    if (n_rows <= 0)
        return;
    if (n_threads > p->n)
        n_threads = p->n;
    if (n_threads < 2 || n_rows < 2) {
        for (int32_t r = 0; r < n_rows; r++)
            fn(ctx, r, 0, p->scratch[0]);
        return;
    }
    pthread_mutex_lock(&p->mu);
    while (p->active) /* stragglers of the previous run leave it at once */
        pthread_cond_wait(&p->cv_done, &p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_rows = n_rows;
    atomic_store(&p->next, 0);
    atomic_store(&p->done, 0);
    p->places = n_threads - 1;
    p->gen++;
    if (n_threads == p->n)
        pthread_cond_broadcast(&p->cv_start);
    else /* wake as many as may join; any other that looks finds no place */
        for (int32_t i = 1; i < n_threads; i++)
            pthread_cond_signal(&p->cv_start);
    pthread_mutex_unlock(&p->mu);
    take_rows(p, 0);
    pthread_mutex_lock(&p->mu);
    while (atomic_load(&p->done) < n_rows)
        pthread_cond_wait(&p->cv_done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

void sched_pool_destroy(sched_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv_start);
    pthread_mutex_unlock(&p->mu);
    for (int32_t i = 1; i <= p->started; i++)
        pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_start);
    pthread_cond_destroy(&p->cv_done);
    for (int32_t i = 0; p->scratch && i < p->n; i++)
        free(p->scratch[i]);
    free(p->scratch);
    free(p->w);
    free(p->th);
    free(p);
}
