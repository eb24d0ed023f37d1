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
 * mma.sync/cp.async code today). tp > 1 is refused (engine/backend_tp).
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

/* For benchmarks: the device model and step state of a CUDA backend (NULL
 * if b is not one). */
struct cu_state;
struct cu_model;
struct cu_state *backend_cuda_state(backend *b);
const struct cu_model *backend_cuda_model(backend *b);

#ifdef __cplusplus
}
#endif
#endif
