// NVFP4 quantize / dequantize on the GPU, bit-identical to the numpy path in cuflash/nvfp4.py.
//
// Layouts (row-major, C-contiguous):
//   x       [rows, K]       float / half / bfloat16, K % 16 == 0, 16-byte aligned
//   data    [rows, K/2]     uint8, two e2m1 codes per byte, lower K index in the low nibble
//   scales  [rows, K/16]    uint8 e4m3 bit patterns, one per 16 consecutive values along K
//   gs      [1]             float32 global scale, encode form (x * gs maps the tensor's amax to 448*6)
// Every float operation below is a single correctly rounded fp32 operation (__fmul_rn, __fdiv_rn:
// no FMA contraction), so numpy computes exactly the same bits.
#include "common/fp4.cuh"
#include "common/types.cuh"

namespace cuflash {

constexpr float kGlobalScaleNumerator = kE4M3Max * kE2M1Max;  // 448 * 6 = 2688
constexpr int kThreads = 256;

template <typename T>
struct Block16 {
  static constexpr int kVecs = kScaleBlock * sizeof(T) / 16;  // 16-byte loads per block of 16
  float v[kScaleBlock];

  __device__ __forceinline__ void load(const T* __restrict__ x, long long block) {
    uint4 raw[kVecs];
    const uint4* src = reinterpret_cast<const uint4*>(x + block * kScaleBlock);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) raw[i] = __ldg(src + i);
    const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int i = 0; i < kScaleBlock; ++i) v[i] = to_float<T>(e[i]);
  }
};

// stats[0]: max |x| over the finite elements, as float bits (for non-negative floats the unsigned
// order is the float order, so atomicMax on the bits is a float max); stats[1]: 1 if any element is
// NaN or inf. stats must be zeroed before the launch.
template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_amax(const T* __restrict__ x, long long nblocks,
                                                       unsigned* __restrict__ stats) {
  float m = 0.0f;
  bool finite = true;
  for (long long b = blockIdx.x * (long long)blockDim.x + threadIdx.x; b < nblocks;
       b += (long long)gridDim.x * blockDim.x) {
    Block16<T> blk;
    blk.load(x, b);
#pragma unroll
    for (int i = 0; i < kScaleBlock; ++i) {
      const float a = fabsf(blk.v[i]);
      const bool f = isfinite(a);
      finite = finite && f;
      if (f) m = fmaxf(m, a);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  const bool warp_finite = __all_sync(0xffffffffu, finite);
  if ((threadIdx.x & 31) == 0) {
    if (m > 0.0f) atomicMax(stats, __float_as_uint(m));
    if (!warp_finite) atomicOr(stats + 1, 1u);
  }
}

// gs = 2688 / amax, clamped to the largest float; 1 when the tensor has no non-zero finite value.
__global__ void nvfp4_global_scale(const unsigned* __restrict__ stats, float* __restrict__ gs) {
  const float amax = __uint_as_float(stats[0]);
  *gs = amax > 0.0f ? fminf(__fdiv_rn(kGlobalScaleNumerator, amax), 3.402823466e38f) : 1.0f;
}

// One thread per block of 16 values.
template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_quantize(const T* __restrict__ x, long long nblocks,
                                                           const float* __restrict__ gs_ptr,
                                                           unsigned char* __restrict__ data,
                                                           unsigned char* __restrict__ scales) {
  const float gs = *gs_ptr;
  for (long long b = blockIdx.x * (long long)blockDim.x + threadIdx.x; b < nblocks;
       b += (long long)gridDim.x * blockDim.x) {
    Block16<T> blk;
    blk.load(x, b);
    float amax = 0.0f;
    bool finite = true;
#pragma unroll
    for (int i = 0; i < kScaleBlock; ++i) {
      const float a = fabsf(blk.v[i]);
      finite = finite && isfinite(a);
      amax = fmaxf(amax, a);
    }
    uint2 packed = make_uint2(0u, 0u);
    unsigned char sbits = kE4M3NaN;  // a block holding NaN/inf: scale NaN, codes 0
    if (finite) {
      sbits = e4m3_encode_satfinite(__fmul_rn(gs, __fdiv_rn(amax, kE2M1Max)));
      const float s = e4m3_decode(sbits);
      const float inv = s != 0.0f ? __fdiv_rn(gs, s) : 0.0f;
      unsigned w[2] = {0u, 0u};
#pragma unroll
      for (int i = 0; i < kScaleBlock; ++i) w[i / 8] |= e2m1_encode(__fmul_rn(blk.v[i], inv)) << (4 * (i % 8));
      packed = make_uint2(w[0], w[1]);
    }
    reinterpret_cast<uint2*>(data)[b] = packed;
    scales[b] = sbits;
  }
}

// x = (q * s) / gs, rounded once to OutT.
template <typename OutT>
__global__ void __launch_bounds__(kThreads) nvfp4_dequantize(const unsigned char* __restrict__ data,
                                                             const unsigned char* __restrict__ scales,
                                                             const float* __restrict__ gs_ptr,
                                                             long long nblocks, OutT* __restrict__ out) {
  const float gs = *gs_ptr;
  for (long long b = blockIdx.x * (long long)blockDim.x + threadIdx.x; b < nblocks;
       b += (long long)gridDim.x * blockDim.x) {
    const uint2 packed = reinterpret_cast<const uint2*>(data)[b];
    const unsigned w[2] = {packed.x, packed.y};
    const float s = e4m3_decode(scales[b]);
    OutT* o = out + b * kScaleBlock;
#pragma unroll
    for (int i = 0; i < kScaleBlock; ++i) {
      const float q = e2m1_decode((w[i / 8] >> (4 * (i % 8))) & 0xFu);
      o[i] = from_float<OutT>(__fdiv_rn(__fmul_rn(q, s), gs));
    }
  }
}

// Elementwise e2m1 codes (one per byte, unpacked) of finite float32 values.
__global__ void __launch_bounds__(kThreads) e2m1_encode_kernel(const float* __restrict__ x, long long n,
                                                               unsigned char* __restrict__ codes) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    codes[i] = static_cast<unsigned char>(e2m1_encode(x[i]));
}

}  // namespace cuflash
