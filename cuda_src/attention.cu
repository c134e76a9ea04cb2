// Paged causal attention: append new K/V into pages, one tensor-core kernel for prefill / chunked
// prefill / decode (split-KV, the splits merged by the last CTA of each to finish).
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
// the keys split over gridDim.z CTAs (flash-decoding), merged by the last split CTA to finish
// (Outputs::merge_splits).
//
// kSplitKeys (sequences of at most 16 rows, i.e. decode): every warp takes the same 16 rows and its own
// kBlockN / kWarps keys of each tile, with its own softmax state; the warps' states merge through shared
// memory at the end. With one row tile per warp instead, a decode CTA would do all its tensor work on
// one warp while the others only copy.
#include "common/mbarrier.cuh"
#include "common/mma.cuh"
#include "common/last_arrival.cuh"
#include "common/mask.cuh"
#include "common/paged.cuh"
#include "common/softmax.cuh"
#include "common/types.cuh"
#include "common/wgmma.cuh"

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

// Rows of one CTA: one 16-row mma tile per warp, or one shared by all warps when they split the keys.
template <int kWarps, bool kSplitKeys>
__host__ __device__ constexpr int block_rows() {
  return kSplitKeys ? kMmaM : kMmaM * kWarps;
}

// One CTA's work: the sequence, kv head and KV split it serves (grid y, z), its packed rows m0 ..
// m0 + kBlockM - 1 (row r = query r / group, head r % group of the kv head's group) and its key tiles.
struct WorkItem {
  int seq, part_base, kv_head, split, num_splits;
  int q_start, q_len, kv_len, rows, m0;
  int num_heads, group, causal;
  int n_keys;      // keys any of the rows sees: 0 .. n_keys - 1 (the last row sees the most)
  int tile_begin;  // first key tile of this split
  int n_tiles;     // key tiles of this split

  // Last key packed row r sees, -1 for a row past the sequence (or one that sees none).
  __device__ __forceinline__ int last_key(int r) const {
    return r < rows ? last_visible_key(r / group, q_len, kv_len, causal) : -1;
  }
  // (query, head) row of packed row r when this sequence's queries start at row `first` of a
  // [queries, num_heads] array: q / out / lse (first = q_start) or one split's partials.
  __device__ __forceinline__ long long head_row(long long first, int r) const {
    const int qi = r / group;
    return (first + qi) * num_heads + kv_head * group + (r - qi * group);
  }
  // Row of q / out / lse ([total_q * num_heads]) of packed row r < rows.
  __device__ __forceinline__ long long q_row(int r) const { return head_row(q_start, r); }
};

// The work item of this CTA (work[blockIdx.x] = (sequence, row tile, first partial row)); the caller
// returns at once when m0 >= rows (the plan never makes such an item). work == nullptr: a decode-only
// launch (one query per sequence, every sequence one item): item blockIdx.x is sequence blockIdx.x, row
// tile 0, partial row blockIdx.x, read from no table, so the first K/V copies wait on one dependent load
// (kv_lens) before the block table instead of three (work, q_indptr / kv_lens, block table).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ WorkItem load_work_item(const int* __restrict__ work, const int* __restrict__ q_indptr,
                                                   const int* __restrict__ kv_lens, int num_heads, int group,
                                                   int causal) {
  WorkItem w;
  if (work == nullptr) {
    w.seq = w.part_base = w.q_start = blockIdx.x;
    w.m0 = 0;
    w.q_len = 1;
  } else {
    w.seq = work[blockIdx.x * kWorkFields];
    w.m0 = work[blockIdx.x * kWorkFields + 1] * kBlockM;
    w.part_base = work[blockIdx.x * kWorkFields + 2];
    w.q_start = q_indptr[w.seq];
    w.q_len = q_indptr[w.seq + 1] - w.q_start;
  }
  w.kv_head = blockIdx.y;
  w.split = blockIdx.z;
  w.num_splits = gridDim.z;
  w.kv_len = kv_lens[w.seq];
  w.rows = w.q_len * group;
  w.num_heads = num_heads;
  w.group = group;
  w.causal = causal;
  w.n_keys = w.m0 < w.rows ? w.last_key(min(w.m0 + kBlockM, w.rows) - 1) + 1 : 0;
  const int n_tiles_all = w.n_keys > 0 ? ceil_div(w.n_keys, kBlockN) : 0;
  const int tiles_per_split = ceil_div(n_tiles_all, w.num_splits);
  w.tile_begin = w.split * tiles_per_split;
  w.n_tiles = max(0, min(n_tiles_all, w.tile_begin + tiles_per_split) - w.tile_begin);
  return w;
}

// Where one packed row's results go: its row of `out` / `lse` with one split, else this split's row
// of the partials (o_part fp32, lse_part) for Outputs::merge_splits.
template <typename T>
struct RowSink {
  T* out;      // one split: the row's output (q's dtype) ...
  float* o;    // ... several: its fp32 partial
  float* lse;

