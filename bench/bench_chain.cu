/*
 * bench_chain: what one dependent launch costs on this GPU, apart from any
 * work: the floor under a decode step that is a chain of kernels (docs/
 * PERF.md, round 20). Needs no model; built with the engine for its launcher.
 *
 * Each case is a CUDA graph of N launches (default 336: 48 layers x 7, a
 * qwen3-30b-a3b step's chain at batch 1), replayed R times; the figure is
 * the median replay's time / N. The kernels do nothing but the pattern
 * named, so what is left is the chain itself:
 *   empty      1 block, griddepcontrol.wait then launch_dependents
 *   dep1       1 block: after the wait, read what the previous launch wrote,
 *              write the next value (one dependent L2 round trip a launch)
 *   depW       B blocks of 128 threads, each reads the previous launch's
 *              value after the wait; block 0 writes the next one
 *   streamW    depW, and every launch also reads MB megabytes of weights
 *              (16-byte loads issued before the wait, summed after it;
 *              fresh addresses each launch, a buffer far larger than L2)
 * each with programmatic dependent launch (pdl) and without (plain). Then a
 * single persistent kernel of B blocks that crosses N grid barriers
 * (an arrival counter, acquire loads while spinning): the cost of the
 * barrier that would replace a launch boundary.
 *
 * For dep1/depW/streamW with pdl, one more replay records %globaltimer in
 * every block (start, wait returned, dependent value back, end), and the
 * bench prints medians over launches: the gap from the previous launch's
 * last block end to this launch's first release, and the time from a
 * block's release to its dependent value.
 *
 * Launches go through the engine's cu_launch (engine/cuda_common.cuh).
 *
 * Usage: bench_chain [--n N] [--reps R] [--blocks B] [--mb MB]
 */
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "engine/cuda_common.cuh"

#define CK(x)                                                                                      \
    do {                                                                                           \
        cudaError_t e_ = (x);                                                                      \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "bench_chain: %s: %s (line %d)\n", #x, cudaGetErrorString(e_),         \
                    __LINE__);                                                                     \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

__device__ __forceinline__ void pdl_wait()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
__device__ __forceinline__ unsigned long long gtime()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

/* per block of a recorded launch: start, wait returned, value back, end */
struct rec {
    unsigned long long t0, tw, tv, t1;
};

__global__ void k_empty()
{
    pdl_wait();
    pdl_trigger();
}

/* launch i reads val[i] (written by launch i-1, or the host) and writes
 * val[i+1]; rec != null: record */
__global__ void k_dep(int *val, int i, rec *rc)
{
    unsigned long long t0 = 0, tw = 0, tv = 0;
    if (rc && threadIdx.x == 0) t0 = gtime();
    pdl_wait();
    pdl_trigger();
    if (threadIdx.x == 0) {
        if (rc) tw = gtime();
        const int v = *(volatile int *)(val + i);
        if (rc) tv = gtime();
        if (blockIdx.x == 0) val[i + 1] = v + 1;
        if (rc) rc[(size_t)i * gridDim.x + blockIdx.x] = {t0, tw, tv, gtime()};
    }
}

/* k_dep, and the launch's share of the weights: L 16-byte loads a thread
 * issued before the wait, summed after it (the sum is kept live) */
