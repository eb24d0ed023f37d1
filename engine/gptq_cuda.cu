/*
 * gptq_cuda.cu: GPTQ of one Linear with cuSOLVER / cuBLAS (see gptq_cuda.h).
 *
 * gptq_cuda_hessian_add: S += X^T X by cublasDsyrk, in chunks of inputs.
 *
 * Mirrors quantize_gptq in gptq.c step by step, in double like it:
 *   host:   H = 2 S / n, act-order permutation, dead inputs (gptq_int_prepare)
 *   device: U = upper Cholesky factor of (H + damp I)^-1 by potrf (lower) +
 *           potrs against I (the inverse) + potrf (lower) again, retried with
 *           10x damping like hinv_upper. Row-major data seen column-major is
 *           the transpose, so a column-major lower factor L of H^-1 = L L^T
 *           is exactly the row-major upper U with H^-1 = U^T U.
 *   per block of bs columns: the block of W (n x cnt) comes back to the
 *           host, the column loop runs there (same find_params / rounding /
 *           packing as the CPU), the error E (n x cnt) goes up, and
 *           W[:, i2:] -= E U[i1:i2, i2:] runs as one cublasDgemm.
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "engine/gptq.h"
}
#include "engine/gptq_cuda.h"
#include "engine/gptq_int.h"

#define GPTQ_DAMP_RETRIES 5

namespace {

struct gpu_ctx {
    cublasHandle_t blas = nullptr;
    cusolverDnHandle_t sol = nullptr;
    double *d_h = nullptr, *d_u = nullptr, *d_wp = nullptr, *d_e = nullptr, *d_work = nullptr;
    int *d_info = nullptr;
    ~gpu_ctx()
    {
        cudaFree(d_h);
        cudaFree(d_u);
        cudaFree(d_wp);
        cudaFree(d_e);
        cudaFree(d_work);
        cudaFree(d_info);
        if (blas)
            cublasDestroy(blas);
        if (sol)
            cusolverDnDestroy(sol);
    }
};

__global__ void k_add_diag(double *a, int k, double v)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < k)
        a[(size_t)i * k + i] += v;
}

__global__ void k_identity(double *a, int k)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)k * k)
        a[i] = (i / k == i % k) ? 1.0 : 0.0;
}

#define CU(x)                                                                                 \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess)                                                                \
            return lm_err_set(err, -EIO, "gptq cuda: %s: %s", #x, cudaGetErrorString(e_));    \
    } while (0)
#define CB(x)                                                                                 \
    do {                                                                                      \
        int s_ = (int)(x);                                                                    \
        if (s_ != 0)                                                                          \
            return lm_err_set(err, -EIO, "gptq cuda: %s failed (status %d)", #x, s_);         \
    } while (0)

/* hinv_upper on the device: d_u = row-major upper U of (H + damp I)^-1,
 * lower part (row-major) unspecified. potrf status > 0 means not positive
 * definite: retry with 10x damping. */
