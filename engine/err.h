/*
 * err.h: the error convention of engine/ and cache/.
 *
 * Functions that can fail return 0 or a negative errno value and, when the
 * caller passed an lm_err, leave a human sentence in it that says what was
 * wrong and where ("model-00002-of-00003.safetensors: tensor
 * 'model.layers.3.mlp.gate.weight': data range [..) runs past end of file").
 * engine/ and cache/ never print and never exit: the daemon or the command
 * line decides what to do with the message. lm_err is plain data owned by
 * the caller (usually on its stack); a NULL lm_err is allowed everywhere.
 */
#ifndef LIGHTMOE_ERR_H
#define LIGHTMOE_ERR_H

#include <errno.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LM_ERR_MSG_MAX 512

typedef struct lm_err {
    int code;                  /* the negative errno last set, 0 if none */
    char msg[LM_ERR_MSG_MAX];  /* NUL-terminated sentence, "" if none */
} lm_err;

/* Set err (if not NULL) to code and a printf-style message; returns code so
 * that callers can write `return lm_err_set(err, -EINVAL, "...", ...);`. */
int lm_err_set(lm_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefix the message already in err with "prefix: " (for adding context
 * such as a file name as an error travels up); returns err->code. */
int lm_err_prefix(lm_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Reset err to "no error". */
void lm_err_clear(lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
