"""BN recalibration, scoring, budget constraints, the prior and the evolutionary search, on a tiny
CNN trained for a few seconds on a learnable synthetic task."""
import copy
import datetime
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compressor as cz
from compressor.errors import ConfigError, InfeasibleBudgetError
from compressor.search import (constraints, expected_cost, fit_prior, pareto_search, recalibrate_bn, score, search,
                               uniform_baseline)
from conftest import assert_unchanged, snapshot

BINS = 10
CLASSES = 4


def tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))


def make_data(n, seed):
    """Each class is a fixed random 16x16 pattern; samples are a scaled pattern plus noise."""
    templates = torch.randn(CLASSES, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.5 * templates[y] + torch.randn(n, 3, 16, 16, generator=g)
    return TensorDataset(x, y)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a shared, busy machine a second intra-op thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    """A briefly trained supernet (full width plus a random configuration on both sides per step),
    so that subnets are better than chance and wider ones better than thinner ones."""
    torch.manual_seed(0)
    model = tiny_cnn()
    space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=BINS, divisor=1)
    net = cz.supernet(model, space).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(2):
        for x, y in DataLoader(make_data(1024, seed=1), batch_size=64, shuffle=True):
            optimiser.zero_grad()
            cfg = space.random(rng)
            for set_width in (net.full, lambda: net.set(cfg, "left"), lambda: net.set(cfg, "right")):
                set_width()
                nn.functional.cross_entropy(net(x), y).backward()
            optimiser.step()
    model.eval()
    calib = DataLoader(make_data(128, seed=2), batch_size=32)
    val = DataLoader(make_data(128, seed=3), batch_size=32)
    return model, space, calib, val


@pytest.fixture
def net(trained):
    model, space, _, _ = trained
    return cz.supernet(copy.deepcopy(model), space)


def all_configs(space):
    return np.stack(np.meshgrid(*[np.arange(lo, hi + 1) for lo, hi in zip(space.min_bins, space.max_bins)],
                                indexing="ij"), -1).reshape(-1, len(space))


def accuracy(model, data):
    with torch.no_grad():
        hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in data)
    return hits / sum(len(y) for _, y in data)


# -- scoring ---------------------------------------------------------------------------------------
def test_space_shape(trained):
    _, space, _, _ = trained
    assert len(space) == 2 and sorted(space.sizes) == [16, 32]


def test_recalibration_changes_statistics_and_score_restores_them(net, trained):
    _, space, calib, val = trained
    bn = net.model[1]
    before = bn.running_mean.clone()
    cfg = tuple(3 if g.size == 16 else 5 for g in space.groups)  # bin 3 of 16 channels keeps 5
    recalibrate_bn(net, cfg, "right", calib, batches=2)
    assert not torch.allclose(bn.running_mean, before)
    assert bn.momentum == 0.1 and not bn.training and int(bn.num_batches_tracked) == 2
    # the right window of 5 of 16 channels: the left ones saw only zeros
    assert torch.all(bn.running_mean[:11] == 0) and torch.all(bn.running_mean[11:] != 0)

    net.set((4, 4), "left")
    net.model.train()
    state = snapshot(net.model)
    s = score(net, cfg, "left", val, calib, calib_batches=2)  # other statistics than the current ones
    assert 0 <= s <= 1
    assert_unchanged(net.model, state)
    assert (net.cfg, net.side) == ((4, 4), "left")


def test_score_equals_accuracy_of_the_slimmed_model(trained):
    model, space, calib, val = trained
    model = copy.deepcopy(model)
    net = cz.supernet(model, space)  # shares the model's tensors: recalibration reaches the model
    cfg, side = (6, 3), "right"
    recalibrate_bn(net, cfg, side, calib, batches=3)
    small = cz.slim(model, space, cfg, side).eval()
    assert sum(p.numel() for p in small.parameters()) == space.params(cfg)
    expected = accuracy(small, val)
    assert 0.3 < expected < 1  # the task is learnt but not saturated: the comparison means something
    assert score(net, cfg, side, val, calib, calib_batches=3) == pytest.approx(expected, abs=1.5 / 128)
    # the full model scores better than a thin subnet: scores carry signal
    assert score(net, space.max(), "left", val, calib, calib_batches=3) > score(net, space.min(), "left", val, calib,
                                                                               calib_batches=3)


