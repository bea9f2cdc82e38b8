"""The layers a latency table is built from: every conv and linear of the model, which group sets
its input and output widths, and the stand-alone module that times it at given widths.

What is timed per layer is the conv (or linear) with a bias, on its real input shape: BN folded
into the conv, as the ONNX export and TensorRT do. Activations, residual adds and pooling are not
timed per layer: the calibration's linear fit absorbs them (its slope for the part that grows with
the layer costs, its intercept for the rest)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..errors import UnsupportedModelError
from ..layers import LAYER_KINDS, kind_of
from ..modes import hooked_forward

FIXED = -1  # group index of a dimension no group controls


@dataclass(frozen=True)
class Dim:
    """A layer dimension: `fixed + mult * k_group` (just `fixed` when group is FIXED)."""
    group: int
    fixed: int
    mult: int

    def size(self, k) -> int:
        return self.fixed + self.mult * int(k) if self.group != FIXED else self.fixed


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str             # a key of LAYER_KINDS with a latency probe: conv, depthwise, grouped_conv, linear
    cin: Dim
    cout: Dim
    input_shape: tuple    # one sample, without the channel/feature dim
    params: tuple         # the kind's probe_params: conv (kernel, stride, padding, dilation, groups); linear ()

    @property
    def in_follows_out(self) -> bool:
        """Its input channels are its output channels (depthwise): it is timed at one width, not two."""
        return LAYER_KINDS[self.kind].in_dim is None

    def module_and_input(self, cin: int, cout: int, batch: int):
        """The layer alone at `cin` -> `cout` channels, with a random input of its real shape."""
        return LAYER_KINDS[self.kind].probe(self.params, cin, cout, batch, self.input_shape)

    def signature(self, cin: int, cout: int) -> str:
        """What the timing depends on: identical layers of a model (ResNet's repeated blocks) share it."""
        return f"{self.kind}|{cin}|{cout}|{'x'.join(map(str, self.input_shape))}|{self.params}"


def _dim(space, coverage, name, role, total):
    covering = coverage.get((name, role), [])
    if len(covering) > 1:
        raise UnsupportedModelError(
            f"the latency model needs each layer dimension to follow at most one channel group, but "
            f"'{name}' {role}put channels follow {len(covering)} (a concat?)", module=name, op="latency table")
    if not covering:
        return Dim(FIXED, total, 0)
    g, mult = covering[0]
    return Dim(g, total - mult * int(space.sizes[g]), mult)


def find_layers(model: nn.Module, space) -> list:
    """Every conv/linear `model` calls on the space's example input, with its widths' groups."""
    coverage = {}
    for g, group in enumerate(space.groups):
        for key, table in group.index.items():
            coverage.setdefault(key, []).append((g, table.shape[1]))
    shapes = {}

    def record(name, kind):
        def hook(module, inputs, output):
            shapes.setdefault(name, kind.sample_shape(inputs[0]))
        return hook

    # eval mode: BN running statistics must not move
    hooked_forward(model, space.example_input.to(next(model.parameters()).device), lambda: [
        module.register_forward_hook(record(name, kind_of(module))) for name, module in model.named_modules()
        if kind_of(module) is not None and kind_of(module).probe is not None])
    layers = []
    for name, module in model.named_modules():
        if name not in shapes:
            continue
        kind = kind_of(module)
        cout = _dim(space, coverage, name, "out", kind.size(module, "out"))
        # a depthwise conv's input channels are its output channels: its cost follows one group
        cin = Dim(FIXED, 0, 0) if kind.in_dim is None else _dim(space, coverage, name, "in", kind.size(module, "in"))
        layers.append(Layer(name, kind.name, cin, cout, shapes[name], kind.probe_params(module)))
    return layers


def widths(space, dim: Dim, points=None) -> np.ndarray:
    """Sorted distinct sizes `dim` takes over its group's allowed bins; with `points`, at most that
    many of them, evenly spread and always including the smallest and the largest."""
    if dim.group == FIXED:
        return np.array([dim.fixed])
    g = dim.group
    bins = np.arange(space.min_bins[g], space.max_bins[g] + 1)
    values = np.unique([dim.size(k) for k in space.width_table[g, bins]])
    if points and len(values) > points:
        values = values[np.unique(np.round(np.linspace(0, len(values) - 1, points)).astype(int))]
    return values


def bin_sizes(space, dim: Dim) -> np.ndarray:
    """Size of `dim` at every bin 0..N of its group (a constant for a fixed dim)."""
    if dim.group == FIXED:
        return np.full(space.bins + 1, dim.fixed)
    return dim.fixed + dim.mult * space.width_table[dim.group]
