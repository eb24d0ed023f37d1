/*
 * harness.h: small helpers shared by the scheduler tests: CHECK macros and
 * a request recorder (the event callback stores tokens and the FINISHED
 * event; waiting for completion uses one mutex/condition pair).
 */
#ifndef TESTS_SCHED_HARNESS_H
#define TESTS_SCHED_HARNESS_H

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/sched.h"

#include "tests/check_msg.h"

static inline int64_t h_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void h_sleep_ms(double ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)((ms - (time_t)(ms / 1000) * 1000) * 1e6)};
    nanosleep(&ts, NULL);
}

typedef struct rec {
    uint64_t id;
    int32_t cap;
    int32_t *tokens;            /* [cap] received TOKEN events */
    int32_t n;
    int finished, n_finished_events, n_after_finish;
    sched_finish finish;
    int32_t prompt_tokens, completion_tokens, cached_prompt_tokens;
    char message[256];
    int64_t t_submit, t_first, t_finish;
} rec;

static pthread_mutex_t h_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t h_cv = PTHREAD_COND_INITIALIZER;
static int h_n_finished;

static inline void rec_init(rec *r, int32_t cap)
{
    memset(r, 0, sizeof *r);
    r->cap = cap;
    r->tokens = calloc((size_t)cap + 1, sizeof *r->tokens);
    r->t_submit = h_now_ns();
}

static inline void rec_free(rec *r)
{
    free(r->tokens);
    r->tokens = NULL;
}

static void rec_on_event(void *user, const sched_event *ev)
{
    rec *r = user;
    pthread_mutex_lock(&h_mu);
    if (r->finished) {
        r->n_after_finish++;
    } else if (ev->type == SCHED_EVENT_TOKEN) {
        if (!r->n)
            r->t_first = h_now_ns();
        if (r->n < r->cap)
            r->tokens[r->n] = ev->tok.token;
        r->n++;
    } else {
        r->finished = 1;
        r->n_finished_events++;
        r->finish = ev->finish;
        r->prompt_tokens = ev->prompt_tokens;
        r->completion_tokens = ev->completion_tokens;
        r->cached_prompt_tokens = ev->cached_prompt_tokens;
        if (ev->message)
            snprintf(r->message, sizeof r->message, "%s", ev->message);
        r->t_finish = h_now_ns();
        h_n_finished++;
        pthread_cond_broadcast(&h_cv);
    }
    pthread_mutex_unlock(&h_mu);
}

/* Wait until h_n_finished >= n or timeout; returns 1 when reached. */
static inline int h_wait_finished(int n, double timeout_s)
{
    int64_t end = h_now_ns() + (int64_t)(timeout_s * 1e9);
    pthread_mutex_lock(&h_mu);
    while (h_n_finished < n && h_now_ns() < end) {
        pthread_mutex_unlock(&h_mu);
        h_sleep_ms(1);
        pthread_mutex_lock(&h_mu);
    }
    int ok = h_n_finished >= n;
    pthread_mutex_unlock(&h_mu);
    return ok;
}

static inline int rec_finished(rec *r)
{
    pthread_mutex_lock(&h_mu);
    int f = r->finished;
    pthread_mutex_unlock(&h_mu);
    return f;
}

static inline int32_t rec_count(rec *r)
{
    pthread_mutex_lock(&h_mu);
    int32_t n = r->n;
    pthread_mutex_unlock(&h_mu);
    return n;
}

/* Fill a request with defaults pointing at rec r. */
static inline void h_request(sched_request *q, const int32_t *prompt, int32_t n_prompt,
                             int32_t max_tokens, rec *r)
{
    memset(q, 0, sizeof *q);
    q->prompt = prompt;
    q->n_prompt = n_prompt;
    q->max_tokens = max_tokens;
    sample_params_default(&q->sampling);
    q->on_event = rec_on_event;
    q->user = r;
}

#endif
