"""How fast the exact cost model evaluates configurations (goal: >= 100,000 per second on
ResNet-50), one at a time (what a check inside a Python loop costs) and in batches (what the
evolution uses).

    python benchmarks/cost_speed.py [--model resnet50] [--size 224]

Writes benchmarks/results/cost_speed.json and prints a table.
"""
import argparse
import time

import numpy as np
import torch
import torchvision

from common import machine_info, write_result


def rate(fn, count):
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    import compressor as cz
    model = torchvision.models.get_model(args.model, weights=None).eval()
    t0 = time.perf_counter()
    space = cz.analyze(model, torch.randn(1, 3, args.size, args.size))
    analyze_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    single = [space.random(rng) for _ in range(20000)]
    batch = rng.integers(space.min_bins, space.max_bins + 1, size=(1_000_000, len(space)))
    rows = {
        "flops, one at a time": rate(lambda: [space.flops(c) for c in single], len(single)),
        "params, one at a time": rate(lambda: [space.params(c) for c in single], len(single)),
        "flops, batch of 1e6": rate(lambda: space.flops(batch), len(batch)),
        "params, batch of 1e6": rate(lambda: space.params(batch), len(batch)),
    }
    result = {"model": args.model, "input": args.size, "groups": len(space), "analyze_s": round(analyze_s, 2),
              "configs_per_second": {k: round(v) for k, v in rows.items()}, "goal": 100_000,
              "machine": machine_info()}
    path = write_result("cost_speed.json", result)
    print(f"{args.model} at {args.size}x{args.size}: {len(space)} groups, analysed in {analyze_s:.1f}s")
    print("| evaluation | configurations / s |")
    print("|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:,.0f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
