/*
 * cuda_int4_mma.cu: the INT4 products on the tensor cores (mma.sync
 * m16n8k16, fp16 x fp16 -> fp32), portable to sm_80 and later: the
 * many-row kernel (k_int4_mma) and the few-row one (k_int4_mma8, below).
 *
 * Block tile: BM = 16*MTILES rows of A (tokens) x 128 weight rows, K in
 * steps of 64; 4 warps, warp w owns weight rows [32w, 32w+32) of the tile
 * (4 n8 tiles) for all BM tokens, so each weight is dequantised once per
 * block. A (fp16) and the packed weights travel global -> shared with
 * cp.async through a 3-stage ring.
 *
 * The fragment trick that lets the int4.h layout feed mma directly: a dot
 * product does not care in which order k is summed, as long as A and B use
 * the same order. Lane (g = lane/4, c = lane%4) takes the 32-bit word of
 * weight row g holding k = 8c..8c+7 of a 32-wide chunk; the 0x6400 trick
 * turns it into the pairs (k0,k4) (k1,k5) (k2,k6) (k3,k7), used as the B
 * registers of two mma instructions, and the lane's A registers are the
 * same pairs of its 8 contiguous activations, rearranged with prmt.
 *
 * When the grid would leave SMs idle (few rows, narrow matrices) K is split
 * over grid.z and the partial sums are added with atomics (fp32 outputs
 * only): results then vary in the last bits from run to run.
 *
 * Shared rows are padded (A 192 bytes per 64 halves, B 48 bytes per 32
 * bytes) so that the fragment reads of a warp hit distinct banks.
 */
#include "engine/cuda_common.cuh"
#include "engine/cuda_int4_gemm.cuh"

namespace {

constexpr int BN = 128, BK = 64, STAGES = 3;
constexpr int A_STRIDE = 192; /* bytes per A row in shared memory */
constexpr int B_STRIDE = 48;  /* bytes per weight row in shared memory */

template <int MTILES> constexpr int smem_bytes()
{
    return STAGES * (16 * MTILES * A_STRIDE + BN * B_STRIDE);
}

template <int MTILES, int MODE>
__global__ void __launch_bounds__(128)
    k_int4_mma(cu_int4_weights w, cu_gemm_rows r, const __half *__restrict__ a, int lda,
               void *__restrict__ out, int ldo)
{
    CU_TRACE_KERNEL();
    constexpr int BM = 16 * MTILES;
    extern __shared__ __align__(16) uint8_t smem[];
    uint8_t *sA = smem;
    uint8_t *sB = smem + STAGES * BM * A_STRIDE;
    __shared__ int s_arow[BM];

    int e, start, end;
    if (!cu_item_lookup(r, blockIdx.y, BM, &e, &start, &end))
        return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c = lane & 3;
    const int n0 = blockIdx.x * BN;
    const int N = w.n, K = w.k, G = w.k / w.group;
    const size_t rowbytes = (size_t)K / 2;
    const uint8_t *qs = w.qs + (size_t)e * N * rowbytes;
    const __half *sc = w.scales + (size_t)e * N * G;
    const uint8_t *zp = w.zeros + (size_t)e * N * G;
    const int cnt = end - start;

    for (int i = tid; i < BM; i += 128)
        s_arow[i] = i < cnt ? (r.a_rows ? r.a_rows[start + i] : start + i) : -1;
    __syncthreads();

    /* split-K (grid.z > 1): this block takes k-tiles [kt0, kt0 + nkt) and adds
     * its partial sums into the output with atomics */
    const int ktiles_all = (K + BK - 1) / BK;
    const int per = (ktiles_all + gridDim.z - 1) / gridDim.z;
    const int kt0 = blockIdx.z * per;
    const int ktiles = min(per, ktiles_all - kt0);
    if (ktiles <= 0)
        return;
    auto load_stage = [&](int stage, int kt) {
        uint8_t *da = sA + stage * BM * A_STRIDE;
        for (int i = tid; i < BM * 8; i += 128) {
            const int row = i >> 3, piece = i & 7, kcol = kt * BK + piece * 8;
            const int ar = s_arow[row];
            const bool ok = ar >= 0 && kcol < K;
            const __half *src = ok ? a + (size_t)ar * lda + kcol : a;
            cp_async16(da + row * A_STRIDE + piece * 16, src, ok);
        }
        uint8_t *db = sB + stage * BN * B_STRIDE;
        for (int i = tid; i < BN * 2; i += 128) {
            const int row = i >> 1, piece = i & 1, kcol = kt * BK + piece * 32;
            const bool ok = (n0 + row) < N && kcol < K;
            const uint8_t *src = ok ? qs + (size_t)(n0 + row) * rowbytes + kcol / 2 : qs;
            cp_async16(db + row * B_STRIDE + piece * 16, src, ok);
        }
    };

    float acc[MTILES][4][4];
#pragma unroll
    for (int mi = 0; mi < MTILES; mi++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++)
                acc[mi][j][q] = 0.f;

    int nrow[4];
#pragma unroll
    for (int j = 0; j < 4; j++)
        nrow[j] = min(n0 + warp * 32 + j * 8 + g, N - 1);
    /* scales and zeros of the lane's 4 rows for both 32-chunks of a k-tile,
     * loaded one k-tile ahead so that their latency hides behind the mma work */
    auto load_sz = [&](int kt, half2 s2[2][4], half2 z2[2][4]) {
#pragma unroll
        for (int ch = 0; ch < 2; ch++) {
            const int kc = min(kt * BK + ch * 32, K - 32);
            const int grp = kc / w.group;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                s2[ch][j] = __half2half2(sc[(size_t)nrow[j] * G + grp]);
                z2[ch][j] = int4_zero2(zp[(size_t)nrow[j] * G + grp]);
            }
        }
    };
    half2 cs[2][4], cz[2][4];
    load_sz(kt0, cs, cz);

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles)
            load_stage(s, kt0 + s);
        cp_async_commit();
    }

    for (int kt = 0; kt < ktiles; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < ktiles)
            load_stage((kt + STAGES - 1) % STAGES, kt0 + kt + STAGES - 1);
        cp_async_commit();

        half2 ns[2][4], nz[2][4];
        if (kt + 1 < ktiles)
            load_sz(kt0 + kt + 1, ns, nz);
        const int stage = kt % STAGES;
        const uint8_t *ta = sA + stage * BM * A_STRIDE;
        const uint8_t *tb = sB + stage * BN * B_STRIDE;
