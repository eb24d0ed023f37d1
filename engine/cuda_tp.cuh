/*
 * cuda_tp.cuh: the collectives of one tensor-parallel rank of the CUDA
 * forward pass (cuda_forward.cu), over either communicator of comm.h:
 *
 *  - NCCL (comm_nccl.h, one GPU per rank): the collective is enqueued on
 *    the communicator's stream, forked from and joined back into the
 *    forward stream with events, so a step stays asynchronous and can be
 *    captured in a CUDA graph (graphable = 1);
 *  - host (comm_host_create, ranks may share a GPU, which NCCL refuses):
 *    the device buffer is copied to pinned host memory, the forward stream
 *    is synchronised, the ranks reduce on the host, and the sum is copied
 *    back; a host round trip per collective, so no graphs (graphable = 0).
 *
 * all_reduce sums a device buffer over the ranks, in place, ordered on st.
 * gather_logits takes this rank's logits [n][S] (device; columns [0, vn)
 * valid, vn = min(S, V - rank * S)), gathers every rank's, and on rank 0
 * writes the full rows [n][V] to out (host; other ranks may pass NULL);
 * it returns with st synchronised.
 *
 * Buffers are sized at creation (max_reduce floats, max_gather floats per
 * rank); a larger call is refused with -EINVAL. Ownership: cu_tp borrows
 * the comm (the backend destroys it after the state). Threads: the rank's
 * thread only, with the rank's device current.
 */
#ifndef LIGHTMOE_CUDA_TP_CUH
#define LIGHTMOE_CUDA_TP_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/comm.h"
#include "engine/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cu_tp cu_tp;

int cu_tp_create(comm *c, size_t max_reduce, size_t max_gather, cu_tp **ret, lm_err *err);
void cu_tp_destroy(cu_tp *t); /* NULL is fine */
int cu_tp_graphable(const cu_tp *t);
int cu_tp_rank(const cu_tp *t);

int cu_tp_all_reduce(cu_tp *t, float *buf, size_t n, cudaStream_t st, lm_err *err);
int cu_tp_gather_logits(cu_tp *t, const float *part, int n, int S, int V, float *out,
                        cudaStream_t st, lm_err *err);

/* x[t][:] = emb[tokens[t] - v0][:] for tokens in [v0, v0 + vn), zeros for
 * the others (the vocabulary-split lookup; the all-reduce completes it). */
int cu_tp_embed(const __half *emb, int H, int32_t v0, int32_t vn, const int32_t *tokens, int T,
                float *x, cudaStream_t st, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
