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
    CU_TRACE_KERNEL();
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
        const bool qk = hh < s.nq + s.nkv;
        cu_qkv_head(row, hh, hd, p, qk ? (hh < s.nq ? p.q_norm : p.k_norm) : NULL, qk, pos, lane,
                    x1, x2);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int i = lane + 32 * j;
            if (j >= np) break;
            if (i >= half) continue;
            if (hh < s.nq) {
                float *q = q_out + ((size_t)t * s.nq + hh) * hd;
                q[i] = x1[j];
                q[i + half] = x2[j];
            } else {
                __half *d = hh < s.nq + s.nkv ? kc + (slot * s.nkv + (hh - s.nq)) * hd
                                              : vc + (slot * s.nkv + (hh - s.nq - s.nkv)) * hd;
                d[i] = __float2half(x1[j]);
                d[i + half] = __float2half(x2[j]);
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
