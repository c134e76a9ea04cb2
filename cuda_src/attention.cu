// Paged causal attention: append new K/V into pages, one tensor-core kernel for prefill / chunked
// prefill / decode (split-KV), and the split combine.
//
// Layouts (C-contiguous):
//   q        [total_q, num_heads, head_dim]              fp16/bf16, ragged; q_indptr int32 [batch+1]
//   k_pages  [num_pages, page_size, kv_heads, head_dim]  NHD, same dtype (v_pages likewise)
//   block_table int32 [batch, table_stride]; kv_lens int32 [batch] (keys in the cache, new ones included)
//   out      [total_q, num_heads, head_dim]              q's dtype
//   lse      [total_q, num_heads]                        float32, natural log, -inf for a row seeing no key
//   o_part   [num_splits, n_part_rows, num_heads, head_dim] float32, each split's normalized output
//   lse_part [num_splits, n_part_rows, num_heads]        float32, each split's LSE (-inf: split empty)
//
// GQA packing: the query heads of one KV group are processed by the same CTA so each K/V tile is read
// once per group. A sequence's rows are the pairs (query i, head-in-group h) flattened as
// r = i * group + h; a CTA takes kBlockM = 16 * kWarps consecutive rows (one 16-row mma tile per
// warp) against one kv head. Decode (q_len = 1) is the same kernel with `group` rows per sequence and
// the keys split over gridDim.z CTAs (flash-decoding), merged by combine_splits_kernel.
#include "common/mma.cuh"
#include "common/mask.cuh"
#include "common/paged.cuh"
#include "common/softmax.cuh"
#include "common/types.cuh"

namespace cuflash {
namespace attn {

constexpr int kWarpSize = 32;
constexpr int kMmaM = 16;        // rows of one mma tile = rows per warp
constexpr int kMmaN = 8;         // columns of one mma C tile
constexpr int kMmaK = 16;        // reduction depth of one mma
constexpr int kElemsPerCopy = 8; // fp16/bf16 elements in one 16-byte copy
constexpr int kSmemPad = 8;      // elements (16 B) appended to each smem row: row stride 2*D+16 bytes puts
                                 // the 8 rows one ldmatrix reads in 8 distinct 16-byte bank groups
constexpr int kWorkFields = 3;   // work item: (sequence, row tile, first partial row), int32

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Shared-memory bytes of one variant (the Python side computes the same number).
template <int kHeadDim, int kBlockN, int kWarps, int kStages>
__host__ __device__ constexpr int smem_bytes() {
  return (kMmaM * kWarps + 2 * kStages * kBlockN) * (kHeadDim + kSmemPad) * 2;
}

// Grid: x = work item, y = kv head, z = KV split. Block: kWarps warps.
template <typename T, int kHeadDim, int kBlockN, int kWarps, int kStages>
__global__ void __launch_bounds__(kWarps * kWarpSize)
    paged_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages,
                           const int* __restrict__ block_table, int table_stride, const int* __restrict__ kv_lens,
                           const int* __restrict__ q_indptr, const int* __restrict__ work, int num_heads, int group,
                           int page_size, float scale_log2, int causal, T* __restrict__ out, float* __restrict__ lse,
                           float* __restrict__ o_part, float* __restrict__ lse_part, int n_part_rows) {
  constexpr int kThreads = kWarps * kWarpSize;
  constexpr int kBlockM = kMmaM * kWarps;
  constexpr int kRowElems = kHeadDim + kSmemPad;        // smem row stride, elements
  constexpr int kChunksPerRow = kHeadDim / kElemsPerCopy;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // rows one pass of 16-byte copies covers
  constexpr int kNTiles = kBlockN / kMmaN;                // S = Q K^T column tiles
  constexpr int kDTiles = kHeadDim / kMmaN;               // O column tiles
  constexpr int kKSteps = kHeadDim / kMmaK;
  static_assert(kHeadDim % kMmaK == 0 && kBlockN % kMmaK == 0, "tiles must hold whole mma steps");
  static_assert(kThreads % kChunksPerRow == 0, "a pass must cover whole rows");
  static_assert(kBlockN % kRowsPerPass == 0 && kBlockM % kRowsPerPass == 0, "tiles must be whole passes");
  static_assert(kStages >= 2, "the pipeline needs one tile in flight while another is computed");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBlockM][kRowElems]
  T* sK = sQ + kBlockM * kRowElems;          // [kStages][kBlockN][kRowElems]
  T* sV = sK + kStages * kBlockN * kRowElems;  // [kStages][kBlockN][kRowElems]

  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int seq = work[blockIdx.x * kWorkFields], m_tile = work[blockIdx.x * kWorkFields + 1];
  const int part_base = work[blockIdx.x * kWorkFields + 2];
  const int kv_head = blockIdx.y, num_kv_heads = gridDim.y;
  const int split = blockIdx.z, num_splits = gridDim.z;
  const int q_start = q_indptr[seq], q_len = q_indptr[seq + 1] - q_start;
  const int kv_len = kv_lens[seq];
  const int rows = q_len * group;
  const int m0 = m_tile * kBlockM;
  if (m0 >= rows) return;  // the plan never makes such an item; uniform over the CTA

