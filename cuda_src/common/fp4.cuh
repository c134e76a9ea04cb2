// NVFP4 format primitives shared by every kernel: e2m1 and e4m3 encode/decode, scalar and exact.
//
// e2m1 (4 bits: sign, 2 exponent bits, 1 mantissa bit, no inf/NaN) holds
//   code & 7:  0    1    2    3    4    5    6    7
//   value:     0    0.5  1    1.5  2    3    4    6      (code & 8 is the sign)
// Two values pack into one byte, the lower K index in the low nibble (torch.float4_e2m1fn_x2, CUTLASS).
// e4m3 (float8_e4m3fn) block scales travel as their uint8 bit patterns.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace cuflash {

constexpr int kScaleBlock = 16;      // values per e4m3 block scale
constexpr float kE2M1Max = 6.0f;     // largest e2m1 magnitude
constexpr float kE4M3Max = 448.0f;   // largest finite e4m3 magnitude
constexpr unsigned char kE4M3NaN = 0x7F;

// Round-to-nearest-even e2m1 encode of a finite float, saturating at +-6. Keeps the sign of zero
// (-0.1 -> code 8), as ml_dtypes and the hardware cvt do. Ties go to the even code.
__device__ __forceinline__ unsigned e2m1_encode(float x) {
  const unsigned sign = (__float_as_uint(x) >> 31) << 3;
  const float a = fabsf(x);
  unsigned m;
  if (a <= 0.25f) m = 0;        // 0.25 ties to 0 (even)
  else if (a < 0.75f) m = 1;    // 0.75 ties to 1.0 (code 2, even)
  else if (a <= 1.25f) m = 2;   // 1.25 ties to 1.0
  else if (a < 1.75f) m = 3;    // 1.75 ties to 2.0 (code 4)
  else if (a <= 2.5f) m = 4;    // 2.5 ties to 2.0
  else if (a < 3.5f) m = 5;     // 3.5 ties to 4.0 (code 6)
  else if (a <= 5.0f) m = 6;    // 5.0 ties to 4.0
  else m = 7;                   // saturate at 6
  return sign | m;
}

__device__ __forceinline__ float e2m1_decode(unsigned code) {
  const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = mag[code & 7];
  return (code & 8) ? -v : v;
}

// e4m3 RNE encode with saturation to +-448 (NaN stays NaN).
__device__ __forceinline__ unsigned char e4m3_encode_satfinite(float x) {
  return static_cast<unsigned char>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float e4m3_decode(unsigned char bits) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(bits), __NV_E4M3);
  return __half2float(__half(h));
}

}  // namespace cuflash
