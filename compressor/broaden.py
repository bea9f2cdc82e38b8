"""Broadening (BS-NAS, METHOD section 8): a copy of a model whose channel groups are wider than the
original's and which computes exactly what the original computes, with the width space over it.

The space's bins 1..bins reach each group's original width, as before; `extra_bins` more reach above
it in the same steps, so that a budget at the original cost can move channels from one layer to
another (width refinement at equal FLOPs). Every method can search such a space (compress's
`broaden`); BS-NAS does by default.

Function preservation (choice): each group gets its new channels after its old ones in every layer
it touches. A layer that produces or normalises them gets new rows: convolution and linear weights
drawn from a normal distribution with the layer's own weight standard deviation (seeded), biases 0,
batch norm scales the mean of the layer's old scales, shifts 0, running statistics (0, 1). A layer
that consumes them gets zero weights for them. So the new channels compute something (their
consumers' weights get gradients from the first step, then they do too), but nothing reads them
yet: the broadened network at full width, and at the original width, is the original network.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from .cost import CostModel
from .errors import ConfigError, UnsupportedModelError
from .layers import kind_of
from .space import WidthSpace, analyze, auto_divisor, fingerprint, kept_channels
from .supernet import check_space

MAX_RATIO = 3.0
TOLERANCE = 1e-4  # the broadened model's output may differ from the original's by this, relative to max |y|


def check_ratio(ratio, bins: int | None = None) -> float:
    """`ratio` as a float in [1, MAX_RATIO]; with `bins`, one that adds at least one bin."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1 <= ratio <= MAX_RATIO:
        raise ConfigError(f"broaden must be a width ratio in [1, {MAX_RATIO:g}] (1: the original widths, "
                          f"1.5: up to 1.5 x each group), got {ratio!r}")
    if bins is not None and ratio > 1 and extra_bins(ratio, bins) < 1:
        raise ConfigError(f"broaden={ratio!r} adds no bin to a space of {bins} bins: use at least "
                          f"{1 + 0.5 / bins:.3g}, or 1 to keep the original widths")
    return float(ratio)


def extra_bins(ratio: float, bins: int) -> int:
    return int(math.floor(bins * (ratio - 1) + 0.5))


def broaden(model: nn.Module, space: WidthSpace, ratio: float = 1.5, seed: int = 0):
    """(broadened copy of `model`, its width space): every group of `space` (an unbroadened space
    of `model`, cz.analyze's) gets about (ratio - 1) x its channels more, in extra bins above the
    original width (WidthSpace.extra_bins; relative budgets stay relative to the original model).
    The copy computes what `model` computes (checked on the space's example input); `model` is not
    modified. Raises UnsupportedModelError where the channels cannot be placed (the Torch-Pruning
    analysis of the copy must find the layout this module wrote)."""
    check_space(model, space)
    if space.broadened:
        raise ConfigError("this width space is broadened already: broaden the original model's space")
    ratio = check_ratio(ratio, space.bins)
    if space.binning == "flops" and ratio > 1:
        raise ConfigError("a space with binning='flops' cannot be broadened: its bins are laid out on the original "
                          "widths; analyze with binning='channels' to broaden")
    extra = extra_bins(ratio, space.bins)
    if extra == 0:
        return model, space
    grouped = sorted({m.module for group in space.groups for m in group.members if m.kind == "grouped_conv"})
    if grouped:  # new channels go after a group's last index: that would leave a conv group's block
        raise UnsupportedModelError(
            f"broaden cannot widen channels that grouped convolutions read or write ({', '.join(grouped[:3])}"
            f"{', ...' if len(grouped) > 3 else ''}): use broaden=1 (the original widths)")
    normed = sorted({m.module for group in space.groups for m in group.members if m.kind in ("grn", "grn_last")})
    if normed:  # GRN divides by the mean over its channels: new channels would change it
        raise UnsupportedModelError(
            f"broaden cannot widen channels a GlobalResponseNorm normalises ({', '.join(normed[:3])}"
            f"{', ...' if len(normed) > 3 else ''}): their mean over the channels would change; use broaden=1")
    streams = [group.name for group in space.groups if group.stream is not None]
    if streams:  # a wider stream would change where its shuffles send each channel
        raise UnsupportedModelError(
            f"broaden cannot widen a shuffled stream ({', '.join(streams[:3])}{', ...' if len(streams) > 3 else ''}): "
            f"its channels' paths through the shuffles depend on its width; use broaden=1 (the original widths)")
    adds = [kept_channels(extra, int(n), space.bins, auto_divisor(int(n)) if space.divisor == "auto" else space.divisor)
            for n in space.sizes]
    wide = copy.deepcopy(model)
    layouts = _layouts(wide, space, adds)
    generator = torch.Generator().manual_seed(seed)
    for (name, role), (size, old_to_new, new_rows) in layouts.items():
        _grow(wide.get_submodule(name), role, size, old_to_new, np.concatenate([r.ravel() for r in new_rows.values()]),
              generator)
    wide_space = _space_of(wide, space, extra, adds, layouts)
    _check_preserved(model, wide, space.example_input)
    return wide, wide_space