#pragma unroll
        for (int ch = 0; ch < 2; ch++) {
            const int kc = (kt0 + kt) * BK + ch * 32;
            if (kc >= K)
                break;
            half2 bq[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t word = *reinterpret_cast<const uint32_t *>(
                    tb + (warp * 32 + j * 8 + g) * B_STRIDE + ch * 16 + c * 4);
                int4_dequant8(word, cz[ch][j], cs[ch][j], bq[j]);
            }
#pragma unroll
            for (int mi = 0; mi < MTILES; mi++) {
                const uint4 ra = *reinterpret_cast<const uint4 *>(ta + (mi * 16 + g) * A_STRIDE + ch * 64 + c * 16);
                const uint4 rb = *reinterpret_cast<const uint4 *>(ta + (mi * 16 + g + 8) * A_STRIDE + ch * 64 + c * 16);
                uint32_t a0[4], a1[4];
                a0[0] = prmt(ra.x, ra.z, 0x5410);
                a0[1] = prmt(rb.x, rb.z, 0x5410);
                a0[2] = prmt(ra.x, ra.z, 0x7632);
                a0[3] = prmt(rb.x, rb.z, 0x7632);
                a1[0] = prmt(ra.y, ra.w, 0x5410);
                a1[1] = prmt(rb.y, rb.w, 0x5410);
                a1[2] = prmt(ra.y, ra.w, 0x7632);
                a1[3] = prmt(rb.y, rb.w, 0x7632);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    mma_16816(acc[mi][j], a0, *reinterpret_cast<uint32_t *>(&bq[j][0]),
                              *reinterpret_cast<uint32_t *>(&bq[j][1]));
                    mma_16816(acc[mi][j], a1, *reinterpret_cast<uint32_t *>(&bq[j][2]),
                              *reinterpret_cast<uint32_t *>(&bq[j][3]));
                }
            }
        }
#pragma unroll
        for (int ch = 0; ch < 2; ch++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                cs[ch][j] = ns[ch][j];
                cz[ch][j] = nz[ch][j];
            }
    }
    cp_async_wait<0>();

    /* Epilogue: c0,c1 = (row g, cols 2c, 2c+1); c2,c3 = (row g+8, same cols). */
