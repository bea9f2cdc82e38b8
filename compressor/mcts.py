"""MCT-NAS (METHOD section 8; Su et al., CVPR 2021): the search space as a Monte Carlo tree with one
level per group, a node per prefix of choices. Rewards (held-out scores in the search, training
losses during supernet training) are backed up along a candidate's path; nodes are chosen by UCT.
Node communication: every (group, choice) also keeps the mean reward of all candidates that made
that choice there, whatever came before, and a node's value is its own mean blended with it, so a
node few candidates passed through is judged by what its choice did elsewhere. Hierarchical node
selection (the search): from the root, give every open child of the current node a few visits,
then descend into the best one; each descent ends in new candidates.

Choices where the paper is silent are marked (choice)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .searchers import Problem, Trace, check_queries


def _positive(name, value, allow_zero=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


class MonteCarloTree:
    """Visit counts and reward sums per node (a prefix tuple of choices), per (group, choice) for
    node communication, and the nodes whose feasible candidates have all been scored ("closed").
    `exploration`: UCT's constant on rewards scaled to [0, 1] by the range seen so far (choice: the
    scores' own scale is arbitrary). `sharing`: how many visits' weight the (group, choice) mean
    has in a node's value (0: no communication)."""

    def __init__(self, problem: Problem, exploration: float = 0.5, sharing: float = 10.0):
        _positive("exploration", exploration)
        _positive("sharing", sharing)
        self.problem = problem
        self.exploration = float(exploration)
        self.sharing = float(sharing)
        self.visits, self.totals = {}, {}  # prefix -> count, sum of rewards; () is the root
        self.shared_visits = [dict.fromkeys(group, 0) for group in problem.choices]
        self.shared_totals = [dict.fromkeys(group, 0.0) for group in problem.choices]
        self.closed = set()
        self._children = {}
        self.low, self.high = math.inf, -math.inf
        cheapest = np.array([problem.cheapest()])
        if not problem.feasible(cheapest)[0]:
            raise ConfigError(f"no candidate is feasible: the cheapest one, {problem.cheapest()}, is not")

    # -- statistics ----------------------------------------------------------------------------
    def update(self, cfg, reward: float):
        """Back `reward` up the path of `cfg` (every prefix, the root included) and into each
        (group, choice) statistic."""
        cfg, reward = tuple(int(c) for c in cfg), float(reward)
        if not math.isfinite(reward):
            raise ConfigError(f"a reward must be finite, got {reward} for {cfg}")
        for depth in range(len(cfg) + 1):
            node = cfg[:depth]
            self.visits[node] = self.visits.get(node, 0) + 1
            self.totals[node] = self.totals.get(node, 0.0) + reward
        for group, choice in enumerate(cfg):
            self.shared_visits[group][choice] += 1
            self.shared_totals[group][choice] += reward
        self.low, self.high = min(self.low, reward), max(self.high, reward)

    def shared(self, group: int, choice: int) -> float:
        """Mean reward of every candidate with `choice` at `group`; the mean of all rewards when
        none had it (choice: an unseen choice is presumed average), 0 before any reward."""
        n = self.shared_visits[group][choice]
        if n:
            return self.shared_totals[group][choice] / n
        return self.totals[()] / self.visits[()] if self.visits.get(()) else 0.0

    def value(self, node: tuple) -> float:
        """The node's mean reward blended with its (group, choice) mean, weighted as `sharing`
        visits, scaled to [0, 1] by the rewards' range (0.5 before two different rewards)."""
        n, total = self.visits.get(node, 0), self.totals.get(node, 0.0)
        everything = self.totals[()] / self.visits[()] if self.visits.get(()) else 0.0
        # without communication an unvisited node is presumed average
        shared = self.shared(len(node) - 1, node[-1]) if self.sharing > 0 else everything
        raw = (total + self.sharing * shared) / (n + self.sharing) if n + self.sharing > 0 else shared
        return (raw - self.low) / (self.high - self.low) if self.high > self.low else 0.5

    def uct(self, node: tuple) -> float:
        """value + exploration * sqrt(ln(N + 1) / (n + 1)) with N the parent's visits (choice: the
        +1s give an unvisited node a finite bonus, so node communication can rank unvisited
        children instead of each being visited once first)."""
        parent = self.visits.get(node[:-1], 0)
        return self.value(node) + self.exploration * math.sqrt(math.log(parent + 1) / (self.visits.get(node, 0) + 1))

    # -- the tree's shape ----------------------------------------------------------------------
    def children(self, node: tuple) -> tuple:
        """The choices of the next group after `node` that lead to a feasible candidate: the node
        completed with the cheapest later choices is feasible (Problem.choices)."""
        if node not in self._children:
            depth, cheapest = len(node), self.problem.cheapest()
            options = self.problem.choices[depth]
            cfgs = np.array([node + (c,) + cheapest[depth + 1:] for c in options], dtype=np.int64)
            self._children[node] = tuple(c for c, ok in zip(options, self.problem.feasible(cfgs)) if ok)
        return self._children[node]

    def open_children(self, node: tuple) -> list:
        return [c for c in self.children(node) if node + (c,) not in self.closed]

    def close(self, cfg):
        """Mark a scored candidate closed, and each ancestor whose children all are."""
        node = tuple(int(c) for c in cfg)
        self.closed.add(node)
        while node and not self.open_children(node[:-1]):
            node = node[:-1]
            self.closed.add(node)

    def exhausted(self) -> bool:
        return () in self.closed

    # -- choosing ------------------------------------------------------------------------------
    def _pick(self, node, options, key, rng):
        values = np.array([key(node + (c,)) for c in options])
        best = np.flatnonzero(values == values.max())
        return options[best[rng.integers(len(best))]] if len(best) > 1 else options[best[0]]  # ties: at random

    def dive(self, node: tuple, rng: np.random.Generator, open_only: bool = True) -> tuple:
        """A full candidate below `node`, choosing each later group by UCT; `open_only`: among
        children not yet closed (the search: every dive a new candidate); else among all feasible
        ones (training: a configuration may be trained again)."""
        node = tuple(node)
        while len(node) < len(self.problem):
            options = self.open_children(node) if open_only else list(self.children(node))
            if not options:
                raise ConfigError(f"no open candidate below {node}: the tree is exhausted there")
            node = node + (self._pick(node, options, self.uct, rng),)
        return node

    def best_child(self, node: tuple, rng) -> int | None:
        """Hierarchical node selection: the open child with the highest UCT (choice: the paper takes
        the highest value; without the exploration term the descent committed to its first
        subtree and scored it exhaustively, thousands of queries on a 7-group synthetic problem)."""
        options = self.open_children(node)
        return self._pick(node, options, self.uct, rng) if options else None


