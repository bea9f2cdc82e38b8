"""One table of per-layer-kind behaviour: where a layer keeps its channel counts, how slimming
selects its channels, what it costs, whether the supernet computes only a window of it, and how the
latency model times it alone. groups, slim, cost, supernet and latency look a layer up here instead
of branching on its type, so a new kind of layer (RepNAS's branch blocks, grouped convolutions that
are slimmed) is one more entry in LAYER_KINDS.

This module sits below every stage: it imports none of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

_BN = nn.modules.batchnorm._BatchNorm


def layer_kind(module: nn.Module) -> str:
    """The name of a module's kind: a key of LAYER_KINDS, "conv_transposed", or its class name."""
    if isinstance(module, nn.Conv2d) or isinstance(module, nn.Conv1d):
        if module.transposed:
            return "conv_transposed"
        if module.groups == 1:
            return "conv"
        if module.groups == module.in_channels == module.out_channels:
            return "depthwise"
        return "grouped_conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _BN):
        return "bn"
    if isinstance(module, FrozenBatchNorm2d):
        return "frozen_bn"
    if is_grn(module):
        return "grn" if module.channel_dim == 1 else "grn_last"
    return type(module).__name__


def is_grn(module: nn.Module) -> bool:
    """timm's GlobalResponseNorm (ConvNeXt-V2), recognised without importing timm."""
    cls = type(module)
    return cls.__name__ == "GlobalResponseNorm" and cls.__module__.startswith("timm.") and \
        getattr(module, "channel_dim", None) in (1, -1)


@dataclass(frozen=True)
class Cost:
    """A layer's cost in its output and input channel counts `out` and `in`: parameters
    out * in * per_pair + out * per_channel; for a kind with `flops`, FLOPs
    2 * out * in * per_pair * (output elements per channel). `fixed_in` stands for `in` when no
    width sets it (a depthwise filter reads one channel whatever the width); `in_groups` divides
    `in` (a grouped convolution's filter reads the channels of its own group only)."""
    per_pair: int
    per_channel: int
    fixed_in: int | None = None
    in_groups: int = 1


def _kernel_area(module):
    return int(np.prod(module.kernel_size)) if hasattr(module, "kernel_size") else 1


def _has_bias(module):
    return 1 if module.bias is not None else 0


def _cut(module, name, dim, keep):
    """Keep only indices `keep` of parameter/buffer `name` along `dim`."""
    tensor = getattr(module, name)
    if tensor is None:
        return
    kept = tensor.detach().index_select(dim, keep.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(kept, requires_grad=tensor.requires_grad))
    else:
        module._buffers[name] = kept


