// Host emulation of the CUDA execution model, for running cuflash's real kernel source on the CPU
// (g++ -include cuda_host_shim.h). See tests/cuda_emu/__init__.py for how it is built and used.
//
// Execution: one block at a time, each CUDA thread a fiber (ucontext) on ONE OS thread, switched
// only at synchronization points (__syncthreads, warp collectives, emulated ldmatrix / mma.sync,
// mbarrier waits).
// Every run is therefore deterministic; a block whose threads can no longer all meet at a barrier
// (divergent __syncthreads, a warp collective with lanes missing, an mbarrier wait no arrival can
// complete) is reported as a deadlock instead of hanging. Shared memory is filled with 0xFF bytes (NaN as fp16 / bf16 / fp32) before each block
// and guarded by a canary checked after it.
#pragma once

#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>
#include <ucontext.h>

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <vector_types.h>
#include <vector_functions.h>

// math_constants.h spells its constants with these device intrinsics.
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
#include <math_constants.h>

namespace cuemu {

void fail(const std::string& msg);  // ends the launch with an error (defined below)

struct Fiber;
struct Barrier {
  int arrived = 0;
  int expected = 0;
  unsigned long gen = 0;
};

constexpr int kSlotBytes = 64;  // per-lane exchange slot of a warp (and of a warpgroup)
constexpr int kWarpgroup = 128;  // threads of a warpgroup (wgmma)

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0, warp = 0, lane = 0;
  bool done = false;
  Barrier* waiting = nullptr;
  unsigned long wait_gen = 0;
  std::string wait_what;  // set by wait_for_gen: what the thread waits at, for a deadlock report
  // cp.async: copies issued but not yet complete, with the commit group each belongs to
  struct Copy { void* dst; const void* src; int bytes; bool zero; unsigned long group; };
  std::vector<Copy> pending;
  unsigned long committed = 0;  // groups committed so far (the open group has this index)
  // cp.async data this thread landed in shared memory and has not yet made visible to the async
  // proxy (fence.proxy.async): [offset, offset + bytes) of the block's shared memory
  std::vector<std::pair<size_t, int>> unfenced;
  unsigned long last_fence = 0;  // State::clock at this thread's latest fence.proxy.async
  // wgmma.mma_async: results computed at issue, written to the accumulator registers only when
  // wgmma.wait_group retires their commit group (the registers read NaN until then)
  // An issued wgmma: its result (written to d when its group retires) and what it read (B rows of
  // shared memory, A registers), compared again at retirement: real wgmmas read their operands at
  // some time in flight, so an operand changed before wait_group is a race.
  struct Wgmma {
    float* d; int n; std::vector<float> value; unsigned long group;
    const unsigned* a; unsigned a_seen[4]; std::vector<size_t> b_rows; std::vector<unsigned char> b_seen;
  };
  std::vector<Wgmma> wg_pending;
  unsigned long wg_committed = 0;
  bool wg_fenced = false;  // a wgmma.fence since the last wgmma.wait_group (or the start)
};

// An mbarrier (mbarrier_emulated.cuh): phase.expected arrivals per phase, phase.arrived of the current
// phase so far, phase.gen the phase number; the thread that initialised it and the block barrier's
// generation then (other threads may use it only after a __syncthreads).
struct MBarrier {
  Barrier phase;
  int init_thread = 0;
  unsigned long init_sync = 0;
};

// Order in which runnable threads of a block are resumed (see launch_impl).
enum Schedule { kRoundRobin = 0, kLowFirst = 1, kHighFirst = 2 };