  // Keys this CTA's rows can see at all: 0 .. n_keys-1 (the tile's last row sees the most).
  const int n_keys = last_visible_key((min(m0 + kBlockM, rows) - 1) / group, q_len, kv_len, causal) + 1;
  const int n_tiles_all = n_keys > 0 ? ceil_div(n_keys, kBlockN) : 0;
  const int tiles_per_split = ceil_div(n_tiles_all, num_splits);
  const int tile_begin = split * tiles_per_split;
  const int n_tiles = max(0, min(n_tiles_all, tile_begin + tiles_per_split) - tile_begin);

  // The two rows this thread owns in the S / O fragments (g and g + 8 of its warp's 16).
  const int warp_row0 = m0 + warp * kMmaM;
  const bool warp_active = warp_row0 < rows;
  int last[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp_row0 + lane / 4 + 8 * i;
    last[i] = r < rows ? last_visible_key(r / group, q_len, kv_len, causal) : -1;
  }
  // Rows grow with r, so the warp's first row sees the fewest keys and its last valid row the most.
  const int warp_min_last = last_visible_key(warp_row0 / group, q_len, kv_len, causal);
  const int warp_max_last = last_visible_key((min(warp_row0 + kMmaM, rows) - 1) / group, q_len, kv_len, causal);

  const int copy_row = tid / kChunksPerRow;                       // + pass * kRowsPerPass
  const int copy_col = (tid % kChunksPerRow) * kElemsPerCopy;     // element column of this thread's chunk

  // Q tile: rows past the sequence's last query are zero-filled, never read from memory.
#pragma unroll
  for (int p = 0; p < kBlockM / kRowsPerPass; ++p) {
    const int row = p * kRowsPerPass + copy_row;
    const int r = m0 + row;
    const bool valid = r < rows;
    const int qi = valid ? r / group : 0;
    const int head = kv_head * group + (valid ? r - qi * group : 0);
    const T* src = q + ((static_cast<long long>(q_start + qi) * num_heads + head) * kHeadDim + copy_col);
    cp_async_16_zfill(sQ + row * kRowElems + copy_col, valid ? src : q, valid);
  }
  cp_async_commit();

  const PagedKV paged{block_table + static_cast<long long>(seq) * table_stride, page_size,
                      static_cast<long long>(num_kv_heads) * kHeadDim, static_cast<long long>(kv_head) * kHeadDim};
  // K and V of key tile `tile` into pipeline stage `stage`; keys >= n_keys are zero-filled (their
  // slots may hold anything, NaN included, and their table entries may be unset).
  auto load_kv = [&](int tile, int stage) {
#pragma unroll
    for (int p = 0; p < kBlockN / kRowsPerPass; ++p) {
      const int row = p * kRowsPerPass + copy_row;
      const int key = tile * kBlockN + row;
      const bool valid = key < n_keys;
      const long long off = valid ? paged.offset(key) + copy_col : 0;
      const int dst = (stage * kBlockN + row) * kRowElems + copy_col;
      cp_async_16_zfill(sK + dst, k_pages + off, valid);
      cp_async_16_zfill(sV + dst, v_pages + off, valid);
    }
  };

