"""MCT-NAS (METHOD section 8): supernet training draws each step's configuration by UCT from a Monte
Carlo tree whose rewards are the training losses (mcts.TreeSampler; both sides of the bilateral
supernet, as BCNet trains them); the search is the tree search with hierarchical node selection
(mcts.TreeSearch), started from the feasible seeds and the configurations the training tree rates
best within the budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..mcts import TreeSampler, TreeSearch
from ..search import constraints, feasible, search
from ..searchers import Evolution
from .base import Method, register


@dataclass(frozen=True)
class MCTNASOptions:
    exploration: float = 0.5  # UCT's constant, in training and in the search (rewards scaled to [0, 1])
    sharing: float = 10.0     # node communication: visits' weight of a (group, choice)'s mean (0: none)
    queries: int | None = None  # candidates the search scores (None: as many as the evolution at that effort)
    warm: int = 4             # the training tree's best configurations within the budget, scored first

    def __post_init__(self):
        try:  # the tree search's own checks, named as this method's options
            TreeSearch(queries=1 if self.queries is None else self.queries, exploration=self.exploration,
                       sharing=self.sharing)
        except ConfigError as e:
            raise ConfigError(f"mctnas option {e}") from None
        if isinstance(self.warm, bool) or not isinstance(self.warm, int) or self.warm < 0:
            raise ConfigError(f"mctnas option warm must be an integer >= 0, got {self.warm!r}")


def evolution_queries(effort: float) -> int:
    """How many candidates the evolution scores at `effort` (at most): the tree search gets as many,
    so the two compare at the same scoring cost."""
    e = Evolution.scaled(effort)
    return e.population + (e.generations - 1) * (e.mutations + e.crossovers)


def warm_seeds(tree, space, budget, count: int) -> list:
    """Up to `count` configurations the training tree visited that meet every constraint of
    `budget`, the highest node value first (its own mean reward blended with node communication)."""
    leaves = [node for node in tree.visits if len(node) == len(tree.problem)]
    if not leaves or count == 0:
        return []
    ok = feasible(constraints(space, budget), np.array(leaves, dtype=np.int64))
    fitting = [leaf for leaf, keep in zip(leaves, ok) if keep]
    return sorted(fitting, key=tree.value, reverse=True)[:count]  # stable: ties keep the first visited


def tree_search(net, budget, train_data, val_data, *, options: MCTNASOptions | None = None, tree=None,
                effort: float = 1.0, seeds=(), **kwargs):
    """search() with the MCT-NAS tree search as its searcher: `options` (default MCTNASOptions()),
    `tree`: the training tree (mcts.MonteCarloTree) whose best configurations within the budget
    follow the seeds (None: the seeds only). The other arguments are search()'s."""
    options = options or MCTNASOptions()
    queries = options.queries if options.queries is not None else evolution_queries(effort)
    searcher = TreeSearch(queries=queries, exploration=options.exploration, sharing=options.sharing)
    warm = warm_seeds(tree, net.space, budget, options.warm) if tree is not None else []
    return search(net, budget, train_data, val_data, effort=effort, seeds=list(seeds) + warm, searcher=searcher,
                  **kwargs)


MCTNAS = register(Method(
    name="mctnas", options=MCTNASOptions,
    sampler=lambda space, seed, options, window=None, sides=None: TreeSampler(
        space, seed, window=window, sides=sides or ("left", "right"), exploration=options.exploration,
        sharing=options.sharing),
    sides=("left", "right"),
    searcher=tree_search,
    searcher_kwargs=lambda options, sampler: {"options": options, "tree": sampler.tree if sampler else None},
    summary="Monte Carlo tree sampling from training losses (UCT, node communication), tree search"))