struct State {
  int schedule = kRoundRobin;
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  std::vector<Barrier> warp_bars;
  std::vector<unsigned char> warp_slots;  // [warps][32][kSlotBytes]
  std::vector<Barrier> wg_bars;
  std::vector<unsigned char> wg_slots;    // [warpgroups][128][kSlotBytes]
  std::vector<unsigned short> unfenced_owner;  // per shared byte: 1 + thread that landed it unfenced, or 0
  std::vector<unsigned long> landed_at;        // per shared byte: clock when cp.async last landed it
  unsigned long clock = 0;                     // ticks at every landing and every proxy fence
  std::map<size_t, MBarrier> mbars;  // this block's initialised mbarriers by shared-memory offset (nodes never move)
  std::map<unsigned, Barrier> named_bars;  // bar.sync id, count (id > 0) of this block, by id (nodes never move)
  Barrier block_bar;
  int exited = 0;
  ucontext_t sched;
  Fiber* cur = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<unsigned char> smem_buf;
  std::string error;
  bool failed = false;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline State& S() {
  static State s;
  return s;
}

inline Fiber& me() { return *S().cur; }

inline void wait_on(Barrier& b) {
  State& s = S();
  Fiber& f = *s.cur;
  const unsigned long gen = b.gen;
  if (++b.arrived >= b.expected) {  // the last one in releases everyone and goes on
    b.arrived = 0;
    ++b.gen;
    return;
  }
  f.waiting = &b;
  f.wait_gen = gen;
  swapcontext(&f.ctx, &s.sched);
}

// Blocks the calling thread, without arriving, until b.gen changes: a wait that other threads complete
// (an mbarrier phase). The caller re-checks its condition after it returns. `what` describes the wait in
// a deadlock report.
inline void wait_for_gen(Barrier& b, std::string what) {
  State& s = S();
  Fiber& f = *s.cur;
  f.waiting = &b;
  f.wait_gen = b.gen;
  f.wait_what = std::move(what);
  swapcontext(&f.ctx, &s.sched);
  f.wait_what.clear();
}

// All lanes of the calling warp meet here (every warp collective uses the full mask in cuflash).
inline void warp_sync() { wait_on(S().warp_bars[me().warp]); }

inline void block_sync() { wait_on(S().block_bar); }

// All 128 threads of the calling warpgroup meet here.
inline void warpgroup_sync() { wait_on(S().wg_bars[me().linear / kWarpgroup]); }

// This warpgroup's exchange slot of thread `i` (0..127 within the warpgroup).
inline unsigned char* wg_slot(int i) {
  State& s = S();
  return s.wg_slots.data() + (static_cast<size_t>(me().linear / kWarpgroup) * kWarpgroup + i) * kSlotBytes;
}

// This warp's exchange slot of `lane` (kSlotBytes bytes).
inline unsigned char* slot(int lane) {
  State& s = S();
  return s.warp_slots.data() + (static_cast<size_t>(me().warp) * 32 + lane) * kSlotBytes;
}

// Lane l deposits its value, everyone reads lane src_of(l)'s, then nobody writes again until all read.
template <typename T, typename F>
inline T exchange(T v, F src_of) {
  static_assert(sizeof(T) <= kSlotBytes, "slot too small");
  const int lane = me().lane;
  std::memcpy(slot(lane), &v, sizeof(T));
  warp_sync();
  const int src = src_of(lane);
  T out = v;
  if (src >= 0 && src < 32) std::memcpy(&out, slot(src), sizeof(T));
  warp_sync();
  return out;
}

inline bool in_smem(const void* p, size_t bytes) {
  const State& s = S();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= s.smem && c + bytes <= s.smem + s.smem_bytes;
}

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  if (!in_smem(p, bytes)) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s: shared address %p (+%zu bytes) outside the block's %zu bytes of dynamic shared memory",
                  what, p, bytes, S().smem_bytes);
    fail(buf);
  }
  if (reinterpret_cast<uintptr_t>(p) % align) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s: shared address %p not %zu-byte aligned", what, p, align);
    fail(buf);
  }
}

inline void check_align(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s: global address %p not %zu-byte aligned", what, p, align);
    fail(buf);
  }
}

// A cp.async copy lands: its bytes wait for this thread's fence.proxy.async before wgmma may read them.
inline void land_copy(Fiber& f, void* dst, const void* src, int bytes, bool zero) {
  if (zero) std::memset(dst, 0, bytes);
  else std::memcpy(dst, src, bytes);
  State& s = S();
  const size_t off = static_cast<unsigned char*>(dst) - s.smem;
  const unsigned long now = ++s.clock;
  for (int i = 0; i < bytes; ++i) {
    s.unfenced_owner[off + i] = static_cast<unsigned short>(f.linear + 1);
    s.landed_at[off + i] = now;
  }
  f.unfenced.push_back({off, bytes});
}

