/*
 * log.c: leveled lines on stderr (see log.h).
 */
#include "daemon/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static _Atomic int cur_level = LL_INFO;
static int journal_prefix;

static const char *const level_names[] = {"error", "warn", "info", "debug"};
/* syslog priorities: err, warning, info, debug */
static const int level_prio[] = {3, 4, 6, 7};

void log_init(void)
{
    journal_prefix = getenv("JOURNAL_STREAM") != NULL;
}

void log_set_level(log_level level)
{
    atomic_store(&cur_level, (int)level);
}

log_level log_get_level(void)
{
    return (log_level)atomic_load(&cur_level);
}

int log_parse_level(const char *s, log_level *ret)
{
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, level_names[i])) {
            *ret = (log_level)i;
            return 0;
        }
    if (!strcmp(s, "warning")) {
        *ret = LL_WARN;
        return 0;
    }
    return -EINVAL;
}

const char *log_level_name(log_level level)
{
    return (unsigned)level < 4 ? level_names[level] : "?";
}

void log_msg(log_level level, const char *req_id, const char *fmt, ...)
{
    if ((int)level > atomic_load(&cur_level))
        return;
    char line[2048];
    size_t n = 0;
    if (journal_prefix) {
        n = (size_t)snprintf(line, sizeof line, "<%d>", level_prio[level]);
    } else {
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        n = strftime(line, sizeof line, "%Y-%m-%dT%H:%M:%S", &tm);
        n += (size_t)snprintf(line + n, sizeof line - n, ".%03ldZ %-5s ",
                              ts.tv_nsec / 1000000, level_names[level]);
    }
    if (req_id && n < sizeof line)
        n += (size_t)snprintf(line + n, sizeof line - n, "req=%s ", req_id);
    if (n < sizeof line) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(line + n, sizeof line - n, fmt, ap);
        va_end(ap);
        if (k > 0)
            n += (size_t)k;
    }
    if (n >= sizeof line - 1)
        n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;
}