int hinv_upper_gpu(gpu_ctx &g, const double *h, int k, double damp, double *ret_damp,
                   lm_err *err)
{
    size_t kk = (size_t)k * k;
    int lw1 = 0, lw2 = 0;
    CB(cusolverDnDpotrf_bufferSize(g.sol, CUBLAS_FILL_MODE_LOWER, k, g.d_u, k, &lw1));
    lw2 = lw1;
    CU(cudaMalloc(&g.d_work, sizeof(double) * (size_t)(lw1 > lw2 ? lw1 : lw2)));
    CU(cudaMemcpy(g.d_h, h, sizeof(double) * kk, cudaMemcpyHostToDevice));
    unsigned nb = (unsigned)((kk + 255) / 256);
    for (int attempt = 0; attempt <= GPTQ_DAMP_RETRIES; attempt++, damp *= 10) {
        int info = 0;
        /* d_h <- H + damp I, factor in place (lower, column-major view) */
        CU(cudaMemcpy(g.d_h, h, sizeof(double) * kk, cudaMemcpyHostToDevice));
        k_add_diag<<<(k + 255) / 256, 256>>>(g.d_h, k, damp);
        CU(cudaGetLastError());
        CB(cusolverDnDpotrf(g.sol, CUBLAS_FILL_MODE_LOWER, k, g.d_h, k, g.d_work, lw1, g.d_info));
        CU(cudaMemcpy(&info, g.d_info, sizeof info, cudaMemcpyDeviceToHost));
        if (info != 0)
            continue;
        /* d_u <- (H + damp I)^-1, full symmetric */
        k_identity<<<nb, 256>>>(g.d_u, k);
        CU(cudaGetLastError());
        CB(cusolverDnDpotrs(g.sol, CUBLAS_FILL_MODE_LOWER, k, k, g.d_h, k, g.d_u, k, g.d_info));
        CU(cudaMemcpy(&info, g.d_info, sizeof info, cudaMemcpyDeviceToHost));
        if (info != 0)
            continue;
        /* lower (column-major) Cholesky of the inverse = row-major upper U */
        CB(cusolverDnDpotrf(g.sol, CUBLAS_FILL_MODE_LOWER, k, g.d_u, k, g.d_work, lw1, g.d_info));
        CU(cudaMemcpy(&info, g.d_info, sizeof info, cudaMemcpyDeviceToHost));
        if (info != 0)
            continue;
        *ret_damp = damp;
        return 0;
    }
    return lm_err_set(err, -EDOM,
                      "gptq cuda: Hessian (%dx%d) not positive definite even with damping %g",
                      k, k, damp / 10);
}

