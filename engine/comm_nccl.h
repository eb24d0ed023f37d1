/*
 * comm_nccl.h: the NCCL communicator (engine/comm.h) for one process with
 * one thread per GPU.
 *
 * comm_nccl_create(n, devices, ret, err) makes one NCCL communicator per
 * rank with ncclCommInitAll (devices[r] is rank r's GPU; NULL means
 * 0..n-1) and one non-blocking CUDA stream per rank on that rank's GPU.
 * Before the first init it sets NCCL_NVLS_ENABLE=0 in the environment when
 * the variable is unset, so NVLink multicast stays off on shared machines
 * (setenv: call create before other threads read the environment).
 *
 * The comm.h operations (all_reduce_sum, all_gather) take DEVICE memory of
 * the rank's GPU (cudaMalloc'd or managed) and block until the result is in
 * the caller's buffer (the rank's stream is synchronized). Before enqueueing
 * they agree over a host barrier: when any rank gives bad arguments (count
 * 0, a NULL or non-device buffer, counts that differ between ranks) every
 * rank returns -EINVAL and nothing is enqueued, so one bad rank cannot leave
 * the others hanging inside NCCL. NCCL/CUDA failures return -EIO (-EINVAL
 * for NCCL's invalid argument/usage) with ncclGetErrorString and
 * ncclGetLastError in the message.
 *
 * all_reduce_sum order: NCCL chooses it (ring/tree), so results equal the
 * host communicator's rank-order sum bit for bit only for n <= 2; for n >= 3
 * they agree within rounding, and every rank still gets the same bits.
 *
 * For overlap, a backend can enqueue its own kernels on comm_nccl_stream(c)
 * and use the *_async calls, which enqueue the collective on that stream
 * and return at once (the caller orders/synchronizes): they check only the
 * local arguments and skip the host agreement, so every rank must pass
 * valid, equal counts or the others wait inside NCCL.
 *
 * create refuses with -EINVAL more ranks than visible GPUs, a device id
 * that does not exist or one given to two ranks; -ENODEV with no CUDA device.
 *
 * Ownership and threads: ret[r] belongs to rank r's thread, which alone
 * calls collectives on it; collectives set that thread's current CUDA
 * device to the rank's GPU. comm_destroy(ret[r]) by each rank; the last one
 * destroys every NCCL communicator and stream of the group.
 *
 * Built only with CUDA (an engine .cu file); without NCCL (LIGHTMOE_HAVE_NCCL not
 * defined) comm_nccl_create returns -ENODEV and says so.
 */
#ifndef LIGHTMOE_COMM_NCCL_H
#define LIGHTMOE_COMM_NCCL_H

#include "engine/comm.h"

#ifdef __cplusplus
extern "C" {
#endif

#define COMM_NCCL_MAX 64

int comm_nccl_create(int n, const int *devices, comm **ret, lm_err *err);

/* 1 when c was made by comm_nccl_create, else 0. */
int comm_nccl_is(const comm *c);
/* The rank's cudaStream_t (as void *, so C callers need no CUDA headers),
 * NULL when c is not an NCCL communicator. */
void *comm_nccl_stream(const comm *c);
/* The rank's CUDA device, -1 when c is not an NCCL communicator. */
int comm_nccl_device(const comm *c);

/* Enqueue on comm_nccl_stream(c) and return (see above). */
int comm_nccl_all_reduce_sum_async(comm *c, float *buf, size_t count, lm_err *err);
int comm_nccl_all_gather_async(comm *c, const float *send, float *recv, size_t count,
                               lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