def _layouts(model, space, adds) -> dict:
    """{(module, role): (new size, old index -> new index, {group: (added, multiplicity) new indices})}:
    each group's new channels go right after its last old index in that layer (after its own
    channels in a concatenation, after its last position in a flattened feature map)."""
    touching = {}
    for g, group in enumerate(space.groups):
        for key, table in group.index.items():
            touching.setdefault(key, []).append((g, table))
    layouts = {}
    for (name, role), entries in touching.items():
        module = model.get_submodule(name)
        size = kind_of(module).size(module, role)
        after = {int(table.max()): (g, table.shape[1]) for g, table in entries}
        old_to_new, new_rows, position = np.empty(size, dtype=np.int64), {}, 0
        for old in range(size):
            old_to_new[old] = position
            position += 1
            if old in after:
                g, mult = after[old]
                new_rows[g] = np.arange(position, position + adds[g] * mult).reshape(adds[g], mult)
                position += adds[g] * mult
        layouts[(name, role)] = (position, old_to_new, new_rows)
    return layouts


def _grow(module, role, size, old_to_new, new, generator):
    """Give `module` `size` channels on `role`, its old ones at `old_to_new`, the new ones (at `new`)
    initialised as the module docstring says."""
    kind = kind_of(module)
    produces = role == "out" or kind.in_dim is None
    names, dim, attrs = (kind.out_tensors, 0, kind.resized) if produces else (("weight",), kind.in_dim, (kind.in_size,))
    for name in names:
        old = getattr(module, name)
        if old is None:
            continue
        shape = list(old.shape)
        shape[dim] = size
        grown = old.detach().new_zeros(shape).index_copy(dim, torch.as_tensor(old_to_new, device=old.device),
                                                         old.detach())
        index = torch.as_tensor(new, device=old.device)
        if produces:  # a consumer's new weights stay zero: nothing reads the new channels yet
            grown.index_copy_(0, index, _new_rows(module, name, old, len(new), generator).to(grown))
        if isinstance(old, nn.Parameter):
            setattr(module, name, nn.Parameter(grown, requires_grad=old.requires_grad))
        else:
            module._buffers[name] = grown
    for attr in attrs:
        setattr(module, attr, size)


def _new_rows(module, name, old, count, generator):
    """Values of `count` new output channels of parameter or buffer `name` (its dim 0)."""
    shape = (count, *old.shape[1:])
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if name == "weight":
            return old.detach().float().mean().expand(shape).cpu()
        return torch.ones(shape) if name == "running_var" else torch.zeros(shape)
    if name == "weight":
        return torch.randn(shape, generator=generator) * old.detach().float().std().cpu()
    return torch.zeros(shape)  # bias


def _space_of(wide, space, extra, adds, layouts) -> WidthSpace:
    """The broadened space: Torch-Pruning's groups of the wide model (which must carry the old
    channels where they were moved and the new ones where they were put), in `space`'s order,
    with its frozen groups kept frozen."""
    work = copy.deepcopy(wide).eval()
    example = space.example_input.to(next(work.parameters()).device)
    found = {g.name: g for g in analyze(work, example, bins=space.bins, divisor=space.divisor, time_limit=None).groups}
    groups = []
    for g, group in enumerate(space.groups):
        grown = found.get(group.name)
        if grown is None or grown.size != group.size + adds[g] or set(grown.index) != set(group.index):
            raise UnsupportedModelError(
                f"{type(wide).__name__} cannot be broadened: group '{group.name}' is "
                f"{'gone' if grown is None else 'another group'} in the broadened model's analysis",
                module=group.name, op="broaden")
        for key, table in group.index.items():
            _, old_to_new, new_rows = layouts[key]
            expected = np.concatenate([old_to_new[table], new_rows[g]])
            if not np.array_equal(grown.index[key], expected):
                raise UnsupportedModelError(
                    f"{type(wide).__name__} cannot be broadened: the new channels of group '{group.name}' are not "
                    f"where module '{key[0]}' reads them (its layout is not 'old channels, then new ones')",
                    module=key[0], op="broaden")
        groups.append(grown)
    return WidthSpace(groups, dict(space.frozen), CostModel(work, groups, example), bins=space.bins,
                      divisor=space.divisor, example_input=space.example_input, min_bins=space.min_bins,
                      max_bins=np.full(len(groups), space.bins + extra), source=space.source,
                      model_fingerprint=fingerprint(wide), extra_bins=extra, original_sizes=space.sizes)


def _check_preserved(model, wide, example_input):
    """The broadened model's output equals the original's on the example input (eval mode)."""
    device = next(model.parameters()).device
    x = example_input.to(device)
    before, after = copy.deepcopy(model).eval(), copy.deepcopy(wide).eval()
    with torch.no_grad():
        y, y_wide = before(x), after(x)
    if not (isinstance(y, torch.Tensor) and isinstance(y_wide, torch.Tensor)):
        return  # a structured output: the analysis of the wide model has checked the layout
    error = float((y - y_wide).abs().max() / y.abs().max().clamp_min(1e-12))
    if error > TOLERANCE:
        raise UnsupportedModelError(f"{type(model).__name__} cannot be broadened: the broadened model's output "
                                    f"differs from the original's by {error:.2e} (relative)", module="", op="broaden")
