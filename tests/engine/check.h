/*
 * check.h: tiny assertion helpers for the engine tests. A failed check
 * prints file:line and the expression and makes the test exit non-zero.
 */
#ifndef LIGHTMOE_TEST_CHECK_H
#define LIGHTMOE_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_failures;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            check_failures++;                                                        \
        }                                                                            \
    } while (0)

/* rc must be the negative errno `code` and err.msg must contain `needle`. */
#define CHECK_ERR(rc, errv, code, needle)                                                   \
    do {                                                                                    \
        int rc_ = (rc);                                                                     \
        if (rc_ != (code) || !strstr((errv).msg, (needle))) {                               \
            fprintf(stderr, "%s:%d: expected %d containing '%s', got %d: '%s'\n", __FILE__, \
                    __LINE__, (code), (needle), rc_, (errv).msg);                           \
            check_failures++;                                                               \
        }                                                                                   \
    } while (0)

#define CHECK_DONE()                                                         \
    do {                                                                     \
        if (check_failures) {                                                \
            fprintf(stderr, "%d check(s) failed\n", check_failures);        \
            return 1;                                                        \
        }                                                                    \
        printf("ok\n");                                                      \
        return 0;                                                            \
    } while (0)

#endif
