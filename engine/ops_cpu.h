/*
 * ops_cpu.h: the CPU operators of the forward pass, with exact semantics.
 *
 * These are the reference ("CPU twin") of every CUDA kernel: each function
 * states what it computes, in float32, so that a GPU kernel can be tested
 * against it on random inputs. All matrices are row-major; "rows" are
 * token rows. None of these functions allocates; those that take a pool
 * split work over its threads, others run on the calling thread.
 *
 * Determinism: every output element is computed by a fixed sequence of
 * float operations that depends only on its own inputs, never on how many
 * rows are in the call or how work is split over threads. That is what
 * makes a batched forward bit-identical to running each sequence alone.
 *
 * SIMD: with AVX2/FMA (the engine is compiled for x86-64-v3) the matmuls
 * use 8-lane FMA accumulation; on CPUs with AVX-512 (checked at run time)
 * 16-lane kernels that take INT4 weights from a per-group table of the 16
 * possible values (ops_cpu_avx512.c). cpu_pool_set_portable(pool, 1)
 * selects the plain scalar loops instead. Every kernel set computes the
 * same formulas; they differ only in summation order, so each is checked
 * against the same references and tolerances.
 */
#ifndef LIGHTMOE_OPS_CPU_H
#define LIGHTMOE_OPS_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "engine/model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- thread pool ------------------------------------------------------------
 * n_threads - 1 workers are started once; cpu_pool_run runs fn over
 * [0, n_items) in chunks of `chunk` items on all threads including the
 * caller, and returns when every chunk is done. One caller at a time. */
typedef struct cpu_pool cpu_pool;
typedef void (*cpu_task_fn)(void *ctx, int64_t begin, int64_t end, int thread);

int cpu_pool_create(int n_threads, cpu_pool **ret, lm_err *err);
void cpu_pool_destroy(cpu_pool *p); /* NULL is fine */
int cpu_pool_threads(const cpu_pool *p);
void cpu_pool_run(cpu_pool *p, cpu_task_fn fn, void *ctx, int64_t n_items, int64_t chunk);
void cpu_pool_set_portable(cpu_pool *p, int portable);

/* Kernel sets for op_linear, in order of preference (best last).
 * cpu_isa_best(): the best one this build and CPU support, capped by the
 * environment variable LIGHTMOE_CPU_ISA (portable|avx2|avx512) when set, so
 * that a tool run can exercise a lesser set on a bigger CPU. A new pool
 * uses cpu_isa_best(); cpu_pool_set_isa clamps its argument to it;
 * cpu_pool_set_portable(p, 0) means cpu_isa_best(), 1 means PORTABLE. */
typedef enum cpu_isa { CPU_ISA_PORTABLE = 0, CPU_ISA_AVX2 = 1, CPU_ISA_AVX512 = 2 } cpu_isa;
cpu_isa cpu_isa_best(void);
const char *cpu_isa_name(cpu_isa isa);
void cpu_pool_set_isa(cpu_pool *p, cpu_isa isa);
cpu_isa cpu_pool_isa(const cpu_pool *p);
/* Give every thread a scratch area of at least floats_per_thread floats
 * (op_linear uses 4*K per thread for INT4 with more than 2 rows; without
 * it, it dequantises in registers for every token pair: same results). */
int cpu_pool_reserve(cpu_pool *p, size_t floats_per_thread, lm_err *err);
/* The scratch area of `thread` (cpu_pool_reserve; 64-byte aligned) and its
 * size in floats. A task may use its own thread's area only. */
float *cpu_pool_scratch(const cpu_pool *p, int thread, size_t *ret_floats);
int cpu_pool_portable(const cpu_pool *p);

/* ---- elementwise / rows -------------------------------------------------- */

/* out[r][i] = x[r][i] * (1 / sqrt(mean_i(x[r][i]^2) + eps)) * w[i]
 * (transformers' RMSNorm; the mean is accumulated in double). out may be x. */
void op_rmsnorm(float *out, const float *x, const float *w, int32_t n_rows, int32_t dim,
                float eps);

/* inv_freq[i] = 1 / theta^((2i) / head_dim) in float32, i < head_dim/2
 * (transformers' default rope init). */
