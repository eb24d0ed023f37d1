/*
 * ops_cpu_avx512.c: op_linear's AVX-512 kernels (16 float lanes), chosen
 * at run time on CPUs that have AVX-512 F/BW/VL/DQ (the engine itself is
 * compiled for x86-64-v3, so every function here carries a target
 * attribute and nothing here runs unless ops_avx512_supported()).
 *
 * INT4 arithmetic: exactly the int4.h formula, w = scale * (q - zero) in
 * float32, then w * x accumulated with FMA. What makes it fast is how w is
 * produced: for each (row, group) the 16 possible weights
 * table[q] = scale * (q - zero), q = 0..15, are computed once into one
 * register, and then 16 weights at a time come out of a single
 * vpermps (_mm512_permutexvar_ps), which reads only the low 4 bits of each
 * 32-bit index lane. The indices come straight from the packed bytes, a
 * shift putting a different nibble at the bottom of each 32-bit lane; no
 * masking, no int-to-float conversion. Two layouts of a row's columns:
 *
 * - wide (group a multiple of 128, e.g. every group-128 GPTQ model): a
 *   128-column block is one 64-byte load; its dword l holds columns
 *   c0 + 8l .. c0 + 8l + 7, so vector v (v = 0..7, shift 4v) holds column
 *   c0 + 8l + v in lane l;
 * - narrow (groups of 32 or 64): a 32-column block is 16 bytes broadcast to
 *   the four 128-bit lanes; lane l = 4L + j (L = 128-bit lane, j = dword in
 *   it) of the "even" vector (vpsrlvd by 8L) holds the low nibble of byte
 *   4j + L, i.e. column c0 + 2(4j + L); the "odd" vector (8L + 4) the next.
 *
 * op_linear arranges x in the same order once per call
 * (ops_avx512_arrange_int4). In both layouts consecutive vectors alternate
 * between two accumulators per output ("even", "odd"), so the decoded-rows
 * tile below serves both.
 *
 * Every output has two accumulators (even, odd) that see the blocks in
 * k order, finished as reduce(even + odd) + bias. With more than 2 token
 * rows the tile's weight rows are first decoded into the thread's scratch
 * (the same float values from the same table) and the same FMA sequence
 * runs over them, so a row's result never depends on m.
 */
#include "engine/ops_cpu_int.h"

#include "engine/half.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define T512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
/* Loops over the tile's rows and tokens (at most 4 and 2) must be unrolled so
 * that the accumulators stay in registers; -O2 does not always do it. */
#define UNROLL _Pragma("GCC unroll 4")
#define INL static inline __attribute__((always_inline)) T512

int ops_avx512_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* Groups of a multiple of 128 columns take the wide layout (see above). */
static int int4_wide(const int4_matrix *q) { return q->group % 128 == 0; }

void ops_avx512_arrange_int4(const int4_matrix *q, const float *x, int32_t ldx, int32_t m,
                             float *dst)
{
    const int32_t *perm = q->perm;
    for (int32_t t = 0; t < m; t++) {
        const float *xr = x + (size_t)t * (size_t)ldx;
        float *d = dst + (size_t)t * (size_t)q->k;
        if (int4_wide(q)) {
            for (int32_t c0 = 0; c0 < q->k; c0 += 128)
                for (int32_t v = 0; v < 8; v++)
                    for (int32_t l = 0; l < 16; l++) {
                        int32_t col = c0 + 8 * l + v;
                        d[c0 + 16 * v + l] = xr[perm ? perm[col] : col];
                    }
            continue;
        }
        for (int32_t c0 = 0; c0 < q->k; c0 += 32)
            for (int32_t l = 0; l < 16; l++) {
                int32_t col = c0 + 2 * (4 * (l % 4) + l / 4);
                d[c0 + l] = xr[perm ? perm[col] : col];
                d[c0 + 16 + l] = xr[perm ? perm[col + 1] : col + 1];
            }
    }
}

/* table[q] = scale * (q - zero) for q = 0..15: the int4.h formula. */
INL __m512 int4_table(const int4_matrix *q, size_t gi)
{
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 s = _mm512_set1_ps(_cvtsh_ss(q->scales[gi]));
    return _mm512_mul_ps(s, _mm512_sub_ps(iota, _mm512_set1_ps((float)q->zeros[gi])));
}

