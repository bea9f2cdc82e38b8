"""CafeNet (METHOD section 8): locally free weight sharing with min-min training. Width k of a group
keeps its base channels [0, k - r) and r free channels placed inside the zone [k - r, k + r)
(compressor.placement); each step draws one width and `placements` placements of it (the first
the left window), measures each one's loss without gradient and trains only the lowest
(train.lowest_loss). The search scores a width by its best placement, and that placement is what
gets slimmed. FLOPs-sensitive bins are a width-space option for every method
(analyze(binning="flops"), compress(binning="flops"))."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..placement import draw, free_counts
from ..samplers import BCNetSampler, TrainingWindow
from ..search import search
from .base import Method, register


@dataclass(frozen=True)
class CafeNetOptions:
    free: float = 0.5     # r as a fraction of a group's nominal bin step n / bins (at least 1 channel)
    placements: int = 3   # placements tried per width, in training (min-min) and in the search

    def __post_init__(self):
        if isinstance(self.free, bool) or not isinstance(self.free, (int, float)) or not 0 < self.free <= 4:
            raise ConfigError(f"cafenet option free must be a number in (0, 4] (r as a fraction of the bin step), "
                              f"got {self.free!r}")
        if isinstance(self.placements, bool) or not isinstance(self.placements, int) or self.placements < 1:
            raise ConfigError(f"cafenet option placements must be an integer >= 1, got {self.placements!r}")


def placements_of(space, cfg, options: CafeNetOptions, generator) -> list:
    """`options.placements` distinct placements of `cfg` (fewer when its zones hold fewer): the left
    window first (choice: the placement every other method's left path trains is always a
    candidate), then random ones drawn from `generator`."""
    counts = free_counts(space.sizes, space.bins, options.free)
    counts[[group.stream is not None for group in space.groups]] = 0  # a shuffled stream keeps its left window
    widths = space.channels(cfg)
    found = ["left"]
    for _ in range(4 * options.placements):  # a bounded number of draws: small zones repeat
        if len(found) == options.placements:
            break
        side = draw(space.sizes, widths, counts, generator)
        if side not in found:
            found.append(side)
    return found


class CafeNetSampler(BCNetSampler):
    """One width per step (uniform, or in the training window), as `placements` alternatives for
    min-min; the width and the placements come from the sampler's one generator."""
    method = "cafenet"

    def __init__(self, space, seed=0, options: CafeNetOptions = CafeNetOptions(), window: TrainingWindow | None = None):
        super().__init__(space, seed, complementary=False, window=window, sides=("left",))
        self.options = options

    def next(self):
        cfg = self.random_cfg()
        return [(cfg, side, 1.0) for side in placements_of(self.space, cfg, self.options, self.generator)]


def search_placements(space, cfg, options: CafeNetOptions, seed: int) -> list:
    """The placements the search scores `cfg` on: drawn from a generator seeded by the search's seed
    and the width itself, so a width is always scored on the same placements (in a resumed run too)."""
    key = int(np.random.default_rng([seed, *cfg]).integers(2 ** 62))
    return placements_of(space, cfg, options, torch.Generator().manual_seed(key))


def placement_search(net, budget, train_data, val_data, *, options: CafeNetOptions | None = None, seed: int = 0,
                     **kwargs):
    """search() where a candidate's left score is its best placement's (search_placements), and the
    result's side that placement. The other arguments are search()'s."""
    options = options or CafeNetOptions()
    return search(net, budget, train_data, val_data, seed=seed, placements=lambda cfg: search_placements(
        net.space, cfg, options, seed), **kwargs)


CAFENET = register(Method(
    name="cafenet", options=CafeNetOptions,
    sampler=lambda space, seed, options, window=None, sides=None: CafeNetSampler(space, seed, options, window),
    min_min=True,
    sides=("left",),  # placements share the left path's base channels
    searcher=placement_search,
    searcher_kwargs=lambda options, sampler: {"options": options},
    summary="locally free weight sharing: free channels placed in a zone around each width, min-min training"))