  // Prologue: kStages - 1 tiles in flight. Every step commits a group (empty ones too), so the
  // group count, and hence the wait below, is the same for every thread and every tile.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_kv(tile_begin + s, s);
    cp_async_commit();
  }

  float o[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  OnlineSoftmax softmax;
  softmax.init();

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<kStages - 2>();  // this thread's copies of tile j (and of Q) have landed
    __syncthreads();               // everyone's have; and everyone finished tile j-1, whose stage is reused now
    if (j + kStages - 1 < n_tiles) load_kv(tile_begin + j + kStages - 1, (j + kStages - 1) % kStages);
    cp_async_commit();

    const int n0 = (tile_begin + j) * kBlockN;
    // A warp whose rows all end before this tile has nothing to add (every score would be -inf).
    if (!warp_active || n0 > warp_max_last) continue;
    const T* sKs = sK + (j % kStages) * kBlockN * kRowElems;
    const T* sVs = sV + (j % kStages) * kBlockN * kRowElems;

    // S = Q K^T: A from sQ rows (lane % 16), cols +8 for lanes 16..31; the x4 load of K gives the
    // b0/b1 fragments of two 8-key column tiles: keys +(lane % 8) +8 for lanes 16..31, d +8 for
    // lanes 8..15 and 24..31.
    float s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    const T* q_frag = sQ + (warp * kMmaM + lane % 16) * kRowElems + (lane / 16) * 8;
    const T* k_frag = sKs + (lane % 8 + (lane / 16) * 8) * kRowElems + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      unsigned a[4];
      ldmatrix_x4(a, q_frag + ks * kMmaK);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        unsigned b[4];
        ldmatrix_x4(b, k_frag + np * 16 * kRowElems + ks * kMmaK);
        mma_16816<T>(s[2 * np], a, b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
    }
    // Only tiles reaching past the warp's first row's last key need the mask.
    if (n0 + kBlockN - 1 > warp_min_last) apply_mask(s, n0, lane % 4, last);
    softmax.update(s, o);

    // O += P V: P's C fragments of column tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk;
    // the transposed x4 load of V gives b0/b1 of two 8-wide d tiles: keys +(lane % 8) +8 for lanes
    // 8..15 and 24..31, d +8 for lanes 16..31.
    const T* v_frag = sVs + (lane % 8 + ((lane / 8) % 2) * 8) * kRowElems + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < kBlockN / kMmaK; ++kk) {
      unsigned a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        unsigned b[4];
        ldmatrix_x4_trans(b, v_frag + kk * 16 * kRowElems + dp * 16);
        mma_16816<T>(o[2 * dp], a, b[0], b[1]);
        mma_16816<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; drained so no copy outlives the CTA
  if (!warp_active) return;

  float row_lse[2];
  softmax.finalize(o, row_lse);
  const int t2 = 2 * (lane % 4);  // this thread's first column inside each 8-wide d tile
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp_row0 + lane / 4 + 8 * i;
    if (r >= rows) continue;
    const int qi = r / group;
    const int head = kv_head * group + (r - qi * group);
    if (num_splits == 1) {
      const long long row_index = static_cast<long long>(q_start + qi) * num_heads + head;
      T* dst = out + row_index * kHeadDim + t2;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d)
        *reinterpret_cast<unsigned*>(dst + d * kMmaN) = pack2<T>(o[d][2 * i], o[d][2 * i + 1]);
      if (lane % 4 == 0) lse[row_index] = row_lse[i];
    } else {
      const long long part_index = (static_cast<long long>(split) * n_part_rows + part_base + qi) * num_heads + head;
      float* dst = o_part + part_index * kHeadDim + t2;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d)
        *reinterpret_cast<float2*>(dst + d * kMmaN) = make_float2(o[d][2 * i], o[d][2 * i + 1]);
      if (lane % 4 == 0) lse_part[part_index] = row_lse[i];
    }
  }
}

