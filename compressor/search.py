"""Width search (METHOD sections 4-6): BN recalibration and candidate scoring, the constraints of a
budget as vectorised cost functions, BCNet's prior over bins, and the evolutionary search."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .budget import parse_budget
from .config import SCORE_METRICS
from .distributed import rank_and_world
from .errors import ConfigError, InfeasibleBudgetError
from .progress import Progress
from .samplers import local_moves
from .searchers import DRAW_BATCH, DRAW_ROUNDS, Evolution, ParetoSelection, Problem, pareto_ranks
from .space import WidthSpace
from .supernet import Supernet
from .batches import check_labels, logits, read_batches

log = logging.getLogger("compressor.search")



# -- scoring -------------------------------------------------------------------------------------

def _norms(net: Supernet):
    return [m for m in net.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _device(net: Supernet):
    return next(net.parameters()).device


def recalibrate_bn(net: Supernet, cfg, side: str, calib_data, batches: int = 20, task=None) -> Supernet:
    """Activate `cfg` on `side` and re-estimate every BN layer's running statistics from scratch:
    a cumulative average over `batches` batches of `calib_data` (an iterable of (x, y), or of a
    `task`'s batches, whose images it reads), with
    only the BN layers in train mode (dropout stays off). Leaves `net` in eval mode. Under
    torch.distributed the statistics are averaged over ranks, so every rank evaluates the same
    network (and, with sharded calibration data, uses every rank's batches)."""
    if batches < 1:
        raise ConfigError(f"BN recalibration needs at least one batch, got batches={batches}")
    net.set(cfg, side)
    norms = _norms(net)
    momenta = [m.momentum for m in norms]
    device = _device(net)
    seen = 0
    net.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
            m.train()
        with torch.no_grad():
            for batch in read_batches(calib_data, "BN recalibration"):
                if seen == batches:
                    break
                net((task.images(batch) if task is not None else batch[0]).to(device))
                seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
    if seen == 0:
        raise ConfigError("calib_data yielded no batch: BN statistics cannot be re-estimated")
    _, world = rank_and_world()
    if world > 1:
        for m in norms:
            for stat in (m.running_mean, m.running_var):
                dist.all_reduce(stat)
                stat /= world
    return net


METRICS = SCORE_METRICS  # the one list, in config.py (the CLI reads it without torch)


def score_samples(net: Supernet, cfg, side: str, val_data, calib_data, *, calib_batches: int = 20,
                  max_batches: int | None = None, metric: str = "top1", output_fn=None, task=None) -> torch.Tensor:
    """Per held-out sample, in the order `val_data` yields them: 1.0 or 0.0 for a correct or wrong
    top-1 (metric "top1"), or minus the cross-entropy ("loss"), or a `task`'s per-sample score
    (compressor.tasks; then `metric` and `output_fn` do not apply), of `cfg` on `side` after
    recalibrating BN on `calib_data`. The supernet's BN buffers, active configuration and
    train/eval modes are restored afterwards. Under torch.distributed each rank scores the batches
    whose index % world size is its rank and the results are gathered, so every rank returns the
    same values. `output_fn` picks the logits from a model output that is not a tensor."""
    if metric not in METRICS:
        raise ConfigError(f"unknown score metric {metric!r}: use {' or '.join(map(repr, METRICS))}")
    norms = _norms(net)
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
    modes = [m.training for m in net.modules()]
    previous = (net.cfg, net.side)
    rank, world = rank_and_world()
    device = _device(net)
    batches = []  # (batch index, per-sample values)
    try:
        recalibrate_bn(net, cfg, side, calib_data, calib_batches, task)
        with torch.no_grad():
            for i, batch in enumerate(read_batches(val_data, "scoring")):
                if max_batches is not None and i >= max_batches:
                    break
                if i % world != rank:
                    continue
                if task is not None:  # its per-image scores, modes restored (detection scores in train mode)
                    batches.append((i, task.sample_scores(net, [batch], device)))
                    continue
                x, y = batch
                out = logits(net(x.to(device)), output_fn)
                check_labels(y, out.shape[-1], f"scoring batch {i}")
                batches.append((i, sample_values(out, y.to(device), metric)))
    finally:
        for m, buffers in zip(norms, saved):
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
        for m, mode in zip(net.modules(), modes):
            m.training = mode
        if previous[0] is None:
            net.full()
        else:
            net.set(*previous)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, batches)
        batches = sorted((b for part in gathered for b in part), key=lambda b: b[0])
    if not batches:
        raise ConfigError("val_data yielded no batch: nothing to score")
    return torch.cat([values for _, values in batches])


def sample_values(out, y, metric: str) -> torch.Tensor:
    """Per sample of a batch (float64, on the CPU): 1.0 or 0.0 for a correct or wrong top-1
    (metric "top1"), or minus the cross-entropy ("loss")."""
    if metric == "loss":
        return -torch.nn.functional.cross_entropy(out, y, reduction="none").double().cpu()
    return (out.argmax(-1) == y).double().cpu()


def score(net: Supernet, cfg, side: str, val_data, calib_data, *, calib_batches: int = 20,
          max_batches: int | None = None, metric: str = "top1", output_fn=None, task=None) -> float:
    """Held-out quality of `cfg` on `side` on `val_data`, after recalibrating BN on `calib_data`:
    top-1 accuracy in [0, 1] (metric "top1"), or minus the mean cross-entropy ("loss": higher is
    better too, and it separates candidates that a small split gives the same top-1): the mean of
    score_samples, whose notes (restored state, torch.distributed, output_fn) hold here too."""
    return float(score_samples(net, cfg, side, val_data, calib_data, calib_batches=calib_batches,
                               max_batches=max_batches, metric=metric, output_fn=output_fn, task=task).mean())


def same_draws(fn, *args, seed=0, **kwargs):
    """fn(*args, **kwargs) with torch's CPU random generator reset to `seed` and restored after:
    every candidate sees the same random augmentations of its batches (common random numbers), so
    score differences are the candidates', not the draws'."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


# -- constraints ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    """One resolved constraint: `cost(cfgs) <= limit`, where `cost` maps an int array of
    configurations (B, G) to their costs (B,). Any cost model (a latency model too) fits here."""
    text: str
    metric: str
    limit: float
    cost: Callable[[np.ndarray], np.ndarray]

    def ok(self, cfgs) -> np.ndarray:
        return self.cost(cfgs) <= self.limit


def human(metric: str, value: float) -> str:
    """1234567 flops -> '1.23 MFLOPs'; params -> '1.23M params'; latency (us) -> '1.23 ms'."""
    if metric == "latency":
        return f"{value:.3g} us" if value < 1e3 else f"{value / 1e3:.3g} ms"
    scale = next(((s, p) for s, p in ((1e9, "G"), (1e6, "M"), (1e3, "K")) if abs(value) >= s), (1, ""))
    number = f"{value / scale[0]:.3g}"
    return f"{number} {scale[1]}FLOPs" if metric == "flops" else f"{number}{scale[1]} params"


def constraints(space: WidthSpace, budget) -> list[Bound]:
    """The budget's constraints as vectorised cost functions of configuration arrays, with limits
    resolved against the original (full-width) model. The first is the primary one (the search
    window applies to it). Raises InfeasibleBudgetError when the smallest configuration already
    exceeds a limit."""
    budget = parse_budget(budget)  # a tuple of Constraints
    smallest = np.array([space.min()])
    bounds = []
    for c in budget:
        # latency: predicted by the space's latency model, relative to the measured original
        if c.metric == "latency" and c.relative and space.broadened:
            raise ConfigError(f"{c} is relative to the original model, but the latency model of a broadened "
                              f"space is timed on the broadened one: give an absolute limit (e.g. latency<=3ms"
                              f"@{c.target}) or do not broaden")
        cost, original = space.cost_function(c.metric, c.target)
        where = f" on {c.target}" if c.metric == "latency" else ""
        bound = Bound(str(c), c.metric, float(c.limit(original)), lambda cfgs, cost=cost: cost(np.atleast_2d(cfgs)))
        least = float(bound.cost(smallest)[0])
        if least > bound.limit:
            raise InfeasibleBudgetError(
                f"{bound.text} needs <= {human(c.metric, bound.limit)} but the smallest configuration "
                f"costs {human(c.metric, least)}{where}, the least reachable (the original model: "
                f"{human(c.metric, original)})")
        bounds.append(bound)
    return bounds


def feasible(bounds, cfgs) -> np.ndarray:
    """(B,) bool: which configurations of a (B, G) array meet every bound."""
    ok = np.ones(len(cfgs), dtype=bool)
    for b in bounds:
        ok &= b.ok(cfgs)
    return ok


def uniform_baseline(space: WidthSpace, budget) -> tuple:
    """The same bin in every group (clipped to each group's allowed bins), the widest one that
    meets every constraint. InfeasibleBudgetError when even the smallest does not."""
    bounds = constraints(space, budget)
    # bin 1 clipped is space.min(), which constraints() has shown to be feasible
    cfgs = np.clip(np.arange(space.bins, 0, -1)[:, None], space.min_bins, space.max_bins)
    return tuple(int(c) for c in cfgs[np.argmax(feasible(bounds, cfgs))])


def importance_baseline(space: WidthSpace, importance, budget, thresholds: int = 400, normalise: bool = True,
                        fill: bool = True) -> tuple:
    """Global magnitude pruning as a configuration: every group keeps its channels whose
    importance (one array per group, e.g. slim.channel_importance, each divided by its group's
    mean so that groups of many layers do not outweigh the others; as it is when `normalise` is
    False, for scores already comparable across groups such as DAGGER's gates) reaches one
    network-wide threshold, rounded down to the group's bins; the lowest threshold that meets every
    constraint. With channels in importance order, the left path of this configuration is what
    global pruning would keep. `fill`: then widened while the budget allows (`widen`)."""
    bounds = constraints(space, budget)
    relative = _relative_importance(importance, normalise)
    cuts = np.quantile(np.concatenate(relative), np.linspace(0, 1, thresholds))
    # kept[t, g]: channels of group g at or above threshold t; the bin is the widest that keeps no more
    kept = np.stack([(r[None, :] >= cuts[:, None]).sum(1) for r in relative], axis=1)
    allowed = _allowed_bins(space)
    fits = (space.width_table[None] <= kept[:, :, None]) & allowed[None]
    cfgs = np.where(fits.any(2), space.bins - np.argmax(fits[:, :, ::-1], axis=2), space.min_bins[None])
    ok = feasible(bounds, cfgs)
    if not ok.any():
        return space.min()
    cfg = tuple(int(c) for c in cfgs[np.argmax(ok)])  # thresholds ascend: the first feasible keeps most
    return widen(space, cfg, importance, budget, normalise) if fill else cfg


def _relative_importance(importance, normalise) -> list:
    """Per group its channels' importance, most important first, divided by the group's mean when
    `normalise` (importance_baseline says why)."""
    scale = [max(float(np.mean(v)), 1e-12) if normalise else 1.0 for v in importance]
    return [np.sort(np.asarray(v, dtype=np.float64) / s)[::-1] for v, s in zip(importance, scale)]


def widen(space: WidthSpace, cfg, importance, budget, normalise: bool = True) -> tuple:
    """`cfg` widened one width at a time, in the group whose next channels are the most important
    (`importance` as importance_baseline reads it, the channels in its order), while every constraint
    of `budget` holds: rounding every group down to its bins, or one width for all of them, leaves
    budget unused (on CIFAR ResNet-56: 120.8 of 125.7 MFLOPs at half the FLOPs; uniform width 63.1
    of 75.4 at 30 %)."""
    bounds = constraints(space, budget)
    relative = _relative_importance(importance, normalise)
    cfg = np.asarray(space.check(cfg))
    while True:
        wider = space.step(np.repeat(cfg[None], len(space), 0), np.eye(len(space), dtype=np.int64))
        grown = np.flatnonzero((wider != cfg).any(1) & feasible(bounds, wider))
        if not len(grown):
            return tuple(int(c) for c in cfg)
        kept = space.width_table[np.arange(len(space)), cfg]
        added = [relative[g][kept[g]:space.width_table[g, wider[g, g]]] for g in grown]
        # a group whose importance vector is shorter than its widths (nothing scored there) comes last
        added = [a.mean() if a.size else -np.inf for a in added]
        cfg = wider[grown[int(np.argmax(added))]]


# -- the prior -----------------------------------------------------------------------------------
def _allowed_bins(space: WidthSpace) -> np.ndarray:
    """(G, N+1) bool: bin w is allowed for group g (column 0 never is; nor is a switched-off one)."""
    return space.allowed.copy()


def _uniform_prior(space: WidthSpace) -> np.ndarray:
    allowed = _allowed_bins(space).astype(np.float64)
    return allowed / allowed.sum(1, keepdims=True)


def expected_cost(space: WidthSpace, probs: torch.Tensor, metric: str = "flops", target=None) -> torch.Tensor:
    """Exact expected FLOPs, params or latency (on `target`) when each group's bin is drawn
    independently from its row of `probs` (G, N+1). Layer dims are affine in the kept channels, so
    E[out*in] = E[out] E[in] + sum_g Mo[l,g] Mi[l,g] Var(k_g); latency is the latency model's own
    exact expectation over its per-layer table. Differentiable in `probs`."""
    if metric == "latency":
        return space.latency_model(target).expected(probs)
    widths = torch.as_tensor(space.width_table, dtype=probs.dtype, device=probs.device)
    mean = (probs * widths).sum(1)
    return space.cost.differentiable(metric, mean, (probs * widths ** 2).sum(1) - mean ** 2)


def _loss_table(space: WidthSpace, records) -> np.ndarray:
    """E[l, w]: mean recorded loss of the records whose group l had bin w; cells no record saw get
    the largest recorded loss + 1 (worse than anything seen, on the losses' own scale)."""
    losses = np.array([float(r[0]) for r in records])
    cfgs = np.array([list(r[1]) for r in records], dtype=np.int64).reshape(len(records), -1)
    if cfgs.shape[1] != len(space) or np.any((cfgs < space.min_bins) | (cfgs > space.max_bins)):
        raise ConfigError("the records do not fit this width space (wrong number of groups or bins "
                          "outside the allowed range): were they recorded on another supernet?")
    total = np.zeros((len(space), space.bins + 1))
    count = np.zeros_like(total)
    rows = np.broadcast_to(np.arange(len(space)), cfgs.shape)
    np.add.at(total, (rows, cfgs), losses[:, None])
    np.add.at(count, (rows, cfgs), 1)
    return np.where(count > 0, total / np.maximum(count, 1), losses.max() + 1)


def fit_prior(space: WidthSpace, records, budget, *, lam: float = 10.0, steps: int = 2000,
              lr: float = 0.003) -> np.ndarray:
    """BCNet's prior (METHOD section 4): per-group categorical P_l = softmax(theta_l) over bins
    minimising sum_l sum_w P_l(w) E[l, w] / L + lam * sum_c (1 - Fhat_c(P) / limit_c)^2 over the
    budget's constraints, with Fhat the exact expected cost, by Adam on theta from uniform.
    Returns (G, N+1) probabilities, zero outside each group's allowed bins; with no records, the
    uniform prior. The loss term is linear in P, so run to convergence P collapses onto single
    (noisy) cells; the default lr x steps bounds how far theta moves: expected costs meet the
    limits within a few percent while each group keeps several likely bins."""
    bounds = constraints(space, budget)
    if not records:
        return _uniform_prior(space)
    table = torch.tensor(_loss_table(space, records))
    allowed = torch.tensor(_allowed_bins(space))
    theta = torch.zeros(table.shape, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([theta], lr=lr)
    # thousands of steps on tensors of a few hundred numbers: a second intra-op thread only adds
    # synchronisation, and on a busy machine its spin-waiting made the fit 60x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            probs = torch.softmax(theta.masked_fill(~allowed, -torch.inf), dim=1)
            objective = (probs * table).sum() / len(space)
            for c, b in zip(parse_budget(budget), bounds):
                objective = objective + lam * (1 - expected_cost(space, probs, b.metric, c.target) / b.limit) ** 2
            optimiser.zero_grad()
            objective.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        return torch.softmax(theta.masked_fill(~allowed, -torch.inf), dim=1).numpy()


def _sample(probs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, G) configurations, each group's bin drawn independently from its row of `probs`."""
    cum = np.cumsum(probs, axis=1)
    cum /= cum[:, -1:]
    u = rng.random((count, len(probs)))
    return (u[:, :, None] >= cum[None]).sum(-1)


# -- the evolutionary search ---------------------------------------------------------------------
class Evaluated(NamedTuple):
    """One scored candidate; `generation` 0 is the initial population. `score_alternate`: its left
    path on the alternate weights (NaN when the search had none)."""
    cfg: tuple
    score_left: float
    score_right: float
    flops: float
    params: float
    generation: int
    score_alternate: float = float("nan")


@dataclass
class SearchResult:
    """The best configuration found, its better side, its scores and costs, the resolved limits,
    and every scored candidate (for an accuracy-vs-cost plot)."""
    cfg: tuple
    side: str
    score_left: float
    score_right: float
    score: float
    costs: dict
    limits: dict
    history: list = field(repr=False)  # [Evaluated], every candidate in evaluation order
    inherited: str = "supernet"  # where compress() took the slim model's weights from
    score_alternate: float = float("nan")  # the chosen configuration's left path on the alternate weights
    finalists: list = field(default_factory=list)  # [{"cfg", "fitness"}]: the re-scored finalists, if any
    guard: dict = field(default_factory=dict)  # the anchor guard's test (search with anchors), if it ran
    stages: dict = field(default_factory=dict)  # the stage-wise search's stages and candidate counts (swp)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cfg"] = list(self.cfg)
        d["history"] = [dict(e._asdict(), cfg=list(e.cfg)) for e in self.history]
        return d


def canonical_bins(space: WidthSpace) -> np.ndarray:
    """(G, N+1): each bin mapped to the lowest allowed bin that keeps the same channels. Bins
    collapse when the divisor rounds them together; canonical configurations are distinct exactly
    when the networks are, so the search never scores one network twice."""
    canon = np.tile(np.arange(space.bins + 1), (len(space), 1))
    for g, row in enumerate(space.width_table):
        first = {}
        for c in np.flatnonzero(space.allowed[g]):
            canon[g, c] = first.setdefault(int(row[c]), c)
    return canon


def width_problem(space: WidthSpace, bounds, score) -> Problem:
    """The search over `space` under `bounds` as a searchers.Problem: per group its distinct
    canonical bins (narrowest first), `score(cfg)` its fitness."""
    canon, rows = canonical_bins(space), np.arange(len(space))
    choices = [np.unique(canon[g, space.allowed[g]]) for g in rows]
    return Problem(choices, score, feasible=lambda cfgs: feasible(bounds, cfgs) & space.allows(cfgs),
                   canonical=lambda cfgs: canon[rows, cfgs])


def _feasible_seeds(space, bounds, seeds) -> list:
    """The seeds that meet every constraint and use no switched-off width, in canonical form,
    without repeats, in order."""
    canon, rows = canonical_bins(space), np.arange(len(space))
    cfgs = [np.asarray(space.check(cfg)) for cfg in seeds]
    return list(dict.fromkeys(tuple(int(c) for c in canon[rows, cfg]) for cfg in cfgs
                              if feasible(bounds, cfg[None])[0] and space.allows(cfg)[0]))


def _initial_population(space, bounds, prior, size, window, rng, seeds=(), anchors=()) -> list:
    """Distinct feasible candidates: the feasible `seeds` first (whatever their cost), then ones
    whose primary cost lies in window x limit, drawn from the prior and, when it is too
    concentrated to give enough distinct ones, uniformly (with `anchors`: local moves around them
    instead); if the window holds too few, the rest are any feasible candidates."""
    primary = bounds[0]
    canon, rows = canonical_bins(space), np.arange(len(space))
    chosen = {}  # insertion-ordered set
    for cfg in _feasible_seeds(space, bounds, seeds)[:size]:
        chosen.setdefault(cfg)
    if len(anchors):
        anchors = np.asarray(anchors, dtype=np.int64)
        sources = [lambda n: local_moves(space, anchors[rng.integers(len(anchors), size=n)],
                                         rng.random((n, len(space))))]
    else:
        sources = [lambda n, p=p: _sample(p, n, rng) for p in (prior, _uniform_prior(space))]
    for in_window in (True, False):
        for draw in sources:
            for _ in range(DRAW_ROUNDS):
                cfgs = canon[rows, draw(max(DRAW_BATCH, 20 * size))]
                ok = feasible(bounds, cfgs) & space.allows(cfgs)
                if in_window:
                    cost = primary.cost(cfgs)
                    ok &= (cost >= window[0] * primary.limit) & (cost <= window[1] * primary.limit)
                for cfg in cfgs[ok]:
                    chosen.setdefault(tuple(int(c) for c in cfg))
                    if len(chosen) == size:
                        return list(chosen)
        if in_window:
            log.warning("only %d distinct configurations with %s in [%g, %g] x %s found for an initial "
                        "population of %d; filling it with cheaper ones", len(chosen), primary.metric,
                        window[0], window[1], human(primary.metric, primary.limit), size)
    chosen.setdefault(space.min())  # the smallest configuration is always feasible
    return list(chosen)


def search(net: Supernet, budget, train_data, val_data, *, records=None, effort: float = 1.0,
           window=(0.8, 1.0), seed: int = 0, calib_batches: int = 20, max_val_batches: int | None = None,
           sides=("left", "right"), progress: bool = True, metric: str = "top1", seeds=(),
           final_data=None, output_fn=None, alternate: Supernet | None = None, anchors=(),
           searcher=None, placements=None, task=None) -> SearchResult:
    """Evolutionary width search on a trained supernet (METHOD section 6), or another searcher's.

    `budget`: a Budget or a string such as "flops<=50%,params<=2M". `train_data` supplies the BN
    calibration batches, `val_data` (held out, never the test set) the scores; both are iterables
    of (x, y) batches and should yield the same batches each pass for a reproducible search.
    `records`: the trainer's (loss, cfg, side) records; they shape the prior (uniform without).
    `effort` scales population, generations, top-k, mutations and crossovers (1.0 = 50, 40, 10,
    25, 25). Fitness is the mean of the scores on `sides` (both for BCNet; ("left",) for a UA
    supernet, whose right paths were never trained); the result's side is the better one of the
    best configuration. A side not scored is recorded as NaN. `metric`: score's "top1" or "loss".
    `seeds`: configurations placed in the initial population (when feasible), e.g. the uniform and
    the global-importance ones, so the result scores at least as well as they do. `final_data`:
    batches the search never selected on; when given, the final top-k and the feasible seeds are
    scored again on them and the best of those is the result. The maximum of many noisy held-out
    scores overestimates its candidate (the winner's curse); an independent second look does not.
    `output_fn` picks the logits from a model output that is not a tensor; `task` (compressor.tasks)
    scores with its per-sample score instead. `alternate`: a supernet
    over other weights of the same space (compress: the model before supernet training) whose left
    path is scored too; a candidate's fitness is the better of its supernet fitness and that score,
    so the search finds the networks that are best to fine-tune from either set of weights.
    `anchors`: configurations the supernet was trained around (samplers.TrainingWindow.anchors);
    when given, the initial population beyond the seeds and every mutation are local moves
    (samplers.local_moves) instead of draws from the prior, so the search stays where the
    supernet's weights were trained. `searcher`: None, the evolution above; or any searcher of
    compressor.searchers (e.g. mcts.TreeSearch, RandomSearch): it starts from the feasible seeds,
    scores as many candidates as its own `queries` say, and ignores the prior, window and anchors.
    `placements`: cfg -> the sides to try for its left score (CafeNet's placements,
    compressor.placement): the left score is the best of them, and the result's side is the best
    configuration's best placement.
    """
    if not sides or any(side not in ("left", "right") for side in sides):
        raise ConfigError(f"sides must be a non-empty subset of ('left', 'right'), got {sides!r}")
    if not effort > 0:
        raise ConfigError(f"effort must be positive, got {effort}")
    if not 0 <= window[0] <= window[1]:
        raise ConfigError(f"window must be (low, high) with 0 <= low <= high, got {window}")
    space = net.space
    bounds = constraints(space, budget)
    rank, world = rank_and_world()
    # each rank keeps its own records, but all ranks must draw the same candidates: rank 0's prior
    prior = fit_prior(space, records, budget) if rank == 0 else _uniform_prior(space)
    if world > 1:
        shared = torch.as_tensor(prior, device=_device(net))
        dist.broadcast(shared, 0)
        prior = shared.cpu().numpy()
    evolution = Evolution.scaled(effort)
    rng = np.random.default_rng(seed)
    log.info("searching %s: %s", ", ".join(b.text for b in bounds), searcher or evolution)

    evaluated = {}  # cfg -> (left, right, alternate): the score cache; children are never re-scored
    rate = _rater(net, alternate, sides, train_data, calib_batches, metric, output_fn, placements, task)

    def evaluate(cfg):
        evaluated[cfg] = rate(cfg, val_data, max_val_batches)
        return _fitness(evaluated[cfg], sides)

    def fitness(cfg):
        return _fitness(evaluated[cfg], sides)

    problem = width_problem(space, bounds, evaluate)

    def local(parent, rng):
        return local_moves(space, parent[None], rng.random((1, len(parent))))[0]

    bar = Progress(evolution.generations, "search", enabled=progress and rank == 0 and searcher is None, log=log)

    def report(generation, trace, top):
        bar.update(1, best=f"{fitness(top[0]):.4f}")
        log.debug("generation %d: %d candidates scored, best %.4f %s", generation, len(trace), fitness(top[0]),
                  top[0])

    if searcher is None:
        candidates = _initial_population(space, bounds, prior, evolution.population, window, rng, seeds, anchors)
        trace = evolution.run(problem, rng, candidates, redraw=lambda n, rng: _sample(prior, n, rng),
                              mutate=local if len(anchors) else None, on_round=report)
    else:
        trace = searcher.run(problem, rng, _feasible_seeds(space, bounds, seeds))
    bar.close()
    history = _history(space, trace, evaluated)
    top = sorted(evaluated, key=fitness, reverse=True)[:evolution.top_k]
    canon, rows = canonical_bins(space), np.arange(len(space))

    best, finalists, guard = top[0], [], {}
    if final_data is not None:
        best, finalists = _final_choice(space, top, seeds, sides, bounds, rate, final_data)
    elif len(anchors) and alternate is None:
        best, guard = _anchor_guard(net, canon[rows, np.asarray(anchors[0])], best, evaluated, sides, val_data,
                                    train_data, calib_batches, max_val_batches, metric, output_fn, rate.placed, task)
    left, right, other = evaluated[best]
    # the alternate's score is its left path's: when it decides the fitness, the side is left
    alternate_wins = other > _fitness((left, right, float("nan")), sides)
    side = "left" if alternate_wins else _better_side(left, right, sides)
    if side == "left" and not alternate_wins:
        side = rate.placed.get(best, "left")
    result = SearchResult(
        cfg=best, side=side, score_left=left, score_right=right,
        score=fitness(best), costs={"flops": float(space.flops(best)), "params": float(space.params(best))},
        limits={b.metric: b.limit for b in bounds},
        history=history, finalists=finalists, score_alternate=other, guard=guard)
    log.info("best %s (%s side): score %.4f (left %.4f, right %.4f), %s, %s; %d candidates scored",
             best, result.side, result.score, left, right, human("flops", result.costs["flops"]),
             human("params", result.costs["params"]), len(history))
    return result


def _history(space, trace, evaluated) -> list:
    """[Evaluated] of every candidate of `trace`, in evaluation order, from the score cache."""
    return [Evaluated(cfg, *evaluated[cfg][:2], float(space.flops(cfg)), float(space.params(cfg)), generation,
                      evaluated[cfg][2]) for cfg, generation in zip(trace.cfgs, trace.rounds)]


def _better_side(left, right, sides) -> str:
    return "right" if "left" not in sides or right > left else "left"


@dataclass
class ParetoResult:
    """pareto_search's answer: the cost axis (`metric`, its upper `limit`, resolved), the front (the
    non-dominated candidates, cheapest first, each a dict: widths, side, score, score_left,
    score_right, flops, params, and latency in us, predicted, when the axis is latency) and every
    scored candidate."""
    metric: str
    limit: float
    front: list
    history: list = field(repr=False)  # [Evaluated]
    costs: list = field(repr=False, default_factory=list)  # each history candidate's cost on the axis
    paths: dict = field(default_factory=dict)  # api.pareto_front: front.json and front.png

    def to_dict(self) -> dict:
        return {"metric": self.metric, "limit": self.limit, "front": self.front,
                "history": [dict(e._asdict(), cfg=list(e.cfg), cost=c) for e, c in zip(self.history, self.costs)]}


def pareto_search(net: Supernet, budget, train_data, val_data, *, effort: float = 1.0, seed: int = 0,
                  calib_batches: int = 20, max_val_batches: int | None = None, sides=("left", "right"),
                  progress: bool = True, metric: str = "top1", seeds=(), output_fn=None, task=None) -> ParetoResult:
    """One multi-objective evolutionary search (METHOD section 6, last point): held-out score up and
    the cost of the budget's first constraint down, e.g. "flops<=100%" (the whole space) or
    "latency<=2ms@ort-cpu" (only candidates under 2 ms; every other constraint of the budget holds
    too). Scoring, BN recalibration, the score cache, sides and `metric` are search()'s; the
    parents of each generation are chosen by non-dominated sorting and crowding
    (searchers.ParetoSelection). Returns the front over every scored candidate.
    Choices: the parents are a whole population (NSGA-II), not the top-k; the initial population
    holds uniform widths spread over the bins, the feasible `seeds`, then uniform draws over the
    whole cost range (BCNet's prior is fitted to one budget, so it is not used); no second look and
    no alternate weights."""
    if not sides or any(side not in ("left", "right") for side in sides):
        raise ConfigError(f"sides must be a non-empty subset of ('left', 'right'), got {sides!r}")
    if not effort > 0:
        raise ConfigError(f"effort must be positive, got {effort}")
    space = net.space
    bounds = constraints(space, budget)
    axis = bounds[0]
    evolution = Evolution.scaled(effort)
    evolution = replace(evolution, top_k=evolution.population)
    rng = np.random.default_rng(seed)
    evaluated = {}
    rate = _rater(net, None, sides, train_data, calib_batches, metric, output_fn, task=task)

    def evaluate(cfg):
        evaluated[cfg] = rate(cfg, val_data, max_val_batches)
        return _fitness(evaluated[cfg], sides)

    levels = np.unique(np.linspace(1, space.bins, max(2, min(space.bins, evolution.population // 2))).round())
    uniform = [tuple(int(c) for c in np.clip(w, space.min_bins, space.max_bins)) for w in levels]
    candidates = _initial_population(space, bounds, _uniform_prior(space), evolution.population, (0.0, 1.0), rng,
                                     [space.min(), *uniform, *seeds])
    log.info("Pareto search: score vs %s (%s), %s", axis.metric, ", ".join(b.text for b in bounds), evolution)
    bar = Progress(evolution.generations, "pareto search", enabled=progress, log=log)
    trace = evolution.run(width_problem(space, bounds, evaluate), rng, candidates, select=ParetoSelection(axis.cost),
                          on_round=lambda *_: bar.update(1))
    bar.close()
    cfgs = list(trace.cfgs)
    scores = np.array([_fitness(evaluated[c], sides) for c in cfgs])
    costs = np.asarray(axis.cost(np.array(cfgs)), dtype=np.float64)
    on_front = np.flatnonzero(pareto_ranks(scores, costs) == 0)
    front = []
    for i in sorted(on_front, key=lambda i: (costs[i], -scores[i])):
        left, right, _ = evaluated[cfgs[i]]
        point = {"widths": list(cfgs[i]), "side": _better_side(left, right, sides), "score": float(scores[i]),
                 "score_left": left, "score_right": right, "flops": float(space.flops(cfgs[i])),
                 "params": float(space.params(cfgs[i]))}
        if axis.metric == "latency":
            point["latency"] = float(costs[i])
        front.append(point)
    log.info("Pareto front: %d of %d candidates, %s to %s", len(front), len(cfgs),
             human(axis.metric, costs[on_front].min()), human(axis.metric, costs[on_front].max()))
    return ParetoResult(axis.metric, axis.limit, front, _history(space, trace, evaluated), costs.tolist())


GUARD_Z = 2.5  # (choice) the best of ~25 noisy scores beats an equal anchor by about 2 standard errors


def clearly_better(difference) -> tuple:
    """(mean, standard error, moved) of per-sample score differences (a candidate's minus the
    anchor's, paired): moved when the mean exceeds GUARD_Z standard errors."""
    mean = float(difference.mean())
    error = float(difference.std() / len(difference) ** 0.5) if len(difference) > 1 else float("inf")
    return mean, error, mean > GUARD_Z * error


def _anchor_guard(net, anchor, best, evaluated, sides, val_data, calib_data, calib_batches, max_batches, metric,
                  output_fn, placed=None, task=None):
    """(the configuration to deliver, the test): the search's best replaces the anchor supernet
    training moved around only when its held-out scores beat the anchor's by more than GUARD_Z
    standard errors of their per-sample difference (paired: the same samples and draws). The best
    of many noisy scores overestimates its candidate (the winner's curse); near a strong anchor
    the true differences are small, and a pick by noise alone would deliver a worse network."""
    anchor = tuple(int(c) for c in anchor)
    if anchor == best or anchor not in evaluated:
        return best, {}
    difference = 0
    for side in sides:
        samples = [same_draws(score_samples, net, cfg, (placed or {}).get(cfg, side) if side == "left" else side,
                              val_data, calib_data, calib_batches=calib_batches, max_batches=max_batches,
                              metric=metric, output_fn=output_fn, task=task) for cfg in (best, anchor)]
        difference = difference + (samples[0] - samples[1]) / len(sides)
    mean, error, moved = clearly_better(difference)
    log.info("anchor guard: the search's best scores %+.4f over the anchor (standard error %.4f): %s", mean, error,
             "delivered" if moved else "the anchor is delivered")
    return (best if moved else anchor), {"anchor": list(anchor), "best": list(best), "difference": mean,
                                          "standard_error": error, "delivered": "search" if moved else "anchor"}


def _rater(net, alternate, sides, calib_data, calib_batches, metric, output_fn, placements=None, task=None):
    """rate(cfg, data, max_batches) -> (left, right, alternate) held-out scores of a candidate, NaN
    for what is not scored, each with the same draws. With `placements` (cfg -> sides), the left
    score is the best placement's, and rate.placed[cfg] that placement (from the last rating)."""
    nan = float("nan")

    def rate(cfg, data, max_batches=None):
        def on(supernet, side):
            return same_draws(score, supernet, cfg, side, data, calib_data, calib_batches=calib_batches,
                              max_batches=max_batches, metric=metric, output_fn=output_fn, task=task)

        def left():
            if placements is None:
                return on(net, "left")
            tried = {side: on(net, side) for side in placements(cfg)}
            rate.placed[cfg] = max(tried, key=tried.__getitem__)  # ties: the first tried
            return tried[rate.placed[cfg]]
        return (left() if "left" in sides else nan, on(net, "right") if "right" in sides else nan,
                on(alternate, "left") if alternate is not None else nan)
    rate.placed = {}
    return rate


def _fitness(scores, sides) -> float:
    """The mean score of the searched sides, or the alternate weights' score when that is higher."""
    left, right, other = scores
    mean = sum(v for v, side in ((left, "left"), (right, "right")) if side in sides) / len(sides)
    return other if other > mean else mean  # NaN compares False: no alternate, the mean


def _final_choice(space, top, seeds, sides, bounds, rate, final_data):
    """(the best of the finalists on `final_data`, [{"cfg", "fitness"}]): the finalists are the
    search's top-k and its feasible seeds (canonical, without repeats)."""
    finalists = list(dict.fromkeys(list(top) + _feasible_seeds(space, bounds, seeds)))
    scored = [{"cfg": list(cfg), "fitness": _fitness(rate(cfg, final_data), sides)} for cfg in finalists]
    best = max(range(len(finalists)), key=lambda i: scored[i]["fitness"])  # ties keep the search's order
    log.info("final choice on independent batches: %s, fitness %.4f (the search's best: %.4f)",
             finalists[best], scored[best]["fitness"], scored[0]["fitness"])
    return finalists[best], scored