void op_rope_inv_freq(float *inv_freq, int32_t head_dim, float theta);

/* Rotary embedding in place, "rotate half" (GPT-NeoX / transformers) style:
 * x is [n_rows][n_heads][head_dim]; for row r at position pos[r], with
 * a_i = (float)pos * inv_freq[i] (float32 product), c = cos(a_i),
 * s = sin(a_i), h = head_dim/2, for i < h:
 *   x'[i]   = x[i] * c - x[i+h] * s
 *   x'[i+h] = x[i+h] * c + x[i] * s */
void op_rope(float *x, int32_t n_rows, int32_t n_heads, int32_t head_dim, const int32_t *pos,
             const float *inv_freq);

/* g[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, over n elements. */
void op_silu_mul(float *g, const float *u, int64_t n);

/* Rows of an embedding table (DENSE linear [V][H]) converted to float:
 * out[r] = table[tokens[r]]. Token ids must be in range (checked by caller). */
void op_embed(float *out, const linear *table, const int32_t *tokens, int32_t n_rows);

/* ---- matmul ------------------------------------------------------------------
 * y[r][n] = sum_k W[n][k] * x[r][k] + bias[n], for r < m, n < W->n, with
 * fp32 accumulation. DENSE weights are converted exactly to float. INT4
 * weights are computed from the packed layout (int4.h) per group g as
 * scale_g * sum_{k in g} (q - zero) * x[perm[k]], never materialising a
 * dequantised matrix. x rows have stride ldx, y rows stride ldy (floats).
 * `scratch` must hold op_linear_scratch(W, m) floats (m * K for INT4; 0 for
 * dense weights, when it may be NULL). */
size_t op_linear_scratch(const linear *W, int32_t m);
void op_linear(cpu_pool *p, const linear *W, const float *x, int32_t ldx, int32_t m, float *y,
               int32_t ldy, float *scratch);

/* Plain single-threaded reference of op_linear, for tests (dequantises one
 * element at a time with the int4.h formula, accumulates in double). */
void op_linear_naive(const linear *W, const float *x, int32_t m, float *y);

/* ---- MoE routing -------------------------------------------------------------
 * p = softmax(logits[0..n_experts)) (float32, max-subtracted); the top_k
 * largest p (ties: lower expert id first) in descending order go to ids and
 * weights; if renorm, weights are divided by their sum. This is transformers'
 * order for qwen2_moe / qwen3_moe, and for mixtral (top-k then renormalised
 * softmax) it equals softmax over the k selected logits. */
void op_route(const float *logits, int32_t n_experts, int32_t top_k, int renorm, int32_t *ids,
              float *weights);

static inline float op_sigmoid(float x) { return 1.f / (1.f + __builtin_expf(-x)); }

/* ---- attention over a paged KV cache ----------------------------------------
 * One layer's cache: token slot s of block b holds K at
 * k[((b * block_size + s) * n_kv + h) * head_dim ...] (V likewise). */
typedef struct op_kv_layer {
    float *k;
    float *v;
    int32_t block_size;
    int32_t n_kv;
    int32_t head_dim;
} op_kv_layer;

/* Store K/V rows ([n_rows][n_kv*head_dim]) of tokens at positions pos[r]
 * of the sequences whose block tables are tables[r]. */
void op_kv_store(const op_kv_layer *kv, const float *k, const float *v, int32_t n_rows,
                 const int32_t *pos, const int32_t *const *tables);

/* Causal GQA attention: for row r (query q[r] = [n_heads][head_dim] at
 * position pos[r]) and head h with kv head h / (n_heads / n_kv):
 *   s_j = (q . K_j) * scale, j = 0..pos[r] (K_j from tables[r]),
 *   out[r][h] = sum_j softmax(s)_j V_j.
 * scratch: cpu_pool_threads(p) * max_ctx floats, max_ctx > every pos. */
void op_attention(cpu_pool *p, float *out, const float *q, int32_t n_rows, int32_t n_heads,
                  const int32_t *pos, const int32_t *const *tables, const op_kv_layer *kv,
                  float scale, float *scratch, int32_t max_ctx);

#ifdef __cplusplus
}
#endif
#endif
