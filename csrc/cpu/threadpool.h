// A small fork-join pool: parallel_for splits [0, n) into contiguous chunks, one per worker.
// Sized from the cores this process may use (sched_getaffinity), settable with set_num_threads.
// Safe to resize while other threads run kernels (a resize waits for the running job), and across
// fork(): the child gets a fresh pool of the same size whose workers start with its first job.
#pragma once
#include <cstdint>
#include <functional>

namespace refpg {

constexpr int kMaxThreads = 1024;  // set_num_threads refuses more (checked in csrc/bind_cpu.cpp)

int num_threads();
void set_num_threads(int n);  // 1 <= n <= kMaxThreads; n <= 0: back to the number of available cores

// Calls fn(begin, end) on disjoint chunks covering [0, n), in parallel; returns when all are done.
// Chunks are multiples of `grain` (except the last). Runs inline when n is small, with one thread,
// or when called from inside another parallel_for (so kernels may call kernels).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace refpg