/* Scales and zeros of up to 16 groups g0.. of row r as floats, converted
 * 16 at a time (the same exact values int4_table uses). */
INL void group_params(const int4_matrix *q, int32_t r, int32_t g0, float *sf, float *zf)
{
    int32_t ng = q->k / q->group, cnt = ng - g0 < 16 ? ng - g0 : 16;
    __mmask16 mk = (__mmask16)((1u << cnt) - 1);
    size_t gi = (size_t)r * (size_t)ng + (size_t)g0;
    _mm512_storeu_ps(sf, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, q->scales + gi)));
    __m128i z = _mm_maskz_loadu_epi8(mk, q->zeros + gi);
    _mm512_storeu_ps(zf, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z)));
}

/* int4_table from converted parameters. */
INL __m512 table_of(float s, float z)
{
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_mul_ps(_mm512_set1_ps(s), _mm512_sub_ps(iota, _mm512_set1_ps(z)));
}

/* Shift counts putting byte L of each dword at the bottom of lane 4L + j. */
INL __m512i shift_even(void)
{
    return _mm512_set_epi32(24, 24, 24, 24, 16, 16, 16, 16, 8, 8, 8, 8, 0, 0, 0, 0);
}

/* The 32 weights of the block of 16 packed bytes at qb (even, odd). */
INL void int4_w32(const uint8_t *qb, __m512 table, __m512i she, __m512i sho, __m512 *we,
                  __m512 *wo)
{
    __m512i raw = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)qb));
    *we = _mm512_permutexvar_ps(_mm512_srlv_epi32(raw, she), table);
    *wo = _mm512_permutexvar_ps(_mm512_srlv_epi32(raw, sho), table);
}

INL float finish(const linear *W, __m512 ae, __m512 ao, int32_t r)
{
    return _mm512_reduce_add_ps(_mm512_add_ps(ae, ao)) + (W->bias ? W->bias[r] : 0.f);
}

/* The same 64-byte line of row i of the next tile into L1 and of the tile 4
 * ahead into L2: the hardware prefetchers lose track of a tile's short
 * interleaved row streams (measured: +30% streaming). */
INL void int4_prefetch(const uint8_t *qr, int32_t kb, int i, int NR, int32_t j)
{
    _mm_prefetch((const char *)qr + (size_t)(i + NR) * (size_t)kb + (size_t)(j / 2), _MM_HINT_T0);
    _mm_prefetch((const char *)qr + (size_t)(i + 4 * NR) * (size_t)kb + (size_t)(j / 2),
                 _MM_HINT_T1);
}

/* INT4 tile of NR rows x NT (<= 2) token rows, weights made in registers. */
INL void int4_tile(const lin_ctx *c, int32_t r0, int NR, int32_t t0, int NT)
{
    const int4_matrix *q = &c->W->q;
    int32_t ng = q->k / q->group, kb = q->k / 2;
    const __m512i she = shift_even(), sho = _mm512_add_epi32(she, _mm512_set1_epi32(4));
    __m512 ae[4][2], ao[4][2];
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            ae[i][t] = ao[i][t] = _mm512_setzero_ps();
    const float *x0 = c->x + (size_t)t0 * (size_t)c->ldx;
    const uint8_t *qr = q->qs + (size_t)r0 * (size_t)kb;
    float sf[4][16], zf[4][16];
    for (int32_t g = 0; g < ng; g++) {
        if (!(g & 15))
            UNROLL for (int i = 0; i < NR; i++)
                group_params(q, r0 + i, g, sf[i], zf[i]);
        __m512 tb[4];
        UNROLL for (int i = 0; i < NR; i++)
            tb[i] = table_of(sf[i][g & 15], zf[i][g & 15]);
        for (int32_t j = g * q->group; j < (g + 1) * q->group; j += 32) {
            __m512 xe[2], xo[2];
            UNROLL for (int t = 0; t < NT; t++) {
                xe[t] = _mm512_loadu_ps(x0 + (size_t)t * (size_t)c->ldx + (size_t)j);
                xo[t] = _mm512_loadu_ps(x0 + (size_t)t * (size_t)c->ldx + (size_t)j + 16);
            }
            if (!(j & 127)) /* as in int4_tile_wide */
                UNROLL for (int i = 0; i < NR; i++)
                    int4_prefetch(qr, kb, i, NR, j);
            UNROLL for (int i = 0; i < NR; i++) {
                __m512 we, wo;
                int4_w32(qr + (size_t)i * (size_t)kb + (size_t)(j / 2), tb[i], she, sho, &we, &wo);
                UNROLL for (int t = 0; t < NT; t++) {
                    ae[i][t] = _mm512_fmadd_ps(we, xe[t], ae[i][t]);
                    ao[i][t] = _mm512_fmadd_ps(wo, xo[t], ao[i][t]);
                }
            }
        }
    }
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            c->y[(size_t)(t0 + t) * (size_t)c->ldy + (size_t)(r0 + i)] =
                finish(c->W, ae[i][t], ao[i][t], r0 + i);
}

