// Fast, exact NVFP4 dequantization in registers: eight e2m1 codes (one 32-bit word of packed data)
// times their e4m3 block scale -> four fp16x2 (or bf16x2) registers, in natural K order.
//
// Input word w: byte b holds values 2b (low nibble) and 2b+1 (high nibble), as the packed data
// [rows, K/2] stores them. Output pairs p[i] = (value 2i in the low half, value 2i+1 in the high half),
// the register layout mma.sync expects for consecutive k.
//
// Exactness: q * s, with q an e2m1 value (|q| <= 6, at most 2 significant bits) and s an e4m3 scale
// (|s| <= 448, at most 4 significant bits, smallest 2^-9), has at most 6 significant bits and lies in
// [2^-10, 2688]: every product is an fp16 (and bf16) normal number, so both paths below are exact.
//
// sm_89+ path (one conversion and one multiply per pair): the code's bits placed as e4m3 bits,
//   e4m3 = (c & 8) << 4 | (c & 7) << 2,
// decode to q / 64 (e2m1 exponent field E and mantissa m land in e4m3's low exponent bits and top
// mantissa bit; the exponent bias difference 7 - 1 = 6 gives the factor 2^-6, and e2m1's subnormal
// 0.5 lands on e4m3's subnormal 2^-6 * 0.5). cvt.rn.f16x2.e4m3x2 converts two at a time; one
// multiply by (s * 64), an exact fp16 (<= 28672), gives q * s.
// sm_80 path (no fp8 conversion instruction): the bits placed as fp16 bits,
//   fp16 = (c & 8) << 12 | (c & 7) << 9,
// decode to q * 2^-14 (bias 15 - 1 = 14); times 2^14 (exact) gives q, times s gives q * s.
// tests/test_gemm.py replays both bit recipes in numpy over every (code, scale) pair.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace cuflash {

struct Pairs4 {
  unsigned p[4];  // fp16x2 or bf16x2 bit patterns
};

// The four pairs as one 16-byte store.
__device__ __forceinline__ uint4 as_uint4(const Pairs4& x) { return make_uint4(x.p[0], x.p[1], x.p[2], x.p[3]); }

// Selectors for __byte_perm(even, odd, sel): interleave the bytes of `even` (values 0,2,4,6) and
// `odd` (values 1,3,5,7) into (v0 v1 v2 v3) and (v4 v5 v6 v7).
constexpr unsigned kInterleaveLo = 0x5140u;
constexpr unsigned kInterleaveHi = 0x7362u;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
constexpr bool kHasFp8Cvt = true;
#else
constexpr bool kHasFp8Cvt = false;
#endif
// The factor of the sm_89+ path: 2^(7 - 1), the e4m3 and e2m1 exponent bias difference (see above).
constexpr float kE4M3Bias = 64.0f;

// The per-block factor the pairs are multiplied by, broadcast to both halves: s * 64 on sm_89+, s on
// sm_80 (see above). `sbits` is the e4m3 scale's bit pattern; NaN (0x7F) stays NaN.
__device__ __forceinline__ __half2 scale_factor(unsigned char sbits) {
  const __half s = __half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(sbits), __NV_E4M3));
  if constexpr (kHasFp8Cvt) {
    return __half2half2(__hmul(s, __float2half_rn(kE4M3Bias)));
  } else {
    return __half2half2(s);
  }
}

// The factors of four consecutive scales (bit patterns in the bytes of `sbits4`, the first in the low
// byte), two per register: f01 = (factor 0, factor 1), f23 = (factor 2, factor 3), each as
// scale_factor() gives it (one cvt per two scales). __low2half2 / __high2half2 broadcast one.
__device__ __forceinline__ void scale_factors4(unsigned sbits4, __half2& f01, __half2& f23) {
  const __half2 s01 = __half2(__nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(sbits4 & 0xFFFFu), __NV_E4M3));
  const __half2 s23 = __half2(__nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(sbits4 >> 16), __NV_E4M3));
  if constexpr (kHasFp8Cvt) {
    const __half2 bias = __float2half2_rn(kE4M3Bias);
    f01 = __hmul2(s01, bias);
    f23 = __hmul2(s23, bias);
  } else {
    f01 = s01;
    f23 = s23;
  }
}