template <int L>
__global__ void __launch_bounds__(128) k_stream(int *val, int i, const uint4 *w, size_t off,
                                                rec *rc, unsigned *sink)
{
    unsigned long long t0 = 0, tw = 0, tv = 0;
    if (rc && threadIdx.x == 0) t0 = gtime();
    uint4 r[L];
    const uint4 *p = w + off + (size_t)blockIdx.x * 128 * L + threadIdx.x;
#pragma unroll
    for (int u = 0; u < L; u++)
        r[u] = __ldg(p + 128 * u);
    pdl_wait();
    pdl_trigger();
    __shared__ int s_v;
    if (threadIdx.x == 0) {
        if (rc) tw = gtime();
        s_v = *(volatile int *)(val + i);
        if (rc) tv = gtime();
    }
    __syncthreads();
    unsigned acc = (unsigned)s_v;
#pragma unroll
    for (int u = 0; u < L; u++)
        acc ^= r[u].x + r[u].y + r[u].z + r[u].w;
    if (acc == 0x9e3779b9u) *sink = acc; /* practically never: keeps the loads */
    if (threadIdx.x == 0) {
        if (blockIdx.x == 0) val[i + 1] = s_v + 1;
        if (rc) rc[(size_t)i * gridDim.x + blockIdx.x] = {t0, tw, tv, gtime()};
    }
}

/* one persistent kernel: n grid barriers. Each block's thread 0 adds its
 * arrival and spins (acquire loads) until all B arrived for this round;
 * after each barrier it reads the value block (round mod B) wrote before
 * it, so the barrier carries data as a launch boundary would. */
__global__ void k_barriers(unsigned *count, int *val, int n)
{
    const unsigned B = gridDim.x;
    for (int r = 0; r < n; r++) {
        if (threadIdx.x == 0) {
            if ((int)blockIdx.x == r % (int)B) val[r & 1023] = r;
            __threadfence();
            atomicAdd(count, 1u);
            const unsigned target = (unsigned)(r + 1) * B;
            unsigned c;
            do {
                asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(c) : "l"(count));
            } while (c < target);
            if (*(volatile int *)(val + (r & 1023)) != r) val[1024] = r; /* never, if ordered */
        }
        __syncthreads();
    }
}

/* the engine's launcher (cu_launch), with programmatic dependent launch
 * on or off for this thread's launches */
template <typename... K, typename... A>
static cudaError_t launch(bool pdl, void (*k)(K...), dim3 g, dim3 b, cudaStream_t st, A... args)
{
    cu_pdl_allow(pdl);
    return cu_launch(k, g, b, 0, st, args...);
}

enum kind { EMPTY, DEP1, DEPW, STREAMW };
static const char *kname[] = {"empty", "dep1", "depW", "streamW"};

struct ctx {
    int n, reps, blocks;
    double mb;
    int *val;
    uint4 *w;
    size_t wwords, per; /* 16-byte words of the buffer, of a launch */
    unsigned *sink;
    cudaStream_t st;
};
constexpr int SL = 8; /* k_stream's loads a thread */

static void enqueue(const ctx &c, kind k, bool pdl, rec *rc, size_t rot)
{
    for (int i = 0; i < c.n; i++) {
        switch (k) {
        case EMPTY: CK(launch(pdl, k_empty, 1, 32, c.st)); break;
        case DEP1: CK(launch(pdl, k_dep, 1, 32, c.st, c.val, i, rc)); break;
        case DEPW: CK(launch(pdl, k_dep, c.blocks, 128, c.st, c.val, i, rc)); break;
        case STREAMW: {
            const size_t off = ((rot + (size_t)i) * c.per) % (c.wwords - c.per);
            CK(launch(pdl, k_stream<SL>, c.blocks, 128, c.st, c.val, i, (const uint4 *)c.w, off,
                      rc, c.sink));
            break;
        }
        }
    }
}

static double median(std::vector<double> v)
{
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/* us a launch: median over reps of a graph of n launches */
static double time_graph(const ctx &c, kind k, bool pdl)
{
    /* streamW rotates its weights across replays: four graphs, each its own
     * range of the buffer, used in turn */
    const int NG = k == STREAMW ? 4 : 1;
    cudaGraphExec_t ex[4];
    for (int g = 0; g < NG; g++) {
        cudaGraph_t gr;
        CK(cudaStreamBeginCapture(c.st, cudaStreamCaptureModeThreadLocal));
        enqueue(c, k, pdl, nullptr, (size_t)g * c.n);
        CK(cudaStreamEndCapture(c.st, &gr));
        CK(cudaGraphInstantiate(&ex[g], gr, 0));
        CK(cudaGraphDestroy(gr));
    }
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int r = 0; r < 3; r++)
        CK(cudaGraphLaunch(ex[r % NG], c.st));
    std::vector<double> t;
    for (int r = 0; r < c.reps; r++) {
        CK(cudaEventRecord(a, c.st));
        CK(cudaGraphLaunch(ex[r % NG], c.st));
        CK(cudaEventRecord(b, c.st));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms * 1000.0 / c.n);
    }
    for (int g = 0; g < NG; g++)
        CK(cudaGraphExecDestroy(ex[g]));
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return median(t);
}

