/*
 * bench_cuda.cu: CUDA backend benchmarks for docs/PERF.md.
 *
 *   bench_cuda [ceil] [kernels] [decode] [prefill] [--model qwen3|qwen15|both] [--batch N]
 *              [--ctx N[,N...]] [--portable] [--path P] [--dir CHECKPOINT]
 *
 *   ceil     the card's ceilings measured in this run: device-to-device copy
 *            bandwidth (bytes read + written) and the cuBLAS fp16 matrix rate
 *   kernels  each INT4 kernel against cuBLAS fp16 at the model's shapes and
 *            1..512 rows; the prefill alternative "dequantise to fp16 then
 *            cuBLAS" measured beside the mma kernel; one token's routed
 *            experts in one grouped launch against cuBLAS's batched product
 *            and against reading their weight bytes alone (read floors)
 *   decode   one decode step of the whole model (random weights of the real
 *            shape, made on the GPU) at batch 1..128, context 512 per
 *            sequence (--ctx: each context given); the roofline floor
 *            counts attention weights, the experts actually routed (counted
 *            on the GPU), shared experts, router, lm_head and the KV read
 *   prefill  one prompt of 512, 2048, 8192 tokens -> first logits (TTFT of
 *            the forward pass: host upload + all layers + logits back)
 *   sample   picking tokens from B rows of qwen's 151936 logits: on the GPU
 *            (cu_sample: picks up, kernel, results down) against the host
 *            path it replaces (rows copied down, sample_pick on each);
 *            decode --pick times whole steps with their picks both ways
 *
 * Timing: warm-up, then the median of repeated runs; weights of kernel
 * benchmarks rotate over copies larger than L2 so that no run reads cache.
 */
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <vector>

#include "engine/backend_cuda.h"
#include "engine/cuda_common.cuh"
#include "engine/cuda_int4_gemm.cuh"
#include "engine/cuda_model.h"
#include "engine/cuda_sample.cuh"
#include "engine/cuda_synth.h"
#include "engine/sample.h"

#define CK(x) \
    do { \
        cudaError_t e_ = (x); \
        if (e_ != cudaSuccess) { \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
            exit(1); \
        } \
    } while (0)
#define OK(x) \
    do { \
        lm_err e_ = {0, ""}; \
        if ((x) != 0) { \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, e_.msg); \
            exit(1); \
        } \
    } while (0)
#define ERRP (&e_)

static double g_bw = 0; /* measured copy bandwidth, bytes/s */
static int g_batch_only = 0; /* --batch N: decode only at batch N */
static std::vector<int> g_ctx = {512}; /* --ctx N,N,...: decode at these contexts */
static int g_portable = 0; /* --portable: the state without Hopper-only code */

static double median(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}
static double now_s()
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

