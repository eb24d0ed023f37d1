/*
 * notify.c: sd_notify messages (see notify.h).
 */
#include "daemon/notify.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <systemd/sd-daemon.h>
#include <time.h>

#include "daemon/log.h"

static uint64_t wd_usec;
static _Atomic int64_t last_ping_ns;

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void notify_init(void)
{
    uint64_t usec = 0;
    int r = sd_watchdog_enabled(0, &usec);
    wd_usec = r > 0 ? usec : 0;
    if (wd_usec)
        log_info("systemd watchdog: %.3fs, pinging every %.3fs from the engine loop",
                 (double)wd_usec * 1e-6, (double)wd_usec * 0.5e-6);
}

void notify_ready(void)
{
    sd_notify(0, "READY=1");
}

void notify_reloading(void)
{
    sd_notify(0, "RELOADING=1");
}

void notify_stopping(void)
{
    sd_notify(0, "STOPPING=1");
}

void notify_status(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sd_notifyf(0, "STATUS=%s", msg);
}

void notify_extend_timeout(uint64_t usec)
{
    sd_notifyf(0, "EXTEND_TIMEOUT_USEC=%llu", (unsigned long long)usec);
}

uint64_t notify_watchdog_usec(void)
{
    return wd_usec;
}

void notify_watchdog_tick(void)
{
    if (!wd_usec)
        return;
    int64_t now = mono_ns();
    int64_t last = atomic_load(&last_ping_ns);
    if (now - last >= (int64_t)wd_usec * 500) { /* half the interval, in ns */
        atomic_store(&last_ping_ns, now);
        sd_notify(0, "WATCHDOG=1");
    }
}
