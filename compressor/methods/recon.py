"""Reconstruction-scored width search ("recon"), compress()'s default: no supernet. Each candidate
configuration is slimmed from the pretrained (channel-ordered) model, its layers refitted by least
squares toward the full model (compressor.reconstruct), and scored on the held-out split; the
candidates are the seed configurations (uniform width, global importance), then local moves around
the better seed, evolved for a few generations; the best replaces that anchor only when it beats it
clearly (search.GUARD_Z standard errors of the paired per-sample difference).

Why it is the default (README, quality section): on CIFAR ResNet-56 with one or two epochs of
fine-tuning, a reconstructed network scores before any fine-tuning what the pruned network reaches
after two epochs, so scoring reconstructed candidates ranks them by nearly what they deliver, while
a supernet trained for an epoch ranked them by noise (its picks fine-tuned several points below the
global-importance configuration) and, trained around one configuration, was worth less to it than an
epoch of fine-tuning. The supernet's epochs (supernet_epochs) are spent fine-tuning the delivered
network instead (Method.finetunes_supernet_epochs), so a comparison at equal total epochs is fair.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..batches import logits, read_batches
from ..errors import ConfigError
from ..reconstruct import Targets, reconstruct
from ..samplers import local_moves
from ..seeding import seeded
from ..search import (Evaluated, SearchResult, canonical_bins, clearly_better, constraints, feasible, human,
                      sample_values, same_draws, uniform_baseline)
from ..slim import slim
from ..stopwatch import Stopwatch
from .base import Fitted, Method, register

log = logging.getLogger("compressor.recon")


@dataclass(frozen=True)
class ReconOptions:
    batches: int = 6       # training batches the least-squares fits read (384 images at batch 64)
    positions: int = 32    # sampled output positions per image and layer
    local: int = 4         # local moves around the anchor per generation, besides the seeds
    generations: int = 1   # rounds of local moves from the best candidates so far

    def __post_init__(self):
        for name in ("batches", "positions", "local"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "local" else 1):
                raise ConfigError(f"recon option {name} must be an integer >= {0 if name == 'local' else 1}, "
                                  f"got {value!r}")
        if isinstance(self.generations, bool) or not isinstance(self.generations, int) or self.generations < 0:
            raise ConfigError(f"recon option generations must be an integer >= 0, got {self.generations!r}")


class _Candidates:
    """Slims, reconstructs and scores candidates, each a (channel order, configuration) pair: the
    order "importance" slims ctx.model (channels in compress's importance order), "model" the model
    in its own order (ctx.unordered). Keeps each one's per-sample held-out scores and slim model."""

    def __init__(self, ctx, calib, held_out, options):
        self.ctx, self.held_out = ctx, held_out
        self.models = {"importance": ctx.model, "model": ctx.unordered}
        images = ctx.task.images if ctx.task is not None else None
        self.targets = {order: Targets(model, calib, batches=options.batches, positions=options.positions,
                                       images=images)
                        for order, model in self.models.items() if model is not None}
        self.samples, self.history, self.slim = {}, [], {}
        self.bounds = constraints(ctx.space, ctx.budget)

    def score(self, key, generation):
        if key in self.samples:
            return float(self.samples[key].mean())
        (order, cfg), space = key, self.ctx.space
        small = slim(self.models[order], space, cfg, "left")
        reconstruct(small, self.models[order], space, cfg, "left", None, targets=self.targets[order])
        values = same_draws(_held_out_samples, small, self.held_out, self.ctx)
        self.samples[key], self.slim[key] = values, small
        self.history.append(Evaluated(cfg, float(values.mean()), float("nan"), float(space.flops(cfg)),
                                      float(space.params(cfg)), generation))
        log.info("candidate %s (%s order): held-out %.4f after reconstruction, %s", list(cfg), order,
                 float(values.mean()), human("flops", space.flops(cfg)))
        return float(values.mean())


def _held_out_samples(small, held_out, ctx):
    """Per-sample held-out scores of a slim network in eval mode (its BN statistics are the full
    model's, which the reconstruction fitted the layers for); a task's own per-sample score."""
    if ctx.task is not None:
        return ctx.task.sample_scores(small, held_out)
    device = next(small.parameters()).device
    small.eval()
    values = []
    with torch.no_grad():
        for x, y in read_batches(held_out, "scoring"):
            values.append(sample_values(logits(small(x.to(device)), ctx.output_fn), y.to(device), ctx.score_metric))
    return torch.cat(values)


def fit(ctx) -> Fitted:
    """compress()'s fit step: choose the anchor among the seeds, search locally around it, deliver the
    reconstructed best (guarded)."""
    if not ctx.seeds:
        raise ConfigError("method 'recon' starts from the seed configurations: pass seed_population=True")
    options, clock = ctx.options, Stopwatch()
    with clock("search"):
        # the reconstruction images are augmented by torch's default generator: seeded here, so the
        # targets do not depend on what drew from it before (search_trained, a latency re-search)
        with seeded(ctx.seed):
            candidates = _Candidates(ctx, ctx.calibration(), ctx.batched(ctx.held_out), options)
        found, key = _search(ctx, candidates, options)
    return Fitted(candidates.slim[key], found, [], clock.timings)


def _search(ctx, candidates, options):
    """(the SearchResult, the delivered candidate's (order, configuration) key)."""
    space, bounds = ctx.space, candidates.bounds
    canon, rows = canonical_bins(space), np.arange(len(space))
    feasible_seeds = [tuple(int(c) for c in canon[rows, np.asarray(space.check(s))]) for s in ctx.seeds
                      if feasible(bounds, np.array([space.check(s)]))[0]]
    if not feasible_seeds:  # a latency re-search with a tightened limit: the seeds were made for the first one
        feasible_seeds = [tuple(int(c) for c in canon[rows, np.asarray(uniform_baseline(space, ctx.budget))])]
    # the importance order with every seed; the model's own order with the first (uniform width: the
    # other seeds rank channels by importance, which only the importance order keeps first)
    seeds = [("importance", cfg) for cfg in dict.fromkeys(feasible_seeds)]
    if ctx.unordered is not None and feasible_seeds:
        seeds.append(("model", feasible_seeds[0]))
    anchor = max(seeds, key=lambda key: candidates.score(key, 0))  # ties: the first seed
    rng = np.random.default_rng(ctx.seed)
    primary = bounds[0]
    low = ctx.window.low if ctx.window is not None else 0.0
    order, parents = anchor[0], [anchor[1]]  # local moves keep the anchor's channel order
    for generation in range(1, options.generations + 1):
        proposals = local_moves(space, np.asarray(parents)[rng.integers(len(parents), size=64 * options.local)],
                                rng.random((64 * options.local, len(space))))
        proposals = canon[rows, proposals]
        ok = feasible(bounds, proposals) & (primary.cost(proposals) >= low)
        fresh = [c for c in dict.fromkeys(tuple(int(v) for v in p) for p in proposals[ok])
                 if (order, c) not in candidates.samples][:options.local]
        for cfg in fresh:
            candidates.score((order, cfg), generation)
        parents = [c for o, c in sorted(candidates.samples, key=lambda k: candidates.score(k, generation),
                                        reverse=True) if o == order][:2]
    best = max(candidates.samples, key=lambda k: float(candidates.samples[k].mean()))
    guard = {}
    if best != anchor:
        mean, error, moved = clearly_better(candidates.samples[best] - candidates.samples[anchor])
        guard = {"anchor": list(anchor[1]), "anchor_order": anchor[0], "best": list(best[1]), "best_order": best[0],
                 "difference": mean, "standard_error": error, "delivered": "search" if moved else "anchor"}
        log.info("anchor guard: the best candidate scores %+.4f over the anchor (standard error %.4f): %s",
                 mean, error, "delivered" if moved else "the anchor is delivered")
        best = best if moved else anchor
    value = float(candidates.samples[best].mean())
    found = SearchResult(cfg=best[1], side="left", score_left=value, score_right=float("nan"), score=value,
                         costs={"flops": float(space.flops(best[1])), "params": float(space.params(best[1]))},
                         limits={b.metric: b.limit for b in bounds}, history=candidates.history,
                         inherited=f"reconstructed, {best[0]} order", guard=guard)
    return found, best


RECON = register(Method(
    name="recon", options=ReconOptions, sampler=None, fit=fit, sides=("left",), finetunes_supernet_epochs=True,
    summary="reconstruction-scored width search around the seed configurations, no supernet (the default)"))
