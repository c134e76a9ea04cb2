// Warp-level tensor-core and async-copy building blocks for the attention kernels (sm_80+):
// cp.async 16-byte copies, ldmatrix (plain and transposed) and mma.sync m16n8k16 with fp32
// accumulators, for fp16 and bf16 operands.
//
// Fragment layouts of mma.m16n8k16.row.col (lane = threadIdx.x % 32, g = lane / 4, t = lane % 4):
//   A 16x16 (4 regs of 2 x 16-bit): a0 (row g, cols 2t..2t+1), a1 (row g+8, same cols),
//                                   a2 (row g, cols 2t+8..), a3 (row g+8, cols 2t+8..)
//   B 16x8  (2 regs):               b0 (k 2t..2t+1, col g), b1 (k 2t+8.., col g)
//   C 16x8  (4 fp32):               c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, same cols)
// (the GEMM engineer's common/mma.cuh may hold the same wrappers; the lead dedupes later)
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflash {
namespace attn {

constexpr int kCopyBytes = 16;  // one cp.async / ldmatrix row / global vector access

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1. src_bytes == 0 reads nothing and writes 16 zero
// bytes (used for keys past the sequence end and for padding query rows: never read, always defined).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? kCopyBytes : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 16-bit matrices; lane l gives the address of row (l % 8) of matrix (l / 8).
// Register i receives matrix i with lane holding (row lane / 4, cols 2 * (lane % 4) .. + 1).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// Same, each 8x8 matrix transposed: lane holds (rows 2 * (lane % 4) .. + 1, col lane / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// D = A * B + D for one 16x8x16 tile, fp32 accumulate. T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                         unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 values rounded to nearest even and packed as one 32-bit register (lo in the low half),
// the operand form of an A fragment.
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);

template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

}  // namespace attn
}  // namespace cuflash
