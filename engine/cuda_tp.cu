/*
 * cuda_tp.cu: a tensor-parallel rank's collectives and vocabulary-split
 * embedding lookup on the GPU (see cuda_tp.cuh).
 */
#include <stdlib.h>
#include <string.h>

#include "engine/comm_nccl.h"
#include "engine/cuda_common.cuh"
#include "engine/cuda_tp.cuh"

struct cu_tp {
    comm *c;
    int nccl;
    size_t max_reduce, max_gather;
    /* NCCL: fork/join events and the device gather buffer [size][max_gather] */
    cudaStream_t nst;
    cudaEvent_t fork, join;
    float *d_gather;
    /* host: pinned staging [max_reduce or max_gather] and gather [size][max_gather] */
    float *h_buf, *h_gather;
};

__global__ void k_embed_shard(const __half *__restrict__ emb, int H, int32_t v0, int32_t vn,
                              const int32_t *__restrict__ tok, float *__restrict__ x)
{
    CU_TRACE_KERNEL();
    const int t = blockIdx.x;
    const int32_t id = tok[t] - v0;
    const bool mine = id >= 0 && id < vn;
    const __half *src = emb + (size_t)(mine ? id : 0) * H;
    for (int h = threadIdx.x; h < H; h += blockDim.x)
        x[(size_t)t * H + h] = mine ? __half2float(src[h]) : 0.f;
}

extern "C" int cu_tp_embed(const __half *emb, int H, int32_t v0, int32_t vn,
                           const int32_t *tokens, int T, float *x, cudaStream_t st, lm_err *err)
{
    if (T <= 0)
        return 0;
    k_embed_shard<<<T, 256, 0, st>>>(emb, H, v0, vn, tokens, x);
    CUDA_LAUNCH_CHECK(err, "embed (vocabulary shard) launch");
    return 0;
}

extern "C" void cu_tp_destroy(cu_tp *t)
{
    if (!t)
        return;
    if (t->fork)
        cudaEventDestroy(t->fork);
    if (t->join)
        cudaEventDestroy(t->join);
    if (t->d_gather)
        cudaFree(t->d_gather);
    if (t->h_buf)
        cudaFreeHost(t->h_buf);
    if (t->h_gather)
        cudaFreeHost(t->h_gather);
    free(t);
}

extern "C" int cu_tp_create(comm *c, size_t max_reduce, size_t max_gather, cu_tp **ret,
                            lm_err *err)
{
    *ret = NULL;
    cu_tp *t = (cu_tp *)calloc(1, sizeof(*t));
    if (!t)
        return lm_err_set(err, -ENOMEM, "cuda tp: out of host memory");
    t->c = c;
    t->nccl = comm_nccl_is(c);
    t->max_reduce = max_reduce ? max_reduce : 1;
    t->max_gather = max_gather ? max_gather : 1;
    const size_t ng = t->max_gather * (size_t)c->size;
    cudaError_t e;
    if (t->nccl) {
        t->nst = (cudaStream_t)comm_nccl_stream(c);
        e = cudaEventCreateWithFlags(&t->fork, cudaEventDisableTiming);
        if (e == cudaSuccess)
            e = cudaEventCreateWithFlags(&t->join, cudaEventDisableTiming);
        if (e == cudaSuccess)
            e = cudaMalloc((void **)&t->d_gather, ng * sizeof(float));
    } else {
        const size_t nb = t->max_reduce > t->max_gather ? t->max_reduce : t->max_gather;
        e = cudaMallocHost((void **)&t->h_buf, nb * sizeof(float));
        if (e == cudaSuccess)
            e = cudaMallocHost((void **)&t->h_gather, ng * sizeof(float));
    }
    if (e != cudaSuccess) {
        cu_tp_destroy(t);
        return cuda_err(err, e, "tensor-parallel buffers");
    }
    *ret = t;
    return 0;
}