def group_offsets(module, keep, channels):
    """`keep` (layer indices of a grouped conv's `channels` input or output channels) as a
    (groups, kept per group) array of offsets inside each group. Analysis gives a grouped conv only
    group-consistent selections (the same channels of every group, in group order): anything else
    would change which channels a filter reads, and is an internal error."""
    groups, per = module.groups, channels // module.groups
    keep = keep.cpu().numpy()
    blocks = keep.reshape(groups, -1) if len(keep) % groups == 0 else None
    if blocks is None or not ((blocks // per) == np.arange(groups)[:, None]).all() or \
            not (blocks % per == blocks[:1] % per).all():
        raise ValueError(f"a grouped convolution ({groups} groups) keeps the same channels of every group, "
                         f"in group order; got {keep.tolist()}")
    return blocks % per


def _select_grouped(module, role, keep):
    """Keep layer indices `keep` of a grouped conv's output or input channels: its filters of the
    kept outputs, and of each filter the kept inputs of its group; `groups` stays."""
    if role == "out":
        group_offsets(module, keep, module.out_channels)
        _cut(module, "weight", 0, keep)
        _cut(module, "bias", 0, keep)
        module.out_channels = len(keep)
    else:
        offsets = group_offsets(module, keep, module.in_channels)[0]
        _cut(module, "weight", 1, torch.from_numpy(offsets))
        module.in_channels = len(keep)


def _select_grn(module, role, keep):
    """Keep channels `keep` of a GlobalResponseNorm, its scale multiplied by n / len(keep): GRN
    divides each channel's spatial L2 norm by their mean over the channels, and the masked supernet
    takes that mean over all n channels (the removed ones are zeros), the slim layer over the kept
    ones; the factor makes them equal (up to eps = 1e-6 in the denominator). A permutation keeps
    the scale."""
    n = module.weight.shape[0]
    _cut(module, "weight", 0, keep)
    _cut(module, "bias", 0, keep)
    with torch.no_grad():
        module.weight.mul_(n / len(keep))


def _conv_probe(params, cin, cout, batch, shape, groups=None):
    kernel, stride, padding, dilation, own_groups = params
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups=groups or own_groups, bias=True)
    return conv, torch.randn(batch, cin, *shape)


def _conv_params(module):
    return (module.kernel_size, module.stride, module.padding, module.dilation, module.groups)


def frozen_bn_size(module) -> int:
    return module.weight.shape[0]


@dataclass(frozen=True)
class LayerKind:
    """What one kind of layer is to the compressor. Its input channels are a dimension of their
    own (`in_dim`, the weight dim that indexes them) or the output channels themselves (None:
    batch norm, depthwise conv), and then they follow the output's width group."""
    name: str
    out_size: str | Callable       # attribute holding the number of output channels (or module -> it)
    in_size: str | Callable        # ... of input channels
    in_dim: int | None             # weight dim of the input channels; None: they are the output channels
    out_tensors: tuple             # parameters and buffers indexed by output channel (dim 0)
    resized: tuple                 # attributes set to the new count when its output channels are selected
    shape_attrs: tuple             # the sizes a saved slim model records
    maskable: bool                 # masking its channels equals slicing them: a width group may touch it
    cost: Callable                 # module -> Cost
    flops: bool                    # its multiply-adds count as FLOPs (FlopCounterMode counts convs, matmuls)
    channel_dim: int = 1           # where its output keeps the channels: 1 for (N, C, ...), -1 for (..., C)
    window: str | None = None      # the supernet forward that computes only active channels: "conv", "norm"
    probe_params: Callable | None = None  # module -> what its latency probe needs (hashable)
    probe: Callable | None = None  # (params, cin, cout, batch, shape) -> (module, input) timed alone
    selector: Callable | None = None  # (module, role, keep): select's own rule, where slicing one dim is not it

    def size(self, module, role) -> int:
        """The number of channels of `module` on `role` ("out": outputs or normalised features)."""
        size = self.out_size if role == "out" else self.in_size
        return size(module) if callable(size) else getattr(module, size)

    def weight_dim(self, role) -> int:
        """The weight dimension that indexes the channels on `role`."""
        return self.in_dim if role == "in" and self.in_dim is not None else 0

    def select(self, module, role, keep):
        """Keep layer indices `keep` (a LongTensor, in that order) of the channels `role` addresses:
        fewer of them slims the layer, all of them in another order permutes it."""
        if self.selector is not None:
            return self.selector(module, role, keep)
        if role == "out" or self.in_dim is None:
            tensors, dim, attrs = self.out_tensors, 0, self.resized
        else:
            tensors, dim, attrs = ("weight",), self.in_dim, (self.in_size,)
        for name in tensors:
            _cut(module, name, dim, keep)
        for attr in attrs:
            setattr(module, attr, len(keep))

    def sample_shape(self, x) -> tuple:
        """The shape of one sample of input `x` without its channel dimension."""
        return tuple(x.shape[1:-1] if self.channel_dim == -1 else x.shape[2:])


_CONV = dict(out_size="out_channels", in_size="in_channels", out_tensors=("weight", "bias"),
             shape_attrs=("in_channels", "out_channels", "groups"), flops=True, probe_params=_conv_params)

LAYER_KINDS = {k.name: k for k in (
    LayerKind("conv", in_dim=1, resized=("out_channels",), maskable=True, window="conv",
              cost=lambda m: Cost(_kernel_area(m), _has_bias(m)), probe=_conv_probe, **_CONV),
    # a depthwise conv's input channels are its output channels: one index, one width
    LayerKind("depthwise", in_dim=None, resized=("in_channels", "out_channels", "groups"), maskable=True,
              window="conv", cost=lambda m: Cost(_kernel_area(m), _has_bias(m), fixed_in=1),
              probe=lambda params, cin, cout, batch, shape: _conv_probe(params, cin, cout, batch, shape, groups=cout),
              **_CONV),
    # slimmed group-consistently (analysis makes the width of a group through one the channels per
    # group, the same offsets kept in every group), so `groups` stays; computed at full width, masked
    LayerKind("grouped_conv", in_dim=1, resized=("out_channels",), maskable=True, selector=_select_grouped,
              cost=lambda m: Cost(_kernel_area(m), _has_bias(m), in_groups=m.groups),
              probe=_conv_probe, **_CONV),
    LayerKind("linear", out_size="out_features", in_size="in_features", in_dim=1, out_tensors=("weight", "bias"),
              resized=("out_features",), shape_attrs=("in_features", "out_features"), maskable=True,
              cost=lambda m: Cost(1, _has_bias(m)), flops=True, channel_dim=-1, probe_params=lambda m: (),
              probe=lambda params, cin, cout, batch, shape: (nn.Linear(cin, cout), torch.randn(batch, *shape, cin))),
    # free in FLOPs and not timed alone: deployment folds it into the conv before it
    LayerKind("bn", out_size="num_features", in_size="num_features", in_dim=None,
              out_tensors=("weight", "bias", "running_mean", "running_var"), resized=("num_features",),
              shape_attrs=("num_features",), maskable=True, window="norm",
              cost=lambda m: Cost(0, 2 if m.affine else 0, fixed_in=0), flops=False),
    # torchvision's FrozenBatchNorm2d (the backbones of its detectors with pretrained weights): four
    # buffers, no parameters and no num_features; the supernet runs it at full width and masks it
    LayerKind("frozen_bn", out_size=frozen_bn_size, in_size=frozen_bn_size, in_dim=None,
              out_tensors=("weight", "bias", "running_mean", "running_var"), resized=(), shape_attrs=(),
              maskable=True, cost=lambda m: Cost(0, 0, fixed_in=0), flops=False),
    # timm's GlobalResponseNorm (ConvNeXt-V2's MLP), channels first or last: a scale and a shift per
    # channel, free in FLOPs (FlopCounterMode counts no norm); masked in the supernet, and slimmed
    # with its scale rescaled (_select_grn)
    *(LayerKind(name, out_size=frozen_bn_size, in_size=frozen_bn_size, in_dim=None, out_tensors=("weight", "bias"),
                resized=(), shape_attrs=(), maskable=True, cost=lambda m: Cost(0, 2, fixed_in=0), flops=False,
                channel_dim=dim, selector=_select_grn) for name, dim in (("grn", 1), ("grn_last", -1))),
)}


def kind_of(module: nn.Module) -> LayerKind | None:
    """The table entry of `module`, or None for a layer the table does not model."""
    return LAYER_KINDS.get(layer_kind(module))