@dataclass(frozen=True)
class TreeSearch:
    """The MCT-NAS search: rounds of hierarchical node selection until `queries` candidates are
    scored or the tree is exhausted. In a round, from the root down, every open child of the
    current node first gets `min_visits` visits (UCT dives below it, each scoring a new candidate),
    then the round descends into the child of highest value. `tree`: pass a MonteCarloTree that
    supernet training filled (rewards from losses) to start from its statistics."""
    queries: int = 1000
    # (choice) the paper gives no values; these had the fewest queries to the optimum of 8
    # synthetic separable problems among min_visits 1-2, exploration 0.2-1, sharing 0-10
    min_visits: int = 1
    exploration: float = 0.5
    sharing: float = 10.0

    def __post_init__(self):
        check_queries(self.queries)
        if isinstance(self.min_visits, bool) or not isinstance(self.min_visits, int) or self.min_visits < 1:
            raise ConfigError(f"min_visits must be a positive integer, got {self.min_visits!r}")
        _positive("exploration", self.exploration)
        _positive("sharing", self.sharing)

    def run(self, problem: Problem, rng: np.random.Generator, initial=(), *, tree: MonteCarloTree | None = None,
            on_round=None) -> Trace:
        """`initial`: candidates scored first (the feasible ones; e.g. the seeds), their rewards in
        the tree. `on_round(round, trace, tree)` after each descent."""
        tree = tree or MonteCarloTree(problem, self.exploration, self.sharing)
        if tree.problem is not problem:
            raise ConfigError("the tree was built for another problem")
        trace = Trace()

        def visit(cfg, round_):
            canonical = problem.canon(np.array([cfg]))[0]
            # (choice) another path to a network already scored is backed up with its score too
            tree.update(cfg, trace.query(problem, canonical, round_))
            tree.close(cfg)

        for cfg in initial:
            cfg = tuple(int(c) for c in cfg)
            if len(cfg) != len(problem) or any(c not in g for c, g in zip(cfg, problem.choices)):
                raise ConfigError(f"initial candidate {cfg} is not one of the problem's choices per group")
            if len(trace) < self.queries and problem.feasible(np.array([cfg]))[0]:
                visit(cfg, 0)

        round_ = 0
        while len(trace) < self.queries and not tree.exhausted():
            round_ += 1
            node = ()
            while len(node) < len(problem) and len(trace) < self.queries:
                for choice in tree.open_children(node):
                    child = node + (choice,)
                    while tree.visits.get(child, 0) < self.min_visits and child not in tree.closed \
                            and len(trace) < self.queries:
                        visit(tree.dive(child, rng), round_)
                choice = tree.best_child(node, rng)
                if choice is None:  # every candidate below was scored in this round
                    break
                node = node + (choice,)
            if on_round is not None:
                on_round(round_, trace, tree)
        return trace
