/*
 * check_msg.h: the assertion macro shared by the tests that explain each
 * failure: CHECK(cond, fmt, ...) prints file:line, the expression and the
 * formatted reason, counts the failure in `failures` and carries on, so one
 * run reports every broken case. Each test decides how `failures` maps to
 * its exit status. (tests/engine/check.h is the terser variant without a
 * message.)
 */
#ifndef LIGHTMOE_TESTS_CHECK_MSG_H
#define LIGHTMOE_TESTS_CHECK_MSG_H

#include <stdio.h>

static int failures;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            failures++;                                                                            \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
        }                                                                                          \
    } while (0)

#endif