#pragma unroll
    for (int mi = 0; mi < MTILES; mi++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int m = mi * 16 + g + h * 8;
            if (m >= cnt)
                continue;
            const int i = start + m;
            const float rs = r.row_scale ? r.row_scale[i] : 1.f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int n = n0 + warp * 32 + j * 8 + 2 * c;
                const float v0 = acc[mi][j][2 * h] * rs, v1 = acc[mi][j][2 * h + 1];
                if (n >= N)
                    continue;
                if (MODE == CU_OUT_SILU_F16) {
                    __half *o = static_cast<__half *>(out) + (size_t)i * ldo;
                    o[n / 2] = __float2half(cu_silu(acc[mi][j][2 * h]) * v1 * rs);
                } else {
                    float *o = static_cast<float *>(out) + (size_t)i * ldo;
                    if (gridDim.z > 1) { /* split-K: partial sums meet in the output */
                        atomicAdd(o + n, v0);
                        if (n + 1 < N)
                            atomicAdd(o + n + 1, v1 * rs);
                    } else if (MODE == CU_OUT_F32_ACC) {
                        o[n] += v0;
                        if (n + 1 < N)
                            o[n + 1] += v1 * rs;
                    } else {
                        o[n] = v0;
                        if (n + 1 < N)
                            o[n + 1] = v1 * rs;
                    }
                }
            }
        }
}

template <int MTILES>
int launch_mma(const cu_int4_weights *w, const cu_gemm_rows *r, const __half *a, int lda,
               void *out, int ldo, cu_out_mode mode, cudaStream_t st, lm_err *err)
{
    constexpr int smem = smem_bytes<MTILES>();
    const int gy = r->items ? r->max_items : cuda_div_up(r->n_rows, 16 * MTILES);
    if (gy == 0)
        return 0;
    dim3 grid(cuda_div_up(w->n, BN), gy);
    /* few blocks (small row counts, narrow matrices): split K so that every SM
     * has work; not for the fused SiLU (it needs whole sums) */
    static int sms = 0;
    if (!sms && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess)
        sms = 132;
    const int ktiles = (w->k + BK - 1) / BK;
    int splits = 1;
    if (mode != CU_OUT_SILU_F16 && (int)(grid.x * grid.y) < sms) {
        splits = (2 * sms) / (int)(grid.x * grid.y);
        if (splits > ktiles / 4)
            splits = ktiles / 4;
        if (splits < 1)
            splits = 1;
    }
    grid.z = splits;
    if (splits > 1 && mode == CU_OUT_F32) /* the partial sums add into zeros */
        CUDA_TRY(err, cudaMemset2DAsync(out, (size_t)ldo * 4, 0, (size_t)w->n * 4, r->n_rows, st));
    switch (mode) {
#define LAUNCH(M) \
    case M: \
        CUDA_TRY(err, cudaFuncSetAttribute(k_int4_mma<MTILES, M>, \
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem)); \
        k_int4_mma<MTILES, M><<<grid, 128, smem, st>>>(*w, *r, a, lda, out, ldo); \
        break;
        LAUNCH(CU_OUT_F32)
        LAUNCH(CU_OUT_F32_ACC)
        LAUNCH(CU_OUT_SILU_F16)
#undef LAUNCH
    case CU_OUT_F32_ADD: break; /* refused by cu_int4_mma */
    }
    CUDA_LAUNCH_CHECK(err, "int4 mma launch");
    return 0;
}

/* ---- few tokens an item (<= 8): weights as the 16-row operand ----------------------
 *
 * Decode at batch 5-16 (2-16 with LIGHTMOE_CUDA_MMA8_MIN=2, cuda_int4_gemv.cu)
 * gives each product (and each expert) up to 8 rows of A a work item, too
 * few for k_int4_mma's 16-row tiles and too many for the gemv, whose
 * instructions grow with every row. Here the roles swap: 16 weight rows are
 * the mma's A (m16), the item's up to 8 tokens its B (n8), straight from
 * global memory into registers, no shared-memory staging. The same k order
 * trick as above, transposed: lane (g, t) takes, for weight rows g and g + 8,
 * the 16-byte chunk 4u + t (32 k) of unit u (128 k); each of its 4 words
 * gives the pairs (k0,k4) (k1,k5) (k2,k6) (k3,k7) of two mma instructions
 * (A registers), and token g's 8 matching activations, rearranged with
 * prmt, their B registers. The 4 warps of a block split K (units u = warp,
 * warp + 4, ...; two units a step, their loads issued together) and add
 * their sums through shared memory in a fixed order. Dense products and
 * grouped ones whose work list is older than the previous launch issue
 * their first weight loads before the dependency wait, as the gemv does. */
__device__ __forceinline__ uint32_t h2_bits(half2 h)
{
    return *reinterpret_cast<uint32_t *>(&h);
}

