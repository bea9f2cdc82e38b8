"""BS-NAS (METHOD section 8): broaden, then shrink. The width space reaches above the original width
(compress's `broaden`, 1.5 by default for this method: compressor/broaden.py), so that a budget at
the original cost can still move channels between layers; supernet training switches off the
worst-scoring widths of each group at scheduled points (compressor/shrink.py), and the search runs
on the space that remains. Left paths only: the broadened channels come after the original ones."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..search import search
from ..shrink import ShrinkingSampler, check_schedule
from .base import Method, register


@dataclass(frozen=True)
class BSNASOptions:
    subnets: int = 2                         # configurations a step (BCNet trains two paths a step)
    shrink_at: tuple = (0.25, 0.5, 0.75)     # fractions of training after which the space shrinks
    shrink_fraction: float = 0.25            # of each group's widths sampled since the last point, switched off

    def __post_init__(self):
        if isinstance(self.subnets, bool) or not isinstance(self.subnets, int) or self.subnets < 1:
            raise ConfigError(f"bsnas option subnets must be an integer >= 1, got {self.subnets!r}")
        try:
            points, _ = check_schedule(self.shrink_at, self.shrink_fraction)
        except ConfigError as e:
            raise ConfigError(f"bsnas option {e}") from None
        object.__setattr__(self, "shrink_at", points)  # a list (JSON, the CLI) becomes the tuple


def shrunk_search(net, budget, train_data, val_data, *, shrunk=None, **kwargs):
    """search() on `shrunk` (the trained sampler's space: the widths shrinking left on; None: the
    supernet's own space). The supernet's space is restored afterwards."""
    if shrunk is None:
        return search(net, budget, train_data, val_data, **kwargs)
    whole, net.space = net.space, shrunk
    try:
        return search(net, budget, train_data, val_data, **kwargs)
    finally:
        net.space = whole


BSNAS = register(Method(
    name="bsnas", options=BSNASOptions,
    sampler=lambda space, seed, options, window=None, sides=None: ShrinkingSampler(
        space, seed, subnets=options.subnets, shrink_at=options.shrink_at, fraction=options.shrink_fraction,
        window=window, sides=sides or ("left",)),
    sides=("left",),
    searcher=shrunk_search,
    searcher_kwargs=lambda options, sampler: {"shrunk": sampler.space if sampler is not None else None},
    broaden=1.5,
    summary="broadened width space (1.5 x), shrunk during supernet training by cost-adjusted training losses"))
