// "The last of n to arrive": the split-KV merge (attention.cu) and the stream-K fixup (gemm.cu) have
// n pieces of one output each store a partial, then count themselves on the output's counter; the
// piece that brings the count to n reads every partial and finishes the output. Nobody waits.
#pragma once

#include "common/mma.cuh"

namespace cuflash {

// One thread of an arriving piece, after a barrier that follows every thread's partial stores (a CTA
// barrier or a named one over the threads that stored): true for the last of n arrivals. The acq_rel
// fence before the count orders the piece's stores (the other threads' through the barrier) before it
// at device scope; the last piece's fence after it orders the other pieces' partials before the reads
// its threads issue after their next barrier. The last one puts the counter back to 0, so the next
// launch (a CUDA graph replay) starts clean.
__device__ __forceinline__ bool arrive_is_last(int* counter, int n) {
  fence_acq_rel_gpu();
  const bool last = atomicAdd(counter, 1) == n - 1;
  if (last) {
    fence_acq_rel_gpu();
    *counter = 0;  // after the fence, which would otherwise wait for this store
  }
  return last;
}

}  // namespace cuflash
