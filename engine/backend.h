/*
 * backend.h: the contract between the scheduler and a compute backend.
 *
 * A backend owns a loaded model's weights on its device(s) and the KV cache
 * memory, and runs one forward pass over a batch of sequence pieces. The
 * scheduler (sched.h) owns everything else: which sequences run, which KV
 * blocks each one holds (block tables), sampling. The CPU backend
 * (backend_cpu) is the readable reference; the CUDA backend must give the
 * same results within the tolerances in docs/; a tensor-parallel backend
 * presents N shards as one backend.
 *
 * Paged KV cache: the backend allocates `n_blocks` blocks of `block_size`
 * token slots for every layer (K and V). Token t of a sequence lives in
 * slot t % block_size of block block_table[t / block_size]. Block ids are
 * chosen by the scheduler; the backend only reads and writes them.
 *
 * Threading: a backend is used by one thread at a time (the engine thread).
 */
#ifndef LIGHTMOE_BACKEND_H
#define LIGHTMOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "engine/err.h"
#include "engine/sample.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * One forward step. The batch holds n_seqs pieces; piece s contributes the
 * tokens [seq_start[s], seq_start[s+1]) of `tokens`, which are consecutive
 * positions start_pos[s], start_pos[s]+1, ... of that sequence. Its earlier
 * positions [0, start_pos[s]) must already be in the KV cache (written by
 * earlier steps, or shared prefix blocks). After the step the KV cache holds
 * the new positions as well.
 *
 * Logits are produced only for the token rows listed in logit_rows (indices
 * into `tokens`); row i of `logits` belongs to logit_rows[i]. Typically the
 * last token of each piece; every row for teacher-forced verification.
 */
/*
 * Sampling on the device (backend_info.device_sampling): row i of the
 * logits is picked where it was made, and only the pick comes back. The
 * pick is the one sample_pick makes on the same logits:
 * sample_apply_penalties with the row's entries of the batch's penalty
 * list, then sample_pick_drawn with `draw` (the request's next
 * sample_rng_next() output, taken only at temperature > 0).
 */
typedef struct backend_pick {
    const sample_params *p;     /* checked by the caller (sample_params_check) */
    uint64_t draw;
    int32_t pen_begin, n_pen;   /* its entries in backend_batch.penalties */
} backend_pick;

typedef struct backend_pick_out {
    sample_result r;
    int32_t status;             /* 0, or -EINVAL: the row's logits cannot be sampled */
    int32_t bad_token;          /* status: the lowest NaN / +inf token, -1 if every logit is -inf */
    float bad_value;            /* that logit */
} backend_pick_out;

typedef struct backend_batch {
    int32_t n_seqs;
    int32_t n_tokens;
    const int32_t *tokens;      /* [n_tokens] */
    const int32_t *seq_start;   /* [n_seqs + 1], seq_start[0] = 0, seq_start[n_seqs] = n_tokens */
    const int32_t *start_pos;   /* [n_seqs] position of the piece's first token */
    const int32_t *block_table; /* [n_seqs][max_blocks] KV block ids */
    int32_t max_blocks;         /* row stride of block_table */
    int32_t n_logits;
    const int32_t *logit_rows;  /* [n_logits] */
    float *logits;              /* out, host memory [n_logits][vocab]; NULL with picks */
    /* Device sampling (NULL unless backend_info.device_sampling): with
     * picks set, picks_out[i] receives row i's pick and `logits` is not
     * written. n_penalties <= backend_info.max_penalties. */
    const backend_pick *picks;          /* [n_logits] */
    const sample_penalty *penalties;    /* [n_penalties] */
    int32_t n_penalties;
    backend_pick_out *picks_out;        /* out, host memory [n_logits] */
} backend_batch;

/* What a backend reports about itself and the model it holds. */
typedef struct backend_info {
    const char *name;           /* "cpu", "cuda", "cpu-tp2", ... */
    int32_t vocab;              /* logits row length (config vocab_size) */
    int32_t max_context;        /* max_position_embeddings */
    int32_t tensor_parallel;    /* 1 unless sharded */
    size_t kv_bytes_per_token;  /* all layers, K and V, all ranks together */
    size_t device_memory_free;  /* bytes free for the KV cache after weights; 0 if unknown */
    int32_t device_sampling;    /* forward takes backend_batch.picks */
    int32_t max_penalties;      /* room for penalty entries a step (device_sampling) */
} backend_info;

typedef struct backend backend;

typedef struct backend_ops {
    /* Allocate the KV cache: n_blocks blocks of block_size token slots.
     * Called once, before the first forward. */
    int (*kv_init)(backend *b, int32_t block_size, int32_t n_blocks, lm_err *err);
    /* Copy one KV block (all layers) src -> dst, for copy-on-write of a
     * shared, partly filled prefix block. */
    int (*kv_copy)(backend *b, int32_t src_block, int32_t dst_block, lm_err *err);
    /* Run the step described above. Must not allocate on the hot path. */
    int (*forward)(backend *b, const backend_batch *batch, lm_err *err);
    void (*info)(const backend *b, backend_info *ret_info);
    /* Free everything; accepts a half-built backend. */
    void (*destroy)(backend *b);
} backend_ops;

/* Every backend struct starts with this header so that the generic
 * backend_* calls below can dispatch. */
struct backend {
    const backend_ops *ops;
};

static inline int backend_kv_init(backend *b, int32_t block_size, int32_t n_blocks, lm_err *err)
{
    return b->ops->kv_init(b, block_size, n_blocks, err);
}
static inline int backend_kv_copy(backend *b, int32_t src, int32_t dst, lm_err *err)
{
    return b->ops->kv_copy(b, src, dst, err);
}
static inline int backend_forward(backend *b, const backend_batch *batch, lm_err *err)
{
    return b->ops->forward(b, batch, err);
}
static inline void backend_get_info(const backend *b, backend_info *ret_info)
{
    memset(ret_info, 0, sizeof(*ret_info)); /* fields a backend does not know stay 0 */
    b->ops->info(b, ret_info);
}
static inline void backend_destroy(backend *b)
{
    if (b)
        b->ops->destroy(b);
}

#ifdef __cplusplus
}
#endif
#endif
