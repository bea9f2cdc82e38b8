"""Masked 2-D convolution: a full-width conv that computes only a window of output channels from a
window of input channels. It is how the supernet runs a left or right BCNet path at the cost of the
sliced subnet instead of the full network.

Three implementations that must agree:
- reference: dense conv on the input with channels outside in_window zeroed, output outside
  out_window zeroed (obviously right, full cost);
- sliced: conv on the sliced tensors, padded back to full width (the CPU default);
- cuda: the custom kernels in csrc/, used for CUDA tensors when the extension builds.
"""
import logging

import torch
import torch.nn.functional as F

IMPLS = ("auto", "reference", "sliced", "cuda")
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

log = logging.getLogger("compressor.kernels")
_logged = set()
_extension = None
_extension_error = None


def masked_conv2d(x, weight, bias, in_window, out_window, stride=1, padding=0, dilation=1, groups=1,
                  impl="auto"):
    """Convolution of `x` (N, C_in, H, W) with `weight` (C_out, C_in / groups, kh, kw).

    `in_window` and `out_window` are (start, length) channel ranges. Input channels outside
    in_window count as zero; the output is (N, C_out, Ho, Wo) with zeros outside out_window.
    Differentiable in x, weight and bias. `impl` is one of IMPLS; 'auto' picks 'cuda' for CUDA
    tensors when the extension is available and the case is covered, else 'sliced'.
    """
    stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    in_window, out_window = _validate(x, weight, bias, in_window, out_window, groups, impl)
    args = (x, weight, bias, in_window, out_window, stride, padding, dilation, groups)
    if impl == "reference":
        return _reference(*args)
    if impl == "sliced":
        return _sliced(*args)
    if impl == "cuda" and not x.is_cuda:
        raise ValueError("impl='cuda' needs CUDA tensors; use impl='sliced' or 'auto' on CPU")
    if impl == "auto" and not x.is_cuda:
        return _sliced(*args)
    return _cuda_or_fallback(args, explicit=impl == "cuda")


def _pair(value, name, minimum):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def _window(window, channels, name):
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(v, int) for v in window)):
        raise ValueError(f"{name} must be a (start, length) pair of ints, got {window!r}")
    start, length = window
    if start < 0 or length < 1 or start + length > channels:
        raise ValueError(f"{name} {tuple(window)} is out of range for {channels} channels "
                         f"(need start >= 0, length >= 1, start + length <= {channels})")
    return (start, length)


def _validate(x, weight, bias, in_window, out_window, groups, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x and weight must be 4-D, got shapes {tuple(x.shape)} and {tuple(weight.shape)}")
    c_in, c_out = x.shape[1], weight.shape[0]
    if not isinstance(groups, int) or groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups!r} must be a positive int dividing C_in={c_in} and C_out={c_out}")
    if weight.shape[1] != c_in // groups:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not fit C_in={c_in} with groups={groups}: "
                         f"expected weight.shape[1] == {c_in // groups}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be ({c_out},)")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"x, weight and bias must be on one device, got {x.device} and {weight.device}")
    return _window(in_window, c_in, "in_window"), _window(out_window, c_out, "out_window")


def _reference(x, weight, bias, in_window, out_window, stride, padding, dilation, groups):
    in_mask = _channel_mask(x.shape[1], in_window, x.device)
    out_mask = _channel_mask(weight.shape[0], out_window, x.device)
    y = F.conv2d(torch.where(in_mask, x, 0), weight, bias, stride, padding, dilation, groups)
    return torch.where(out_mask, y, 0)


def _channel_mask(channels, window, device):
    mask = torch.zeros(1, channels, 1, 1, dtype=torch.bool, device=device)
    mask[:, window[0]:window[0] + window[1]] = True
    return mask