__global__ void k_fill(uint32_t *p, size_t n, uint32_t seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t x = (uint32_t)i * 2654435761u ^ seed;
        x ^= x >> 15;
        x *= 0x2c1b3c6dU;
        x ^= x >> 12;
        p[i] = x;
    }
}
/* random fp16 in [-1, 1) */
__global__ void k_fill_h(__half *p, size_t n, uint32_t seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t x = (uint32_t)i * 2654435761u ^ seed;
        x ^= x >> 15;
        x *= 0x2c1b3c6dU;
        x ^= x >> 12;
        p[i] = __float2half((float)(x >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
}
__global__ void k_dequant(const uint8_t *qs, const __half *sc, const uint8_t *z, int n, int k, int g,
                          __half *w)
{
    const size_t total = (size_t)n * k;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / k, j = i % k;
        const uint8_t b = qs[r * (k / 2) + j / 2];
        const int q = (j & 1) ? b >> 4 : b & 15;
        const size_t gi = r * (k / g) + j / g;
        w[i] = __float2half(__half2float(sc[gi]) * (float)(q - z[gi]));
    }
}

/* Keeps the GPU busy while the host queues the launches to be timed, so that
 * events measure GPU time and not the host's launch latency. */
__global__ void k_spin(long long cycles)
{
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}

static void bench_ceilings()
{
    const size_t bytes = (size_t)2 << 30;
    void *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    k_fill<<<4096, 256>>>((uint32_t *)a, bytes / 4, 1);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::vector<double> t;
    for (int i = 0; i < 12; i++) {
        cudaEventRecord(e0);
        cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        if (i >= 2)
            t.push_back(ms * 1e-3);
    }
    g_bw = 2.0 * bytes / median(t);
    printf("ceiling copy bandwidth (read+write, 2 GiB D2D, median of 10): %.0f GB/s\n", g_bw / 1e9);
    CK(cudaFree(b));
    /* cuBLAS fp16 GEMM, 8192^3, random data */
    const int N = 8192;
    __half *A = (__half *)a, *B = A + (size_t)N * N, *C;
    CK(cudaMalloc(&C, (size_t)N * N * 2));
    k_fill_h<<<4096, 256>>>(A, (size_t)2 * N * N, 7);
    cublasHandle_t h;
    cublasCreate(&h);
    const float one = 1, zero = 0;
    t.clear();
    for (int i = 0; i < 8; i++) {
        cudaEventRecord(e0);
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, N, N, &one, A, CUDA_R_16F, N, B, CUDA_R_16F, N,
                     &zero, C, CUDA_R_16F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        if (i >= 2)
            t.push_back(ms * 1e-3);
    }
    printf("ceiling cuBLAS fp16 GEMM 8192^3 (fp32 accumulate): %.0f TFLOP/s\n",
           2.0 * N * N * N / median(t) / 1e12);
    CK(cudaDeviceSynchronize());
    cublasDestroy(h);
    cudaFree(a);
    cudaFree(C);
}

/* GPU time per call of fn(i) (i counts calls): 10 back-to-back calls
 * queued behind a spinning kernel, median over 9 such groups after one
 * warm-up group. */
template <typename F> static double time_calls(F fn, cudaEvent_t e0, cudaEvent_t e1)
{
    std::vector<double> t;
    int it = 0;
    for (int rep = 0; rep < 10; rep++) {
        k_spin<<<1, 1>>>(200000);
        cudaEventRecord(e0);
        for (int i = 0; i < 10; i++)
            fn(it++);
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        if (rep >= 1)
            t.push_back(ms * 1e-3 / 10);
    }
    CK(cudaGetLastError());
    return median(t);
}

/* One dense shape: INT4 (auto/gemv/mma) vs cuBLAS fp16 vs dequant + cuBLAS. */
static void bench_shape(cublasHandle_t h, const char *name, int n, int k, int g)
{
    const size_t qb = (size_t)n * k / 2, gc = (size_t)n * (k / g);
    const size_t l2 = 50u << 20;
    const int copies = (int)std::min<size_t>(64, std::max<size_t>(4, (4 * l2) / (qb + 3 * gc) + 1));
    const int copies16 = (int)std::min<size_t>(32, std::max<size_t>(3, (4 * l2) / ((size_t)n * k * 2) + 1));
    std::vector<cu_int4_weights> ws(copies);
    for (auto &w : ws) {
        uint8_t *qs, *z;
        __half *sc;
        CK(cudaMalloc(&qs, qb));
        CK(cudaMalloc(&sc, gc * 2));
        CK(cudaMalloc(&z, gc));
        k_fill<<<1024, 256>>>((uint32_t *)qs, qb / 4, 3);
        k_fill_h<<<1024, 256>>>(sc, gc, 5);
        CK(cudaMemset(z, 8, gc));
        w = {n, k, g, 1, qs, sc, z};
    }
    std::vector<__half *> w16(copies16);
    for (auto &p : w16) {
        CK(cudaMalloc(&p, (size_t)n * k * 2));
        k_fill_h<<<1024, 256>>>(p, (size_t)n * k, 9);
    }
    const int Mmax = 8192;
    __half *x, *wdq;
    float *y;
    CK(cudaMalloc(&x, (size_t)Mmax * k * 2));
    CK(cudaMalloc(&y, (size_t)Mmax * n * 4));
    CK(cudaMalloc(&wdq, (size_t)n * k * 2));
    k_fill_h<<<1024, 256>>>(x, (size_t)Mmax * k, 11);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    const float one = 1, zero = 0;
    auto time_it = [&](auto fn) { return time_calls(fn, e0, e1); };
    const double bytes4 = (double)(qb + 3 * gc);
    for (int M : {1, 8, 32, 128, 512, 2048}) {
        cu_gemm_rows r;
        memset(&r, 0, sizeof(r));
        r.n_rows = M;
        double ti[4];
        for (int p = 0; p < 4; p++) { /* auto, gemv, mma, mma8 */
            if ((p == 1 || p == 3) && M > 64) { ti[p] = 0; continue; } /* re-read weights per 8 rows */
            ti[p] = time_it([&](int i) {
                lm_err e;
                cu_int4_matmul(&ws[i % copies], &r, x, k, y, n, CU_OUT_F32, (cu_gemm_path)p, 0, &e);
            });
        }
        const double tc = time_it([&](int i) {
            cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, M, k, &one, w16[i % copies16], CUDA_R_16F, k,
                         x, CUDA_R_16F, k, &zero, y, CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT);
        });
        double tdq = 0;
        if (M >= 128)
            tdq = time_it([&](int i) {
                const cu_int4_weights &w = ws[i % copies];
                k_dequant<<<2048, 256>>>(w.qs, w.scales, w.zeros, n, k, g, wdq);
                cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, M, k, &one, wdq, CUDA_R_16F, k, x,
                             CUDA_R_16F, k, &zero, y, CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT);
            });
        printf("kernel %-14s n=%5d k=%5d M=%4d | int4 auto %8.1f us (%5.0f GB/s, %4.0f%% bw) gemv %8.1f mma %8.1f "
               "mma8 %8.1f | cublas fp16 %8.1f us | dequant+cublas %8.1f | speed-up vs fp16 %.2fx\n",
               name, n, k, M, ti[0] * 1e6, bytes4 / ti[0] / 1e9, 100 * bytes4 / ti[0] / g_bw,
               ti[1] * 1e6, ti[2] * 1e6, ti[3] * 1e6, tc * 1e6, tdq * 1e6, tc / ti[0]);
    }
    for (auto &w : ws) {
        cudaFree((void *)w.qs);
        cudaFree((void *)w.scales);
        cudaFree((void *)w.zeros);
    }
    for (auto p : w16)
        cudaFree(p);
    cudaFree(x);
    cudaFree(y);
    cudaFree(wdq);
}

/* Read floors for one token's routed experts (bench_grouped): the same
 * bytes as the grouped product's weights (not its scales and zeros), read
 * and thrown away. k_read_gemv has the gemv's launch shape and addresses
 * (blocks of 16 rows x an item; a warp's 4 rows, lane tl loads chunks tl,
 * tl + 32, ... of each; the expert read from the item list first); k_read_flat
 * spreads the items' bytes evenly over gridDim.x blocks (16-byte loads, U in
 * flight a thread); each block puts the items' base addresses in shared
 * memory first and finds a word's item by a 32-bit division (round 16's
 * version did a 64-bit division and read the item list for every load).
 * The sums are stored only if they equal a value they never take, so that
 * the loads are not removed. */
