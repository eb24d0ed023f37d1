/*
 * cuda_mega.cu: the one-token decode step as one persistent kernel (see
 * cuda_mega.cuh).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cuda_common.cuh"
#include "engine/cuda_mega.cuh"
#include "engine/cuda_moe.cuh"
#include "engine/cuda_rope.cuh"

namespace
{

constexpr int NT = 512;     /* threads a block */
constexpr int NWARP = NT / 32;
constexpr int CB = 4;       /* 16-byte weight loads a lane issues at once */
constexpr int PF = 16384;   /* bytes an L2 prefetch instruction at most */
constexpr int NPH = 5;      /* phase descriptors: QKV, O, shared gate/up, GU, DOWN */
constexpr int MAXSEG = 12;  /* pieces of one phase's matrix (k experts + shared) */
constexpr int SB = 4;       /* attention: 32-position steps a batch of K/V tiles */
constexpr int KP = 2;       /* halves of padding a K tile row (conflict-free columns) */

/* One piece of a phase's matrix: rows [first, first + count) of the phase
 * (row pieces: gate/up of each expert, the dense products), or a whole
 * matrix whose products are summed with the other pieces' (chunk pieces:
 * the down products, one per expert; first and count unused). */
struct Seg {
    const uint8_t *qs;
    const __half *sc;
    const uint8_t *zp;
    int32_t first, count; /* row pieces */
    int32_t kch;        /* 32-weight chunks a row of this matrix */
    int32_t G, gshift;  /* scale groups a row; log2(weights a group / 32) */
    int32_t in_off;     /* chunk pieces: where the piece's input starts */
    int32_t out_off;    /* row pieces (SiLU): where the piece's output starts */
    float scale;        /* chunk pieces: multiplier of the piece's sum */
};

/* This block's part of a piece: rows of the piece's matrix from q, sc, zp
 * on (phase_finish). */
struct Reg {
    const uint8_t *q;
    const __half *sc;
    const uint8_t *zp;
    int32_t rows, kch, G, gshift;
    int32_t in_off;     /* input of the row's chunk 0 */
    int32_t out0;       /* part[] of its first row */
    int32_t item0;      /* its first row among the block's items */
    float mul;
};

struct Phase {
    int32_t r0, r1;            /* this block's rows */
    int32_t TS, nreg, items;   /* lanes a row, regions, rows of all regions */
    Seg seg[MAXSEG];
    Reg reg[MAXSEG];
};

/* Loads as volatile asm: issued where they stand in the code (the weight
 * loads of the next phase before a barrier). This did not make the
 * product phases faster (docs/PERF.md, CUDA round 7): they are bound by
 * the instruction latency of slot_load and slot_dot. */
__device__ __forceinline__ uint4 ld_nc_v4(const void *p)
{
    uint4 r;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}
