// The device-side problem table of a grouped GEMM and a persistent tile scheduler over it.
//
// The host writes one GemmProblem per (group, L slice) (cuflash/gemm.py builds the same 128-byte
// record with numpy). Each CTA of the persistent grid first turns the table into a prefix sum of
// tile counts in shared memory, then walks tiles blockIdx.x, blockIdx.x + gridDim.x, ... . A tile
// index maps to (problem, m tile, n tile) with the m tile fastest, so CTAs running at the same time
// share one weight tile (the large operand) through L2.
//
// Ragged (MoE) problems have m < 0: their rows are offsets[group] .. offsets[group + 1] of the
// shared token matrix, read on the device, so the host never waits for the offsets.
#pragma once

namespace cuflash {

struct GemmProblem {
  // device addresses (bytes); b2 and sfb2 only in the dual GEMM
  long long a, b, b2, sfa, sfb, sfb2, c;
  // row strides: a, b, sfa, sfb (plain layout) in bytes; c in elements
  long long a_row, b_row, sfa_row, sfb_row, c_row;
  int m;           // token rows; < 0: ragged, rows from offsets[group]
  int n;           // weight rows (output columns)
  int k;           // reduction length, a multiple of kStageK
  int group;       // index into offsets (ragged only)
  float alpha;     // C = alpha * A B^T (dual: silu(alpha * A B1^T) * (alpha2 * A B2^T))
  float alpha2;
  int rows_total;  // ragged: rows of the token matrix (offsets are clamped to it)
  int pad;
};
static_assert(sizeof(GemmProblem) == 128, "GemmProblem must match _PROBLEM_DTYPE in cuflash/gemm.py");

// Token rows of a problem: [row_base, row_base + rows) of its token matrix.
struct ProblemRows {
  int row_base;
  int rows;
};

__device__ __forceinline__ ProblemRows problem_rows(const GemmProblem& p, const int* __restrict__ offsets) {
  if (p.m >= 0) return {0, p.m};
  // Clamped so that malformed offsets can never address rows outside the matrix.
  const int lo = min(max(__ldg(offsets + p.group), 0), p.rows_total);
  const int hi = min(max(__ldg(offsets + p.group + 1), lo), p.rows_total);
  return {lo, hi - lo};
}

__device__ __forceinline__ int ceil_div_dev(int a, int b) { return (a + b - 1) / b; }

// prefix[0..P]: prefix[p] = tiles of problems 0..p-1. Needs P + 1 ints of shared memory and all
// threads of the block; ends with a barrier.
template <int kBlockM, int kBlockN>
__device__ void build_tile_prefix(const GemmProblem* __restrict__ problems, int num_problems,
                                  const int* __restrict__ offsets, int* prefix) {
  // 1. every thread counts the tiles of a few problems (loads in flight in parallel)
  for (int p = threadIdx.x; p < num_problems; p += blockDim.x) {
    const ProblemRows rows = problem_rows(problems[p], offsets);
    prefix[p + 1] = ceil_div_dev(rows.rows, kBlockM) * ceil_div_dev(problems[p].n, kBlockN);
  }
  if (threadIdx.x == 0) prefix[0] = 0;
  __syncthreads();
  // 2. warp 0 scans 32 problems at a time with a running carry
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int carry = 0;
    for (int base = 0; base < num_problems; base += 32) {
      const int i = base + lane;
      int v = i < num_problems ? prefix[i + 1] : 0;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, v, off);
        if (lane >= off) v += u;
      }
      if (i < num_problems) prefix[i + 1] = v + carry;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
  }
  __syncthreads();
}

// The problem holding tile t: the largest p with prefix[p] <= t (empty problems are skipped since
// their prefix equals the next one's).
__device__ __forceinline__ int find_problem(const int* prefix, int num_problems, int t) {
  int lo = 0, hi = num_problems - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

}  // namespace cuflash
