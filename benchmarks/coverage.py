"""Coverage of torchvision's classification models, or of one model per timm CNN family
(tests/models.py TIMM_FAMILIES): for each, analyze, slim 3 random configurations on each side, and
check (a) the slim model equals the masked supernet (max |diff| <= 1e-4 * max |y|, checked inside
cz.slim) and (b) the cost model's FLOPs and parameters equal FlopCounterMode's and the parameter
count of the slim model. The Torch-Pruning column: does tp.pruner.BasePruner with L1 importance at
ratio 0.3 (classifier ignored) run and leave a model that runs forward (no parity or cost promise).

    python benchmarks/coverage.py [--zoo timm] [--models resnet18,vgg11_bn] [--size 64] [--timeout 900] [--map-shuffles]

Input: --size (64), or the size tests/models.py gives a model; a timm model whose forward fails
there is retried once at the input size of its pretrained_cfg (efficientformer_l1, visformer_tiny:
224), and the row records the size used.

Each model runs in its own process (a crash or a timeout costs one row, marked "timeout"). Writes
benchmarks/results/coverage.json (coverage-timm.json for timm) after every model and resumes from
it (delete it to start over); prints a markdown table.
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
from models import DEFAULT_SIZE, TIMM_FAMILIES, input_size  # noqa: E402


def build(zoo, name):
    if zoo == "timm":
        import timm
        return timm.create_model(name, pretrained=False).eval()
    import torchvision
    return torchvision.models.get_model(name, weights=None).eval()


def torch_pruning_runs(zoo, name, x):
    """'ok' when Torch-Pruning's L1 pruner at ratio 0.3 runs and the pruned model runs forward."""
    import torch
    import torch_pruning as tp
    torch.manual_seed(0)
    model = build(zoo, name)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
    if isinstance(head, torch.nn.Module):
        ignored.append(head)
    try:
        pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.3, ignored_layers=ignored)
        pruner.step()
        with torch.no_grad():
            model(x)
        return "ok"
    except Exception as e:
        return f"fails: {type(e).__name__}: {str(e)[:150]}"


def check_model(zoo, name, size, time_limit, queue, map_shuffles=False):
    import torch
    import compressor as cz
    from compressor.slim import freeze_unsliceable

    torch.manual_seed(0)
    row = {"model": name, "input": size}
    x = torch.randn(1, 3, size, size)
    try:
        t0 = time.time()
        model = build(zoo, name)
        try:
            # a clear refusal before the process limit
            space = cz.analyze(model, x, time_limit=time_limit, map_shuffles=map_shuffles)
        except cz.ConfigError:
            # a model whose forward needs its own input size (a fixed patch grid or attention bias
            # table): retry once at the size of its pretrained_cfg, as a user would
            own = getattr(model, "pretrained_cfg", {}).get("input_size", (3, size, size))[-1]
            if own == size:
                raise
            row["input"] = size = own
            x = torch.randn(1, 3, size, size)
            space = cz.analyze(model, x, time_limit=time_limit, map_shuffles=map_shuffles)
        # what compress() does next: freeze the groups whose slimming breaks a module
        space = freeze_unsliceable(model, space)
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
    t1 = time.time()  # Torch-Pruning gets the input size the model was checked at
    queue.put({"torch_pruning": torch_pruning_runs(zoo, name, x), "tp_seconds": round(time.time() - t1, 1)})


def summarise(rows, names):
    return {"models": len(names), "run": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
            "unsupported": sum(r["status"] == "unsupported" for r in rows),
            "other": sum(r["status"] not in ("ok", "unsupported") for r in rows),
            "torch_pruning_ok": sum(r.get("torch_pruning") == "ok" for r in rows)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    parser.add_argument("--models", help="comma-separated names (default: every classification model of "
                                         "torchvision, one model per family of timm)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="input size (some models need more)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--out", help="result file (default coverage.json, coverage-timm.json)")
    parser.add_argument("--map-shuffles", action="store_true", help="analyze(map_shuffles=True): ShuffleNetV2's stream slimmed")
    args = parser.parse_args()
    args.out = args.out or ("coverage-timm.json" if args.zoo == "timm" else "coverage.json")

    if args.zoo == "timm":
        every = list(TIMM_FAMILIES.values())
    else:
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
        proc = ctx.Process(target=check_model, args=(args.zoo, name, input_size(name, args.size), max(10, args.timeout // 2), queue,
                                                             args.map_shuffles))
        proc.start()
        proc.join(args.timeout)
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
            proc.join()
        parts = []  # our row, then the Torch-Pruning entry, as far as the process got
        while True:
            try:
                parts.append(queue.get(timeout=1))
            except Exception:  # queue.Empty
                break
        if parts:
            row = parts[0]
            row.update(parts[1] if len(parts) > 1 else {"torch_pruning": f"timeout (over {args.timeout}s in all)"
                                                        if timed_out else "process died"})
        elif timed_out:
            row = {"model": name, "status": "timeout", "reason": f"over {args.timeout}s",
                   "torch_pruning": "not run (timeout before it)"}
        else:
            row = {"model": name, "status": "error", "reason": f"process died (exit code {proc.exitcode})"}
        rows.append(row)
        print(f"{row['model']:28s} {row['status']:12s} {row.get('groups', '')!s:>4} {row.get('seconds', '')} "
              f"TP: {row.get('torch_pruning', '')[:40]}", flush=True)
        write_result(args.out, {"summary": summarise(rows, every), "rows": rows, "machine": machine_info()})
    ok = sum(r["status"] == "ok" for r in rows)
    tp_ok = sum(r.get("torch_pruning") == "ok" for r in rows)
    print(f"\n{ok} of the {len(rows)} models run ({len(every)} in the {args.zoo} list) pass: parity and exact cost "
          f"on 3 configurations x 2 sides; Torch-Pruning runs on {tp_ok}\n")
    print("| model | status | groups (frozen) | parity | cost match | Torch-Pruning | reason |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        groups = f"{r['groups']} ({r.get('frozen', '?')})" if "groups" in r else ""  # early rows lack 'frozen'
        print(f"| {r['model']} | {r['status']} | {groups} | {r.get('parity', '')} | {r.get('cost_match', '')} "
              f"| {r.get('torch_pruning', '')[:40]} | {r.get('reason', '')[:120]} |")


if __name__ == "__main__":
    main()