// Merges the splits of each (partial row, head): out = sum_s w_s o_s / sum_s w_s with
// w_s = exp(lse_s - max lse), lse = max lse + ln(sum w_s). A split that saw no key (lse -inf) has
// weight 0 and its o is not read; a row no split saw gets 0 and -inf.
// Grid: x = partial row, y = head. Block: head_dim threads, one output element each.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kHeadDim)
    combine_splits_kernel(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                          const int* __restrict__ part_qrow, int n_part_rows, int num_heads, int num_splits,
                          T* __restrict__ out, float* __restrict__ lse) {
  const int prow = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
  const long long stride = static_cast<long long>(n_part_rows) * num_heads;  // between splits, in rows
  const long long first = static_cast<long long>(prow) * num_heads + head;
  float mx = -CUDART_INF_F;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, lse_part[first + s * stride]);
  float acc = 0.0f, wsum = 0.0f;
  if (mx != -CUDART_INF_F) {
    for (int s = 0; s < num_splits; ++s) {
      const float l = lse_part[first + s * stride];
      if (l == -CUDART_INF_F) continue;
      const float w = __expf(l - mx);
      wsum += w;
      acc += w * o_part[(first + s * stride) * kHeadDim + d];
    }
  }
  const long long row_index = static_cast<long long>(part_qrow[prow]) * num_heads + head;
  out[row_index * kHeadDim + d] = from_float<T>(wsum > 0.0f ? acc / wsum : 0.0f);
  if (d == 0) lse[row_index] = wsum > 0.0f ? mx + __logf(wsum) : -CUDART_INF_F;
}

// Writes new tokens' K and V into their pages. new_k / new_v: [total_new, kv_heads, head_dim] as
// 16-byte vectors (dtype-agnostic: token_vecs = kv_heads * head_dim * elem_bytes / 16 per token).
// Token t belongs to the sequence b with append_indptr[b] <= t < append_indptr[b+1] and lands at
// position kv_lens[b] - (its sequence's new count) + (t - append_indptr[b]), i.e. the new tokens are
// the last ones of the (already updated) length. Grid: x = token. Block: any size.
__global__ void paged_kv_append_kernel(const uint4* __restrict__ new_k, const uint4* __restrict__ new_v,
                                       uint4* __restrict__ k_pages, uint4* __restrict__ v_pages,
                                       const int* __restrict__ block_table, int table_stride,
                                       const int* __restrict__ kv_lens, const int* __restrict__ append_indptr,
                                       int batch, int page_size, int token_vecs) {
  const int t = blockIdx.x;
  int lo = 0, hi = batch - 1;  // smallest b with append_indptr[b + 1] > t
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (append_indptr[mid + 1] <= t) lo = mid + 1; else hi = mid;
  }
  const int b = lo;
  const int pos = kv_lens[b] - (append_indptr[b + 1] - append_indptr[b]) + (t - append_indptr[b]);
  const int page = block_table[static_cast<long long>(b) * table_stride + pos / page_size];
  const long long dst = (static_cast<long long>(page) * page_size + pos % page_size) * token_vecs;
  const long long src = static_cast<long long>(t) * token_vecs;
  for (int v = threadIdx.x; v < token_vecs; v += blockDim.x) {
    k_pages[dst + v] = new_k[src + v];
    v_pages[dst + v] = new_v[src + v];
  }
}

// Opt-in device check of the tables a launch would read: every kv_len in [0, table_stride *
// page_size] and every page id a sequence uses in [0, num_pages). The first offence found goes to
// error = {1, sequence, table column (-1: the length itself), offending value}; error starts zeroed.
__global__ void paged_table_check_kernel(const int* __restrict__ block_table, int table_stride,
                                         const int* __restrict__ kv_lens, int batch, int page_size, int num_pages,
                                         int* __restrict__ error) {
  const long long total = static_cast<long long>(batch) * (table_stride + 1);
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(i / (table_stride + 1));
    const int col = static_cast<int>(i % (table_stride + 1)) - 1;  // -1: check the length
    const int len = kv_lens[b];
    int bad_value = 0;
    bool bad = false;
    if (col < 0) {
      bad = len < 0 || static_cast<long long>(len) > static_cast<long long>(table_stride) * page_size;
      bad_value = len;
    } else if (len > 0 && col < ceil_div(len, page_size)) {
      bad_value = block_table[static_cast<long long>(b) * table_stride + col];
      bad = bad_value < 0 || bad_value >= num_pages;
    }
    if (bad && atomicCAS(error, 0, 1) == 0) {
      error[1] = b;
      error[2] = col;
      error[3] = bad_value;
    }
  }
}

}  // namespace attn
}  // namespace cuflash
