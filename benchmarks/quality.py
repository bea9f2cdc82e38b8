"""Does compress() pick a better network than Torch-Pruning at the same budget? CIFAR-10 (JPEG),
the pretrained ResNet-56 from ../shared/data, several budgets and seeds, two ways to share the
training budget.

Rows, each fine-tuned with the same recipe (cz.finetune: SGD, cosine, label smoothing, and
distillation from the original model exactly when compress() distils) on the same images:
  original      the pretrained model fine-tuned (the reference)
  tp-l1         Torch-Pruning, L1 magnitude, one uniform ratio, bisected to just under the limit
  tp-group-l2   Torch-Pruning, global pruning with group L2 importance, bisected likewise
  tp-taylor     Torch-Pruning, global pruning with group Taylor importance (gradients of 8 batches)
  uniform       the same bin in every group (the model's first k channels), the widest that fits
  METHOD        cz.compress(method=METHOD) with its defaults, for every registered method (bcnet, ua, dagger)
  NAME          cz.compress with --variant NAME='{"option": value, ...}' (ablations), e.g.
                'bcnet-repnas={"reparam": "repnas"}': fine-tuning with RepNAS branches, fused
"TP best" in the table is the better of tp-group-l2 and tp-taylor (by mean accuracy).

Budgets: FLOPs ('flops<=50%') or latency ('latency<=60%@ort-cpu'). A latency budget is timed at
batch LATENCY_BATCH, one thread: the original is measured first and the percentage becomes an
absolute limit in microseconds that every row meets by measurement (Torch-Pruning's ratio and the
uniform bin bisected on the measured latency, compress() given the absolute budget); every row's
latency is measured again after fine-tuning and reported beside its accuracy.

Modes (how the baselines' fine-tuning compares with compress's training):
  same-ft       baselines fine-tune for compress's fine-tuning epochs
  same-total    baselines fine-tune for compress's supernet + fine-tuning epochs
compress() rows are the same run in both modes.

    python benchmarks/quality.py --setting quick            # minutes a row on 2 CPU cores
    python benchmarks/quality.py                             # the cpu setting
    python benchmarks/quality.py --setting gpu               # all 50k images, 30 supernet epochs

Writes benchmarks/results/quality-<setting><tag>.json after every row; a rerun with the same
arguments resumes (skips the rows it has), and refuses a file written with other settings.
Skips (exit 0, naming the missing file) when ../shared/data is absent.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from common import RESULTS, commit, machine_info, write_result

from compressor.methods import METHODS

SETTINGS = {  # train/test images (None: all), epochs, compress's search effort and BN batches, batch size
    # with 1,000 test images the standard error of one top-1 was 1.4 points, as large as the
    # differences the table is about: quick scores on all 10,000, cpu on 5,000 (its whole table,
    # every row of 3 seeds at 2 budgets, then fits in about 90 minutes on the 2-core machine)
    "quick": dict(train=2000, test=None, supernet_epochs=1.0, finetune_epochs=1.0, effort=0.05,
                  calib_batches=5, batch_size=64),
    "cpu": dict(train=4000, test=5000, supernet_epochs=1.0, finetune_epochs=1.0, effort=0.05,
                calib_batches=5, batch_size=64),
    "gpu": dict(train=None, test=None, supernet_epochs=30.0, finetune_epochs=10.0, effort=0.25,
                calib_batches=10, batch_size=256),
}
BASELINES = ("original", "tp-l1", "tp-group-l2", "tp-taylor", "uniform")
OTHER_STAGES = ("prepare_s", "analyze_s", "importance_s", "latency_model_s", "measure_s", "outputs_s", "total_s")
MODES = ("same-ft", "same-total")
# compress() timings outside the fit step and fine-tuning (analyze and importance are inside prepare)
OTHER_STAGES = ("prepare_s", "analyze_s", "importance_s", "latency_model_s", "measure_s", "outputs_s", "total_s")


def bisect_prune(model, x, fits, make_pruner):
    """The Torch-Pruning result for the largest ratio step whose model `fits` (the budget's test:
    FLOPs counted, or latency measured): ratio bisected 14 times on a fresh copy each time (the cost
    falls monotonically with the ratio; a measured latency only nearly so)."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        ratio = (lo + hi) / 2
        candidate = copy.deepcopy(model).eval()
        for p, q in zip(model.parameters(), candidate.parameters()):  # Taylor importance reads .grad
            q.grad = None if p.grad is None else p.grad.clone()
        pruner = make_pruner(candidate, ratio)
        pruner.step()
        if fits(candidate):
            best, hi = candidate, ratio
        else:
            lo = ratio
    if best is None:
        raise RuntimeError("Torch-Pruning found no ratio that meets the budget")
    return best.train()


