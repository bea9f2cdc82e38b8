"""Which subnets a supernet training step trains.

BCNet (METHOD section 3): one random configuration per step, trained on both sides; steps come in
pairs, the second training the complement c' = N - c of the first, so that over a pair every channel
is updated exactly twice. UA (AutoSlim's sandwich rule): left side only, the largest, the smallest
and `n_random` (two) random configurations each step. The methods that use them are
registered in compressor/methods/.

A `TrainingWindow` restricts the random configurations to those whose primary cost lies near the
budget: with one budget known before training, the steps go to the subnets the search will choose
among instead of the whole range (whose average is far cheaper than a 50 % budget). With `anchors`
(configurations such as the global-importance one), the draws are local moves around them: a few
groups one or two widths narrower or wider, so that supernet training also trains the networks the
search will deliver (on CIFAR ResNet-56 a random configuration in the window fine-tunes 10 to 15
points worse than the global-importance one: README, quality section).

Samplers draw from a torch.Generator so that their whole state is one tensor a checkpoint can hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

_WINDOW_DRAWS = 256  # candidates per draw in a window: one vectorised cost call
_WINDOW_ROUNDS = 8
# a local move changes each group by -2, -1, 0, +1 or +2 distinct widths with these probabilities
# (choice): about 9 of ResNet-56's 30 groups move per draw
LOCAL_MOVES = np.array([-2, -1, 0, 1, 2])
LOCAL_PROBS = np.array([0.05, 0.1, 0.7, 0.1, 0.05])


def local_moves(space, cfgs, u) -> np.ndarray:
    """Configurations (B, G) moved locally: group g of row b by LOCAL_MOVES drawn with LOCAL_PROBS
    from the uniform number u[b, g] (distinct widths, space.step). Supernet training and the
    search's mutations both use it, each with its own random source."""
    return space.step(cfgs, LOCAL_MOVES[np.searchsorted(np.cumsum(LOCAL_PROBS)[:-1], u, side="right")])


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
    # configurations the draws move locally around (empty: uniform draws in the window)
    anchors: tuple = ()

    def scores(self, cfgs: np.ndarray) -> np.ndarray:
        """(B,) the primary cost of the feasible configurations, -inf for the others."""
        return np.where(self.feasible(cfgs), self.cost(cfgs), -np.inf)

    def contains(self, cfgs: np.ndarray) -> np.ndarray:
        return self.scores(cfgs) >= self.low


class BCNetSampler:
    method = "bcnet"

    def __init__(self, space, seed=0, complementary=True, window: TrainingWindow | None = None,
                 sides=("left", "right")):
        self.space = space
        self.complementary = complementary
        self.window = window
        self.sides = tuple(sides)
        self.generator = torch.Generator().manual_seed(seed)
        self.pending = None  # the complement still owed by the first step of a pair
        self._lo = torch.as_tensor(space.min_bins)
        self._hi = torch.as_tensor(space.max_bins)

    def _uniform(self, count):
        u = torch.rand(count, len(self._lo), generator=self.generator)
        return self._lo + (u * (self._hi - self._lo + 1)).long()

    def _local(self, count):
        """`count` local moves (LOCAL_MOVES) around anchors drawn uniformly from the window's."""
        anchors = np.asarray(self.window.anchors, dtype=np.int64)
        pick = torch.randint(len(anchors), (count,), generator=self.generator).numpy()
        return local_moves(self.space, anchors[pick], torch.rand(count, len(self._lo), generator=self.generator).numpy())

    def random_cfg(self):
        """Each group's bin uniform over its allowed ones, or a local move around an anchor when the
        window has anchors; with a window, the first such draw in it (rounds of _WINDOW_DRAWS;
        after _WINDOW_ROUNDS, the costliest feasible draw, or the smallest configuration)."""
        if self.window is None:
            return tuple(int(c) for c in self._uniform(1)[0])
        fallback, best = self.space.min(), -np.inf
        for _ in range(_WINDOW_ROUNDS):
            cfgs = self._local(_WINDOW_DRAWS) if self.window.anchors else self._uniform(_WINDOW_DRAWS).numpy()
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
        """[(cfg, side, weight)] for one step: the configuration on each of `sides` (both, 0.5
        each, in BCNet). With a window, a complement outside it is skipped (the complement of a
        configuration near a 50 % budget costs about a tenth)."""
        if self.pending is not None:
            cfg, self.pending = self.pending, None
        else:
            cfg = self.random_cfg()
            if self.complementary:
                complement = self.complement(cfg)
                if self.window is None or self.window.contains(np.array([complement]))[0]:
                    self.pending = complement
        return [(cfg, side, 1 / len(self.sides)) for side in self.sides]

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

