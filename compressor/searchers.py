"""Searchers behind one interface: a candidate is a vector of categorical choices, one per group (a
width bin per channel group, an operation per layer); a Problem gives the choices, a vectorised
feasibility test (the cost model: microseconds) and a score (the supernet, or a lookup table: the
expensive part, so a searcher is judged by how many scores it asks for).

`searcher.run(problem, rng, initial=...) -> Trace` for the evolution (METHOD section 6), random
search, and the Monte Carlo tree search (compressor.mcts). compressor.search builds the Problem of a
supernet and a budget; benchmarks/searchers.py builds one from NAS-Bench-Macro."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import ConfigError

_CHILD_TRIES = 10  # proposals per child slot before the slot is given up
DRAW_BATCH = 1000
DRAW_ROUNDS = 20


def _everything(cfgs):
    return np.ones(len(cfgs), dtype=bool)


@dataclass(frozen=True)
class Problem:
    """`choices[g]`: the values group g may take, cheapest first: a prefix completed with the first
    choice of every later group is its cheapest completion (true of widths, whose costs grow with
    every group's width), which lets the tree search keep to feasible paths. `feasible(cfgs)`: (B,)
    bool of a (B, G) int array. `score(cfg)`: higher is better. `canonical(cfgs)`: maps (B, G)
    configurations to one representative of each network (bins that keep the same channels), so
    no network is scored twice."""
    choices: tuple
    score: Callable[[tuple], float]
    feasible: Callable[[np.ndarray], np.ndarray] = _everything
    canonical: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self):
        choices = tuple(tuple(int(c) for c in group) for group in self.choices)
        if not choices or any(not group or len(set(group)) != len(group) for group in choices):
            raise ConfigError(f"a search problem needs at least one group and, per group, distinct choices; "
                              f"got {self.choices!r}")
        object.__setattr__(self, "choices", choices)

    def __len__(self):
        return len(self.choices)

    def canon(self, cfgs) -> np.ndarray:
        cfgs = np.asarray(cfgs, dtype=np.int64)
        return cfgs if self.canonical is None else self.canonical(cfgs)

    def cheapest(self) -> tuple:
        return tuple(group[0] for group in self.choices)

    def uniform(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """(count, G) configurations, each group's choice uniform over its choices."""
        sizes = np.array([len(g) for g in self.choices])
        table = np.zeros((len(self), sizes.max()), dtype=np.int64)
        for g, group in enumerate(self.choices):
            table[g, :len(group)] = group
        return table[np.arange(len(self)), (rng.random((count, len(self))) * sizes).astype(np.int64)]


@dataclass
class Trace:
    """Every candidate a searcher scored, in order, with the round that proposed it (a generation,
    or a tree descent), and the score cache: `query` scores a candidate once."""
    cfgs: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    seen: dict = field(default_factory=dict)  # cfg -> score

    def query(self, problem: Problem, cfg, round_: int = 0) -> float:
        cfg = tuple(int(c) for c in cfg)
        if cfg not in self.seen:
            self.seen[cfg] = float(problem.score(cfg))
            self.cfgs.append(cfg)
            self.scores.append(self.seen[cfg])
            self.rounds.append(round_)
        return self.seen[cfg]

    def __len__(self):
        return len(self.cfgs)

    def best(self) -> tuple:
        """(cfg, score) of the best scored candidate; ties keep the first scored."""
        if not self.cfgs:
            raise ConfigError("no candidate was scored: the search had no feasible candidate or no queries")
        i = int(np.argmax(self.scores))
        return self.cfgs[i], self.scores[i]


def draw_distinct(problem: Problem, count: int, rng, draw=None, exclude=()) -> list:
    """Up to `count` distinct feasible canonical configurations not in `exclude`, from rounds of
    `draw(n, rng)` (default: uniform)."""
    draw = draw or problem.uniform
    chosen = {}
    for _ in range(DRAW_ROUNDS):
        cfgs = problem.canon(draw(max(DRAW_BATCH, 20 * count), rng))
        for cfg in cfgs[problem.feasible(cfgs)]:
            cfg = tuple(int(c) for c in cfg)
            if cfg not in exclude:
                chosen.setdefault(cfg)
                if len(chosen) == count:
                    return list(chosen)
    return list(chosen)


def _best(trace: Trace, k: int) -> list:
    """The k best-scoring candidates; the sort is stable: ties keep the first scored."""
    return sorted(trace.seen, key=trace.seen.get, reverse=True)[:k]


def check_queries(queries):
    if queries is not None and (isinstance(queries, bool) or not isinstance(queries, int) or queries < 1):
        raise ConfigError(f"queries must be a positive integer or None, got {queries!r}")


@dataclass(frozen=True)
class RandomSearch:
    """Distinct feasible candidates drawn uniformly, `queries` of them (fewer when the draws find no
    more): the baseline every searcher must beat."""
    queries: int = 1000

    def __post_init__(self):
        check_queries(self.queries)

    def run(self, problem: Problem, rng: np.random.Generator, initial=()) -> Trace:
        trace = Trace()
        for cfg in initial:
            if len(trace) < self.queries:
                trace.query(problem, cfg)
        stale = 0
        while len(trace) < self.queries and stale < DRAW_ROUNDS:
            before = len(trace)
            cfgs = problem.canon(problem.uniform(DRAW_BATCH, rng))
            for cfg in cfgs[problem.feasible(cfgs)]:
                if len(trace) < self.queries:
                    trace.query(problem, cfg, len(trace))
            stale = stale + 1 if len(trace) == before else 0
        return trace


@dataclass(frozen=True)
class Evolution:
    """METHOD section 6: an initial population, then per generation `mutations` mutations (each gene
    redrawn with probability `mutation_prob`) and `crossovers` uniform crossovers of two of the
    `top_k` best so far; every child distinct, feasible and never scored before (up to
    _CHILD_TRIES proposals per child). `queries`: stop after that many scores (None: run every
    generation)."""
    population: int = 50
    generations: int = 40
    top_k: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    queries: int | None = None

    def __post_init__(self):
        check_queries(self.queries)

    @classmethod
    def scaled(cls, effort: float = 1.0, **kwargs) -> "Evolution":
        """The defaults scaled by `effort`, each kept above a floor that still evolves."""
        return cls(population=max(8, round(50 * effort)), generations=max(3, round(40 * effort)),
                   top_k=max(3, round(10 * effort)), mutations=max(4, round(25 * effort)),
                   crossovers=max(4, round(25 * effort)), **kwargs)

    def run(self, problem: Problem, rng: np.random.Generator, initial=None, *, redraw=None, mutate=None,
            on_round=None, select=None) -> Trace:
        """`initial`: the first population (default: distinct feasible uniform draws). `redraw(n, rng)`:
        where a mutated gene is drawn from (default: uniform; the search's prior). `mutate(parent,
        rng)`: replaces the whole mutation (the search's local moves). `on_round(generation, trace,
        top)` after each generation. `select(trace, k)`: the k parents of the next generation
        (default: the k best scores; pareto.select: non-dominated sorting on score and a cost).
        Proposals are mapped to their canonical form."""
        redraw = redraw or problem.uniform
        trace, top = Trace(), []

        def default_mutate(parent, rng):
            genes = rng.random(len(parent)) < self.mutation_prob
            return np.where(genes, redraw(1, rng)[0], parent)

        def mutation(rng):
            parent = np.array(top[rng.integers(len(top))])
            return (mutate or default_mutate)(parent, rng)

        def crossover(rng):
            a, b = rng.choice(len(top), size=2, replace=False)
            return np.where(rng.random(len(problem)) < 0.5, top[a], top[b])

        candidates = list(initial) if initial is not None else draw_distinct(problem, self.population, rng)
        for generation in range(self.generations):
            if generation > 0:
                candidates = self._children(problem, self.mutations, mutation, trace.seen, rng)
                if len(top) > 1:
                    candidates += self._children(problem, self.crossovers, crossover,
                                                 trace.seen.keys() | set(candidates), rng)
            for cfg in candidates:
                if self.queries is not None and len(trace) >= self.queries:
                    return trace
                trace.query(problem, cfg, generation)
            top = (select or _best)(trace, self.top_k)
            if on_round is not None:
                on_round(generation, trace, top)
        return trace

    @staticmethod
    def _children(problem, count, make, scored, rng) -> list:
        """Up to `count` new feasible canonical configurations, never scored before; `make(rng)`
        proposes one, and each slot gets _CHILD_TRIES proposals."""
        children = {}
        for _ in range(count):
            for _ in range(_CHILD_TRIES):
                cfg = tuple(int(c) for c in problem.canon(np.asarray(make(rng))[None])[0])
                if cfg not in scored and cfg not in children and problem.feasible(np.array([cfg]))[0]:
                    children[cfg] = None
                    break
        return list(children)


# -- multi-objective selection (a score up, a cost down) -------------------------------------------
def dominated(scores, costs) -> np.ndarray:
    """(B, B) bool: [i, j] when candidate i dominates j: a score at least as high and a cost at most as
    high, one of them strictly. Equal candidates do not dominate each other."""
    s, c = np.asarray(scores, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    no_worse = (s[:, None] >= s[None]) & (c[:, None] <= c[None])
    return no_worse & ((s[:, None] > s[None]) | (c[:, None] < c[None]))


def pareto_ranks(scores, costs) -> np.ndarray:
    """(B,) int: non-dominated sorting (NSGA-II): rank 0 is the front, rank r what only ranks < r
    dominate. O(B^2) memory: a few thousand candidates at most, as a search scores."""
    beats = dominated(scores, costs)
    ranks = np.full(len(beats), -1)
    left, rank = np.ones(len(beats), dtype=bool), 0
    while left.any():
        front = left & ~beats[left].any(0)
        ranks[front], left, rank = rank, left & ~front, rank + 1
    return ranks


def crowding(scores, costs) -> np.ndarray:
    """(B,) NSGA-II's crowding distance of candidates of one front: per objective, the gap between a
    candidate's two neighbours over the objective's range, summed; the ends get infinity, so the
    cheapest and the best are always kept."""
    distance = np.zeros(len(scores))
    for values in (np.asarray(scores, dtype=np.float64), np.asarray(costs, dtype=np.float64)):
        order = np.argsort(values, kind="stable")
        span = values[order[-1]] - values[order[0]]
        distance[order[[0, -1]]] = np.inf
        if len(values) > 2 and span > 0:
            distance[order[1:-1]] += (values[order[2:]] - values[order[:-2]]) / span
    return distance


@dataclass(frozen=True)
class ParetoSelection:
    """Evolution.run's `select` for two objectives, the score up and `cost(cfgs)` down (vectorised):
    NSGA-II's survivor selection (choice: plain NSGA-II, no archive or reference points): the k
    parents are the candidates of the lowest ranks, the last rank that does not fit whole cut by
    crowding distance (the most isolated first), so the parents spread along the front."""
    cost: Callable[[np.ndarray], np.ndarray]

    def __call__(self, trace: Trace, k: int) -> list:
        cfgs = list(trace.seen)
        scores = np.array([trace.seen[c] for c in cfgs])
        costs = np.asarray(self.cost(np.array(cfgs)), dtype=np.float64)
        ranks = pareto_ranks(scores, costs)
        spread = np.zeros(len(cfgs))
        for rank in np.unique(ranks):
            members = ranks == rank
            spread[members] = crowding(scores[members], costs[members])
        order = np.lexsort((-spread, ranks))  # by rank, then the most isolated first
        return [cfgs[i] for i in order[:k]]
