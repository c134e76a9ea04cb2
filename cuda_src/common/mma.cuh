// Warp-level tensor-core and async-copy building blocks for sm_80+ (Ampere, Ada, Hopper), shared by
// the GEMM and attention kernels.
//
// Every inline PTX instruction of the project lives in this file, so that a host emulation
// (tests/cuda_emu/mma_emulated.cuh, same functions written from the PTX ISA) can stand in for this one
// file and run the real kernels on the CPU.
//
// mma.sync m16n8k16 with fp32 accumulation; fragment layouts (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"), with g = lane / 4 (groupID) and t = lane % 4 (thread in group):
//   A (16 x 16, row-major): a[0] = (row g,   k 2t..2t+1)   a[1] = (row g+8, k 2t..2t+1)
//                           a[2] = (row g,   k 2t+8..+9)   a[3] = (row g+8, k 2t+8..+9)
//   B (16 x 8, "col"):      b[0] = (k 2t..2t+1, col g)      b[1] = (k 2t+8..+9, col g)
//   C/D (16 x 8, fp32):     d[0..1] = (row g, cols 2t, 2t+1)  d[2..3] = (row g+8, cols 2t, 2t+1)
// Each 32-bit register holds two 16-bit values, the lower k (or column) index in the low half.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflash {

constexpr int kCopyBytes = 16;  // one cp.async / ldmatrix row / global vector access

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (.cg); both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}

// Same, but with valid == false it reads nothing and writes 16 zero bytes (used for rows past an
// edge: never read from memory, always defined in shared memory). gmem must still be a valid address.
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? kCopyBytes : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}

// An L2 access policy that marks lines first to go (streamed data read once: the K/V of a decode
// call), so streaming does not push other lines, dirty ones included, out of L2.
__device__ __forceinline__ unsigned long long l2_evict_first_policy() {
  unsigned long long policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// fence.acq_rel at GPU scope: this thread's earlier memory operations (and, after a CTA barrier, those
// of the threads that reached it) are ordered before its later ones for every thread of the GPU. The
// release / acquire sides of a "last CTA to arrive" count (CUTLASS's grid barrier uses it the same
// way); __threadfence() is fence.sc, a MEMBAR.SC on sm_90.
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

// cp_async_16_zfill with an L2 cache policy (l2_evict_first_policy).
__device__ __forceinline__ void cp_async_16_zfill_hint(void* smem, const void* gmem, bool valid,
                                                       unsigned long long policy) {
  const int src_bytes = valid ? kCopyBytes : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes), "l"(policy)
               : "memory");
}

// 4-byte global -> shared copy (.ca: the only cache mode that allows sizes below 16).
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most `kPending` committed groups of this thread are still in flight.
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

// D += A * B, fp16 or bf16 operands (T = __half or __nv_bfloat16), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                         unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  mma_16816<T>(d, a, b[0], b[1]);
}

// MUFU ex2; ex2.approx(-inf) = +0, which the attention masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace cuflash
