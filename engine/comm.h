/*
 * comm.h: collective communication between the ranks of a tensor-parallel
 * backend, shaped like NCCL so that the NCCL implementation (CUDA helper)
 * and the host one below are interchangeable.
 *
 * A group of n ranks has one `comm` handle per rank; rank r's handle is
 * used only by rank r's thread. Collectives are called by every rank in
 * the same order with the same count (as with NCCL); they block until the
 * result is in the caller's buffer. Buffers are host memory for the host
 * communicator, device memory for NCCL.
 *
 *   all_reduce_sum: buf[i] = sum over ranks r = 0..n-1 of buf_r[i], in rank
 *                   order, so every rank gets bit-identical results.
 *   all_gather:     recv[r * count + i] = send_r[i] for every rank r.
 *
 * The host implementation (threads + shared memory) allocates nothing per
 * call: ranks publish their buffer pointers and each reduces one slice.
 * The NCCL implementation is engine/comm_nccl.h (CUDA builds only).
 */
#ifndef LIGHTMOE_COMM_H
#define LIGHTMOE_COMM_H

#include <stddef.h>

#include "engine/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct comm comm;

typedef struct comm_ops {
    int (*all_reduce_sum)(comm *c, float *buf, size_t count, lm_err *err);
    int (*all_gather)(comm *c, const float *send, float *recv, size_t count, lm_err *err);
    /* Frees this rank's handle; the group is freed with the last one. */
    void (*destroy)(comm *c);
} comm_ops;

struct comm {
    const comm_ops *ops;
    int rank;
    int size;
};

static inline int comm_all_reduce_sum(comm *c, float *buf, size_t count, lm_err *err)
{
    return c->ops->all_reduce_sum(c, buf, count, err);
}
static inline int comm_all_gather(comm *c, const float *send, float *recv, size_t count,
                                  lm_err *err)
{
    return c->ops->all_gather(c, send, recv, count, err);
}
static inline void comm_destroy(comm *c)
{
    if (c)
        c->ops->destroy(c);
}

/* Host communicator for n ranks (threads of one process): ret[0..n-1]
 * receive the per-rank handles. */
int comm_host_create(int n, comm **ret, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