  __device__ __forceinline__ void pair(int col, float a, float b) const {
    if (out != nullptr) *reinterpret_cast<unsigned*>(out + col) = pack2<T>(a, b);
    else *reinterpret_cast<float2*>(o + col) = make_float2(a, b);
  }
};

template <typename T, int kHeadDim>
struct Outputs {
  T* out;
  float* lse;
  float* o_part;
  float* lse_part;
  int n_part_rows;
  int* counters;  // [work items, kv heads]: splits of the item done so far (0 between launches)

  __device__ __forceinline__ RowSink<T> row(const WorkItem& w, int r) const {
    if (w.num_splits == 1) {
      const long long i = w.q_row(r);
      return {out + i * kHeadDim, nullptr, lse + i};
    }
    const long long i = w.head_row(static_cast<long long>(w.split) * n_part_rows + w.part_base, r);
    return {nullptr, o_part + i * kHeadDim, lse_part + i};
  }

  // Rows r0 (g) and r0 + 8 of an mma / wgmma C fragment: o[d][2i], o[d][2i + 1] are columns 8d + 2t, +1
  // of row r0 + 8i; the LSE comes from the quad's first lane (t = 0).
  template <int kDTiles>
  __device__ __forceinline__ void store_fragment(const WorkItem& w, int r0, int t, const float (&o)[kDTiles][4],
                                                 const float (&row_lse)[2]) const {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = r0 + 8 * i;
      if (r >= w.rows) continue;
      const RowSink<T> dst = row(w, r);
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) dst.pair(d * kMmaN + 2 * t, o[d][2 * i], o[d][2 * i + 1]);
      if (t == 0) *dst.lse = row_lse[i];
    }
  }

  // The split-KV combine, fused: once every thread of the CTA has written its partials, the last of
  // the num_splits CTAs of this (work item, kv head) to finish merges all splits of the item's rows:
  // out = sum_s w_s o_s / sum_s w_s, w_s = exp(lse_s - max lse), lse = max lse + ln(sum_s w_s). A
  // split that saw no key (lse -inf) has weight 0; a row no split saw gets 0 and -inf. That CTA puts
  // the counter back to 0, so the next launch (a CUDA graph replay) starts clean. `scratch`: 16 bytes
  // of shared memory no thread uses any more; `sync`: a barrier of the kThreads threads calling this
  // (thread index tid). A separate combine kernel cost B=1 S=32768 decode a second launch and its ramp
  // (H100: ~7 us of ~70).
  //
  // This runs on the critical path of the last split to finish, so it is written for latency: one
  // fence and one atomic by one thread (arrive_is_last, after a barrier), then every partial a thread
  // needs (its (row, float4 column) pairs of kSplitStep splits, and their LSEs) loaded at once and
  // folded in split order with a running max, so one L2 round trip per kSplitStep splits. (A first LSE pass for the weights, then the partials,
  // took two.) Every pair is merged at once: one row after another cost a 128-row prefill item ~2
  // dependent L2 round trips per row (H100, S=16384 with 2 splits: 5.8 -> 6.3 ms).
  template <int kBlockM, int kThreads, typename Sync>
  __device__ __forceinline__ void merge_splits(const WorkItem& w, unsigned char* scratch, int tid, Sync sync) const {
    constexpr int kQuads = kHeadDim / 4;  // float4 columns of a row
    // kChunk pairs x kSplitStep splits = 16 partial loads in flight per thread. Decode (16-row items):
    // 1 x 16, so a GQA group of 4 heads merges 16 splits in one round trip (2 x 8, sized for 16 rows, took
    // two); a 128-row prefill item: 8 x 2.
    constexpr int kPairsPerThread = ceil_div(kBlockM * kQuads, kThreads);
    constexpr int kChunk = kBlockM <= kMmaM ? 1 : (kPairsPerThread < 8 ? kPairsPerThread : 8);
    constexpr int kSplitStep = 16 / kChunk;
    constexpr int kPairsPerPass = kThreads * kChunk;
    sync();  // every thread's partials are stored
    int* is_last = reinterpret_cast<int*>(scratch);
    if (tid == 0) *is_last = arrive_is_last(counters + blockIdx.x * gridDim.y + blockIdx.y, w.num_splits);
    sync();
    if (!*is_last) return;
    const int ns = w.num_splits, n_pairs = min(kBlockM, w.rows - w.m0) * kQuads;
    const long long split_rows = static_cast<long long>(n_part_rows) * w.num_heads;  // partial rows per split
    for (int base = 0; base < n_pairs; base += kPairsPerPass) {
      float mx[kChunk], sum[kChunk];
      float4 acc[kChunk];
      long long prow[kChunk];  // partial row (split 0) of the pair's row; -1: no pair
      int col[kChunk];         // float4 column
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        const int p = base + k * kThreads + tid;
        prow[k] = p < n_pairs ? w.head_row(w.part_base, w.m0 + p / kQuads) : -1;
        col[k] = p % kQuads;
        mx[k] = -CUDART_INF_F;
        sum[k] = 0.0f;
        acc[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
      for (int s0 = 0; s0 < ns; s0 += kSplitStep) {
        float l[kChunk][kSplitStep];
        float4 v[kChunk][kSplitStep];
#pragma unroll
        for (int k = 0; k < kChunk; ++k) {
#pragma unroll
          for (int u = 0; u < kSplitStep; ++u) {
            const long long r = prow[k] + (s0 + u) * split_rows;
            const bool ok = prow[k] >= 0 && s0 + u < ns;
            l[k][u] = ok ? __ldcg(lse_part + r) : -CUDART_INF_F;
            v[k][u] = ok ? __ldcg(reinterpret_cast<const float4*>(o_part) + r * kQuads + col[k])
                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          }
        }
#pragma unroll
        for (int k = 0; k < kChunk; ++k) {
          float m = mx[k];
#pragma unroll
          for (int u = 0; u < kSplitStep; ++u) m = fmaxf(m, l[k][u]);
          if (m == -CUDART_INF_F) continue;  // no split so far saw a key
          const float a = __expf(mx[k] - m);  // 0 while mx is -inf
          sum[k] *= a;
          acc[k] = make_float4(acc[k].x * a, acc[k].y * a, acc[k].z * a, acc[k].w * a);
#pragma unroll
          for (int u = 0; u < kSplitStep; ++u) {
            if (l[k][u] == -CUDART_INF_F) continue;  // an empty split: weight 0
            const float e = __expf(l[k][u] - m);
            sum[k] += e;
            acc[k].x += e * v[k][u].x;
            acc[k].y += e * v[k][u].y;
            acc[k].z += e * v[k][u].z;
            acc[k].w += e * v[k][u].w;
          }
          mx[k] = m;
        }
      }
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        if (prow[k] < 0) continue;
        const int r = w.m0 + (base + k * kThreads + tid) / kQuads;
        const float inv = sum[k] > 0.0f ? 1.0f / sum[k] : 0.0f;
        *reinterpret_cast<uint2*>(out + w.q_row(r) * kHeadDim + 4 * col[k]) =
            make_uint2(pack2<T>(acc[k].x * inv, acc[k].y * inv), pack2<T>(acc[k].z * inv, acc[k].w * inv));
        if (col[k] == 0) lse[w.q_row(r)] = sum[k] > 0.0f ? mx[k] + __logf(sum[k]) : -CUDART_INF_F;
      }
    }
  }
};