# images per timed call of a latency budget: at batch 1 a CIFAR ResNet's ONNX Runtime time is mostly
# per-operator overhead and noise (coefficient of variation 0.7 on the loaded 2-core machine), at 16 it
# follows the widths (0.06 to 0.13)
LATENCY_BATCH = 16


def budget_test(budget, space, original, x):
    """What a row must meet: (fits(model) -> bool, the budget compress() gets, compress's latency
    options, measure(model) -> median latency in microseconds, or None for a FLOPs budget). A relative
    latency budget becomes the absolute limit measured on the original here, so that every row,
    compress() included, is held to the same number of microseconds on the same runtime, at the same
    batch (compress() times at LATENCY_BATCH through latency_options; a first try without them
    timed compress() at batch 1 against the batch-16 limit and delivered the full network)."""
    import compressor as cz
    from compressor.latency import runtime
    from compressor.latency.targets import Target
    (constraint,) = cz.parse_budget(budget)
    if constraint.metric == "flops":
        limit = constraint.limit(space.flops(space.max()))
        return (lambda m: cz.measure_flops(m, x) <= limit), budget, None, None
    if constraint.metric != "latency":
        raise SystemExit(f"quality.py compares FLOPs and latency budgets, not {budget!r}")
    example = torch.randn(LATENCY_BATCH, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    timer = runtime(Target(constraint.target, batch=LATENCY_BATCH, input_shape=tuple(x.shape[1:]), reps=30))

    def measure(model):
        return timer.measure(model.cpu(), example, warn=False).median_us

    limit = constraint.limit(measure(original)) if constraint.relative else constraint.value
    return (lambda m: measure(m) <= limit), f"latency<={limit:.0f}us@{constraint.target}", {"batch": LATENCY_BATCH}, measure


def widest_uniform(space, original, fits):
    """The same bin in every group (clipped to each group's allowed bins), the widest whose slim
    model `fits`, bisected (for a measured latency, where the space has no cost table)."""
    import numpy as np
    import compressor as cz
    config = lambda b: tuple(int(c) for c in np.clip(b, space.min_bins, space.max_bins))  # noqa: E731
    lo, hi = 1, space.bins
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(cz.slim(original, space, config(mid), "left")) else (lo, mid - 1)
    return config(lo)


def tp_prune(kind, model, x, fits, train):
    import torch_pruning as tp
    ignored = lambda m: [m.get_submodule("linear")]  # noqa: E731  the classifier's outputs are the classes
    if kind == "tp-l1":
        return bisect_prune(model, x, fits, lambda m, r: tp.pruner.BasePruner(
            m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=r, ignored_layers=ignored(m)))
    if kind == "tp-group-l2":
        return bisect_prune(model, x, fits, lambda m, r: tp.pruner.BasePruner(
            m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=r, global_pruning=True,
            ignored_layers=ignored(m)))
    if kind == "tp-taylor":
        batches = list(torch.utils.data.DataLoader(train, batch_size=64, shuffle=True,
                                                   generator=torch.Generator().manual_seed(0)))[:8]

        # Taylor importance reads w * dL/dw: gradients once, on a copy (frozen shortcut weights too)
        model = copy.deepcopy(model)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        model.requires_grad_(True)
        model.train()
        for xb, yb in batches:
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
        pruned = bisect_prune(model, x, fits, lambda m, r: tp.pruner.BasePruner(
            m, x, importance=tp.importance.GroupTaylorImportance(), pruning_ratio=r, global_pruning=True,
            ignored_layers=ignored(m)))
        pruned.zero_grad(set_to_none=True)
        for n in frozen:
            pruned.get_parameter(n).requires_grad_(False)
        return pruned
    raise ValueError(kind)


def summarise(rows, budgets, modes, names):
    """Markdown tables: per budget and mode, each row's mean and min-max over seeds, and time."""
    lines = []
    for budget in budgets:
        timed = any("latency_us" in r for r in rows if r["budget"] == budget)
        for mode in modes:
            lines += [f"\n{budget}, {mode}", "| row | seeds | top-1 mean | min-max | MFLOPs | "
                      + ("latency ms (measured) | " if timed else "") + "wall s | stages (s) |",
                      "|---|---|---|---|---|---|---|" + ("---|" if timed else "")]
            table = {}
            for name in names:
                found = [r for r in rows if r["budget"] == budget and r["row"] == name
                         and r["mode"] in (mode, "both")]
                if found:
                    table[name] = found
            tp = [n for n in ("tp-group-l2", "tp-taylor") if n in table]
            if tp:
                table["TP best (" + max(tp, key=lambda n: statistics.mean(r["accuracy"] for r in table[n])) + ")"] = \
                    table[max(tp, key=lambda n: statistics.mean(r["accuracy"] for r in table[n]))]
            for name, found in table.items():
                acc = [r["accuracy"] for r in found]
                stages = {}
                for r in found:
                    for k, v in r.get("stages", {}).items():
                        stages[k] = stages.get(k, 0) + v / len(found)
                lines.append(f"| {name} | {len(found)} | {100 * statistics.mean(acc):.1f} % | {100 * min(acc):.1f}-"
                             f"{100 * max(acc):.1f} | {statistics.mean(r['flops'] for r in found) / 1e6:.1f} | "
                             + (f"{statistics.mean(r['latency_us'] for r in found) / 1e3:.1f} | " if timed else "")
                             + f"{statistics.mean(r['seconds'] for r in found):.0f} | "
                             + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + " |")
    return "\n".join(lines)


def goals(rows, budgets, modes, method="recon"):
    """Markdown: per budget and mode, `method` against the better Torch-Pruning row (TP best: by mean)
    and the uniform row, seed by seed (the same images and test set), and the time against TP best."""
    lines = ["| budget, mode | seeds | " + method + " | TP best | difference (per seed) | uniform | never below "
             "uniform | wall s: " + method + " / TP best | latency ms: " + method + " / TP best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for budget in budgets:
        for mode in modes:
            def by_seed(name):
                return {r["seed"]: r for r in rows if r["budget"] == budget and r["row"] == name
                        and r["mode"] in (mode, "both")}
            ours, uniform = by_seed(method), by_seed("uniform")
            tps = {n: by_seed(n) for n in ("tp-group-l2", "tp-taylor") if by_seed(n)}
            seeds = sorted(set(ours).intersection(*[set(t) for t in tps.values()], uniform))
            if not seeds or not tps:
                continue
            best = max(tps, key=lambda n: statistics.mean(tps[n][k]["accuracy"] for k in seeds))
            diff = [100 * (ours[k]["accuracy"] - tps[best][k]["accuracy"]) for k in seeds]
            mean = lambda table: 100 * statistics.mean(table[k]["accuracy"] for k in seeds)  # noqa: E731
            seconds = lambda table: statistics.mean(table[k]["seconds"] for k in seeds)  # noqa: E731
            cpu = lambda table: statistics.mean(table[k]["cpu_seconds"] for k in seeds)  # noqa: E731
            latency = lambda table: statistics.mean(table[k]["latency_us"] for k in seeds) / 1e3  # noqa: E731
            below = [k for k in seeds if ours[k]["accuracy"] < uniform[k]["accuracy"]]
            lines.append(f"| {budget}, {mode} | {len(seeds)} | {mean(ours):.1f} % | {mean(tps[best]):.1f} % ({best}) | "
                         f"{statistics.mean(diff):+.1f} ({', '.join(f'{d:+.1f}' for d in diff)}) | {mean(uniform):.1f} % | "
                         f"{'yes' if not below else 'no: seeds ' + str(below)} | {seconds(ours):.0f} / "
                         f"{seconds(tps[best]):.0f} ({seconds(ours) / seconds(tps[best]):.2f}x)"
                         + (f"; CPU s {cpu(ours):.0f} / {cpu(tps[best]):.0f} ({cpu(ours) / cpu(tps[best]):.2f}x)"
                            if all("cpu_seconds" in t[k] for t in (ours, tps[best]) for k in seeds) else "") + " | "
                         + (f"{latency(ours):.1f} / {latency(tps[best]):.1f} |" if "latency_us" in ours[seeds[0]]
                            else "- |"))
    return "\n".join(lines)


def report(paths):
    """Print the tables of the rows in the result files `paths` (e.g. a baseline run and a
    compress run made apart); the files must hold the same setting."""
    rows, settings = [], []
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        rows += saved["rows"]
        settings.append(saved["run"]["setting"])
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"the files hold runs of different settings: {settings}")
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    names = list(dict.fromkeys(r["row"] for r in rows))
    print(summarise(rows, budgets, MODES, names))
    print()
    print(goals(rows, budgets, MODES))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, default="cpu")
    parser.add_argument("--model", choices=("resnet56", "resnet20"), default="resnet56",
                        help="the pretrained CIFAR network (resnet20: a check on a network the defaults were not chosen on)")
    parser.add_argument("--budgets", default="flops<=50%;flops<=30%", help="';'-separated budgets: flops<=P% or latency<=P%@TARGET")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default=",".join(BASELINES + tuple(METHODS.names())))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON: a compress() row with these options (repeatable), e.g. "
                             "'bcnet-l1={\"channel_order\": \"l1\"}'; add NAME to --rows")
    parser.add_argument("--tag", default="", help="suffix of the result file, to keep runs apart")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (recorded)")
    parser.add_argument("--fresh", action="store_true", help="start the result file over")
    parser.add_argument("--report", nargs="+", metavar="FILE",
                        help="print the tables of these result files together and run nothing")
    args = parser.parse_args()
    if args.report:
        return report(args.report)
    torch.set_num_threads(args.threads)

    import compressor as cz
    from compressor.api import compress
    from compressor.config import CompressConfig
    from compressor import cifar
    from compressor.cifar import load_pretrained, pretrained_path
    from compressor.data import cifar10
    from compressor.finetune import accuracy, finetune
    from compressor.search import uniform_baseline

    try:
        weights = pretrained_path(args.model)
        cifar10("test", limit=10)
    except FileNotFoundError as e:
        print(f"skipped: {e}")
        return 0
    setting = SETTINGS[args.setting]
    budgets = [b.strip() for b in args.budgets.split(";") if b.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    variants = {}
    for v in args.variant:
        name, _, options = v.partition("=")
        variants[name] = json.loads(options)
    names = args.rows.split(",")
    unknown = [n for n in names if n not in BASELINES and n not in METHODS and n not in variants]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: give a --variant for each")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 3, 32, 32)
    default_distill = CompressConfig.distill

    name = f"quality-{args.setting}{'' if args.model == 'resnet56' else '-' + args.model}{args.tag}.json"
    path = os.path.join(RESULTS, name)
    run = {"setting": setting, "variants": variants}
    if args.model != "resnet56":  # files of ResNet-56 runs, written before the option, stay resumable
        run["model"] = args.model
    rows = []
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            saved = json.load(f)
        if saved["run"] != run:
            raise SystemExit(f"{path} holds a run with other settings ({saved['run']} vs {run}): "
                             f"pass --tag to keep both, or --fresh to start over")
        rows = saved["rows"]
    done = {(r["budget"], r["seed"], r["row"], r["mode"]) for r in rows}
    code = commit()  # per row: a resumed file may hold rows of several commits

    def save():
        return write_result(name, {"run": run, "rows": rows, "machine": machine_info(),
                                   "torch_threads": torch.get_num_threads()})

    for seed in seeds:
        train = cifar10("train", limit=setting["train"], seed=seed, augment=True)
        test = cifar10("test", limit=setting["test"], seed=seed)
        ft = dict(batch_size=setting["batch_size"], seed=seed, progress=False)
        epochs = {"same-ft": setting["finetune_epochs"],
                  "same-total": setting["supernet_epochs"] + setting["finetune_epochs"]}

        def pretrained():
            torch.manual_seed(seed)
            return load_pretrained(getattr(cifar, args.model)(), weights).to(device)

        def record(budget, row, mode, model, seconds, measure=None, **extra):
            model = model.to(device).eval()
            if measure is not None:  # every row timed the same way, after its fine-tuning
                extra["latency_us"] = round(measure(model), 1)
            rows.append(dict(budget=budget, seed=seed, row=row, mode=mode, accuracy=accuracy(model, test),
                             flops=cz.measure_flops(model.cpu(), x), params=cz.count_params(model),
                             seconds=round(seconds, 1), commit=code, **extra))
            print(json.dumps(rows[-1]), flush=True)
            save()

        for budget in budgets:
            space = cz.analyze(pretrained().cpu(), x)
            fits, compress_budget, latency_options, measure = budget_test(budget, space, pretrained().cpu(), x)
            for row in names:
                for mode in (["both"] if row not in BASELINES else modes):
                    if (budget, seed, row, mode) in done or (row == "original" and budget != budgets[0]):
                        continue
                    # wall time, and the process's CPU time: on a shared machine the ratio of two rows'
                    # CPU times still says how much work each did (one torch thread, no loader workers)
                    t0, c0 = time.time(), time.process_time()
                    original = pretrained()
                    if row in BASELINES:
                        ft_teacher = copy.deepcopy(original).eval() if default_distill else None
                        if row == "original":
                            small, stages = copy.deepcopy(original), {}
                        elif row == "uniform":
                            uniform = uniform_baseline(space, budget) if measure is None else \
                                widest_uniform(space, original.cpu(), fits)
                            small = cz.slim(original, space, uniform, "left")
                            stages = {}
                        else:
                            small = tp_prune(row, original.cpu(), x, fits, train).to(device)
                            stages = {"prune": time.time() - t0}
                        t1 = time.time()
                        finetune(small, train, epochs=epochs[mode], teacher=ft_teacher, **ft)
                        stages["finetune"] = time.time() - t1
                        record(budget, row, mode, small, time.time() - t0, measure, stages=stages,
                               cpu_seconds=round(time.process_time() - c0, 1),
                               finetune_epochs=epochs[mode])
                    else:
                        options = dict(variants.get(row, {}))
                        method = options.pop("method", row if row in METHODS else CompressConfig.method)
                        result = compress(original, compress_budget, train, None, example_input=x, method=method,
                                          latency_options=latency_options,
                                          supernet_epochs=setting["supernet_epochs"],
                                          finetune_epochs=setting["finetune_epochs"], effort=setting["effort"],
                                          calib_batches=setting["calib_batches"], batch_size=setting["batch_size"],
                                          device=device, seed=seed, progress=False, **options)
                        # the method's fit stages (bcnet: supernet, search; dagger: gates, prune) and
                        # fine-tuning, named; preparing, measuring and the rest as "other"
                        t = result.timings
                        stages = {k[:-2]: v for k, v in t.items() if k not in OTHER_STAGES}
                        stages["other"] = t["total_s"] - sum(stages.values())
                        record(budget, row, mode, result.model, time.time() - t0, measure, stages=stages,
                               cpu_seconds=round(time.process_time() - c0, 1),
                               widths=result.widths, side=result.side, supernet_score=result.supernet_score,
                               inherited=result.search.get("inherited"),
                               **({"reparam_kept": result.reparam["kept"]} if result.reparam else {}))
    print(f"\n{args.model}, CIFAR-10 JPEG, '{args.setting}' setting: {setting}, torch threads {torch.get_num_threads()}")
    print(summarise(rows, budgets, modes, names))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
