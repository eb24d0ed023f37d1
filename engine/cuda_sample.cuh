/*
 * cuda_sample.cuh: picking the next token on the GPU from the logits rows
 * the step left there, so that only the picks cross to the host.
 *
 * The pick is sample_pick's (engine/sample.h), step by step: the penalty
 * list's entries, the maximum and the first index holding it, the
 * temperature, e = exp_le0(logit - max) with the same float operations
 * (no fused multiply-add), then sample.h's exact rule on the integer
 * weights trunc(e * 2^S): top_k, top_p and min_p cut the ranking (e
 * descending, id ascending), and the draw walks the kept ids in id order.
 * Integer sums do not depend on their order, so a block's parallel sums
 * give the CPU's sets and token bit for bit. The log-sum-exp is a double
 * sum here and a float-lane sum on the CPU: reported logprobs agree to
 * about 1e-6 (tested to 2e-5).
 *
 * How: one block of 512 threads a row (blocks loop over rows past
 * CU_SAMPLE_BLOCKS). The cuts are radix selects on the bits of e (four
 * passes of 8 bits, histograms of count and weight in shared memory, one
 * copy per pair of warps), each closed by a search in id order among the
 * boundary value's ties. Logits rows are modified in place (penalties,
 * temperature), as sample_pick modifies its row. Greedy rows make the
 * maximum and log-sum-exp passes only (and the top-logprob select when
 * asked).
 */
#ifndef LIGHTMOE_CUDA_SAMPLE_CUH
#define LIGHTMOE_CUDA_SAMPLE_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "engine/backend.h"
#include "engine/err.h"
#include "engine/sample.h"

#ifdef __cplusplus
extern "C" {
#endif

/* blocks of one launch: the e scratch holds this many rows */
#define CU_SAMPLE_BLOCKS 128
/* penalty entries a step (backend_info.max_penalties of a CUDA state) */
#define CU_SAMPLE_MAX_PENALTIES (1 << 20)

/* One row's pick as the kernel reads it (cu_pick_from fills it). */
typedef struct cu_pick {
    float temperature, inv_t;   /* inv_t = 1.0f / temperature, made on the host */
    float top_p, min_p;
    float rep, pres, freq;
    int32_t top_k, logprobs;
    int32_t pen_begin, n_pen;
    uint64_t draw;
} cu_pick;

void cu_pick_from(const backend_pick *bp, cu_pick *out);

/*
 * Rows [0, n) of `logits` (row stride ldl floats, V tokens; modified in
 * place) picked by picks[i] with the penalty entries pen[pen_begin ..];
 * out[i] gets the pick (device memory). e: scratch of
 * min(n, CU_SAMPLE_BLOCKS) * V floats. All pointers device memory.
 */
int cu_sample(float *logits, int ldl, int V, int n, const cu_pick *picks,
              const sample_penalty *pen, float *e, backend_pick_out *out, cudaStream_t st,
              lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