__device__ __forceinline__ float4 ld_nc_f4(const void *p)
{
    float4 r;
    asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w)
                 : "l"(p));
    return r;
}
__device__ __forceinline__ unsigned short ld_nc_u16(const void *p)
{
    unsigned short r;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ unsigned ld_nc_u8(const void *p)
{
    unsigned r;
    asm volatile("ld.global.nc.u8 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}
/* Through L2 (data other blocks or earlier launches wrote). */
__device__ __forceinline__ uint4 ld_cg_v4(const void *p)
{
    uint4 r;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

/* Shared memory, carved from the dynamic allocation (host and device). */
struct Layout {
    size_t lt, xs, xf, res, pt, rl, ids, wts, sg, red, ph, qh, qs, kn, vn, kt, vt, wp, flag, total;
};

__host__ __device__ inline size_t al16(size_t v)
{
    return (v + 15) & ~(size_t)15;
}

__host__ __device__ inline int rows_max(int N, int nb)
{
    return (N / 2 + nb - 1) / nb * 2;
}

__host__ __device__ inline Layout layout_of(const cu_mega_args &a, int nb)
{
    Layout l;
    const int G = a.nq / a.nkv;
    size_t kin = (size_t)a.H;
    if ((size_t)a.nq * a.hd > kin) kin = (size_t)a.nq * a.hd;
    if ((size_t)a.k * a.I + a.sI > kin) kin = (size_t)a.k * a.I + a.sI;
    int rmax = rows_max((a.nq + 2 * a.nkv) * a.hd, nb);
    const int Ns[] = {a.H, 2 * a.k * a.I, 2 * a.sI};
    for (int N : Ns)
        if (rows_max(N, nb) > rmax) rmax = rows_max(N, nb);
    size_t o = 0;
    l.lt = o;   o = al16(o + (size_t)a.n_layers * sizeof(cu_mega_layer));
    l.xs = o;   o = al16(o + kin * 2);
    l.xf = o;   o = al16(o + (size_t)a.H * 4);
    l.res = o;  o = al16(o + (size_t)rmax * 4);
    l.pt = o;   o = al16(o + (size_t)(rmax > MAXSEG * rows_max(a.H, nb) ? rmax : MAXSEG * rows_max(a.H, nb)) * 4);
    l.rl = o;   o = al16(o + (size_t)(a.E + 1) * 4);
    l.ids = o;  o = al16(o + 32 * 4);
    l.wts = o;  o = al16(o + 32 * 4);
    l.sg = o;   o = al16(o + 4);
    l.red = o;  o = al16(o + 32 * 4);
    l.ph = o;   o = al16(o + NPH * sizeof(Phase));
    l.qh = o;   o = al16(o + (size_t)(G + 2) * a.hd * 4);
    l.qs = o;   o = al16(o + (size_t)G * a.hd * 4);
    l.kn = o;   o = al16(o + (size_t)a.hd * 2);
    l.vn = o;   o = al16(o + (size_t)a.hd * 2);
    l.kt = o;   o = al16(o + (size_t)SB * 32 * (a.hd + KP) * 2);
    l.vt = o;   o = al16(o + (size_t)SB * 32 * a.hd * 2);
    l.wp = o;   o = al16(o + (size_t)NWARP * (a.hd + 2) * 4);
    l.flag = o; o = al16(o + 16);
    l.total = o;
    return l;
}

/* ---- the products ---------------------------------------------------------- */

/* Thread 0: rows of this block, its regions and the team size for a phase
 * whose pieces are set. A region is the block's part of one piece: whole
 * rows of the piece's matrix, so its weights, scales and zeros are each
 * one contiguous range of memory (one L2 prefetch each). Row pieces give
 * the block's rows that fall in the piece; chunk pieces give rows [r0, r1)
 * of every piece, whose results are summed (DOWN). */
__device__ void phase_finish(Phase &P, int N, int chseg, int nseg)
{
    const int units = N / 2, b = blockIdx.x, nb = gridDim.x;
    P.r0 = (int)((long long)units * b / nb) * 2;
    P.r1 = (int)((long long)units * (b + 1) / nb) * 2;
    int nreg = 0, items = 0, kmax = 1;
    for (int s = 0; s < nseg; s++) {
        const Seg &g = P.seg[s];
        int lo = P.r0, hi = P.r1;
        if (!chseg) {
            lo = max(lo, g.first);
            hi = min(hi, g.first + g.count);
        }
        if (lo >= hi)
            continue;
        const int lr = chseg ? lo : lo - g.first;
        Reg &R = P.reg[nreg];
        R.q = g.qs + (size_t)lr * g.kch * 16;
        R.sc = g.sc + (size_t)lr * g.G;
        R.zp = g.zp + (size_t)lr * g.G;
        R.rows = hi - lo;
        R.kch = g.kch;
        R.G = g.G;
        R.gshift = g.gshift;
        R.in_off = chseg ? g.in_off : 0;
        R.out0 = chseg ? nreg * (P.r1 - P.r0) : lo - P.r0;
        R.item0 = items;
        R.mul = chseg ? g.scale : 1.f;
        items += R.rows;
        if (g.kch > kmax && (s == 0 || !chseg)) kmax = g.kch;
        nreg++;
    }
    P.nreg = nreg;
    P.items = items;
    /* CB chunks a lane a row in one round where possible (the first
     * piece's width decides for chunk pieces: the shared expert's longer
     * rows take more rounds) */
    int ts = 1;
    while (ts < 32 && ts * CB < kmax) ts <<= 1;
    P.TS = ts;
}

__device__ __forceinline__ void set_seg(Seg &s, const cu_int4_weights &w, int e, int first,
                                        int count, int in_off, int out_off, float scale)
{
    const int G = w.k / w.group;
    s.qs = w.qs + (size_t)e * w.n * (w.k / 2);
    s.sc = w.scales + (size_t)e * w.n * G;
    s.zp = w.zeros + (size_t)e * w.n * G;
    s.first = first;
    s.count = count;
    s.kch = w.k / 32;
    s.G = G;
    s.gshift = __ffs(w.group / 32) - 1; /* group: 32 times a power of two */
    s.in_off = in_off;
    s.out_off = out_off;
    s.scale = scale;
}

/* Thread 0: a dense product (one piece of rows). */
__device__ void phase_dense(Phase &P, const cu_int4_weights &w, int out_off)
{
    set_seg(P.seg[0], w, 0, 0, w.n, 0, out_off, 1.f);
    phase_finish(P, w.n, 0, 1);
}

/* [p, p + n) into L2 (a hint: nothing waits for it), its start rounded
 * down to 16 bytes (still inside the tensor, whose start is aligned), its
 * end rounded down (never past it); pieces of at most PF bytes, spread
 * over the threads t0, t0 + step, ... */
__device__ __forceinline__ void prefetch_l2(const void *p, size_t n, int t0, int step)
{
    const uintptr_t a = (uintptr_t)p & ~(uintptr_t)15;
    const uintptr_t e = ((uintptr_t)p + n) & ~(uintptr_t)15;
    for (uintptr_t q = a + (uintptr_t)t0 * PF; q < e; q += (uintptr_t)step * PF) {
        const uint32_t sz = (uint32_t)(e - q < PF ? e - q : PF);
#if __CUDA_ARCH__ >= 900
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(q), "r"(sz) : "memory");
#else
        for (uint32_t o = 0; o < sz; o += 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(q + o));
#endif
    }
}

/* Every thread (after P is set and a __syncthreads): the block's weights,
 * scales and zeros of the phase into L2. Warp w takes region w % nreg,
 * part (w / nreg) % 3; its lanes split the range. */
__device__ void phase_prefetch(const Phase &P)
{
    const int w = threadIdx.x / 32, lane = threadIdx.x & 31;
    for (int i = w; i < 3 * P.nreg; i += NWARP) {
        const Reg &R = P.reg[i % P.nreg];
        const int part = i / P.nreg;
        if (part == 0)
            prefetch_l2(R.q, (size_t)R.rows * R.kch * 16, lane, 32);
        else if (part == 1)
            prefetch_l2(R.sc, (size_t)R.rows * R.G * 2, lane, 32);
        else
            prefetch_l2(R.zp, (size_t)R.rows * R.G, lane, 32);
    }
}

/* The chunk's 32 products, dequantised as (q - zero) * scale (the gemv
 * kernels scale once a word instead: not their bits). V2 (measurement):
 * x is stored pair-permuted ((x0, x4), (x1, x5), ... a group of 8: see
 * xs_perm) and the nibbles are unpacked with one shift a word (nibbles
 * 4 apart from the mask 0x00f0 as 16 (1024 + q), scaled back exactly). */
template <bool V2>
__device__ __forceinline__ float chunk_dot(uint4 w, unsigned short s, unsigned z, const __half *x)
{
    const half2 z2 = int4_zero2((int)z);
    const half2 s2 = __half2half2(__ushort_as_half(s));
    const uint4 *xv = reinterpret_cast<const uint4 *>(x);
    float acc = 0.f;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const uint32_t word = q == 0 ? w.x : q == 1 ? w.y : q == 2 ? w.z : w.w;
        half2 wd[4];
        const uint4 x8 = xv[q];
        uint32_t xp[4];
        if (V2) {
            const half2 z16 = __hsub2(z2, __float2half2_rn(960.f)); /* 64 + z */
            const half2 r16 = __float2half2_rn(0.0625f);
            const uint32_t w8 = word >> 8;
            uint32_t t0 = (word & 0x000F000Fu) | 0x64006400u, t1 = (word & 0x00F000F0u) | 0x64006400u;
            uint32_t t2 = (w8 & 0x000F000Fu) | 0x64006400u, t3 = (w8 & 0x00F000F0u) | 0x64006400u;
            wd[0] = __hmul2(__hsub2(*reinterpret_cast<half2 *>(&t0), z2), s2);
            wd[1] = __hmul2(__hfma2(*reinterpret_cast<half2 *>(&t1), r16, -z16), s2);
            wd[2] = __hmul2(__hsub2(*reinterpret_cast<half2 *>(&t2), z2), s2);
            wd[3] = __hmul2(__hfma2(*reinterpret_cast<half2 *>(&t3), r16, -z16), s2);
            xp[0] = x8.x;
            xp[1] = x8.y;
            xp[2] = x8.z;
            xp[3] = x8.w;
        } else {
            int4_dequant8(word, z2, s2, wd);
            int4_xpairs(x8, xp);
        }
        acc += int4_dot8(wd, xp);
    }
    return acc;
}

/* Where x[h] goes in V2's pair-permuted layout. */
__device__ __forceinline__ int xs_perm(int h)
{
    const int i = h & 7;
    return (h & ~7) | (i < 4 ? 2 * i : 2 * (i - 4) + 1);
}

/* Every thread: the phase's products, part[R.out0 + row] = R.mul dot(row)
 * for every row of every region. A team of TS lanes takes a row (items in
 * region order, team t the items t, t + teams, ...); each lane loads up
 * to CB of its chunks at once, then computes them. One copy of this code
 * serves every phase (not inlined: a small loop stays in the instruction
 * cache; the weights come from L2, where phase_prefetch put them). */
template <bool V2>
__device__ __noinline__ void gemv_phase(const Phase &P, const __half *xs, float *part)
{
    const int TS = P.TS, teams = NT / TS;
    const int team = (int)threadIdx.x / TS, tl = (int)threadIdx.x % TS;
    const int wfirst = ((int)threadIdx.x & ~31) / TS; /* the warp's first team */
    const int items = P.items;
    int g = 0;
    for (int base = wfirst; base < items; base += teams) { /* uniform over the warp */
        const int it = base + team - wfirst;
        float acc = 0.f;
        int row = 0;
        if (it < items) {
            while (it >= P.reg[g].item0 + P.reg[g].rows) g++;
            const Reg &R = P.reg[g];
            row = it - R.item0;
            const int kch = R.kch, gs = R.gshift;
            const uint8_t *q = R.q + (size_t)row * kch * 16;
            const __half *sc = R.sc + (size_t)row * R.G;
            const uint8_t *zp = R.zp + (size_t)row * R.G;
            const __half *x = xs + R.in_off;
            for (int c0 = tl; c0 < kch; c0 += CB * TS) {
                uint4 w[CB];
                unsigned short s[CB];
                unsigned z[CB];
#pragma unroll
                for (int u = 0; u < CB; u++) {
                    const int c = c0 + u * TS;
                    if (c < kch) {
                        w[u] = ld_nc_v4(q + (size_t)c * 16);
                        s[u] = ld_nc_u16(sc + (c >> gs));
                        z[u] = ld_nc_u8(zp + (c >> gs));
                    }
                }
#pragma unroll
                for (int u = 0; u < CB; u++) {
                    const int c = c0 + u * TS;
                    if (c < kch) acc += chunk_dot<V2>(w[u], s[u], z[u], x + c * 32);
                }
            }
        }
        for (int o = TS / 2; o > 0; o >>= 1)
            acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (tl == 0 && it < items) part[P.reg[g].out0 + row] = acc * P.reg[g].mul;
    }
}

/* After gemv_phase and a __syncthreads, chunk pieces: res[r] = the sum of
 * the regions' parts of row r (in region order: deterministic). */
__device__ void parts_sum(const Phase &P, const float *part, float *res)
{
    const int nr = P.r1 - P.r0;
    for (int r = threadIdx.x; r < nr; r += NT) {
        float v = 0.f;
        for (int g = 0; g < P.nreg; g++)
            v += part[g * nr + r];
        res[r] = v;
    }
}

/* After gemv_phase and a __syncthreads: out[out_off + j] = silu(gate) * up
 * for the block's row pairs (2j, 2j + 1) of each row piece. */
__device__ void silu_out(const Phase &P, const float *res, __half *out)
{
    for (int r = P.r0 + 2 * (int)threadIdx.x; r < P.r1; r += 2 * NT) {
        const Seg *g = P.seg;
        while (r >= g->first + g->count) g++;
        const float gt = res[r - P.r0], up = res[r - P.r0 + 1];
        out[g->out_off + (r - g->first) / 2] = __float2half(cu_silu(gt) * up);
    }
}

/* ---- grid barrier ------------------------------------------------------------ */

/* Every thread of every block; false if the barrier timed out or another
 * block reported so (then the kernel must end). */
__device__ bool grid_sync(const cu_mega_args &a, uint32_t &epoch, volatile int *flag)
{
    epoch += gridDim.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(a.bar, 1u);
        const long long t0 = clock64();
        int bad = 0;
        for (int spin = 0;; spin++) {
            uint32_t v;
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(a.bar) : "memory");
            if (v >= epoch) break;
            if ((spin & 63) == 63) {
                if (*(volatile int32_t *)a.fail) {
                    bad = 1;
                    break;
                }
                if (clock64() - t0 > a.timeout_cycles) {
                    atomicExch(a.fail, 1);
                    bad = 1;
                    break;
                }
            }
        }
        __threadfence();
        *flag = bad;
    }
    __syncthreads();
    return !*flag;
}

