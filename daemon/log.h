/*
 * log.h: the daemon's log, lines on stderr with a level.
 *
 * journald records stderr; when stderr is a journal stream (JOURNAL_STREAM
 * is set) each line starts with a "<N>" syslog priority prefix that journald
 * turns into the entry's priority, otherwise with a UTC time stamp and the
 * level's name. Every line about a request carries "req=<id>".
 *
 * Threads: any thread; a line is written with one write(2) so lines from
 * different threads never interleave. The level can change at run time
 * (SIGHUP reload).
 */
#ifndef LIGHTMOE_DAEMON_LOG_H
#define LIGHTMOE_DAEMON_LOG_H

typedef enum log_level {
    LL_ERROR = 0,
    LL_WARN,
    LL_INFO,
    LL_DEBUG,
} log_level;

void log_init(void);
void log_set_level(log_level level);
log_level log_get_level(void);
/* "error", "warn", "info", "debug" -> 0 and *ret; -EINVAL otherwise. */
int log_parse_level(const char *s, log_level *ret);
const char *log_level_name(log_level level);

/* One line; req_id may be NULL for lines not about a request. */
void log_msg(log_level level, const char *req_id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_error(...) log_msg(LL_ERROR, NULL, __VA_ARGS__)
#define log_warn(...) log_msg(LL_WARN, NULL, __VA_ARGS__)
#define log_info(...) log_msg(LL_INFO, NULL, __VA_ARGS__)
#define log_debug(...) log_msg(LL_DEBUG, NULL, __VA_ARGS__)

#endif
