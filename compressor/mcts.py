"""MCT-NAS (METHOD section 8; Su et al., CVPR 2021): the search space as a Monte Carlo tree with one
level per group, a node per prefix of choices. Rewards (held-out scores in the search, training
losses during supernet training) are backed up along a candidate's path; nodes are chosen by UCT.
Node communication: every (group, choice) also keeps the mean reward of all candidates that made
that choice there, whatever came before, and a node's value is its own mean blended with it, so a
node few candidates passed through is judged by what its choice did elsewhere. Hierarchical node
selection (the search): from the root, give every open child of the current node a few visits,
then descend into the best one; each descent ends in new candidates.

`TreeSampler` is the supernet training sampler (method "mctnas", compressor/methods/mctnas.py).
Choices where the paper is silent are marked (choice)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .samplers import BCNetSampler, TrainingWindow
from .search import width_problem
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
    has in a node's value (0: no communication). `floor(cfgs) -> (B,) bool`: a lower bound a
    candidate must also meet (supernet training's window); a child is kept when its costliest
    completion meets it, and a node found to have no candidate between both bounds is "dead"."""

    def __init__(self, problem: Problem, exploration: float = 0.5, sharing: float = 10.0, floor=None):
        _positive("exploration", exploration)
        _positive("sharing", sharing)
        self.problem = problem
        self.floor = floor
        self.dead = set()
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

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a later draw depends on, as lists and numbers (a weights_only checkpoint);
        nodes in insertion order, so a restored tree breaks ties as the saved one did."""
        return {"nodes": [list(n) for n in self.visits], "visits": list(self.visits.values()),
                "totals": [self.totals[n] for n in self.visits],
                "shared_visits": [list(g.values()) for g in self.shared_visits],
                "shared_totals": [list(g.values()) for g in self.shared_totals],
                "closed": [list(n) for n in self.closed], "dead": [list(n) for n in self.dead],
                "low": self.low, "high": self.high}

    def load_state_dict(self, state: dict):
        if [len(g) for g in state["shared_visits"]] != [len(g) for g in self.problem.choices]:
            raise ConfigError("the tree statistics are of another search space (groups or choices differ)")
        nodes = [tuple(n) for n in state["nodes"]]
        self.visits, self.totals = dict(zip(nodes, state["visits"])), dict(zip(nodes, state["totals"]))
        self.shared_visits = [dict(zip(g, v)) for g, v in zip(self.problem.choices, state["shared_visits"])]
        self.shared_totals = [dict(zip(g, v)) for g, v in zip(self.problem.choices, state["shared_totals"])]
        self.closed = {tuple(n) for n in state["closed"]}
        self.dead = {tuple(n) for n in state["dead"]}
        self.low, self.high = state["low"], state["high"]

    # -- the tree's shape ----------------------------------------------------------------------
    def children(self, node: tuple) -> tuple:
        """The choices of the next group after `node` that lead to a feasible candidate: the node
        completed with the cheapest later choices is feasible (Problem.choices); with a floor, the
        one completed with the costliest later choices meets it too; dead nodes left out."""
        if node not in self._children:
            depth, cheapest = len(node), self.problem.cheapest()
            options = self.problem.choices[depth]
            cfgs = np.array([node + (c,) + cheapest[depth + 1:] for c in options], dtype=np.int64)
            ok = self.problem.feasible(cfgs)
            if self.floor is not None:
                costliest = tuple(group[-1] for group in self.problem.choices)
                ok &= self.floor(np.array([node + (c,) + costliest[depth + 1:] for c in options], dtype=np.int64))
            self._children[node] = tuple(c for c, keep in zip(options, ok) if keep)
        return tuple(c for c in self._children[node] if node + (c,) not in self.dead)

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
        start = node = tuple(node)
        while len(node) < len(self.problem):
            options = self.open_children(node) if open_only else list(self.children(node))
            if not options:
                if open_only or node == start:
                    raise ConfigError(f"no open candidate below {node}: the tree is exhausted there")
                # between two bounds (a floor) a prefix can have no candidate: never enter it again
                self.dead.add(node)
                node = start
                continue
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


# (choice) the reward's baseline: an exponential average of the step losses with this momentum
BASELINE_MOMENTUM = 0.9


def _unscored(cfg):
    raise ConfigError("the training tree scores nothing: its rewards come from the training losses")


class TreeSampler(BCNetSampler):
    """MCT-NAS supernet training: each step trains one configuration drawn by UCT from a
    MonteCarloTree over the search's choices (canonical bins per group), on `sides`; `observe`
    backs the step's training loss up its path. With a window, the tree keeps to it (the window's
    constraints as the tree's feasibility, its lower bound as the floor); where no draw can meet
    both, the window's random draw (BCNetSampler) is trained and backed up instead. The window's
    anchors are not used: the tree itself decides where the steps go.
    Reward (choice): (b - loss) / b with b an exponential average of the losses of the steps before
    (BASELINE_MOMENTUM): the loss falls as training goes on, so a raw -loss would favour whatever
    the late steps drew; relative to the recent average, a reward says how the configuration did
    against the ones trained around the same time."""
    method = "mctnas"

    def __init__(self, space, seed=0, window: TrainingWindow | None = None, sides=("left", "right"),
                 exploration: float = 0.5, sharing: float = 10.0):
        super().__init__(space, seed, complementary=False, window=window, sides=sides)
        problem = width_problem(space, (), _unscored)
        floor = None
        if window is not None:
            problem = dataclasses.replace(problem, feasible=window.feasible)
            floor = (lambda cfgs: window.cost(cfgs) >= window.low) if window.low > 0 else None
        self.problem = problem
        self.tree = MonteCarloTree(problem, exploration, sharing, floor=floor)
        self.baseline = None

    def random_cfg(self):
        """A UCT dive from the root (ties broken by a draw from the sampler's generator, so its state
        is the whole random state); the window's random draw where the tree has no candidate."""
        rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=self.generator)))
        try:
            return self.tree.dive((), rng, open_only=False)
        except ConfigError:  # every path is dead: the window holds no candidate the tree can reach
            return tuple(int(c) for c in self.problem.canon(np.array([super().random_cfg()]))[0])

    def observe(self, losses):
        """Back up one step's training losses [(loss, cfg, side)]: the mean over the sides of each
        configuration (under DDP, the mean over ranks: train_supernet all-reduces them, so every
        rank's tree stays the same)."""
        per_cfg = {}
        for loss, cfg, _ in losses:
            per_cfg.setdefault(tuple(int(c) for c in cfg), []).append(float(loss))
        for cfg, values in per_cfg.items():
            loss = sum(values) / len(values)
            if self.baseline is None:
                self.baseline = loss
            self.tree.update(self.problem.canon(np.array([cfg]))[0], (self.baseline - loss) / max(self.baseline, 1e-12))
            self.baseline = BASELINE_MOMENTUM * self.baseline + (1 - BASELINE_MOMENTUM) * loss

    def state_dict(self):
        return dict(super().state_dict(), tree=self.tree.state_dict(), baseline=self.baseline)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.tree.load_state_dict(state["tree"])
        self.baseline = state["baseline"]
