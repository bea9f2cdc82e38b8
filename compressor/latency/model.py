"""The latency model: a measured per-layer table, summed per configuration and calibrated on
end-to-end measurements of random slim subnetworks; cached on disk and resumable.

prediction(cfg) = max(slope * sum_l T_l[bin of l's input group, bin of l's output group] + intercept,
                     the largest measured latency of a calibration subnet that cfg contains)

The floor matters: a linear fit with a negative intercept predicts small configurations below what
they measure (4 us predicted for a subnet measured at 38 us), which would accept budgets no
configuration meets. A configuration at least as wide as a measured subnet in every group is
taken to be at least as slow; the smallest configuration is always measured, so no prediction is
below its measurement and an infeasible budget is refused before training.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
import torch

from ..errors import ConfigError
from ..files import write_text_atomic
from ..progress import track
from ..slim import slim
from .layers import FIXED, bin_sizes, find_layers, widths
from .stats import CV_THRESHOLD
from .targets import Target, runtime, target_for

log = logging.getLogger("compressor.latency")
CACHE_FORMAT = "compressor-latency-1"


def default_cache_dir() -> str:
    root = os.environ.get("COMPRESSOR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "compressor"))
    return os.path.join(root, "latency")


class LatencyModel:
    """Predicted latency (microseconds) of width configurations of one space on one target."""

    def __init__(self, target: Target, table, gin, gout, slope, intercept, original_us, info=None, floors=None):
        self.target = target
        self.table = np.asarray(table, dtype=np.float64)   # (layers, N+1, N+1): [in bin, out bin]
        self.gin = np.asarray(gin, dtype=np.int64)        # group of each layer's input (FIXED: none)
        self.gout = np.asarray(gout, dtype=np.int64)
        self.slope, self.intercept = float(slope), float(intercept)
        self.original_us = float(original_us)              # the full model, measured end to end
        self.info = info or {}
        # measured calibration subnets: (P, G) configurations and their latencies (P,)
        cfgs, measured = floors if floors is not None else ([], [])
        self.floor_cfgs = np.asarray(cfgs, dtype=np.int64)
        self.floor_us = np.asarray(measured, dtype=np.float64)

    def raw(self, cfgs) -> np.ndarray:
        """Sum of the layer table over configurations (B, G) -> (B,)."""
        cfgs = np.atleast_2d(np.asarray(cfgs, dtype=np.int64))
        # a last column for fixed dims (group index -1): the table is constant along those axes
        aug = np.concatenate([cfgs, np.full((len(cfgs), 1), self.table.shape[1] - 1)], axis=1)
        layer = np.arange(len(self.table))
        return self.table[layer, aug[:, self.gin], aug[:, self.gout]].sum(1)

    def predict(self, cfgs) -> np.ndarray:
        """The calibrated table sum, never below the measurement of a calibration subnet that a
        configuration contains (every group at least as wide)."""
        cfgs = np.atleast_2d(np.asarray(cfgs, dtype=np.int64))
        return np.maximum(self.slope * self.raw(cfgs) + self.intercept, self.floor(cfgs))

    def floor(self, cfgs) -> np.ndarray:
        """(B,) the largest measured latency among the calibration subnets each configuration contains."""
        cfgs = np.atleast_2d(np.asarray(cfgs, dtype=np.int64))
        if not len(self.floor_us):
            return np.full(len(cfgs), -np.inf)
        contains = (cfgs[:, None, :] >= self.floor_cfgs[None]).all(-1)  # (B, P)
        return np.where(contains, self.floor_us, -np.inf).max(1)

    def expected(self, probs: torch.Tensor) -> torch.Tensor:
        """Exact expected prediction when each group's bin is drawn independently from its row of
        `probs` (G, N+1): every layer depends on at most two groups, so its expectation is
        P_in^T T_l P_out (the diagonal when both are the same group). Differentiable in `probs`."""
        table = torch.as_tensor(self.table, dtype=probs.dtype, device=probs.device)
        fixed = torch.zeros(1, table.shape[1], dtype=probs.dtype, device=probs.device)
        fixed[0, -1] = 1
        p = torch.cat([probs, fixed])   # row -1: the fixed dims' one-hot
        gin, gout = torch.as_tensor(self.gin), torch.as_tensor(self.gout)
        p_in, p_out = p[gin], p[gout]
        pair = torch.einsum("la,lab,lb->l", p_in, table, p_out)
        diag = (p_out * torch.diagonal(table, dim1=1, dim2=2)).sum(1)
        same = (gin == gout) & (gin != FIXED)
        value = self.slope * torch.where(same.to(probs.device), diag, pair).sum() + self.intercept
        # the floor of the narrowest configuration the distribution can draw
        narrowest = (probs.detach() > 0).to(torch.int64).argmax(1).cpu().numpy()
        floor = float(self.floor(narrowest[None])[0])
        return value.clamp_min(floor) if np.isfinite(floor) else value

    def scaled(self, factor: float) -> "LatencyModel":
        """The same model with every prediction multiplied by `factor` (an optimistic or pessimistic
        variant, e.g. to exercise compress()'s delivery check)."""
        return LatencyModel(self.target, self.table, self.gin, self.gout, self.slope * factor,
                            self.intercept * factor, self.original_us, self.info,
                            floors=(self.floor_cfgs, self.floor_us * factor))


# -- the on-disk cache ---------------------------------------------------------------------------
def cache_key(space, target: Target, info: dict) -> dict:
    return {"format": CACHE_FORMAT, "device": info["device"], "runtime": target.runtime,
            "precision": target.precision, "target": target.name, "batch": target.batch,
            "input_shape": list(target.input_shape), "fingerprint": space.fingerprint,
            "bins": space.bins, "divisor": space.divisor, "versions": info["versions"]}


def cache_path(cache_dir, key: dict) -> str:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{key['runtime']}-{key['fingerprint']}-{digest}.json")


class _Cache:
    """{"key", "layers": {signature: timing}, "calibration": [{cfg, timing}]}, rewritten atomically
    after every measurement so that an interrupted build resumes where it stopped."""

    def __init__(self, path, key):
        self.path, self.data = path, {"key": key, "layers": {}, "calibration": []}
        if path and os.path.isfile(path):
            with open(path) as f:
                stored = json.load(f)
            if stored.get("key") == key:
                self.data = stored
            else:
                log.warning("latency cache %s was written for another key: rebuilding it", path)

    def save(self):
        if self.path:
            write_text_atomic(self.path, json.dumps(self.data), make_folder=True)


def _timing(m) -> dict:
    return {"median_us": m.median_us, "p90_us": m.p90_us, "cv": m.cv, "unstable": m.unstable}


# -- building ------------------------------------------------------------------------------------
def build_latency_model(model, space, target="ort-cpu", *, cache_dir=None, points=None, calibration=20,
                        seed=0, progress=True, attach=True, **target_options) -> LatencyModel:
    """Measure `model`'s layers on `target` at every width their groups can take (with `points`,
    at most that many widths per dimension, linearly interpolated between), then time `calibration`
    slim subnetworks end to end (the full and the smallest configuration among them) and fit
    measured = slope * table sum + intercept. Measurements are cached in `cache_dir` (default
    ~/.cache/compressor/latency; cache_dir=False disables it) per device, runtime, precision,
    batch, input shape and model fingerprint. With `attach`, `space.latency(cfg, target)` and
    latency budgets on that runtime use the result."""
    target = target_for(target, space.example_input, **target_options)
    if calibration < 3:
        raise ConfigError(f"the calibration fit needs at least 3 subnetworks, got calibration={calibration}")
    rt = runtime(target)
    t0 = time.time()
    key = cache_key(space, target, rt.info)
    cache = _Cache(None if cache_dir is False else cache_path(cache_dir or default_cache_dir(), key), key)
    layers = find_layers(model, space)
    grids = [(widths(space, l.cin, points) if l.kind != "depthwise" else None, widths(space, l.cout, points))
             for l in layers]

    todo = {}  # signature -> (layer, cin, cout): what the cache lacks
    for layer, (win, wout) in zip(layers, grids):
        for ci in (wout if win is None else win):
            for co in ([ci] if win is None else wout):
                sig = layer.signature(ci, co)
                if sig not in cache.data["layers"]:
                    todo.setdefault(sig, (layer, int(ci), int(co)))
    for sig, (layer, ci, co) in track(todo.items(), f"latency table {target.runtime}", enabled=progress, log=log):
        module, x = layer.module_and_input(ci, co, target.batch)
        # per-layer timings are microseconds long and often noisy: one summary warning below
        cache.data["layers"][sig] = _timing(rt.measure(module, x, what=f"{layer.name} {ci}->{co}", warn=False))
        cache.save()
    unstable = sum(cache.data["layers"][s]["unstable"] for s in todo)
    if unstable:
        log.warning("%d of %d layer timings were unstable (coefficient of variation > %.2f after a repeat); "
                    "the calibration fit absorbs part of the noise", unstable, len(todo), CV_THRESHOLD)

    table = np.stack([_layer_table(space, layer, win, wout, cache.data["layers"])
                      for layer, (win, wout) in zip(layers, grids)])
    gin = [FIXED if l.kind == "depthwise" else l.cin.group for l in layers]
    gout = [l.cout.group for l in layers]
    draft = LatencyModel(target, table, gin, gout, 1.0, 0.0, 0.0)

    cfgs = _calibration_configs(space, calibration, seed)
    done = {tuple(p["cfg"]) for p in cache.data["calibration"]}
    x = target.example()
    for cfg in track([c for c in cfgs if c not in done], "latency calibration", enabled=progress, log=log):
        small = slim(model, space, cfg, "left", check=False)
        cache.data["calibration"].append(dict(cfg=list(cfg), **_timing(rt.measure(small, x, what=f"subnet {cfg}"))))
        cache.save()
    wanted = set(cfgs)
    points_used = [p for p in cache.data["calibration"] if tuple(p["cfg"]) in wanted]
    measured = np.array([p["median_us"] for p in points_used])
    raw = draft.raw([p["cfg"] for p in points_used])
    slope, intercept = np.polyfit(raw, measured, 1)
    if slope <= 0:  # noise swamped the trend: keep the table's shape, scale it to the measurements
        log.warning("latency calibration found no increasing trend (slope %.3g); using a plain scale", slope)
        slope, intercept = measured.sum() / raw.sum(), 0.0
    original = next(p["median_us"] for p in points_used if tuple(p["cfg"]) == space.max())
    info = dict(rt.info, layers=len(layers), measurements=len(cache.data["layers"]), cache=cache.path,
                calibration_points=len(points_used), build_s=round(time.time() - t0, 2),
                calibration_mape=float(np.mean(np.abs(slope * raw + intercept - measured) / measured)))
    floors = (np.array([p["cfg"] for p in points_used]), measured)
    result = LatencyModel(target, table, gin, gout, slope, intercept, original, info, floors=floors)
    info["floored"] = int((slope * raw + intercept < measured).sum())  # calibration subnets the fit undershoots
    if attach:
        attach_model(space, result)
    log.info("latency model for %s: %d layers, %d layer timings, %d subnets; original %.0f us; %.1fs",
             target.name, len(layers), len(cache.data["layers"]), len(points_used), original, time.time() - t0)
    return result


def _layer_table(space, layer, win, wout, timings) -> np.ndarray:
    """(N+1, N+1) times of `layer` at every (input bin, output bin), bilinear in the channel counts
    between the measured widths."""
    if win is None:  # depthwise: one measured row, input follows output
        grid = np.array([[timings[layer.signature(c, c)]["median_us"] for c in wout]])
        win = np.array([0])
    else:
        grid = np.array([[timings[layer.signature(ci, co)]["median_us"] for co in wout] for ci in win])
    size_in = bin_sizes(space, layer.cin) if layer.kind != "depthwise" else np.zeros(space.bins + 1)
    size_out = bin_sizes(space, layer.cout)
    rows = np.array([np.interp(size_out, wout, grid[i]) for i in range(len(win))])        # (len(win), N+1)
    return np.stack([np.interp(size_in, win, rows[:, b]) for b in range(rows.shape[1])], axis=1)


def _calibration_configs(space, count, seed) -> list:
    """The full and the smallest configuration, then distinct random ones."""
    rng = np.random.default_rng(seed)
    cfgs = list(dict.fromkeys([space.max(), space.min()]))
    for _ in range(100 * count):
        if len(cfgs) >= count:
            break
        cfg = space.random(rng)
        if cfg not in cfgs:
            cfgs.append(cfg)
    return cfgs


# -- attaching to a space (the space holds its latency models itself; these are the older names) ----
def attach_model(space, model: LatencyModel):
    """Make `space.latency(cfg, runtime)` and latency budgets on that runtime use `model`."""
    space.set_latency_model(model)


def attached(space, target) -> LatencyModel:
    return space.latency_model(target)
