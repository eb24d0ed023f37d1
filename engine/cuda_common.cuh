/*
 * cuda_common.cuh: helpers shared by the CUDA kernels of the engine.
 *
 * Error checking for launchers (they return negative errno + lm_err text,
 * never exit), fp16 conversions, and the few inline-PTX wrappers the
 * portable (sm_80+) path uses: mma.sync m16n8k16 with fp32 accumulators and
 * cp.async 16-byte copies into shared memory. Nothing here is Hopper-only,
 * so every kernel built on it runs on sm_80/86/89/90a alike.
 *
 * Threads: device code only, plus host-side macros for launchers.
 */
#ifndef LIGHTMOE_CUDA_COMMON_CUH
#define LIGHTMOE_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "engine/err.h"

/* Turn a CUDA error into a negative errno with a message naming where. */
static inline int cuda_err(lm_err *err, cudaError_t e, const char *what)
{
    if (e == cudaSuccess) return 0;
    int code = (e == cudaErrorMemoryAllocation) ? -ENOMEM : -EIO;
    return lm_err_set(err, code, "cuda: %s: %s", what, cudaGetErrorString(e));
}

/* Check the last launch (configuration errors surface here at once;
 * faults inside the kernel surface at the next synchronisation). */
#define CUDA_LAUNCH_CHECK(err, what)                                                               \
    do {                                                                                           \
        cudaError_t e_ = cudaGetLastError();                                                       \
        if (e_ != cudaSuccess) return cuda_err((err), e_, (what));                                 \
    } while (0)

#define CUDA_TRY(err, call)                                                                        \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return cuda_err((err), e_, #call);                                  \
    } while (0)

static inline int cuda_div_up(int a, int b)
{
    return (a + b - 1) / b;
}

/* Programmatic dependent launch (Hopper, sm_90+): a kernel launched with
 * cu_launch may start while the kernel before it in the stream is still
 * running; it must call cu_pdl_wait() before it reads anything an earlier
 * kernel wrote or writes anything an earlier kernel reads (every block,
 * also blocks that exit early, so that completion stays transitive). What
 * it may do before: read weights, compute addresses. Each such kernel calls
 * cu_pdl_trigger() at its start so that the next one can launch at once.
 * On where the device has sm_90+, for steps of at most cu_pdl_max_tokens()
 * tokens (LIGHTMOE_CUDA_PDL=N sets N, default 4; =0 turns it off), never
 * for a portable state; off, cu_launch is a plain launch and the device
 * calls are no-ops. Defined in cuda_launch.cu. */
#ifdef __cplusplus
extern "C" {
#endif
int cu_pdl_enabled(void);
void cu_pdl_allow(int on); /* for launches from the calling thread */
int cu_pdl_max_tokens(void);
/* Loads issued before cu_pdl_wait() of what the previous kernel cannot be
 * writing: the router's weights, the KV cache positions of a fused decode
 * step before its new one (patched from registers), a grouped product's
 * work list when it was written two launches earlier (and the weights it
 * names). 1 unless LIGHTMOE_CUDA_EARLY=0; cu_set_early_loads (tests,
 * measurements) returns the setting it replaces. */
int cu_early_loads(void);
int cu_set_early_loads(int on);
/* A measurement switch: 1 unless the environment variable name starts
 * with '0', read once into *slot (-1 = not read yet; relaxed atomics);
 * _set replaces it (tests) and returns the setting it replaces. */
int cu_env_switch(int *slot, const char *name);
int cu_env_switch_set(int *slot, const char *name, int on);
/* The same, off unless the variable starts with '1'. */
int cu_env_switch_off(int *slot, const char *name);
int cu_env_switch_off_set(int *slot, const char *name, int on);
/* The kernel timeline (see CU_TRACE_KERNEL; builds with
 * -DLIGHTMOE_CUDA_TRACE=ON, else both return -ENOTSUP). cu_trace_begin
 * clears the buffer and starts recording; cu_trace_end waits for the
 * device, stops recording and returns the recorded blocks in *recs
 * (malloc'd, the caller frees; *n of them). */
#define CU_TRACE_LAUNCHES 4096
#define CU_TRACE_BLOCKS 1024
#define CU_TRACE_MARKS 4
typedef struct cu_trace_rec {
    unsigned long long grid, t0, tw, t1; /* ns; tw 0: no wait */
    unsigned file, line, block, smid;    /* file: FNV-1a of the source's base name */
    unsigned mark[CU_TRACE_MARKS];       /* ns after t0 of cu_trace_mark(i), 0: not reached */
} cu_trace_rec;
int cu_trace_begin(lm_err *err);
int cu_trace_end(cu_trace_rec **recs, size_t *n, lm_err *err);
#ifdef __cplusplus
}
#endif

