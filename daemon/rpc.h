/*
 * rpc.h: lightmoed's gRPC server (gRPC C core), the only module that
 * includes gRPC headers (daemon/rpc*.c).
 *
 * It serves lightmoe.v1.LightMoE (rpc_api.c, on top of serve.h),
 * grpc.health.v1.Health (rpc_health.c) and server reflection v1 and v1alpha
 * (rpc_reflect.c); every other method gets UNIMPLEMENTED at once. Calls run
 * on rpc_threads threads that share one completion queue (rpc_queues sets
 * more, the threads spread over them).
 *
 * Lifecycle (main thread): rpc_start (listening, health NOT_SERVING) ->
 * rpc_set_serving(1) once the model is warm -> on SIGTERM
 * rpc_begin_drain (NOT_SERVING, Watch streams end, new calls still answered
 * so probes see NOT_SERVING) -> rpc_shutdown (stop accepting, wait for the
 * calls, cancel what is left) -> rpc_destroy.
 */
#ifndef LIGHTMOE_DAEMON_RPC_H
#define LIGHTMOE_DAEMON_RPC_H

#include <stddef.h>

#include "daemon/config.h"
#include "daemon/serve.h"

typedef struct rpc_server rpc_server;

/* Bind cfg->listen (TLS/mTLS from cfg) and start serving. *ret_port is the
 * bound TCP port (0 for a unix socket). */
int rpc_start(const daemon_config *cfg, serve *sv, rpc_server **ret, int *ret_port,
              char *errbuf, size_t errlen);
/* Health status of the server and of lightmoe.v1.LightMoE. */
void rpc_set_serving(rpc_server *r, int serving);
int rpc_is_serving(rpc_server *r);
/* (Re)read the bearer tokens; path "" turns token auth off. On failure the
 * tokens in force stay. */
int rpc_load_tokens(rpc_server *r, const char *path, char *errbuf, size_t errlen);
/* NOT_SERVING and end the health Watch streams (see above). */
void rpc_begin_drain(rpc_server *r);
/* Stop accepting calls and wait up to wait_s for the calls in progress;
 * then cancel what is left. */
void rpc_shutdown(rpc_server *r, double wait_s);
/* Free everything (after rpc_shutdown); NULL is fine. */
void rpc_destroy(rpc_server *r);

#endif
