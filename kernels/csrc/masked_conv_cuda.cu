// Masked 2-D convolution on CUDA: a direct convolution that reads only the input channels inside
// the input window and writes only the output channels inside the output window. Tensors stay
// full width (NCHW, contiguous), so a supernet never copies slices; channels outside the windows
// are left to the caller's zero-filled outputs. All arithmetic accumulates in fp32.
//
// Two layer kinds: dense (groups == 1) and depthwise (groups == C_in == C_out, equal windows).
// Argument checks live in masked_conv.cpp; this file assumes they passed.

// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a
// minimal CUDA toolkit (nvcc + cudart) lacks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace {

constexpr int kThreads = 256;    // threads per block; a power of two (the reduction relies on it)
constexpr int kChannelTile = 4;  // channels per thread in dense kernels: each activation loaded is used 4 times
constexpr int kTapTile = 9;      // kernel taps reduced per pass in the weight gradient (a whole 3x3)

struct Geometry {
  int n, c_in, in_h, in_w;
  int c_out, out_h, out_w;
  int w_cin;  // weight.size(1): c_in for dense layers, 1 for depthwise
  int kh, kw, sh, sw, ph, pw, dh, dw;
  int in_start, in_len, out_start, out_len;
  bool depthwise;
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight,
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

int multiprocessor_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

unsigned int blocks_for(int64_t work) {
  return static_cast<unsigned int>((work + kThreads - 1) / kThreads);
}

// ---------------------------------------------------------------- forward

template <typename scalar_t>
__global__ void forward_dense_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                     const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                                     Geometry g) {
  const int64_t out_hw = static_cast<int64_t>(g.out_h) * g.out_w;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // over n * out_hw
  if (idx >= g.n * out_hw) return;
  const int n = idx / out_hw;
  const int p = idx % out_hw;
  const int ih0 = (p / g.out_w) * g.sh - g.ph;
  const int iw0 = (p % g.out_w) * g.sw - g.pw;
  const int oc_first = blockIdx.y * kChannelTile;  // inside the output window
  const int taps = g.kh * g.kw;

  // The last tile may run past the window: those slots recompute the last channel and are not written.
  const scalar_t* w_oc[kChannelTile];
  float acc[kChannelTile];
#pragma unroll
  for (int t = 0; t < kChannelTile; ++t) {
    const int oc = g.out_start + min(oc_first + t, g.out_len - 1);
    w_oc[t] = w + (static_cast<int64_t>(oc) * g.w_cin + g.in_start) * taps;
    acc[t] = 0.f;
  }
  const scalar_t* x_n = x + (static_cast<int64_t>(n) * g.c_in + g.in_start) * g.in_h * g.in_w;
  for (int c = 0; c < g.in_len; ++c) {
    const scalar_t* x_c = x_n + static_cast<int64_t>(c) * g.in_h * g.in_w;
    for (int i = 0; i < g.kh; ++i) {
      const int ih = ih0 + i * g.dh;
      if (ih < 0 || ih >= g.in_h) continue;
      for (int j = 0; j < g.kw; ++j) {
        const int iw = iw0 + j * g.dw;
        if (iw < 0 || iw >= g.in_w) continue;
        const float v = static_cast<float>(x_c[ih * g.in_w + iw]);
        const int k = c * taps + i * g.kw + j;
#pragma unroll
        for (int t = 0; t < kChannelTile; ++t) acc[t] += v * static_cast<float>(w_oc[t][k]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kChannelTile; ++t) {
    if (oc_first + t >= g.out_len) break;
    const int oc = g.out_start + oc_first + t;
    const float b = bias ? static_cast<float>(bias[oc]) : 0.f;
    y[(static_cast<int64_t>(n) * g.c_out + oc) * out_hw + p] = static_cast<scalar_t>(acc[t] + b);
  }
}

template <typename scalar_t>
__global__ void forward_depthwise_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                         const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                                         Geometry g) {
  const int64_t out_hw = static_cast<int64_t>(g.out_h) * g.out_w;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // over n * len * out_hw
  if (idx >= g.n * g.out_len * out_hw) return;
  const int p = idx % out_hw;
  const int64_t nc = idx / out_hw;
  const int c = g.out_start + nc % g.out_len;
  const int n = nc / g.out_len;
  const int ih0 = (p / g.out_w) * g.sh - g.ph;
  const int iw0 = (p % g.out_w) * g.sw - g.pw;
  const scalar_t* x_c = x + (static_cast<int64_t>(n) * g.c_in + c) * g.in_h * g.in_w;
  const scalar_t* w_c = w + static_cast<int64_t>(c) * g.kh * g.kw;

  float acc = bias ? static_cast<float>(bias[c]) : 0.f;
  for (int i = 0; i < g.kh; ++i) {
    const int ih = ih0 + i * g.dh;
    if (ih < 0 || ih >= g.in_h) continue;
    for (int j = 0; j < g.kw; ++j) {
      const int iw = iw0 + j * g.dw;
      if (iw < 0 || iw >= g.in_w) continue;
      acc += static_cast<float>(x_c[ih * g.in_w + iw]) * static_cast<float>(w_c[i * g.kw + j]);
    }
  }
  y[(static_cast<int64_t>(n) * g.c_out + c) * out_hw + p] = static_cast<scalar_t>(acc);
}

// ---------------------------------------------------------------- input gradient
// gx[n, ic, ih, iw] = sum over oc, taps (i, j) with ih = oh * sh - ph + i * dh (same for w) of
// gy[n, oc, oh, ow] * w[oc, ic, i, j]: invert the index map and skip taps that land between strides.

template <typename scalar_t>
__global__ void grad_input_dense_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ w,
                                        scalar_t* __restrict__ gx, Geometry g) {
  const int64_t in_hw = static_cast<int64_t>(g.in_h) * g.in_w;
  const int64_t out_hw = static_cast<int64_t>(g.out_h) * g.out_w;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // over n * in_hw
  if (idx >= g.n * in_hw) return;
  const int n = idx / in_hw;
  const int p = idx % in_hw;
  const int ih = p / g.in_w;
  const int iw = p % g.in_w;
  const int ic_first = blockIdx.y * kChannelTile;  // inside the input window
  const int taps = g.kh * g.kw;

  int64_t w_ic[kChannelTile];  // offset of w[., ic, 0, 0] inside one output channel's filter
  float acc[kChannelTile];
#pragma unroll
  for (int t = 0; t < kChannelTile; ++t) {
    w_ic[t] = static_cast<int64_t>(g.in_start + min(ic_first + t, g.in_len - 1)) * taps;
    acc[t] = 0.f;
  }
  for (int o = 0; o < g.out_len; ++o) {
    const int oc = g.out_start + o;
    const scalar_t* gy_c = gy + (static_cast<int64_t>(n) * g.c_out + oc) * out_hw;
    const scalar_t* w_o = w + static_cast<int64_t>(oc) * g.w_cin * taps;
    for (int i = 0; i < g.kh; ++i) {
      const int th = ih + g.ph - i * g.dh;
      if (th < 0 || th % g.sh != 0) continue;
      const int oh = th / g.sh;
      if (oh >= g.out_h) continue;
      for (int j = 0; j < g.kw; ++j) {
        const int tw = iw + g.pw - j * g.dw;
        if (tw < 0 || tw % g.sw != 0) continue;
        const int ow = tw / g.sw;
        if (ow >= g.out_w) continue;
        const float v = static_cast<float>(gy_c[oh * g.out_w + ow]);
        const int tap = i * g.kw + j;
#pragma unroll
        for (int t = 0; t < kChannelTile; ++t) acc[t] += v * static_cast<float>(w_o[w_ic[t] + tap]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kChannelTile; ++t) {
    if (ic_first + t >= g.in_len) break;
    const int ic = g.in_start + ic_first + t;
    gx[(static_cast<int64_t>(n) * g.c_in + ic) * in_hw + p] = static_cast<scalar_t>(acc[t]);
  }
}

template <typename scalar_t>
__global__ void grad_input_depthwise_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ w,
                                            scalar_t* __restrict__ gx, Geometry g) {
  const int64_t in_hw = static_cast<int64_t>(g.in_h) * g.in_w;
  const int64_t out_hw = static_cast<int64_t>(g.out_h) * g.out_w;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // over n * len * in_hw
  if (idx >= g.n * g.in_len * in_hw) return;
  const int p = idx % in_hw;
  const int64_t nc = idx / in_hw;
  const int c = g.in_start + nc % g.in_len;
  const int n = nc / g.in_len;
  const int ih = p / g.in_w;
  const int iw = p % g.in_w;
  const scalar_t* gy_c = gy + (static_cast<int64_t>(n) * g.c_out + c) * out_hw;
  const scalar_t* w_c = w + static_cast<int64_t>(c) * g.kh * g.kw;

  float acc = 0.f;
  for (int i = 0; i < g.kh; ++i) {
    const int th = ih + g.ph - i * g.dh;
    if (th < 0 || th % g.sh != 0) continue;
    const int oh = th / g.sh;
    if (oh >= g.out_h) continue;
    for (int j = 0; j < g.kw; ++j) {
      const int tw = iw + g.pw - j * g.dw;
      if (tw < 0 || tw % g.sw != 0) continue;
      const int ow = tw / g.sw;
      if (ow >= g.out_w) continue;
      acc += static_cast<float>(gy_c[oh * g.out_w + ow]) * static_cast<float>(w_c[i * g.kw + j]);
    }
  }
  gx[(static_cast<int64_t>(n) * g.c_in + c) * in_hw + p] = static_cast<scalar_t>(acc);
}

// ---------------------------------------------------------------- weight gradient
// One block per (output channel, input channel) pair of the windows (one channel when depthwise)
// and per slice of the batch; the block sums gy * x over its slice for kTapTile taps at a time and
// writes fp32 partial sums, which the host adds over slices (deterministic, no atomics).

template <typename scalar_t>
__global__ void grad_weight_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                                   float* __restrict__ partial, Geometry g) {
  __shared__ float red[kTapTile][kThreads];
  const int pair = blockIdx.x;
  const int split = blockIdx.y;
  const int oc = g.out_start + (g.depthwise ? pair : pair / g.in_len);
  const int ic = g.in_start + (g.depthwise ? pair : pair % g.in_len);
  const int n_begin = static_cast<int64_t>(split) * g.n / gridDim.y;
  const int n_end = static_cast<int64_t>(split + 1) * g.n / gridDim.y;
  const int64_t in_hw = static_cast<int64_t>(g.in_h) * g.in_w;
  const int64_t out_hw = static_cast<int64_t>(g.out_h) * g.out_w;
  const int64_t count = (n_end - n_begin) * out_hw;
  const int taps = g.kh * g.kw;

  for (int tap0 = 0; tap0 < taps; tap0 += kTapTile) {
    float acc[kTapTile];
#pragma unroll
    for (int t = 0; t < kTapTile; ++t) acc[t] = 0.f;
    for (int64_t q = threadIdx.x; q < count; q += blockDim.x) {
      const int n = n_begin + q / out_hw;
      const int p = q % out_hw;
      const int ih0 = (p / g.out_w) * g.sh - g.ph;
      const int iw0 = (p % g.out_w) * g.sw - g.pw;
      const float v = static_cast<float>(gy[(static_cast<int64_t>(n) * g.c_out + oc) * out_hw + p]);
      const scalar_t* x_c = x + (static_cast<int64_t>(n) * g.c_in + ic) * in_hw;
#pragma unroll
      for (int t = 0; t < kTapTile; ++t) {
        const int tap = tap0 + t;
        if (tap >= taps) break;
        const int ih = ih0 + (tap / g.kw) * g.dh;
        const int iw = iw0 + (tap % g.kw) * g.dw;
        if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w)
          acc[t] += v * static_cast<float>(x_c[ih * g.in_w + iw]);
      }
    }
#pragma unroll
    for (int t = 0; t < kTapTile; ++t) red[t][threadIdx.x] = acc[t];
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) {
#pragma unroll
        for (int t = 0; t < kTapTile; ++t) red[t][threadIdx.x] += red[t][threadIdx.x + stride];
      }
      __syncthreads();
    }
    if (threadIdx.x < kTapTile && tap0 + threadIdx.x < taps)
      partial[(static_cast<int64_t>(split) * gridDim.x + pair) * taps + tap0 + threadIdx.x] = red[threadIdx.x][0];
    __syncthreads();  // red is refilled by the next tap tile
  }
}