/* one recorded replay (pdl): medians over launches 1..n-1 */
static void record(const ctx &c, kind k)
{
    const int B = k == DEP1 ? 1 : c.blocks;
    rec *rc;
    CK(cudaMalloc(&rc, (size_t)c.n * B * sizeof(rec)));
    CK(cudaMemset(rc, 0, (size_t)c.n * B * sizeof(rec)));
    cudaGraph_t gr;
    cudaGraphExec_t ex;
    CK(cudaStreamBeginCapture(c.st, cudaStreamCaptureModeThreadLocal));
    enqueue(c, k, true, rc, 7 * (size_t)c.n);
    CK(cudaStreamEndCapture(c.st, &gr));
    CK(cudaGraphInstantiate(&ex, gr, 0));
    CK(cudaGraphLaunch(ex, c.st));
    CK(cudaStreamSynchronize(c.st));
    std::vector<rec> h((size_t)c.n * B);
    CK(cudaMemcpy(h.data(), rc, h.size() * sizeof(rec), cudaMemcpyDeviceToHost));
    std::vector<double> gap, after, e2e, early;
    for (int i = 1; i < c.n; i++) {
        unsigned long long pend = 0, rel = ~0ull, end = 0, st0 = ~0ull;
        for (int b = 0; b < B; b++) {
            pend = std::max(pend, h[(size_t)(i - 1) * B + b].t1);
            const rec &r = h[(size_t)i * B + b];
            rel = std::min(rel, r.tw);
            end = std::max(end, r.t1);
            st0 = std::min(st0, r.t0);
            after.push_back((double)(r.tv - r.tw) / 1000.0);
        }
        gap.push_back(((double)rel - (double)pend) / 1000.0);
        e2e.push_back(((double)end - (double)pend) / 1000.0);
        early.push_back(((double)rel - (double)st0) / 1000.0);
    }
    printf("  %-8s pdl, recorded: gap (previous end -> first release) %.2f us, release -> "
           "dependent value back %.2f us (median block), started before the release %.2f us, "
           "end to end %.2f us a launch\n",
           kname[k], median(gap), median(after), median(early), median(e2e));
    CK(cudaGraphExecDestroy(ex));
    CK(cudaGraphDestroy(gr));
    CK(cudaFree(rc));
}