/* ---- norms -------------------------------------------------------------------- */

/* xs = half(nw * (v * inv)) (and xf = the same in fp32) for v = x (L2) or
 * the embedding row e (fp16); inv = 1 / rms(v). H <= 16 * NT. */
__device__ void norm_in(const float *x, const __half *e, const float *nw, float eps, int H,
                        __half *xs, float *xf, float *red, bool v2)
{
    float v[16];
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < 16; u++) {
        const int h = threadIdx.x + NT * u;
        v[u] = 0.f;
        if (h < H) v[u] = x ? __ldcg(x + h) : __half2float(e[h]);
        ss += v[u] * v[u];
    }
    const float inv = rsqrtf(block_sum(ss, red) / (float)H + eps);
#pragma unroll
    for (int u = 0; u < 16; u++) {
        const int h = threadIdx.x + NT * u;
        if (h < H) {
            const float f = nw[h] * (v[u] * inv);
            xs[v2 ? xs_perm(h) : h] = __float2half(f);
            if (xf) xf[h] = f;
        }
    }
}

/* dst[0..n) = src[0..n) (halves, n % 8 == 0) through L2. */
__device__ void copy_in(__half *dst, const __half *src, int n, bool v2)
{
    for (int i = threadIdx.x; i < n / 8; i += NT) {
        uint4 v = __ldcg(reinterpret_cast<const uint4 *>(src) + i);
        if (v2) {
            uint32_t xp[4];
            int4_xpairs(v, xp);
            v = make_uint4(xp[0], xp[1], xp[2], xp[3]);
        }
        reinterpret_cast<uint4 *>(dst)[i] = v;
    }
}

