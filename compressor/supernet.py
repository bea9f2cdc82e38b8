"""The masked supernet: any configuration and side of the width space, inside one set of weights.

Left windows keep channels [0, k) of a group, right windows [n - k, n) (BCNet's bilateral
coupling); every group of one forward pass is on the same side. Inactive channels are zeroed at
the output of every layer that produces or normalises them, so the network computes exactly what
the physically slimmed network computes on the active channels.
"""
from __future__ import annotations

import copy
import itertools
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .space import WidthSpace, check_model, check_side, fingerprint


class Supernet(nn.Module):
    """Wraps `model` and shares its parameters and buffers: training the supernet trains the
    model's weights. The model's own modules get no hooks (the supernet holds a structural copy
    whose tensors are the model's)."""

    def __init__(self, model: nn.Module, space: WidthSpace):
        super().__init__()
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
                self._handles.append(module.register_forward_pre_hook(self._save_bn_stats))
        self._saved_stats = None

    def _mask_hook(self, name):
        def hook(module, inputs, output):
            mask = self._masks.get(name)
            if mask is None:
                return output
            key = (name, output.device, output.dtype)
            m = self._device_masks.get(key)
            if m is None:
                m = mask.to(device=output.device, dtype=output.dtype)
                if not isinstance(module, nn.Linear):  # channels are dim 1 of (N, C, ...)
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

    def _save_bn_stats(self, module, inputs):
        if module.training and self._masks:
            self._saved_stats = (module, module.running_mean.clone(), module.running_var.clone())

    def set(self, cfg, side="left"):
        """Activate configuration `cfg` on `side` ("left" or "right")."""
        self.cfg = self.space.check(cfg)
        self.side = check_side(side)
        windows = self.space.windows(self.cfg, side)
        self._masks, self._device_masks = {}, {}
        for name, entries in self._targets.items():
            if all(windows[g][1] == self.space.groups[g].size for g, _ in entries):
                continue  # every group of this layer is at full width
            module = self.model.get_submodule(name)
            size = module.out_features if isinstance(module, nn.Linear) else (
                module.num_features if hasattr(module, "num_features") else module.out_channels)
            mask = np.ones(size, dtype=np.float32)
            for g, table in entries:
                start, k = windows[g]
                mask[table.ravel()] = 0.0
                mask[table[start:start + k].ravel()] = 1.0
            self._masks[name] = torch.from_numpy(mask)
        return self

    def full(self):
        """Back to the full network (no masks)."""
        self.cfg, self.side = None, None
        self._masks, self._device_masks = {}, {}
        return self

    def active_channels(self, name: str):
        """Indices of the active output channels of module `name` (all when unmasked)."""
        mask = self._masks.get(name)
        return None if mask is None else torch.nonzero(mask).flatten()

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def check_space(model: nn.Module, space: WidthSpace):
    check_model(model, space.example_input)
    if not isinstance(space, WidthSpace):
        raise ConfigError(f"space must be a WidthSpace from cz.analyze, got {type(space).__name__}")
    if space.fingerprint != fingerprint(model):
        raise ConfigError("this width space was built for a different model: call cz.analyze on this model")


def supernet(model: nn.Module, space: WidthSpace) -> Supernet:
    """The masked supernet of `model` over `space` (parameters shared with `model`)."""
    check_space(model, space)
    return Supernet(model, space)