int main(int argc, char **argv)
{
    ctx c = {};
    c.n = 336;
    c.reps = 50;
    c.blocks = 132;
    c.mb = 6.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--n") && i + 1 < argc) c.n = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) c.reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--blocks") && i + 1 < argc) c.blocks = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--mb") && i + 1 < argc) c.mb = atof(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_chain [--n N] [--reps R] [--blocks B] [--mb MB]\n");
            return 2;
        }
    }
    if (c.n < 2 || c.n > 100000 || c.reps < 1 || c.blocks < 1 || c.blocks > 4096 || c.mb <= 0) {
        fprintf(stderr, "bench_chain: --n 2..100000, --reps >= 1, --blocks 1..4096, --mb > 0\n");
        return 2;
    }
    int dev = 0, n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    cudaDeviceProp pr;
    CK(cudaGetDeviceProperties(&pr, dev));
    printf("device %s, %d SMs, L2 %d MB; chain of %d launches, %d replays, %d blocks, %.1f MB a "
           "streamW launch\n",
           pr.name, pr.multiProcessorCount, pr.l2CacheSize >> 20, c.n, c.reps, c.blocks, c.mb);
    cu_pdl_allow(1);
    if (!cu_pdl_enabled())
        printf("programmatic dependent launch is off here (sm < 90 or LIGHTMOE_CUDA_PDL=0): "
               "the pdl columns are plain launches\n");
    CK(cudaStreamCreateWithFlags(&c.st, cudaStreamNonBlocking));
    CK(cudaMalloc(&c.val, (size_t)(c.n + 2) * sizeof(int) + 8192));
    CK(cudaMemset(c.val, 0, (size_t)(c.n + 2) * sizeof(int) + 8192));
    CK(cudaMalloc(&c.sink, 4));
    /* streamW: a launch reads blocks * 128 threads * SL words; the blocks
     * follow from the megabytes */
    const size_t words = (size_t)(c.mb * 1048576.0 / 16.0);
    const int sblocks = (int)std::max<size_t>(1, words / (128 * SL));
    c.per = (size_t)sblocks * 128 * SL;
    c.wwords = (size_t)2 << 30 >> 4; /* 2 GiB */
    CK(cudaMalloc(&c.w, c.wwords * 16));
    CK(cudaMemset(c.w, 1, c.wwords * 16));
    for (int k = EMPTY; k <= STREAMW; k++) {
        ctx cc = c;
        if (k == STREAMW) cc.blocks = sblocks;
        const double tp = time_graph(cc, (kind)k, true), tn = time_graph(cc, (kind)k, false);
        printf("%-8s blocks %4d: %.2f us a launch with pdl, %.2f without", kname[k],
               k == EMPTY || k == DEP1 ? 1 : cc.blocks, tp, tn);
        if (k == STREAMW)
            printf(" (%.2f MB: %.0f GB/s with pdl)", cc.per * 16 / 1e6, cc.per * 16 / (tp * 1e3));
        printf("\n");
        if (k != EMPTY) record(cc, (kind)k);
    }
    /* the persistent kernel's barriers */
    unsigned *cnt;
    CK(cudaMalloc(&cnt, 4));
    CK(cudaMemset(c.val + 1024, 0, 4)); /* the order flag (the chains above may have written it) */
    int bmax = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bmax, k_barriers, 128, 0));
    for (int B : {pr.multiProcessorCount, 2 * pr.multiProcessorCount}) {
        if (B > bmax * pr.multiProcessorCount) continue;
        std::vector<double> t;
        cudaEvent_t a, b;
        CK(cudaEventCreate(&a));
        CK(cudaEventCreate(&b));
        for (int r = 0; r < c.reps / 5 + 3; r++) {
            CK(cudaMemsetAsync(cnt, 0, 4, c.st));
            CK(cudaEventRecord(a, c.st));
            k_barriers<<<B, 128, 0, c.st>>>(cnt, c.val, c.n);
            CK(cudaGetLastError());
            CK(cudaEventRecord(b, c.st));
            CK(cudaEventSynchronize(b));
            float ms;
            CK(cudaEventElapsedTime(&ms, a, b));
            if (r >= 3) t.push_back(ms * 1000.0 / c.n);
        }
        int bad = 0;
        CK(cudaMemcpy(&bad, c.val + 1024, 4, cudaMemcpyDeviceToHost));
        printf("barrier  blocks %4d: %.2f us a grid barrier (one persistent kernel, %d barriers)%s\n",
               B, median(t), c.n, bad ? " ORDER VIOLATION SEEN" : "");
        CK(cudaEventDestroy(a));
        CK(cudaEventDestroy(b));
    }
    CK(cudaFree(cnt));
    CK(cudaFree(c.w));
    CK(cudaFree(c.val));
    CK(cudaFree(c.sink));
    CK(cudaStreamDestroy(c.st));
    return 0;
}
