"""SWP, stage-wise pruning (METHOD section 8; arXiv 2011.04908): the network is split into stages
(compressor.stages: by spatial resolution, or after the modules the user names). Every training
step trains the full network, the smallest and `n_random` random subnets (UA's sandwich sampler);
each subnet's stages run on the full network's stage outputs of the same batch, so a stage's
candidates are trained against the full network's output of that stage (feature distillation)
whatever the other stages chose, and its logits are distilled in place from the full network's
soft output. The search ranks each stage's candidates by that stage loss alone, then combines
them under the global budget.

Choices where the paper is silent (choice):
- a subnet's loss is the sum over the stages but the last of ||stage output - full network's||^2 /
  ||full network's||^2 (scale-free, every stage weighs the same) plus the KL divergence of its
  logits from the full network's (the last stage's loss, the in-place distillation); the full
  network's own loss is compress's (cross-entropy, distilled from the original when it distils);
- the search scores `candidates` configurations (as many as the evolution scores at the run's
  effort, by default): the smallest, the seeds and anchors, then random ones (local moves around
  the anchors when supernet training had them, as its draws did); one stage-wise pass of a
  configuration (BN recalibrated on stage-wise passes) gives the stage loss of each of its stage
  parts at once. A stage part's score is its stage loss on the held-out split divided by the
  smallest part's (every stage weighs the same);
- the combination: per stage the parts on the front of (cost with the other stages at full width,
  score), thinned evenly when the fronts' product exceeds COMBINATIONS; every combination of the
  fronts is costed exactly and the feasible ones are ranked by their summed scores; the best
  `finalists` of them, the feasible seeds and anchors are scored end to end (held-out top-1 or
  loss after BN recalibration, every other method's score) and the best is delivered, so a
  stage-wise ranking that misleads cannot deliver worse than the seeds by that score.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..batches import logits, read_batches
from ..distributed import rank_and_world
from ..errors import ConfigError
from ..losses import kd
from ..progress import Progress
from ..samplers import SandwichSampler, local_moves
from ..search import (Evaluated, SearchResult, canonical_bins, constraints, feasible, human, recalibrate_bn,
                      same_draws, score)
from ..searchers import pareto_ranks
from ..stages import StageTap, find_stages, relative_distance, space_size
from ..supernet import supernet
from .base import Method, register
from .mctnas import evolution_queries
from .ua import sandwich_loss

log = logging.getLogger("compressor.swp")
COMBINATIONS = 50_000  # (choice) stage-part combinations costed exactly at most


@dataclass(frozen=True)
class SWPOptions:
    n_random: int = 2              # random subnets per step, besides the full network and the smallest
    stages: tuple | None = None    # module names whose outputs end each stage but the last (None: by resolution)
    candidates: int | None = None  # configurations the search scores stage-wise (None: the evolution's at the effort)
    finalists: int = 3             # best combinations scored end to end

    def __post_init__(self):
        if isinstance(self.n_random, bool) or not isinstance(self.n_random, int) or self.n_random < 0:
            raise ConfigError(f"swp option n_random must be an integer >= 0, got {self.n_random!r}")
        stages = self.stages
        if isinstance(stages, str):  # the CLI's --method-option stages=layer1,layer2
            stages = tuple(s.strip() for s in stages.split(","))
        if stages is not None:
            if not isinstance(stages, (list, tuple)) or not stages or \
                    not all(isinstance(s, str) and s for s in stages):
                raise ConfigError(f"swp option stages must be module names (e.g. ['layer1', 'layer2']) or None, "
                                  f"got {self.stages!r}")
            object.__setattr__(self, "stages", tuple(stages))
        if self.candidates is not None and (isinstance(self.candidates, bool) or not isinstance(self.candidates, int)
                                            or self.candidates < 1):
            raise ConfigError(f"swp option candidates must be a positive integer or None, got {self.candidates!r}")
        if isinstance(self.finalists, bool) or not isinstance(self.finalists, int) or self.finalists < 1:
            raise ConfigError(f"swp option finalists must be a positive integer, got {self.finalists!r}")


# -- training ---------------------------------------------------------------------------------------
def training_forward(net, options):
    """run(model, x, i, state) for train_supernet: the sandwich's first subnet (the full network)
    runs as it is and leaves its stage outputs in `state`; every other runs stage-wise on them and
    leaves its stage losses."""
    stages = find_stages(net.model, net.space, options.stages)
    log.info("swp stages end at %s: %s groups", list(stages.ends), [len(g) for g in stages.groups])
    tap = StageTap(net.model, stages.ends)

    def run(model, x, i, state):
        tap.inputs = state["stage_inputs"] if i else None
        with tap:
            out = model(x)
        if i == 0:  # SandwichSampler: the full network comes first
            state["stage_inputs"] = {name: o.detach() for name, o in tap.outputs.items()}
        else:
            state["stage_losses"] = [relative_distance(tap.outputs[n], state["stage_inputs"][n]) for n in stages.ends]
        tap.outputs, tap.inputs = {}, None
        return out
    return run


def stage_loss(i, out, base, state):
    """The full network's own loss; a subnet's stage losses plus its in-place distillation."""
    return sandwich_loss(i, out, base, state) + (sum(state["stage_losses"]) if i else 0)


# -- search -----------------------------------------------------------------------------------------
def stage_losses(net, teacher, stages, cfg, calib_data, val_data, *, calib_batches=20, max_batches=None,
                 output_fn=None) -> np.ndarray:
    """(stages,) the stage losses of configuration `cfg` (left side) on `val_data`, every stage run
    on the full network's stage outputs (`teacher`: a supernet of the full network, BN calibrated,
    eval mode), after recalibrating BN on stage-wise passes of `calib_data`. Leaves `net` in eval mode
    with cfg active and its BN statistics recalibrated."""
    tap, full = StageTap(net.model, stages.ends), StageTap(teacher.model, stages.ends)
    target = {}

    def feed(module, args):  # every pass of the subnet first runs the full network on the same input
        with torch.no_grad(), full:
            target["logits"] = logits(teacher(*args), output_fn)
        tap.inputs = dict(full.outputs)

    hook = net.model.register_forward_pre_hook(feed)
    totals, seen = np.zeros(len(stages)), 0
    try:
        with tap:
            recalibrate_bn(net, cfg, "left", calib_data, calib_batches)
            with torch.no_grad():
                for b, (x, _) in enumerate(read_batches(val_data, "stage-wise scoring")):
                    if max_batches is not None and b >= max_batches:
                        break
                    out = logits(net(x.to(next(net.parameters()).device)), output_fn)
                    parts = [relative_distance(tap.outputs[n], tap.inputs[n]) for n in stages.ends]
                    totals += len(x) * np.array([float(v) for v in parts + [kd(out, target["logits"])]])
                    seen += len(x)
    finally:
        hook.remove()
    if not seen:
        raise ConfigError("val_data yielded no batch: nothing to score")
    return totals / seen


def _full_network(net, calib_data, calib_batches):
    """A supernet over a copy of `net`'s network at its largest configuration, BN recalibrated, eval
    mode: the stage outputs every stage-wise pass is fed."""
    teacher = supernet(net.unmasked_copy(), net.space, impl=net.impl)
    return recalibrate_bn(teacher, net.space.max(), "left", calib_data, calib_batches)


def _probes(space, count, rng, fixed, anchors) -> list:
    """Distinct canonical configurations: `fixed` first, then random ones (local moves around the
    anchors when there are any) up to `count` in all."""
    canon, rows = canonical_bins(space), np.arange(len(space))
    chosen = dict.fromkeys(tuple(int(c) for c in canon[rows, np.asarray(space.check(cfg))]) for cfg in fixed)
    for _ in range(8):
        if len(chosen) >= count:
            break
        n = 4 * count
        if len(anchors):
            anchor = np.asarray(anchors, dtype=np.int64)
            draws = local_moves(space, anchor[rng.integers(len(anchor), size=n)], rng.random((n, len(space))))
        else:
            draws = rng.integers(space.min_bins, space.max_bins + 1, size=(n, len(space)))
        for cfg in canon[rows, draws]:
            chosen.setdefault(tuple(int(c) for c in cfg))
            if len(chosen) >= count:
                break
    return list(chosen)


def combine(space, stages, tables, bounds, limit=COMBINATIONS):
    """[(configuration, summed stage score)] of the feasible combinations of one scored part per
    stage, best first. `tables[s]`: {part (the bins of stage s's groups): score, lower is better}."""
    primary, full = bounds[0], np.asarray(space.max(), dtype=np.int64)
    fronts = []
    for groups, table in zip(stages.groups, tables):
        parts = np.array(list(table), dtype=np.int64).reshape(len(table), len(groups))
        scores = np.array(list(table.values()))
        cfgs = np.tile(full, (len(parts), 1))
        cfgs[:, list(groups)] = parts
        cost = primary.cost(cfgs)
        keep = np.flatnonzero(pareto_ranks(-scores, cost) == 0)
        keep = keep[np.argsort(cost[keep], kind="stable")]
        fronts.append((parts[keep], scores[keep]))
    per = max(2, int(limit ** (1 / len(fronts))))
    if math.prod(len(p) for p, _ in fronts) > limit:  # thin each front evenly, keeping its ends
        fronts = [(p[k], s[k]) for p, s in fronts
                  for k in [np.unique(np.linspace(0, len(p) - 1, min(per, len(p))).round().astype(int))]]
    index = np.array(list(itertools.product(*[range(len(p)) for p, _ in fronts])), dtype=np.int64)
    cfgs, total = np.tile(full, (len(index), 1)), np.zeros(len(index))
    for s, (groups, (parts, scores)) in enumerate(zip(stages.groups, fronts)):
        cfgs[:, list(groups)] = parts[index[:, s]]
        total += scores[index[:, s]]
    ok = np.flatnonzero(feasible(bounds, cfgs))
    ok = ok[np.argsort(total[ok], kind="stable")]
    return [(tuple(int(c) for c in cfgs[i]), float(total[i])) for i in ok]


def stage_search(net, budget, train_data, val_data, *, options: SWPOptions | None = None, effort: float = 1.0,
                 seed: int = 0, calib_batches: int = 20, max_val_batches: int | None = None, progress: bool = True,
                 metric: str = "top1", seeds=(), anchors=(), final_data=None, output_fn=None, alternate=None,
                 sides=("left",), records=None, window=None, task=None) -> SearchResult:
    """The stage-wise search (module docstring): search()'s arguments; `options` the method's
    (default SWPOptions()). `task`: None only (SWP's stage losses read class logits: compress
    refuses it with a task). `records` (the prior) and `window` are not used: the stage parts are
    combined under the budget itself. `final_data`, when given, scores the finalists instead of
    `val_data` (batches the stage ranking never read); `alternate` (other weights of the same
    space) scores them too and a finalist's fitness is the better of the two scores."""
    if task is not None:
        raise ConfigError(f"swp's stage search scores class logits: it cannot search for task {task.name!r}")
    options = options or SWPOptions()
    space = net.space
    bounds = constraints(space, budget)
    stages = find_stages(net.model, space, options.stages)
    rng = np.random.default_rng(seed)
    count = options.candidates or evolution_queries(effort)
    canon, rows = canonical_bins(space), np.arange(len(space))
    anchors = [tuple(int(c) for c in canon[rows, np.asarray(a)]) for a in anchors]
    probes = _probes(space, count, rng, [space.min(), *seeds, *anchors], anchors)
    norms = [m for m in net.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
    teacher = _full_network(net, train_data, calib_batches)
    bar = Progress(len(probes), "stage-wise search", enabled=progress and rank_and_world()[0] == 0, log=log)
    try:
        losses = []
        for cfg in probes:
            losses.append(stage_losses(net, teacher, stages, cfg, train_data, val_data, calib_batches=calib_batches,
                                       max_batches=max_val_batches, output_fn=output_fn))
            bar.update(1)
    finally:
        bar.close()
        for m, buffers in zip(norms, saved):
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
        net.full()
    losses = np.array(losses)
    losses /= np.where(losses[0] > 0, losses[0], 1.0)  # probes[0] is the smallest configuration
    tables = []
    for s, groups in enumerate(stages.groups):
        table = {}
        for cfg, row in zip(probes, losses):
            table.setdefault(tuple(cfg[g] for g in groups), []).append(row[s])
        tables.append({part: float(np.mean(v)) for part, v in table.items()})
    combined = combine(space, stages, tables, bounds)
    given = [tuple(int(c) for c in canon[rows, np.asarray(space.check(cfg))]) for cfg in [*seeds, *anchors]]
    finalists = list(dict.fromkeys([cfg for cfg, _ in combined[:options.finalists]] +
                                   [cfg for cfg in given if feasible(bounds, np.array([cfg]))[0]]))
    scoring = final_data if final_data is not None else val_data

    def end_to_end(supernet, cfg):
        return same_draws(score, supernet, cfg, "left", scoring, train_data, calib_batches=calib_batches,
                          max_batches=max_val_batches, metric=metric, output_fn=output_fn)
    trained = {cfg: end_to_end(net, cfg) for cfg in finalists}
    # with alternate weights (compress's score_original), a finalist's fitness is the better of both, as in search()
    other = {cfg: end_to_end(alternate, cfg) if alternate is not None else float("nan") for cfg in finalists}
    fitness = {cfg: max(trained[cfg], other[cfg]) if alternate is not None else trained[cfg] for cfg in finalists}
    best = max(finalists, key=fitness.__getitem__)  # ties: the best combination
    summed = dict(combined)
    history = [Evaluated(cfg, trained[cfg], float("nan"), float(space.flops(cfg)), float(space.params(cfg)), 0,
                         other[cfg]) for cfg in finalists]
    sizes = stages.sizes(space)
    report = {"ends": list(stages.ends), "groups": [list(g) for g in stages.groups], "stage_space": sizes,
              "scored": [len(t) for t in tables], "whole_space": space_size(space), "probes": len(probes),
              "combinations": len(combined), "summed": {str(list(c)): summed.get(c) for c in finalists}}
    log.info("swp: stages of %s configurations (the whole space: %.3g), %s parts scored per stage; best %s, "
             "score %.4f, %s", sizes, float(report["whole_space"]), report["scored"], list(best), fitness[best],
             human("flops", space.flops(best)))
    return SearchResult(cfg=best, side="left", score_left=trained[best], score_right=float("nan"),
                        score=fitness[best], costs={"flops": float(space.flops(best)),
                                                    "params": float(space.params(best))},
                        limits={b.metric: b.limit for b in bounds}, history=history, score_alternate=other[best],
                        finalists=[{"cfg": list(c), "fitness": fitness[c]} for c in finalists], stages=report)


SWP = register(Method(
    name="swp", options=SWPOptions,
    sampler=lambda space, seed, options, window=None, sides=None: SandwichSampler(
        space, seed, n_random=options.n_random, window=window),  # left only, whatever `sides`
    forward=training_forward,
    loss=stage_loss,
    tasks=False,  # its loss reads the subnets' class logits
    record=lambda cfg, space: cfg != space.max(),
    sides=("left",),
    searcher=stage_search,
    searcher_kwargs=lambda options, sampler: {"options": options},
    summary="stage-wise supernets (fullnet + tinynet sandwich, stage feature distillation), stage-wise search"))