// Grid: x = work item, y = kv head, z = KV split. Block: kWarps warps.
template <typename T, int kHeadDim, int kBlockN, int kWarps, int kStages, bool kSplitKeys>
__global__ void __launch_bounds__(kWarps * kWarpSize)
    paged_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages,
                           const int* __restrict__ block_table, int table_stride, const int* __restrict__ kv_lens,
                           const int* __restrict__ q_indptr, const int* __restrict__ work, int num_heads, int group,
                           int page_size, float scale_log2, int causal, T* __restrict__ out, float* __restrict__ lse,
                           float* __restrict__ o_part, float* __restrict__ lse_part, int n_part_rows,
                           int* __restrict__ counters) {
  constexpr int kThreads = kWarps * kWarpSize;
  constexpr int kBlockM = block_rows<kWarps, kSplitKeys>();
  constexpr int kWarpKeys = kSplitKeys ? kBlockN / kWarps : kBlockN;  // keys of a tile one warp takes
  constexpr int kRowElems = kHeadDim + kSmemPad;        // smem row stride, elements
  constexpr int kChunksPerRow = kHeadDim / kElemsPerCopy;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // rows one pass of 16-byte copies covers
  constexpr int kNTiles = kWarpKeys / kMmaN;              // S = Q K^T column tiles of one warp
  constexpr int kDTiles = kHeadDim / kMmaN;               // O column tiles
  constexpr int kKSteps = kHeadDim / kMmaK;
  static_assert(kHeadDim % kMmaK == 0 && kWarpKeys % kMmaK == 0, "tiles must hold whole mma steps");
  static_assert(kThreads % kChunksPerRow == 0, "a pass must cover whole rows");
  static_assert(kBlockN % kRowsPerPass == 0 && kBlockM % kRowsPerPass == 0, "tiles must be whole passes");
  static_assert(kStages >= 2, "the pipeline needs one tile in flight while another is computed");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBlockM][kRowElems]
  T* sK = sQ + kBlockM * kRowElems;          // [kStages][kBlockN][kRowElems]
  T* sV = sK + kStages * kBlockN * kRowElems;  // [kStages][kBlockN][kRowElems]

  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const WorkItem w = load_work_item<kBlockM, kBlockN>(work, q_indptr, kv_lens, num_heads, group, causal);
  if (w.m0 >= w.rows) return;  // uniform over the CTA
  const int m0 = w.m0, rows = w.rows, n_keys = w.n_keys, tile_begin = w.tile_begin, n_tiles = w.n_tiles;
  const Outputs<T, kHeadDim> outs{out, lse, o_part, lse_part, n_part_rows, counters};

  // The two rows this thread owns in the S / O fragments (g and g + 8 of its warp's 16), and the first
  // key of a tile this warp takes.
  const int warp_row0 = m0 + (kSplitKeys ? 0 : warp * kMmaM);
  const int warp_key0 = kSplitKeys ? warp * kWarpKeys : 0;
  const bool warp_active = warp_row0 < rows;
  const int last[2] = {w.last_key(warp_row0 + lane / 4), w.last_key(warp_row0 + lane / 4 + 8)};
  // Rows grow with r, so the warp's first row sees the fewest keys and its last valid row the most
  // (only used while the warp is active).
  const int warp_min_last = w.last_key(warp_row0);
  const int warp_max_last = w.last_key(min(warp_row0 + kMmaM, rows) - 1);

  const int copy_row = tid / kChunksPerRow;                       // + pass * kRowsPerPass
  const int copy_col = (tid % kChunksPerRow) * kElemsPerCopy;     // element column of this thread's chunk

  // Q tile: rows past the sequence's last query are zero-filled, never read from memory.