/* ---- attention ------------------------------------------------------------------ */

/* A unit: (KV head, run of 32-position steps of the context). S units a
 * KV head of `per` steps each; at most one unit a block. */
struct AttPlan {
    int NS, S, per, units;
};

__device__ __forceinline__ AttPlan att_plan(const cu_mega_args &a, int pos)
{
    AttPlan p;
    p.NS = (pos + 1 + 31) / 32;
    int Smax = (int)gridDim.x / a.nkv;
    if (Smax > a.max_units) Smax = a.max_units;
    if (Smax < 1) Smax = 1;
    int S = p.NS < Smax ? p.NS : Smax;
    p.per = (p.NS + S - 1) / S;
    p.S = (p.NS + p.per - 1) / p.per;
    p.units = a.nkv * p.S;
    return p;
}

/* K and V of a batch of up to SB steps, loaded by the whole block into
 * registers (NR 16-byte pieces a thread), then stored to shared memory. */
template <int HD> struct AttRegs {
    static constexpr int NR = SB * 32 * (HD / 8) * 2 / NT;
    uint4 r[NR];
};

/* Positions [p0, p1) of KV head kvh, except pos (the new one, not in the
 * cache yet): zeros there. Cache rows were written by earlier launches. */
template <int HD>
__device__ __forceinline__ void att_load(const cu_mega_args &a, const cu_mega_layer &L, int kvh,
                                         int p0, int p1, int pos, AttRegs<HD> &R)
{
    constexpr int PPR = HD / 8, PER_T = SB * 32 * PPR; /* pieces a row, a tensor */
    const int bs = a.block_size;
#pragma unroll
    for (int u = 0; u < AttRegs<HD>::NR; u++) {
        const int idx = threadIdx.x + NT * u, t = idx / PER_T, rem = idx % PER_T;
        const int p = p0 + rem / PPR, piece = rem % PPR;
        R.r[u] = make_uint4(0, 0, 0, 0);
        if (p < p1 && p < pos) {
            const int blk = a.block_table[p / bs];
            const size_t off = (((size_t)blk * bs + p % bs) * a.nkv + kvh) * HD + piece * 8;
            R.r[u] = ld_cg_v4((t ? L.vc : L.kc) + off);
        }
    }
}

/* Every thread, before the barrier that starts ATT: this block's unit's
 * K and V rows (earlier positions) into L2. */
template <int HD> __device__ void att_prefetch(const cu_mega_args &a, const cu_mega_layer &L, int pos)
{
    const AttPlan pl = att_plan(a, pos);
    if ((int)blockIdx.x >= pl.units) return;
    const int kvh = blockIdx.x / pl.S, st0 = (blockIdx.x % pl.S) * pl.per;
    const int p0 = st0 * 32, p1 = min(pos, min(pl.NS, st0 + pl.per) * 32);
    const int bs = a.block_size;
    for (int i = threadIdx.x; i < 2 * (p1 - p0); i += NT) {
        const int p = p0 + (i >> 1), blk = a.block_table[p / bs];
        const size_t off = (((size_t)blk * bs + p % bs) * a.nkv + kvh) * HD;
        prefetch_l2(((i & 1) ? L.vc : L.kc) + off, HD * 2, 0, 1);
    }
}

/* Row r of the tiles = position p0 + r; the new position's row is left to
 * the caller (it comes from shared memory). */
template <int HD>
__device__ __forceinline__ void att_store(const AttRegs<HD> &R, int p0, int pos, __half *kt,
                                          __half *vt)
{
    constexpr int PPR = HD / 8, PER_T = SB * 32 * PPR;
#pragma unroll
    for (int u = 0; u < AttRegs<HD>::NR; u++) {
        const int idx = threadIdx.x + NT * u, t = idx / PER_T, rem = idx % PER_T;
        const int r = rem / PPR, piece = rem % PPR;
        if (p0 + r == pos)
            continue;
        if (t) {
            *reinterpret_cast<uint4 *>(vt + (size_t)r * HD + piece * 8) = R.r[u];
        } else { /* K rows padded by KP halves: 4-byte stores */
            uint32_t *d = reinterpret_cast<uint32_t *>(kt + (size_t)r * (HD + KP) + piece * 8);
            d[0] = R.r[u].x;
            d[1] = R.r[u].y;
            d[2] = R.r[u].z;
            d[3] = R.r[u].w;
        }
    }
}

