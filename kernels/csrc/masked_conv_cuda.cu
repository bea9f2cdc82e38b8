// Masked 2-D convolution on CUDA: the kernels of masked_conv_kernels.cuh launched on the current
// stream by the host code of masked_conv_launch.h.

// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a
// minimal CUDA toolkit (nvcc + cudart) lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "masked_conv_launch.h"

namespace {

struct CudaLauncher {
  explicit CudaLauncher(c10::Device device) : guard(device), stream(c10::cuda::getCurrentCUDAStream()) {}

  int multiprocessors() const {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
    return count;
  }

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, Args... args) const {
    kernel<<<grid, masked_conv::kThreads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  c10::cuda::CUDAGuard guard;  // the tensors' device is current while the launcher lives
  cudaStream_t stream;
};

}  // namespace

const MaskedConvOps& masked_conv_ops() {
  static const MaskedConvOps ops = masked_conv::ops_for<CudaLauncher>();
  return ops;
}