#ifdef __CUDACC__
#include <utility>
template <typename... KArgs, typename... Args>
static inline cudaError_t cu_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t st, Args &&...args)
{
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cfg.attrs = at;
    cfg.numAttrs = cu_pdl_enabled() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}
/* CU_LAUNCH(err, "what", kernel, grid, block, smem, stream, args...) */
#define CU_LAUNCH(err, what, ...)                                                                  \
    do {                                                                                           \
        cudaError_t e_ = cu_launch(__VA_ARGS__);                                                   \
        if (e_ != cudaSuccess) return cuda_err((err), e_, (what));                                 \
    } while (0)
#endif

#ifdef __CUDACC__

/* A timeline of the kernels (measurement builds only: cmake
 * -DLIGHTMOE_CUDA_TRACE=ON; cu_trace_begin / cu_trace_end). Thread 0 of
 * every block of a kernel that starts with CU_TRACE_KERNEL() records the
 * global timer when the block starts, when its first cu_pdl_wait()
 * returns and when it exits, with the launch's %gridid, the block and the
 * SM, into slot (gridid mod CU_TRACE_LAUNCHES, block) of a device buffer
 * (blocks past CU_TRACE_BLOCKS are not recorded). Each translation unit
 * has its own copy of the buffer's address (no relocatable device code),
 * set through the list cu_trace_register keeps. In other builds the macro
 * is empty and the functions refuse. */
#ifdef LIGHTMOE_CUDA_TRACE
extern "C" void cu_trace_register(void (*set)(cu_trace_rec *buf));
static __device__ cu_trace_rec *g_cu_trace;
namespace
{
struct cu_trace_reg {
    cu_trace_reg()
    {
        cu_trace_register(
            [](cu_trace_rec *p) { (void)cudaMemcpyToSymbol(g_cu_trace, &p, sizeof p); });
    }
};
static cu_trace_reg cu_trace_reg_here;
} // namespace
__host__ __device__ constexpr const char *cu_trace_base(const char *s, const char *b)
{
    return *s ? cu_trace_base(s + 1, *s == '/' ? s + 1 : b) : b;
}
__host__ __device__ constexpr unsigned cu_trace_fnv(const char *s, unsigned h = 2166136261u)
{
    return *s ? cu_trace_fnv(s + 1, (h ^ (unsigned char)*s) * 16777619u) : h;
}
__device__ __forceinline__ unsigned long long cu_trace_now()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned long long &cu_trace_tw()
{
    __shared__ unsigned long long tw;
    return tw;
}
__device__ __forceinline__ bool cu_trace_thread0()
{
    return (threadIdx.x | threadIdx.y | threadIdx.z) == 0;
}
__device__ __forceinline__ unsigned long long *cu_trace_marks()
{
    __shared__ unsigned long long mk[CU_TRACE_MARKS];
    return mk;
}
/* thread 0 of the block: the time of point i (< CU_TRACE_MARKS) of a kernel */
__device__ __forceinline__ void cu_trace_mark(int i)
{
    if (cu_trace_thread0()) cu_trace_marks()[i] = cu_trace_now();
}
struct cu_trace_scope {
    unsigned long long t0;
    unsigned file, line;
    __device__ cu_trace_scope(unsigned f, unsigned l) : file(f), line(l)
    {
        t0 = cu_trace_now();
        if (cu_trace_thread0()) {
            cu_trace_tw() = 0;
            for (int i = 0; i < CU_TRACE_MARKS; i++)
                cu_trace_marks()[i] = 0;
        }
    }
    __device__ ~cu_trace_scope()
    {
        cu_trace_rec *buf = g_cu_trace;
        const unsigned blk = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        if (!cu_trace_thread0() || !buf || blk >= CU_TRACE_BLOCKS) return;
        unsigned long long g;
        unsigned sm;
        asm volatile("mov.u64 %0, %%gridid;" : "=l"(g));
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        cu_trace_rec r = {g, t0, cu_trace_tw(), cu_trace_now(), file, line, blk, sm, {}};
        for (int i = 0; i < CU_TRACE_MARKS; i++)
            r.mark[i] = cu_trace_marks()[i] ? (unsigned)(cu_trace_marks()[i] - t0) : 0;
        buf[(g % CU_TRACE_LAUNCHES) * CU_TRACE_BLOCKS + blk] = r;
    }
};
#define CU_TRACE_KERNEL()                                                                          \
    constexpr unsigned cu_trace_file_ = cu_trace_fnv(cu_trace_base(__FILE__, __FILE__));          \
    cu_trace_scope cu_trace_scope_(cu_trace_file_, __LINE__)
