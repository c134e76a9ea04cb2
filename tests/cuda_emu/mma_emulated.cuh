// Host stand-in for cuda_src/common/mma.cuh (tests/cuda_emu): the same functions, written from the
// PTX ISA rather than from how the kernels use them. Warp-wide instructions go through the emulator's
// warp exchange: every lane deposits its operands, the warp meets, every lane computes its own
// results from the ISA's fragment layout, the warp meets again.
//
// PTX ISA, "Matrix Fragments for mma.m16n8k16" (.f16 / .bf16, fp32 accumulators), with
// groupID = lane >> 2 and threadID_in_group = lane % 4 (written g and t below):
//   A (16x16, .row): element a_i of a thread (i = 0..7, two per 32-bit register, a_0 in reg 0 low half)
//       row = g for i in {0,1,4,5}, g + 8 otherwise;  col (k) = 2t + (i & 1) + (i >= 4 ? 8 : 0)
//   B (16x8, .col):  b_i (i = 0..3):  row (k) = 2t + (i & 1) + (i >= 2 ? 8 : 0);  col = g
//   C, D (16x8):     c_i (i = 0..3):  row = g + (i >= 2 ? 8 : 0);  col = 2t + (i & 1)
// ldmatrix .m8n8 .x4 .b16: lanes 8j .. 8j+7 give the addresses of rows 0..7 of matrix j (16 bytes each,
//   16-byte aligned); destination register j of lane l receives row l >> 2, elements 2(l % 4) and
//   2(l % 4) + 1 of matrix j (lower column in the low half). With .trans the matrix is read column-major:
//   register j of lane l receives element (row 2(l % 4), col l >> 2) in the low half and
//   (row 2(l % 4) + 1, col l >> 2) in the high half.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflash {

constexpr int kCopyBytes = 16;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p));  // unused by the emulation
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  ::cuemu::check_smem(smem, 16, 16, "cp.async.cg 16");
  ::cuemu::check_align(gmem, 16, "cp.async.cg 16");
  ::cuemu::cp_async(smem, gmem, 16, false);
}

// src-size 0: nothing is read, the 16 destination bytes become zero.
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
  ::cuemu::check_smem(smem, 16, 16, "cp.async.cg 16 zfill");
  ::cuemu::check_align(gmem, 16, "cp.async.cg 16 zfill");
  ::cuemu::cp_async(smem, gmem, 16, !valid);
}

// An L2 eviction priority changes no value: the policy is an opaque word the copies ignore here.
__device__ __forceinline__ unsigned long long l2_evict_first_policy() { return 0x5eedull; }

// Blocks run one after another: every earlier write is visible (as the emulated __threadfence).
__device__ __forceinline__ void fence_acq_rel_gpu() {}

__device__ __forceinline__ void cp_async_16_zfill_hint(void* smem, const void* gmem, bool valid,
                                                       unsigned long long policy) {
  if (policy != l2_evict_first_policy()) ::cuemu::fail("cp.async L2::cache_hint: policy not made by createpolicy");
  cp_async_16_zfill(smem, gmem, valid);
}

__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  ::cuemu::check_smem(smem, 4, 4, "cp.async.ca 4");
  ::cuemu::check_align(gmem, 4, "cp.async.ca 4");
  ::cuemu::cp_async(smem, gmem, 4, false);
}

__device__ __forceinline__ void cp_async_commit() { ::cuemu::cp_async_commit(); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  ::cuemu::cp_async_wait(kPending);
}

namespace emu_detail {

inline unsigned short half_at(const unsigned char* row, int col) {
  unsigned short v;
  std::memcpy(&v, row + 2 * col, 2);
  return v;
}

template <bool kTrans>
inline void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  ::cuemu::check_smem(smem_row, 16, 16, kTrans ? "ldmatrix.x4.trans" : "ldmatrix.x4");
  const int lane = ::cuemu::me().lane;
  const void* mine = smem_row;
  std::memcpy(::cuemu::slot(lane), &mine, sizeof mine);
  ::cuemu::warp_sync();
  auto row_addr = [](int j, int row) {
    const unsigned char* p;
    std::memcpy(&p, ::cuemu::slot(8 * j + row), sizeof p);
    return p;
  };
  for (int j = 0; j < 4; ++j) {
    unsigned short lo, hi;
    if (!kTrans) {
      const unsigned char* row = row_addr(j, lane >> 2);
      lo = half_at(row, 2 * (lane & 3));
      hi = half_at(row, 2 * (lane & 3) + 1);
    } else {
      lo = half_at(row_addr(j, 2 * (lane & 3)), lane >> 2);
      hi = half_at(row_addr(j, 2 * (lane & 3) + 1), lane >> 2);
    }
    r[j] = static_cast<unsigned>(lo) | (static_cast<unsigned>(hi) << 16);
  }
  ::cuemu::warp_sync();
}

// The 16-bit element i (0 or 1) of 32-bit register reg.
inline unsigned short elem(unsigned reg, int i) { return static_cast<unsigned short>(i ? reg >> 16 : reg & 0xFFFFu); }

struct MmaOperands {
  unsigned a[4];
  unsigned b[2];
};

// D = A B + C: products of fp16/bf16 values are exact in double; the 16 products and C are summed in
// double and rounded once to fp32 (the hardware's internal order and rounding are unspecified).
template <bool kBf16>
inline void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  const int lane = ::cuemu::me().lane;
  MmaOperands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  std::memcpy(::cuemu::slot(lane), &mine, sizeof mine);
  ::cuemu::warp_sync();
  auto ops = [](int l) {
    MmaOperands o;
    std::memcpy(&o, ::cuemu::slot(l), sizeof o);
    return o;
  };
  // A[row][k] is element i of the lane with g = row % 8, t = (k % 8) / 2, where
  // i = (k & 1) + (row >= 8 ? 2 : 0) + (k >= 8 ? 4 : 0), i.e. register i / 2, half i % 2.
  auto A = [&](int row, int k) {
    const int i = (k & 1) + (row >= 8 ? 2 : 0) + (k >= 8 ? 4 : 0);
    return ::cuemu::to_double(elem(ops(4 * (row % 8) + (k % 8) / 2).a[i / 2], i % 2), kBf16);
  };
  // B[k][col] is element i = (k & 1) + (k >= 8 ? 2 : 0) of the lane with g = col, t = (k % 8) / 2.
  auto B = [&](int k, int col) {
    const int i = (k & 1) + (k >= 8 ? 2 : 0);
    return ::cuemu::to_double(elem(ops(4 * col + (k % 8) / 2).b[i / 2], i % 2), kBf16);
  };
  const int g = lane >> 2, t = lane & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = static_cast<float>(acc);
  }
  ::cuemu::warp_sync();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace emu_detail

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  emu_detail::ldmatrix_x4<false>(r, smem_row);
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem_row) {
  emu_detail::ldmatrix_x4<true>(r, smem_row);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  emu_detail::mma_16816<false>(d, a, b0, b1);
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                         unsigned b1) {
  emu_detail::mma_16816<true>(d, a, b0, b1);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  mma_16816<T>(d, a, b[0], b[1]);
}

// ex2.approx.ftz.f32: subnormal inputs and results flush to zero; ex2(-inf) = +0, ex2(+inf) = +inf.
__device__ __forceinline__ float fast_exp2(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

}  // namespace cuflash
