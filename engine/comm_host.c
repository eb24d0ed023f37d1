/*
 * comm_host.c: the host communicator (comm.h): ranks are threads of one
 * process sharing memory. A collective publishes each rank's pointer, then
 * (all-reduce) rank r sums slice r over all ranks in rank order into its
 * own buffer, and every rank copies the other slices from their owners;
 * barriers separate the phases so that no buffer is read while written.
 */
#include "engine/comm.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct host_group {
    int n;
    int refs;
    pthread_mutex_t mu;
    pthread_barrier_t bar;
    float **ptr;                /* [n] published buffers */
    const float **cptr;
} host_group;

typedef struct host_comm {
    comm base;
    host_group *g;
} host_comm;

static void slice(size_t count, int n, int r, size_t *lo, size_t *hi)
{
    *lo = count * (size_t)r / (size_t)n;
    *hi = count * (size_t)(r + 1) / (size_t)n;
}

static int host_all_reduce(comm *c, float *buf, size_t count, lm_err *err)
{
    host_group *g = ((host_comm *)c)->g;
    int r = c->rank, n = g->n;
    g->ptr[r] = buf;
    pthread_barrier_wait(&g->bar);
    size_t lo, hi;
    slice(count, n, r, &lo, &hi);
    for (size_t i = lo; i < hi; i++) {
        float s = g->ptr[0][i];
        for (int k = 1; k < n; k++)
            s += g->ptr[k][i];
        buf[i] = s; /* only rank r reads or writes slice r of any buffer now */
    }
    pthread_barrier_wait(&g->bar);
    for (int k = 0; k < n; k++) {
        if (k == r)
            continue;
        slice(count, n, k, &lo, &hi);
        memcpy(buf + lo, g->ptr[k] + lo, (hi - lo) * sizeof(float));
    }
    pthread_barrier_wait(&g->bar); /* nobody reuses its buffer while others copy */
    return 0;
}

static int host_all_gather(comm *c, const float *send, float *recv, size_t count, lm_err *err)
{
    host_group *g = ((host_comm *)c)->g;
    g->cptr[c->rank] = send;
    pthread_barrier_wait(&g->bar);
    for (int k = 0; k < g->n; k++)
        memcpy(recv + (size_t)k * count, g->cptr[k], count * sizeof(float));
    pthread_barrier_wait(&g->bar);
    return 0;
}

static void host_destroy(comm *c)
{
    host_group *g = ((host_comm *)c)->g;
    pthread_mutex_lock(&g->mu);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    free(c);
    if (last) {
        pthread_barrier_destroy(&g->bar);
        pthread_mutex_destroy(&g->mu);
        free(g->ptr);
        free(g->cptr);
        free(g);
    }
}

static const comm_ops host_ops = {host_all_reduce, host_all_gather, host_destroy};

int comm_host_create(int n, comm **ret, lm_err *err)
{
    if (n < 1 || n > 256)
        return lm_err_set(err, -EINVAL, "host communicator: %d ranks is out of range 1..256", n);
    host_group *g = calloc(1, sizeof *g);
    if (!g || !(g->ptr = calloc((size_t)n, sizeof *g->ptr)) ||
        !(g->cptr = calloc((size_t)n, sizeof *g->cptr))) {
        if (g)
            free(g->ptr);
        free(g);
        return lm_err_set(err, -ENOMEM, "host communicator: out of memory");
    }
    g->n = n;
    pthread_mutex_init(&g->mu, NULL);
    pthread_barrier_init(&g->bar, NULL, (unsigned)n);
    for (int r = 0; r < n; r++) {
        host_comm *hc = calloc(1, sizeof *hc);
        if (!hc) {
            for (int k = 0; k < r; k++)
                host_destroy(ret[k]);
            if (r == 0) {
                pthread_barrier_destroy(&g->bar);
                pthread_mutex_destroy(&g->mu);
                free(g->ptr);
                free(g->cptr);
                free(g);
            }
            return lm_err_set(err, -ENOMEM, "host communicator: out of memory");
        }
        hc->base.ops = &host_ops;
        hc->base.rank = r;
        hc->base.size = n;
        hc->g = g;
        g->refs++;
        ret[r] = &hc->base;
    }
    return 0;
}
