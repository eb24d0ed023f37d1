/*
 * comm_nccl.h: the NCCL implementation of the tensor-parallel communicator
 * (engine/comm.h) for the GPUs of one process, one thread per GPU.
 *
 * comm_nccl_create initialises n ranks at once (ncclCommInitAll) on the
 * given CUDA devices (NULL: 0..n-1) and returns one handle per rank; rank
 * r's handle must be used only by rank r's thread, which calls collectives
 * on device buffers of its own GPU. Each call enqueues on the rank's own
 * stream and waits for it, so a collective returns with the result in the
 * caller's buffer, as comm.h requires. NCCL's reductions give every rank
 * the same bits, but not in rank order (ring order): results may differ in
 * the last bits from the host communicator's.
 *
 * NVLink multicast stays off (NCCL_NVLS_ENABLE=0 unless the environment
 * already sets it): the shared GPU hosts must not use it.
 * Built only when NCCL is found (LIGHTMOE_HAVE_NCCL); otherwise create
 * returns -ENOTSUP.
 */
#ifndef LIGHTMOE_COMM_NCCL_H
#define LIGHTMOE_COMM_NCCL_H

#include "engine/comm.h"

#ifdef __cplusplus
extern "C" {
#endif

int comm_nccl_create(int n, const int *devices, comm **ret, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