__global__ void k_read_gemv(const uint8_t *__restrict__ qs, const int2 *__restrict__ items, int n,
                            int K, uint32_t *sink)
{
    const int e = items[blockIdx.y].x;
    const int rowbytes = K / 2, C = K / 32;
    const int row0 = (blockIdx.x * 4 + threadIdx.x / 32) * 4, tl = threadIdx.x % 32;
    const uint8_t *base = qs + (size_t)e * n * rowbytes;
    uint32_t acc = 0;
    for (int c = tl; c < C; c += 64) {
        uint4 v[8];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int row = min(row0 + j, n - 1);
            v[j] = __ldg(reinterpret_cast<const uint4 *>(base + (size_t)row * rowbytes) + c);
            v[4 + j] = c + 32 < C ? __ldg(reinterpret_cast<const uint4 *>(base + (size_t)row * rowbytes) + c + 32)
                                  : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < 8; j++)
            acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
    if (acc == 0x9e3779b9u)
        *sink = acc;
}
template <int U>
__global__ void k_read_flat(const uint8_t *__restrict__ qs, const int2 *__restrict__ items, int nit,
                            size_t ebytes, uint32_t *sink)
{
    /* 16-byte words: every caller's total is below 2^32 (the bench's
     * largest is 786,432) */
    const uint32_t per = (uint32_t)(ebytes / 16), total = per * (uint32_t)nit;
    const uint32_t share = (total + gridDim.x - 1) / gridDim.x;
    const uint32_t lo = blockIdx.x * share, hi = min(total, lo + share);
    __shared__ const uint4 *s_base[64]; /* nit <= 64: bench_grouped checks */
    for (int it = threadIdx.x; it < nit; it += blockDim.x)
        s_base[it] = reinterpret_cast<const uint4 *>(qs + (size_t)items[it].x * ebytes);
    __syncthreads();
    uint32_t acc = 0;
    for (uint32_t i = lo + threadIdx.x; i < hi; i += U * blockDim.x) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const uint32_t w = i + u * blockDim.x, it = w / per;
            v[u] = w < hi ? __ldg(s_base[it] + (w - it * per)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++)
            acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x9e3779b9u)
        *sink = acc;
}

/* What one launch for a token's whole MoE block (gate_up, SiLU and down
 * together) would add: if each block made a slice of an expert's h and
 * multiplied it by its share of down's columns (K split over the blocks),
 * it would add n floats into the token's output row. B blocks, each adding
 * n floats of v into one row y of n (fp32 atomics in L2): V4 as 16-byte
 * vector atomics (sm_90; scalar below), else four scalar ones. k_empty,
 * launched with the same grid, gives such a launch's fixed cost. */
__device__ __forceinline__ void red4_scalar(float *y, float v)
{
#pragma unroll
    for (int j = 0; j < 4; j++)
        atomicAdd(y + j, v);
}
template <bool V4> __global__ void k_red_row(float *y, int n, float v)
{
    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
#if __CUDA_ARCH__ >= 900
        if constexpr (V4)
            atomicAdd(reinterpret_cast<float4 *>(y) + i, make_float4(v, v, v, v));
        else
#endif
            red4_scalar(y + 4 * i, v);
    }
}
__global__ void k_empty() {}

/* One token's routed experts in one launch, as a decode step runs them:
 * the grouped INT4 product (work list of k items, the one-token kernel,
 * gate_up with SiLU(gate) * up fused, down into fp32 rows) against cuBLAS
 * fp16's batched product of the same k experts (one launch, k pointers, no
 * SiLU). Every call takes k experts not used by the call before it; all E
 * experts (INT4: 200 MB for qwen3's gate_up) are larger than L2. */
