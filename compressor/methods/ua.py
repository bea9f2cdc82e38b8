"""The unilateral (UA) baseline, AutoSlim's sandwich rule: left side only, the largest, the
smallest and `n_random` random widths per step, the others distilled in place from the largest.
The largest network is trained every step, so it never feeds the prior."""
from dataclasses import dataclass

from ..errors import ConfigError
from ..losses import kd
from ..samplers import SandwichSampler
from .base import Method, register


@dataclass(frozen=True)
class UAOptions:
    n_random: int = 2  # random widths per step, besides the largest and the smallest

    def __post_init__(self):
        if isinstance(self.n_random, bool) or not isinstance(self.n_random, int) or self.n_random < 0:
            raise ConfigError(f"ua option n_random must be an integer >= 0, got {self.n_random!r}")


def sandwich_loss(i, out, base, state):
    if i == 0:  # the largest network: its own loss; its output teaches the others
        state["largest"] = out.detach()
        return base()
    return kd(out, state["largest"])


UA = register(Method(
    name="ua", options=UAOptions,
    sampler=lambda space, seed, options, window=None, sides=None: SandwichSampler(
        space, seed, n_random=options.n_random, window=window),  # left only, whatever `sides`
    loss=sandwich_loss,
    tasks=False,  # its loss reads the subnets' class logits
    record=lambda cfg, space: cfg != space.max(),
    sides=("left",),  # right paths are never trained
    summary="unilateral supernet (AutoSlim sandwich rule), the baseline BCNet is compared with"))
