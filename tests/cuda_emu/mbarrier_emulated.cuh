// Host stand-in for cuda_src/common/mbarrier.cuh (tests/cuda_emu): the same functions, written from the
// PTX ISA ("Parallel Synchronization and Communication Instructions: mbarrier", CTA scope, no tx-count)
// rather than from how the kernels use them.
//
// An mbarrier object has an expected arrival count, a pending arrival count and a phase; phases
// alternate parity 0, 1, 0, ...
//   mbarrier.init [addr], count      phase 0, expected = pending = count (1 <= count <= 2^20 - 1)
//   mbarrier.arrive [addr]           pending -= 1; at 0 the phase completes: pending = expected, phase + 1
//                                    (so an arrive never finds pending at 0)
//   cp.async.mbarrier.arrive.noinc [addr]
//                                    the same arrival, made when the thread's earlier cp.async copies
//                                    have all landed (noinc: the expected count includes it)
//   mbarrier.try_wait.parity p, [addr], parity
//                                    p = the phase of parity `parity` has completed, i.e. the current
//                                    phase has the other parity (parity is 0 or 1). A phase two or more
//                                    behind looks incomplete again, as on the GPU.
// The state is kept per shared-memory offset in the emulator (cuemu::State::mbars, cleared before each
// block) rather than in the 8 bytes themselves: the emulated mbar_wait blocks its fiber until the phase
// number changes (cuemu::wait_for_gen), so a wait that no arrival can complete is reported as a
// deadlock with the barrier's offset and parity, and everything else is deterministic per schedule.
// Checks: the address is in the block's dynamic shared memory and 8-byte aligned; no use before
// mbarrier.init, nor by another thread before a __syncthreads after it (the header's contract); no
// second init (undefined without mbarrier.inval); the object's 8 bytes not overwritten by ordinary
// stores (a stage buffer overlapping the barriers).
#pragma once

namespace cuflash {

namespace mbarrier_emu {

constexpr unsigned kMaxCount = (1u << 20) - 1;
constexpr unsigned long long kTag = 0x4d4241525249455full;  // written to the object's bytes at init

inline size_t offset(const unsigned long long* bar, const char* what) {
  ::cuemu::check_smem(bar, 8, 8, what);
  return reinterpret_cast<const unsigned char*>(bar) - ::cuemu::dynamic_smem();
}

inline std::string name(size_t off) { return "mbarrier at shared byte " + std::to_string(off); }

// The initialised barrier at `bar`, usable by the calling thread.
inline ::cuemu::MBarrier& get(const unsigned long long* bar, const char* what) {
  const size_t off = offset(bar, what);
  ::cuemu::State& s = ::cuemu::S();
  auto it = s.mbars.find(off);
  if (it == s.mbars.end()) ::cuemu::fail(std::string(what) + ": " + name(off) + " used before mbarrier.init");
  ::cuemu::MBarrier& m = it->second;
  const int me = ::cuemu::me().linear;
  if (me != m.init_thread && s.block_bar.gen == m.init_sync)
    ::cuemu::fail(std::string(what) + " by thread " + std::to_string(me) + ": " + name(off) + " initialised by thread " +
                  std::to_string(m.init_thread) + " with no __syncthreads since");
  if (*bar != kTag) ::cuemu::fail(std::string(what) + ": " + name(off) + " overwritten by ordinary stores since its init");
  return m;
}

}  // namespace mbarrier_emu

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  const size_t off = mbarrier_emu::offset(bar, "mbarrier.init");
  if (count < 1 || count > mbarrier_emu::kMaxCount)
    ::cuemu::fail("mbarrier.init: " + mbarrier_emu::name(off) + " count " + std::to_string(count) + " outside 1..2^20-1");
  ::cuemu::State& s = ::cuemu::S();
  if (s.mbars.count(off)) ::cuemu::fail("mbarrier.init: " + mbarrier_emu::name(off) + " initialised twice (no mbarrier.inval)");
  ::cuemu::MBarrier& m = s.mbars[off];
  m.phase = ::cuemu::Barrier{0, static_cast<int>(count), 0};
  m.init_thread = ::cuemu::me().linear;
  m.init_sync = s.block_bar.gen;
  *bar = mbarrier_emu::kTag;
}

__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  ::cuemu::Barrier& b = mbarrier_emu::get(bar, "mbarrier.arrive").phase;
  if (++b.arrived == b.expected) {  // the last arrival completes the phase
    b.arrived = 0;
    ++b.gen;
  }
}

// cp.async.mbarrier.arrive.noinc: the arrival happens when all of the thread's earlier cp.async
// copies have landed; the emulator lands them here (in issue order) and arrives at once.
__device__ __forceinline__ void cp_async_mbar_arrive(unsigned long long* bar) {
  mbarrier_emu::get(bar, "cp.async.mbarrier.arrive.noinc");  // checked before the copies land
  ::cuemu::cp_async_land_all();
  mbar_arrive(bar);
}

__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  const char* what = "mbarrier.try_wait.parity";
  ::cuemu::MBarrier& m = mbarrier_emu::get(bar, what);
  if (parity > 1) ::cuemu::fail(std::string(what) + ": parity " + std::to_string(parity) + " (must be 0 or 1)");
  while ((m.phase.gen & 1) == parity)  // the phase of this parity is the current one: not complete yet
    ::cuemu::wait_for_gen(m.phase, "mbar_wait on " + mbarrier_emu::name(mbarrier_emu::offset(bar, what)) + " (parity " +
                                       std::to_string(parity) + "; the barrier is in phase " + std::to_string(m.phase.gen) +
                                       ", count " + std::to_string(m.phase.expected) + ")");
}

// bar.sync id, threads (PTX ISA "bar, barrier"): the first `threads` arrivals at barrier `id` release
// each other. Checks: 1 <= id <= 15, a whole number of warps within the block, one count per id.
__device__ __forceinline__ void named_barrier_sync(unsigned id, unsigned threads) {
  ::cuemu::State& s = ::cuemu::S();
  const unsigned block = s.block.x * s.block.y * s.block.z;
  if (id < 1 || id > 15) ::cuemu::fail("bar.sync: id " + std::to_string(id) + " outside 1..15");
  if (threads == 0 || threads % 32 != 0 || threads > block)
    ::cuemu::fail("bar.sync: thread count " + std::to_string(threads) + " not a whole number of warps of the block");
  ::cuemu::Barrier& b = s.named_bars[id];
  if (b.expected == 0) b.expected = static_cast<int>(threads);
  if (b.expected != static_cast<int>(threads))
    ::cuemu::fail("bar.sync " + std::to_string(id) + ": counts " + std::to_string(b.expected) + " and " +
                  std::to_string(threads) + " used together");
  ::cuemu::wait_on(b);
}

}  // namespace cuflash
