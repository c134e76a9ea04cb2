// Causal mask aligned to the bottom-right corner, plus the sequence-end bound.
//
// A sequence has kv_len keys and q_len queries; query i sits at position kv_len - q_len + i and sees
// keys 0 .. that position (so decode, chunked prefill and full prefill are one rule). Without causal
// masking a query sees keys 0 .. kv_len - 1. A position below 0 (more queries than keys) sees nothing.
#pragma once

#include <math_constants.h>

namespace cuflash {
namespace attn {

// Last key index a query row may see, or -1 for a row that sees none.
__device__ __forceinline__ int last_visible_key(int query_index, int q_len, int kv_len, bool causal) {
  const int last = causal ? kv_len - q_len + query_index : kv_len - 1;
  return min(last, kv_len - 1);
}

// Sets to -inf every score whose key lies past its row's last visible key. s is one key tile in
// C-fragment order ([kNTiles][4]); the thread's two rows have last visible keys last[0], last[1];
// key_base is the key index of column 0 of the tile and t = lane % 4.
template <int kNTiles>
__device__ __forceinline__ void apply_mask(float (&s)[kNTiles][4], int key_base, int t, const int (&last)[2]) {
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
    const int key = key_base + n * 8 + 2 * t;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (key > last[r]) s[n][2 * r] = -CUDART_INF_F;
      if (key + 1 > last[r]) s[n][2 * r + 1] = -CUDART_INF_F;
    }
  }
}

}  // namespace attn
}  // namespace cuflash
