// Warpgroup-level tensor-core building blocks for Hopper (sm_90a): wgmma.mma_async with A from
// registers and B from shared memory through a matrix descriptor, the fences and group waits around
// it, and the proxy fence that makes ordinary shared-memory writes visible to it.
//
// Like common/mma.cuh, this file holds inline PTX only, so that the host emulation
// (tests/cuda_emu/wgmma_emulated.cuh, the same functions written from the PTX ISA) can stand in for it.
//
// wgmma.mma_async.m64nNk16 (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts"), issued
// by the 4 warps of a warpgroup (warp_in_group = warp % 4), fp32 accumulators:
//   A (64 x 16, registers): warp_in_group w holds rows 16w .. 16w+15 in the layout of mma.m16n8k16's
//                           A fragment (common/mma.cuh), four 32-bit registers of two 16-bit values.
//   B (16 x N, shared):     K-major with the 128-byte swizzle (or MN-major, wgmma_m64k16_rs_mn below;
//                           the ISA also has no swizzle and 32/64-byte swizzles): column n's K values in a 128-byte
//                           row, rows of 8 consecutive columns 128 bytes apart (an 8-row, 1024-byte
//                           atom, 1024-byte aligned), atoms SBO bytes apart; the 16-byte chunk at byte
//                           address a is stored at a ^ (((a >> 7) & 7) << 4) (address bits 4-6 XOR
//                           bits 7-9). A k16 step further along K starts 32 bytes later.
//   D (64 x N, registers):  float d[N / 2]; d[4j + i] is the mma.m16n8 C element i of columns
//                           8j .. 8j+7 of the warp's 16 rows: row 16w + g + 8 (i >= 2), column
//                           8j + 2t + (i & 1), with g = lane / 4, t = lane % 4.
// Matrix descriptor (64 bits): bits 0-13 start address >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 49-51
// base offset (0), 62-63 swizzle mode (0: none, 1: 128-byte).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflash {

constexpr int kWarpgroupThreads = 128;  // 4 consecutive warps issue one wgmma
constexpr int kWgmmaM = 64;             // rows of A / D per wgmma
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows of 128 bytes: the 128-byte swizzle's period

constexpr unsigned long long kDescFieldMask = 0x3FFFull;  // 14-bit fields, in units of 16 bytes

// Descriptor of an operand in the 128-byte swizzled layout at `smem` (1024-byte aligned, or that plus a
// K-major k-step offset below 128); lbo and sbo in bytes.
__device__ __forceinline__ unsigned long long wgmma_desc_sw128_lbo_sbo(const void* smem, unsigned lbo, unsigned sbo) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  return ((addr >> 4) & kDescFieldMask) | (((lbo >> 4) & kDescFieldMask) << 16) | (((sbo >> 4) & kDescFieldMask) << 32) |
         (1ull << 62);
}

// K-major: sbo bytes between 8-row atoms; LBO is unused (encoded 1, i.e. 16 bytes).
__device__ __forceinline__ unsigned long long wgmma_desc_sw128(const void* smem, unsigned sbo) {
  return wgmma_desc_sw128_lbo_sbo(smem, 16, sbo);
}

// MN-major: lbo bytes between blocks of 64 n, sbo bytes between atoms of 8 k.
__device__ __forceinline__ unsigned long long wgmma_desc_sw128_mn(const void* smem, unsigned lbo, unsigned sbo) {
  return wgmma_desc_sw128_lbo_sbo(smem, lbo, sbo);
}

// The same descriptor moved by `bytes` (a multiple of 16) along the shared memory: the start address
// is the low field, so this is an add as long as the address stays below 256 KB.
__device__ __forceinline__ unsigned long long wgmma_desc_advance(unsigned long long desc, unsigned bytes) {
  return desc + (bytes >> 4);
}

