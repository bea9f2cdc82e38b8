// A CPU emulator for the CUDA kernels, so that CI (no GPU) runs the very lines of
// masked_conv_kernels.cuh and checks them against the reference convolution.
//
// Each launch starts kThreads host threads, one per CUDA thread of a block; they run the grid's
// blocks one after another in lockstep (a barrier between blocks). __shared__ arrays become static
// locals, shared by the threads of the one block that is running; __syncthreads() is a barrier
// of those threads. This checks indexing, tiling, bounds and the shared-memory reduction; it says
// nothing about speed, warps, memory coalescing or the CUDA compiler.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <condition_variable>
#include <optional>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace emulated {

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// A reusable barrier for a fixed number of threads (std::barrier needs C++20).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t phase = phase_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++phase_;
      woken_.notify_all();
    } else {
      woken_.wait(lock, [&] { return phase_ != phase; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable woken_;
  const int count_;
  int arrived_ = 0;
  int64_t phase_ = 0;
};

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 blockDim;
dim3 gridDim;
Barrier* block_barrier = nullptr;

inline void __syncthreads() { block_barrier->wait(); }

}  // namespace emulated

using emulated::__syncthreads;
using emulated::blockDim;
using emulated::blockIdx;
using emulated::dim3;
using emulated::gridDim;
using emulated::threadIdx;

#define __global__
#define __host__
#define __device__
#define __shared__ static

#include "masked_conv_launch.h"

namespace {

struct EmulatedLauncher {
  explicit EmulatedLauncher(c10::Device) {}

  int multiprocessors() const { return 4; }  // small, so the weight gradient's batch split is exercised

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, Args... args) const {
    const int threads = masked_conv::kThreads;
    emulated::Barrier barrier(threads);
    emulated::block_barrier = &barrier;
    gridDim = grid;
    blockDim = dim3(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = dim3(t);
        for (unsigned int by = 0; by < grid.y; ++by) {
          for (unsigned int bx = 0; bx < grid.x; ++bx) {
            blockIdx = dim3(bx, by);
            kernel(args...);
            barrier.wait();  // the next block reuses the shared arrays
          }
        }
      });
    }
    for (auto& thread : pool) thread.join();
    emulated::block_barrier = nullptr;
  }
};

}  // namespace

const MaskedConvOps& masked_conv_ops() {
  static const MaskedConvOps ops = masked_conv::ops_for<EmulatedLauncher>();
  return ops;
}
