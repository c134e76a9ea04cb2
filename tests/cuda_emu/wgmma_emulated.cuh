// Host stand-in for cuda_src/common/wgmma.cuh (tests/cuda_emu): the same functions, written from the
// PTX ISA ("Asynchronous Warpgroup Level Matrix Multiply-Accumulate", sm_90a) rather than from how the
// kernels use them.
//
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16} with A in registers (PTX ISA, "Register
// Fragments and Shared Memory Matrix Layouts"): the 128 threads of a warpgroup (4 consecutive warps,
// the first one's index divisible by 4) each hold
//   A: 4 registers a_0..a_7 (two 16-bit values each, a_0 in the low half of register 0); thread
//      (warp w of the warpgroup, lane with g = lane >> 2, t = lane % 4) holds
//        row = 16w + g for a_i, i in {0,1,4,5}; 16w + g + 8 otherwise
//        col (k) = 2t + (i & 1) + (i >= 4 ? 8 : 0)
//   D: N/2 fp32 registers d_0..; d_i: row = 16w + g + (i % 4 >= 2 ? 8 : 0), col = 8 (i / 4) + 2t + (i & 1)
//   B: K x N in shared memory, given by a 64-bit matrix descriptor:
//        bits  0-13 matrix start address >> 4 (shared window address)
//        bits 16-29 leading dimension byte offset >> 4 (LBO)
//        bits 32-45 stride dimension byte offset >> 4 (SBO)
//        bits 49-51 matrix base offset (0 unless a swizzle pattern is offset)
//        bits 62-63 swizzle mode: 0 none, 1 128B, 2 64B, 3 32B
//      K-major (imm-trans-b = 0) with no swizzle or the 128-byte swizzle is emulated, and MN-major
//      (imm-trans-b = 1, wgmma_m64k16_rs_mn) with the 128-byte swizzle. No swizzle: B
//      is made of core matrices of 8 columns n x 16 bytes (8 k values of 2 bytes, one 16-byte row per
//      n, rows 16 bytes apart); element (k, n) lies at start + (k / 8) * LBO + (n / 8) * SBO + (n % 8)
//      * 16 + (k % 8) * 2. 128-byte swizzle: column n's K values in a 128-byte row at start + (n / 8)
//      * SBO + (n % 8) * 128, each 16-byte chunk at address a stored at a ^ (((a >> 7) & 7) << 4).
//      The kernels build only 128-byte swizzle descriptors (wgmma_desc_sw128).
// Semantics emulated: D = A B + D (scale-d = 1), products exact in double, the 16 products and D
// summed in double and rounded once to fp32. The results are computed at issue but reach the
// accumulator registers only when wgmma.wait_group retires their commit group; until then the
// registers read NaN (the ISA leaves them undefined). A wgmma needs a wgmma.fence by the thread since
// its last wgmma.wait_group; shared memory landed by cp.async must have passed a fence.proxy.async,
// by the landing thread or by the issuing thread after the landing, before a wgmma reads it (the emulator tracks cp.async data; ordinary stores are
// not tracked).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflash {

constexpr int kWarpgroupThreads = 128;
constexpr int kWgmmaM = 64;
constexpr int kSwizzleAtomBytes = 1024;

// setmaxnreg: register budgets do not exist on the host; every thread of the warpgroup must still
// execute it (.sync.aligned).
template <int kRegs>
inline void warpgroup_release_registers() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  ::cuemu::warpgroup_sync();
}
template <int kRegs>
inline void warpgroup_claim_registers() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  ::cuemu::warpgroup_sync();
}

