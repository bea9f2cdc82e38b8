"""The searchers behind one interface (evolution, random search, Monte Carlo tree search) on
synthetic problems whose optimum is known by enumerating every candidate."""
import itertools

import numpy as np
import pytest

from compressor.errors import ConfigError
from compressor.mcts import MonteCarloTree, TreeSearch
from compressor.searchers import Evolution, ParetoSelection, Problem, RandomSearch, crowding, dominated, pareto_ranks

GROUPS, CHOICES = 7, 4


def separable(seed=0, limit=0.55, groups=GROUPS, choices=CHOICES):
    """score = sum of a per-(group, choice) gain; cost grows with every choice (cheapest first);
    the limit cuts off the widest candidates, so the optimum is a trade-off. Returns the problem,
    every candidate and their scores and feasibility."""
    rng = np.random.default_rng(seed)
    gain = np.sort(rng.random((groups, choices)), axis=1) * rng.random((groups, 1)) * 3  # wider scores more
    weight = rng.random((groups, 1)) + 0.2
    price = weight * np.arange(choices) / (choices - 1)
    rows = np.arange(groups)
    full = price[:, -1].sum()

    def feasible(cfgs):
        return price[rows, np.asarray(cfgs)].sum(-1) <= limit * full

    def score(cfg):
        return float(gain[rows, list(cfg)].sum())

    problem = Problem([range(choices)] * groups, score, feasible)
    every = np.array(list(itertools.product(range(choices), repeat=groups)))
    return problem, every, gain[rows, every].sum(-1), feasible(every)


def queries_to_optimum(trace, best):
    hits = [i for i, s in enumerate(trace.scores) if s >= best - 1e-12]
    return hits[0] + 1 if hits else float("inf")


SEARCHERS = {"tree": TreeSearch(queries=300), "evolution": Evolution(population=20, generations=30, top_k=5,
                                                                      mutations=10, crossovers=10, queries=300),
             "random": RandomSearch(queries=300)}


