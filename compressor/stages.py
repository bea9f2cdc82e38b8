"""A network split into stages (SWP, METHOD section 8): where each stage ends, which width groups
each stage owns, and a tap on the stage ends that records their outputs or hands the next stage
the full network's output instead (so a stage is run on the input the full network gives it).

Choices where the paper is silent are marked (choice):
- a stage ends where the spatial resolution drops for good: at the outermost module whose 4-d
  output is the last one at a resolution that never comes back (a squeeze-excite's 1x1 detour or
  a global pool inside a block comes back, so it ends nothing);
- a group belongs to the stage that produces most of its channels (its "out" members; ties: the
  earlier stage); a stage that owns no group (a stem whose channels are the first stage's residual
  stream, a pooling head) is merged into the next one, the last into the one before it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .modes import hooked_forward


@dataclass(frozen=True)
class Stages:
    ends: tuple    # module names whose outputs end each stage but the last (which ends at the model's output)
    groups: tuple  # per stage, the indices of the width groups it owns

    def __len__(self):
        return len(self.groups)

    def sizes(self, space) -> list:
        """Per stage, how many distinct configurations its groups have: what its stage supernet ranks."""
        return [math.prod(_distinct_widths(space)[g] for g in groups) for groups in self.groups]


def space_size(space) -> int:
    """How many distinct configurations the whole width space has."""
    return math.prod(_distinct_widths(space))


def _distinct_widths(space) -> list:
    return [len(np.unique(space.width_table[g, lo:hi + 1]))
            for g, (lo, hi) in enumerate(zip(space.min_bins, space.max_bins))]


def find_stages(model: nn.Module, space, ends=None) -> Stages:
    """The stages of `model` (a network the width space `space` was analysed on, or its supernet's
    model at full width): split where the spatial resolution drops for good, or after the modules
    named in `ends` (each run once per forward pass)."""
    calls = _calls(model, space.example_input)
    order = {}  # module name -> when its (first) call finished
    for i, (name, _) in enumerate(calls):
        order.setdefault(name, i)
    if ends is None:
        ends = _resolution_ends(calls)
        automatic = True
    else:
        automatic = False
        runs = Counter(name for name, _ in calls)
        for name in ends:
            if name not in runs:
                known = [n for n, _ in model.named_modules() if n]
                raise ConfigError(f"swp option stages names {name!r}, which is not a module the model runs "
                                  f"(modules: {', '.join(known[:12])}{', ...' if len(known) > 12 else ''})")
            if runs[name] != 1:
                raise ConfigError(f"swp option stages names {name!r}, which runs {runs[name]} times per forward "
                                  "pass: name a module that runs once (e.g. the block or stage around it)")
        if len(set(ends)) != len(ends):
            raise ConfigError(f"swp option stages names a module twice: {list(ends)}")
        ends = sorted(ends, key=order.__getitem__)
    stage_of = lambda name: sum(order[e] < order[name] for e in ends)  # noqa: E731
    members = [[stage_of(n) for (n, role) in group.index if role == "out" and n in order] for group in space.groups]
    while True:
        owners = [_owner(m) if m else len(ends) for m in members]
        empty = [s for s in range(len(ends) + 1) if s not in owners]
        if not empty:
            break
        if not automatic:
            s = empty[0]
            raise ConfigError(f"swp option stages: the stage {'ending at ' + repr(ends[s]) if s < len(ends) else 'after ' + repr(ends[-1])} "
                              "owns no width group: drop that end or choose another")
        drop = min(empty[0], len(ends) - 1)  # merge the empty stage into the next (the last: into the one before)
        members = [[s - (s > drop) for s in m] for m in members]
        ends = ends[:drop] + ends[drop + 1:]
    return Stages(tuple(ends), tuple(tuple(g for g, o in enumerate(owners) if o == s) for s in range(len(ends) + 1)))


def _owner(stages) -> int:
    """The stage holding most of a group's producing members (ties: the earlier one)."""
    counts = Counter(stages)
    most = max(counts.values())
    return min(s for s, n in counts.items() if n == most)


def _calls(model, example):
    """[(module name, output)] of one eval-mode forward pass of `example`, in the order the calls
    finished (a module's own output after those of the modules inside it)."""
    calls = []
    hooked_forward(model, example.to(next(model.parameters()).device), lambda: [
        m.register_forward_hook(lambda m, i, o, n=n: calls.append((n, o))) for n, m in model.named_modules() if n])
    return calls


def _resolution_ends(calls) -> list:
    """The outermost module that last outputs each resolution that never comes back (choice)."""
    maps = [(n, tuple(o.shape[2:])) for n, o in calls if isinstance(o, torch.Tensor) and o.dim() == 4]
    last = {size: i for i, (_, size) in enumerate(maps)}
    runs = Counter(n for n, _ in calls)
    ends = []
    for i in range(len(maps) - 1):
        if maps[i][1] != maps[i + 1][1] and last[maps[i][1]] == i and runs[maps[i][0]] == 1:
            ends.append(maps[i][0])
    return ends


def active_channels(out: torch.Tensor) -> torch.Tensor:
    """(1, C, 1, ...) 1.0 where channel C of `out` is not zero everywhere in the batch (choice): the
    supernet zeroes its inactive channels, so these are the subnet's channels at a stage end (an
    active channel that is zero on the whole batch loses nothing by staying zero)."""
    dims = (0, *range(2, out.dim()))
    return (out.detach().abs().amax(dim=dims, keepdim=True) > 0).to(out.dtype)


class StageTap:
    """Forward hooks on the stage ends of `model` while inside `with`: `outputs` holds each end's
    output of the last forward pass; when `inputs` is set ({end: the full network's output there}),
    each end hands the next stage that instead, on the subnet's channels (active_channels)."""

    def __init__(self, model: nn.Module, ends):
        self.model, self.ends = model, tuple(ends)
        self.outputs, self.inputs, self._handles = {}, None, []

    def _hook(self, name):
        def hook(module, args, out):
            self.outputs[name] = out
            if self.inputs is not None:
                full = self.inputs[name]
                if full.shape != out.shape:
                    raise ConfigError(f"stage end {name!r}: the full network's output {tuple(full.shape)} does not "
                                      f"match the subnet's {tuple(out.shape)} (stage inputs of another batch?)")
                return full * active_channels(out)
        return hook

    def __enter__(self):
        self._handles = [self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.ends]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


def relative_distance(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||out - target||^2 / ||target||^2: a stage's feature-distillation loss, scale-free so that
    stages of different sizes weigh the same when summed (choice)."""
    return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
