/*
 * err.c: lm_err helpers (see err.h). Messages are truncated, never
 * overflowed; setting an error never allocates.
 */
#include "engine/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int lm_err_set(lm_err *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

int lm_err_prefix(lm_err *err, const char *fmt, ...)
{
    if (!err)
        return 0;
    char old[LM_ERR_MSG_MAX];
    memcpy(old, err->msg, sizeof old);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof err->msg) {
        /* Append ": old", truncated; copied by hand because gcc's
         * -Wformat-truncation (Debug builds) refuses the snprintf form. */
        size_t at = (size_t)n;
        const char *parts[2] = {": ", old};
        for (int p = 0; p < 2; p++)
            for (const char *c = parts[p]; *c && at + 1 < sizeof err->msg; c++)
                err->msg[at++] = *c;
        err->msg[at] = '\0';
    }
    return err->code;
}

void lm_err_clear(lm_err *err)
{
    if (err) {
        err->code = 0;
        err->msg[0] = '\0';
    }
}
