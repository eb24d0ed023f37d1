/*
 * cuda_rope.cu: q/k/v post-processing (see cuda_rope.cuh). Grid (token,
 * group of 4 heads), one warp per head; lane i handles the rotary pairs
 * (i, i + hd/2). Many small blocks rather than one per token: at decode
 * sizes the latency of one head's chain is the cost, not the work.
 */
#include "engine/cuda_common.cuh"
#include "engine/cuda_rope.cuh"

namespace
{

__global__ void k_qkv_post(cu_attn_shape s, const float *__restrict__ qkv, cu_qkv_params p,
                           cu_attn_batch b, __half *__restrict__ kc, __half *__restrict__ vc,
                           float *__restrict__ q_out)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    const int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    /* block y takes heads [4y, 4y + 4): one head per warp, all heads in parallel */
    const int hd = s.hd, half = hd / 2, nh = s.nq + 2 * s.nkv;
    const int pos = b.tok_pos[t], seq = b.tok_seq[t];
    const int blk = b.block_table[(size_t)seq * b.max_blocks + pos / b.block_size];
    const size_t slot = (size_t)blk * b.block_size + pos % b.block_size;
    const float *row = qkv + (size_t)t * nh * hd;
    for (int hh = blockIdx.y * 4 + warp; hh < nh && hh < (int)(blockIdx.y + 1) * 4; hh += 4) {
        float x1[4], x2[4];
        const int np = half / 32 > 0 ? half / 32 : 1;
        float ss = 0.f;
        for (int j = 0; j < np; j++) {
            const int i = lane + 32 * j;
            x1[j] = x2[j] = 0.f;
            if (i < half) {
                x1[j] = row[hh * hd + i] + (p.bias ? p.bias[hh * hd + i] : 0.f);
                x2[j] = row[hh * hd + i + half] + (p.bias ? p.bias[hh * hd + i + half] : 0.f);
            }
            ss += x1[j] * x1[j] + x2[j] * x2[j];
        }
        if (hh < s.nq + s.nkv) {
            const float *nw = hh < s.nq ? p.q_norm : p.k_norm;
            if (nw) {
                ss = warp_sum(ss);
                const float inv = rsqrtf(ss / (float)hd + p.eps);
                for (int j = 0; j < np; j++) {
                    const int i = lane + 32 * j;
                    if (i < half) {
                        x1[j] = nw[i] * (x1[j] * inv);
                        x2[j] = nw[i + half] * (x2[j] * inv);
                    }
                }
            }
            for (int j = 0; j < np; j++) {
                const int i = lane + 32 * j;
                if (i >= half) continue;
                float sn, cs;
                sincosf((float)pos * p.inv_freq[i], &sn, &cs);
                const float y1 = x1[j] * cs - x2[j] * sn, y2 = x2[j] * cs + x1[j] * sn;
                if (hh < s.nq) {
                    float *q = q_out + ((size_t)t * s.nq + hh) * hd;
                    q[i] = y1;
                    q[i + half] = y2;
                } else {
                    __half *k = kc + (slot * s.nkv + (hh - s.nq)) * hd;
                    k[i] = __float2half(y1);
                    k[i + half] = __float2half(y2);
                }
            }
        } else {
            __half *v = vc + (slot * s.nkv + (hh - s.nq - s.nkv)) * hd;
            for (int j = 0; j < np; j++) {
                const int i = lane + 32 * j;
                if (i < half) {
                    v[i] = __float2half(x1[j]);
                    v[i + half] = __float2half(x2[j]);
                }
            }
        }
    }
}

} // namespace

extern "C" int cu_qkv_post(const cu_attn_shape *s, const float *qkv, const cu_qkv_params *p,
                           const cu_attn_batch *b, __half *kc, __half *vc, float *q_out,
                           cudaStream_t st, lm_err *err)
{
    if (s->hd % 2 || s->hd > 256)
        return lm_err_set(err, -EINVAL, "qkv post: head_dim %d unsupported (even, <= 256)", s->hd);
    if (b->T <= 0) return 0;
    dim3 grid(b->T, cuda_div_up(s->nq + 2 * s->nkv, 4));
    CU_LAUNCH(err, "qkv post launch", k_qkv_post, grid, 128, 0, st, *s, qkv, *p, *b, kc, vc, q_out);
    return 0;
}