#else
#define CU_TRACE_KERNEL() ((void)0)
__device__ __forceinline__ void cu_trace_mark(int) {}
#endif

__device__ __forceinline__ void cu_pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
#ifdef LIGHTMOE_CUDA_TRACE
    if (cu_trace_thread0() && !cu_trace_tw()) cu_trace_tw() = cu_trace_now();
#endif
}
__device__ __forceinline__ void cu_pdl_trigger()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float cu_silu(float x)
{
    return x / (1.0f + __expf(-x));
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
/* The sum of v over the whole block, returned to every thread. s_part: 32
 * floats of shared memory owned by the caller; blockDim.x a multiple of 32.
 * Ends with a barrier, so s_part may be reused after the next barrier. */
__device__ __forceinline__ float block_sum(float v, float *s_part)
{
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) s_part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float w = threadIdx.x < blockDim.x / 32 ? s_part[threadIdx.x] : 0.f;
        w = warp_sum(w);
        if (threadIdx.x == 0) s_part[0] = w;
    }
    __syncthreads();
    return s_part[0];
}
__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* (w & M) | 0x64006400 (1024's exponent in both halves) in one instruction;
 * the compiler makes two of it (an and and an or, one immediate each).
 * int4_dequant8 keeps its two: the kernels using it were measured so. */
template <uint32_t M> __device__ __forceinline__ uint32_t int4_and_1024(uint32_t w)
{
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(w), "n"(M), "r"(0x64006400u));
    return r;
}

/* Four pairs of fp16 values from 8 packed nibbles w (k0 in bits 0..3, k1
 * in 4..7, ...): pair i holds (k_i, k_{i+4}) as (q - zero) * scale. The
 * 0x6400 trick makes 1024 + q exactly in fp16; subtracting 1024 + zero
 * (exact) gives q - zero exactly, then one rounding for the scale. */
__device__ __forceinline__ void int4_dequant8(uint32_t w, half2 zz, half2 ss, half2 out[4])
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        uint32_t t = ((w >> (4 * i)) & 0x000F000Fu) | 0x64006400u;
        half2 h = *reinterpret_cast<half2 *>(&t);
        out[i] = __hmul2(__hsub2(h, zz), ss);
    }
}

/* int4_dequant8's pairs without the scale, as (q - zero) / 64: exact in
 * fp16 (|q - zero| <= 16, zeros being 0..16; four products of at most
 * 16/64 x 65504 sum to at most 65504: no fp16 input overflows int4_dot8's
 * chain), in fewer instructions than int4_dequant8 (one
 * shift, four and-ors, four fmas). The low nibble of each byte is made
 * 1024 + q and scaled by 1/64, the high nibble 1024 + 16 q scaled by
 * 1/1024 (powers of two: exact); the fma takes 16 + zero/64, respectively
 * 1 + zero/64 from it, exactly (int4_zoff). */
