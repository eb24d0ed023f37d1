/*
 * rpc_health.c: grpc.health.v1.Health (Check and Watch).
 *
 * The service names known are "" (the whole server) and
 * "lightmoe.v1.LightMoE"; both report SERVING only while the model is
 * loaded, warm and not draining. Check of another name answers NOT_FOUND;
 * Watch of another name sends SERVICE_UNKNOWN and stays open, as the
 * specification asks. Watch sends the current status at once and then each
 * change; when the daemon drains, watchers get NOT_SERVING and then their
 * stream ends with OK (open Watch calls would otherwise hold the server's
 * shutdown). One server per process: the watcher list is file-global.
 * Health needs no bearer token, so that probes work without secrets.
 */
#include <stdlib.h>
#include <string.h>

#include "daemon/rpc_internal.h"
#include "grpc/health/v1/health.pb-c.h"

typedef struct watcher {
    rpc_call *c;
    int known;                      /* service name known */
    struct watcher *next;
} watcher;

static pthread_mutex_t wmu = PTHREAD_MUTEX_INITIALIZER;
static watcher *watchers;
static int cur_status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
static int ended;

static int known_service(const char *s)
{
    return !s[0] || !strcmp(s, "lightmoe.v1.LightMoE");
}

static void send_status(rpc_call *c, int status)
{
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = status;
    rpc_send(c, &resp.base);
}

static void check(rpc_call *c)
{
    Grpc__Health__V1__HealthCheckRequest *req = (Grpc__Health__V1__HealthCheckRequest *)rpc_unpack(
        c, &grpc__health__v1__health_check_request__descriptor);
    if (!req)
        return;
    if (!known_service(req->service)) {
        rpc_finish(c, GRPC_STATUS_NOT_FOUND, "unknown service '%.200s' (known: \"\", "
                   "lightmoe.v1.LightMoE)", req->service);
    } else {
        pthread_mutex_lock(&wmu);
        int st = cur_status;
        pthread_mutex_unlock(&wmu);
        send_status(c, st);
        rpc_finish(c, GRPC_STATUS_OK, NULL);
    }
    protobuf_c_message_free_unpacked(&req->base, NULL);
}

static void watch_cancel(rpc_call *c)
{
    pthread_mutex_lock(&wmu);
    for (watcher **p = &watchers; *p; p = &(*p)->next)
        if ((*p)->c == c) {
            watcher *w = *p;
            *p = w->next;
            free(w);
            pthread_mutex_unlock(&wmu);
            rpc_finish(c, GRPC_STATUS_CANCELLED, "watch cancelled");
            rpc_call_unref(c); /* the watcher's reference */
            return;
        }
    pthread_mutex_unlock(&wmu);
}

static void watch(rpc_call *c)
{
    Grpc__Health__V1__HealthCheckRequest *req = (Grpc__Health__V1__HealthCheckRequest *)rpc_unpack(
        c, &grpc__health__v1__health_check_request__descriptor);
    if (!req)
        return;
    int known = known_service(req->service);
    protobuf_c_message_free_unpacked(&req->base, NULL);
    watcher *w = calloc(1, sizeof *w);
    if (!w) {
        rpc_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    w->c = c;
    w->known = known;
    c->on_cancel = watch_cancel;
    pthread_mutex_lock(&wmu);
    if (ended) {
        pthread_mutex_unlock(&wmu);
        free(w);
        send_status(c, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING);
        rpc_finish(c, GRPC_STATUS_OK, NULL);
        return;
    }
    rpc_call_ref(c);
    w->next = watchers;
    watchers = w;
    /* Sent under wmu so a change cannot overtake the first status. */
    send_status(c, known ? cur_status
                         : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN);
    pthread_mutex_unlock(&wmu);
}

void rpc_health_set(rpc_server *r, int serving)
{
    int st = serving ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                     : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
    pthread_mutex_lock(&wmu);
    if (st != cur_status) {
        cur_status = st;
        for (watcher *w = watchers; w; w = w->next)
            if (w->known)
                send_status(w->c, st);
    }
    pthread_mutex_unlock(&wmu);
}

void rpc_health_end_watches(void)
{
    pthread_mutex_lock(&wmu);
    ended = 1;
    watcher *list = watchers;
    watchers = NULL;
    pthread_mutex_unlock(&wmu);
    while (list) {
        watcher *w = list;
        list = w->next;
        rpc_finish(w->c, GRPC_STATUS_OK, NULL);
        rpc_call_unref(w->c);
        free(w);
    }
}

const rpc_method rpc_health_methods[] = {
    {"/grpc.health.v1.Health/Check", "Health.Check", 1, 0, check, NULL},
    {"/grpc.health.v1.Health/Watch", "Health.Watch", 1, 0, watch, NULL},
};
const int rpc_health_n_methods = 2;