#pragma unroll
  for (int p = 0; p < kBlockM / kRowsPerPass; ++p) {
    const int row = p * kRowsPerPass + copy_row;
    const bool valid = m0 + row < rows;
    const T* src = valid ? q + w.q_row(m0 + row) * kHeadDim + copy_col : q;
    cp_async_16_zfill(sQ + row * kRowElems + copy_col, src, valid);
  }
  cp_async_commit();

  const PagedKV paged(block_table + static_cast<long long>(w.seq) * table_stride, page_size, gridDim.y, kHeadDim,
                      w.kv_head);
  // K and V of key tile `tile` into pipeline stage `stage`; keys >= n_keys are zero-filled (their
  // slots may hold anything, NaN included, and their table entries may be unset).
  // Decode reads each K/V byte once per call: its lines go first from L2, so streaming the cache does
  // not push out (and force the write-back of) what other kernels left there (H100, B=1 S=32768 behind
  // a 100 MB write: 71 -> 67 us, GPU time).
  const unsigned long long stream_policy = kSplitKeys ? l2_evict_first_policy() : 0ull;
  auto load_kv = [&](int tile, int stage) {
    PageWalk<kRowsPerPass> walk(tile * kBlockN + copy_row, page_size);
#pragma unroll
    for (int p = 0; p < kBlockN / kRowsPerPass; ++p) {
      const int row = p * kRowsPerPass + copy_row;
      const int key = tile * kBlockN + row;
      const bool valid = key < n_keys;
      const long long off = valid ? paged.offset(walk.entry, walk.in_page) + copy_col : 0;
      walk.advance();
      const int dst = (stage * kBlockN + row) * kRowElems + copy_col;
      if constexpr (kSplitKeys) {
        cp_async_16_zfill_hint(sK + dst, k_pages + off, valid, stream_policy);
        cp_async_16_zfill_hint(sV + dst, v_pages + off, valid, stream_policy);
      } else {
        cp_async_16_zfill(sK + dst, k_pages + off, valid);
        cp_async_16_zfill(sV + dst, v_pages + off, valid);
      }
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

    const int n0 = (tile_begin + j) * kBlockN + warp_key0;  // this warp's first key of the tile
    // A warp whose rows all end before its keys has nothing to add (every score would be -inf).
    if (!warp_active || n0 > warp_max_last) continue;
    const T* sKs = sK + (j % kStages) * kBlockN * kRowElems;
    const T* sVs = sV + (j % kStages) * kBlockN * kRowElems;

    // S = Q K^T: A from sQ rows (lane % 16), cols +8 for lanes 16..31; the x4 load of K gives the
    // b0/b1 fragments of two 8-key column tiles: keys +(lane % 8) +8 for lanes 16..31, d +8 for
    // lanes 8..15 and 24..31.
    float s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    const T* q_frag = sQ + (warp_row0 - m0 + lane % 16) * kRowElems + (lane / 16) * 8;
    const T* k_frag = sKs + (warp_key0 + lane % 8 + (lane / 16) * 8) * kRowElems + ((lane / 8) % 2) * 8;
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
    if (n0 + kWarpKeys - 1 > warp_min_last) apply_mask(s, n0, lane % 4, last);
    softmax.update(s, o);

    // O += P V: P's C fragments of column tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk;
    // the transposed x4 load of V gives b0/b1 of two 8-wide d tiles: keys +(lane % 8) +8 for lanes
    // 8..15 and 24..31, d +8 for lanes 16..31.
    const T* v_frag = sVs + (warp_key0 + lane % 8 + ((lane / 8) % 2) * 8) * kRowElems + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < kWarpKeys / kMmaK; ++kk) {
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
  if constexpr (kSplitKeys) {
    // Merge the warps' states: M = max_w m_w, L = sum_w 2^(m_w - M) l_w, O = sum_w 2^(m_w - M) o_w / L.
    // Rows kMergeStride floats apart: a store of 8 rows x 4 column pairs then takes the minimum 2 shared
    // memory wavefronts (rows kHeadDim apart: 8, all rows on the same banks; H100, B=1 S=32768: this
    // merge took ~1.8 us of the last CTA's tail). Rows past the sequence are neither stored nor merged.
    constexpr int kMergeStride = kHeadDim + 8;
    __syncthreads();  // every warp is done with sQ / sK / sV, which the merge buffers reuse
    float* m_o = reinterpret_cast<float*>(smem_raw);          // [kWarps][kMmaM][kMergeStride], unnormalized
    float* m_max = m_o + kWarps * kMmaM * kMergeStride;       // [kWarps][kMmaM], log2 domain
    float* m_sum = m_max + kWarps * kMmaM;                    // [kWarps][kMmaM]
    const int t2 = 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = lane / 4 + 8 * i;
      const float l_row = quad_sum(softmax.l[i]);  // a warp collective: before the lanes part
      if (m0 + row >= rows) continue;
      float* dst = m_o + (warp * kMmaM + row) * kMergeStride + t2;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) *reinterpret_cast<float2*>(dst + d * kMmaN) = make_float2(o[d][2 * i], o[d][2 * i + 1]);
      if (lane % 4 == 0) {
        m_max[warp * kMmaM + row] = softmax.m[i];
        m_sum[warp * kMmaM + row] = l_row;
      }
    }
    __syncthreads();
    // Thread -> (row, column pair): kMmaM * kHeadDim / 2 pairs over kThreads threads.
    for (int e = tid; e < kMmaM * kHeadDim / 2; e += kThreads) {
      const int row = e / (kHeadDim / 2), col = 2 * (e % (kHeadDim / 2));
      const int r = m0 + row;
      if (r >= rows) continue;
      // Every warp's state loaded first (independent loads, no branch between them), then folded.
      float mw[kWarps], sw[kWarps];
      float2 ow[kWarps];
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int wp = 0; wp < kWarps; ++wp) {
        mw[wp] = m_max[wp * kMmaM + row];
        sw[wp] = m_sum[wp * kMmaM + row];
        ow[wp] = *reinterpret_cast<const float2*>(m_o + (wp * kMmaM + row) * kMergeStride + col);
        mx = fmaxf(mx, mw[wp]);
      }
      float l_all = 0.0f, o0 = 0.0f, o1 = 0.0f;
      if (mx != -CUDART_INF_F) {
#pragma unroll
        for (int wp = 0; wp < kWarps; ++wp) {
          if (sw[wp] == 0.0f) continue;  // a warp that saw no key (its max may be -inf)
          const float f = fast_exp2(mw[wp] - mx);
          l_all += f * sw[wp];
          o0 += f * ow[wp].x;
          o1 += f * ow[wp].y;
        }
      }
      const bool seen = l_all > 0.0f;
      const float inv = seen ? 1.0f / l_all : 0.0f;
      const RowSink<T> dst = outs.row(w, r);
      dst.pair(col, o0 * inv, o1 * inv);
      if (col == 0) *dst.lse = seen ? (mx + __log2f(l_all)) * kLn2 : -CUDART_INF_F;
    }
  } else if (warp_active) {
    float row_lse[2];
    softmax.finalize(o, row_lse);
    outs.store_fragment(w, warp_row0 + lane / 4, lane % 4, o, row_lse);
  }
  if (w.num_splits > 1) outs.template merge_splits<kBlockM, kThreads>(w, smem_raw, tid, [] { __syncthreads(); });
}

