// The kernels' three entry points, provided by one backend: masked_conv_cuda.cu (CUDA tensors) or
// masked_conv_emulated.cpp (the same kernels on CPU tensors, for tests). masked_conv.cpp binds them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

struct MaskedConvOps {
  using Forward = at::Tensor (*)(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const std::vector<int64_t>& in_window,
                                 const std::vector<int64_t>& out_window, const std::vector<int64_t>& stride,
                                 const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                                 bool depthwise);
  using Backward = at::Tensor (*)(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  const std::vector<int64_t>& in_window, const std::vector<int64_t>& out_window,
                                  const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                  const std::vector<int64_t>& dilation, bool depthwise);
  Forward forward;
  Backward grad_input;
  Backward grad_weight;
};

const MaskedConvOps& masked_conv_ops();
