// The masked-convolution kernels: device code only, shared by the CUDA build (masked_conv_cuda.cu)
// and the CPU emulator (masked_conv_emulated.cpp), which runs these same lines with one host thread
// per CUDA thread so that CI can check their indexing, tiling and reductions without a GPU.
// Tensors stay full width (NCHW, contiguous): the kernels read only the input channels inside the
// input window and write only the output channels inside the output window. All arithmetic
// accumulates in fp32. Two layer kinds: dense (groups == 1) and depthwise (groups == C_in == C_out,
// equal windows). Argument checks live in masked_conv.cpp; this file assumes they passed.
#pragma once

#include <cstdint>

namespace masked_conv {

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

__host__ __device__ inline int min_int(int a, int b) { return a < b ? a : b; }

// One thread per element of an (n, len, hw) block of a channel window starting at `start`:
// the thread's sample, channel and pixel.
struct Element {
  int n, c, p;
};
__host__ __device__ inline Element element_of(int64_t idx, int64_t hw, int start, int len) {
  const int64_t nc = idx / hw;
  return {static_cast<int>(nc / len), start + static_cast<int>(nc % len), static_cast<int>(idx % hw)};
}

// The output row (or column) that kernel tap `tap` reads input row `in` for, or -1 when the tap
// lands between strides or outside the output: in = out * stride - pad + tap * dilation.
__host__ __device__ inline int output_of(int in, int tap, int stride, int pad, int dilation, int out_size) {
  const int t = in + pad - tap * dilation;
  if (t < 0 || t % stride != 0) return -1;
  const int out = t / stride;
  return out < out_size ? out : -1;
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
    const int oc = g.out_start + min_int(oc_first + t, g.out_len - 1);
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
  const auto [n, c, p] = element_of(idx, out_hw, g.out_start, g.out_len);
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
// gy[n, oc, oh, ow] * w[oc, ic, i, j]: invert the index map (output_of).

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
    w_ic[t] = static_cast<int64_t>(g.in_start + min_int(ic_first + t, g.in_len - 1)) * taps;
    acc[t] = 0.f;
  }
  for (int o = 0; o < g.out_len; ++o) {
    const int oc = g.out_start + o;
    const scalar_t* gy_c = gy + (static_cast<int64_t>(n) * g.c_out + oc) * out_hw;
    const scalar_t* w_o = w + static_cast<int64_t>(oc) * g.w_cin * taps;
    for (int i = 0; i < g.kh; ++i) {
      const int oh = output_of(ih, i, g.sh, g.ph, g.dh, g.out_h);
      if (oh < 0) continue;
      for (int j = 0; j < g.kw; ++j) {
        const int ow = output_of(iw, j, g.sw, g.pw, g.dw, g.out_w);
        if (ow < 0) continue;
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
  const auto [n, c, p] = element_of(idx, in_hw, g.in_start, g.in_len);
  const int ih = p / g.in_w;
  const int iw = p % g.in_w;
  const scalar_t* gy_c = gy + (static_cast<int64_t>(n) * g.c_out + c) * out_hw;
  const scalar_t* w_c = w + static_cast<int64_t>(c) * g.kh * g.kw;

  float acc = 0.f;
  for (int i = 0; i < g.kh; ++i) {
    const int oh = output_of(ih, i, g.sh, g.ph, g.dh, g.out_h);
    if (oh < 0) continue;
    for (int j = 0; j < g.kw; ++j) {
      const int ow = output_of(iw, j, g.sw, g.pw, g.dw, g.out_w);
      if (ow < 0) continue;
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

}  // namespace masked_conv
