"""The emulated mbarriers (tests/cuda_emu/mbarrier_emulated.cuh, standing in for
cuda_src/common/mbarrier.cuh) on small kernels of this file's own, compiled for the host like the real
kernels: a producer / consumer ring under every schedule, waits that can never complete reported as
deadlocks, and misuse reported as errors.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import cuda_emu

_REASON = cuda_emu.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"CPU kernel emulation unavailable: {_REASON}")

STAGES, WIDTH, PRODUCERS, CONSUMERS = 4, 64, 32, 64
THREADS = PRODUCERS + CONSUMERS
RING_SMEM = 2 * STAGES * 8 + STAGES * WIDTH * 4

SOURCE = r"""
#include "common/mbarrier.cuh"

namespace mbt {
using namespace cuflash;

constexpr int kStages = 4, kWidth = 64, kProducers = 32, kConsumers = 64;

// Warp 0 produces, warps 1-2 consume, through kStages stages of kWidth ints in shared memory (after
// the barriers full[kStages], empty[kStages]). Every producer lane waits until stage s is free, writes
// its share of the stage and arrives on full[s]; every consumer waits for full[s], reads its own element
// and one another producer lane wrote, accumulates, and arrives on empty[s]. Round r of stage s is its
// phase r: consumers wait for parity r & 1 of full[s]; producers for the previous round's phase of
// empty[s] (parity (r & 1) ^ 1: in round 0 that is the phase "before" phase 0, complete at init).
template <bool kWaitFull>
__global__ void ring_kernel(const int* in, int iters, int* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);
  unsigned long long* empty = full + kStages;
  int* stage = reinterpret_cast<int*>(empty + kStages);
  const int t = threadIdx.x;
  if (t == 0)
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], kProducers);
      mbar_init(&empty[s], kConsumers);
    }
  __syncthreads();
  const int* src = in + static_cast<long long>(blockIdx.x) * iters * kWidth;
  if (t < kProducers) {
    for (int it = 0; it < iters; ++it) {
      const int s = it % kStages;
      mbar_wait(&empty[s], ((it / kStages) & 1) ^ 1);
      for (int j = t; j < kWidth; j += kProducers) stage[s * kWidth + j] = src[it * kWidth + j];
      mbar_arrive(&full[s]);
    }
  } else {
    const int c = t - kProducers;
    int acc = 0;
    for (int it = 0; it < iters; ++it) {
      const int s = it % kStages;
      if (kWaitFull) mbar_wait(&full[s], (it / kStages) & 1);
      acc += (it + 1) * stage[s * kWidth + c] - stage[s * kWidth + (c + 1) % kWidth];
      mbar_arrive(&empty[s]);
    }
    out[blockIdx.x * kConsumers + c] = acc;
  }
}