template <int MODE>
__global__ void __launch_bounds__(128)
    k_int4_mma8(cu_int4_weights w, cu_gemm_rows r, const __half *__restrict__ a, int lda,
                void *__restrict__ out, int ldo)
{
    CU_TRACE_KERNEL();
    __shared__ float s_c[4][16][8];
    const bool pre = (!r.items || r.plan_ready) && !r.a_rows;
    if (!pre) {
        cu_pdl_wait();
        cu_pdl_trigger();
    }
    int e, start, end;
    if (!cu_item_lookup(r, blockIdx.y, 8, &e, &start, &end)) {
        cu_pdl_wait(); /* no-op if done: every block waits (see cuda_common.cuh) */
        return;        /* uniform over the block */
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int n = w.n, K = w.k, G = w.k / w.group, C = K / 32, U = (C + 3) / 4;
    const int row0 = blockIdx.x * 16;
    const size_t rowbytes = (size_t)K / 2;
    const uint8_t *qs = w.qs + (size_t)e * n * rowbytes;
    const __half *sc = w.scales + (size_t)e * n * G;
    const uint8_t *zp = w.zeros + (size_t)e * n * G;
    const int ra = min(row0 + g, n - 1), rb = min(row0 + g + 8, n - 1); /* clamped: never stored */
    const uint4 *wra = reinterpret_cast<const uint4 *>(qs + (size_t)ra * rowbytes);
    const uint4 *wrb = reinterpret_cast<const uint4 *>(qs + (size_t)rb * rowbytes);
    const int cnt = end - start;

    struct wchunk {
        uint4 a, b;     /* rows g, g + 8 */
        half2 sa, za, sb, zb;
    };
    /* chunks past K: scale 0, so the weights are 0 and A is not read */
    auto load_w = [&](int u, wchunk &q) {
        const int c = 4 * u + t;
        if (c < C) {
            const int grp = c * 32 / w.group;
            q.a = __ldg(wra + c);
            q.b = __ldg(wrb + c);
            q.sa = __half2half2(sc[(size_t)ra * G + grp]);
            q.za = int4_zero2(zp[(size_t)ra * G + grp]);
            q.sb = __half2half2(sc[(size_t)rb * G + grp]);
            q.zb = int4_zero2(zp[(size_t)rb * G + grp]);
        } else {
            q.a = q.b = make_uint4(0, 0, 0, 0);
            q.sa = q.sb = __float2half2_rn(0.f);
            q.za = q.zb = int4_zero2(0);
        }
    };
    const __half *arow = nullptr; /* token g of the item (the last one past cnt) */
    auto load_x = [&](int u, uint4 x[4]) {
        const int c = 4 * u + t;
#pragma unroll
        for (int i = 0; i < 4; i++)
            x[i] = c < C ? __ldg(reinterpret_cast<const uint4 *>(arow + c * 32) + i)
                         : make_uint4(0, 0, 0, 0);
    };
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    auto compute = [&](const wchunk &q, const uint4 x[4]) {
#pragma unroll
        for (int i = 0; i < 4; i++) { /* word i: k = 8i .. 8i + 7 of the chunk */
            const uint32_t wa = i == 0 ? q.a.x : i == 1 ? q.a.y : i == 2 ? q.a.z : q.a.w;
            const uint32_t wb = i == 0 ? q.b.x : i == 1 ? q.b.y : i == 2 ? q.b.z : q.b.w;
            half2 pa[4], pb[4];
            int4_dequant8(wa, q.za, q.sa, pa);
            int4_dequant8(wb, q.zb, q.sb, pb);
            uint32_t xp[4];
            int4_xpairs(x[i], xp);
            const uint32_t f0[4] = {h2_bits(pa[0]), h2_bits(pb[0]), h2_bits(pa[1]), h2_bits(pb[1])};
            mma_16816(acc, f0, xp[0], xp[1]);
            const uint32_t f1[4] = {h2_bits(pa[2]), h2_bits(pb[2]), h2_bits(pa[3]), h2_bits(pb[3])};
            mma_16816(acc, f1, xp[2], xp[3]);
        }
    };
    bool waited = !pre;
    for (int u = warp; u < U; u += 8) {
        wchunk q0, q1;
        const bool two = u + 4 < U;
        load_w(u, q0);
        if (two)
            load_w(u + 4, q1);
        if (!waited) {
            cu_pdl_wait();
            cu_pdl_trigger();
            waited = true;
        }
        if (!arow) {
            const int i = start + min(g, cnt - 1);
            arow = a + (size_t)(r.a_rows ? r.a_rows[i] : i) * lda;
        }
        uint4 x0[4], x1[4];
        load_x(u, x0);
        if (two)
            load_x(u + 4, x1);
        compute(q0, x0);
        if (two)
            compute(q1, x1);
    }
    if (!waited) {
        cu_pdl_wait();
        cu_pdl_trigger();
    }
    s_c[warp][g][2 * t] = acc[0];
    s_c[warp][g][2 * t + 1] = acc[1];
    s_c[warp][g + 8][2 * t] = acc[2];
    s_c[warp][g + 8][2 * t + 1] = acc[3];
    __syncthreads();
    const int row = threadIdx.x >> 3, tok = threadIdx.x & 7, nrow = row0 + row;
    if (tok >= cnt || nrow >= n)
        return;
    auto sum_row = [&](int rr) {
        return s_c[0][rr][tok] + s_c[1][rr][tok] + s_c[2][rr][tok] + s_c[3][rr][tok];
    };
    const int i = start + tok;
    const float rs = r.row_scale ? r.row_scale[i] : 1.f;
    if constexpr (MODE == CU_OUT_SILU_F16) { /* rows (2j, 2j + 1) = (gate, up) */
        if ((row & 1) || nrow + 1 >= n)
            return;
        __half *o = static_cast<__half *>(out) + (size_t)i * ldo;
        o[nrow / 2] = __float2half(cu_silu(sum_row(row)) * sum_row(row + 1) * rs);
    } else if constexpr (MODE == CU_OUT_F32_ADD) {
        const int orow = r.out_rows ? r.out_rows[i] : i;
        atomicAdd(static_cast<float *>(out) + (size_t)orow * ldo + nrow, sum_row(row) * rs);
    } else if constexpr (MODE == CU_OUT_F32_ACC) {
        static_cast<float *>(out)[(size_t)i * ldo + nrow] += sum_row(row) * rs;
    } else {
        static_cast<float *>(out)[(size_t)i * ldo + nrow] = sum_row(row) * rs;
    }
}

} // namespace

