// Python binding of the masked convolution kernels and the checks that keep them in bounds. The
// Python wrapper (masked_conv.py) validates arguments for users; these checks guard the raw kernels
// against direct calls. Linked with masked_conv_cuda.cu (CUDA tensors) or, built with
// -DMASKED_CONV_EMULATED, with masked_conv_emulated.cpp (the same kernels on CPU tensors).

#include <torch/extension.h>

#include <limits>
#include <optional>
#include <vector>

#include "masked_conv_ops.h"

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

void check_window(const std::vector<int64_t>& window, int64_t channels, const char* name) {
  TORCH_CHECK(window.size() == 2, "masked_conv: ", name, " must be (start, length)");
  TORCH_CHECK(window[0] >= 0 && window[1] >= 1 && window[0] + window[1] <= channels, "masked_conv: ",
              name, " (", window[0], ", ", window[1], ") is out of range for ", channels, " channels");
}

void check_pair(const std::vector<int64_t>& values, int64_t minimum, const char* name) {
  TORCH_CHECK(values.size() == 2 && values[0] >= minimum && values[1] >= minimum,
              "masked_conv: ", name, " must be two integers >= ", minimum);
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::vector<int64_t>& in_window, const std::vector<int64_t>& out_window,
                const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                const std::vector<int64_t>& dilation, bool depthwise) {
#ifdef MASKED_CONV_EMULATED
  TORCH_CHECK(x.is_cpu() && weight.is_cpu(), "masked_conv (emulated): x and weight must be CPU tensors");
#else
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), "masked_conv: x and weight must be CUDA tensors");
#endif
  TORCH_CHECK(x.device() == weight.device(), "masked_conv: x and weight are on different devices");
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "masked_conv: x and weight must be 4-D");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "masked_conv: dtype ", dtype, " is not supported (float32, float16, bfloat16)");
  TORCH_CHECK(weight.scalar_type() == dtype, "masked_conv: x and weight dtypes differ");
  // Kernels index single dimensions and per-image planes with 32-bit ints.
  for (int64_t d : x.sizes()) TORCH_CHECK(d <= kIntMax, "masked_conv: x dimension too large");
  TORCH_CHECK(x.size(1) * x.size(2) * x.size(3) <= kIntMax, "masked_conv: one image of x is too large");
  check_window(in_window, x.size(1), "in_window");
  check_window(out_window, weight.size(0), "out_window");
  check_pair(stride, 1, "stride");
  check_pair(padding, 0, "padding");
  check_pair(dilation, 1, "dilation");
  if (depthwise) {
    TORCH_CHECK(weight.size(0) == x.size(1) && weight.size(1) == 1,
                "masked_conv: depthwise weight must be (C, 1, kh, kw) with C = x.size(1)");
    TORCH_CHECK(in_window == out_window, "masked_conv: depthwise needs in_window == out_window");
  } else {
    TORCH_CHECK(weight.size(1) == x.size(1), "masked_conv: weight.size(1) must equal x.size(1)");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == dtype,
                "masked_conv: bias must match x in device and dtype");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "masked_conv: bias must be (C_out,)");
  }
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                    const std::vector<int64_t>& dilation) {
  TORCH_CHECK(grad_out.device() == x.device() && grad_out.scalar_type() == x.scalar_type(),
              "masked_conv: grad_out must match x in device and dtype");
  std::vector<int64_t> expected = {x.size(0), weight.size(0), 0, 0};
  for (int d = 0; d < 2; ++d)
    expected[2 + d] = (x.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1) - 1) / stride[d] + 1;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expected), "masked_conv: grad_out has shape ",
              grad_out.sizes(), ", expected ", expected);
}

}  // namespace

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::vector<int64_t>& in_window, const std::vector<int64_t>& out_window,
                   const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                   const std::vector<int64_t>& dilation, bool depthwise) {
  check_args(x, weight, bias, in_window, out_window, stride, padding, dilation, depthwise);
  return masked_conv_ops().forward(x, weight, bias, in_window, out_window, stride, padding, dilation, depthwise);
}

at::Tensor grad_input(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                      const std::vector<int64_t>& in_window, const std::vector<int64_t>& out_window,
                      const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                      const std::vector<int64_t>& dilation, bool depthwise) {
  check_args(x, weight, std::nullopt, in_window, out_window, stride, padding, dilation, depthwise);
  check_grad_out(grad_out, x, weight, stride, padding, dilation);
  return masked_conv_ops().grad_input(grad_out, x, weight, in_window, out_window, stride, padding, dilation,
                                      depthwise);
}

at::Tensor grad_weight(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const std::vector<int64_t>& in_window, const std::vector<int64_t>& out_window,
                       const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                       const std::vector<int64_t>& dilation, bool depthwise) {
  check_args(x, weight, std::nullopt, in_window, out_window, stride, padding, dilation, depthwise);
  check_grad_out(grad_out, x, weight, stride, padding, dilation);
  return masked_conv_ops().grad_weight(grad_out, x, weight, in_window, out_window, stride, padding, dilation,
                                       depthwise);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Masked 2-D convolution restricted to channel windows.";
  m.def("forward", &forward, "Full-width output, zero outside out_window", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("in_window"), py::arg("out_window"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("depthwise"));
  m.def("grad_input", &grad_input, "Gradient of x, zero outside in_window", py::arg("grad_out"),
        py::arg("x"), py::arg("weight"), py::arg("in_window"), py::arg("out_window"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("depthwise"));
  m.def("grad_weight", &grad_weight, "Gradient of weight, zero outside the window block",
        py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("in_window"), py::arg("out_window"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("depthwise"));
}
