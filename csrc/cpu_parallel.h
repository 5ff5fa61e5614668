// Threading of the CPU entry points: one parallel region per pass, in which the threads take
// blocks of the work in turn.
//
// Why not one at::parallel_for per tile, or a static split: every parallel region ends when its
// last thread does, so when another process holds a core, the thread that shares it makes the
// whole team wait, once per region. With a region per tile (the FeCL passes had dozens, plus
// BLAS's own), 2 threads ran several times slower than 1 on a machine with one busy core; with a
// static split, a thread that runs late still owns half of the range. Here a thread that the OS
// deschedules holds up the others by at most the block it is working on.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace dycon {

// Threads for `work` units of which each thread should get at least `grain`: at least 1, at
// most torch's intra-op thread count.
inline int64_t threads_for(int64_t work, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / std::max<int64_t>(grain, 1)));
}

// fn(t) for each t in [0, threads), each on a thread of its own where torch has them (else in
// turn), under the caller's thread-local state: the ops called inside (BLAS products) must see the
// dispatch keys and grad mode of the entry point, not a worker thread's defaults (autograd).
template <typename Fn> void parallel_threads(int64_t threads, const Fn& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = t0; t < t1; ++t) fn(t);
  });
}

// [0, n) in blocks of `block`, handed out in order to whichever of `threads` threads asks next
// (one parallel region). make_worker() is called once per thread and returns the callable that
// processes a block, worker(lo, hi): per-thread scratch lives in it. Which thread runs a block
// varies from run to run, so each block must write outputs of its own.
template <typename MakeWorker>
void parallel_blocks(int64_t n, int64_t block, int64_t threads, const MakeWorker& make_worker) {
  if (n <= 0) return;
  const int64_t blocks = (n + block - 1) / block;
  std::atomic<int64_t> next{0};
  parallel_threads(std::min(threads, blocks), [&](int64_t) {
    auto worker = make_worker();
    for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < blocks;
         k = next.fetch_add(1, std::memory_order_relaxed))
      worker(k * block, std::min(n, (k + 1) * block));
  });
}

}  // namespace dycon