/* The wide layout's INT4 tile: per 128 columns, one 64-byte load per row;
 * vector v (0..7) of the block holds nibble v of every dword. */
INL void int4_tile_wide(const lin_ctx *c, int32_t r0, int NR, int32_t t0, int NT)
{
    const int4_matrix *q = &c->W->q;
    int32_t ng = q->k / q->group, kb = q->k / 2;
    __m512 ae[4][2], ao[4][2];
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            ae[i][t] = ao[i][t] = _mm512_setzero_ps();
    const float *x0 = c->x + (size_t)t0 * (size_t)c->ldx;
    const uint8_t *qr = q->qs + (size_t)r0 * (size_t)kb;
    float sf[4][16], zf[4][16];
    for (int32_t g = 0; g < ng; g++) {
        if (!(g & 15))
            UNROLL for (int i = 0; i < NR; i++)
                group_params(q, r0 + i, g, sf[i], zf[i]);
        __m512 tb[4];
        UNROLL for (int i = 0; i < NR; i++)
            tb[i] = table_of(sf[i][g & 15], zf[i][g & 15]);
        for (int32_t j = g * q->group; j < (g + 1) * q->group; j += 128) {
            __m512i raw[4];
            UNROLL for (int i = 0; i < NR; i++) {
                raw[i] = _mm512_loadu_si512(qr + (size_t)i * (size_t)kb + (size_t)(j / 2));
                int4_prefetch(qr, kb, i, NR, j);
            }
            UNROLL for (int v = 0; v < 8; v += 2) {
                __m512 xe[2], xo[2];
                UNROLL for (int t = 0; t < NT; t++) {
                    const float *xt = x0 + (size_t)t * (size_t)c->ldx + (size_t)j;
                    xe[t] = _mm512_loadu_ps(xt + 16 * v);
                    xo[t] = _mm512_loadu_ps(xt + 16 * v + 16);
                }
                UNROLL for (int i = 0; i < NR; i++) {
                    __m512i ie = v ? _mm512_srli_epi32(raw[i], 4 * v) : raw[i];
                    __m512 we = _mm512_permutexvar_ps(ie, tb[i]);
                    __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(raw[i], 4 * v + 4), tb[i]);
                    UNROLL for (int t = 0; t < NT; t++) {
                        ae[i][t] = _mm512_fmadd_ps(we, xe[t], ae[i][t]);
                        ao[i][t] = _mm512_fmadd_ps(wo, xo[t], ao[i][t]);
                    }
                }
            }
        }
    }
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            c->y[(size_t)(t0 + t) * (size_t)c->ldy + (size_t)(r0 + i)] =
                finish(c->W, ae[i][t], ao[i][t], r0 + i);
}