/* This block's attention unit, if it has one. R: the K/V of its first
 * batch, loaded before the barrier (att_load). Warp w takes query head
 * g = w % G and the steps w / G, + NWARP / G, ... of each batch: lane p
 * scores position p against K in shared memory, the warp keeps the
 * online softmax of its head, lane l owns output dims 2l + 64 jj (+1). */
template <int HD>
__device__ void attention(const cu_mega_args &a, const cu_mega_layer &L, const Layout &lo,
                          uint8_t *smem, int pos)
{
    constexpr int DL = HD / 32;
    const AttPlan pl = att_plan(a, pos);
    const int u = blockIdx.x;
    if (u >= pl.units) return;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31;
    const int nq = a.nq, nkv = a.nkv, G = nq / nkv, WH = NWARP / G;
    const int ctx = pos + 1, S = pl.S;
    const float scale = rsqrtf((float)HD);
    float *qh = reinterpret_cast<float *>(smem + lo.qh);  /* [G + 2][HD] raw rows */
    float *q_s = reinterpret_cast<float *>(smem + lo.qs); /* [G][HD] */
    __half *kn = reinterpret_cast<__half *>(smem + lo.kn);
    __half *vn = reinterpret_cast<__half *>(smem + lo.vn);
    __half *kt = reinterpret_cast<__half *>(smem + lo.kt); /* [SB 32][HD + KP] */
    __half *vt = reinterpret_cast<__half *>(smem + lo.vt); /* [SB 32][HD] */
    float *wp = reinterpret_cast<float *>(smem + lo.wp);   /* [NWARP][HD + 2] */
    volatile int *flag = reinterpret_cast<volatile int *>(smem + lo.flag) + 1;
    const int kvh = u / S, sidx = u % S;
    const int st0 = sidx * pl.per, st1 = min(pl.NS, st0 + pl.per);
    const bool last = st1 == pl.NS; /* the unit holding the new position */
    AttRegs<HD> R; /* the first batch flies while the heads are made */
    att_load<HD>(a, L, kvh, st0 * 32, min(ctx, min(st1, st0 + SB) * 32), pos, R);

    for (int idx = tid; idx < (G + 2) * HD; idx += NT) {
        const int hh = idx / HD, d = idx % HD;
        const int src = hh < G ? kvh * G + hh : hh == G ? nq + kvh : nq + nkv + kvh;
        qh[idx] = __ldcg(a.qkv + (size_t)src * HD + d);
    }
    __syncthreads();
    /* q heads (warps < G), then the new k and v (the last unit) */
    for (int hh = warp; hh < G + (last ? 2 : 0); hh += NWARP) {
        const int src = hh < G ? kvh * G + hh : hh == G ? nq + kvh : nq + nkv + kvh;
        cu_qkv_params qp = {L.qkv_bias ? L.qkv_bias + (size_t)src * HD : NULL, NULL, NULL, a.eps,
                            a.inv_freq};
        const float *nw = hh < G ? L.q_norm : hh == G ? L.k_norm : NULL;
        float x1[4], x2[4];
        cu_qkv_head(qh + (size_t)hh * HD, 0, HD, qp, nw, hh <= G, pos, lane, x1, x2);
        if (hh < G) {
#pragma unroll
            for (int j = 0; j < HD / 64; j++) {
                q_s[hh * HD + lane + 32 * j] = x1[j] * scale;
                q_s[hh * HD + lane + 32 * j + HD / 2] = x2[j] * scale;
            }
        } else {
            const int bs = a.block_size, blk = a.block_table[pos / bs];
            const size_t slot = (size_t)blk * bs + pos % bs;
            __half *d = (hh == G ? L.kc : L.vc) + (slot * nkv + kvh) * HD;
            __half *sm = hh == G ? kn : vn;
#pragma unroll
            for (int j = 0; j < HD / 64; j++) {
                const __half h1 = __float2half(x1[j]), h2 = __float2half(x2[j]);
                d[lane + 32 * j] = h1;
                d[lane + 32 * j + HD / 2] = h2;
                sm[lane + 32 * j] = h1;
                sm[lane + 32 * j + HD / 2] = h2;
            }
        }
    }

    const int g = warp % G;
    float m = -INFINITY, l = 0.f, o[DL];
#pragma unroll
    for (int d = 0; d < DL; d++)
        o[d] = 0.f;
    for (int b0 = st0; b0 < st1; b0 += SB) {
        const int p0 = b0 * 32, p1 = min(ctx, min(st1, b0 + SB) * 32);
        __syncthreads(); /* heads written; the previous batch's tiles read */
        att_store<HD>(R, p0, pos, kt, vt);
        if (pos >= p0 && pos < p1) /* uniform: the new position from shared memory */
            for (int i = tid; i < HD; i += NT) {
                kt[(pos - p0) * (HD + KP) + i] = kn[i];
                vt[(pos - p0) * HD + i] = vn[i];
            }
        __syncthreads();
        if (b0 + SB < st1) /* the next batch's loads fly while this one is computed */
            att_load<HD>(a, L, kvh, (b0 + SB) * 32, min(ctx, min(st1, b0 + 2 * SB) * 32), pos, R);
        const int nst = (p1 - p0 + 31) / 32;
        for (int st = warp / G; st < nst; st += WH) {
            const int r = st * 32 + lane;
            const bool valid = p0 + r < p1;
            const half2 *kr = reinterpret_cast<const half2 *>(kt + (size_t)r * (HD + KP));
            const float2 *qv = reinterpret_cast<const float2 *>(q_s + g * HD);
            float sc = 0.f;
#pragma unroll 8
            for (int d2 = 0; d2 < HD / 2; d2++) {
                const float2 kf = __half22float2(kr[d2]), qf = qv[d2];
                sc += qf.x * kf.x + qf.y * kf.y;
            }
            const float sv = valid ? sc : -INFINITY;
            const float mn = fmaxf(m, warp_max(sv)); /* lane 0 is valid: finite */
            const float alpha = __expf(m - mn);
            const float pr = valid ? __expf(sv - mn) : 0.f;
            l = l * alpha + warp_sum(pr);
            m = mn;
#pragma unroll
            for (int d = 0; d < DL; d++)
                o[d] *= alpha;
            const int nvalid = min(32, p1 - p0 - st * 32);
            for (int j = 0; j < nvalid; j++) {
                const float pj = __shfl_sync(0xffffffffu, pr, j);
                const half2 *vr = reinterpret_cast<const half2 *>(vt + (size_t)(st * 32 + j) * HD);
#pragma unroll
                for (int jj = 0; jj < DL / 2; jj++) {
                    const float2 vf = __half22float2(vr[lane + 32 * jj]);
                    o[2 * jj] += pj * vf.x;
                    o[2 * jj + 1] += pj * vf.y;
                }
            }
        }
    }
    /* the warps' partials -> the unit's, per query head */
    {
        float *w = wp + (size_t)warp * (HD + 2);
#pragma unroll
        for (int jj = 0; jj < DL / 2; jj++) {
            w[2 * lane + 64 * jj] = o[2 * jj];
            w[2 * lane + 64 * jj + 1] = o[2 * jj + 1];
        }
        if (lane == 0) {
            w[HD] = m;
            w[HD + 1] = l;
        }
    }
    __syncthreads();
    for (int idx = tid; idx < G * HD; idx += NT) {
        const int gq = idx / HD, d = idx % HD;
        float M = -INFINITY;
        for (int t = 0; t < WH; t++)
            M = fmaxf(M, wp[(size_t)(gq + G * t) * (HD + 2) + HD]);
        float Ls = 0.f, O = 0.f;
        for (int t = 0; t < WH; t++) {
            const float *w = wp + (size_t)(gq + G * t) * (HD + 2);
            const float f = w[HD + 1] > 0.f ? __expf(w[HD] - M) : 0.f;
            Ls += w[HD + 1] * f;
            O += w[d] * f;
        }
        if (S == 1) {
            a.att[(size_t)(kvh * G + gq) * HD + d] = __float2half(O / Ls);
        } else {
            float *pp = a.part + ((size_t)(kvh * S + sidx) * G + gq) * (HD + 2);
            pp[d] = O;
            if (d == 0) {
                pp[HD] = M;
                pp[HD + 1] = Ls;
            }
        }
    }
    if (S == 1) return;
    /* the last unit of this KV head to finish merges the S partials */
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        *flag = atomicAdd(a.attn_cnt + kvh, 1) == S - 1;
    }
    __syncthreads();
    if (!*flag) return;
    __threadfence();
    for (int idx = tid; idx < G * HD; idx += NT) {
        const int gq = idx / HD, d = idx % HD;
        const float *base = a.part + ((size_t)kvh * S * G + gq) * (HD + 2);
        const size_t stride = (size_t)G * (HD + 2);
        float M = -INFINITY;
#pragma unroll 8
        for (int s = 0; s < S; s++)
            M = fmaxf(M, __ldcg(base + s * stride + HD));
        float Ls = 0.f, O = 0.f;
#pragma unroll 8
        for (int s = 0; s < S; s++) {
            const float f = __expf(__ldcg(base + s * stride + HD) - M);
            Ls += __ldcg(base + s * stride + HD + 1) * f;
            O += __ldcg(base + s * stride + d) * f;
        }
        a.att[(size_t)(kvh * G + gq) * HD + d] = __float2half(O / Ls);
    }
    if (tid == 0) a.attn_cnt[kvh] = 0;
}