// Hopper (sm_90a) prefill: warp-specialized wgmma kernel, same arguments, work items, masks and
// outputs as paged_attention_kernel (kBlockM = 128 rows per CTA).
//
// Warpgroup 0 (producer) copies K and V tiles of kBlockN keys with cp.async (any page size, pages in
// any order) into a ring of kStages slots, publishing each with cp.async.mbarrier.arrive.noinc on the
// slot's `full` barrier; consumers release a slot on its `empty` barrier (one arrival per thread).
// Warpgroups 1 and 2 (consumers) each own 64 rows; their Q fragments stay in registers for the whole
// CTA (loaded once from global memory). Per key tile: S = Q K^T (wgmma m64 n kBlockN, A = Q from
// registers, B = K K-major), scale, causal mask, online softmax (common/softmax.cuh: the wgmma
// accumulator layout is the mma.m16n8 C layout per 8 columns), P packed to 16 bits in registers, then
// O += P V (wgmma m64 n kHeadDim, A = P, B = V MN-major: V's rows are keys, 64 d values per 128 bytes).
//
// K and V tiles share one shared-memory layout: a key row's 64-value (128-byte) column block h at
// h * kBlockN * 128 + key * 128, its 16-byte chunk c at chunk position c ^ (key % 8) (the 128-byte
// swizzle; slots 1024-byte aligned). For K (K-major B) the 8-key atoms are SBO = 1024 apart and a d
// step of 16 moves 32 bytes inside the block (the next block at s / 4); for V (MN-major B) a key step
// of 16 is two atoms (2048 bytes), SBO = 1024 between 8-key atoms, LBO = kBlockN * 128 between
// 64-wide d blocks.
constexpr int kWsConsumers = 2;
constexpr int kWsThreads = (1 + kWsConsumers) * kWarpgroupThreads;  // 384
constexpr int kWsBlockM = kWsConsumers * kWgmmaM;                  // 128 rows per CTA
// setmaxnreg split: the CTA starts with 168 registers per thread (65536 / 384 rounded down to 8), and
// the split must fit in those 168 x 384 = 64512 (a split of 65536 deadlocks: gemm.cu, session 7).
// The producer keeps a whole tile's row addresses in flight (fully unrolled copy loop: H100, B=1
// S=4096 prefill 465 -> 424 us against unroll 4; copies alone 331 -> 294 us).
constexpr int kWsProducerRegs = 56;
constexpr int kWsConsumerRegs = 224;
constexpr int kWsLaunchRegs = (65536 / kWsThreads) / 8 * 8;
static_assert(kWarpgroupThreads * (kWsProducerRegs + kWsConsumers * kWsConsumerRegs) <= kWsThreads * kWsLaunchRegs,
              "the register split must fit in the registers the CTA is launched with");

