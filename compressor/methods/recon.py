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
from ..reconstruct import reconstruct
from ..samplers import local_moves
from ..search import (GUARD_Z, Evaluated, SearchResult, canonical_bins, constraints, feasible, human, same_draws,
                      score_samples)
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


def _batches(data, count):
    """The first `count` batches of a loader, as a list (read once, reused by every candidate)."""
    out = []
    for batch in data:
        if len(out) == count:
            break
        out.append(batch)
    return out


class _Candidates:
    """Slims, reconstructs and scores configurations; keeps each one's per-sample held-out scores."""

    def __init__(self, ctx, calib, held_out, options):
        self.ctx, self.calib, self.held_out, self.options = ctx, calib, held_out, options
        self.samples, self.history = {}, []
        self.bounds = constraints(ctx.space, ctx.budget)

    def score(self, cfg, generation):
        if cfg in self.samples:
            return float(self.samples[cfg].mean())
        space = self.ctx.space
        small = slim(self.ctx.model, space, cfg, "left")
        reconstruct(small, self.ctx.model, space, cfg, "left", self.calib, batches=self.options.batches,
                    positions=self.options.positions)
        values = same_draws(_held_out_samples, small, self.held_out, self.ctx)
        self.samples[cfg] = values
        self.history.append(Evaluated(cfg, float(values.mean()), float("nan"), float(space.flops(cfg)),
                                      float(space.params(cfg)), generation))
        log.info("candidate %s: held-out %.4f after reconstruction, %s", list(cfg), float(values.mean()),
                 human("flops", space.flops(cfg)))
        return float(values.mean())


def _held_out_samples(small, held_out, ctx):
    """Per-sample held-out scores of a slim network in eval mode (its BN statistics are the full
    model's, which the reconstruction fitted the layers for)."""
    device = next(small.parameters()).device
    small.eval()
    values = []
    with torch.no_grad():
        for x, y in read_batches(held_out, "scoring"):
            out = logits(small(x.to(device)), ctx.output_fn)
            y = y.to(device)
            if ctx.score_metric == "loss":
                values.append(-torch.nn.functional.cross_entropy(out, y, reduction="none").double().cpu())
            else:
                values.append((out.argmax(-1) == y).double().cpu())
    return torch.cat(values)


def fit(ctx) -> Fitted:
    """compress()'s fit step: choose the anchor among the seeds, search locally around it, deliver the
    reconstructed best (guarded)."""
    if not ctx.seeds:
        raise ConfigError("method 'recon' starts from the seed configurations: pass seed_population=True")
    options, clock, space = ctx.options, Stopwatch(), ctx.space
    batched = (lambda data: ctx.batches.loader(data)) if ctx.batches else None
    calib = _batches(batched(ctx.train_data) if batched else ctx.train_data, options.batches)
    held_out = batched(ctx.held_out) if batched else ctx.held_out
    with clock("search"):
        found = _search(ctx, _Candidates(ctx, calib, held_out, options), options)
    with clock("reconstruct"):
        small = slim(ctx.model, space, found.cfg, "left")
        reconstruct(small, ctx.model, space, found.cfg, "left", calib, batches=options.batches,
                    positions=options.positions)
    return Fitted(small, found, [], clock.timings)


def _search(ctx, candidates, options) -> SearchResult:
    space, bounds = ctx.space, candidates.bounds
    canon, rows = canonical_bins(space), np.arange(len(space))
    seeds = list(dict.fromkeys(tuple(int(c) for c in canon[rows, np.asarray(space.check(s))]) for s in ctx.seeds
                               if feasible(bounds, np.array([space.check(s)]))[0]))
    if not seeds:
        raise ConfigError("no seed configuration meets the budget")  # constraints() has shown space.min() does
    anchor = max(seeds, key=lambda cfg: candidates.score(cfg, 0))  # ties: the first seed
    rng = np.random.default_rng(ctx.seed)
    primary = bounds[0]
    low = ctx.window.low if ctx.window is not None else 0.0
    parents = [anchor]
    for generation in range(1, options.generations + 1):
        proposals = local_moves(space, np.asarray(parents)[rng.integers(len(parents), size=64 * options.local)],
                                rng.random((64 * options.local, len(space))))
        proposals = canon[rows, proposals]
        ok = feasible(bounds, proposals) & (primary.cost(proposals) >= low)
        fresh = [c for c in dict.fromkeys(tuple(int(v) for v in p) for p in proposals[ok])
                 if c not in candidates.samples][:options.local]
        for cfg in fresh:
            candidates.score(cfg, generation)
        parents = sorted(candidates.samples, key=lambda c: candidates.score(c, generation), reverse=True)[:2]
    best = max(candidates.samples, key=lambda c: float(candidates.samples[c].mean()))
    guard = {}
    if best != anchor:
        difference = candidates.samples[best] - candidates.samples[anchor]
        mean, error = float(difference.mean()), float(difference.std() / len(difference) ** 0.5)
        moved = mean > GUARD_Z * error
        guard = {"anchor": list(anchor), "best": list(best), "difference": mean, "standard_error": error,
                 "delivered": "search" if moved else "anchor"}
        log.info("anchor guard: the best candidate scores %+.4f over the anchor (standard error %.4f): %s",
                 mean, error, "delivered" if moved else "the anchor is delivered")
        best = best if moved else anchor
    value = float(candidates.samples[best].mean())
    return SearchResult(cfg=best, side="left", score_left=value, score_right=float("nan"), score=value,
                        costs={"flops": float(space.flops(best)), "params": float(space.params(best))},
                        limits={b.metric: b.limit for b in bounds}, history=candidates.history,
                        inherited="reconstructed", guard=guard)


RECON = register(Method(
    name="recon", options=ReconOptions, sampler=None, fit=fit, sides=("left",), finetunes_supernet_epochs=True,
    summary="reconstruction-scored width search around the seed configurations, no supernet (the default)"))
