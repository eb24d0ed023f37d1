/*
 * backend_cuda.h: the CUDA backend (engine/backend.h) on one GPU.
 *
 * backend_cuda_create copies a loaded model (engine/model.h) to the GPU:
 * INT4 linears byte for byte in the int4.h layout, 16-bit linears as fp16
 * (bf16 converted; a value outside the fp16 range is refused), vectors as
 * fp32; q/k/v fused into one matrix, gate/up interleaved by rows (see
 * cuda_model.h). Copies go through two pinned staging buffers so that the
 * host conversion of one chunk overlaps the transfer of the previous one;
 * afterwards the host copy is not needed by the backend (the model may be
 * freed only after the backend, as for every backend).
 *
 * Options used: devices[0] (default 0), max_tokens (default 256),
 * force_portable (reported in the name; every kernel is the portable
 * mma.sync/cp.async code today).
 *
 * Tensor parallelism (tp > 1, or LIGHTMOE_CUDA_COMM=nccl|host in the
 * environment, which also forces the sharded path at tp 1 for tests):
 * backend_cuda_tp_create shards the model (engine/tp_shard.h: the same
 * split and refusals as the CPU backend), one rank = one thread = one
 * cu_state on devices[r] (NULL: 0..tp-1) over a communicator: NCCL when
 * every rank has its own GPU, the host communicator (data staged through
 * pinned host memory, no CUDA graphs) when a GPU holds several ranks
 * (devices = 0,0 runs tp 2 on one GPU; NCCL refuses that) or NCCL is not
 * built in. The backend's name tells the layout, e.g.
 * "cuda-tp2 host-comm devices=0,0". An id outside the visible devices is
 * refused with -EINVAL naming the rank.
 * Environment LIGHTMOE_CUDA_PATH=gemv|mma forces one INT4 kernel (tests);
 * LIGHTMOE_CUDA_GRAPHS=0 turns decode-step CUDA graphs off (they are on).
 */
#ifndef LIGHTMOE_BACKEND_CUDA_H
#define LIGHTMOE_BACKEND_CUDA_H

#include "engine/backends.h"

#ifdef __cplusplus
extern "C" {
#endif

int backend_cuda_create(const model *m, const backend_options *o, backend **ret, lm_err *err);

enum { CUDA_TP_COMM_AUTO = 0, CUDA_TP_COMM_NCCL = 1, CUDA_TP_COMM_HOST = 2 };
int backend_cuda_tp_create(const model *m, const backend_options *o, int comm_kind,
                           backend **ret, lm_err *err);

/* One GPU's backend: the whole model (c NULL) or a tensor-parallel shard
 * (c: the rank's communicator; embed/lm_head hold vocabulary rows from
 * vocab_begin, logits gathered at vocab_stride columns per rank; the
 * forward writes the logits on rank 0 only). Used by backend_cuda_tp. */
struct comm;
/* Rank r's backend of a tensor-parallel CUDA backend, NULL if b is not one. */
backend *backend_cuda_tp_rank(backend *b, int r);
int backend_cuda_create_rank(const model *m, const backend_options *o, int device,
                             struct comm *c, int32_t vocab_begin, int32_t vocab_stride,
                             backend **ret, lm_err *err);

/* For benchmarks and tests: the device model and step state of a CUDA
 * backend (NULL if b is not one; rank 0's for a tensor-parallel one). */
struct cu_state;
struct cu_model;
struct cu_state *backend_cuda_state(backend *b);
const struct cu_model *backend_cuda_model(backend *b);

#ifdef __cplusplus
}
#endif
#endif