template <int kHeadDim, int kBlockN, int kStages>
struct WsLayout {
  static constexpr int kBlockBytes = kBlockN * 128;       // one column block of a tile
  static constexpr int kTileBytes = kBlockN * kHeadDim * 2;
  static constexpr int kSlotBytes = 2 * kTileBytes;       // K tile, then V tile
  // Dynamic shared memory (AttentionConfig.smem_bytes): alignment slack, the ring, full and empty barriers.
  static constexpr int kRingBytes = kStages * kSlotBytes;
  static_assert(kHeadDim % 64 == 0, "whole 128-byte column blocks");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma N: a multiple of 16 up to 256");
  // Byte offset of 16-byte chunk c (values 8c .. 8c+7) of key row r inside a tile.
  __device__ __forceinline__ static int chunk_offset(int r, int c) {
    return (c / 8) * kBlockBytes + r * 128 + (((c % 8) ^ (r % 8)) << 4);
  }
};

// kSplitMerge: the variant launched with several KV splits (gridDim.z > 1), which merges them at the
// end; the plain one leaves the merge's code out of the kernel (H100, B=8 S=2048 prefill: ~2% faster).
template <typename T, int kHeadDim, int kBlockN, int kStages, bool kSplitMerge>
__global__ void __launch_bounds__(kWsThreads, 1)
    paged_attention_wgmma_kernel(const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages,
                                 const int* __restrict__ block_table, int table_stride, const int* __restrict__ kv_lens,
                                 const int* __restrict__ q_indptr, const int* __restrict__ work, int num_heads,
                                 int group, int page_size, float scale_log2, int causal, T* __restrict__ out,
                                 float* __restrict__ lse, float* __restrict__ o_part, float* __restrict__ lse_part,
                                 int n_part_rows, int* __restrict__ counters) {
  using L = WsLayout<kHeadDim, kBlockN, kStages>;
  constexpr int kBlockM = kWsBlockM;
  constexpr int kChunksPerRow = kHeadDim / kElemsPerCopy;
  constexpr int kNTiles = kBlockN / kMmaN;  // S column tiles of 8 keys
  constexpr int kDTiles = kHeadDim / kMmaN;
  constexpr int kDSteps = kHeadDim / kMmaK;  // wgmma k steps of S = Q K^T
  constexpr int kKeySteps = kBlockN / kMmaK; // wgmma k steps of O += P V
  static_assert((kBlockN * kChunksPerRow) % kWarpgroupThreads == 0, "the producer copies whole passes");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const unsigned raw_addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw));
  unsigned char* ring = smem_raw + ((kSwizzleAtomBytes - raw_addr % kSwizzleAtomBytes) % kSwizzleAtomBytes);
  unsigned long long* full = reinterpret_cast<unsigned long long*>(ring + L::kRingBytes);
  unsigned long long* empty = full + kStages;

  const int tid = threadIdx.x;
  if (!kSplitMerge && gridDim.z > 1) __trap();  // the plan launches the merging variant for splits
  const WorkItem w = load_work_item<kBlockM, kBlockN>(work, q_indptr, kv_lens, num_heads, group, causal);
  if (w.m0 >= w.rows) return;  // uniform over the CTA
  const int n_tiles = w.n_tiles;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], kWarpgroupThreads);
      mbar_init(&empty[s], kWsConsumers * kWarpgroupThreads);
    }
  }
  __syncthreads();

  if (tid < kWarpgroupThreads) {
    // Producer: tile j of this split into slot j % kStages once its previous use is released. Thread
    // tid copies chunk tid % kChunksPerRow of rows tid / kChunksPerRow + p * kRowsPerPass.
    warpgroup_release_registers<kWsProducerRegs>();
    constexpr int kRowsPerPass = kWarpgroupThreads / kChunksPerRow;
    const PagedKV paged(block_table + static_cast<long long>(w.seq) * table_stride, page_size, gridDim.y, kHeadDim,
                        w.kv_head);
    const int c = tid % kChunksPerRow, row0 = tid / kChunksPerRow;
    for (int j = 0; j < n_tiles; ++j) {
      const int slot = j % kStages;
      if (j >= kStages) mbar_wait(&empty[slot], ((j / kStages) - 1) & 1);
      unsigned char* k_tile = ring + slot * L::kSlotBytes;
      unsigned char* v_tile = k_tile + L::kTileBytes;
      // This thread's keys: key0 + p * kRowsPerPass (one division per tile, not per row).
      const int key0 = (w.tile_begin + j) * kBlockN + row0;
      PageWalk<kRowsPerPass> walk(key0, page_size);
#pragma unroll
      for (int p = 0; p < kBlockN / kRowsPerPass; ++p) {
        const int r = row0 + p * kRowsPerPass;
        const bool valid = key0 + p * kRowsPerPass < w.n_keys;  // keys past the last visible one: zero-filled
        const long long off = valid ? paged.offset(walk.entry, walk.in_page) + c * kElemsPerCopy : 0;
        walk.advance();
        const int dst = L::chunk_offset(r, c);
        cp_async_16_zfill(k_tile + dst, k_pages + off, valid);
        cp_async_16_zfill(v_tile + dst, v_pages + off, valid);
      }
      cp_async_mbar_arrive(&full[slot]);  // fires once this thread's copies so far have landed
    }
    cp_async_commit();  // leave no copy of this thread in flight at exit
    cp_async_wait<0>();
    return;
  }

  warpgroup_claim_registers<kWsConsumerRegs>();
  const int ct = tid - kWarpgroupThreads;            // consumer thread 0 .. 255
  const int warp = ct / kWarpSize, lane = ct % kWarpSize, g = lane / 4, t = lane % 4;
  const int warp_row0 = w.m0 + warp * kMmaM;         // warps 0-3: rows 0-63 (warpgroup 1), 4-7: 64-127
  const int last[2] = {w.last_key(warp_row0 + g), w.last_key(warp_row0 + g + 8)};
  const int warp_min_last = w.last_key(warp_row0);

  // Q fragments (A of S = Q K^T), k step s: registers (row g, d 16s + 2t), (row g + 8, same),
  // (row g, d 16s + 8 + 2t), (row g + 8, same); rows past the sequence are zero.
  unsigned qf[kDSteps][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp_row0 + g + 8 * i;
    const bool valid = r < w.rows;
    const unsigned* src = reinterpret_cast<const unsigned*>(q + (valid ? w.q_row(r) : 0) * kHeadDim) + t;
#pragma unroll
    for (int s = 0; s < kDSteps; ++s) {
      qf[s][i] = valid ? __ldg(src + 8 * s) : 0u;
      qf[s][2 + i] = valid ? __ldg(src + 8 * s + 4) : 0u;
    }
  }

  float o[kHeadDim / 2];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.0f;
  auto& o4 = *reinterpret_cast<float(*)[kDTiles][4]>(o);
  OnlineSoftmax softmax;
  softmax.init();

  // Software pipeline over key tiles (FlashAttention-3's intra-warpgroup overlap): iteration j issues
  // S = Q K^T of tile j + 1 and O += P V of tile j back to back, then runs the softmax of tile j + 1
  // while P V of tile j is still in flight; only the output rescale waits for it. Tile j's slot is
  // released once its P V has completed (its K was done an iteration earlier).
  float sacc[kBlockN / 2];
  auto& s4 = *reinterpret_cast<float(*)[kNTiles][4]>(sacc);
  unsigned pf[kKeySteps][4];
  // S of tile jj into sacc (issued, not waited for).
  auto issue_scores = [&](int jj) {
    const int slot = jj % kStages;
    mbar_wait(&full[slot], (jj / kStages) & 1);
    fence_proxy_async_shared();  // the cp.async data of the slot, visible to this thread's wgmmas
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) sacc[i] = 0.0f;
    const unsigned long long k_desc = wgmma_desc_sw128(ring + slot * L::kSlotBytes, kSwizzleAtomBytes);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < kDSteps; ++s)
      wgmma_m64k16_rs<kBlockN, T>(sacc, qf[s], wgmma_desc_advance(k_desc, (s / 4) * L::kBlockBytes + (s % 4) * 32));
    wgmma_commit();
  };
  // Scale, mask and exponentiate the landed S of tile jj; returns the output rescale factors.
  auto softmax_scores = [&](int jj, float (&alpha)[2]) {
    wgmma_fence_operand(sacc);
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s4[n][e] *= scale_log2;
    }
    const int n0 = (w.tile_begin + jj) * kBlockN;
    if (n0 + kBlockN - 1 > warp_min_last) apply_mask(s4, n0, t, last);
    softmax.update_scores(s4, alpha);
  };
  // P as the A fragments of the key steps: columns 16kk .. 16kk+15 are S tiles 2kk and 2kk+1.
  auto pack_probabilities = [&]() {
#pragma unroll
    for (int kk = 0; kk < kKeySteps; ++kk) {
      pf[kk][0] = pack2<T>(s4[2 * kk][0], s4[2 * kk][1]);
      pf[kk][1] = pack2<T>(s4[2 * kk][2], s4[2 * kk][3]);
      pf[kk][2] = pack2<T>(s4[2 * kk + 1][0], s4[2 * kk + 1][1]);
      pf[kk][3] = pack2<T>(s4[2 * kk + 1][2], s4[2 * kk + 1][3]);
    }
  };

  // O += P V of tile jj (issued, not waited for); the caller has fenced since writing pf.
  auto issue_values = [&](int jj) {
    const unsigned long long v_desc =
        wgmma_desc_sw128_mn(ring + (jj % kStages) * L::kSlotBytes + L::kTileBytes, L::kBlockBytes, kSwizzleAtomBytes);
#pragma unroll
    for (int kk = 0; kk < kKeySteps; ++kk)
      wgmma_m64k16_rs_mn<kHeadDim, T>(o, pf[kk], wgmma_desc_advance(v_desc, kk * 2 * kSwizzleAtomBytes));
    wgmma_commit();
  };
  // After P V of tile jj has completed: o and pf may be touched again, the slot goes back.
  auto retire_values = [&](int jj) {
    wgmma_fence_operand(o);
#pragma unroll
    for (int kk = 0; kk < kKeySteps; ++kk) wgmma_fence_operand(pf[kk]);
    mbar_arrive(&empty[jj % kStages]);
  };

  if (n_tiles > 0) {
    float alpha[2];
    issue_scores(0);
    wgmma_wait<0>();
    softmax_scores(0, alpha);  // o is still zero: no rescale needed
    pack_probabilities();
  }
  // The loop body has no branch around its wgmmas: ptxas serializes every wgmma of the kernel when
  // the commit groups in flight at a wait depend on the path taken (C7514). The last tile is peeled.
  for (int j = 0; j + 1 < n_tiles; ++j) {
    float alpha[2];
    issue_scores(j + 1);  // its wgmma_fence also orders pf's writes before P V below
    issue_values(j);
    wgmma_wait<1>();  // S of tile j + 1 has landed; P V of tile j may still run
    softmax_scores(j + 1, alpha);
    wgmma_wait<0>();
    retire_values(j);
    OnlineSoftmax::rescale(o4, alpha);
    pack_probabilities();
  }
  if (n_tiles > 0) {
    wgmma_fence();
    issue_values(n_tiles - 1);
    wgmma_wait<0>();
    retire_values(n_tiles - 1);
  }

  float row_lse[2];
  softmax.finalize(o4, row_lse);
  const Outputs<T, kHeadDim> outs{out, lse, o_part, lse_part, n_part_rows, counters};
  outs.store_fragment(w, warp_row0 + g, t, o4, row_lse);
  // The consumers alone meet (named barrier 1; the producer has returned); the ring is free.
  if constexpr (kSplitMerge) {
    if (w.num_splits > 1)
      outs.template merge_splits<kBlockM, kWsConsumers * kWarpgroupThreads>(
          w, ring, ct, [] { named_barrier_sync(1, kWsConsumers * kWarpgroupThreads); });
  }
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