/* Decode rows r0..r0+NR-1 into wbuf[NR][k], in the arranged order. */
T512 static void int4_decode_rows(const int4_matrix *q, int32_t r0, int NR, float *wbuf)
{
    int32_t ng = q->k / q->group, kb = q->k / 2;
    const __m512i she = shift_even(), sho = _mm512_add_epi32(she, _mm512_set1_epi32(4));
    UNROLL for (int i = 0; i < NR; i++) {
        const uint8_t *qrow = q->qs + (size_t)(r0 + i) * (size_t)kb;
        float *dst = wbuf + (size_t)i * (size_t)q->k;
        for (int32_t g = 0; g < ng; g++) {
            __m512 tb = int4_table(q, (size_t)(r0 + i) * (size_t)ng + (size_t)g);
            if (int4_wide(q)) {
                for (int32_t j = g * q->group; j < (g + 1) * q->group; j += 128) {
                    __m512i raw = _mm512_loadu_si512(qrow + j / 2);
                    UNROLL for (int v = 0; v < 8; v++) {
                        __m512i iv = v ? _mm512_srli_epi32(raw, 4 * v) : raw;
                        _mm512_storeu_ps(dst + j + 16 * v, _mm512_permutexvar_ps(iv, tb));
                    }
                }
                continue;
            }
            for (int32_t j = g * q->group; j < (g + 1) * q->group; j += 32) {
                __m512 we, wo;
                int4_w32(qrow + j / 2, tb, she, sho, &we, &wo);
                _mm512_storeu_ps(dst + j, we);
                _mm512_storeu_ps(dst + j + 16, wo);
            }
        }
    }
}

/* The same FMA sequence as int4_tile over decoded rows (INT4, m > 2). */
INL void wbuf_tile(const lin_ctx *c, const float *wbuf, int32_t r0, int NR, int32_t t0, int NT)
{
    int32_t k = c->W->k;
    __m512 ae[4][2], ao[4][2];
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            ae[i][t] = ao[i][t] = _mm512_setzero_ps();
    const float *x0 = c->x + (size_t)t0 * (size_t)c->ldx;
    for (int32_t j = 0; j < k; j += 32) {
        __m512 xe[2], xo[2];
        UNROLL for (int t = 0; t < NT; t++) {
            xe[t] = _mm512_loadu_ps(x0 + (size_t)t * (size_t)c->ldx + (size_t)j);
            xo[t] = _mm512_loadu_ps(x0 + (size_t)t * (size_t)c->ldx + (size_t)j + 16);
        }
        UNROLL for (int i = 0; i < NR; i++) {
            __m512 we = _mm512_loadu_ps(wbuf + (size_t)i * (size_t)k + (size_t)j);
            __m512 wo = _mm512_loadu_ps(wbuf + (size_t)i * (size_t)k + (size_t)j + 16);
            UNROLL for (int t = 0; t < NT; t++) {
                ae[i][t] = _mm512_fmadd_ps(we, xe[t], ae[i][t]);
                ao[i][t] = _mm512_fmadd_ps(wo, xo[t], ao[i][t]);
            }
        }
    }
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            c->y[(size_t)(t0 + t) * (size_t)c->ldy + (size_t)(r0 + i)] =
                finish(c->W, ae[i][t], ao[i][t], r0 + i);
}

/* 16 dense weights converted to float. */
INL __m512 load_dense16(st_dtype dt, const void *w, size_t off)
{
    if (dt == ST_F32)
        return _mm512_loadu_ps((const float *)w + off);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + off));
    if (dt == ST_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Dense tile: NR rows x NT tokens; one accumulator per output over
 * k & ~15, then the k tail in order. */
INL void dense_tile(const lin_ctx *c, st_dtype dt, int32_t r0, int NR, int32_t t0, int NT)
{
    const linear *W = c->W;
    int32_t k16 = W->k & ~15;
    __m512 acc[4][2];
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++)
            acc[i][t] = _mm512_setzero_ps();
    const float *x0 = c->x + (size_t)t0 * (size_t)c->ldx;
    for (int32_t j = 0; j < k16; j += 16) {
        __m512 xv[2];
        UNROLL for (int t = 0; t < NT; t++)
            xv[t] = _mm512_loadu_ps(x0 + (size_t)t * (size_t)c->ldx + (size_t)j);
        if (!(j & (dt == ST_F32 ? 15 : 31))) /* once per 64-byte line */
            ops_prefetch_dense_rows(W, dt, r0, NR, j);
        UNROLL for (int i = 0; i < NR; i++) {
            __m512 w = load_dense16(dt, W->w, (size_t)(r0 + i) * (size_t)W->k + (size_t)j);
            UNROLL for (int t = 0; t < NT; t++)
                acc[i][t] = _mm512_fmadd_ps(w, xv[t], acc[i][t]);
        }
    }
    UNROLL for (int i = 0; i < NR; i++)
        UNROLL for (int t = 0; t < NT; t++) {
            const float *x = x0 + (size_t)t * (size_t)c->ldx;
            float s = _mm512_reduce_add_ps(acc[i][t]);
            for (int32_t j = k16; j < W->k; j++)
                s += ops_dense_elem(dt, W->w, (size_t)(r0 + i) * (size_t)W->k + (size_t)j) * x[j];
            c->y[(size_t)(t0 + t) * (size_t)c->ldy + (size_t)(r0 + i)] =
                s + (W->bias ? W->bias[r0 + i] : 0.f);
        }
}

