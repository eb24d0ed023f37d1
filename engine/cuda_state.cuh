/*
 * cuda_state.cuh: the inside of a cu_state (cuda_model.h), shared by the
 * files that build and run it: cuda_forward.cu (allocation, the step) and
 * cuda_state_mega.cu (the one-token persistent kernel's setup). Nothing
 * outside engine/cuda_*.cu includes it.
 */
#ifndef LIGHTMOE_CUDA_STATE_CUH
#define LIGHTMOE_CUDA_STATE_CUH

#include <cublas_v2.h>

#include "engine/cuda_int4_gemm.cuh"
#include "engine/cuda_mega.cuh"
#include "engine/cuda_model.h"
#include "engine/cuda_moe.cuh"
#include "engine/cuda_sample.cuh"
#include "engine/cuda_tp.cuh"

struct cu_state {
    const cu_model *m;
    cu_options o;
    cudaStream_t st;
    cublasHandle_t blas;
    int sms;
    int Tm;                 /* max tokens per step */
    int split_budget;       /* max T * nsplit */
    int attn_max_split;     /* most context splits (LIGHTMOE_CUDA_ATTN_SPLITS) */
    int attn_steps;         /* decode: most 32-position steps a split (..._ATTN_STEPS) */
    /* activations [Tm][...] */
    float *x, *xnf, *qkv, *q, *part, *rlog, *topk_w, *sg, *y, *ys, *tmp, *logits, *inv_freq;
    __half *xn, *att, *h, *hs, *xg, *hg, *fn;
    int32_t *topk_ids;
    cu_moe_plan plan;
    int32_t *d_active;      /* benchmark counter of routed (layer, expert) pairs, or NULL */
    /* batch description: device and pinned host copies */
    int32_t *d_tok, *d_seq, *d_pos, *d_rows, *d_bt;
    int2 *d_tiles;
    int32_t *h_tok, *h_seq, *h_pos, *h_rows, *h_bt, *h_off;
    int2 *h_tiles;
    int bt_cap, bt_stride;   /* block table rows on the device: fixed stride per step */
    /* CUDA graphs of decode steps, keyed by (tokens, logit rows, table stride) */
    struct graph_entry {
        int T, n_logits, stride;
        cudaGraphExec_t exec;
    } graphs[32];
    int n_graphs;
    int graph_ok;           /* every MoE layer INT4: a step needs no host round trip */
    void *blas_ws;
    /* prefill of dense INT4 layers through cuBLAS: the layer dequantised to
     * fp16 (wdq, the largest dense INT4 matrix), fused-SiLU outputs in fp32
     * chunks of silu_rows rows (dq_tmp); NULL when that path is off */
    __half *wdq;
    size_t wdq_elems;
    float *dq_tmp;
    int silu_rows;
    int32_t *attn_cnt;      /* [Tm * nkv] split counters of the attention's own merge */
    int qkv_fused;          /* decode: q/k/v post-processing inside the attention kernel */
    int fold;               /* one-token steps: the MoE combine in the down product, the
                             * attention norm in the qkv product (LIGHTMOE_CUDA_FOLD) */
    long n_folds;           /* folded products launched (tests) */
    int fold_route;         /* with fold: the experts' products route the token themselves */
    long n_routed;          /* MoE blocks launched so (tests) */
    int down_pf;            /* the experts' gate_up blocks send their down weights to L2 */
    int merge_o;            /* one-token steps: attention merge and o_proj in one launch */
    /* one-token steps: the router through o_proj (cu_route_o): no router
     * launch; route_m[l] (or NULL: not for layer l), o_acc (o_proj's sums),
     * u_acc (route_nc copies of the router's sums), both zero between steps */
    int route_o;
    float **route_m;
    float *o_acc, *u_acc;
    int route_nc;
    long n_route_o;         /* MoE blocks routed so (tests) */
    char skip[16];          /* measurement only (LIGHTMOE_CUDA_SKIP): launches left out of
                             * one-token steps, to time what each costs; wrong results */
    int step_decode;        /* the step being launched has one token per piece */
    /* per-operation timing (benchmarks): events around each launch group */
    int prof_on, prof_n;
    cudaEvent_t *prof_ev;   /* [2 * PROF_MAX] */
    int *prof_cat;          /* [PROF_MAX] */
    double prof_ms[16];
    /* KV cache */
    int bs, n_blocks, bt_stride_max;
    __half *kv;
    size_t kv_layer_elems;  /* elements of one layer's K (= V) */
    cu_tp *tp;              /* tensor parallelism (cu_options.comm), or NULL */
    /* one-token steps as one persistent kernel (cuda_mega.cuh): wanted at
     * creation, set up at kv_init; mega_grid > 0 once it is ready */
    int mega_want, mega_grid, mega_step;
    size_t mega_smem;
    cu_mega_args mega;
    cu_mega_layer *d_mega_layers;
    __half *mega_h;
    uint32_t *mega_bar;
    int32_t *mega_fail, *mega_cnt, *h_mega_fail;
    long long *mega_prof;   /* LIGHTMOE_CUDA_MEGA_PROF=1: phase clocks of block 0 */
    char mega_why[96];      /* why it is off, if it is */
    /* sampling on the device (cuda_sample.cuh; not with tensor parallelism):
     * the picks, penalty entries and results (device and pinned host), the
     * e scratch of CU_SAMPLE_BLOCKS rows */
    cu_pick *d_picks, *h_picks;
    sample_penalty *d_pen, *h_pen;
    backend_pick_out *d_pout, *h_pout;
    float *d_se;
    uint8_t *h_seen;        /* [vocab] a row's penalty ids while they are checked (all 0 between) */
    int pen_cap;            /* penalty entries a step (0: no device sampling) */
};

/* cudaMalloc of bytes (16 if 0) into *p; -ENOMEM naming what on failure */
int cu_state_dev_alloc(void **p, size_t bytes, lm_err *err, const char *what);
/* pinned host memory (cudaMallocHost) */
int cu_state_host_alloc(void **p, size_t bytes, lm_err *err);
/* expert e's INT4 view of a linear layer (L->kind must be CU_W_INT4) */
cu_int4_weights cu_linear_int4(const cu_linear *L, int e);

/* cuda_state_mega.cu: the one-token kernel's layer table (it needs the KV
 * cache's address) and buffers, at kv_init; a model or card it cannot run
 * on leaves it off with the reason in mega_why (allocation failures are
 * errors). */
int cu_state_mega_init(cu_state *s, lm_err *err);
/* after a step whose persistent kernel timed out at a grid barrier: the
 * graphs dropped, the kernel off for later steps, -EIO for this one */
int cu_state_mega_failed(cu_state *s, lm_err *err);

#endif