@pytest.mark.parametrize("name", SEARCHERS)
def test_searchers_score_only_distinct_feasible_candidates_and_are_deterministic(name):
    problem, _, _, _ = separable(seed=1)
    runs = [SEARCHERS[name].run(problem, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    trace = runs[0]
    # the evolution stops short when its children repeat what it scored (a converged population)
    assert (len(trace) <= 300 if name == "evolution" else len(trace) == 300) and len(set(trace.cfgs)) == len(trace)
    assert problem.feasible(np.array(trace.cfgs)).all()
    assert trace.scores == [problem.score(c) for c in trace.cfgs]
    assert runs[0].cfgs == runs[1].cfgs and runs[0].cfgs != runs[2].cfgs
    cfg, score = trace.best()
    assert score == max(trace.scores) and problem.feasible(np.array([cfg]))[0]


def test_the_tree_search_reaches_the_optimum_in_far_fewer_queries_than_random_search():
    counts = {"tree": [], "random": []}
    for seed in range(6):
        problem, _, scores, ok = separable(seed=seed)
        best = scores[ok].max()
        for name, searcher in (("tree", TreeSearch(queries=3000)), ("random", RandomSearch(queries=3000))):
            counts[name].append(queries_to_optimum(searcher.run(problem, np.random.default_rng(seed)), best))
    assert all(np.isfinite(counts["tree"])), counts
    # random search needs about half the feasible candidates (thousands); the tree a few hundred
    assert np.median(counts["tree"]) * 5 < np.median(counts["random"]), counts


def test_uct_visits_concentrate_on_the_better_choices():
    # groups 0 and 1 decide most of the score, choice 3 best; the other groups add a little noise
    gain = np.zeros((GROUPS, CHOICES))
    gain[:2] = [0.0, 1.0, 2.0, 4.0]
    gain[2:] = np.random.default_rng(0).random((GROUPS - 2, CHOICES)) * 0.5
    problem = Problem([range(CHOICES)] * GROUPS, lambda cfg: float(gain[np.arange(GROUPS), list(cfg)].sum()))
    tree = MonteCarloTree(problem)
    TreeSearch(queries=300).run(problem, np.random.default_rng(0), tree=tree)
    for node in [(), (3,)]:
        visits = [tree.visits.get(node + (c,), 0) for c in range(CHOICES)]
        assert visits[3] > sum(visits[:3]), (node, visits)


def test_node_communication_shares_rewards_across_nodes_with_the_same_choice():
    problem, _, _, _ = separable(limit=1.0)
    tree = MonteCarloTree(problem, sharing=2.0)
    rest = (0,) * (GROUPS - 2)
    tree.update((0, 2) + rest, 1.0)
    tree.update((1, 2) + rest, 0.6)
    tree.update((1, 0) + rest, 0.0)
    # (3, 2) was never visited: its value is what choice 2 of group 1 earned elsewhere, mean 0.8
    assert tree.visits.get((3, 2), 0) == 0 and tree.value((3, 2)) == pytest.approx(0.8)
    # a visited node blends its own mean (0.6) with the shared one (0.8) as 2 visits' weight
    assert tree.value((1, 2)) == pytest.approx((0.6 + 2 * 0.8) / 3)
    # no communication: an unvisited node knows only the mean of everything (1.6 / 3)
    alone = MonteCarloTree(problem, sharing=0.0)
    for cfg, reward in (((0, 2) + rest, 1.0), ((1, 2) + rest, 0.6), ((1, 0) + rest, 0.0)):
        alone.update(cfg, reward)
    assert alone.value((3, 2)) == pytest.approx(1.6 / 3) and alone.value((1, 2)) == pytest.approx(0.6)


def test_the_tree_scores_every_feasible_candidate_once_then_stops():
    problem, every, _, ok = separable(seed=3, groups=4, choices=3, limit=0.5)
    trace = TreeSearch(queries=10_000).run(problem, np.random.default_rng(0))
    assert sorted(trace.cfgs) == sorted(map(tuple, every[ok].tolist()))


def test_hierarchical_selection_visits_every_child_then_descends_into_the_best():
    problem, _, _, _ = separable(seed=4, limit=1.0)
    tree = MonteCarloTree(problem, exploration=0.0)
    seen = []
    TreeSearch(queries=40, min_visits=2, exploration=0.0).run(
        problem, np.random.default_rng(0), tree=tree, on_round=lambda r, trace, tree: seen.append(list(trace.cfgs)))
    first = seen[0]
    # the first round: 2 candidates under each root child, then under the best root child 2 under
    # each of its children, and so on down: every candidate after the first 8 starts with that child
    assert sorted(c[0] for c in first[:8]) == [0, 0, 1, 1, 2, 2, 3, 3]
    best = max(range(CHOICES), key=lambda c: np.mean([problem.score(x) for x in first[:8] if x[0] == c]))
    assert all(c[0] == best for c in first[8:]) and len(first) > 8


def test_canonical_networks_are_scored_once():
    problem, _, _, _ = separable(seed=5, groups=4, choices=3, limit=1.0)
    # choices 1 and 2 of group 0 are the same network
    merged = Problem(problem.choices, problem.score, problem.feasible,
                     canonical=lambda cfgs: np.where(np.arange(4) == 0, np.minimum(cfgs, 1), cfgs))
    for searcher in (TreeSearch(queries=1000), Evolution(population=8, queries=1000), RandomSearch(queries=1000)):
        trace = searcher.run(merged, np.random.default_rng(0))
        assert all(c[0] <= 1 for c in trace.cfgs) and len(set(trace.cfgs)) == len(trace)


def test_bad_input_is_refused_with_the_reason():
    problem, _, _, _ = separable()
    with pytest.raises(ConfigError, match="distinct choices"):
        Problem([[0, 0, 1]], problem.score)
    with pytest.raises(ConfigError, match="at least one group"):
        Problem([], problem.score)
    with pytest.raises(ConfigError, match="queries must be a positive integer"):
        TreeSearch(queries=0)
    with pytest.raises(ConfigError, match="min_visits"):
        TreeSearch(min_visits=0)
    with pytest.raises(ConfigError, match="exploration"):
        TreeSearch(exploration=-1)
    with pytest.raises(ConfigError, match="the cheapest one"):
        MonteCarloTree(Problem([[1, 2]], problem.score, lambda cfgs: np.zeros(len(cfgs), bool)))
    with pytest.raises(ConfigError, match="not one of the problem's choices"):
        TreeSearch(queries=5).run(problem, np.random.default_rng(0), initial=[(9,) * GROUPS])
    with pytest.raises(ConfigError, match="reward must be finite"):
        MonteCarloTree(problem).update((0,) * GROUPS, float("nan"))


def test_the_tree_search_pairs_with_a_supernet_search():
    """search() on a trained BCNet-style supernet with the tree searcher instead of the evolution:
    the budget holds, the seed is scored first, and the scores are the supernet's."""
    import copy

    import compressor as cz
    from compressor.search import constraints, score, search, uniform_baseline
    from test_search import tiny_cnn, make_data, BINS
    from torch.utils.data import DataLoader
    import torch

    torch.manual_seed(0)
    model = tiny_cnn()
    space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=BINS, divisor=1)
    net = cz.supernet(copy.deepcopy(model), space)
    calib, val = DataLoader(make_data(64, seed=2), batch_size=32), DataLoader(make_data(64, seed=3), batch_size=32)
    seed_cfg = uniform_baseline(space, "flops<=60%")
    found = search(net, "flops<=60%", calib, val, calib_batches=1, progress=False, seeds=[seed_cfg],
                   searcher=TreeSearch(queries=12))
    limit = constraints(space, "flops<=60%")[0].limit
    assert len(found.history) == 12 and found.history[0].cfg == seed_cfg
    assert all(space.flops(e.cfg) <= limit for e in found.history)
    assert found.score == max((e.score_left + e.score_right) / 2 for e in found.history)
    assert found.score_left == score(net, found.cfg, "left", val, calib, calib_batches=1)


# -- multi-objective selection ---------------------------------------------------------------------
def test_non_dominated_sorting_matches_its_definition():
    """On points with ties in either objective: rank 0 is exactly the points no other dominates, and
    every point of rank r > 0 is dominated by one of rank r - 1 and by none of rank r or more."""
    rng = np.random.default_rng(0)
    scores, costs = rng.integers(0, 6, 60).astype(float), rng.integers(0, 6, 60).astype(float)
    ranks = pareto_ranks(scores, costs)
    beats = np.array([[s1 >= s2 and c1 <= c2 and (s1 > s2 or c1 < c2) for s2, c2 in zip(scores, costs)]
                      for s1, c1 in zip(scores, costs)])
    assert np.array_equal(dominated(scores, costs), beats)
    assert np.array_equal(ranks == 0, ~beats.any(0))
    for j in np.flatnonzero(ranks > 0):
        assert beats[ranks == ranks[j] - 1, j].any() and not beats[ranks >= ranks[j], j].any()
    twins = pareto_ranks([1.0, 1.0], [2.0, 2.0])
    assert list(twins) == [0, 0]  # equal points do not dominate each other


def test_crowding_keeps_the_ends_and_prefers_isolated_points():
    distance = crowding([0.1, 0.5, 0.55, 0.9], [1.0, 5.0, 5.5, 9.0])
    assert np.isinf(distance[[0, 3]]).all() and distance[1] > 0 and distance[2] > 0
    assert crowding([0.3], [2.0])[0] == np.inf


def test_the_evolution_with_pareto_selection_spreads_its_parents_along_the_front():
    """On the separable problem with cost = price: the parents are the front first, its ends
    included; the scored candidates reach the cheapest candidate and ones near the best score."""
    problem, every, scores, ok = separable(limit=1.0)
    rows = np.arange(GROUPS)
    price = np.cumsum(np.ones((GROUPS, CHOICES)), axis=1) - 1  # cost: the sum of choices

    def cost(cfgs):
        return price[rows, np.asarray(cfgs)].sum(-1)

    select = ParetoSelection(cost)
    tops = []
    trace = Evolution(population=20, generations=15, top_k=20).run(
        problem, np.random.default_rng(0), [problem.cheapest()] + [tuple(c) for c in every[-1:]], select=select,
        on_round=lambda g, trace, top: tops.append(top))
    cfgs = np.array(trace.cfgs)
    ranks = pareto_ranks(trace.scores, cost(cfgs))
    front = {tuple(c) for c in cfgs[ranks == 0]}
    last = tops[-1]
    assert set(last[:len(front)]) == front if len(front) <= 20 else set(last) <= front
    assert problem.cheapest() in front and max(trace.scores) == scores.max()  # both ends: the seeds
    assert select(trace, 3)[0] in front and len(select(trace, 3)) == 3