// Eight e2m1 codes -> four fp16x2 pairs holding q * s exactly, pairs 0-1 (bytes 0-1 of w) scaled by
// f01 and pairs 2-3 (bytes 2-3) by f23, each from scale_factor() (one block scale: f01 == f23).
__device__ __forceinline__ Pairs4 dequant_e2m1x8_f16(unsigned w, __half2 f01, __half2 f23) {
  Pairs4 out;
  if constexpr (kHasFp8Cvt) {
    // e4m3 byte of each odd value (high nibble: sign at bit 7 already, magnitude bits 4..6 -> 2..4)
    const unsigned odd = (w & 0x80808080u) | ((w >> 2) & 0x1C1C1C1Cu);
    // ... and of each even value (low nibble: sign bit 3 -> 7, magnitude bits 0..2 -> 2..4)
    const unsigned even = ((w << 4) & 0x80808080u) | ((w << 2) & 0x1C1C1C1Cu);
    const unsigned lo = __byte_perm(even, odd, kInterleaveLo);
    const unsigned hi = __byte_perm(even, odd, kInterleaveHi);
    const unsigned short e4m3x2[4] = {static_cast<unsigned short>(lo & 0xFFFFu), static_cast<unsigned short>(lo >> 16),
                                      static_cast<unsigned short>(hi & 0xFFFFu), static_cast<unsigned short>(hi >> 16)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 q64 = __half2(__nv_cvt_fp8x2_to_halfraw2(e4m3x2[i], __NV_E4M3));  // q / 64, exact
      const __half2 v = __hmul2(q64, i < 2 ? f01 : f23);                               // q * s, exact
      out.p[i] = *reinterpret_cast<const unsigned*>(&v);
    }
  } else {
    // fp16 high byte of each value: sign at bit 7, magnitude at bits 1..3; low byte zero.
    const unsigned odd = (w & 0x80808080u) | ((w >> 3) & 0x0E0E0E0Eu);
    const unsigned even = ((w << 4) & 0x80808080u) | ((w << 1) & 0x0E0E0E0Eu);
    const __half2 kFp16Bias = __float2half2_rn(16384.0f);  // 2^(15 - 1)
    // Pair i: the high byte of the low half is even byte i, of the high half odd byte i.
    const unsigned sel[4] = {0x4000u, 0x5111u, 0x6222u, 0x7333u};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned bits = __byte_perm(even, odd, sel[i]) & 0xFF00FF00u;
      const __half2 q = __hmul2(*reinterpret_cast<const __half2*>(&bits), kFp16Bias);  // exact
      const __half2 v = __hmul2(q, i < 2 ? f01 : f23);                                     // q * s, exact
      out.p[i] = *reinterpret_cast<const unsigned*>(&v);
    }
  }
  return out;
}

__device__ __forceinline__ Pairs4 dequant_e2m1x8_f16(unsigned w, __half2 factor) {
  return dequant_e2m1x8_f16(w, factor, factor);
}

// fp16x2 -> bf16x2 of values exact in both (q * s always is): through fp32, exact.
__device__ __forceinline__ unsigned f16x2_to_bf16x2(unsigned h) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
  return *reinterpret_cast<const unsigned*>(&b);
}

// Operand element type T (__half or __nv_bfloat16) version of dequant_e2m1x8_f16.
template <typename T>
__device__ __forceinline__ Pairs4 dequant_e2m1x8(unsigned w, __half2 f01, __half2 f23);

template <>
__device__ __forceinline__ Pairs4 dequant_e2m1x8<__half>(unsigned w, __half2 f01, __half2 f23) {
  return dequant_e2m1x8_f16(w, f01, f23);
}

template <>
__device__ __forceinline__ Pairs4 dequant_e2m1x8<__nv_bfloat16>(unsigned w, __half2 f01, __half2 f23) {
  Pairs4 out = dequant_e2m1x8_f16(w, f01, f23);
#pragma unroll
  for (int i = 0; i < 4; ++i) out.p[i] = f16x2_to_bf16x2(out.p[i]);
  return out;
}

template <typename T>
__device__ __forceinline__ Pairs4 dequant_e2m1x8(unsigned w, __half2 factor) {
  return dequant_e2m1x8<T>(w, factor, factor);
}

}  // namespace cuflash
