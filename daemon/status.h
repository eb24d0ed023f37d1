/*
 * status.h: the status codes of the request path.
 *
 * The numbers are those of gRPC (google.rpc.Code), so rpc.c passes them
 * through unchanged, while serve.c and the modules under it never include
 * a gRPC header. Only the codes the daemon uses are listed.
 */
#ifndef LIGHTMOE_DAEMON_STATUS_H
#define LIGHTMOE_DAEMON_STATUS_H

typedef enum st_code {
    ST_OK = 0,
    ST_CANCELLED = 1,
    ST_INVALID_ARGUMENT = 3,
    ST_DEADLINE_EXCEEDED = 4,
    ST_NOT_FOUND = 5,
    ST_RESOURCE_EXHAUSTED = 8,
    ST_FAILED_PRECONDITION = 9,
    ST_UNIMPLEMENTED = 12,
    ST_INTERNAL = 13,
    ST_UNAVAILABLE = 14,
    ST_UNAUTHENTICATED = 16,
} st_code;

/* "OK", "CANCELLED", ... (for logs and metric labels). */
static inline const char *st_code_name(int code)
{
    switch (code) {
    case ST_OK: return "OK";
    case ST_CANCELLED: return "CANCELLED";
    case 2: return "UNKNOWN";
    case ST_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case ST_DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case ST_NOT_FOUND: return "NOT_FOUND";
    case 6: return "ALREADY_EXISTS";
    case 7: return "PERMISSION_DENIED";
    case ST_RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case ST_FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case 10: return "ABORTED";
    case 11: return "OUT_OF_RANGE";
    case ST_UNIMPLEMENTED: return "UNIMPLEMENTED";
    case ST_INTERNAL: return "INTERNAL";
    case ST_UNAVAILABLE: return "UNAVAILABLE";
    case 15: return "DATA_LOSS";
    case ST_UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
    }
}

#endif
