"""BCNet (METHOD section 3): left and right subnets of one configuration per step, 0.5 each, in
stochastic complementary pairs; the search scores both sides."""
from dataclasses import dataclass

from ..errors import ConfigError
from ..samplers import BCNetSampler
from .base import Method, register


@dataclass(frozen=True)
class BCNetOptions:
    complementary: bool = True  # the second step of each pair trains the complement N - c

    def __post_init__(self):
        if not isinstance(self.complementary, bool):
            raise ConfigError(f"bcnet option complementary must be True or False, got {self.complementary!r}")


BCNET = register(Method(
    name="bcnet", options=BCNetOptions,
    sampler=lambda space, seed, options, window=None, sides=None: BCNetSampler(
        space, seed, complementary=options.complementary, window=window, sides=sides or ("left", "right")),
    sides=("left", "right"),
    summary="bilaterally coupled supernet, complementary pairs, prior-seeded evolution"))
