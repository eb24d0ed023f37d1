/*
 * tp_shard.h: the Megatron-style sharding of a loaded model over N
 * tensor-parallel ranks, shared by the CPU (backend_tp.c) and CUDA
 * (backend_cuda_tp.cu) tensor-parallel backends, so that both split the
 * weights by the same arithmetic and refuse the same layouts.
 *
 * Rank r of N holds a shard model (engine/model.h, same config except the
 * per-rank widths):
 *  - attention: query heads [r*Hl, (r+1)*Hl) (q rows, column-parallel) and
 *    their KV heads (k/v rows): split when N divides n_kv_heads, replicated
 *    when n_kv_heads divides N (rank r takes KV head r / (N / n_kv_heads),
 *    the one its query heads use); o_proj takes the matching input columns
 *    (row-parallel), its bias on rank 0 only;
 *  - dense MLP / every expert / shared expert: intermediate columns
 *    [r*Il, (r+1)*Il) of gate/up (rows) and down (input columns, bias on
 *    rank 0); router, shared-expert gate and norms replicated;
 *  - embeddings and lm_head: vocabulary rows [r*Vl, min(V, (r+1)*Vl)),
 *    Vl = tp_vocab_stride(V, N): a lookup is the sum over ranks of each
 *    rank's rows (zeros for ids it does not hold), logits are gathered at
 *    a stride of Vl per rank.
 * The forward pass then needs one all-reduce after attention and one after
 * the MoE/MLP block (plus one after the embedding lookup).
 *
 * Refused with -EINVAL and a message naming the number: heads not
 * divisible by N, KV heads neither dividing nor divisible by N, widths not
 * divisible by N, an INT4 column split that would cut a GPTQ group (or
 * break the INT4_K_ALIGN-column alignment), act-order INT4 matrices split
 * by columns, a vocabulary smaller than N.
 *
 * Ownership: row slices point into the loaded model (no copy); column
 * slices are copied once at creation and owned by the tp_shards, which
 * must be freed after every user of its shards and before the model.
 * Threads: create/free on one thread; the shards are read-only afterwards.
 */
#ifndef LIGHTMOE_TP_SHARD_H
#define LIGHTMOE_TP_SHARD_H

#include "engine/err.h"
#include "engine/model.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TP_MAX 64

typedef struct tp_shards tp_shards;

/* 0 when the configuration splits over n ranks, else -EINVAL and why. */
int tp_layout_check(const model_config *c, int n, lm_err *err);

/* Check the layout and build the n shard models of m (borrowed). */
int tp_shards_create(const model *m, int n, tp_shards **ret, lm_err *err);
const model *tp_shards_model(const tp_shards *s, int rank);
void tp_shards_free(tp_shards *s); /* NULL is fine */

/* Vocabulary rows per rank (ceil(vocab / n)); rank r holds rows from
 * r * stride, min(stride, vocab - r * stride) of them. */
int32_t tp_vocab_stride(int32_t vocab, int n);

/* A devices list for n ranks (ids[r] = rank r's device) against n_visible
 * devices: -EINVAL naming the bad entry for an id outside 0..n_visible-1;
 * -ENODEV when n_visible < 1. *ret_shared = 1 when some device serves two
 * ranks (such ranks cannot use NCCL; the caller picks another
 * communicator), else 0. */
int tp_devices_check(const int *ids, int n, int n_visible, int *ret_shared, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