__device__ __forceinline__ void int4_unpack8(uint32_t w, half2 zlo, half2 zhi, half2 out[4])
{
    const half2 lo = __float2half2_rn(1.f / 64), hi = __float2half2_rn(1.f / 1024);
    uint32_t t[4];
    t[0] = int4_and_1024<0x000F000Fu>(w); /* k0, k4: 1024 + q */
    t[1] = int4_and_1024<0x00F000F0u>(w); /* k1, k5: 1024 + 16 q */
    w >>= 8;
    t[2] = int4_and_1024<0x000F000Fu>(w); /* k2, k6 */
    t[3] = int4_and_1024<0x00F000F0u>(w); /* k3, k7 */
    out[0] = __hfma2(*reinterpret_cast<half2 *>(&t[0]), lo, zlo);
    out[1] = __hfma2(*reinterpret_cast<half2 *>(&t[1]), hi, zhi);
    out[2] = __hfma2(*reinterpret_cast<half2 *>(&t[2]), lo, zlo);
    out[3] = __hfma2(*reinterpret_cast<half2 *>(&t[3]), hi, zhi);
}

/* 1024 + zero in both halves, for int4_dequant8 and int4_zoff. */
__device__ __forceinline__ half2 int4_zero2(int z)
{
    return __half2half2(__int2half_rn(1024 + z));
}

/* int4_unpack8's offsets from int4_zero2's 1024 + zero (exact):
 * zlo = -(16 + zero/64), zhi = -(1 + zero/64). */
__device__ __forceinline__ void int4_zoff(half2 z1024, half2 *zlo, half2 *zhi)
{
    const half2 m = __float2half2_rn(-1.f / 64);
    *zlo = __hmul2(z1024, m);
    *zhi = __hfma2(z1024, m, __float2half2_rn(15.f));
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel)
{
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

/* Eight consecutive fp16 inputs x (x0..x7 in one 16-byte load) as the
 * pairs int4_dequant8 makes of the weights: (x0, x4), (x1, x5), (x2, x6),
 * (x3, x7). */
__device__ __forceinline__ void int4_xpairs(uint4 x, uint32_t xp[4])
{
    xp[0] = prmt(x.x, x.z, 0x5410);
    xp[1] = prmt(x.x, x.z, 0x7632);
    xp[2] = prmt(x.y, x.w, 0x5410);
    xp[3] = prmt(x.y, x.w, 0x7632);
}

/* The 8 products of int4_dequant8's pairs wd with int4_xpairs' xp: summed
 * in fp16 (pairs), then the two halves in fp32. */
__device__ __forceinline__ float int4_dot8(const half2 wd[4], const uint32_t xp[4])
{
    half2 h = __hmul2(wd[0], *reinterpret_cast<const half2 *>(&xp[0]));
#pragma unroll
    for (int i = 1; i < 4; i++)
        h = __hfma2(wd[i], *reinterpret_cast<const half2 *>(&xp[i]), h);
    const float2 f = __half22float2(h);
    return f.x + f.y;
}

/* D = A B + D, m16n8k16, fp16 inputs, fp32 accumulators. */
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* 16-byte global -> shared copy; when !pred the destination is zero-filled
 * and nothing is read (src must still be a valid address). */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool pred)
{
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int sz = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(sz));
}
__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}
/* The "memory" clobber keeps the compiler from moving shared-memory reads
 * of the copied data above the wait (a block barrier usually follows it,
 * but a lane reading back only its own copies needs none). */
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Four 8x8 fp16 matrices from shared memory (ldmatrix .x4): lane i gives
 * the address of row i % 8 of matrix i / 8 (16 bytes, 16-byte aligned);
 * r[m] is lane's (row lane / 4, columns 2 (lane % 4), +1) of matrix m, or
 * of its transpose (_t). */
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void *smem)
{
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void *smem)
{
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

#endif /* __CUDACC__ */
#endif