// fence.proxy.async.shared::cta by thread f: its own landed copies become visible to the async proxy
// (for every thread), and so does everything landed so far for f's own later wgmmas (a consumer
// that has seen a stage through an mbarrier wait fences before reading it; see unfenced_for).
inline void proxy_fence() {
  Fiber& f = me();
  State& s = S();
  f.last_fence = ++s.clock;
  for (const auto& r : f.unfenced)
    for (int i = 0; i < r.second; ++i)
      if (s.unfenced_owner[r.first + i] == f.linear + 1) s.unfenced_owner[r.first + i] = 0;
  f.unfenced.clear();
}

// Whether shared byte `off` holds cp.async data not yet made visible to the calling thread's async
// proxy: landed unfenced by its writer and not fenced by the caller since it landed.
inline bool unfenced_for(size_t off) {
  const State& s = S();
  return s.unfenced_owner[off] != 0 && me().last_fence < s.landed_at[off];
}

// cp.async: completes at the wait_group that retires its group (any time in between is legal).
inline void cp_async(void* dst, const void* src, int bytes, bool zero) {
  Fiber& f = me();
  f.pending.push_back({dst, src, bytes, zero, f.committed});
}
inline void cp_async_commit() { ++me().committed; }
inline void cp_async_wait(int n_pending) {
  Fiber& f = me();
  const long long limit = static_cast<long long>(f.committed) - n_pending;  // groups < limit complete
  std::vector<Fiber::Copy> keep;
  for (const auto& c : f.pending) {
    if (static_cast<long long>(c.group) < limit) {
      land_copy(f, c.dst, c.src, c.bytes, c.zero);
    } else {
      keep.push_back(c);
    }
  }
  f.pending.swap(keep);
}
// Every cp.async the thread has issued lands now (cp.async.mbarrier.arrive: arrival after all of them).
inline void cp_async_land_all() {
  Fiber& f = me();
  for (const auto& c : f.pending) land_copy(f, c.dst, c.src, c.bytes, c.zero);
  f.pending.clear();
}

void launch_impl(dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg);

template <class... Args, size_t... I>
std::tuple<Args...> unpack(void** args, std::index_sequence<I...>) {
  return std::tuple<Args...>(*static_cast<std::remove_reference_t<Args>*>(args[I])...);
}

// The value of a 16-bit MMA operand element (fp16, or bf16 with bf16 set), exactly, as the emulated
// tensor-core instructions read their inputs.
inline double to_double(unsigned short bits, bool bf16) {
  if (bf16) {
    const unsigned u = static_cast<unsigned>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw h;
  h.x = bits;
  return static_cast<double>(__half2float(__half(h)));
}

// args[i] points at the value of parameter i, as cuLaunchKernel takes them. Returns 0, or -1 with the
// message in error().
template <class... Args>
int launch(void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem, void** args) {
  struct Call {
    void (*k)(Args...);
    std::tuple<Args...> a;
  } call{kernel, unpack<Args...>(args, std::index_sequence_for<Args...>{})};
  S().failed = false;
  S().error.clear();
  launch_impl(grid, block, smem, [](void* p) {
    Call* c = static_cast<Call*>(p);
    std::apply(c->k, c->a);
  }, &call);
  return S().failed ? -1 : 0;
}

}  // namespace cuemu

// ------------------------------------------------------------------------------------------------
// CUDA built-ins
// ------------------------------------------------------------------------------------------------

#define threadIdx (::cuemu::me().tid)
#define blockIdx (::cuemu::S().block_idx)
#define blockDim (::cuemu::S().block)
#define gridDim (::cuemu::S().grid)

inline void __syncthreads() { cuemu::block_sync(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuemu::warp_sync(); }  // cuflash uses the full mask only

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  return cuemu::exchange(v, [&](int l) { return (l ^ mask) < ((l / width) + 1) * width ? (l ^ mask) : l; });
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  return cuemu::exchange(v, [&](int l) { return (l % width) >= static_cast<int>(delta) ? l - static_cast<int>(delta) : l; });
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  return cuemu::exchange(v, [&](int l) { return (l % width) + static_cast<int>(delta) < width ? l + static_cast<int>(delta) : l; });
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  return cuemu::exchange(v, [&](int l) { return (l / width) * width + (src % width); });
}
inline int __all_sync(unsigned, int pred) {
  const int lane = cuemu::me().lane;
  int v = pred != 0;
  std::memcpy(cuemu::slot(lane), &v, sizeof v);
  cuemu::warp_sync();
  int all = 1;
  for (int l = 0; l < 32; ++l) {
    int x;
    std::memcpy(&x, cuemu::slot(l), sizeof x);
    all &= x;
  }
  cuemu::warp_sync();
  return all;
}

