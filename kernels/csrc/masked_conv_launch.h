// Host side of the masked convolution: geometry, grid sizes and kernel launches, written once for
// any launcher. A launcher is built from the tensors' device, is called as
// launch(kernel, grid, args...) to run `kernel` on `grid` blocks of kThreads threads, and reports
// multiprocessors(). masked_conv_cuda.cu launches on the current CUDA stream,
// masked_conv_emulated.cpp runs the kernels on CPU threads; each provides ops_for<its launcher>().
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "masked_conv_kernels.cuh"
#include "masked_conv_ops.h"

namespace masked_conv {

inline Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight,
                              const std::vector<int64_t>& in_window, const std::vector<int64_t>& out_window,
                              const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& dilation, bool depthwise) {
  Geometry g;
  g.n = x.size(0);
  g.c_in = x.size(1);
  g.in_h = x.size(2);
  g.in_w = x.size(3);
  g.c_out = weight.size(0);
  g.w_cin = weight.size(1);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.out_h = (g.in_h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.out_w = (g.in_w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "masked_conv: input ", g.in_h, "x", g.in_w,
              " is too small for the kernel, padding and dilation");
  g.in_start = in_window[0];
  g.in_len = in_window[1];
  g.out_start = out_window[0];
  g.out_len = out_window[1];
  g.depthwise = depthwise;
  return g;
}

inline unsigned int blocks_for(int64_t work) {
  return static_cast<unsigned int>((work + kThreads - 1) / kThreads);
}

template <typename scalar_t>
const scalar_t* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

#define MASKED_CONV_DISPATCH(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename Launcher>
at::Tensor forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                   const std::optional<at::Tensor>& bias_in, const std::vector<int64_t>& in_window,
                   const std::vector<int64_t>& out_window, const std::vector<int64_t>& stride,
                   const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, bool depthwise) {
  const Launcher launch(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const Geometry g = make_geometry(x, weight, in_window, out_window, stride, padding, dilation, depthwise);
  at::Tensor y = at::zeros({g.n, g.c_out, g.out_h, g.out_w}, x.options());
  if (y.numel() == 0) return y;
  const int64_t out_hw = static_cast<int64_t>(g.out_h) * g.out_w;

  MASKED_CONV_DISPATCH(x.scalar_type(), "masked_conv_forward", [&] {
    const scalar_t* b = optional_ptr<scalar_t>(bias);
    if (depthwise) {
      launch(forward_depthwise_kernel<scalar_t>, dim3(blocks_for(g.n * g.out_len * out_hw)),
             x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), g);
    } else {
      launch(forward_dense_kernel<scalar_t>,
             dim3(blocks_for(g.n * out_hw), (g.out_len + kChannelTile - 1) / kChannelTile),
             x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), g);
    }
  });
  return y;
}

template <typename Launcher>
at::Tensor grad_input(const at::Tensor& grad_out_in, const at::Tensor& x,
                      const at::Tensor& weight_in, const std::vector<int64_t>& in_window,
                      const std::vector<int64_t>& out_window, const std::vector<int64_t>& stride,
                      const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, bool depthwise) {
  const Launcher launch(x.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const Geometry g = make_geometry(x, weight, in_window, out_window, stride, padding, dilation, depthwise);
  at::Tensor gx = at::zeros({g.n, g.c_in, g.in_h, g.in_w}, x.options());
  if (gx.numel() == 0) return gx;
  const int64_t in_hw = static_cast<int64_t>(g.in_h) * g.in_w;

  MASKED_CONV_DISPATCH(x.scalar_type(), "masked_conv_grad_input", [&] {
    if (depthwise) {
      launch(grad_input_depthwise_kernel<scalar_t>, dim3(blocks_for(g.n * g.in_len * in_hw)),
             grad_out.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g);
    } else {
      launch(grad_input_dense_kernel<scalar_t>,
             dim3(blocks_for(g.n * in_hw), (g.in_len + kChannelTile - 1) / kChannelTile),
             grad_out.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g);
    }
  });
  return gx;
}

template <typename Launcher>
at::Tensor grad_weight(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                       const at::Tensor& weight, const std::vector<int64_t>& in_window,
                       const std::vector<int64_t>& out_window, const std::vector<int64_t>& stride,
                       const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, bool depthwise) {
  const Launcher launch(x_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const Geometry g = make_geometry(x, weight, in_window, out_window, stride, padding, dilation, depthwise);
  at::Tensor gw = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  if (g.n == 0) return gw;

  const int64_t pairs = depthwise ? g.out_len : static_cast<int64_t>(g.out_len) * g.in_len;
  const int64_t w_cin_len = depthwise ? 1 : g.in_len;
  // Split the batch until the grid has a few blocks per SM; each block still sums >= 1 image.
  const int64_t target_blocks = 4 * launch.multiprocessors();
  const int64_t splits = std::min<int64_t>(g.n, std::max<int64_t>(1, (target_blocks + pairs - 1) / pairs));
  at::Tensor partial = at::empty({splits, g.out_len, w_cin_len, g.kh, g.kw}, x.options().dtype(at::kFloat));

  MASKED_CONV_DISPATCH(x.scalar_type(), "masked_conv_grad_weight", [&] {
    launch(grad_weight_kernel<scalar_t>, dim3(static_cast<unsigned int>(pairs), static_cast<unsigned int>(splits)),
           x.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), partial.data_ptr<float>(), g);
  });
  gw.narrow(0, g.out_start, g.out_len)
      .narrow(1, depthwise ? 0 : g.in_start, w_cin_len)
      .copy_(partial.sum(0));
  return gw;
}

template <typename Launcher>
MaskedConvOps ops_for() {
  return {&forward<Launcher>, &grad_input<Launcher>, &grad_weight<Launcher>};
}

}  // namespace masked_conv
