"""Coverage of torchvision's classification models: for each, analyze, slim 3 random
configurations on each side, and check (a) the slim model equals the masked supernet
(max |diff| <= 1e-4 * max |y|, checked inside cz.slim) and (b) the cost model's FLOPs and
parameters equal FlopCounterMode's and the parameter count of the slim model.

    python benchmarks/coverage.py [--models resnet18,vgg11_bn] [--size 64] [--timeout 900]

Each model runs in its own process (a crash or a timeout costs one row). Writes
benchmarks/results/coverage.json after every model and resumes from it (delete it to start over);
prints a markdown table.
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import time

from common import RESULTS, machine_info, write_result

# the input sizes of tests/models.py, the one list the slim and export tests use too
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from models import DEFAULT_SIZE, input_size  # noqa: E402


def check_model(name, size, queue):
    import torch
    import torchvision
    import compressor as cz

    torch.manual_seed(0)
    row = {"model": name, "input": size}
    try:
        t0 = time.time()
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, size, size)
        space = cz.analyze(model, x)
        row.update(groups=len(space), frozen=len(space.frozen), analyze_s=round(time.time() - t0, 1))
        parity = cost = 0
        for side in ("left", "right"):
            for seed in range(3):
                cfg = space.random(seed=seed)
                small = cz.slim(model, space, cfg, side).eval()  # raises on a parity failure
                parity += 1
                cost += (cz.measure_flops(small, x) == space.flops(cfg)
                         and cz.count_params(small) == space.params(cfg))
        row.update(status="ok" if cost == 6 else "cost mismatch", parity=f"{parity}/6", cost_match=f"{cost}/6")
    except cz.UnsupportedModelError as e:
        row.update(status="unsupported", reason=str(e)[:300], module=e.module, op=e.op)
    except Exception as e:  # an unexpected failure is a row too, not a crash of the table
        row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
    row["seconds"] = round(time.time() - t0, 1)
    queue.put(row)


def summarise(rows, names):
    return {"models": len(names), "run": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
            "unsupported": sum(r["status"] == "unsupported" for r in rows),
            "other": sum(r["status"] not in ("ok", "unsupported") for r in rows)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated names (default: every classification model)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="input size (some models need more)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--out", default="coverage.json")
    args = parser.parse_args()

    import torchvision
    every = torchvision.models.list_models(module=torchvision.models)
    names = args.models.split(",") if args.models else every
    ctx = mp.get_context("spawn")
    # resumable: rows already in the result file are kept, and it is rewritten after every model
    previous = os.path.join(RESULTS, args.out)
    rows = json.load(open(previous))["rows"] if os.path.exists(previous) else []
    done = {r["model"] for r in rows}
    for name in [n for n in names if n not in done]:
        queue = ctx.Queue()
        proc = ctx.Process(target=check_model, args=(name, input_size(name, args.size), queue))
        proc.start()
        proc.join(args.timeout)
        if proc.is_alive():
            proc.kill()
            row = {"model": name, "status": "timeout", "reason": f"over {args.timeout}s"}
        elif queue.empty():
            row = {"model": name, "status": "error", "reason": f"process died (exit code {proc.exitcode})"}
        else:
            row = queue.get()
        rows.append(row)
        print(f"{row['model']:28s} {row['status']:12s} {row.get('groups', '')!s:>4} {row.get('seconds', '')}", flush=True)
        write_result(args.out, {"summary": summarise(rows, every), "rows": rows, "machine": machine_info()})
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"\n{ok} of the {len(rows)} models run ({len(every)} in torchvision) pass: parity and exact cost on 3 "
          f"configurations x 2 sides\n")
    print("| model | status | groups (frozen) | parity | cost match | reason |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        groups = f"{r['groups']} ({r.get('frozen', '?')})" if "groups" in r else ""  # early rows lack 'frozen'
        print(f"| {r['model']} | {r['status']} | {groups} | {r.get('parity', '')} | {r.get('cost_match', '')} "
              f"| {r.get('reason', '')[:120]} |")


if __name__ == "__main__":
    main()