// One OS thread runs every fiber: atomics need no locking.
inline unsigned atomicMax(unsigned* p, unsigned v) { unsigned o = *p; if (v > o) *p = v; return o; }
inline int atomicMax(int* p, int v) { int o = *p; if (v > o) *p = v; return o; }
inline unsigned atomicOr(unsigned* p, unsigned v) { unsigned o = *p; *p = o | v; return o; }
inline int atomicCAS(int* p, int cmp, int v) { int o = *p; if (o == cmp) *p = v; return o; }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) { unsigned o = *p; if (o == cmp) *p = v; return o; }
inline int atomicAdd(int* p, int v) { int o = *p; *p = o + v; return o; }
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
inline void __threadfence() {}  // blocks run one after another: every earlier write is visible
inline void __trap() { ::cuemu::fail("__trap() called"); }

// prmt (default mode) as __byte_perm: result byte i = byte (s >> 4i) & 7 of {y, x} (x = bytes 0..3).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
  return r;
}

// Single correctly rounded fp32 operations (the build passes -ffp-contract=off: no FMA contraction).
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __log2f(float x) { return log2f(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }


// ------------------------------------------------------------------------------------------------
// The launcher: blocks one after another, each block's threads as fibers
// ------------------------------------------------------------------------------------------------

namespace cuemu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSmemAlign = 1024;  // as the GPU's shared window: swizzle atoms line up with offsets
constexpr size_t kCanaryBytes = 256;
constexpr unsigned char kCanary = 0xA5;

inline void fail(const std::string& msg) {
  State& s = S();
  if (!s.failed) s.error = msg;
  s.failed = true;
  if (s.cur == nullptr) return;  // (launch checks, outside any fiber)
  Fiber& f = *s.cur;
  f.done = true;
  swapcontext(&f.ctx, &s.sched);  // never resumed
  std::abort();
}

inline void finish_copies(Fiber& f) {
  for (const auto& c : f.pending) {
    if (c.zero) std::memset(c.dst, 0, c.bytes);
    else std::memcpy(c.dst, c.src, c.bytes);
  }
  f.pending.clear();
}

inline void fiber_entry(int index) {
  State& s = S();
  s.body(s.body_arg);
  Fiber& f = s.fibers[index];
  finish_copies(f);  // copies still in flight at exit complete anyway
  if (!f.wg_pending.empty()) fail("thread " + std::to_string(f.linear) + " exited with wgmma.mma_async results never waited for (wgmma.commit_group / wgmma.wait_group missing)");
  f.done = true;
  ++s.exited;
  // An exited thread counts as arrived at later block barriers.
  Barrier& b = s.block_bar;
  b.expected = static_cast<int>(s.fibers.size()) - s.exited;
  if (b.arrived > 0 && b.arrived >= b.expected) {
    b.arrived = 0;
    ++b.gen;
  }
}  // returns to s.sched through uc_link

inline std::string describe_deadlock() {
  State& s = S();
  std::string msg = "deadlock in block (" + std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) + "," +
                    std::to_string(s.block_idx.z) + "): ";
  int shown = 0;
  for (const Fiber& f : s.fibers) {
    if (f.done || shown >= 6) continue;
    const bool at_block = f.waiting == &s.block_bar;
    const std::string at = !f.wait_what.empty() ? f.wait_what : at_block ? "__syncthreads" : "a warp collective";
    msg += "thread " + std::to_string(f.linear) + " at " + at + "; ";
    ++shown;
  }
  msg += std::to_string(s.exited) + " threads exited";
  return msg;
}