def _rank_records(space, rank):
    """Each trainer rank keeps its own records: here rank 0's say the wider the better, rank 1's
    the narrower."""
    return [(float(2 * BINS - c.sum() if rank == 0 else c.sum()) / BINS, tuple(c), "left") for c in all_configs(space)]


def _distributed_worker(rank, world, folder, model, space):
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))  # fail, not hang
    try:
        net = cz.supernet(model, space)
        # each rank calibrates on its own half of the data: statistics are averaged over ranks
        calib = DataLoader(make_data(128, seed=2), batch_size=32)
        shard = [b for i, b in enumerate(calib) if i % world == rank]
        # batches this rank does not own carry wrong labels: they must never be scored here
        val = [(x, y if i % world == rank else (y + 1) % CLASSES)
               for i, (x, y) in enumerate(DataLoader(make_data(128, seed=3), batch_size=32))]
        s = score(net, (6, 3), "left", val, shard, calib_batches=2)
        found = search(net, "flops<=50%", calib, val, records=_rank_records(space, rank), effort=0.1,
                       calib_batches=1, max_val_batches=2, progress=False)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump({"score": s, "search": found.to_dict()}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_ranks_agree_with_a_single_process(trained, tmp_path):
    model, space, calib, val = trained
    # fork, as DataLoader workers do: a spawned child would spend most of the test importing torch
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path), copy.deepcopy(model), space), nprocs=2,
                       start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    single = score(cz.supernet(copy.deepcopy(model), space), (6, 3), "left", val, calib, calib_batches=4)
    assert results[0]["score"] == results[1]["score"] == pytest.approx(single, abs=1.5 / 128)
    # the ranks searched in lockstep on rank 0's prior, each scoring half of the batches: exactly
    # what one process with rank 0's records finds
    alone = search(cz.supernet(copy.deepcopy(model), space), "flops<=50%", calib, val, records=_rank_records(space, 0),
                   effort=0.1, calib_batches=1, max_val_batches=2, progress=False)
    assert results[0]["search"] == results[1]["search"] == json.loads(json.dumps(alone.to_dict()))


# -- budgets ---------------------------------------------------------------------------------------
def test_infeasible_budget_names_the_smallest_cost(trained):
    _, space, _, _ = trained
    smallest = space.params(space.min())
    assert 100 < smallest < 1000
    with pytest.raises(InfeasibleBudgetError,
                       match=f"params<=100 needs <= 100 params but the smallest configuration costs {smallest} params"):
        constraints(space, "params<=100")
    with pytest.raises(InfeasibleBudgetError, match="flops<=0.1%"):
        uniform_baseline(space, "flops<=0.1%")


def test_latency_budget_needs_a_latency_model(trained):
    _, space, _, _ = trained
    with pytest.raises(ConfigError, match="latency model"):
        constraints(space, "latency<=3ms@ort-cpu")


@pytest.mark.parametrize("budget", ["flops<=50%", "params<=30%", "flops<=80%,params<=40%", "flops<=100%"])
def test_uniform_baseline_is_the_widest_feasible(trained, budget):
    _, space, _, _ = trained
    bounds = constraints(space, budget)
    cfg = uniform_baseline(space, budget)
    assert len(set(cfg)) == 1
    assert all(getattr(space, b.metric)(cfg) <= b.limit for b in bounds)
    wider = cfg[0] + 1
    assert wider > BINS or any(getattr(space, b.metric)((wider,) * len(space)) > b.limit for b in bounds)