template <typename scalar_t>
const scalar_t* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

}  // namespace

#define MASKED_CONV_DISPATCH(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

at::Tensor masked_conv_forward_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                    const std::optional<at::Tensor>& bias_in,
                                    const std::vector<int64_t>& in_window,
                                    const std::vector<int64_t>& out_window,
                                    const std::vector<int64_t>& stride,
                                    const std::vector<int64_t>& padding,
                                    const std::vector<int64_t>& dilation, bool depthwise) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const Geometry g = make_geometry(x, weight, in_window, out_window, stride, padding, dilation, depthwise);
  at::Tensor y = at::zeros({g.n, g.c_out, g.out_h, g.out_w}, x.options());
  if (y.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t out_hw = static_cast<int64_t>(g.out_h) * g.out_w;

  MASKED_CONV_DISPATCH(x.scalar_type(), "masked_conv_forward", [&] {
    if (depthwise) {
      forward_depthwise_kernel<scalar_t><<<blocks_for(g.n * g.out_len * out_hw), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), optional_ptr<scalar_t>(bias),
          y.data_ptr<scalar_t>(), g);
    } else {
      const dim3 grid(blocks_for(g.n * out_hw), (g.out_len + kChannelTile - 1) / kChannelTile);
      forward_dense_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), optional_ptr<scalar_t>(bias),
          y.data_ptr<scalar_t>(), g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor masked_conv_grad_input_cuda(const at::Tensor& grad_out_in, const at::Tensor& x,
                                       const at::Tensor& weight_in,
                                       const std::vector<int64_t>& in_window,
                                       const std::vector<int64_t>& out_window,
                                       const std::vector<int64_t>& stride,
                                       const std::vector<int64_t>& padding,
                                       const std::vector<int64_t>& dilation, bool depthwise) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const Geometry g = make_geometry(x, weight, in_window, out_window, stride, padding, dilation, depthwise);
  at::Tensor gx = at::zeros({g.n, g.c_in, g.in_h, g.in_w}, x.options());
  if (gx.numel() == 0) return gx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t in_hw = static_cast<int64_t>(g.in_h) * g.in_w;

  MASKED_CONV_DISPATCH(x.scalar_type(), "masked_conv_grad_input", [&] {
    if (depthwise) {
      grad_input_depthwise_kernel<scalar_t><<<blocks_for(g.n * g.in_len * in_hw), kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g);
    } else {
      const dim3 grid(blocks_for(g.n * in_hw), (g.in_len + kChannelTile - 1) / kChannelTile);
      grad_input_dense_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

at::Tensor masked_conv_grad_weight_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                        const at::Tensor& weight,
                                        const std::vector<int64_t>& in_window,
                                        const std::vector<int64_t>& out_window,
                                        const std::vector<int64_t>& stride,
                                        const std::vector<int64_t>& padding,
                                        const std::vector<int64_t>& dilation, bool depthwise) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const Geometry g = make_geometry(x, weight, in_window, out_window, stride, padding, dilation, depthwise);
  at::Tensor gw = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  if (g.n == 0) return gw;

  const int64_t pairs = depthwise ? g.out_len : static_cast<int64_t>(g.out_len) * g.in_len;
  const int64_t w_cin_len = depthwise ? 1 : g.in_len;
  // Split the batch until the grid has a few blocks per SM; each block still sums >= 1 image.
  const int64_t target_blocks = 4 * multiprocessor_count();
  const int64_t splits = std::min<int64_t>(g.n, std::max<int64_t>(1, (target_blocks + pairs - 1) / pairs));
  at::Tensor partial = at::empty({splits, g.out_len, w_cin_len, g.kh, g.kw}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  MASKED_CONV_DISPATCH(x.scalar_type(), "masked_conv_grad_weight", [&] {
    const dim3 grid(static_cast<unsigned int>(pairs), static_cast<unsigned int>(splits));
    grad_weight_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), partial.data_ptr<float>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  gw.narrow(0, g.out_start, g.out_len)
      .narrow(1, depthwise ? 0 : g.in_start, w_cin_len)
      .copy_(partial.sum(0));
  return gw;
}