/* ---- the kernel ---------------------------------------------------------------- */

__device__ __forceinline__ void mark(const cu_mega_args &a, int l, int edge)
{
    if (a.prof && blockIdx.x == 0 && threadIdx.x == 0) a.prof[l * 12 + edge] = clock64();
}

template <int HD>
__global__ void __launch_bounds__(NT, 1) k_mega(cu_mega_args a)
{
    extern __shared__ __align__(16) uint8_t smem[];
    const Layout lo = layout_of(a, gridDim.x);
    cu_mega_layer *lt = reinterpret_cast<cu_mega_layer *>(smem + lo.lt);
    __half *xs = reinterpret_cast<__half *>(smem + lo.xs);
    float *xf = reinterpret_cast<float *>(smem + lo.xf);
    float *res = reinterpret_cast<float *>(smem + lo.res);
    float *pt = reinterpret_cast<float *>(smem + lo.pt);
    float *rl = reinterpret_cast<float *>(smem + lo.rl);
    int32_t *ids = reinterpret_cast<int32_t *>(smem + lo.ids);
    float *wts = reinterpret_cast<float *>(smem + lo.wts);
    float *sg = reinterpret_cast<float *>(smem + lo.sg);
    float *red = reinterpret_cast<float *>(smem + lo.red);
    Phase *ph = reinterpret_cast<Phase *>(smem + lo.ph);
    Phase &PQ = ph[0], &PO = ph[1], &PS = ph[2], &PU = ph[3], &PD = ph[4];
    volatile int *flag = reinterpret_cast<volatile int *>(smem + lo.flag);
    const int tid = threadIdx.x, H = a.H, k = a.k, I = a.I;
    const int er = a.E + (a.has_shared ? 1 : 0);
    const int tok = a.tok[0], pos = a.pos[0];
    const __half *erow = a.embed + (size_t)tok * H;
    uint32_t epoch = 0;
    const bool v2 = a.variant & 2;
    auto gemv = [&](const Phase &P, const __half *x, float *part) {
        if (v2)
            gemv_phase<true>(P, x, part);
        else
            gemv_phase<false>(P, x, part);
    };

    /* the layer table into shared memory (phase set-ups read it) */
    for (int i = tid; i < a.n_layers * (int)(sizeof(cu_mega_layer) / 4); i += NT)
        reinterpret_cast<uint32_t *>(lt)[i] = __ldg(reinterpret_cast<const uint32_t *>(a.layers) + i);
    /* x = the token's embedding (each block a slice; read after >= 2 barriers) */
    for (int h = blockIdx.x * NT + tid; h < H; h += gridDim.x * NT)
        a.x[h] = __half2float(erow[h]);
    __syncthreads();
    if (tid == 0) phase_dense(PQ, lt[0].qkv, 0);
    __syncthreads();
    phase_prefetch(PQ);
    /* layer ll's o, router rows and shared gate/up to L2 (V & 4: from the
     * previous layer's DOWN on) */
    const bool early = a.variant & 4;
    auto side = [&](int ll) {
        if (tid == 0) {
            phase_dense(PO, lt[ll].o, 0);
            if (lt[ll].sh_gate_up.n > 0) phase_dense(PS, lt[ll].sh_gate_up, k * I);
        }
        __syncthreads();
        phase_prefetch(PO);
        for (int r = blockIdx.x; r < er; r += gridDim.x)
            if (tid < 32) prefetch_l2(lt[ll].router + (size_t)r * H, (size_t)H * 4, tid, 32);
        if (lt[ll].sh_gate_up.n > 0) phase_prefetch(PS);
    };

    /* The weight stream: a phase's weights go to L2 (phase_prefetch) one
     * or two phases before they are used, so that DRAM keeps reading while
     * blocks compute, wait at barriers or do attention. The experts' only
     * when the routing is known (GU). */
    for (int l = 0; l < a.n_layers; l++) {
        const cu_mega_layer &L = lt[l];
        const bool shared = L.sh_gate_up.n > 0;
        /* QKV; this layer's o, router rows and shared gate/up to L2 */
        if (l > 0 && !grid_sync(a, epoch, flag)) return;
        mark(a, l, 0);
        if (!early || l == 0) side(l);
        norm_in(l ? a.x : NULL, erow, L.attn_norm, a.eps, H, xs, NULL, red, v2);
        __syncthreads();
        gemv(PQ, xs, pt);
        __syncthreads();
        for (int r = PQ.r0 + tid; r < PQ.r1; r += NT)
            a.qkv[r] = pt[r - PQ.r0];
        att_prefetch<HD>(a, L, pos);
        mark(a, l, 1);
        if (!grid_sync(a, epoch, flag)) return;

        /* ATT */
        mark(a, l, 2);
        attention<HD>(a, L, lo, smem, pos);
        mark(a, l, 3);
        if (!grid_sync(a, epoch, flag)) return;

        /* O */
        mark(a, l, 4);
        copy_in(xs, a.att, a.nq * a.hd, v2);
        __syncthreads();
        gemv(PO, xs, pt);
        __syncthreads();
        for (int r = PO.r0 + tid; r < PO.r1; r += NT)
            a.x[r] = __ldcg(a.x + r) + pt[r - PO.r0];
        mark(a, l, 5);
        if (!grid_sync(a, epoch, flag)) return;

        /* ROUTER (+ shared gate/up) */
        mark(a, l, 6);
        norm_in(a.x, NULL, L.mlp_norm, a.eps, H, xs, xf, red, v2);
        __syncthreads();
        for (int r = blockIdx.x; r < er; r += gridDim.x) {
            const float4 *wr = reinterpret_cast<const float4 *>(L.router + (size_t)r * H);
            const float4 *xv = reinterpret_cast<const float4 *>(xf);
            float d = 0.f;
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int i = tid + NT * u;
                if (i < H / 4) {
                    const float4 w = ld_nc_f4(wr + i), x = xv[i];
                    d += w.x * x.x + w.y * x.y + w.z * x.z + w.w * x.w;
                }
            }
            d = block_sum(d, red);
            if (tid == 0) a.rlog[r] = d;
            __syncthreads(); /* red reused */
        }
        if (shared) {
            gemv(PS, xs, pt);
            __syncthreads();
            silu_out(PS, pt, a.h);
        }
        mark(a, l, 7);
        if (!grid_sync(a, epoch, flag)) return;

        /* GU: routing (every block); the experts' gate/up and down to L2,
         * then the next layer's qkv; the gate/up rows, SiLU(gate) * up */
        mark(a, l, 8);
        for (int i = tid; i < er; i += NT)
            rl[i] = __ldcg(a.rlog + i);
        __syncthreads();
        if (tid < 32)
            cu_moe_route_token(rl, er, 0, a.E, k, a.renorm, a.has_shared, ids, wts, sg);
        __syncthreads();
        if (tid == 0 && blockIdx.x == 0 && a.active) atomicAdd(a.active, k);
        if (tid == 0) {
            for (int s = 0; s < k; s++)
                set_seg(PU.seg[s], L.gate_up, ids[s], s * 2 * I, 2 * I, 0, s * I, 1.f);
            phase_finish(PU, k * 2 * I, 0, k);
            for (int s = 0; s < k; s++)
                set_seg(PD.seg[s], L.down, ids[s], 0, 0, s * I, 0, wts[s]);
            int ns = k;
            if (shared) set_seg(PD.seg[ns++], L.sh_down, 0, 0, 0, k * I, 0, *sg);
            phase_finish(PD, H, 1, ns);
        } else if (tid == 32 && l + 1 < a.n_layers) {
            phase_dense(PQ, lt[l + 1].qkv, 0);
        }
        __syncthreads();
        phase_prefetch(PU);
        phase_prefetch(PD);
        gemv(PU, xs, pt);
        __syncthreads();
        silu_out(PU, pt, a.h);
        if (l + 1 < a.n_layers) phase_prefetch(PQ);
        mark(a, l, 9);
        if (!grid_sync(a, epoch, flag)) return;

        /* DOWN (+ combine) */
        mark(a, l, 10);
        if (early && l + 1 < a.n_layers) side(l + 1);
        copy_in(xs, a.h, k * I + (shared ? a.sI : 0), v2);
        __syncthreads();
        gemv(PD, xs, pt);
        __syncthreads();
        parts_sum(PD, pt, res);
        __syncthreads();
        for (int r = PD.r0 + tid; r < PD.r1; r += NT)
            a.x[r] = __ldcg(a.x + r) + res[r - PD.r0];
        mark(a, l, 11);
    }
}