// Orders this thread's earlier register and shared-memory accesses before the wgmmas that follow.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Closes the group of wgmmas issued since the last commit.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most kPending committed groups are in flight; their accumulators are then defined.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accesses of the accumulators across wgmma_wait / wgmma_fence (the
// asm statements above name no registers).
template <int kN>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The same for register A operands of a wgmma in flight: kept live (and unmodified) until this point.
template <int kN>
__device__ __forceinline__ void wgmma_fence_operand(unsigned (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Makes this thread's ordinary (generic-proxy) shared-memory writes, cp.async included, visible to
// the async proxy (wgmma operand reads); put it before the barrier that publishes the data.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// stmatrix.m8n8.x4.trans (sm_90): lane l gives the shared address of row l % 8 of 8 x 8 matrix l / 8
// (16 bytes, 16-byte aligned); register j of each lane holds matrix j's elements (row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1, the lower column in the low half) as in mma.m16n8's C fragment, and
// .trans stores the matrix transposed: element (row r, column c) lands at element r of stored row c.
// So an accumulator fragment (rows = weight rows, columns = tokens) is stored token-major.
__device__ __forceinline__ void stmatrix_x4_trans(void* smem_row, const unsigned (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(smem_row))),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// Programmatic dependent launch (sm_90): a kernel launched with the programmatic stream serialization
// attribute may start while the kernel before it in the stream still runs, once that kernel's CTAs have
// all executed griddep_launch_dependents (or exited); griddep_wait then blocks until that kernel has
// completed and its memory is visible. Launched without the attribute, both do nothing.
__device__ __forceinline__ void griddep_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void griddep_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Warp-specialized kernels: a warpgroup gives registers back (producer) or takes them (consumers),
// within the kernel's cap at entry (__launch_bounds__(threads, 1)); every thread of the warpgroup
// executes it. kRegs: a multiple of 8 in [24, 256].
template <int kRegs>
__device__ __forceinline__ void warpgroup_release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void warpgroup_claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// D (64 x kN) += A (64 x 16, registers) * B (16 x kN, descriptor), T = __half or __nv_bfloat16.
template <int kN, typename T>
__device__ __forceinline__ void wgmma_m64k16_rs(float (&d)[kN / 2], const unsigned (&a)[4], unsigned long long desc_b);

// The same with B MN-major (imm-trans-b = 1): the 16 x kN operand stored N-contiguous, e.g. V [keys][d]
// for P V. 128-byte swizzle: row k of an 8-row atom holds 64 consecutive n (128 bytes), atoms of the next
// 8 k lie SBO bytes apart, the next 64 n LBO bytes apart (PTX ISA, canonical layouts, MN-major).
template <int kN, typename T>
__device__ __forceinline__ void wgmma_m64k16_rs_mn(float (&d)[kN / 2], const unsigned (&a)[4], unsigned long long desc_b);

// One definition per N, operand type and B majorness: NAME the function, CT the C++ type, PT its PTX
// name, TB the imm-trans-b flag; D the "{%0, ...}" list of the N / 2 accumulators, which are operands
// 0 .. N/2 - 1 (the trailing "+f" constraints), so A is operands N/2 .. N/2 + 3, the descriptor N/2 + 4
// and the scale-d source N/2 + 5.
#define CUFLASH_WGMMA_RS(NAME, TB, N, CT, PT, D, A, DESC, SCALE_D, ...) \
template <> \
__device__ __forceinline__ void NAME<N, CT>(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc_b) { \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PT "." PT " " D ", " A ", " DESC ", p, 1, 1, " TB ";\n}\n" \
      : __VA_ARGS__ \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1) \
      : "memory"); \
}
#define CUFLASH_WGMMA_RS_F16_BF16(N, D, A, DESC, SCALE_D, ...) \
  CUFLASH_WGMMA_RS(wgmma_m64k16_rs, "0", N, __half, "f16", D, A, DESC, SCALE_D, __VA_ARGS__) \
  CUFLASH_WGMMA_RS(wgmma_m64k16_rs, "0", N, __nv_bfloat16, "bf16", D, A, DESC, SCALE_D, __VA_ARGS__) \
  CUFLASH_WGMMA_RS(wgmma_m64k16_rs_mn, "1", N, __half, "f16", D, A, DESC, SCALE_D, __VA_ARGS__) \
  CUFLASH_WGMMA_RS(wgmma_m64k16_rs_mn, "1", N, __nv_bfloat16, "bf16", D, A, DESC, SCALE_D, __VA_ARGS__)

// The "+f" constraints of accumulators d[i] .. d[i + 7] and d[i] .. d[i + 15].
#define CUFLASH_ACC8(i) \
  "+f"(d[i]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3]), "+f"(d[(i) + 4]), "+f"(d[(i) + 5]), \
  "+f"(d[(i) + 6]), "+f"(d[(i) + 7])
#define CUFLASH_ACC16(i) CUFLASH_ACC8(i), CUFLASH_ACC8((i) + 8)

CUFLASH_WGMMA_RS_F16_BF16(16, "{%0, %1, %2, %3, %4, %5, %6, %7}",
    "{%8, %9, %10, %11}", "%12", "%13", CUFLASH_ACC8(0))
CUFLASH_WGMMA_RS_F16_BF16(32, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}",
    "{%16, %17, %18, %19}", "%20", "%21", CUFLASH_ACC16(0))
CUFLASH_WGMMA_RS_F16_BF16(64, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}",
    "{%32, %33, %34, %35}", "%36", "%37", CUFLASH_ACC16(0), CUFLASH_ACC16(16))
CUFLASH_WGMMA_RS_F16_BF16(128, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}",
    "{%64, %65, %66, %67}", "%68", "%69", CUFLASH_ACC16(0), CUFLASH_ACC16(16), CUFLASH_ACC16(32), CUFLASH_ACC16(48))
#undef CUFLASH_ACC16
#undef CUFLASH_ACC8
#undef CUFLASH_WGMMA_RS_F16_BF16
#undef CUFLASH_WGMMA_RS

}  // namespace cuflash
