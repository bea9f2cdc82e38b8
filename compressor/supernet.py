"""The masked supernet: any configuration and side of the width space, inside one set of weights.

Left windows keep channels [0, k) of a group, right windows [n - k, n) (BCNet's bilateral
coupling); every group of one forward pass is on the same side. A CafeNet placement
(compressor.placement) keeps the left window's base and free channels of its choosing. Inactive channels are zeroed at
the output of every layer that produces or normalises them, so the network computes exactly what
the physically slimmed network computes on the active channels. Convolutions and batch norms whose
channels are one contiguous window compute only that window (the rest of a width-k subnet's cost
is that of a width-k network); the others compute full width and are masked.
"""
from __future__ import annotations

import copy
import itertools
import sys
import types
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import IMPLS, masked_conv2d
from .layers import kind_of
from .space import WidthSpace, check_model, check_side, fingerprint


class Supernet(nn.Module):
    """Wraps `model` and shares its parameters and buffers: training the supernet trains the
    model's weights. The model's own modules get no hooks (the supernet holds a structural copy
    whose tensors are the model's)."""

    def __init__(self, model: nn.Module, space: WidthSpace, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ConfigError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        self.model = copy.deepcopy(model, memo=shared)
        self.space = space
        self.cfg, self.side = None, None
        # module name -> [(group index, index table)] for each group the module's output carries
        self._targets = defaultdict(list)
        for g, group in enumerate(space.groups):
            for (mname, role), table in group.index.items():
                if role == "out":
                    self._targets[mname].append((g, table))
        self._masks = {}  # module name -> float mask over its output channels (None = full)
        self._device_masks = {}
        self._handles = [self.model.get_submodule(name).register_forward_hook(self._mask_hook(name))
                         for name in self._targets]
        for name in self._targets:
            module = self.model.get_submodule(name)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                self._handles.append(module.register_forward_pre_hook(self._save_bn_stats(name)))
        self._saved_stats = None
        # convs and batch norms whose channels are one window of one group compute only that window
        identity = self._identity_groups()
        self._conv_groups, self._norm_groups = self._windowed_convs(identity), self._windowed_norms(identity)
        self._conv_windows, self._norm_windows = {}, {}
        for name in self._conv_groups:
            module = self.model.get_submodule(name)
            module.forward = types.MethodType(self._windowed_forward(name), module)
        for name in self._norm_groups:
            module = self.model.get_submodule(name)
            module.forward = types.MethodType(self._windowed_norm_forward(name), module)

    def _identity_groups(self):
        """{(module, role): [groups]} where the module's channels on that role are the groups' in index order."""
        identity = {}
        for g, group in enumerate(self.space.groups):
            for (mname, role), table in group.index.items():
                if table.shape[1] == 1 and (table[:, 0] == np.arange(group.size)).all():
                    identity.setdefault((mname, role), []).append(g)
        return identity

    def _covering(self, name, role):
        return [g for g, grp in enumerate(self.space.groups) if (name, role) in grp.index]

    def _windowed_convs(self, identity):
        """{conv name: (out group or None, in group or None)} for convs where each side's channels
        are exactly one group in index order, so the active channels are one contiguous window."""
        convs = {}
        for name, module in self.model.named_modules():
            kind = kind_of(module)
            # 2-d: masked_conv2d's; padding: what _conv_padding knows
            if kind is None or kind.window != "conv" or not isinstance(module, nn.Conv2d) \
                    or isinstance(module.padding, str) or module.padding_mode != "zeros" or _conv_padding(module) is None:
                continue
            sides = []
            for role in ("out", "in"):
                channels = kind.size(module, role)
                if kind.in_dim is None:
                    role = "out"  # a depthwise conv's input window is its output window
                covering = self._covering(name, role)
                if not covering:
                    sides.append(None)
                elif identity.get((name, role)) == covering and self.space.groups[covering[0]].size == channels:
                    sides.append(covering[0])
                else:
                    break
            else:
                convs[name] = tuple(sides)
        return convs

    def _windowed_norms(self, identity):
        """{batch norm name: group} for BatchNorm2d layers whose channels are exactly one group in
        index order, and whose forward is batch norm's own or a known subclass's (_after_norm)."""
        norms = {}
        for name, module in self.model.named_modules():
            kind = kind_of(module)
            # BatchNorm2d: _batch_norm_window pads (N, C, H, W)
            if kind is not None and kind.window == "norm" and isinstance(module, nn.BatchNorm2d) \
                    and _after_norm(module) is not None:
                covering = self._covering(name, "out")
                if len(covering) == 1 and identity.get((name, "out")) == covering and \
                        self.space.groups[covering[0]].size == module.num_features:
                    norms[name] = covering[0]
        return norms

    def _windowed_norm_forward(self, name):
        def forward(module, x):
            window = self._norm_windows.get(name)
            if window is None:
                return type(module).forward(module, x)
            return _batch_norm_window(module, x, *window, after=_after_norm(module))
        return forward

    def _windowed_forward(self, name):
        def forward(module, x):
            windows = self._conv_windows.get(name)
            if windows is None:
                return type(module).forward(module, x)
            x, padding = _conv_padding(module)(x)
            return masked_conv2d(x, module.weight, module.bias, windows[1], windows[0], module.stride,
                                 padding, module.dilation, module.groups, impl=self.impl)
        return forward

    def _mask_hook(self, name):
        def hook(module, inputs, output):
            mask = self._masks.get(name)
            if mask is None or name in self._conv_windows or name in self._norm_windows:  # zeroed already
                return output
            key = (name, output.device, output.dtype)
            m = self._device_masks.get(key)
            if m is None:
                m = mask.to(device=output.device, dtype=output.dtype)
                if kind_of(module).channel_dim == 1:  # channels are dim 1 of (N, C, ...), else the last
                    m = m.view(-1, *([1] * (output.dim() - 2)))
                self._device_masks[key] = m
            if self._saved_stats is not None and self._saved_stats[0] is module:
                # BN statistics are sliced with the window (METHOD section 2): inactive channels
                # keep the running statistics they had before this masked forward pass
                keep = m.view(-1) == 0
                # through .data: batch_norm's autograd node saved these buffers, but train-mode
                # gradients do not depend on them
                for buffer, saved in zip((module.running_mean, module.running_var), self._saved_stats[1:]):
                    buffer.data.copy_(torch.where(keep, saved, buffer))
                self._saved_stats = None
            return output * m
        return hook

    def _save_bn_stats(self, name):
        def hook(module, inputs):
            if module.training and self._masks and name not in self._norm_windows:
                self._saved_stats = (module, module.running_mean.clone(), module.running_var.clone())
        return hook

    def set(self, cfg, side="left"):
        """Activate configuration `cfg` on `side` ("left", "right" or a CafeNet placement,
        compressor.placement). A group whose kept channels are not one window (a placement's) is
        computed at full width and masked."""
        self.cfg = self.space.check(cfg)
        self.side = check_side(side)
        positions = self.space.positions(self.cfg, side)
        windows = self.space.windows(self.cfg, side)
        sizes = self.space.sizes
        narrow = [len(p) < n for p, n in zip(positions, sizes)]
        self._masks, self._device_masks = {}, {}
        self._conv_windows = {}
        self._norm_windows = {name: windows[g] for name, g in self._norm_groups.items()
                              if narrow[g] and windows[g] is not None}
        for name, (g_out, g_in) in self._conv_groups.items():
            groups = [g for g in (g_out, g_in) if g is not None]
            if any(narrow[g] for g in groups) and all(windows[g] is not None for g in groups):
                module = self.model.get_submodule(name)
                self._conv_windows[name] = (windows[g_out] if g_out is not None else (0, module.out_channels),
                                            windows[g_in] if g_in is not None else (0, module.in_channels))
        for name, entries in self._targets.items():
            if not any(narrow[g] for g, _ in entries):
                continue  # every group of this layer is at full width
            module = self.model.get_submodule(name)
            size = kind_of(module).size(module, "out")
            mask = np.ones(size, dtype=np.float32)
            for g, table in entries:
                mask[table.ravel()] = 0.0
                mask[table[positions[g]].ravel()] = 1.0
            self._masks[name] = torch.from_numpy(mask)
        return self

    def full(self):
        """Back to the full network (no masks)."""
        self.cfg, self.side = None, None
        self._masks, self._device_masks, self._conv_windows, self._norm_windows = {}, {}, {}, {}
        return self

    def unmasked_copy(self) -> nn.Module:
        """A copy of the wrapped network without this supernet's hooks and windowed forwards: a plain
        network that no later set() reaches (a deep copy of self.model keeps hooks that read this
        supernet's masks)."""
        model = copy.deepcopy(self.model)
        ours = {h.id for h in self._handles}
        for name, module in model.named_modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in ours & set(hooks):
                    del hooks[key]
            if name in self._conv_groups or name in self._norm_groups:
                del module.forward  # back to its class's forward
        return model

    def active_channels(self, name: str):
        """Indices of the active output channels of module `name` (all when unmasked)."""
        mask = self._masks.get(name)
        return None if mask is None else torch.nonzero(mask).flatten()

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _timm_class(module_name, class_name):
    """A timm layer class if timm is loaded (a model holding timm layers has loaded it), else None."""
    return getattr(sys.modules.get(module_name), class_name, None)


def _after_norm(bn):
    """What a batch norm layer computes after normalising, as a function of the normalised window:
    nothing for nn.BatchNorm2d (and subclasses that keep its forward), drop then activation for
    timm's BatchNormAct2d; None for a subclass with another forward, which then runs full width and
    is masked (its own forward, whatever it does, stays in charge)."""
    if type(bn).forward is nn.modules.batchnorm._BatchNorm.forward:
        return lambda y: y
    if type(bn) is _timm_class("timm.layers.norm_act", "BatchNormAct2d"):
        return lambda y: bn.act(bn.drop(y))
    return None


def _conv_padding(conv):
    """How a conv pads its input, as x -> (padded x, padding for the conv itself): its own padding
    for nn.Conv2d (and subclasses that keep its forward), timm's dynamic TF "same" padding for
    Conv2dSame; None for a subclass with another forward (weight standardisation, ...), which then
    runs full width and is masked."""
    if type(conv).forward is nn.Conv2d.forward:
        return lambda x: (x, conv.padding)
    if type(conv) is _timm_class("timm.layers.conv2d_same", "Conv2dSame"):
        from timm.layers.padding import pad_same
        return lambda x: (pad_same(x, conv.kernel_size, conv.stride, conv.dilation), 0)
    return None


def _batch_norm_window(bn, x, start, length, after=None):
    """`bn` on channels [start, start + length) of x only, zeros elsewhere: what bn then the channel
    mask computes, at the window's cost. The other channels' running statistics stay untouched
    (METHOD section 2); the update rule is nn.BatchNorm2d.forward's. `after` (what a subclass such
    as timm's BatchNormAct2d applies after normalising) runs on the window, before the zeros."""
    stop = start + length
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or bn.running_mean is None
    stats = bn.running_mean is not None and (not bn.training or bn.track_running_stats)
    window = lambda t: t[start:stop] if t is not None else None  # noqa: E731
    # contiguous: on a strided slice the CPU kernel sums in another order, and float differences
    # of ~1e-6 grow through the network
    y = F.batch_norm(x[:, start:stop].contiguous(), window(bn.running_mean) if stats else None,
                     window(bn.running_var) if stats else None, window(bn.weight), window(bn.bias),
                     use_batch_stats, factor, bn.eps)
    if after is not None:
        y = after(y)
    return F.pad(y, (0, 0, 0, 0, start, bn.num_features - stop))


def check_space(model: nn.Module, space: WidthSpace):
    check_model(model, space.example_input)
    if not isinstance(space, WidthSpace):
        raise ConfigError(f"space must be a WidthSpace from cz.analyze, got {type(space).__name__}")
    if space.fingerprint != fingerprint(model):
        raise ConfigError("this width space was built for a different model: call cz.analyze on this model")


def supernet(model: nn.Module, space: WidthSpace, impl: str = "auto") -> Supernet:
    """The masked supernet of `model` over `space` (parameters shared with `model`). `impl` picks
    the masked convolution: "auto" (the CUDA kernel on a GPU when built, else "sliced"),
    "sliced", "reference" (dense conv then mask) or "cuda"."""
    check_space(model, space)
    return Supernet(model, space, impl)