namespace wgmma_emu {

constexpr unsigned long long kField = 0x3FFFull;  // 14-bit address / offset fields, units of 16 bytes

inline std::string hex(unsigned long long v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%016llx", v);
  return buf;
}

struct Desc {
  size_t start, lbo, sbo;
  bool sw128;
};

inline Desc decode(unsigned long long desc) {
  const unsigned swizzle = static_cast<unsigned>(desc >> 62);
  const unsigned base_offset = static_cast<unsigned>((desc >> 49) & 7);
  if (swizzle > 1) ::cuemu::fail("wgmma descriptor " + hex(desc) + ": swizzle mode " + std::to_string(swizzle) + " is not emulated (0 none, 1 128-byte)");
  if (base_offset != 0) ::cuemu::fail("wgmma descriptor " + hex(desc) + ": matrix base offset other than 0 is not emulated");
  const unsigned long long reserved = desc & ~((kField) | (kField << 16) | (kField << 32) | (7ull << 49) | (3ull << 62));
  if (reserved) ::cuemu::fail("wgmma descriptor " + hex(desc) + ": reserved bits set (a field overflowed?)");
  return {static_cast<size_t>(desc & kField) << 4, static_cast<size_t>((desc >> 16) & kField) << 4,
          static_cast<size_t>((desc >> 32) & kField) << 4, swizzle == 1};
}

inline Desc decode_checked(unsigned long long desc) {
  const Desc d = decode(desc);
  if (d.sw128 && d.start % kSwizzleAtomBytes + 32 > 128)
    ::cuemu::fail("wgmma descriptor " + hex(desc) + ": 128B swizzle with the k16 step leaving the atom's first row");
  return d;
}

struct Operands {
  unsigned a[4];
  unsigned long long desc;
};

// kMN: B MN-major (imm-trans-b = 1), 128-byte swizzle only: element (k, n) at start + (n / 64) * LBO +
// (k / 8) * SBO + (k % 8) * 128 + (n % 64) * 2, then the same address swizzle; the start must be a
// 1024-byte atom.
template <int kN, bool kBf16, bool kMN = false>
inline void mma_rs(float* d, const unsigned (&a)[4], unsigned long long desc) {
  ::cuemu::Fiber& f = ::cuemu::me();
  ::cuemu::State& s = ::cuemu::S();
  const long long threads = static_cast<long long>(s.block.x) * s.block.y * s.block.z;
  if (threads % kWarpgroupThreads) ::cuemu::fail("wgmma.mma_async in a block of " + std::to_string(threads) + " threads (not whole warpgroups)");
  if (!f.wg_fenced) ::cuemu::fail("thread " + std::to_string(f.linear) + ": wgmma.mma_async without a wgmma.fence since its last wgmma.wait_group");
  const int me = f.linear % kWarpgroupThreads;
  Operands mine{{a[0], a[1], a[2], a[3]}, desc};
  std::memcpy(::cuemu::wg_slot(me), &mine, sizeof mine);
  ::cuemu::warpgroup_sync();
  auto ops = [](int i) {
    Operands o;
    std::memcpy(&o, ::cuemu::wg_slot(i), sizeof o);
    return o;
  };
  for (int i = 0; i < kWarpgroupThreads; ++i)
    if (ops(i).desc != desc) ::cuemu::fail("wgmma.mma_async: the warpgroup's threads passed different B descriptors (" + hex(ops(i).desc) + " vs " + hex(desc) + ")");
  const Desc b = kMN ? decode(desc) : decode_checked(desc);
  if (kMN && (!b.sw128 || b.start % kSwizzleAtomBytes || b.lbo % kSwizzleAtomBytes || b.sbo % kSwizzleAtomBytes))
    ::cuemu::fail("wgmma MN-major B descriptor " + hex(desc) + ": only the 128B swizzle with a 1024-byte aligned start, LBO and SBO is emulated");
  std::vector<size_t> b_rows;
  std::vector<unsigned char> b_seen;
  // B(k, n): 16-bit element of the K-major no-swizzle layout; every core-matrix row read is checked.
  auto B = [&](int k, int n) {
    size_t off = b.start + (k / 8) * b.lbo + (n / 8) * b.sbo + (n % 8) * 16 + (k % 8) * 2;
    if (kMN) {  // row k of an atom holds 64 consecutive n, then the address swizzle
      const size_t logical = b.start + (n / 64) * b.lbo + (k / 8) * b.sbo + (k % 8) * 128 + (n % 64) * 2;
      off = logical ^ (((logical >> 7) & 7) << 4);
    } else if (b.sw128) {  // column n's 128-byte row, then address bits 4-6 XOR bits 7-9
      const size_t logical = b.start + (n / 8) * b.sbo + (n % 8) * 128 + k * 2;
      off = logical ^ (((logical >> 7) & 7) << 4);
    }
    if ((kMN ? n : k) % 8 == 0) {  // the first element of a 16-byte chunk
      ::cuemu::check_smem(s.smem + off, 16, 16, "wgmma.mma_async B core-matrix row");
      b_rows.push_back(off);
      b_seen.insert(b_seen.end(), s.smem + off, s.smem + off + 16);
      for (int i = 0; i < 16; ++i)
        if (::cuemu::unfenced_for(off + i))
          ::cuemu::fail("wgmma.mma_async reads shared memory that thread " + std::to_string(s.unfenced_owner[off + i] - 1) +
                        " landed by cp.async with no fence.proxy.async since, by it or by the reading thread");
    }
    unsigned short v;
    std::memcpy(&v, s.smem + off, 2);
    return ::cuemu::to_double(v, kBf16);
  };
  // A(row, k): element i = (k & 1) + (row % 16 >= 8 ? 2 : 0) + (k >= 8 ? 4 : 0) of the thread of warp
  // row / 16, lane 4 (row % 8) + (k % 8) / 2.
  auto A = [&](int row, int k) {
    const int i = (k & 1) + (row % 16 >= 8 ? 2 : 0) + (k >= 8 ? 4 : 0);
    const unsigned reg = ops(32 * (row / 16) + 4 * (row % 8) + (k % 8) / 2).a[i / 2];
    return ::cuemu::to_double(static_cast<unsigned short>(i % 2 ? reg >> 16 : reg & 0xFFFFu), kBf16);
  };
  // The accumulator input: the latest in-flight result for these registers, else the registers.
  const float* in = d;
  for (const auto& p : f.wg_pending)
    if (p.d == d) in = p.value.data();
  const int w = me / 32, lane = me % 32, g = lane >> 2, t = lane & 3;
  std::vector<float> out(kN / 2);
  for (int i = 0; i < kN / 2; ++i) {
    const int row = 16 * w + g + (i % 4 >= 2 ? 8 : 0), col = 8 * (i / 4) + 2 * t + (i & 1);
    double acc = in[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = static_cast<float>(acc);
  }
  ::cuemu::warpgroup_sync();
  f.wg_pending.push_back({d, kN / 2, std::move(out), f.wg_committed, a, {a[0], a[1], a[2], a[3]}, std::move(b_rows),
                          std::move(b_seen)});
  for (int i = 0; i < kN / 2; ++i) d[i] = std::nanf("");  // in flight: undefined until wait_group
}

}  // namespace wgmma_emu

// 128-byte swizzle, K-major: the start must be a 1024-byte aligned atom plus a k offset that keeps
// the k16 step (32 bytes) inside the atom's first 128-byte row; LBO is unused (1).
__device__ __forceinline__ unsigned long long wgmma_desc_sw128(const void* smem, unsigned sbo) {
  ::cuemu::check_smem(smem, 16, 16, "wgmma descriptor start address");
  const size_t addr = static_cast<const unsigned char*>(smem) - ::cuemu::dynamic_smem();
  if (addr % kSwizzleAtomBytes + 32 > 128)
    ::cuemu::fail("wgmma 128B-swizzle descriptor: start " + std::to_string(addr) + " is not a 1024-byte atom plus a k offset below 96");
  if ((addr >> 4) > wgmma_emu::kField || (sbo >> 4) > wgmma_emu::kField) ::cuemu::fail("wgmma descriptor: a field does not fit its 14 bits");
  if (sbo % kSwizzleAtomBytes) ::cuemu::fail("wgmma 128B-swizzle descriptor: SBO must be a multiple of 1024 bytes");
  return static_cast<unsigned long long>(addr >> 4) | (1ull << 16) | (static_cast<unsigned long long>(sbo >> 4) << 32) |
         (1ull << 62);
}

__device__ __forceinline__ unsigned long long wgmma_desc_advance(unsigned long long desc, unsigned bytes) {
  if (bytes % 16) ::cuemu::fail("wgmma_desc_advance: not a multiple of 16 bytes");
  const unsigned long long start = (desc & wgmma_emu::kField) + (bytes >> 4);
  if (start > wgmma_emu::kField) ::cuemu::fail("wgmma_desc_advance: start address overflows its 14-bit field");
  return (desc & ~wgmma_emu::kField) | start;
}

// 128-byte swizzle, MN-major: a 1024-byte aligned start; LBO (next 64 n) and SBO (next 8 k) whole atoms.
__device__ __forceinline__ unsigned long long wgmma_desc_sw128_mn(const void* smem, unsigned lbo, unsigned sbo) {
  ::cuemu::check_smem(smem, 16, 16, "wgmma descriptor start address");
  const size_t addr = static_cast<const unsigned char*>(smem) - ::cuemu::dynamic_smem();
  if (addr % kSwizzleAtomBytes) ::cuemu::fail("wgmma 128B-swizzle MN-major descriptor: start " + std::to_string(addr) + " is not 1024-byte aligned");
  if ((addr >> 4) > wgmma_emu::kField || (lbo >> 4) > wgmma_emu::kField || (sbo >> 4) > wgmma_emu::kField)
    ::cuemu::fail("wgmma descriptor: a field does not fit its 14 bits");
  if (lbo % kSwizzleAtomBytes || sbo % kSwizzleAtomBytes) ::cuemu::fail("wgmma 128B-swizzle MN-major descriptor: LBO and SBO must be multiples of 1024 bytes");
  return static_cast<unsigned long long>(addr >> 4) | (static_cast<unsigned long long>(lbo >> 4) << 16) |
         (static_cast<unsigned long long>(sbo >> 4) << 32) | (1ull << 62);
}

// wgmma.fence / commit_group / wait_group are .sync.aligned: every lane of the warp executes them together.
__device__ __forceinline__ void wgmma_fence() {
  ::cuemu::warp_sync();
  ::cuemu::me().wg_fenced = true;
}

__device__ __forceinline__ void wgmma_commit() {
  ::cuemu::warp_sync();
  ++::cuemu::me().wg_committed;
}

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  ::cuemu::warp_sync();
  ::cuemu::Fiber& f = ::cuemu::me();
  const long long limit = static_cast<long long>(f.wg_committed) - kPending;  // groups < limit retire
  std::vector<::cuemu::Fiber::Wgmma> keep;
  for (auto& p : f.wg_pending) {
    if (static_cast<long long>(p.group) < limit) {
      for (int i = 0; i < 4; ++i)
        if (p.a[i] != p.a_seen[i])
          ::cuemu::fail("thread " + std::to_string(f.linear) + ": a wgmma's A registers changed before its wait_group");
      for (size_t r = 0; r < p.b_rows.size(); ++r)
        if (std::memcmp(::cuemu::S().smem + p.b_rows[r], p.b_seen.data() + 16 * r, 16))
          ::cuemu::fail("thread " + std::to_string(f.linear) + ": shared memory a wgmma reads (B row at byte " +
                        std::to_string(p.b_rows[r]) + ") was overwritten before its wait_group");
      std::memcpy(p.d, p.value.data(), sizeof(float) * p.n);
    } else {
      keep.push_back(std::move(p));
    }
  }
  f.wg_pending.swap(keep);
  f.wg_fenced = false;
}