inline void launch_impl(dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg) {
  State& s = S();
  const long long n = static_cast<long long>(block.x) * block.y * block.z;
  if (n < 1 || n > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1) {
    fail("invalid launch configuration: block of " + std::to_string(n) + " threads");
    return;
  }
  s.grid = grid;
  s.block = block;
  s.body = body;
  s.body_arg = arg;
  s.fibers.assign(n, Fiber{});
  while (s.stacks.size() < static_cast<size_t>(n)) s.stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  const int warps = static_cast<int>((n + 31) / 32);
  s.warp_bars.assign(warps, Barrier{});
  s.warp_slots.assign(static_cast<size_t>(warps) * 32 * kSlotBytes, 0);
  const int warpgroups = static_cast<int>((n + kWarpgroup - 1) / kWarpgroup);
  s.wg_bars.assign(warpgroups, Barrier{});
  s.wg_slots.assign(static_cast<size_t>(warpgroups) * kWarpgroup * kSlotBytes, 0);
  s.unfenced_owner.assign(smem, 0);
  s.landed_at.assign(smem, 0);
  s.smem_buf.assign(smem + kSmemAlign + kCanaryBytes, 0);
  s.smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(s.smem_buf.data()) + kSmemAlign - 1) /
                                            kSmemAlign * kSmemAlign);
  s.smem_bytes = smem;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = make_uint3(bx, by, bz);
        std::memset(s.smem, 0xFF, smem);  // NaN in every float format: unwritten shared memory shows
        std::memset(s.smem + smem, kCanary, kCanaryBytes);
        s.exited = 0;
        s.block_bar = Barrier{0, static_cast<int>(n), 0};
        for (int w = 0; w < warps; ++w) s.warp_bars[w] = Barrier{0, static_cast<int>(std::min<long long>(32, n - 32LL * w)), 0};
        for (int w = 0; w < warpgroups; ++w)
          s.wg_bars[w] = Barrier{0, static_cast<int>(std::min<long long>(kWarpgroup, n - 1LL * kWarpgroup * w)), 0};
        std::fill(s.unfenced_owner.begin(), s.unfenced_owner.end(), 0);
        std::fill(s.landed_at.begin(), s.landed_at.end(), 0);
        s.mbars.clear();  // mbarriers live in shared memory: each block initialises its own
        s.named_bars.clear();
        for (long long i = 0; i < n; ++i) {
          Fiber& f = s.fibers[i];
          f = Fiber{};
          f.linear = static_cast<int>(i);
          f.tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (static_cast<long long>(block.x) * block.y));
          f.warp = static_cast<int>(i / 32);
          f.lane = static_cast<int>(i % 32);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = s.stacks[i];
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &s.sched;
          makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 1, static_cast<int>(i));
        }
        auto runnable = [](const Fiber& f) {
          return !f.done && (f.waiting == nullptr || f.waiting->gen != f.wait_gen);
        };
        auto resume = [&](Fiber& f) {
          f.waiting = nullptr;
          s.cur = &f;
          swapcontext(&s.sched, &f.ctx);
          s.cur = nullptr;
        };
        for (;;) {
          bool ran = false, all_done = true;
          if (s.schedule == kRoundRobin) {
            // every runnable thread advances to its next synchronization point, in thread order
            for (Fiber& f : s.fibers) {
              if (f.done) continue;
              all_done = false;
              if (!runnable(f)) continue;
              resume(f);
              ran = true;
              if (s.failed) return;
            }
          } else {
            // always the lowest (kLowFirst) or highest (kHighFirst) runnable thread: one warp runs as
            // far ahead of the others as the block barriers allow
            Fiber* pick = nullptr;
            for (size_t j = 0; j < s.fibers.size(); ++j) {
              Fiber& f = s.fibers[s.schedule == kLowFirst ? j : s.fibers.size() - 1 - j];
              if (f.done) continue;
              all_done = false;
              if (runnable(f)) {
                pick = &f;
                break;
              }
            }
            if (pick != nullptr) {
              resume(*pick);
              ran = true;
              if (s.failed) return;
            }
          }
          if (all_done) break;
          if (!ran) {
            fail(describe_deadlock());
            return;
          }
        }
        for (size_t i = 0; i < kCanaryBytes; ++i)
          if (s.smem[smem + i] != kCanary) {
            fail("block (" + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) +
                 ") wrote past its " + std::to_string(smem) + " bytes of dynamic shared memory");
            return;
          }
      }
}

// Dynamic shared memory of the running block (what `extern __shared__ T name[]` is rewritten to).
inline unsigned char* dynamic_smem() { return S().smem; }

inline const char* error() { return S().error.c_str(); }

}  // namespace cuemu

#define __shared__ __SHARED_NEEDS_THE_EMULATOR_REWRITE__