int quantize_gptq_gpu(const float *w, const gptq_hessian *hs, const gptq_params *prm,
                      gptq_result *r, lm_err *err)
{
    int32_t n = r->n, k = r->k, gsz = r->group;
    size_t kk = (size_t)k * k;
    int32_t bs = prm->blocksize > 0 ? prm->blocksize : 128;
    bs = (bs + gsz - 1) / gsz * gsz; /* a block never splits a group */
    struct host_bufs {
        double *h, *u, *wp, *wb, *e;
        int32_t *perm;
        gptq_diag_idx *di;
        int *qint;
        gptq_qparam *gp;
        ~host_bufs()
        {
            free(h), free(u), free(wp), free(wb), free(e), free(perm), free(di), free(qint),
                free(gp);
        }
    } hb;
    hb.h = (double *)malloc(sizeof(double) * kk);
    hb.u = (double *)malloc(sizeof(double) * kk);
    hb.wp = (double *)malloc(sizeof(double) * (size_t)n * k);
    hb.wb = (double *)malloc(sizeof(double) * (size_t)n * bs);
    hb.e = (double *)malloc(sizeof(double) * (size_t)n * bs);
    hb.perm = (int32_t *)malloc(sizeof(int32_t) * (size_t)k);
    hb.di = (gptq_diag_idx *)malloc(sizeof(gptq_diag_idx) * (size_t)k);
    hb.qint = (int *)malloc(sizeof(int) * (size_t)n * k);
    hb.gp = (gptq_qparam *)malloc(sizeof(gptq_qparam) * (size_t)n);
    if (!hb.h || !hb.u || !hb.wp || !hb.wb || !hb.e || !hb.perm || !hb.di || !hb.qint || !hb.gp)
        return lm_err_set(err, -ENOMEM, "gptq cuda: out of memory for a %dx%d layer", n, k);

    double mean_diag =
        gptq_int_prepare(w, hs, prm->act_order, n, k, hb.h, hb.u, hb.wp, hb.perm, hb.di);

    gpu_ctx g;
    CB(cublasCreate(&g.blas));
    CB(cusolverDnCreate(&g.sol));
    CU(cudaMalloc(&g.d_h, sizeof(double) * kk));
    CU(cudaMalloc(&g.d_u, sizeof(double) * kk));
    CU(cudaMalloc(&g.d_wp, sizeof(double) * (size_t)n * k));
    CU(cudaMalloc(&g.d_e, sizeof(double) * (size_t)n * bs));
    CU(cudaMalloc(&g.d_info, sizeof(int)));
    int rc = hinv_upper_gpu(g, hb.h, k, prm->percdamp * mean_diag, &r->damp_used, err);
    if (rc)
        return rc;
    /* the host loop needs U's rows in full; zero the (row-major) lower part */
    CU(cudaMemcpy(hb.u, g.d_u, sizeof(double) * kk, cudaMemcpyDeviceToHost));
    for (int32_t i = 0; i < k; i++)
        for (int32_t j = 0; j < i; j++)
            hb.u[(size_t)i * k + j] = 0;
    CU(cudaMemcpy(g.d_wp, hb.wp, sizeof(double) * (size_t)n * k, cudaMemcpyHostToDevice));

    for (int32_t i1 = 0; i1 < k; i1 += bs) {
        int32_t i2 = i1 + bs < k ? i1 + bs : k, cnt = i2 - i1;
        /* block of the updated W: wb[rr][i] = W[rr][i1 + i] */
        CU(cudaMemcpy2D(hb.wb, sizeof(double) * bs, g.d_wp + i1, sizeof(double) * k,
                        sizeof(double) * cnt, n, cudaMemcpyDeviceToHost));
        for (int32_t i = 0; i < cnt; i++) {
            int32_t col = i1 + i;
            double d = hb.u[(size_t)col * k + col];
            const double *urow = hb.u + (size_t)col * k + i1; /* indexed by block column */
            if (col % gsz == 0)
                for (int32_t rr = 0; rr < n; rr++)
                    hb.gp[rr] = gptq_int_find_params(hb.wb + (size_t)rr * bs + i, 1, gsz,
                                                     prm->sym);
            for (int32_t rr = 0; rr < n; rr++) {
                double *wr = hb.wb + (size_t)rr * bs;
                int q = gptq_int_quant_one(wr[i], &hb.gp[rr]);
                float dq = gptq_int_dequant_one(q, &hb.gp[rr]);
                hb.qint[(size_t)rr * k + col] = q;
                r->deq[(size_t)rr * k + hb.perm[col]] = dq;
                double e = (wr[i] - (double)dq) / d;
                for (int32_t j = i + 1; j < cnt; j++)
                    wr[j] -= e * urow[j];
                hb.e[(size_t)rr * bs + i] = e;
            }
            if (col % gsz == 0)
                for (int32_t rr = 0; rr < n; rr++)
                    gptq_int_pack_group(r, col / gsz, rr, &hb.gp[rr]);
        }
        if (i2 < k) {
            /* row-major W[:, i2:] (n x m) -= E (n x cnt) U[i1:i2, i2:] (cnt x m),
             * column-major: W^T (m x n) -= U_blk^T (m x cnt) E^T (cnt x n) */
            const double one = 1.0, minus = -1.0;
            int m = k - i2;
            CU(cudaMemcpy(g.d_e, hb.e, sizeof(double) * (size_t)n * bs, cudaMemcpyHostToDevice));
            CB(cublasDgemm(g.blas, CUBLAS_OP_N, CUBLAS_OP_N, m, n, cnt, &minus,
                           g.d_u + (size_t)i1 * k + i2, k, g.d_e, bs, &one, g.d_wp + i2, k));
        }
    }
    CU(cudaDeviceSynchronize());
    for (int32_t j = 0; j < k; j++) {
        r->g_idx[hb.perm[j]] = j / gsz;
        for (int32_t rr = 0; rr < n; rr++)
            gptq_int_pack_q(r, rr, hb.perm[j], hb.qint[(size_t)rr * k + j]);
    }
    return 0;
}