static void bench_grouped(cublasHandle_t h, const char *name, int E, int topk, int n, int k,
                          int g, cu_out_mode mode)
{
    const size_t qb = (size_t)n * k / 2, gc = (size_t)n * (k / g);
    uint8_t *qs, *z;
    __half *sc, *w16, *x;
    CK(cudaMalloc(&qs, qb * E));
    CK(cudaMalloc(&sc, gc * 2 * E));
    CK(cudaMalloc(&z, gc * E));
    CK(cudaMalloc(&w16, (size_t)n * k * 2 * E));
    CK(cudaMalloc(&x, (size_t)k * 2));
    k_fill<<<1024, 256>>>((uint32_t *)qs, qb * E / 4, 3);
    k_fill_h<<<1024, 256>>>(sc, gc * E, 5);
    CK(cudaMemset(z, 8, gc * E));
    k_fill_h<<<1024, 256>>>(w16, (size_t)n * k * E, 9);
    k_fill_h<<<64, 256>>>(x, (size_t)k, 11);
    const cu_int4_weights w = {n, k, g, E, qs, sc, z};
    /* sets of topk distinct experts, consecutive sets disjoint */
    const int nsets = E / topk;
    std::vector<int> perm(E);
    for (int i = 0; i < E; i++)
        perm[i] = i;
    uint32_t rng = 12345;
    for (int i = E - 1; i > 0; i--) {
        rng = rng * 1664525u + 1013904223u;
        std::swap(perm[i], perm[(rng >> 8) % (uint32_t)(i + 1)]);
    }
    /* per set: offsets[E+1], items[topk], n_items, a_rows[topk] (all 0) */
    std::vector<int32_t> h_off((size_t)nsets * (E + 1));
    std::vector<int2> h_items((size_t)nsets * topk);
    std::vector<const void *> h_ptr((size_t)nsets * 3 * topk);
    float *yf;
    void *y;
    CK(cudaMalloc(&y, (size_t)topk * n * 4));
    CK(cudaMalloc(&yf, (size_t)topk * n * 4));
    for (int s = 0; s < nsets; s++) {
        std::vector<int> ex(perm.begin() + s * topk, perm.begin() + (s + 1) * topk);
        std::sort(ex.begin(), ex.end());
        int32_t *off = &h_off[(size_t)s * (E + 1)];
        for (int e = 0, i = 0; e <= E; e++) {
            off[e] = i;
            if (i < topk && e == ex[i])
                i++;
        }
        for (int i = 0; i < topk; i++) {
            h_items[(size_t)s * topk + i] = make_int2(ex[i], i);
            h_ptr[((size_t)s * 3 + 0) * topk + i] = w16 + (size_t)ex[i] * n * k;
            h_ptr[((size_t)s * 3 + 1) * topk + i] = x;
            h_ptr[((size_t)s * 3 + 2) * topk + i] = yf + (size_t)i * n;
        }
    }
    int32_t *d_off, *d_nit, *d_arows;
    int2 *d_items;
    const void **d_ptr;
    CK(cudaMalloc(&d_off, h_off.size() * 4));
    CK(cudaMalloc(&d_items, h_items.size() * sizeof(int2)));
    CK(cudaMalloc(&d_nit, 4));
    CK(cudaMalloc(&d_arows, topk * 4));
    CK(cudaMalloc(&d_ptr, h_ptr.size() * sizeof(void *)));
    CK(cudaMemcpy(d_off, h_off.data(), h_off.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_items, h_items.data(), h_items.size() * sizeof(int2), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_nit, &topk, 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(d_arows, 0, topk * 4));
    CK(cudaMemcpy(d_ptr, h_ptr.data(), h_ptr.size() * sizeof(void *), cudaMemcpyHostToDevice));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    auto time_it = [&](auto fn) { return time_calls(fn, e0, e1); };
    int bad = 0;
    const double ti = time_it([&](int i) {
        const int s = i % nsets;
        cu_gemm_rows r;
        memset(&r, 0, sizeof(r));
        r.n_rows = topk;
        r.offsets = d_off + (size_t)s * (E + 1);
        r.items = d_items + (size_t)s * topk;
        r.n_items = d_nit;
        r.max_items = topk;
        r.tile = 1;
        r.a_rows = d_arows;
        lm_err e;
        const int ldo = mode == CU_OUT_SILU_F16 ? n / 2 : n;
        bad |= cu_int4_matmul(&w, &r, x, k, y, ldo, mode, CU_GEMM_GEMV, 0, &e);
    });
    const float one = 1, zero = 0;
    const double tc = time_it([&](int i) {
        const int s = i % nsets;
        const void *const *p = d_ptr + (size_t)s * 3 * topk;
        bad |= (int)cublasGemmBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, 1, k, &one, p, CUDA_R_16F, k,
                                        p + topk, CUDA_R_16F, k, &zero, (void *const *)(p + 2 * topk),
                                        CUDA_R_32F, n, topk, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    });
    /* the read floors: the same experts' weight bytes, read and thrown away */
    uint32_t *sink;
    CK(cudaMalloc(&sink, 4));
    const double tr = time_it([&](int i) {
        k_read_gemv<<<dim3((n + 15) / 16, topk), 128>>>(qs, d_items + (size_t)(i % nsets) * topk, n, k,
                                                        sink);
    });
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    if (topk > 64) { /* k_read_flat's table of item addresses */
        fprintf(stderr, "bench_cuda: top-k %d above the read floor's 64\n", topk);
        exit(2);
    }
    double tf[3];
    for (int v = 0; v < 3; v++)
        tf[v] = time_it([&](int i) {
            const int2 *it = d_items + (size_t)(i % nsets) * topk;
            if (v == 0)
                k_read_flat<4><<<sms, 512>>>(qs, it, topk, qb, sink);
            else if (v == 1)
                k_read_flat<4><<<2 * sms, 512>>>(qs, it, topk, qb, sink);
            else
                k_read_flat<8><<<4 * sms, 256>>>(qs, it, topk, qb, sink);
        });
    const double bq = (double)topk * qb;
    printf("grouped %-14s read floor of the %.1f MB of weights: gemv's shape %6.1f us (%4.0f%% bw) | "
           "flat %d x 512 %6.1f us (%4.0f%%), %d x 512 %6.1f us (%4.0f%%), %d x 256 x 8 %6.1f us (%4.0f%%)\n",
           name, bq / 1e6, tr * 1e6, 100 * bq / tr / g_bw, sms, tf[0] * 1e6, 100 * bq / tf[0] / g_bw,
           2 * sms, tf[1] * 1e6, 100 * bq / tf[1] / g_bw, 4 * sms, tf[2] * 1e6, 100 * bq / tf[2] / g_bw);
    cudaFree(sink);
    if (mode == CU_OUT_F32) { /* down: n = the hidden size, k = the expert's width */
        float *row;
        CK(cudaMalloc(&row, (size_t)n * 4));
        CK(cudaMemset(row, 0, (size_t)n * 4));
        double ta[3][2]; /* slices of 32, 16 and 64 of h; empty, scalar, v4 */
        double te[3];
        const int wd[3] = {32, 16, 64};
        for (int s = 0; s < 3; s++) {
            const int B = topk * (k / wd[s]);
            te[s] = time_it([&](int) { k_empty<<<B, 128>>>(); });
            ta[s][0] = time_it([&](int) { k_red_row<false><<<B, 128>>>(row, n, 1e-3f); });
            ta[s][1] = time_it([&](int) { k_red_row<true><<<B, 128>>>(row, n, 1e-3f); });
        }
        printf("grouped %-14s one launch for the MoE block would add %d floats a block: ", name, n);
        for (int s = 0; s < 3; s++)
            printf("%s%d blocks (h slices of %d): empty %5.1f us, scalar adds %6.1f us, v4 %6.1f us",
                   s ? " | " : "", topk * (k / wd[s]), wd[s], te[s] * 1e6, ta[s][0] * 1e6,
                   ta[s][1] * 1e6);
        printf("\n");
        cudaFree(row);
    }
    const double b4 = (double)topk * (qb + 3 * gc), b16 = (double)topk * n * k * 2;
    printf("grouped %-14s %d of %3d experts, n=%5d k=%5d | int4 %6.1f us (%5.0f GB/s, %3.0f%% bw) | "
           "cublas fp16 batched %6.1f us (%5.0f GB/s) | speed-up %.2fx%s\n",
           name, topk, E, n, k, ti * 1e6, b4 / ti / 1e9, 100 * b4 / ti / g_bw, tc * 1e6,
           b16 / tc / 1e9, tc / ti, bad ? " (A CALL FAILED)" : "");
    cudaFree(qs);
    cudaFree(sc);
    cudaFree(z);
    cudaFree(w16);
    cudaFree(x);
    cudaFree(y);
    cudaFree(yf);
    cudaFree(d_off);
    cudaFree(d_items);
    cudaFree(d_nit);
    cudaFree(d_arows);
    cudaFree((void *)d_ptr);
}

/* sampling: cu_sample against the copy + sample_pick it replaces */
static void bench_sample()
{
    const int V = 151936, Bmax = 128;
    printf("== sampling, vocabulary %d (GPU: picks up + cu_sample + results down, wall clock; "
           "host: rows copied down + sample_pick per row, one thread)\n", V);
    std::vector<float> rows((size_t)Bmax * V);
    uint32_t x = 12345;
    for (auto &v : rows) { /* roughly a language model's: a few large logits over a broad body */
        x = x * 1664525u + 1013904223u;
        const float u = (float)(x >> 8) / 16777216.0f;
        v = 6.0f * u - 3.0f + ((x & 1023) == 7 ? 14.0f : 0.0f);
    }
    float *d_src, *d_rows, *d_e, *h_rows;
    cu_pick *d_picks, *h_picks;
    backend_pick_out *d_out, *h_out;
    sample_penalty *d_pen, *h_pen;
    CK(cudaMalloc(&d_src, rows.size() * 4));
    CK(cudaMalloc(&d_rows, rows.size() * 4));
    CK(cudaMalloc(&d_e, (size_t)CU_SAMPLE_BLOCKS * V * 4));
    CK(cudaMalloc(&d_picks, Bmax * sizeof(cu_pick)));
    CK(cudaMalloc(&d_out, Bmax * sizeof(backend_pick_out)));
    CK(cudaMalloc(&d_pen, (size_t)Bmax * 256 * sizeof(sample_penalty)));
    CK(cudaMallocHost(&h_rows, rows.size() * 4));
    CK(cudaMallocHost(&h_picks, Bmax * sizeof(cu_pick)));
    CK(cudaMallocHost(&h_out, Bmax * sizeof(backend_pick_out)));
    CK(cudaMallocHost(&h_pen, (size_t)Bmax * 256 * sizeof(sample_penalty)));
    CK(cudaMemcpy(d_src, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice));
    std::vector<char> scratch(sample_scratch_bytes(V));
    struct cfg { const char *name; float t, top_p, min_p, rep; int top_k, lp; };
    const cfg cfgs[] = {{"greedy", 0.f, 1.f, 0.f, 1.f, 0, 0},
                        {"T 1, no filter", 1.f, 1.f, 0.f, 1.f, 0, 0},
                        {"T 0.7, top_p 0.9", 0.7f, 0.9f, 0.f, 1.f, 0, 0},
                        {"T 0.7, top_k 50, top_p 0.9", 0.7f, 0.9f, 0.f, 1.f, 50, 0},
                        {"T 0.7, top_p 0.9, min_p 0.05, rep 1.1 (256 ids), 5 logprobs", 0.7f, 0.9f,
                         0.05f, 1.1f, 0, 5}};
    for (const cfg &c : cfgs) {
        sample_params sp;
        sample_params_default(&sp);
        sp.temperature = c.t;
        sp.top_p = c.top_p;
        sp.min_p = c.min_p;
        sp.repetition_penalty = c.rep;
        sp.top_k = c.top_k;
        sp.logprobs = c.lp;
        const int npen = c.rep != 1.f ? 256 : 0;
        for (int B : {1, 8, 32, 128}) {
            std::vector<double> tg, th;
            int agree = 0;
            for (int rep = 0; rep < 7; rep++) {
                CK(cudaMemcpy(d_rows, d_src, (size_t)B * V * 4, cudaMemcpyDeviceToDevice));
                for (int r = 0; r < B; r++) {
                    backend_pick bp = {&sp, 0x9e3779b97f4a7c15ull * (uint64_t)(r + 7 * rep + 1),
                                       r * npen, npen};
                    cu_pick_from(&bp, &h_picks[r]);
                    for (int j = 0; j < npen; j++)
                        h_pen[r * npen + j] = {(int32_t)((j * 7919 + r) % V), j % 3};
                }
                CK(cudaDeviceSynchronize());
                double t0 = now_s();
                if (npen)
                    CK(cudaMemcpyAsync(d_pen, h_pen, (size_t)B * npen * sizeof(sample_penalty),
                                       cudaMemcpyHostToDevice, 0));
                CK(cudaMemcpyAsync(d_picks, h_picks, B * sizeof(cu_pick), cudaMemcpyHostToDevice, 0));
                OK(cu_sample(d_rows, V, V, B, d_picks, d_pen, d_e, d_out, 0, ERRP));
                CK(cudaMemcpyAsync(h_out, d_out, B * sizeof(backend_pick_out), cudaMemcpyDeviceToHost, 0));
                CK(cudaStreamSynchronize(0));
                tg.push_back(now_s() - t0);
                /* the host path on the same rows */
                CK(cudaMemcpy(d_rows, d_src, (size_t)B * V * 4, cudaMemcpyDeviceToDevice));
                CK(cudaDeviceSynchronize());
                t0 = now_s();
                CK(cudaMemcpy(h_rows, d_rows, (size_t)B * V * 4, cudaMemcpyDeviceToHost));
                for (int r = 0; r < B; r++) {
                    sample_result res;
                    lm_err e = {0, ""};
                    sample_apply_penalties(h_rows + (size_t)r * V, &sp, h_pen + r * npen, npen);
                    sample_pick_drawn(h_rows + (size_t)r * V, V, &sp, h_picks[r].draw, scratch.data(),
                                      &res, &e);
                    agree += res.token == h_out[r].r.token;
                }
                th.push_back(now_s() - t0);
            }
            std::sort(tg.begin(), tg.end());
            std::sort(th.begin(), th.end());
            printf("sample %-62s B %3d | GPU %8.1f us | host %8.1f us | %.1fx | picks equal %d/%d\n",
                   c.name, B, tg[3] * 1e6, th[3] * 1e6, th[3] / tg[3], agree, 7 * B);
        }
    }
    cudaFree(d_src);
    cudaFree(d_rows);
    cudaFree(d_e);
    cudaFree(d_picks);
    cudaFree(d_out);
    cudaFree(d_pen);
    cudaFreeHost(h_rows);
    cudaFreeHost(h_picks);
    cudaFreeHost(h_out);
    cudaFreeHost(h_pen);
}

static void bench_kernels(const cu_synth_config *c)
{
    cublasHandle_t h;
    cublasCreate(&h);
    const int H = c->hidden, hd = c->head_dim;
    printf("== INT4 kernels vs cuBLAS fp16, %s shapes (group %d)\n", c->name, c->group);
    bench_shape(h, "qkv", (c->nq + 2 * c->nkv) * hd, H, c->group);
    bench_shape(h, "o_proj", H, c->nq * hd, c->group);
    bench_shape(h, "expert gate_up", 2 * c->moe_inter, H, c->group);
    bench_shape(h, "expert down", H, c->moe_inter, c->group);
    if (c->shared_inter)
        bench_shape(h, "shared gate_up", 2 * c->shared_inter, H, c->group);
    bench_grouped(h, "expert gate_up", c->n_experts, c->top_k, 2 * c->moe_inter, H, c->group,
                  CU_OUT_SILU_F16);
    bench_grouped(h, "expert down", c->n_experts, c->top_k, H, c->moe_inter, c->group, CU_OUT_F32);
    cublasDestroy(h);
}

struct step_batch {
    std::vector<int32_t> tokens, seq_start, start_pos, bt, rows;
    std::vector<float> logits;
    backend_batch b;
};

static void make_batch(step_batch &s, int n_seqs, int tokens_per_seq, int pos0, int max_blocks,
                       int n_logits_per_seq, int vocab)
{
    s.tokens.clear();
    s.seq_start = {0};
    s.start_pos.clear();
    s.bt.clear();
    s.rows.clear();
    for (int q = 0; q < n_seqs; q++) {
        for (int t = 0; t < tokens_per_seq; t++)
            s.tokens.push_back((q * 7919 + t * 104729 + pos0) % vocab);
        s.seq_start.push_back((int)s.tokens.size());
        s.start_pos.push_back(pos0);
        for (int j = 0; j < max_blocks; j++)
            s.bt.push_back(q * max_blocks + j);
        for (int j = 0; j < n_logits_per_seq; j++)
            s.rows.push_back((int)s.tokens.size() - 1 - j);
    }
    s.logits.resize(s.rows.size() * (size_t)vocab);
    s.b.n_seqs = n_seqs;
    s.b.n_tokens = (int)s.tokens.size();
    s.b.tokens = s.tokens.data();
    s.b.seq_start = s.seq_start.data();
    s.b.start_pos = s.start_pos.data();
    s.b.block_table = s.bt.data();
    s.b.max_blocks = max_blocks;
    s.b.n_logits = (int)s.rows.size();
    s.b.logit_rows = s.rows.data();
    s.b.logits = s.logits.data();
}

static size_t model_bytes(const cu_model *m, size_t *attn, size_t *expert, size_t *shared,
                          size_t *router, size_t *head)
{
    *attn = *expert = *shared = *router = 0;
    for (int l = 0; l < m->n_layers; l++) {
        const cu_layer *L = &m->layers[l];
        *attn += cu_linear_bytes(&L->qkv) + cu_linear_bytes(&L->o);
        *expert = (cu_linear_bytes(&L->gate_up) + cu_linear_bytes(&L->down)) / m->n_experts;
        *shared += cu_linear_bytes(&L->sh_gate_up) + cu_linear_bytes(&L->sh_down);
        *router += (size_t)(m->n_experts + m->has_shared) * m->hidden * 4;
    }
    *head = cu_linear_bytes(&m->lm_head);
    return 0;
}

/* LIGHTMOE_BENCH_COUNT_INLINE=1: the experts are counted inside the timed
 * steps, as before 2026-12-07 (the counting launch then adds to them) */
static const char *g_count_env = getenv("LIGHTMOE_BENCH_COUNT_INLINE");
static const int g_count_inline = g_count_env && g_count_env[0] == '1';

/* (layer, expert) pairs with tokens in one more step of batch b */
static long count_step(cu_state *s, const backend_batch *b)
{
    OK(cu_state_count_experts(s, 1, ERRP));
    OK(cu_forward(s, b, ERRP));
    const long n = cu_state_read_experts(s);
    OK(cu_state_count_experts(s, 0, ERRP));
    return n;
}

/* LIGHTMOE_CUDA_TRACE_OUT=prefix (builds with -DLIGHTMOE_CUDA_TRACE=ON):
 * one more step with every block of every kernel timed, written to
 * prefix.<model>.b<batch>.ctx<ctx>.txt, a line a block:
 * "grid file line block smid t0 tw t1 m0..m3" (ns from the step's first
 * block; tw -1: the block did not wait; m: cu_trace_mark points, ns after
 * the block's t0, 0 if not reached). bench/cuda_trace.py reads it. */
static void trace_step(cu_state *s, const backend_batch *b, const char *model, int B, int ctx)
{
    const char *pre = getenv("LIGHTMOE_CUDA_TRACE_OUT");
    if (!pre || !*pre)
        return;
    cu_trace_rec *r = nullptr;
    size_t n = 0;
    OK(cu_trace_begin(ERRP));
    OK(cu_forward(s, b, ERRP));
    OK(cu_trace_end(&r, &n, ERRP));
    unsigned long long t_min = ~0ull;
    for (size_t i = 0; i < n; i++)
        t_min = std::min(t_min, r[i].t0);
    char path[512];
    snprintf(path, sizeof path, "%s.%s.b%d.ctx%d.txt", pre, model, B, ctx);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "bench_cuda: cannot write %s\n", path);
        exit(1);
    }
    fprintf(f, "grid file line block smid t0 tw t1 m0 m1 m2 m3\n");
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%llu %u %u %u %u %llu %lld %llu %u %u %u %u\n", r[i].grid, r[i].file,
                r[i].line, r[i].block, r[i].smid, r[i].t0 - t_min,
                r[i].tw ? (long long)(r[i].tw - t_min) : -1LL, r[i].t1 - t_min, r[i].mark[0],
                r[i].mark[1], r[i].mark[2], r[i].mark[3]);
    fclose(f);
    free(r);
    printf("  trace: %zu blocks to %s\n", n, path);
}

