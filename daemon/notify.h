/*
 * notify.h: talking to systemd (sd_notify) for Type=notify units.
 *
 * READY=1 once the model is loaded, warm and the port listens; STATUS=
 * while loading and serving; EXTEND_TIMEOUT_USEC while a large model loads
 * (so TimeoutStartSec can stay short); RELOADING=1 ... READY=1 around a
 * SIGHUP reload; STOPPING=1 when draining starts; WATCHDOG=1 from the
 * engine loop (notify_watchdog_tick, called by the scheduler's on_tick) at
 * half the interval sd_watchdog_enabled reports, so a hung step stops the
 * pings. Without NOTIFY_SOCKET every call is a cheap no-op.
 *
 * Threads: any; notify_watchdog_tick is meant for the engine thread.
 */
#ifndef LIGHTMOE_DAEMON_NOTIFY_H
#define LIGHTMOE_DAEMON_NOTIFY_H

#include <stdint.h>

void notify_init(void);
void notify_ready(void);
void notify_reloading(void);
void notify_stopping(void);
void notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void notify_extend_timeout(uint64_t usec);
/* Watchdog interval in microseconds (0 = off). */
uint64_t notify_watchdog_usec(void);
/* Ping if half the interval has passed since the last ping. */
void notify_watchdog_tick(void);

#endif