__global__ void k_to_double(const float *x, int64_t rows, int64_t ld, int k, double *y)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * k)
        y[i] = (double)x[(i / k) * ld + i % k];
}

} // namespace

extern "C" int gptq_cuda_hessian_add(gptq_hessian *h, const float *x, int64_t rows, int64_t ld,
                                     lm_err *err)
{
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev <= 0) {
        cudaGetLastError();
        return lm_err_set(err, -ENODEV, "gptq: no CUDA device for --device cuda");
    }
    int k = h->k;
    size_t kk = (size_t)k * k;
    int64_t chunk = (int64_t)((64u << 20) / (sizeof(float) * (size_t)ld)); /* ~64 MiB of x */
    if (chunk < 1)
        chunk = 1;
    if (chunk > rows)
        chunk = rows > 0 ? rows : 1;
    struct bufs {
        float *dx = nullptr;
        double *dy = nullptr, *ds = nullptr, *hs = nullptr;
        cublasHandle_t blas = nullptr;
        ~bufs()
        {
            cudaFree(dx), cudaFree(dy), cudaFree(ds), free(hs);
            if (blas)
                cublasDestroy(blas);
        }
    } b;
    b.hs = (double *)malloc(sizeof(double) * kk);
    if (!b.hs)
        return lm_err_set(err, -ENOMEM, "gptq cuda: out of memory for a %dx%d Hessian", k, k);
    CB(cublasCreate(&b.blas));
    CU(cudaMalloc(&b.dx, sizeof(float) * (size_t)chunk * ld));
    CU(cudaMalloc(&b.dy, sizeof(double) * (size_t)chunk * k));
    CU(cudaMalloc(&b.ds, sizeof(double) * kk));
    CU(cudaMemset(b.ds, 0, sizeof(double) * kk));
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        int64_t m = rows - r0 < chunk ? rows - r0 : chunk;
        size_t bytes = sizeof(float) * (size_t)((m - 1) * ld + k);
        CU(cudaMemcpy(b.dx, x + r0 * ld, bytes, cudaMemcpyHostToDevice));
        k_to_double<<<(unsigned)((m * k + 255) / 256), 256>>>(b.dx, m, ld, k, b.dy);
        CU(cudaGetLastError());
        /* row-major Y [m][k] is column-major Y^T (k x m): S += Y^T Y, the
         * row-major upper triangle being the column-major lower one */
        const double one = 1.0;
        CB(cublasDsyrk(b.blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, k, (int)m, &one, b.dy, k,
                       &one, b.ds, k));
    }
    CU(cudaMemcpy(b.hs, b.ds, sizeof(double) * kk, cudaMemcpyDeviceToHost));
    for (int i = 0; i < k; i++)
        for (int j = i; j < k; j++)
            h->s[(size_t)i * k + j] += b.hs[(size_t)i * k + j];
    h->n += rows;
    return 0;
}

extern "C" int gptq_cuda_quantize(const float *w, int32_t n, int32_t k, const gptq_hessian *h,
                                  const gptq_params *p, gptq_result *ret, lm_err *err)
{
    memset(ret, 0, sizeof *ret);
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev <= 0) {
        cudaGetLastError();
        return lm_err_set(err, -ENODEV, "gptq: no CUDA device for --device cuda");
    }
    if (p->method != GPTQ_METHOD_GPTQ || n <= 0 || k <= 0 || n % 8 || k % 8 || p->group <= 0 ||
        k % p->group || !h || h->k != k || h->n <= 0 || !(p->percdamp > 0))
        return gptq_quantize(w, n, k, h, p, ret, err); /* RTN, or its checks and messages */
    int rc = gptq_int_result_alloc(ret, n, k, p->group, err);
    if (rc)
        return rc;
    rc = quantize_gptq_gpu(w, h, p, ret, err);
    if (rc)
        gptq_result_free(ret);
    return rc;
}
