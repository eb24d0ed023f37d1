/*
 * lightmoed.c: the daemon's main: configuration, start-up order, signals,
 * reload and drain. Everything here runs on the main thread, which after
 * start-up only waits for signals (blocked in every thread, taken with
 * sigtimedwait) and updates the status line and the tokens/s window.
 *
 * Start-up: config -> gRPC port bound (health NOT_SERVING, calls answer
 * UNAVAILABLE) -> metrics port -> model load on a loader thread (STATUS and
 * EXTEND_TIMEOUT_USEC) -> warm-up -> SERVING, READY=1.
 * SIGTERM/SIGINT: STOPPING=1, NOT_SERVING, new requests UNAVAILABLE,
 * running streams get drain_grace_seconds, then are cancelled with
 * UNAVAILABLE and a message that says so; the port closes; exit 0.
 * SIGHUP: RELOADING=1, config file re-read (flags still win), reloadable
 * keys applied, token file re-read, READY=1.
 * SIGUSR1/SIGUSR2 (debug_hooks = yes only): stall/resume the engine loop.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon/cache_hooks.h"
#include "daemon/config.h"
#include "daemon/log.h"
#include "daemon/metrics.h"
#include "daemon/runner.h"
#include "daemon/notify.h"
#include "daemon/rpc.h"
#include "daemon/serve.h"

#define MAX_OVERRIDES 64

typedef struct override {
    const char *key, *value;
} override;

static const char *config_path;
static int config_path_given;
static override overrides[MAX_OVERRIDES];
static int n_overrides;

static _Atomic int stall_engine;    /* debug hook */
static int debug_hooks;
static int64_t step_delay_ms;       /* debug hook */

static const int handled[5] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2};
static volatile sig_atomic_t recorded[5];

static void on_signal(int sig)
{
    for (int i = 0; i < 5; i++)
        if (handled[i] == sig)
            recorded[i] = 1;
}

/* A signal some other thread caught for us, or -1. */
static int take_recorded(void)
{
    for (int i = 0; i < 5; i++)
        if (recorded[i]) {
            recorded[i] = 0;
            return handled[i];
        }
    return -1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: lightmoed --model DIR [--listen HOST:PORT] [--config FILE]\n"
            "                 [--metrics-listen HOST:PORT] [--device cpu|cuda] [--KEY VALUE...]\n"
            "       lightmoed --check-config [--config FILE] [--KEY VALUE...]\n\n"
            "Serves a Mixture-of-Experts model over gRPC (lightmoe.v1.LightMoE).\n"
            "The configuration file (default %s, key = value) is read first;\n"
            "flags override it. Every key is also a flag:\n\n",
            CONFIG_DEFAULT_PATH);
    dconf_usage(f);
    fprintf(f, "\n  --config FILE              configuration file\n"
               "  --check-config             validate the configuration, print it and exit\n"
               "  --help, --version\n\n"
               "Signals: TERM/INT drain and exit, HUP reloads the reloadable keys.\n");
}

