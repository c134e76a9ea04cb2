// Online softmax over key tiles for one mma row-tile (16 rows) of a warp, FlashAttention-2 style.
//
// Scores arrive already multiplied by scale * log2(e), so every exponential is an exp2, and the
// running max m lives in that log2 domain. Each thread owns two rows (g = lane / 4 and g + 8) and,
// per 8-column n-tile, two columns of each; the 4 lanes of a quad together hold a full row.
//
// -inf handling (a row may see no key in a tile, or at all): a running max of -inf is replaced by 0
// before subtracting, so exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN; the row sum l then
// stays 0, and finalize() turns l == 0 into output 0 and LSE -inf.
#pragma once

#include <math_constants.h>

#include "common/mma.cuh"  // fast_exp2

namespace cuflash {
namespace attn {

constexpr float kLog2E = 1.4426950408889634f;  // log2(e): exp(x) = exp2(x * log2(e))
constexpr float kLn2 = 0.6931471805599453f;    // ln(2): converts a log2-domain LSE to natural log
constexpr unsigned kFullMask = 0xffffffffu;

// Reductions over the 4 lanes of a quad (lanes 4g .. 4g+3 share a row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// Running state of the two rows a thread owns. l is this thread's partial row sum (its own columns);
// the quad sum is taken once, at the end (rescaling by alpha commutes with the sum).
struct OnlineSoftmax {
  float m[2];
  float l[2];

  __device__ __forceinline__ void init() {
    m[0] = m[1] = -CUDART_INF_F;
    l[0] = l[1] = 0.0f;
  }

  // s: scores of one key tile, [kNTiles][4] in C-fragment order (log2 domain, masked keys -inf).
  // Replaces s with the probabilities exp2(s - m_new) and multiplies the output accumulator
  // o [kDTiles][4] by exp2(m_old - m_new) row-wise.
  template <int kNTiles, int kDTiles>
  __device__ __forceinline__ void update(float (&s)[kNTiles][4], float (&o)[kDTiles][4]) {
    float alpha[2];
    update_scores(s, alpha);
    rescale(o, alpha);
  }

  // The first half of update(): new running max and sums, s replaced by the probabilities; returns
  // the factors exp2(m_old - m_new) the output accumulator still has to be multiplied by (rescale),
  // so that it can stay in flight meanwhile (the wgmma kernel's P V of the previous tile).
  template <int kNTiles>
  __device__ __forceinline__ void update_scores(float (&s)[kNTiles][4], float (&alpha)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = quad_max(mx);
      const float m_use = mx == -CUDART_INF_F ? 0.0f : mx;
      alpha[r] = fast_exp2(m[r] - m_use);  // 0 when m[r] is -inf
      m[r] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        s[n][2 * r] = fast_exp2(s[n][2 * r] - m_use);
        s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - m_use);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l[r] = l[r] * alpha[r] + sum;
    }
  }

  template <int kDTiles>
  __device__ __forceinline__ static void rescale(float (&o)[kDTiles][4], const float (&alpha)[2]) {
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      o[d][0] *= alpha[0];
      o[d][1] *= alpha[0];
      o[d][2] *= alpha[1];
      o[d][3] *= alpha[1];
    }
  }

  // Normalizes o by the full row sum; returns per row the natural-log LSE, or -inf (with o = 0)
  // for a row that saw no key.
  template <int kDTiles>
  __device__ __forceinline__ void finalize(float (&o)[kDTiles][4], float (&lse)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l_row = quad_sum(l[r]);
      const bool seen = l_row > 0.0f;
      const float inv = seen ? 1.0f / l_row : 0.0f;
      lse[r] = seen ? (m[r] + __log2f(l_row)) * kLn2 : -CUDART_INF_F;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        o[d][2 * r] *= inv;
        o[d][2 * r + 1] *= inv;
      }
    }
  }
};

}  // namespace attn
}  // namespace cuflash
