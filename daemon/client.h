/*
 * client.h: a small gRPC client of lightmoe.v1.LightMoE (gRPC C core),
 * behind `lightmoe chat` and `lightmoe complete`.
 *
 * One lmc is one channel to one server; lmc_generate runs one call
 * (Generate streaming, or Complete) and blocks until it ends, handing each
 * text delta to a callback as it arrives. Not thread-safe: one call at a
 * time per lmc. The only grpc_* calls outside daemon/rpc*.c are in
 * client.c.
 */
#ifndef LIGHTMOE_DAEMON_CLIENT_H
#define LIGHTMOE_DAEMON_CLIENT_H

#include <stddef.h>
#include <stdint.h>

typedef struct lmc lmc;

/* Options shared by the client subcommands (parsed by lmc_parse_option). */
typedef struct lmc_options {
    const char *server;         /* HOST:PORT or unix:/PATH */
    const char *token;          /* bearer token, or NULL */
    const char *token_file;     /* first line is the token */
    const char *tls_ca;         /* PEM roots: turns TLS on */
    const char *tls_cert;       /* PEM client certificate (mTLS) */
    const char *tls_key;
    const char *tls_server_name;/* override the name checked in the server certificate */
    double timeout_s;           /* per call; 0 = none */
    int stream;                 /* 1: Generate (streaming), 0: Complete */
    /* request */
    int32_t max_tokens;         /* 0: server default (others are sent as they are) */
    float temperature;          /* < 0: server default */
    float top_p;                /* < 0: server default */
    int32_t top_k;              /* < 0: server default */
    int has_seed;
    uint64_t seed;
    const char *stop[16];
    int n_stop;
    const char *request_id;
    int verbose;                /* print usage and timing to stderr */
} lmc_options;

typedef struct lmc_result {
    int status;                 /* gRPC status code, 0 = OK */
    char message[1024];         /* status details */
    char finish_reason[32];
    int32_t prompt_tokens, completion_tokens;
    double ttft_s, total_s;
    int cached;
} lmc_result;

void lmc_options_default(lmc_options *o);
/* Try argv[*i] as a shared option (consuming its value); 1 if taken, 0 if
 * not ours, -1 on a bad value (message on stderr). */
int lmc_parse_option(lmc_options *o, int argc, char **argv, int *i);
/* Usage lines of the shared options. */
const char *lmc_options_help(void);

int lmc_connect(const lmc_options *o, lmc **ret, char *err, size_t errlen);
void lmc_close(lmc *c);

/* One request: prompt, or n_messages chat turns (roles[i], contents[i]). */
int lmc_generate(lmc *c, const lmc_options *o, const char *prompt, const char *const *roles,
                 const char *const *contents, int n_messages,
                 void (*on_delta)(void *user, const char *text, size_t len), void *user,
                 lmc_result *ret);

#endif