/* Build the configuration from the file and the flags. */
static int build_config(daemon_config *cfg, char *err, size_t n)
{
    dconf_defaults(cfg);
    if (config_path) {
        int rc = dconf_load_file(cfg, config_path, err, n);
        if (rc == -ENOENT && !config_path_given)
            rc = 0; /* the default file is optional */
        if (rc)
            return rc;
    }
    for (int i = 0; i < n_overrides; i++) {
        char where[128];
        snprintf(where, sizeof where, "--%s", overrides[i].key);
        int rc = dconf_set(cfg, overrides[i].key, overrides[i].value, where, err, n);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- engine tick (engine thread) ---------------------------------------------- */

static void engine_tick(void *user)
{
    /* Debug hook: a stalled engine loop stops the watchdog pings exactly as
     * a hung GPU step would. */
    while (atomic_load(&stall_engine)) {
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    notify_watchdog_tick();
    if (step_delay_ms > 0) {
        struct timespec ts = {step_delay_ms / 1000, (step_delay_ms % 1000) * 1000000};
        nanosleep(&ts, NULL);
    }
}

/* ---- loading (loader thread) ----------------------------------------------------- */

typedef struct loader {
    daemon_config cfg;
    runner *m;
    int rc;
    char err[LM_ERR_MSG_MAX];
    _Atomic int done;
    _Atomic int stop;               /* SIGTERM came while loading */
} loader;

static void on_progress(void *user, const char *what, int step, int n_steps)
{
    if (n_steps > 0) {
        notify_status("loading: %s (%d/%d)", what, step, n_steps);
        log_info("loading: %s (%d/%d)", what, step, n_steps);
    } else {
        notify_status("loading: %s", what);
        log_info("loading: %s", what);
    }
    notify_extend_timeout(60ULL * 1000000); /* each step may take up to a minute more */
}

static void *load_thread(void *arg)
{
    loader *l = arg;
    lm_err err = {0};
    if (l->cfg.debug_load_delay_ms > 0) {
        on_progress(NULL, "debug_load_delay_ms", 0, 0);
        for (int64_t t = 0; t < l->cfg.debug_load_delay_ms && !atomic_load(&l->stop); t += 20) {
            struct timespec ts = {0, 20 * 1000000};
            nanosleep(&ts, NULL);
        }
    }
    if (atomic_load(&l->stop)) { /* SIGTERM while loading: do not load at all */
        l->m = NULL;
        atomic_store(&l->done, 1);
        return NULL;
    }
    l->rc = runner_load(&l->cfg, on_progress, NULL, engine_tick, NULL, &l->m, &err);
    if (l->rc == 0) {
        on_progress(NULL, "warming up", 0, 0);
        l->rc = runner_warmup(l->m, &err);
        if (l->rc) {
            runner_destroy(l->m);
            l->m = NULL;
        }
    }
    if (l->rc)
        snprintf(l->err, sizeof l->err, "%s", err.msg);
    atomic_store(&l->done, 1);
    return NULL;
}

/* ---- gauges for /metrics ------------------------------------------------------------ */

typedef struct app {
    daemon_config cfg;
    serve *sv;
    rpc_server *rpc;
    _Atomic(runner *) m;
} app;

static void gauges(void *user, metrics_gauges *g)
{
    app *a = user;
    runner *m = atomic_load(&a->m);
    if (m) {
        runner_get_stats(m, &g->sched);
        g->has_sched = 1;
    }
    g->active_streams = serve_active(a->sv);
    g->serving = a->rpc ? rpc_is_serving(a->rpc) : 0;
}

/* ---- reload ---------------------------------------------------------------------------- */

static void reload(app *a)
{
    notify_reloading();
    notify_status("reloading configuration");
    log_info("SIGHUP: reloading %s", config_path ? config_path : "(no file: flags only)");
    daemon_config fresh;
    char err[1024];
    int rc = build_config(&fresh, err, sizeof err);
    if (!rc)
        rc = dconf_validate(&fresh, err, sizeof err);
    if (rc) {
        log_error("reload failed, keeping the running configuration: %s", err);
    } else {
        dconf_apply_reload(&a->cfg, &fresh);
        log_level lvl;
        if (!log_parse_level(a->cfg.log_level, &lvl))
            log_set_level(lvl);
        if (rpc_load_tokens(a->rpc, a->cfg.auth_token_file, err, sizeof err))
            log_error("reload: %s; keeping the tokens in force", err);
        else if (a->cfg.auth_token_file[0])
            log_info("reload: bearer tokens re-read from %s", a->cfg.auth_token_file);
        serve_reconfigure(a->sv, &a->cfg);
    }
    notify_ready();
    notify_status("serving");
}

/* ---- main -------------------------------------------------------------------------------- */

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    int check_only = 0;
    config_path = CONFIG_DEFAULT_PATH;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--version")) {
            printf("lightmoed %s\n", LIGHTMOE_VERSION);
            return 0;
        }
        if (!strcmp(a, "--check-config")) {
            check_only = 1;
            continue;
        }
        if (strncmp(a, "--", 2) || !a[2]) {
            fprintf(stderr, "lightmoed: unexpected argument '%s' (see --help)\n", a);
            return 2;
        }
        const char *key = a + 2, *value;
        char *eq = strchr(key, '=');
        static char keybuf[MAX_OVERRIDES][64];
        if (eq) {
            size_t kl = (size_t)(eq - key);
            if (kl >= 64 || n_overrides >= MAX_OVERRIDES) {
                fprintf(stderr, "lightmoed: bad flag '%s'\n", a);
                return 2;
            }
            memcpy(keybuf[n_overrides], key, kl);
            keybuf[n_overrides][kl] = 0;
            key = keybuf[n_overrides];
            value = eq + 1;
        } else {
            if (i + 1 >= argc) {
                fprintf(stderr, "lightmoed: %s needs a value (see --help)\n", a);
                return 2;
            }
            value = argv[++i];
        }
        if (!strcmp(key, "tp"))
            key = "tensor_parallel"; /* the short spelling scripts use */
        if (!strcmp(key, "config")) {
            config_path = value;
            config_path_given = 1;
            continue;
        }
        if (n_overrides >= MAX_OVERRIDES) {
            fprintf(stderr, "lightmoed: too many flags\n");
            return 2;
        }
        overrides[n_overrides].key = key;
        overrides[n_overrides].value = value;
        n_overrides++;
    }

    static app A;
    char err[1024];
    int rc = build_config(&A.cfg, err, sizeof err);
    if (!rc)
        rc = dconf_validate(&A.cfg, err, sizeof err);
    if (rc) {
        fprintf(stderr, "lightmoed: configuration error: %s\n", err);
        return 1;
    }
    if (check_only) {
        dconf_dump(&A.cfg, stdout);
        fprintf(stderr, "lightmoed: configuration OK\n");
        return 0;
    }

    log_init();
    log_level lvl = LL_INFO;
    log_parse_level(A.cfg.log_level, &lvl);
    log_set_level(lvl);
    debug_hooks = A.cfg.debug_hooks;
    step_delay_ms = A.cfg.debug_step_delay_ms;

    /* Signals are taken synchronously by this thread only: block them
     * before any thread starts so every thread inherits the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* A thread that was not started by us (a sanitizer's helper thread, for
     * one) may have these signals unblocked and would die of the default
     * action: give them a handler that only records the signal for the
     * loop below. Ours never run it (blocked), sigtimedwait takes them. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 5; i++)
        sigaction(handled[i], &sa, NULL);

    notify_init();
    notify_status("starting");
    log_info("lightmoed %s starting: model %s on %s", LIGHTMOE_VERSION, A.cfg.model, A.cfg.device);

    if (serve_create(&A.cfg, &A.sv)) {
        log_error("out of memory");
        return 1;
    }
    /* The cache never connects here: a Redis that is down does not delay the start. */
    if ((rc = cache_hooks_install(A.sv, &A.cfg, err, sizeof err))) {
        log_error("%s", err);
        serve_destroy(A.sv);
        return 1;
    }
    int port = 0;
    if ((rc = rpc_start(&A.cfg, A.sv, &A.rpc, &port, err, sizeof err))) {
        log_error("%s", err);
        serve_destroy(A.sv);
        return 1;
    }
    log_info("gRPC listening on %s (port %d)%s%s", A.cfg.listen, port,
             A.cfg.tls_cert[0] ? ", TLS" : "", A.cfg.tls_client_ca[0] ? " with client certs" : "");
    metrics_set_gauge_source(gauges, &A);
    if (A.cfg.metrics_listen[0]) {
        int mport = 0;
        if ((rc = metrics_start(A.cfg.metrics_listen, &mport, err, sizeof err))) {
            log_error("%s", err);
            rpc_shutdown(A.rpc, 1);
            rpc_destroy(A.rpc);
            serve_destroy(A.sv);
            return 1;
        }
        log_info("metrics listening on %s (port %d)", A.cfg.metrics_listen, mport);
    }

    static loader L;
    L.cfg = A.cfg;
    pthread_t lt;
    pthread_create(&lt, NULL, load_thread, &L);
    int loaded = 0, stopping = 0, exit_code = 0;
    int64_t last_tick = mono_ns(), drain_start = 0, last_status = 0;
    int cancelled_rest = 0;
    uint64_t last_steps = 0;
    for (;;) {
        struct timespec to = {0, 100 * 1000000};
        siginfo_t si;
        int sig = sigtimedwait(&set, &si, &to);
        if (sig < 0)
            sig = take_recorded();
        int64_t now = mono_ns();
        if (sig == SIGTERM || sig == SIGINT) {
            if (!stopping) {
                stopping = 1;
                drain_start = now;
                /* Refuse new work first: once the log or systemd hear
                 * "draining", no request may still be admitted. */
                serve_set_draining(A.sv);
                rpc_begin_drain(A.rpc);
                log_info("%s: draining (grace period %.1fs)", sig == SIGTERM ? "SIGTERM" : "SIGINT",
                         A.cfg.drain_grace_seconds);
                notify_stopping();
                notify_status("draining: %d request(s) in progress", serve_active(A.sv));
                atomic_store(&L.stop, 1);
            }
        } else if (sig == SIGHUP) {
            if (loaded && !stopping)
                reload(&A);
            else
                log_warn("SIGHUP ignored while %s", stopping ? "draining" : "loading");
        } else if (sig == SIGUSR1 || sig == SIGUSR2) {
            if (debug_hooks) {
                atomic_store(&stall_engine, sig == SIGUSR1);
                log_warn("debug hook: engine loop %s", sig == SIGUSR1 ? "STALLED" : "resumed");
            } else {
                log_warn("%s ignored (debug_hooks = no)", sig == SIGUSR1 ? "SIGUSR1" : "SIGUSR2");
            }
        }

        if (!loaded && atomic_load(&L.done)) {
            pthread_join(lt, NULL);
            loaded = 1;
            if (L.rc) {
                log_error("cannot load the model: %s", L.err);
                notify_status("failed to load the model: %s", L.err);
                exit_code = 1;
                break;
            }
            atomic_store(&A.m, L.m);
            serve_attach_model(A.sv, L.m);
            if (!stopping) {
                rpc_set_serving(A.rpc, 1);
                notify_ready();
                notify_status("serving");
                runner_info ri;
                runner_get_info(L.m, &ri);
                log_info("ready: serving %s on %s (tensor_parallel %d)", A.cfg.model, ri.device,
                         ri.tensor_parallel);
            }
        }
        if (stopping && loaded) {
            int active = serve_active(A.sv);
            double waited = (double)(now - drain_start) * 1e-9;
            if (active == 0)
                break;
            if (waited >= A.cfg.drain_grace_seconds && !cancelled_rest) {
                char msg[256];
                snprintf(msg, sizeof msg,
                         "lightmoed is shutting down: the drain grace period (%gs) ended before "
                         "this request finished; retry on another instance",
                         A.cfg.drain_grace_seconds);
                log_warn("drain: grace period over, cancelling %d request(s)", active);
                serve_cancel_all(A.sv, ST_UNAVAILABLE, msg);
                cancelled_rest = 1;
            }
            if (cancelled_rest && waited >= A.cfg.drain_grace_seconds + 30) {
                log_error("drain: %d request(s) did not end 30s after cancellation", active);
                break;
            }
        }
        if (now - last_tick >= 1000000000) {
            last_tick = now;
            metrics_tick();
        }
        runner *m = atomic_load(&A.m);
        if (m) { /* batch sizes, sampled: one observation per 100 ms with steps */
            sched_stats st;
            runner_get_stats(m, &st);
            if (st.steps != last_steps && st.running > 0)
                metrics_observe_batch(st.running);
            last_steps = st.steps;
        }
        if (loaded && !stopping && now - last_status >= 5000000000LL) {
            last_status = now;
            notify_status("serving: %d request(s) in progress, %.1f tokens/s, %llu requests",
                          serve_active(A.sv), metrics_tokens_per_second(),
                          (unsigned long long)metrics_requests_total());
        }
    }

    /* Shutdown: the port closes, then the engine stops, then the rest. A
     * further TERM/INT/HUP changes nothing now: ignore them, so that one
     * still pending cannot end the process half-way should a library
     * unblock signals while it shuts down (seen under ASan). */
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    if (!loaded) {
        pthread_join(lt, NULL);
        atomic_store(&A.m, L.m);
    }
    notify_status("stopping");
    rpc_begin_drain(A.rpc);
    serve_set_draining(A.sv);
    log_info("shutdown: closing the gRPC port");
    rpc_shutdown(A.rpc, 2.0);
    log_info("shutdown: stopping the engine");
    serve_attach_model(A.sv, NULL);
    runner *m = atomic_load(&A.m);
    atomic_store(&A.m, NULL);
    metrics_stop();
    runner_destroy(m);
    log_info("shutdown: releasing gRPC");
    rpc_destroy(A.rpc);
    serve_destroy(A.sv);
    log_info("stopped");
    return exit_code;
}
