"""How many queries each searcher needs on NAS-Bench-Macro (Su et al., CVPR 2021): the Monte Carlo
tree search (compressor.mcts), the evolution (METHOD section 6 defaults) and random search, with
the table's mean CIFAR-10 accuracy as the score and a FLOPs or params limit. A query is one distinct
network scored (architectures that are the same network, identities in other places, count once).

    python benchmarks/searchers.py [--metric flops] [--limit 50e6] [--repeats 20]

Reads ../shared/data/nas-bench-macro/nas-bench-macro_cifar10.json (relative to the repository root;
--table another path); skips (exit 0, naming the missing file) when it is absent. Writes
benchmarks/results/searchers.json and prints a table: queries to reach the top 1 % of the feasible
networks and the best one (mean and standard deviation over the repeats, and how many reached it).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from common import machine_info, write_result
from compressor.mcts import TreeSearch
from compressor.searchers import Evolution, Problem, RandomSearch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "..", "shared", "data", "nas-bench-macro", "nas-bench-macro_cifar10.json")
LAYERS, OPS = 8, 3  # 0 identity, 1 MobileNetV2 3x3 expansion 3, 2 MobileNetV2 5x5 expansion 6: cheapest first


def load(path):
    """(accuracy, flops, params, canonical) arrays indexed by the base-3 number of a key; canonical
    maps each architecture to the first (lowest) one that is the same network (same numbers)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NAS-Bench-Macro table not found: {os.path.abspath(path)} (pass --table PATH)")
    with open(path) as f:
        table = json.load(f)
    n = OPS ** LAYERS
    if len(table) != n:
        sys.exit(f"{path}: expected {n} architectures, found {len(table)}")
    acc, flops, params = np.zeros(n), np.zeros(n), np.zeros(n)
    canonical, first = np.zeros(n, dtype=np.int64), {}
    for key in sorted(table):
        i, v = int(key, OPS), table[key]
        acc[i], flops[i], params[i] = v["mean_acc"], v["flops"], v["params"]
        canonical[i] = first.setdefault((v["mean_acc"], v["params"], v["flops"]), i)
    return acc, flops, params, canonical


def problem_of(acc, cost, canonical, limit):
    digits = OPS ** np.arange(LAYERS - 1, -1, -1)

    def index(cfgs):
        return np.asarray(cfgs, dtype=np.int64) @ digits

    def decode(indices):
        return (indices[:, None] // digits) % OPS

    return Problem([range(OPS)] * LAYERS, score=lambda cfg: float(acc[index(cfg)]),
                   feasible=lambda cfgs: cost[index(cfgs)] <= limit,
                   canonical=lambda cfgs: decode(canonical[index(cfgs)]))


def first_reach(trace, target):
    hits = np.flatnonzero(np.asarray(trace.scores) >= target)
    return int(hits[0]) + 1 if len(hits) else None


def summary(counts):
    reached = [c for c in counts if c is not None]
    return {"mean": float(np.mean(reached)) if reached else None, "std": float(np.std(reached)) if reached else None,
            "median": float(np.median(reached)) if reached else None, "reached": len(reached), "runs": len(counts),
            "counts": counts}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default=TABLE)
    parser.add_argument("--metric", choices=("flops", "params"), default="flops")
    parser.add_argument("--limit", type=float, default=50e6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="searchers.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}")

    try:
        acc, flops, params, canonical = load(args.table)
    except FileNotFoundError as e:
        print(f"skipped: {e}")
        return 0
    cost = flops if args.metric == "flops" else params
    networks = np.unique(canonical[cost <= args.limit])
    if not len(networks):
        sys.exit(f"no architecture has {args.metric} <= {args.limit:g} (the least is {cost.min():g})")
    scores = np.sort(acc[networks])[::-1]
    top = max(1, int(np.ceil(0.01 * len(networks))))
    targets = {"top 1 %": float(scores[top - 1]), "best": float(scores[0])}
    cap = len(networks)  # random search then always reaches both targets
    searchers = {
        "tree (MCT-NAS)": TreeSearch(queries=cap),
        "evolution": Evolution(generations=cap, queries=cap),  # METHOD defaults; stops at the cap
        "random": RandomSearch(queries=cap),
    }
    problem = problem_of(acc, cost, canonical, args.limit)
    results = {}
    for name, searcher in searchers.items():
        start, counts = time.perf_counter(), {t: [] for t in targets}
        for seed in range(args.repeats):
            trace = searcher.run(problem, np.random.default_rng(seed))
            for t, target in targets.items():
                counts[t].append(first_reach(trace, target))
        results[name] = {t: summary(c) for t, c in counts.items()}
        results[name]["seconds"] = time.perf_counter() - start

    print(f"NAS-Bench-Macro, {args.metric} <= {args.limit:g}: {len(networks)} feasible networks "
          f"(of {len(np.unique(canonical))}); top 1 % = the best {top} (accuracy >= {targets['top 1 %']:.2f} %), "
          f"best {targets['best']:.2f} %; {args.repeats} repeats, at most {cap} queries each")
    print("| searcher | queries to the top 1 % | queries to the best |")
    print("|---|---|---|")
    for name, r in results.items():
        cells = [f"{r[t]['mean']:.0f} ± {r[t]['std']:.0f} (median {r[t]['median']:.0f}; {r[t]['reached']}/"
                 f"{r[t]['runs']} reached)" if r[t]["reached"] else f"not reached in {r[t]['runs']} runs"
                 for t in targets]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    path = write_result(args.out, {"machine": machine_info(), "metric": args.metric, "limit": args.limit,
                                   "feasible_networks": int(len(networks)), "top_networks": top, "targets": targets,
                                   "repeats": args.repeats, "max_queries": cap,
                                   "searchers": {n: repr(s) for n, s in searchers.items()}, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