# -- the prior -------------------------------------------------------------------------------------
class Residual(nn.Module):
    """The second conv's input and output are the same group (tied by the add): its expected cost
    needs the variance term."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12))
        self.block = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12))
        self.head = nn.Sequential(nn.Conv2d(12, 20, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(20, 3))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.block(x))


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_expected_cost_is_exact(metric):
    space = cz.analyze(Residual(), torch.randn(1, 3, 8, 8), bins=BINS, divisor=1)
    cost = getattr(space, metric)
    assert np.any(space.cost.flop_out_m * space.cost.flop_in_m)  # a layer whose out and in share a group
    rng = np.random.default_rng(0)
    # one-hot P: the exact cost of that configuration
    for _ in range(5):
        cfg = space.random(rng)
        onehot = np.zeros((len(space), BINS + 1))
        onehot[np.arange(len(space)), cfg] = 1
        assert float(expected_cost(space, torch.tensor(onehot), metric)) == pytest.approx(cost(cfg), rel=1e-12)
    # random P: the Monte-Carlo mean, within 4 standard errors
    probs = rng.dirichlet(np.ones(BINS), size=len(space))
    probs = np.concatenate([np.zeros((len(space), 1)), probs], axis=1)
    samples = np.stack([rng.choice(BINS + 1, size=200_000, p=p) for p in probs], axis=1)
    costs = cost(samples)
    exact = float(expected_cost(space, torch.tensor(probs), metric))
    assert abs(exact - costs.mean()) < 4 * costs.std() / np.sqrt(len(costs))


def test_prior_concentrates_on_low_loss_bins(trained):
    _, space, _, _ = trained
    configs = all_configs(space)
    # loss lowest at bins (7, 4); the budget is exactly that configuration's FLOPs
    records = [(float(abs(c[0] - 7) + abs(c[1] - 4)) / 10, tuple(c), "left") for c in configs]
    target = space.flops((7, 4)) / space.flops(space.max())
    prior = fit_prior(space, records, f"flops<={100 * target:.6f}%", steps=300, lr=0.1)
    assert prior.shape == (2, BINS + 1) and np.allclose(prior.sum(1), 1) and np.all(prior[:, 0] == 0)
    assert tuple(prior.argmax(1)) == (7, 4) and prior[0, 7] > 0.5 and prior[1, 4] > 0.5

    # loss falls with width; the budget caps it: the expected cost settles at the budget
    records = [(float(2 * BINS - c.sum()) / BINS, tuple(c), "left") for c in configs]
    for budget, metric in (("flops<=40%", "flops"), ("params<=60%", "params")):
        limit = constraints(space, budget)[0].limit
        prior = fit_prior(space, records, budget, steps=300, lr=0.1)
        assert float(expected_cost(space, torch.tensor(prior), metric)) == pytest.approx(limit, rel=0.05)


def test_prior_needs_records_of_this_space(trained):
    _, space, _, _ = trained
    with pytest.raises(ConfigError, match="records"):
        fit_prior(space, [(1.0, (3, 4, 5), "left")], "flops<=50%")


# -- the search ------------------------------------------------------------------------------------
def _budgets(space):
    """(budget text, {metric: absolute limit}, primary metric): one or two feasible constraints,
    relative or absolute, with the limits worked out here rather than by the code under test."""
    full = {m: getattr(space, m)(space.max()) for m in ("flops", "params")}
    least = {m: getattr(space, m)(space.min()) / full[m] for m in full}

    def constraint(metric, relative, fraction):
        if relative:
            percent = round(100 * fraction, 4)
            return f"{metric}<={percent}%", full[metric] * percent / 100
        value = round(fraction * full[metric])
        return f"{metric}<={value}", value

    def case(parts):
        rendered = [constraint(*p) for p in parts]
        return ",".join(t for t, _ in rendered), {p[0]: lim for p, (_, lim) in zip(parts, rendered)}, parts[0][0]

    def part(metric):
        return st.tuples(st.just(metric), st.booleans(), st.floats(least[metric] * 1.05, 1.0))

    orders = st.sampled_from([("flops",), ("params",), ("flops", "params"), ("params", "flops")])
    return orders.flatmap(lambda ms: st.tuples(*map(part, ms))).map(case)


def test_search_respects_every_constraint_and_the_window(trained):
    model, space, calib, val = trained
    net = cz.supernet(copy.deepcopy(model), space)
    configs = all_configs(space)

    @settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=_budgets(space), seed=st.integers(0, 100))
    def check(case, seed):
        budget, limits, primary = case
        result = search(net, budget, calib, val, effort=0.1, seed=seed, calib_batches=1, max_val_batches=1,
                        progress=False)
        assert result.limits == pytest.approx(limits)
        for e in result.history:
            assert all(getattr(space, m)(e.cfg) <= limit for m, limit in limits.items())
            assert (e.flops, e.params) == (space.flops(e.cfg), space.params(e.cfg))
        assert len({e.cfg for e in result.history}) == len(result.history)  # every candidate distinct
        assert all(result.costs[m] <= limit for m, limit in limits.items())
        assert result.score == max((e.score_left + e.score_right) / 2 for e in result.history)
        # the initial population: a full population inside the window, or every in-window config
        fits = np.all([getattr(space, m)(configs) <= limit for m, limit in limits.items()], axis=0)
        window = {tuple(c) for c in configs[fits & (getattr(space, primary)(configs) >= 0.8 * limits[primary])]}
        first = {e.cfg for e in result.history if e.generation == 0}
        if len(window) >= 8:
            assert first <= window and len(first) == 8
        else:
            assert window <= first

    check()


def test_search_is_reproducible(trained, net):
    _, space, calib, val = trained
    run = lambda seed: search(net, "flops<=50%", calib, val, effort=0.1, seed=seed, calib_batches=1,  # noqa: E731
                              max_val_batches=2, progress=False)
    a, b, c = run(0), run(0), run(1)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert [e.cfg for e in a.history] != [e.cfg for e in c.history]
    left, right = a.score_left, a.score_right
    assert a.side == ("left" if left >= right else "right") and a.score == (left + right) / 2
    assert a.limits == {"flops": pytest.approx(0.5 * space.flops(space.max()))}


def test_collapsed_bins_are_never_scored_twice(trained):
    """With divisor 8, groups of 16 and 32 channels have 2 and 4 distinct widths among 10 bins:
    the search must score distinct networks, not distinct bin vectors."""
    model, _, calib, val = trained
    space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=BINS, divisor=8)
    from compressor.search import canonical_bins
    canon = canonical_bins(space)
    for g in range(len(space)):
        for c in range(1, BINS + 1):
            assert space.width_table[g, canon[g, c]] == space.width_table[g, c] and canon[g, c] <= c
    result = cz.search(cz.supernet(copy.deepcopy(model), space), "flops<=90%", calib, val, effort=0.1,
                       progress=False)
    networks = [tuple(space.channels(e.cfg)) for e in result.history]
    assert len(networks) == len(set(networks)) > 1


# -- seeds of the population, the loss score, global importance ------------------------------------
def test_loss_score_is_minus_the_slim_models_cross_entropy(trained):
    model, space, calib, val = trained
    model = copy.deepcopy(model)
    net = cz.supernet(model, space)
    cfg, side = (6, 3), "left"
    recalibrate_bn(net, cfg, side, calib, batches=3)
    small = cz.slim(model, space, cfg, side).eval()
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(small(x), y, reduction="sum") for x, y in val]
    expected = -float(sum(losses)) / sum(len(y) for _, y in val)
    assert score(net, cfg, side, val, calib, calib_batches=3, metric="loss") == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ConfigError, match="'top1' or 'loss'"):
        score(net, cfg, side, val, calib, metric="top-1")


def test_seeds_start_the_population_and_bound_the_result(trained, net):
    _, space, calib, val = trained
    seed_cfg = uniform_baseline(space, "flops<=60%")
    found = search(net, "flops<=60%", calib, val, effort=0.1, calib_batches=2, progress=False, seeds=[seed_cfg])
    assert found.history[0].cfg == seed_cfg and found.history[0].generation == 0
    seeded = next(e for e in found.history if e.cfg == seed_cfg)
    assert found.score >= (seeded.score_left + seeded.score_right) / 2
    # an infeasible seed is left out rather than breaking the budget
    found = search(net, "flops<=60%", calib, val, effort=0.1, calib_batches=2, progress=False, seeds=[space.max()])
    assert all(e.cfg != space.max() for e in found.history)


@pytest.mark.parametrize("budget", ["flops<=50%", "params<=30%", "flops<=100%"])
def test_importance_baseline_keeps_the_channels_above_one_threshold(trained, budget):
    from compressor.search import importance_baseline
    _, space, _, _ = trained
    rng = np.random.default_rng(0)
    importance = [rng.random(n) for n in space.sizes]
    cfg = importance_baseline(space, importance, budget, fill=False)
    bounds = constraints(space, budget)
    assert all(getattr(space, b.metric)(cfg) <= b.limit for b in bounds)
    if budget == "flops<=100%":
        assert cfg == space.max()
    # every group keeps at most the channels above a common (relative) threshold, and the kept
    # channel counts are the widest bins that do
    relative = [v / v.mean() for v in importance]
    kept = space.channels(cfg)
    threshold = min(np.sort(r)[::-1][k - 1] for r, k in zip(relative, kept))
    for r, k, g in zip(relative, kept, range(len(space))):
        above = int((r >= threshold).sum())
        assert k <= above
        wider = [int(w) for w in space.width_table[g, 1:] if k < w <= above]
        assert not wider  # a wider allowed bin would still keep only channels above the threshold


@pytest.mark.parametrize("budget", ["flops<=50%", "params<=30%", "flops<=40%,params<=60%"])
def test_the_filled_importance_baseline_uses_the_budget_the_threshold_leaves(trained, budget):
    from compressor.search import feasible, importance_baseline
    _, space, _, _ = trained
    rng = np.random.default_rng(1)
    importance = [rng.random(n) for n in space.sizes]
    threshold = np.array(importance_baseline(space, importance, budget, fill=False))
    filled = np.array(importance_baseline(space, importance, budget))
    bounds = constraints(space, budget)
    assert feasible(bounds, filled[None])[0]
    rows = np.arange(len(space))
    assert (space.width_table[rows, filled] >= space.width_table[rows, threshold]).all()
    # no group can take its next width without breaking a constraint
    wider = space.step(np.repeat(filled[None], len(space), 0), np.eye(len(space), dtype=np.int64))
    assert not ((wider != filled).any(1) & feasible(bounds, wider)).any()


def test_a_second_look_chooses_among_the_top_and_the_seeds_on_other_batches(trained, net):
    _, space, calib, val = trained
    seed_cfg = uniform_baseline(space, "flops<=60%")
    final = DataLoader(make_data(128, seed=4), batch_size=32)
    found = search(net, "flops<=60%", calib, val, effort=0.1, calib_batches=2, progress=False, seeds=[seed_cfg],
                   final_data=final)
    cfgs = [tuple(f["cfg"]) for f in found.finalists]
    assert seed_cfg in cfgs and len(cfgs) == len(set(cfgs)) >= 3
    best = max(found.finalists, key=lambda f: f["fitness"])
    assert tuple(best["cfg"]) == found.cfg
    # each finalist's fitness is its mean score over both sides on the final batches
    f = found.finalists[-1]
    expected = sum(score(net, tuple(f["cfg"]), side, final, calib, calib_batches=2) for side in ("left", "right")) / 2
    assert f["fitness"] == pytest.approx(expected, abs=1e-9)


def test_alternate_weights_are_scored_with_the_same_draws_and_win_when_better(trained, net):
    model, space, calib, val = trained
    same = cz.supernet(copy.deepcopy(net.model), space)  # the same weights: its score is the left path's
    found = search(net, "flops<=60%", calib, val, effort=0.1, calib_batches=2, progress=False, alternate=same)
    for e in found.history:
        assert e.score_alternate == e.score_left
    best = max(found.history, key=lambda e: max(e.score_alternate, (e.score_left + e.score_right) / 2))
    assert found.score == max(best.score_alternate, (best.score_left + best.score_right) / 2)
    if found.score == found.score_alternate:  # the left path decided: it is the side delivered
        assert found.side == "left"
    # untrained weights lose everywhere: the ranking is the supernet's own
    torch.manual_seed(1)
    worse = cz.supernet(tiny_cnn(), space)
    found = search(net, "flops<=60%", calib, val, effort=0.1, calib_batches=2, progress=False, alternate=worse)
    plain = search(net, "flops<=60%", calib, val, effort=0.1, calib_batches=2, progress=False)
    assert all(e.score_alternate < (e.score_left + e.score_right) / 2 for e in found.history)
    assert found.cfg == plain.cfg and found.score == plain.score


# -- the multi-objective search --------------------------------------------------------------------
def covered(point, candidate, cost):
    """`point` dominates or equals `candidate` in (score up, cost down)."""
    return point["score"] >= candidate[0] and point[cost] <= candidate[1]


@pytest.mark.parametrize("budget, metric", [("flops<=100%", "flops"), ("params<=60%", "params")])
def test_pareto_search_returns_the_non_dominated_candidates(trained, net, budget, metric):
    """The front: no point dominates another, every scored candidate is dominated by or equal to a
    front point, it runs from the cheapest candidate to the best-scoring one, the limit holds, and
    its scores are search()'s scores of those configurations (the same scoring and draws)."""
    _, space, calib, val = trained
    found = pareto_search(net, budget, calib, val, effort=0.1, seed=0, calib_batches=2, progress=False)
    front, limit = found.front, constraints(space, budget)[0].limit
    assert found.metric == metric and found.limit == limit and len(front) >= 3
    assert [p[metric] for p in front] == sorted(p[metric] for p in front)
    for a in front:
        assert not any(b is not a and covered(b, (a["score"], a[metric]), metric) and b != a and
                       (b["score"], b[metric]) != (a["score"], a[metric]) for b in front)
        assert a[metric] <= limit and a["flops"] == space.flops(a["widths"]) and a["params"] == space.params(a["widths"])
        assert a["score"] == (a["score_left"] + a["score_right"]) / 2
        assert a["side"] == ("right" if a["score_right"] > a["score_left"] else "left")
    candidates = [((e.score_left + e.score_right) / 2, getattr(e, metric)) for e in found.history]
    assert all(any(covered(p, c, metric) for p in front) for c in candidates)
    assert front[0][metric] == min(c[1] for c in candidates) and front[-1]["score"] == max(c[0] for c in candidates)
    assert front[-1][metric] > 3 * front[0][metric]  # it spans cheap to expensive
    assert len({tuple(e.cfg) for e in found.history}) == len(found.history)  # every candidate scored once
    # the same scoring as search(): a single-objective search scores the front's widest point the same
    again = search(net, budget, calib, val, effort=0.05, calib_batches=2, progress=False, seeds=[front[-1]["widths"]])
    scored = {tuple(e.cfg): (e.score_left, e.score_right) for e in again.history}
    assert scored[tuple(front[-1]["widths"])] == (front[-1]["score_left"], front[-1]["score_right"])


def test_pareto_search_is_reproducible_and_checks_its_arguments(trained, net):
    _, _, calib, val = trained
    runs = [pareto_search(net, "flops<=100%", calib, val, effort=0.05, seed=3, calib_batches=2, progress=False)
            for _ in range(2)]
    assert runs[0].front == runs[1].front and [e[:6] for e in runs[0].history] == [e[:6] for e in runs[1].history]
    with pytest.raises(ConfigError, match="effort must be positive"):
        pareto_search(net, "flops<=100%", calib, val, effort=0)
    with pytest.raises(ConfigError, match="sides must be"):
        pareto_search(net, "flops<=100%", calib, val, sides=("middle",))
