// Shared-memory mbarriers (sm_90: try_wait.parity) for producer / consumer pipelines inside one CTA.
//
// Like common/mma.cuh and common/wgmma.cuh, this file holds inline PTX only, so that the host
// emulation (tests/cuda_emu/mbarrier_emulated.cuh, the same functions written from the PTX ISA) can
// stand in for it.
//
// An mbarrier is a 64-bit word in shared memory counting arrivals of its current phase. mbar_init sets
// the expected count; once that many arrivals have happened the phase completes, the count resets and
// the next phase begins. Phases alternate parity 0, 1, 0, ...: mbar_wait(bar, p) returns once the
// phase of parity p has completed (the barrier is in a later phase). Arrive has release and a
// completed wait acquire semantics at CTA scope, so ordinary shared-memory writes made before an
// arrive are visible to the threads whose wait saw that phase complete.
#pragma once

namespace cuflash {

// One thread, before any use; the block must then synchronise (__syncthreads) before other threads use it.
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))),
               "r"(count)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
          static_cast<unsigned>(__cvta_generic_to_shared(bar)))
      : "memory");
}

// An arrival on `bar` that happens once every cp.async this thread has issued so far has landed
// (cp.async.mbarrier.arrive.noinc): the thread goes on at once, and the barrier's expected count
// includes this arrival (noinc). A consumer whose wait sees the phase complete sees those copies.
__device__ __forceinline__ void cp_async_mbar_arrive(unsigned long long* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(bar)))
               : "memory");
}

// Blocks until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  unsigned done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// Named barrier `id` (1..15; 0 is __syncthreads) for `threads` threads (a multiple of 32): a subset of
// the CTA, e.g. the consumer warpgroups of a warp-specialized kernel, meets without the producer.
__device__ __forceinline__ void named_barrier_sync(unsigned id, unsigned threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace cuflash
