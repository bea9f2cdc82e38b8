"""The files of a Pareto search of a trained supernet (api.pareto_front): out_dir/pareto/front.json
(the front, every scored candidate, and the supernet.pt it came from) and out_dir/pareto/front.png
(score against cost: every candidate, the front, each point's index); api.pick_point reads the
JSON back to deliver one point."""
from __future__ import annotations

import hashlib
import json
import math
import os

from ._version import __version__
from .errors import ConfigError
from .files import atomic_output, without_nan, write_text_atomic
from .search import Evaluated, human

FOLDER = "pareto"
FRONT = "front.json"
PLOT = "front.png"
POINT = "point-"  # a picked point's folder: out_dir/pareto/point-<index>
AXES = {"flops": (1e6, "MFLOPs per sample"), "params": (1e6, "million parameters"),
        "latency": (1e3, "latency (ms, predicted by the latency model)")}


def fingerprint(path) -> str:
    """sha256 of a file (supernet.pt): a front belongs to the supernet it was searched on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write(out_dir, found, supernet_path, budget, target=None) -> dict:
    """Write out_dir/pareto/front.json and front.png (each atomically); returns their paths."""
    folder = os.path.join(out_dir, FOLDER)
    doc = {"compressor_version": __version__, "metric": found.metric, "target": target, "budget": str(budget),
           "limit": found.limit, "supernet": {"file": os.path.abspath(supernet_path),
                                              "sha256": fingerprint(supernet_path)},
           "front": found.front, "evaluated": found.to_dict()["history"]}
    paths = {"front": os.path.join(folder, FRONT), "plot": os.path.join(folder, PLOT)}
    write_text_atomic(paths["front"], json.dumps(without_nan(doc), indent=1, allow_nan=False), make_folder=True)
    plot(found, paths["plot"])
    return paths


def plot(found, path):
    """Held-out score against the cost of every scored candidate, the front joined, each point's index."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, label = AXES[found.metric]
    history = [(c, _mean(e.score_left, e.score_right)) for e, c in zip(found.history, found.costs)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([c / scale for c, _ in history], [s for _, s in history], s=10, alpha=0.5, label="evaluated candidates")
    xs, ys = [p[found.metric] / scale for p in found.front], [p["score"] for p in found.front]
    ax.plot(xs, ys, "o-", color="red", markersize=5, label="Pareto front")
    for i, (x, y) in enumerate(zip(xs, ys)):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel("held-out score (supernet)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_output(path, make_folder=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _mean(left, right):
    return left if math.isnan(right) else right if math.isnan(left) else (left + right) / 2


def table(front, metric) -> str:
    """The front as a text table, one row a point, cheapest first, with the index --pick takes."""
    rows = [f"{'pick':>4}  {'score':>7}  {'side':5}  {'flops':>12}  {'params':>12}" +
            ("  latency (predicted)" if metric == "latency" else "")]
    for i, p in enumerate(front):
        rows.append(f"{i:>4}  {p['score']:7.4f}  {p['side']:5}  {human('flops', p['flops']):>12}  "
                    f"{human('params', p['params']):>12}" + (f"  {human('latency', p['latency'])}" if
                                                              metric == "latency" else ""))
    return "\n".join(rows)


def read(out_dir, supernet_path) -> dict:
    """out_dir/pareto/front.json, checked to belong to `supernet_path` as it is now; ConfigError
    naming the fix when it is absent, unreadable or stale. "evaluated" becomes [Evaluated]."""
    path = os.path.join(out_dir, FOLDER, FRONT)
    fix = "run the Pareto search first: pareto_front(out_dir, ...) (CLI: compressor search --from OUT --pareto flops)"
    if not os.path.isfile(path):
        raise ConfigError(f"{out_dir} holds no Pareto front ({FOLDER}/{FRONT}): {fix}")
    try:
        with open(path) as f:
            doc = json.load(f)
        evaluated = [Evaluated(tuple(e["cfg"]), *(math.nan if e[k] is None else e[k] for k in
                                                   ("score_left", "score_right", "flops", "params")),
                               e["generation"]) for e in doc["evaluated"]]
        front = doc["front"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a readable Pareto front ({type(e).__name__}: {e}): {fix}") from e
    if doc["supernet"]["sha256"] != fingerprint(supernet_path):
        raise ConfigError(f"{path} was searched on another {os.path.basename(supernet_path)} (it has been written "
                          f"again since): {fix}")
    return dict(doc, evaluated=evaluated, front=front)
