"""How well the latency model predicts, and what a latency budget buys over a FLOPs budget.

ResNet-18 and MobileNetV2 (torchvision, random weights: latency does not depend on their values) at
224x224, batch 1, on ort-cpu with one thread. For each: time to build the table (fresh cache),
MAPE and Kendall tau of predicted vs measured latency on random subnetworks not used for the
calibration, and, at equal FLOPs (both in [0.95, 1.0] x 50% of the original), the measured latency
of the configuration a latency-aware choice picks (lowest predicted latency) against
configurations a FLOPs-only search is indifferent between (random ones at those FLOPs) and
the uniform-width baseline. That last part searches on cost only, without a trained supernet:
it shows the latency spread a FLOPs budget leaves on the table, not an accuracy trade-off.

    python benchmarks/latency_model.py [--quick]
"""
import argparse
import itertools
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_result  # noqa: E402

import compressor as cz  # noqa: E402
from compressor.latency import build_latency_model, runtime  # noqa: E402
from compressor.search import uniform_baseline  # noqa: E402

MODELS = {"resnet18": torchvision.models.resnet18, "mobilenet_v2": torchvision.models.mobilenet_v2}


def kendall(a, b):
    pairs = list(itertools.combinations(range(len(a)), 2))
    return float(sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs) / len(pairs))


def evaluate(name, args):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    space = cz.analyze(model, torch.randn(1, 3, 224, 224))
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: the build time is the real one
        t = time.time()
        lm = build_latency_model(model, space, args.target, cache_dir=cache, points=args.points,
                                 calibration=args.calibration, progress=True)
        build_s = time.time() - t
    rt, x = runtime(lm.target), lm.target.example()

    def measure(cfg):
        return rt.measure(cz.slim(model, space, cfg, check=False), x, what=f"{name} {cfg}").median_us

    rng = np.random.default_rng(1000)  # the calibration draws from seed 0
    tests = []
    while len(tests) < args.tests:
        cfg = space.random(rng)
        if cfg not in tests:
            tests.append(cfg)
    t = time.time()
    measured = np.array([measure(c) for c in tests])
    predicted = space.latency(np.array(tests), args.target)
    test_s = time.time() - t

    # equal FLOPs: configurations within [0.95, 1.0] x 50% of the original FLOPs
    limit = 0.5 * space.flops(space.max())
    pool = np.array([space.random(rng) for _ in range(20000)])
    flops = space.flops(pool)
    pool = pool[(flops >= 0.95 * limit) & (flops <= limit)]
    latency_pick = tuple(int(c) for c in pool[np.argmin(space.latency(pool, args.target))])
    flops_picks = [tuple(int(c) for c in pool[i]) for i in rng.choice(len(pool), args.flops_picks, replace=False)]
    uniform = uniform_baseline(space, "flops<=50%")
    flops_only = [measure(c) for c in flops_picks]
    return {
        "model": name, "groups": len(space), "layers": lm.info["layers"], "layer_timings": lm.info["measurements"],
        "points_per_dim": args.points or "all", "calibration_subnets": args.calibration,
        "table_build_s": round(build_s, 1), "original_us": lm.original_us,
        "fit": {"slope": lm.slope, "intercept_us": lm.intercept, "calibration_mape": lm.info["calibration_mape"]},
        "test_subnets": len(tests), "test_measure_s": round(test_s, 1),
        "mape": float(np.mean(np.abs(predicted - measured) / measured)), "kendall_tau": kendall(predicted, measured),
        "test_points": [{"cfg": list(c), "predicted_us": float(p), "measured_us": float(m)}
                        for c, p, m in zip(tests, predicted, measured)],
        "equal_flops": {
            "flops_limit": limit, "candidates_in_window": int(len(pool)),
            "latency_aware": {"cfg": list(latency_pick), "flops": float(space.flops(latency_pick)),
                              "predicted_us": space.latency(latency_pick, args.target), "measured_us": measure(latency_pick)},
            "flops_only_random": {"measured_us": flops_only, "mean_us": float(np.mean(flops_only))},
            "uniform": {"cfg": list(uniform), "flops": float(space.flops(uniform)), "measured_us": measure(uniform)},
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 widths per layer dimension, 10 calibration and "
                                                             "12 test subnets (the full run measures every width)")
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--target", default="ort-cpu", help="the latency target (torch-cuda, ort-cuda on a GPU)")
    parser.add_argument("--out", help="the JSON file (default benchmarks/results/latency_model.json)")
    args = parser.parse_args()
    args.points, args.calibration, args.tests, args.flops_picks = (4, 10, 12, 3) if args.quick else (None, 20, 30, 5)
    torch.set_num_threads(1)  # the target times with one thread; torch's own work should not fight it
    load_before = os.getloadavg()
    rows = [evaluate(name, args) for name in args.models.split(",")]
    payload = {"machine": dict(machine_info(), load_average_before=load_before, load_average_after=os.getloadavg()),
               "target": f"{args.target}, batch 1, 1x3x224x224, 1 thread", "quick": args.quick, "results": rows}
    path = write_result(args.out or "latency_model.json", payload)
    print(f"\n{'model':14s} {'table s':>8s} {'timings':>8s} {'MAPE':>7s} {'tau':>6s} {'orig ms':>8s} "
          f"{'lat-aware ms':>13s} {'flops-only ms':>14s} {'uniform ms':>11s}")
    for r in rows:
        e = r["equal_flops"]
        print(f"{r['model']:14s} {r['table_build_s']:8.1f} {r['layer_timings']:8d} {r['mape']:7.1%} "
              f"{r['kendall_tau']:6.2f} {r['original_us'] / 1e3:8.2f} {e['latency_aware']['measured_us'] / 1e3:13.2f} "
              f"{e['flops_only_random']['mean_us'] / 1e3:14.2f} {e['uniform']['measured_us'] / 1e3:11.2f}")
    print(f"(equal FLOPs: every configuration within [0.95, 1.0] x 50% of the original FLOPs; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores)\nwrote {path}")


if __name__ == "__main__":
    main()