/* m/s given: a model loaded from a checkpoint through the backend; else
 * random weights of c's shape made on the GPU. */
/* --pick: decode also times each step with its picks (GPU against host) */
static int g_pick = 0;

static void bench_model(const cu_synth_config *c, bool decode, bool prefill, int path,
                        const cu_model *given_m = nullptr, cu_state *given_s = nullptr)
{
    cu_model *synth = nullptr;
    const cu_model *m = given_m;
    double t0 = now_s();
    if (!m) {
        OK(cu_synth_create(c, 1, &synth, ERRP));
        m = synth;
    }
    size_t attn, expert, shared, router, head;
    model_bytes(m, &attn, &expert, &shared, &router, &head);
    printf("== %s (%s): attention %.2f GB, one expert %.2f MB, "
           "shared %.2f GB, router %.3f GB, lm_head %.2f GB (fp16)\n",
           c->name, given_m ? "checkpoint loaded through backend_cuda" : "random weights made on the GPU",
           attn / 1e9, expert / 1e6, shared / 1e9, router / 1e9, head / 1e9);
    (void)t0;
    cu_options o = {8192, 256, path, g_portable, 1}; /* decode steps as CUDA graphs */
    cu_state *s = given_s;
    if (!s)
        OK(cu_state_create(m, &o, &s, ERRP));
    const int ctx_max = *std::max_element(g_ctx.begin(), g_ctx.end());
    const int bs = 16, max_blocks = (ctx_max > 8192 ? ctx_max : 8192) / bs + 1;
    const int nb = 128 * max_blocks;
    size_t fr = cu_state_free_bytes(s);
    const size_t kvb = cu_state_kv_bytes_per_token(s);
    int n_blocks = (int)std::min<size_t>(nb, (size_t)(fr * 0.8) / (kvb * bs));
    OK(cu_state_kv_init(s, bs, n_blocks, ERRP));
    /* the experts are counted in a step of their own after the timed ones:
     * the counting launch, not chained to its neighbours, was in every timed
     * step until 2026-12-07 (LIGHTMOE_BENCH_COUNT_INLINE=1 puts it back) */
    OK(cu_state_count_experts(s, g_count_inline, ERRP));
    printf("kv: %d blocks of %d tokens (%.1f GB), %zu bytes per token\n", n_blocks, bs,
           (double)n_blocks * bs * kvb / 1e9, kvb);
    const char *mwhy = "";
    printf("one-token steps: %s%s\n", cu_state_mega(s, &mwhy) ? "one persistent kernel" :
           "the ordinary kernels: ", mwhy);
    step_batch sb;
    for (int ctx : g_ctx) {
        if (!decode)
            break;
        if (ctx + 1 > m->max_ctx) {
            printf("decode %s ctx %d: skipped, past the model's context of %d\n", c->name, ctx,
                   m->max_ctx);
            continue;
        }
        /* --batch N: that batch alone, any N (2, 4, 16: the kernels' boundaries) */
        const std::vector<int> batches =
            g_batch_only ? std::vector<int>{g_batch_only} : std::vector<int>{1, 8, 32, 64, 128};
        for (int B : batches) {
            const int mb = (ctx + 1 + bs - 1) / bs + 1;
            if ((size_t)B * mb > (size_t)n_blocks)
                break;
            make_batch(sb, B, 1, ctx, mb, 1, m->vocab);
            for (int i = 0; i < 3; i++)
                OK(cu_forward(s, &sb.b, ERRP));
            cu_state_read_experts(s);
            std::vector<double> t;
            const int reps = 20;
            for (int i = 0; i < reps; i++) {
                CK(cudaDeviceSynchronize());
                double a = now_s();
                OK(cu_forward(s, &sb.b, ERRP));
                t.push_back(now_s() - a);
            }
            const double active = g_count_inline ? (double)cu_state_read_experts(s) / reps
                                                 : (double)count_step(s, &sb.b);
            trace_step(s, &sb.b, c->name, B, ctx);
            /* one more step with every launch group timed (no graph) */
            char prof[1024];
            OK(cu_state_profile(s, 1, ERRP));
            OK(cu_forward(s, &sb.b, ERRP));
            cu_state_profile_report(s, prof, sizeof prof);
            OK(cu_state_profile(s, 0, ERRP));
            cu_state_read_experts(s);
            const double bytes = attn + active * expert + shared + router + head +
                                 (double)B * (ctx + 1) * kvb;
            const double floor_s = bytes / g_bw, ts = median(t);
            printf("decode %-18s batch %4d ctx %d: %7.3f ms/step %8.0f tok/s | routed experts/step %.0f "
                   "| bytes %.2f GB floor %.3f ms -> %.0f%% of roofline\n",
                   c->name, B, ctx, ts * 1e3, B / ts, active, bytes / 1e9, floor_s * 1e3,
                   100 * floor_s / ts);
            if (g_pick) { /* the step and its picks: on the GPU, or logits down + sample_pick */
                sample_params sp;
                sample_params_default(&sp);
                sp.temperature = 0.7f;
                sp.top_p = 0.9f;
                std::vector<backend_pick> picks(B);
                std::vector<backend_pick_out> pout(B);
                std::vector<char> scratch(sample_scratch_bytes(m->vocab));
                std::vector<double> td, th;
                for (int i = 0; i < reps; i++) {
                    for (int r = 0; r < B; r++)
                        picks[r] = {&sp, 0x9e3779b97f4a7c15ull * (uint64_t)(i * B + r + 1), 0, 0};
                    sb.b.picks = picks.data();
                    sb.b.picks_out = pout.data();
                    sb.b.penalties = nullptr;
                    sb.b.n_penalties = 0;
                    CK(cudaDeviceSynchronize());
                    double a = now_s();
                    OK(cu_forward(s, &sb.b, ERRP));
                    td.push_back(now_s() - a);
                    sb.b.picks = nullptr;
                    sb.b.picks_out = nullptr;
                    CK(cudaDeviceSynchronize());
                    a = now_s();
                    OK(cu_forward(s, &sb.b, ERRP));
                    for (int r = 0; r < B; r++) {
                        sample_result res;
                        lm_err e = {0, ""};
                        sample_pick_drawn(sb.b.logits + (size_t)r * m->vocab, m->vocab, &sp,
                                          picks[r].draw, scratch.data(), &res, &e);
                    }
                    th.push_back(now_s() - a);
                }
                printf("decode+pick %-13s batch %4d ctx %d (T 0.7, top_p 0.9): picked on the GPU "
                       "%7.3f ms/step | logits down + sample_pick %7.3f ms/step\n",
                       c->name, B, ctx, median(td) * 1e3, median(th) * 1e3);
            }
            if (B == 1) {
                char rep[512];
                if (cu_state_mega_report(s, rep, sizeof rep))
                    printf("mega phases ctx %d: %s\n", ctx, rep);
            }
            printf("  breakdown (events, no graph): %s\n", prof);
        }
    }
    if (prefill) {
        for (int T : {512, 2048, 8192}) {
            const int mb = T / bs + 1;
            make_batch(sb, 1, T, 0, mb, 1, m->vocab);
            OK(cu_forward(s, &sb.b, ERRP));
            cu_state_read_experts(s);
            std::vector<double> t;
            for (int i = 0; i < 5; i++) {
                CK(cudaDeviceSynchronize());
                double a = now_s();
                OK(cu_forward(s, &sb.b, ERRP));
                t.push_back(now_s() - a);
            }
            const double active = g_count_inline ? (double)cu_state_read_experts(s) / 5
                                                 : (double)count_step(s, &sb.b);
            const double ts = median(t);
            char prof[1024];
            OK(cu_state_profile(s, 1, ERRP));
            OK(cu_forward(s, &sb.b, ERRP));
            cu_state_profile_report(s, prof, sizeof prof);
            OK(cu_state_profile(s, 0, ERRP));
            /* matrix work: 2 flops per weight per token over the active weights,
             * attention 4 * T^2/2 * hd * nq per layer */
            const double aw = (double)m->n_layers * (((m->nq + 2 * m->nkv) * m->head_dim + m->nq * m->head_dim) * (double)m->hidden +
                                                     (double)c->top_k * 3 * c->moe_inter * m->hidden +
                                                     3.0 * c->shared_inter * m->hidden);
            const double fl = 2 * aw * T + (double)m->n_layers * 2.0 * T * T * m->head_dim * m->nq;
            printf("prefill %-18s %5d tokens: %8.2f ms (TTFT of the forward) %8.0f tok/s | %.1f TFLOP/s "
                   "of matrix work | routed experts %.0f\n",
                   c->name, T, ts * 1e3, T / ts, fl / ts / 1e12, active);
            printf("  breakdown: %s\n", prof);
        }
    }
    if (!given_s)
        cu_state_destroy(s);
    cu_synth_free(synth);
}