extern "C" int cu_int4_mma(const cu_int4_weights *w, const cu_gemm_rows *r, const __half *a,
                           int lda, void *out, int ldo, cu_out_mode mode, int tile,
                           cudaStream_t st, lm_err *err)
{
    int rc = cu_int4_check(w, lda, mode, "mma", err);
    if (rc)
        return rc;
    if (mode == CU_OUT_F32_ADD || r->x_f32 || r->route)
        return lm_err_set(err, -EINVAL, "int4 mma: atomic output, a normalising input and "
                                        "routing in the product are the gemv's only");
    switch (tile) {
    case 16: return launch_mma<1>(w, r, a, lda, out, ldo, mode, st, err);
    case 32: return launch_mma<2>(w, r, a, lda, out, ldo, mode, st, err);
    case 64: return launch_mma<4>(w, r, a, lda, out, ldo, mode, st, err);
    default: return lm_err_set(err, -EINVAL, "int4 mma: tile %d not in {16,32,64}", tile);
    }
}

extern "C" int cu_int4_mma8(const cu_int4_weights *w, const cu_gemm_rows *r, const __half *a,
                            int lda, void *out, int ldo, cu_out_mode mode, cudaStream_t st,
                            lm_err *err)
{
    int rc = cu_int4_check(w, lda, mode, "mma8", err);
    if (rc)
        return rc;
    if (r->x_f32 || r->route)
        return lm_err_set(err, -EINVAL, "int4 mma8: a normalising input and routing in the "
                                        "product are the gemv's only");
    if (r->items && r->tile != 8)
        return lm_err_set(err, -EINVAL, "int4 mma8: work items of %d entries, not 8", r->tile);
    const int gy = r->items ? r->max_items : cuda_div_up(r->n_rows, 8);
    if (gy == 0)
        return 0;
    const dim3 grid((unsigned)cuda_div_up(w->n, 16), (unsigned)gy);
    switch (mode) {
    case CU_OUT_F32:
        CU_LAUNCH(err, "int4 mma8 launch", k_int4_mma8<CU_OUT_F32>, grid, 128, 0, st, *w, *r, a,
                  lda, out, ldo);
        break;
    case CU_OUT_F32_ACC:
        CU_LAUNCH(err, "int4 mma8 launch", k_int4_mma8<CU_OUT_F32_ACC>, grid, 128, 0, st, *w, *r,
                  a, lda, out, ldo);
        break;
    case CU_OUT_SILU_F16:
        CU_LAUNCH(err, "int4 mma8 launch", k_int4_mma8<CU_OUT_SILU_F16>, grid, 128, 0, st, *w, *r,
                  a, lda, out, ldo);
        break;
    case CU_OUT_F32_ADD:
        CU_LAUNCH(err, "int4 mma8 launch", k_int4_mma8<CU_OUT_F32_ADD>, grid, 128, 0, st, *w, *r,
                  a, lda, out, ldo);
        break;
    }
    return 0;
}
