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
from ..files import write_bytes_atomic, write_text_atomic
from ..progress import track
from ..slim import slim
from .filebench import BENCH_FORMAT
from .layers import FIXED, bin_sizes, find_layers, widths
from .stats import CV_THRESHOLD
from .targets import Target, onnx_bytes, runtime, target_for

log = logging.getLogger("compressor.latency")
CACHE_FORMAT = "compressor-latency-1"
PROBES_FORMAT = "compressor-probes-1"
PROBE_KEY = "compressor_probe"  # the ONNX metadata entry naming what a probe file times


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
                        seed=0, progress=True, attach=True, measurements=None, **target_options) -> LatencyModel:
    """Measure `model`'s layers on `target` at every width their groups can take (with `points`,
    at most that many widths per dimension, linearly interpolated between), then time `calibration`
    slim subnetworks end to end (the full and the smallest configuration among them) and fit
    measured = slope * table sum + intercept. Measurements are cached in `cache_dir` (default
    ~/.cache/compressor/latency; cache_dir=False disables it) per device, runtime, precision,
    batch, input shape and model fingerprint. With `attach`, `space.latency(cfg, target)` and
    latency budgets on that runtime use the result.

    `measurements`: a `compressor bench --json` file, or a folder of them, holding the timings of
    the probe files that `export_probes` (same space, target, points, calibration and seed) wrote
    and that were benched on the device: the model is then built from those timings alone, nothing
    is measured (or cached) here, and `info["measured_on"]` names the device."""
    target = target_for(target, space.example_input, **target_options)
    if calibration < 3:
        raise ConfigError(f"the calibration fit needs at least 3 subnetworks, got calibration={calibration}")
    t0 = time.time()
    layers, grids, jobs, cfgs = _plan(model, space, points, calibration, seed)
    if measurements is not None:  # timed elsewhere (on the device): nothing is measured here
        rt = None
        cache = _Cache(None, None)
        info = _read_measurements(measurements, space, target, cache.data, jobs, cfgs,
                                  dict(points=points, calibration=calibration, seed=seed))
    else:
        rt = runtime(target)
        info = rt.info
        key = cache_key(space, target, info)
        cache = _Cache(None if cache_dir is False else cache_path(cache_dir or default_cache_dir(), key), key)
    todo = {sig: job for sig, job in jobs.items() if sig not in cache.data["layers"]}  # what the cache lacks
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
    gin = [FIXED if l.in_follows_out else l.cin.group for l in layers]
    gout = [l.cout.group for l in layers]
    draft = LatencyModel(target, table, gin, gout, 1.0, 0.0, 0.0)

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
    info = dict(info, layers=len(layers), measurements=len(cache.data["layers"]), cache=cache.path,
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


def _plan(model, space, points, calibration, seed):
    """(layers, their width grids, {signature: (layer, cin, cout)} of every layer timing, the
    calibration configurations): what a latency model of `space` times."""
    layers = find_layers(model, space)
    grids = [(widths(space, l.cin, points) if not l.in_follows_out else None, widths(space, l.cout, points))
             for l in layers]
    jobs = {}
    for layer, (win, wout) in zip(layers, grids):
        for ci in (wout if win is None else win):
            for co in ([ci] if win is None else wout):
                jobs.setdefault(layer.signature(ci, co), (layer, int(ci), int(co)))
    return layers, grids, jobs, _calibration_configs(space, calibration, seed)


def _probe_key(space, target, plan) -> dict:
    return {"format": PROBES_FORMAT, "fingerprint": space.fingerprint, "bins": space.bins,
            "divisor": space.divisor, "target": target.name, **plan}


def export_probes(model, space, out_dir, target="ort-cpu", *, points=None, calibration=20, seed=0,
                  **target_options) -> list:
    """Write what `build_latency_model` would time as ONNX files into `out_dir`, to be timed on
    another machine (the edge device, with only onnxruntime and numpy: `compressor bench OUT_DIR
    --json timings.json`): one `layer-*.onnx` per distinct layer timing and one `subnet-*.onnx` per
    calibration subnetwork, each naming in its metadata what it times. Then, back here,
    `build_latency_model(model, space, target, points=..., calibration=..., seed=...,
    measurements="timings.json")` builds the latency model from the device's timings. ONNX
    Runtime targets only. Returns the paths written."""
    target = target_for(target, space.example_input, **target_options)
    if not target.runtime.startswith("ort-"):
        raise ConfigError(f"probe files are ONNX models, timed on ort-cpu or ort-cuda, not {target.runtime!r}")
    import onnx

    _, _, jobs, cfgs = _plan(model, space, points, calibration, seed)
    key = _probe_key(space, target, dict(points=points, calibration=calibration, seed=seed))
    written = []

    def write(name, module, x, what):
        proto = onnx.load_from_string(onnx_bytes(module, x))
        onnx.helper.set_model_props(proto, {PROBE_KEY: json.dumps(dict(key, **what))})
        path = os.path.join(out_dir, name)
        write_bytes_atomic(path, proto.SerializeToString())
        written.append(path)

    os.makedirs(out_dir, exist_ok=True)
    for sig, (layer, ci, co) in jobs.items():
        write(f"layer-{hashlib.sha1(sig.encode()).hexdigest()[:12]}.onnx", *layer.module_and_input(ci, co, target.batch),
              {"layer": sig})
    x = target.example()
    for i, cfg in enumerate(cfgs):
        write(f"subnet-{i:03d}.onnx", slim(model, space, cfg, "left", check=False), x, {"cfg": list(cfg)})
    log.info("wrote %d layer and %d subnet probes for %s to %s", len(jobs), len(cfgs), target.name, out_dir)
    return written


def _read_measurements(path, space, target, data, jobs, cfgs, plan) -> dict:
    """Fill `data` ({"layers", "calibration"}) from bench JSON(s) at `path` and return the info of
    the machine they were timed on. ConfigError when they belong to another space or target, or
    when timings are missing."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ConfigError(f"measurements {path!r} does not exist: pass a `compressor bench --json` file or a folder of them")
    key = _probe_key(space, target, plan)
    machines, wrong = [], set()
    for file in files:
        with open(file) as f:
            doc = json.load(f)
        if doc.get("format") != BENCH_FORMAT:
            raise ConfigError(f"{file} is not a `compressor bench --json` file (no format {BENCH_FORMAT!r})")
        machines.append(doc["machine"])
        for r in doc["results"]:
            probe = r["info"].get("metadata", {}).get(PROBE_KEY)
            if probe is None:
                continue  # a benched model that is not a probe
            probe = json.loads(probe)
            differs = sorted(k for k in key if probe.get(k) != key[k])
            if differs:
                wrong.add(f"{r['model']} ({', '.join(f'{k} {probe.get(k)!r}, here {key[k]!r}' for k in differs)})")
                continue
            timing = {"median_us": r["p50_ms"] * 1e3, "p90_us": r["p90_ms"] * 1e3, "cv": r["cv"],
                      "unstable": r["unstable"]}
            if "layer" in probe:
                data["layers"][probe["layer"]] = timing
            else:
                data["calibration"].append(dict(cfg=probe["cfg"], **timing))
    fix = (f"export the probes of this model, space and target with export_probes(model, space, DIR, "
           f"{target.runtime!r}, points={plan['points']}, calibration={plan['calibration']}, seed={plan['seed']}), "
           f"bench them on the device (compressor bench DIR --target {target.runtime} --json timings.json) "
           f"and pass that file")
    if wrong:
        raise ConfigError(f"{len(wrong)} probe timings in {path} were made for another space or target: "
                          f"{'; '.join(sorted(wrong)[:3])}: {fix}")
    missing_layers = [s for s in jobs if s not in data["layers"]]
    timed = {tuple(p["cfg"]) for p in data["calibration"]}
    missing_cfgs = [c for c in cfgs if c not in timed]
    if missing_layers or missing_cfgs:
        raise ConfigError(f"measurements {path} lack {len(missing_layers)} of {len(jobs)} layer timings and "
                          f"{len(missing_cfgs)} of {len(cfgs)} calibration subnets: {fix}")
    where = machines[0]
    return {"runtime": target.runtime, "target": target.name, "precision": target.precision,
            "device": where.get("device", "unknown"), "versions": {k: where.get(k) for k in ("onnxruntime", "python", "numpy")},
            "measured_on": where, "measurements_from": os.path.abspath(path)}


def _layer_table(space, layer, win, wout, timings) -> np.ndarray:
    """(N+1, N+1) times of `layer` at every (input bin, output bin), bilinear in the channel counts
    between the measured widths."""
    if win is None:  # depthwise: one measured row, input follows output
        grid = np.array([[timings[layer.signature(c, c)]["median_us"] for c in wout]])
        win = np.array([0])
    else:
        grid = np.array([[timings[layer.signature(ci, co)]["median_us"] for co in wout] for ci in win])
    size_in = bin_sizes(space, layer.cin) if not layer.in_follows_out else np.zeros(space.bins + 1)
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