// One misuse or deadlock per mode (block of 96 threads, 64 bytes of shared memory).
__global__ void bad_kernel(int mode, unsigned long long* global_word) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned long long* bar = reinterpret_cast<unsigned long long*>(smem);
  const int t = threadIdx.x;
  switch (mode) {
    case 0:  // one arrival completes phase 0; the consumers wait for parity 1 (phase 1), which nobody completes
      if (t == 0) mbar_init(bar, 1);
      __syncthreads();
      if (t == 0) mbar_arrive(bar);
      if (t >= 32) mbar_wait(bar, 1);
      break;
    case 1:  // count 96, but only warp 0 arrives
      if (t == 0) mbar_init(bar, 96);
      __syncthreads();
      if (t < 32) mbar_arrive(bar);
      mbar_wait(bar, 0);
      break;
    case 2:  // warps 1-2 would arrive after a __syncthreads that the waiting warp 0 never reaches
      if (t == 0) mbar_init(bar, 64);
      __syncthreads();
      if (t >= 32) {
        __syncthreads();
        mbar_arrive(bar);
      } else {
        mbar_wait(bar, 0);
        __syncthreads();
      }
      break;
    case 3: mbar_arrive(bar); break;  // no init
    case 4: mbar_wait(bar, 0); break;
    case 5: if (t == 0) mbar_init(reinterpret_cast<unsigned long long*>(smem + 4), 1); break;
    case 6: if (t == 0) mbar_init(global_word, 1); break;
    case 7: if (t == 0) mbar_init(bar, 0); break;
    case 8: if (t == 0) mbar_init(bar, 1u << 20); break;
    case 9: if (t < 2) mbar_init(bar, 1); break;  // two threads initialise it
    case 10:  // initialised and used with no __syncthreads in between
      if (t == 0) mbar_init(bar, THREADS_IN_BLOCK);
      mbar_arrive(bar);
      break;
    case 11:  // a stage buffer overlapping the barrier
      if (t == 0) mbar_init(bar, 1);
      __syncthreads();
      if (t == 1) *bar = 0;
      __syncthreads();
      if (t == 0) mbar_arrive(bar);
      break;
    case 12:
      if (t == 0) mbar_init(bar, 1);
      __syncthreads();
      mbar_wait(bar, 2);
      break;
    case 13:  // only block 0 initialises: block 1's shared memory has no barrier
      if (t == 0 && blockIdx.x == 0) mbar_init(bar, 96);
      __syncthreads();
      mbar_arrive(bar);
      break;
  }
}

}  // namespace mbt
""".replace("THREADS_IN_BLOCK", str(THREADS))

RING = "mbt::ring_kernel<true>"
RING_NO_FULL_WAIT = "mbt::ring_kernel<false>"
BAD = "mbt::bad_kernel"


@pytest.fixture(scope="module")
def mod():
    return cuda_emu.build("test_mbarrier.cu", [RING, RING_NO_FULL_WAIT, BAD], text=SOURCE)


@pytest.fixture(params=list(cuda_emu.SCHEDULES))
def schedule(request):
    return request.param


def _ring(mod, kernel, schedule, blocks=2, iters=37, seed=0):
    x = np.random.default_rng(seed).integers(0, 1000, size=(blocks, iters, WIDTH), dtype=np.int32)
    out = np.full((blocks, CONSUMERS), -12345, np.int32)
    mod.launch(kernel, blocks, THREADS, [x, np.int32(iters), out], smem=RING_SMEM, schedule=schedule)
    weights = np.arange(1, iters + 1, dtype=np.int64)[None, :, None]
    want = (weights * x - np.roll(x, -1, axis=2)).sum(axis=1)
    return out, want


def test_ring_exact(mod, schedule):
    """4 stages, 37 rounds (not a multiple of 4), 2 blocks (each initialises its own barriers)."""
    out, want = _ring(mod, RING, schedule)
    np.testing.assert_array_equal(out, want)


def test_ring_missing_wait_is_exposed(mod):
    """Consumers that skip the wait on full[s], run first (high_first), go through every round before
    the producers start: they complete the empty[s] phases far ahead, and the producers' parity waits
    (a phase two or more behind looks incomplete) can never return."""
    with pytest.raises(cuda_emu.EmulatorError, match=r"deadlock .* thread 0 at mbar_wait on mbarrier at shared byte 32"):
        _ring(mod, RING_NO_FULL_WAIT, "high_first")


def _bad(mod, mode, schedule="round_robin", blocks=1):
    word = np.zeros(1, np.uint64)
    mod.launch(BAD, blocks, THREADS, [np.int32(mode), word], smem=64, schedule=schedule)


@pytest.mark.parametrize("mode, what", [
    (0, r"mbar_wait on mbarrier at shared byte 0 \(parity 1; the barrier is in phase 1, count 1\)"),
    (1, r"mbar_wait on mbarrier at shared byte 0 \(parity 0; the barrier is in phase 0, count 96\)"),
    (2, r"thread 0 at mbar_wait on mbarrier at shared byte 0 \(parity 0; the barrier is in phase 0, count 64\)"),
])
def test_wait_that_cannot_complete_is_a_deadlock(mod, schedule, mode, what):
    with pytest.raises(cuda_emu.EmulatorError, match="deadlock") as e:
        _bad(mod, mode, schedule)
    assert re.search(what, str(e.value)), str(e.value)


@pytest.mark.parametrize("mode, blocks, message", [
    (3, 1, r"mbarrier\.arrive: mbarrier at shared byte 0 used before mbarrier\.init"),
    (4, 1, r"mbarrier\.try_wait\.parity: mbarrier at shared byte 0 used before mbarrier\.init"),
    (5, 1, r"mbarrier\.init: shared address .* not 8-byte aligned"),
    (6, 1, r"mbarrier\.init: shared address .* outside the block's 64 bytes of dynamic shared memory"),
    (7, 1, r"count 0 outside 1\.\.2\^20-1"),
    (8, 1, r"count 1048576 outside 1\.\.2\^20-1"),
    (9, 1, r"initialised twice"),
    (10, 1, r"mbarrier\.arrive by thread 1: .* initialised by thread 0 with no __syncthreads since"),
    (11, 1, r"overwritten by ordinary stores"),
    (12, 1, r"parity 2 \(must be 0 or 1\)"),
    (13, 2, r"used before mbarrier\.init"),  # state is per block
])
def test_misuse_is_an_error(mod, mode, blocks, message):
    with pytest.raises(cuda_emu.EmulatorError, match=message):
        _bad(mod, mode, blocks=blocks)


def test_overlay_defines_the_header_functions():
    """The stand-in declares the same functions, with the same parameters, as the PTX header."""
    from cuflash import _jit

    sig = re.compile(r"__device__ __forceinline__ void (\w+)\(([^)]*)\)")
    header = sig.findall((_jit.source_dir() / "common" / "mbarrier.cuh").read_text())
    overlay = sig.findall(cuda_emu.OVERLAYS["common/mbarrier.cuh"].read_text())
    assert header and overlay == header
