"""Which subnets a supernet training step trains.

BCNet (METHOD section 3): one random configuration per step, trained on both sides; steps come in
pairs, the second training the complement c' = N - c of the first, so that over a pair every channel
is updated exactly twice. UA (AutoSlim's sandwich rule): left side only, the largest, the smallest
and `n_random` (two) random configurations each step. The methods that use them are
registered in compressor/methods/.

A `TrainingWindow` restricts the random configurations to those whose primary cost lies near the
budget: with one budget known before training, the steps go to the subnets the search will choose
among instead of the whole range (whose average is far cheaper than a 50 % budget).

Samplers draw from a torch.Generator so that their whole state is one tensor a checkpoint can hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

_WINDOW_DRAWS = 256  # candidates per draw in a window: one vectorised cost call
_WINDOW_ROUNDS = 8


@dataclass(frozen=True)
class TrainingWindow:
    """The configurations a supernet step may train: `feasible(cfgs)` (every constraint met) and
    `cost(cfgs)` (the primary one) >= `low`; both map a (B, G) int array to (B,)."""
    cost: Callable[[np.ndarray], np.ndarray]
    feasible: Callable[[np.ndarray], np.ndarray]
    low: float
    # what defines the window independently of the model (e.g. "0.8 x flops<=50%"): a resumed run
    # is checked against it; empty: `low` itself
    label: str = ""

    def scores(self, cfgs: np.ndarray) -> np.ndarray:
        """(B,) the primary cost of the feasible configurations, -inf for the others."""
        return np.where(self.feasible(cfgs), self.cost(cfgs), -np.inf)

    def contains(self, cfgs: np.ndarray) -> np.ndarray:
        return self.scores(cfgs) >= self.low


class BCNetSampler:
    method = "bcnet"

    def __init__(self, space, seed=0, complementary=True, window: TrainingWindow | None = None):
        self.space = space
        self.complementary = complementary
        self.window = window
        self.generator = torch.Generator().manual_seed(seed)
        self.pending = None  # the complement still owed by the first step of a pair
        self._lo = torch.as_tensor(space.min_bins)
        self._hi = torch.as_tensor(space.max_bins)

    def _uniform(self, count):
        u = torch.rand(count, len(self._lo), generator=self.generator)
        return self._lo + (u * (self._hi - self._lo + 1)).long()

    def random_cfg(self):
        """Each group's bin uniform over its allowed ones; with a window, the first such draw in it
        (rounds of _WINDOW_DRAWS; after _WINDOW_ROUNDS, the costliest feasible draw, or the
        smallest configuration)."""
        if self.window is None:
            return tuple(int(c) for c in self._uniform(1)[0])
        fallback, best = self.space.min(), -np.inf
        for _ in range(_WINDOW_ROUNDS):
            cfgs = self._uniform(_WINDOW_DRAWS).numpy()
            scores = self.window.scores(cfgs)
            i = int(np.argmax(scores >= self.window.low))
            if scores[i] >= self.window.low:
                return tuple(int(c) for c in cfgs[i])
            if scores.max() > best:  # a window too narrow to hit: train the costliest feasible draw
                best, fallback = scores.max(), tuple(int(c) for c in cfgs[np.argmax(scores)])
        return fallback

    def complement(self, cfg):
        """c' = N - c per group; a full-width group (empty complement) stays full (choice), and
        the result is clipped to each group's allowed bins."""
        n = self.space.bins
        return tuple(int(min(max(n if c == n else n - c, lo), hi))
                     for c, lo, hi in zip(cfg, self._lo.tolist(), self._hi.tolist()))

    def next(self):
        """[(cfg, side, weight)] for one step. With a window, a complement outside it is skipped
        (the complement of a configuration near a 50 % budget costs about a tenth)."""
        if self.pending is not None:
            cfg, self.pending = self.pending, None
        else:
            cfg = self.random_cfg()
            if self.complementary:
                complement = self.complement(cfg)
                if self.window is None or self.window.contains(np.array([complement]))[0]:
                    self.pending = complement
        return [(cfg, "left", 0.5), (cfg, "right", 0.5)]

    def state_dict(self):
        return {"generator": self.generator.get_state(), "pending": list(self.pending) if self.pending else None}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.pending = tuple(state["pending"]) if state["pending"] else None


class SandwichSampler(BCNetSampler):
    """The unilateral (UA) baseline: left only, largest + smallest + 2 random per step. The first
    entry is the largest network, whose output teaches the others (in-place distillation)."""
    method = "ua"

    def __init__(self, space, seed=0, n_random=2, window: TrainingWindow | None = None):
        super().__init__(space, seed, complementary=False, window=window)
        self.n_random = n_random

    def next(self):
        cfgs = [self.space.max(), self.space.min()] + [self.random_cfg() for _ in range(self.n_random)]
        return [(cfg, "left", 1.0) for cfg in cfgs]

