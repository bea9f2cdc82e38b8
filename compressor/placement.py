"""CafeNet's locally free channels (METHOD section 8): width k of a group keeps its base channels
[0, k - r) plus r free channels placed anywhere inside the zone [k - r, k + r) (clipped to the
group). A placement names the free channels of every group, so it is a side of its own: the
supernet runs it, slim() removes exactly the other channels, and a report or a saved model carries
it as text.

The text form is "free:" then, per group, its free channels' positions (comma-separated,
ascending), groups separated by "|"; a group whose free channels are [k - r, k) (the left window)
is written empty, and a placement that is the left window in every group is "left" itself.
This module knows nothing of models: it works on group sizes and widths.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError

PREFIX = "free:"


def is_placement(side) -> bool:
    return isinstance(side, str) and side.startswith(PREFIX)


def base_side(side: str) -> str:
    """The side a placement shares its base channels with ("left"); a side is its own."""
    return "left" if is_placement(side) else side


def parse(side: str, groups: int) -> list:
    """Per group, the free channels' positions (an empty tuple: the left window)."""
    parts = side[len(PREFIX):].split("|")
    if len(parts) != groups:
        raise ConfigError(f"placement {side[:60]!r} names {len(parts)} groups, the width space has {groups}: "
                          f"was it found on another space?")
    try:
        return [tuple(int(p) for p in part.split(",")) if part else () for part in parts]
    except ValueError:
        raise ConfigError(f"placement {side[:60]!r} is malformed: each group's free channels are integers "
                          f"separated by ','") from None


def kept(n: int, k: int, free: tuple, group: str = "") -> np.ndarray:
    """The positions a width-k group of n channels keeps with these free channels: [0, k - r) and
    the r free ones, which must be distinct and inside the zone [k - r, min(n, k + r))."""
    r = len(free)
    if r == 0:
        return np.arange(k)
    zone = (k - r, min(n, k + r))
    if r > k or len(set(free)) != r or not all(zone[0] <= p < zone[1] for p in free):
        raise ConfigError(f"placement of group {group!r}: free channels {list(free)} are not {r} distinct "
                          f"positions in its zone [{zone[0]}, {zone[1]}) at width {k}")
    return np.concatenate([np.arange(k - r), np.sort(np.asarray(free, dtype=np.int64))])


def free_counts(sizes, bins: int, fraction: float) -> np.ndarray:
    """r per group: `fraction` of the group's nominal bin step n / bins, at least 1 (choice: the
    bin step is the scale on which neighbouring widths differ)."""
    return np.maximum(1, np.floor(fraction * np.asarray(sizes) / bins + 0.5)).astype(np.int64)


def draw(sizes, widths, counts, generator) -> str:
    """A random placement: in each group, min(r, k) free channels drawn uniformly from its zone
    (`generator`: a torch.Generator, so that a sampler's state stays one tensor)."""
    import torch
    groups = []
    for n, k, r in zip(sizes, widths, counts):
        r = int(min(r, k))
        start, stop = int(k) - r, int(min(n, k + r))
        pick = torch.randperm(stop - start, generator=generator)[:r].sort().values + start
        groups.append(tuple(int(p) for p in pick))
    return encode(groups, widths)


def encode(groups, widths) -> str:
    """The text of per-group free channels; a group at its left window is written empty, and a
    placement left in every group is "left"."""
    parts = []
    for free, k in zip(groups, widths):
        free = tuple(sorted(int(p) for p in free))
        parts.append("" if free == tuple(range(int(k) - len(free), int(k))) else ",".join(map(str, free)))
    return "left" if not any(parts) else PREFIX + "|".join(parts)