def _sliced(x, weight, bias, in_window, out_window, stride, padding, dilation, groups):
    (i0, il), (o0, ol) = in_window, out_window
    c_out = weight.shape[0]
    gi, go = x.shape[1] // groups, c_out // groups  # channels per group, in and out
    conv = lambda xs, ws, bs, g: F.conv2d(xs, ws, bs, stride, padding, dilation, g)  # noqa: E731
    if i0 % gi == 0 and il % gi == 0 and o0 % go == 0 and ol % go == 0 and i0 // gi == o0 // go \
            and il // gi == ol // go:
        # Both windows cover the same whole groups (every depthwise case with equal windows).
        y = conv(x[:, i0:i0 + il], weight[o0:o0 + ol], _slice(bias, o0, o0 + ol), il // gi)
    else:
        # Per group the windows cut: its active outputs from its active inputs (one conv when groups=1).
        pieces = []
        for g in range(o0 // go, (o0 + ol - 1) // go + 1):
            a, b = max(o0, g * go), min(o0 + ol, (g + 1) * go)
            c, d = max(i0, g * gi), min(i0 + il, (g + 1) * gi)
            if c < d:
                pieces.append(conv(x[:, c:d], weight[a:b, c - g * gi:d - g * gi], _slice(bias, a, b), 1))
            else:  # no active input in this group: the output is the bias alone
                pieces.append(_bias_only(x, weight, bias, a, b, stride, padding, dilation))
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)  # groups=1: no copy
    return F.pad(y, (0, 0, 0, 0, o0, c_out - o0 - ol))


def _slice(bias, start, stop):
    return None if bias is None else bias[start:stop]


def _bias_only(x, weight, bias, start, stop, stride, padding, dilation):
    ho, wo = ((x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1) // stride[d] + 1
              for d in range(2))
    y = x.new_zeros(x.shape[0], stop - start, ho, wo)
    return y if bias is None else y + bias[start:stop].view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------- CUDA

def _log_once(message):
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def _load_extension(explicit):
    """The compiled extension, or None (with the reason logged once) when it cannot be built."""
    global _extension, _extension_error
    if _extension is None and _extension_error is None:
        from compressor.kernels.build import BuildError, build  # late: keeps `python -m ...build` clean

        try:
            _extension = build()
        except BuildError as error:
            _extension_error = error
    if _extension_error is not None:
        if explicit:
            raise _extension_error
        _log_once(f"masked_conv2d: CUDA extension unavailable, using 'sliced': {_extension_error}")
    return _extension


def _cuda_unsupported(x, weight, bias, in_window, out_window, groups):
    """Why the CUDA kernels cannot run this case, or None if they can."""
    if groups != 1 and not (groups == x.shape[1] == weight.shape[0] and in_window == out_window):
        return f"groups={groups} (the kernels cover groups=1 and depthwise with equal windows)"
    if x.dtype not in CUDA_DTYPES:
        return f"dtype {x.dtype} (the kernels cover float32, float16, bfloat16)"
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "x, weight and bias dtypes differ"
    return None


def _cuda_or_fallback(args, explicit):
    x, weight, bias, in_window, out_window, stride, padding, dilation, groups = args
    if torch.is_autocast_enabled("cuda"):
        # Custom Functions are invisible to autocast: apply its conv rule (compute in the autocast dtype).
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        args = (x, weight, bias) + args[3:]
    reason = _cuda_unsupported(x, weight, bias, in_window, out_window, groups)
    if reason is not None:
        _log_once(f"masked_conv2d: CUDA kernel does not cover {reason}; using 'sliced'")
        return _sliced(*args)
    extension = _load_extension(explicit)
    if extension is None:
        return _sliced(*args)
    return _MaskedConvCuda.apply(x, weight, bias, in_window, out_window, stride, padding, dilation, groups != 1,
                                 extension)


class _MaskedConvCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, in_window, out_window, stride, padding, dilation, depthwise, extension):
        geometry = (list(in_window), list(out_window), list(stride), list(padding), list(dilation), depthwise)
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.extension, ctx.out_window, ctx.has_bias = geometry, extension, out_window, bias is not None
        return extension.forward(x, weight, bias, *geometry)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.extension.grad_input(grad_out, x, weight, *ctx.geometry)
        if ctx.needs_input_grad[1]:
            grad_w = ctx.extension.grad_weight(grad_out, x, weight, *ctx.geometry)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            start, length = ctx.out_window
            grad_b = grad_out.new_zeros(grad_out.shape[1])
            grad_b[start:start + length] = grad_out[:, start:start + length].sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None