/* One (NR, NT) tile of the kind at hand; NR is 4 or 1, NT 2 or 1. */
#define TILE_CASES(CALL_4_2, CALL_4_1, CALL_1_2, CALL_1_1)                                       \
    do {                                                                                         \
        if (NR == 4 && NT == 2) CALL_4_2;                                                        \
        else if (NR == 4) CALL_4_1;                                                              \
        else if (NT == 2) CALL_1_2;                                                              \
        else CALL_1_1;                                                                           \
    } while (0)

T512 void ops_avx512_linear_task(void *vc, int64_t b, int64_t e, int thread)
{
    const lin_ctx *c = vc;
    const linear *W = c->W;
    int int4 = W->kind == LINEAR_INT4;
    size_t sf = 0;
    float *wbuf = cpu_pool_scratch(c->p, thread, &sf);
    if (!int4 || c->m <= 2 || sf < 4 * (size_t)W->k)
        wbuf = NULL;
    for (int64_t r = b; r < e;) {
        int NR = e - r >= 4 ? 4 : 1;
        int32_t r0 = (int32_t)r;
        if (wbuf)
            int4_decode_rows(&W->q, r0, NR, wbuf);
        for (int32_t t = 0; t < c->m;) {
            int NT = c->m - t >= 2 ? 2 : 1;
            if (wbuf)
                TILE_CASES(wbuf_tile(c, wbuf, r0, 4, t, 2), wbuf_tile(c, wbuf, r0, 4, t, 1),
                           wbuf_tile(c, wbuf, r0, 1, t, 2), wbuf_tile(c, wbuf, r0, 1, t, 1));
            else if (int4 && int4_wide(&W->q))
                TILE_CASES(int4_tile_wide(c, r0, 4, t, 2), int4_tile_wide(c, r0, 4, t, 1),
                           int4_tile_wide(c, r0, 1, t, 2), int4_tile_wide(c, r0, 1, t, 1));
            else if (int4)
                TILE_CASES(int4_tile(c, r0, 4, t, 2), int4_tile(c, r0, 4, t, 1),
                           int4_tile(c, r0, 1, t, 2), int4_tile(c, r0, 1, t, 1));
            else if (W->dtype == ST_F16)
                TILE_CASES(dense_tile(c, ST_F16, r0, 4, t, 2), dense_tile(c, ST_F16, r0, 4, t, 1),
                           dense_tile(c, ST_F16, r0, 1, t, 2), dense_tile(c, ST_F16, r0, 1, t, 1));
            else if (W->dtype == ST_BF16)
                TILE_CASES(dense_tile(c, ST_BF16, r0, 4, t, 2),
                           dense_tile(c, ST_BF16, r0, 4, t, 1),
                           dense_tile(c, ST_BF16, r0, 1, t, 2),
                           dense_tile(c, ST_BF16, r0, 1, t, 1));
            else
                TILE_CASES(dense_tile(c, ST_F32, r0, 4, t, 2), dense_tile(c, ST_F32, r0, 4, t, 1),
                           dense_tile(c, ST_F32, r0, 1, t, 2), dense_tile(c, ST_F32, r0, 1, t, 1));
            t += NT;
        }
        r += NR;
    }
}

#else /* not x86-64 with GCC/Clang: never supported, never called */

int ops_avx512_supported(void) { return 0; }
void ops_avx512_arrange_int4(const int4_matrix *q, const float *x, int32_t ldx, int32_t m,
                             float *dst)
{
    (void)q, (void)x, (void)ldx, (void)m, (void)dst;
}
void ops_avx512_linear_task(void *vc, int64_t b, int64_t e, int thread)
{
    (void)vc, (void)b, (void)e, (void)thread;
}
#endif