int g_mega = -1;

} // namespace

/* Off unless LIGHTMOE_CUDA_MEGA=1 (docs/PERF.md: not yet faster than the
 * ordinary kernels). */
extern "C" int cu_mega_enabled(void)
{
    return cu_env_switch_off(&g_mega, "LIGHTMOE_CUDA_MEGA");
}

extern "C" int cu_mega_set(int on)
{
    return cu_env_switch_off_set(&g_mega, "LIGHTMOE_CUDA_MEGA", on);
}

static int int4_plain(const cu_linear *w)
{
    return w->kind == CU_W_INT4 && !w->perm && w->k % 32 == 0 && w->group % 32 == 0 &&
           w->k % w->group == 0 && w->n % 2 == 0;
}

extern "C" int cu_mega_supported(const cu_model *m, char *why, size_t n)
{
    const char *r = NULL;
    const int G = m->nkv > 0 ? m->nq / m->nkv : 0;
    if (m->head_dim != 64 && m->head_dim != 128)
        r = "head_dim is not 64 or 128";
    else if (G < 1 || G > 16 || (G & (G - 1)) || m->nq % m->nkv)
        r = "query heads per KV head is not a power of two <= 16";
    else if (m->hidden > 16 * NT || m->hidden % 32)
        r = "hidden size is not a multiple of 32 up to 8192";
    else if (m->n_experts < 1 || m->n_experts > 1024 || m->top_k < 1 ||
             m->top_k + (m->has_shared ? 1 : 0) > MAXSEG)
        r = "experts or top-k outside the kernel's limits";
    for (int l = 0; !r && l < m->n_layers; l++) {
        const cu_layer *L = &m->layers[l];
        if (!L->moe)
            r = "a layer has a dense MLP";
        else if (!int4_plain(&L->qkv) || !int4_plain(&L->o) || !int4_plain(&L->gate_up) ||
                 !int4_plain(&L->down))
            r = "an attention or expert matrix is not INT4 without act-order";
        else if ((L->sh_gate_up.kind != CU_W_NONE) != (m->has_shared != 0) ||
                 (m->has_shared && (!int4_plain(&L->sh_gate_up) || !int4_plain(&L->sh_down))))
            r = "a shared expert is not INT4 without act-order";
        else if (L->gate_up.k != m->hidden || L->down.k != m->layers[0].down.k ||
                 (m->has_shared && L->sh_down.k != m->layers[0].sh_down.k))
            r = "layers of different widths";
        else if (((uintptr_t)L->router) & 15)
            r = "router weights not 16-byte aligned";
    }
    if (r && why && n)
        snprintf(why, n, "%s", r);
    return r == NULL;
}

