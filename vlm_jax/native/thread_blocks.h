// Work shared among the calling thread and helpers from XLA's intra-op thread pool, for the XLA FFI
// kernels in this folder (each compiled into its own library by vlm_jax/native/build.py).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace vlm_jax_native {

// Blocks of work taken in turn by the workers. Each worker takes a slot (0 is the caller) for its
// partial results, then blocks until none are left.
struct WorkQueue {
  int64_t blocks = 0, slots = 0;
  std::atomic<int64_t> next_block{0}, done_blocks{0}, next_slot{0};
  std::function<void(int64_t slot, int64_t block)> run;
};

inline void drain(WorkQueue& queue) {
  const int64_t slot = queue.next_slot.fetch_add(1);
  if (slot >= queue.slots) return;
  for (;;) {
    const int64_t block = queue.next_block.fetch_add(1);
    if (block >= queue.blocks) return;
    queue.run(slot, block);
    queue.done_blocks.fetch_add(1, std::memory_order_release);
  }
}

// how many slots (workers) run_blocks uses for `blocks` blocks
inline int64_t slots_for(xla::ffi::ThreadPool& pool, int64_t blocks) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), blocks));
}

// runs run(slot, block) for every block; returns when all are done. A helper that starts late finds
// no block left and never calls run, so run may refer to the caller's stack.
inline void run_blocks(xla::ffi::ThreadPool& pool, int64_t blocks, std::function<void(int64_t, int64_t)> run) {
  auto queue = std::make_shared<WorkQueue>();
  queue->blocks = blocks;
  queue->slots = slots_for(pool, blocks);
  queue->run = std::move(run);
  for (int64_t helper = 1; helper < queue->slots; ++helper) pool.Schedule([queue] { drain(*queue); });
  drain(*queue);
  while (queue->done_blocks.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
}

}  // namespace vlm_jax_native