extern "C" int cu_tp_graphable(const cu_tp *t) { return t->nccl; }
extern "C" int cu_tp_rank(const cu_tp *t) { return t->c->rank; }

/* NCCL: make the communicator's stream wait for st, and st for it after. */
static int fork_to(cu_tp *t, cudaStream_t st, lm_err *err)
{
    CUDA_TRY(err, cudaEventRecord(t->fork, st));
    CUDA_TRY(err, cudaStreamWaitEvent(t->nst, t->fork, 0));
    return 0;
}
static int join_back(cu_tp *t, cudaStream_t st, lm_err *err)
{
    CUDA_TRY(err, cudaEventRecord(t->join, t->nst));
    CUDA_TRY(err, cudaStreamWaitEvent(st, t->join, 0));
    return 0;
}

extern "C" int cu_tp_all_reduce(cu_tp *t, float *buf, size_t n, cudaStream_t st, lm_err *err)
{
    if (n == 0)
        return 0;
    if (n > t->max_reduce)
        return lm_err_set(err, -EINVAL, "cuda tp: all-reduce of %zu floats (sized for %zu)", n,
                          t->max_reduce);
    int rc;
    if (t->nccl) {
        if ((rc = fork_to(t, st, err)) ||
            (rc = comm_nccl_all_reduce_sum_async(t->c, buf, n, err)))
            return rc;
        return join_back(t, st, err);
    }
    CUDA_TRY(err, cudaMemcpyAsync(t->h_buf, buf, n * sizeof(float), cudaMemcpyDeviceToHost, st));
    CUDA_TRY(err, cudaStreamSynchronize(st));
    if ((rc = comm_all_reduce_sum(t->c, t->h_buf, n, err)))
        return rc;
    CUDA_TRY(err, cudaMemcpyAsync(buf, t->h_buf, n * sizeof(float), cudaMemcpyHostToDevice, st));
    return 0;
}

extern "C" int cu_tp_gather_logits(cu_tp *t, const float *part, int n, int S, int V, float *out,
                                   cudaStream_t st, lm_err *err)
{
    if (n <= 0)
        return 0;
    const size_t cnt = (size_t)n * S;
    if (cnt > t->max_gather)
        return lm_err_set(err, -EINVAL, "cuda tp: gather of %zu logits (sized for %zu)", cnt,
                          t->max_gather);
    const int R = t->c->size, me = t->c->rank;
    int rc;
    if (t->nccl) {
        if ((rc = fork_to(t, st, err)) ||
            (rc = comm_nccl_all_gather_async(t->c, part, t->d_gather, cnt, err)) ||
            (rc = join_back(t, st, err)))
            return rc;
        for (int q = 0; me == 0 && out && q < R; q++) {
            const int v0 = q * S, vn = V - v0 < S ? V - v0 : S;
            if (vn > 0)
                CUDA_TRY(err, cudaMemcpy2DAsync(out + v0, (size_t)V * sizeof(float),
                                                t->d_gather + (size_t)q * cnt, (size_t)S * sizeof(float),
                                                (size_t)vn * sizeof(float), n,
                                                cudaMemcpyDeviceToHost, st));
        }
        CUDA_TRY(err, cudaStreamSynchronize(st));
        return 0;
    }
    CUDA_TRY(err, cudaMemcpyAsync(t->h_buf, part, cnt * sizeof(float), cudaMemcpyDeviceToHost, st));
    CUDA_TRY(err, cudaStreamSynchronize(st));
    if ((rc = comm_all_gather(t->c, t->h_buf, t->h_gather, cnt, err)))
        return rc;
    for (int q = 0; me == 0 && out && q < R; q++) {
        const int v0 = q * S, vn = V - v0 < S ? V - v0 : S;
        for (int j = 0; j < n && vn > 0; j++)
            memcpy(out + (size_t)j * V + v0, t->h_gather + (size_t)q * cnt + (size_t)j * S,
                   (size_t)vn * sizeof(float));
    }
    return 0;
}