template <int kN>
__device__ __forceinline__ void wgmma_fence_operand(float (&)[kN]) {}

template <int kN>
__device__ __forceinline__ void wgmma_fence_operand(unsigned (&)[kN]) {}

__device__ __forceinline__ void fence_proxy_async_shared() { ::cuemu::proxy_fence(); }

// griddepcontrol: one block runs at a time here, after the kernels before it in the stream: nothing to order.
__device__ __forceinline__ void griddep_launch_dependents() {}
__device__ __forceinline__ void griddep_wait() {}

// stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 (PTX ISA): lanes 8j .. 8j+7 give the addresses of the
// stored rows 0..7 of matrix j (16 bytes each, 16-byte aligned); register j of lane l holds matrix j's
// elements (row l >> 2, columns 2(l % 4) and 2(l % 4) + 1, the lower column in the low half); .trans
// stores element (row r, column c) as element r of stored row c. Every lane writes its own elements.
__device__ __forceinline__ void stmatrix_x4_trans(void* smem_row, const unsigned (&r)[4]) {
  ::cuemu::check_smem(smem_row, 16, 16, "stmatrix.x4.trans");
  const int lane = ::cuemu::me().lane;
  unsigned char* mine = static_cast<unsigned char*>(smem_row);
  std::memcpy(::cuemu::slot(lane), &mine, sizeof mine);
  ::cuemu::warp_sync();
  for (int j = 0; j < 4; ++j)
    for (int e = 0; e < 2; ++e) {
      unsigned char* row;
      std::memcpy(&row, ::cuemu::slot(8 * j + 2 * (lane & 3) + e), sizeof row);
      const unsigned short v = static_cast<unsigned short>(e ? r[j] >> 16 : r[j] & 0xFFFFu);
      std::memcpy(row + 2 * (lane >> 2), &v, sizeof v);
    }
  ::cuemu::warp_sync();  // the addresses stay in the slots until every lane has written
}

template <int kN, typename T>
__device__ __forceinline__ void wgmma_m64k16_rs(float (&d)[kN / 2], const unsigned (&a)[4], unsigned long long desc_b) {
  static_assert(kN % 8 == 0 && kN >= 8 && kN <= 256, "wgmma m64nNk16: N a multiple of 8 in [8, 256]");
  wgmma_emu::mma_rs<kN, std::is_same<T, __nv_bfloat16>::value>(d, a, desc_b);
}

template <int kN, typename T>
__device__ __forceinline__ void wgmma_m64k16_rs_mn(float (&d)[kN / 2], const unsigned (&a)[4], unsigned long long desc_b) {
  static_assert(kN % 8 == 0 && kN >= 8 && kN <= 256, "wgmma m64nNk16: N a multiple of 8 in [8, 256]");
  wgmma_emu::mma_rs<kN, std::is_same<T, __nv_bfloat16>::value, true>(d, a, desc_b);
}

}  // namespace cuflash