static int g_test_units, g_test_grid;

extern "C" void cu_mega_set_test(int max_units, int grid)
{
    g_test_units = max_units;
    g_test_grid = grid;
}

extern "C" int cu_mega_setup(cu_mega_args *a, int sms, int *grid, size_t *smem, lm_err *err)
{
    if (g_test_units > 0 && g_test_units < a->max_units)
        a->max_units = g_test_units;
    const int nb = g_test_grid > 0 ? g_test_grid : sms;
    const Layout lo = layout_of(*a, nb);
    cudaError_t e = a->hd == 64 ? cudaFuncSetAttribute(k_mega<64>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                       (int)lo.total)
                                : cudaFuncSetAttribute(k_mega<128>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                       (int)lo.total);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return lm_err_set(err, -ENOTSUP, "cuda one-token kernel: %zu bytes of shared memory: %s",
                          lo.total, cudaGetErrorString(e));
    }
    int dev = 0, khz = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev) != cudaSuccess || khz <= 0)
        khz = 2000000;
    const char *ts = getenv("LIGHTMOE_CUDA_MEGA_TIMEOUT");
    double sec = ts ? atof(ts) : 2.0;
    if (!(sec > 0.0))
        sec = 2.0;
    a->timeout_cycles = (int64_t)(sec * 1e3 * khz);
    const char *vs = getenv("LIGHTMOE_CUDA_MEGA_V"); /* measurements */
    a->variant = vs ? atoi(vs) : 0;
    int per_sm = 0;
    e = a->hd == 64 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_mega<64>, NT, lo.total)
                    : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_mega<128>, NT, lo.total);
    if (e != cudaSuccess || per_sm < 1) {
        cudaGetLastError();
        return lm_err_set(err, -ENOTSUP, "cuda one-token kernel: a block of %d threads and %zu "
                          "bytes does not fit an SM", NT, lo.total);
    }
    *grid = nb;
    *smem = lo.total;
    return 0;
}

extern "C" int cu_mega_launch(const cu_mega_args *a, int grid, size_t smem, cudaStream_t st,
                              lm_err *err)
{
    CUDA_TRY(err, cudaMemsetAsync(a->bar, 0, sizeof(uint32_t), st));
    if (a->hd == 64)
        k_mega<64><<<grid, NT, smem, st>>>(*a);
    else
        k_mega<128><<<grid, NT, smem, st>>>(*a);
    CUDA_LAUNCH_CHECK(err, "one-token kernel launch");
    return 0;
}
