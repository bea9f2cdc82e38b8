"""Which subnets a supernet training step trains.

BCNet (METHOD section 3): one random configuration per step, trained on both sides; steps come in
pairs, the second training the complement c' = N - c of the first, so that over a pair every channel
is updated exactly twice. UA (AutoSlim's sandwich rule): left side only, the largest, the smallest
and `n_random` (two) random configurations each step. The methods that use them are
registered in compressor/methods/.

Samplers draw from a torch.Generator so that their whole state is one tensor a checkpoint can hold.
"""
from __future__ import annotations

import torch


class BCNetSampler:
    method = "bcnet"

    def __init__(self, space, seed=0, complementary=True):
        self.space = space
        self.complementary = complementary
        self.generator = torch.Generator().manual_seed(seed)
        self.pending = None  # the complement still owed by the first step of a pair
        self._lo = torch.as_tensor(space.min_bins)
        self._hi = torch.as_tensor(space.max_bins)

    def random_cfg(self):
        u = torch.rand(len(self._lo), generator=self.generator)
        return tuple(int(c) for c in self._lo + (u * (self._hi - self._lo + 1)).long())

    def complement(self, cfg):
        """c' = N - c per group; a full-width group (empty complement) stays full (choice), and
        the result is clipped to each group's allowed bins."""
        n = self.space.bins
        return tuple(int(min(max(n if c == n else n - c, lo), hi))
                     for c, lo, hi in zip(cfg, self._lo.tolist(), self._hi.tolist()))

    def next(self):
        """[(cfg, side, weight)] for one step."""
        if self.pending is not None:
            cfg, self.pending = self.pending, None
        else:
            cfg = self.random_cfg()
            if self.complementary:
                self.pending = self.complement(cfg)
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

    def __init__(self, space, seed=0, n_random=2):
        super().__init__(space, seed, complementary=False)
        self.n_random = n_random

    def next(self):
        cfgs = [self.space.max(), self.space.min()] + [self.random_cfg() for _ in range(self.n_random)]
        return [(cfg, "left", 1.0) for cfg in cfgs]

