"""Shrinking (BS-NAS, METHOD section 8): supernet training that, at scheduled points, switches off
the worst-scoring widths of each group, so that the later steps, and the search, concentrate on the
widths that remain.

The score of a width (choice: the paper's criterion is not what a plug-in can reproduce): the mean
training loss of the subnets sampled since the last shrink that had that width in that group, less
what their cost predicts. Raw mean losses condemn narrow widths for being narrow (a subnet with a
narrow group is cheaper); the loss is regressed on the subnets' relative FLOPs (least squares over
the same steps) and a width is scored by its subnets' mean residual: it is switched off when its
subnets train worse than others of their cost. Choices besides: only widths the stage sampled are
scored, and `fraction` of those are switched off at each point (a training window or anchored
draws sample a few widths per group: a fraction of all widths would switch off every trained one
and leave the untrained; measured, the quick CIFAR row fell to 20 %); a width no subnet of the stage
sampled is kept (no evidence against it); the best-scoring width and a group's narrowest allowed
width are never switched off (the smallest network, and with it every budget the space could meet,
stays reachable; a group keeps at least one width); the statistics restart after each shrink (the
weights have moved)."""
from __future__ import annotations

import copy

import numpy as np
import torch

from .errors import ConfigError
from .samplers import BCNetSampler, TrainingWindow


def check_schedule(shrink_at, fraction):
    """(shrink_at as a tuple, fraction): fractions of training in (0, 1), increasing; a fraction of
    each group's widths in [0, 1)."""
    try:
        points = tuple(shrink_at)
    except TypeError:
        points = None
    if points is None or any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1 for p in points) \
            or list(points) != sorted(set(points)):
        raise ConfigError(f"shrink_at must be increasing fractions of training in (0, 1), e.g. (0.25, 0.5, 0.75); "
                          f"got {shrink_at!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"shrink_fraction must be a fraction of each group's widths in [0, 1), got {fraction!r}")
    return points, float(fraction)


class ShrinkingSampler(BCNetSampler):
    """`subnets` configurations a step, each on every side of `sides` (default left only: broadened
    channels come after the original ones, so the right path would start from the untrained ones),
    drawn as BCNetSampler draws them (uniformly, in a window, or around its anchors) from the widths
    still allowed. `schedule(total)` (train_supernet calls it) sets the steps at which `observe`
    shrinks the space: at each fraction of `shrink_at`, per group, `fraction` of its allowed widths,
    the worst-scoring of those the stage sampled (module docstring). `space` is the shrunk space; `history` what each shrink
    switched off."""
    method = "bsnas"

    def __init__(self, space, seed=0, *, subnets=2, shrink_at=(0.25, 0.5, 0.75), fraction=0.25,
                 window: TrainingWindow | None = None, sides=("left",)):
        super().__init__(space, seed, complementary=False, window=window, sides=sides)
        if isinstance(subnets, bool) or not isinstance(subnets, int) or subnets < 1:
            raise ConfigError(f"subnets must be a positive integer, got {subnets!r}")
        self.shrink_at, self.fraction = check_schedule(shrink_at, fraction)
        self.subnets = subnets
        self.base = space
        self.off = np.zeros_like(space.allowed)
        self.points = ()  # the steps after which the space shrinks (schedule)
        self.steps = 0
        self.history = []  # [{"step", "off": [[group, width], ...]}]
        self._original_flops = float(space.flops(space.original()))
        self._reset()

    def _reset(self):
        shape = self.base.allowed.shape
        self.count, self.loss, self.cost = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        self.moments = np.zeros(5)  # n, sum cost, sum loss, sum cost^2, sum cost * loss

    def schedule(self, total: int):
        """Shrink after the steps at `shrink_at` x `total` (each at least step 1, without repeats)."""
        self.points = tuple(sorted({max(1, int(round(p * total))) for p in self.shrink_at}))

    def _uniform(self, count):
        """Each group's bin uniform over its allowed ones (on an unshrunk space, BCNetSampler's draws)."""
        u = torch.rand(count, len(self._lo), generator=self.generator).numpy()
        allowed = self.space.allowed
        table = np.zeros((len(allowed), allowed.sum(1).max()), dtype=np.int64)
        for g, row in enumerate(allowed):
            bins = np.flatnonzero(row)
            table[g, :len(bins)] = bins
        picks = (u * allowed.sum(1)).astype(np.int64)
        return torch.as_tensor(table[np.arange(len(allowed)), picks])

    def next(self):
        cfgs = [self.random_cfg() for _ in range(self.subnets)]
        weight = 1 / (self.subnets * len(self.sides))
        return [(cfg, side, weight) for cfg in cfgs for side in self.sides]

    def observe(self, losses):
        """Record a step's [(loss, cfg, side)]; shrink when the step is a scheduled point."""
        for loss, cfg, _ in losses:
            cost = self.base.flops(cfg) / self._original_flops
            rows = np.arange(len(cfg))
            np.add.at(self.count, (rows, cfg), 1)
            np.add.at(self.loss, (rows, cfg), loss)
            np.add.at(self.cost, (rows, cfg), cost)
            self.moments += (1, cost, loss, cost * cost, cost * loss)
        self.steps += 1
        if self.steps in self.points:
            self.shrink()

    def scores(self) -> np.ndarray:
        """(G, bins + 1): each bin's mean residual loss over this stage (NaN where never sampled)."""
        n, c, l, cc, cl = self.moments
        variance = cc / n - (c / n) ** 2 if n else 0.0
        slope = (cl / n - c * l / n ** 2) / variance if n and variance > 1e-12 else 0.0
        intercept = (l - slope * c) / n if n else 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.loss - slope * self.cost) / self.count - intercept

    def shrink(self):
        """Switch off, per group, the `fraction` of its scored widths (those the stage sampled) that
        score worst (a width over all its bins; never the narrowest, never the best)."""
        scores, switched = self.scores(), []
        for g in range(len(self.base)):
            levels = self.space.levels(g)
            widths = self.base.width_table[g, levels]
            same = self.base.width_table[g][None, :] == widths[:, None]  # [level, bin]
            count = (same * self.count[g]).sum(1)
            residual = np.where(count > 0, (same * np.nan_to_num(scores[g] * self.count[g])).sum(1) /
                                np.maximum(count, 1), np.nan)
            scored = [i for i in range(len(levels)) if count[i] > 0]
            if not scored:
                continue
            best = min(scored, key=lambda i: residual[i])
            candidates = [i for i in scored if i not in (0, best)]
            worst = sorted(candidates, key=lambda i: -residual[i])[:int(self.fraction * len(scored))]
            for i in worst:
                self.off[g] |= same[i]
                switched.append([g, int(widths[i])])
        self.space = self.base.shrunk(self.off)
        self.history.append({"step": self.steps, "off": switched})
        self._reset()

    def state_dict(self):
        # copies (torch.tensor), not views of the arrays that later steps change
        return {**super().state_dict(), "off": torch.tensor(self.off), "steps": self.steps,
                "history": copy.deepcopy(self.history), "count": torch.tensor(self.count),
                "loss": torch.tensor(self.loss), "cost": torch.tensor(self.cost), "moments": torch.tensor(self.moments)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.off = state["off"].numpy().astype(bool)
        self.space = self.base.shrunk(self.off)
        self.steps, self.history = state["steps"], state["history"]
        self.count, self.loss, self.cost, self.moments = (state[k].numpy().copy() for k in
                                                          ("count", "loss", "cost", "moments"))