int main(int argc, char **argv)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, 0);
    printf("device: %s, %d SMs, %.0f MB L2, %.1f GB\n", p.name, p.multiProcessorCount,
           p.l2CacheSize / 1e6, p.totalGlobalMem / 1e9);
    bool ceil_ = false, kern = false, dec = false, pre = false, samp = false;
    int which = 3, path = 0;
    const char *dir = nullptr;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "ceil")) ceil_ = true;
        else if (!strcmp(argv[i], "kernels")) kern = true;
        else if (!strcmp(argv[i], "decode")) dec = true;
        else if (!strcmp(argv[i], "prefill")) pre = true;
        else if (!strcmp(argv[i], "sample")) samp = true;
        else if (!strcmp(argv[i], "--pick")) {
            g_pick = 1;
            setenv("LIGHTMOE_CUDA_SAMPLE", "1", 1); /* states that sample on the GPU */
        }
        else if (!strcmp(argv[i], "--path") && i + 1 < argc) path = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc) g_batch_only = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) {
            g_ctx.clear();
            for (char *t = strtok(argv[++i], ","); t; t = strtok(nullptr, ","))
                if (atoi(t) > 0) g_ctx.push_back(atoi(t));
            if (g_ctx.empty()) g_ctx.push_back(512);
        }
        else if (!strcmp(argv[i], "--portable")) g_portable = 1;
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) {
            ++i;
            which = !strcmp(argv[i], "qwen3") ? 1 : !strcmp(argv[i], "qwen15") ? 2 : 3;
        }
    }
    if (!ceil_ && !kern && !dec && !pre && !samp)
        ceil_ = kern = dec = pre = samp = true;
    bench_ceilings(); /* always: every figure is relative to this run's ceiling */
    (void)ceil_;
    if (samp)
        bench_sample();
    if (samp && !kern && !dec && !pre)
        return 0;
    if (dir) { /* a checkpoint (e.g. from `lightmoe synth`) through model_load + backend_cuda */
        double t0 = now_s();
        model *mm = nullptr;
        OK(model_load(dir, nullptr, &mm, ERRP));
        const double tl = now_s() - t0;
        backend_options bo;
        memset(&bo, 0, sizeof bo);
        bo.device = "cuda";
        bo.tp = 1;
        bo.max_tokens = 8192;
        backend *be = nullptr;
        t0 = now_s();
        OK(backend_cuda_create(mm, &bo, &be, ERRP));
        printf("checkpoint %s: model_load %.1f s, upload to the GPU %.1f s\n", dir, tl, now_s() - t0);
        cu_synth_config c = *(which == 2 ? &cu_synth_qwen15_moe_a27b : &cu_synth_qwen3_30b_a3b);
        c.name = dir;
        c.top_k = mm->cfg.top_k;
        c.moe_inter = mm->cfg.moe_intermediate;
        c.shared_inter = mm->cfg.shared_intermediate;
        bench_model(&c, dec || !pre, pre || !dec, path, backend_cuda_model(be), backend_cuda_state(be));
        backend_destroy(be);
        model_free(mm);
        return 0;
    }
    const cu_synth_config *cs[] = {&cu_synth_qwen3_30b_a3b, &cu_synth_qwen15_moe_a27b};
    for (int i = 0; i < 2; i++) {
        if (!(which & (1 << i)))
            continue;
        if (kern)
            bench_kernels(cs[i]);
        if (dec || pre)
            bench_model(cs[i], dec, pre, path);
    }
    return 0;
}
