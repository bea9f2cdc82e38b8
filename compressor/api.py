"""compress(): the whole job, top to bottom.

    model -> width space -> supernet -> train -> records -> prior + evolution -> slim -> fine-tune
          -> measure -> report, plot, saved model, exports
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ._version import __version__
from .broaden import broaden, check_ratio
from .budget import Budget, Constraint, parse_budget
from .config import CHANNEL_ORDERS, CompressConfig
from .cost import count_params, measure_flops
from .data import train_val_split
from .errors import ConfigError, InfeasibleBudgetError
from .files import atomic_output, atomic_torch_save, check_writable, without_nan, write_text_atomic
from .finetune import accuracy, finetune
from .formats import export_format
from .heads import data_dependent_cost
from .latency import build_latency_model, runtime
from . import outputs, pareto
from . import trained as supernets
from .methods import METHODS, FitContext, Fitted, get_method
from .models import name_architecture, unwrap
from .reparam import finetune_repnas
from .run_identity import weights_hash
from .samplers import TrainingWindow
from .seeding import seeded
from .stopwatch import Stopwatch
from .search import (SearchResult, constraints, feasible, human, importance_baseline, pareto_search,
                     recalibrate_bn, same_draws, score, uniform_baseline, widen)
from .reconstruct import reconstruct, write_back
from .slim import channel_importance, freeze_unsliceable, order_channels, save_slim, slim
from .space import analyze
from .supernet import supernet
from .timing import cpu_latency_ms
from .train import train_supernet
from .tasks import CLASSIFICATION, get_task
from .validate import check_inputs, check_split, check_task_inputs

log = logging.getLogger("compressor")
LATENCY_RETRIES = 2  # searches again with a tightened limit when the delivered model is too slow


class LatencyBudgetMissed(InfeasibleBudgetError):
    """The slim model, measured on the target, is slower than the latency budget even after the
    tightened re-searches. `attempts` lists each search's limit, pick, prediction and measurement."""

    def __init__(self, message, attempts=()):
        super().__init__(message)
        self.attempts = list(attempts)


@dataclass
class CompressionResult:
    model: nn.Module = field(repr=False)
    widths: list
    side: str
    channels: list
    method: str
    budget: str
    limits: dict
    original: dict          # {"flops", "params", "accuracy", "latency_ms", and with a latency budget
                            #  "latency" (us, measured on its target) and "latency_predicted"}
    result: dict            # the same, measured on the slim model
    supernet_score: float   # mean of the left and right held-out scores of the chosen configuration
    timings: dict
    paths: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict, repr=False)
    reparam: dict | None = field(default=None, repr=False)  # reparam="repnas": the branches each layer got
    # supernet methods: {"trained": True, "steps"} or, from search_trained, {"trained": False, "from": supernet.pt}
    supernet: dict | None = None

    def meets_budget(self) -> bool:
        return all(self.result[m] <= limit for m, limit in self.limits.items())

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        d["compressor_version"] = __version__
        d["meets_budget"] = self.meets_budget()
        return json.dumps(without_nan(d), indent=1, allow_nan=False)


def plot_pareto(history, chosen, limit, path, metric="flops", score="held-out top-1 (supernet)"):
    """Held-out score against FLOPs of every evaluated candidate, the chosen one and the budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([e["flops"] / 1e6 for e in history], [e["score"] for e in history], s=10, alpha=0.6,
               label="evaluated candidates")
    ax.scatter([chosen["flops"] / 1e6], [chosen["score"]], s=80, marker="*", color="red", label="chosen")
    if metric == "flops":
        ax.axvline(limit / 1e6, color="gray", linestyle="--", label="budget")
    ax.set_xlabel("MFLOPs per sample")
    ax.set_ylabel(score)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def compress(model: nn.Module, budget, train_data, val_data=None, *, config: CompressConfig | None = None,
             example_input=None, device=None, out_dir=None, progress=True, latency_options=None, source=None,
             restart=False, keep_checkpoints=False, output_fn=None, task=None, **options) -> CompressionResult:
    """Compress a pretrained `model` to meet `budget` (e.g. "flops<=50%" or "flops<=50%,params<=2M").

    `options` are the fields of CompressConfig (method, supernet_epochs, finetune_epochs, effort,
    channel_order, inherit, ...; README "Options"), applied over `config` when one is given; an
    unknown one is refused with the valid names.

    `train_data` is a Dataset of (image, label) or a DataLoader (its batch size, workers and
    collate function are used; compress orders the batches itself, so its sampler is not); a
    `search_fraction` of the dataset, stratified by label, is held out to score candidates and
    batched the same way. `val_data` (optional, a Dataset or DataLoader) measures the accuracy of
    the original and the result. Costs (FLOPs, params, latency) are per sample: only the first
    sample of a batched `example_input` (default: the first training image) is used. `output_fn`
    picks the logits from a model output that is not a tensor, wherever it is used (e.g.
    `lambda out: out.logits` for GoogLeNet or Inception, which return aux logits in train mode).
    Everything that can be checked before training is (README: "What compress() checks").
    A latency budget ("latency<=3ms@ort-cpu", "latency<=60%@ort-cpu") builds the latency model of
    the target first (`latency_options`: keyword arguments of compressor.latency.build_latency_model,
    e.g. cache_dir, points, calibration, and batch: the images per timed call, default 1); the chosen slim model is then measured on the target and,
    when it misses, searched again with the limit tightened by measured/limit (at most
    LATENCY_RETRIES times) before LatencyBudgetMissed is raised.

    The stages: prepare (inputs, width space, latency model, channel order), fit (the method's:
    train the supernet, search, slim), fine-tune (on all the training data, distilled from the
    original), measure, and outputs. With `out_dir`, writes report.json, model.pt (cz.load_slim),
    pareto.png, the `export` artifacts and, for a supernet method, supernet.pt (search_trained
    searches it for other budgets without training again), and keeps supernet checkpoints there
    so an interrupted run resumes. The architecture must then be nameable for model.pt (`source`, e.g.
    'torchvision:resnet18(num_classes=4)' or 'file.py:factory'; by default the spec cz.load_model
    recorded, a recognised torchvision / timm / project builder, or a class built without
    arguments), else ConfigError before any training. A checkpoint in out_dir is resumed only by
    the same run (model, weights, data, budget and options); another run's raises ConfigError unless
    `restart=True` discards it. Every artifact is written together at the end, an earlier run's
    artifacts that this run does not produce are removed, and the supernet checkpoints are removed
    after success unless `keep_checkpoints=True`. DataParallel / DDP models are unwrapped. The
    user's model is never modified.

    `task` (compressor.tasks: a Task, or "classification", "detection", "segmentation"; default
    classification): what the model is fine-tuned on (its loss) and how candidates are ranked (its
    per-sample score on the held-out split). Another task than classification runs the default
    method "recon" (the supernet methods train with the classification loss), takes `train_data`
    items the task reads (a Dataset is batched with the task's collate), fine-tunes without
    distillation, reports val_data's "score" instead of "accuracy", and is refused with `output_fn`,
    `export`, `reparam` or a Taylor channel order; it is checked on the first training batch first.
    """
    cfg = CompressConfig.build(config, **options)
    with seeded(cfg.seed):
        return _compress(model, budget, train_data, val_data, cfg, example_input=example_input, device=device,
                         out_dir=out_dir, progress=progress, latency_options=latency_options, source=source,
                         restart=restart, keep_checkpoints=keep_checkpoints, output_fn=output_fn, task=task)


def _compress(model, budget, train_data, val_data, cfg, *, example_input, device, out_dir, progress, latency_options,
              source, restart, keep_checkpoints, output_fn, task) -> CompressionResult:
    clock = Stopwatch()
    model = unwrap(model)
    with clock("prepare"):
        run, = _prepare(model, [parse_budget(budget)], train_data, val_data, cfg, clock, example_input=example_input,
                        device=device, out_dirs=[out_dir], progress=progress, latency_options=latency_options,
                        source=source, restart=restart, output_fn=output_fn, task=task)
    ctx = replace(run.context, keep_supernet=bool(out_dir))
    fitted = _fit_method(ctx) if ctx.method.fit else _fit_supernet(ctx)  # a method that is not a supernet
    trained = None                                                           # replaces the whole step
    if fitted.supernet is not None:  # kept for search_trained: the run's identity, space, config, latency tables
        trained = supernets.bundle(method=ctx.method.name, method_options=dataclasses.asdict(ctx.options), cfg=cfg,
                                   identity=supernets.identity(model, train_data), space=ctx.space, budget=ctx.budget,
                                   window=None if ctx.window is None else ctx.window.label,
                                   kept=dict(fitted.supernet, task=ctx.task.name if ctx.task is not None else None))
    return _deliver(run, ctx, cfg, fitted, clock, out_dir, progress, output_fn, keep_checkpoints, trained,
                    supernet=None if fitted.supernet is None else {"trained": True, "steps": fitted.supernet["steps"]})


def _deliver(run, ctx, cfg, fitted, clock, out_dir, progress, output_fn, keep_checkpoints, trained=None,
             supernet=None) -> CompressionResult:
    """The stages after the fit: fine-tune, measure, and (with out_dir) the outputs; `trained`: the
    supernet.pt to write with them; `supernet`: the report's note on the supernet."""
    small, found = fitted.model, fitted.found
    clock.timings.update(fitted.timings)
    # a method that trains nothing of its own spends the supernet's epochs fine-tuning
    epochs = cfg.finetune_epochs + (cfg.supernet_epochs if ctx.method.finetunes_supernet_epochs else 0)
    with clock("finetune"):  # the held-out split has done its job (ranking candidates): all the training data
        tune = dict(epochs=epochs, lr=cfg.finetune_lr, teacher=ctx.teacher, seed=cfg.seed,
                    progress=progress, output_fn=output_fn)
        if ctx.task is not None:  # the task's loss alone (no distillation: see compress's docstring)
            tune.update(teacher=None, task=ctx.task)
        data = run.batches.loader(run.train, shuffle=True, seed=cfg.seed)
        if cfg.reparam == "repnas":  # with searched branches, fused again: `small` keeps its architecture
            branches = finetune_repnas(small, data, run.example, cfg.reparam_options, **tune)
        else:
            branches = None
            finetune(small, data, **tune)
    with clock("measure"):
        before, measured = _measure(run, small, fitted.attempts, output_fn)
    result = CompressionResult(
        model=small, widths=list(found.cfg), side=found.side, channels=ctx.space.channels(found.cfg),
        method=ctx.method.name, budget=str(ctx.budget), limits=ctx.limits, original=before, result=measured,
        supernet_score=found.score, timings={},
        search=dict(found.to_dict(), latency_attempts=fitted.attempts), reparam=branches, supernet=supernet)
    if ctx.task is not None:
        result.search["task"] = ctx.task.name
    if not result.meets_budget():  # the cost model is exact: this would be a bug, not a near miss
        raise RuntimeError(f"the slim model misses the budget: {measured} vs {ctx.limits}")
    if out_dir:
        with clock("outputs"):
            _write_outputs(result, small, run.source, ctx.space, found, constraints(ctx.space, ctx.budget),
                           run.example, out_dir, cfg.export, ctx.train_data, keep_checkpoints, trained)
            outputs.finish_checkpoints(out_dir, keep_checkpoints)
    result.timings = clock.total()
    log.info("compressed: %s -> %s, %s -> %s", human("flops", before["flops"]), human("flops", measured["flops"]),
             human("params", before["params"]), human("params", measured["params"]))
    return result


def search_trained(out_dir, model: nn.Module, budgets, train_data, val_data=None, *, target=None, example_input=None,
                   device=None, progress=True, latency_options=None, source=None, output_fn=None,
                   **options) -> dict:
    """Search the supernet that compress(..., out_dir=out_dir) with a supernet method (bcnet, ua,
    mctnas, cafenet) trained and kept in out_dir/supernet.pt for each of `budgets` (strings such as
    "flops<=30%"), without training it again; slim, fine-tune and write each result into its own folder
    out_dir/budget-<budget> (report.json, model.pt, pareto.png, exports). Returns {budget:
    CompressionResult}, keyed by each budget's normal form (str(parse_budget(b)), e.g. "flops<=30%").

    Pass the same `model`, `train_data` and `example_input` as the compress() run (they are checked
    against the saved identity: another model, other weights or other data raise ConfigError naming
    what differs). `target`: the latency target of a latency budget that names none ("latency<=2ms").
    `options`: CompressConfig fields; those that act after training (trained.SEARCH_OPTIONS: effort,
    finetune_epochs, inherit, export, ...) may change, the others default to the trained run's and
    must equal them. One latency model is built per target and serves every budget on it (with the
    run's latency measurements restored into the cache). The user's model is never modified."""
    saved, path, cfg = _load_trained(out_dir, options)
    if isinstance(budgets, str):
        budgets = [budgets]
    parsed = [parse_budget(supernets.with_target(b, target)) for b in budgets]
    if not parsed:
        raise ConfigError("search_trained needs at least one budget, e.g. budgets=['flops<=30%', 'flops<=50%']")
    if target is not None and not any(c.metric == "latency" for b in parsed for c in b):
        raise ConfigError(f"target={target!r} names the target of latency budgets, but none of "
                          f"{', '.join(map(str, parsed))} bounds latency: leave target out or give a latency budget")
    folders = [os.path.join(out_dir, supernets.folder_name(b)) for b in parsed]
    if len(set(folders)) < len(folders):
        raise ConfigError(f"budgets {', '.join(map(str, parsed))} repeat one budget: give each once")
    runs, clock = _prepare_trained(saved, path, cfg, model, parsed, folders, train_data, val_data,
                                   example_input=example_input, device=device, progress=progress,
                                   latency_options=latency_options, source=source, output_fn=output_fn)
    ordered = copy.deepcopy(runs[0].context.model)  # the budgets share it: each search starts from this copy
    if saved["window"] is not None and any(str(b) != saved["budget"] for b in parsed):
        log.warning("the supernet in %s was trained on subnets near the budget %s (supernet_window %s): for other "
                    "budgets it has seen few subnets; compress(..., supernet_window=None, supernet_sampling='window') "
                    "trains one for any budget", path, saved["budget"], saved["window"])
    results = {}
    for run, folder in zip(runs, folders):
        ctx = replace(run.context, model=copy.deepcopy(ordered))
        fitted = _fit_supernet(ctx, trained=saved)
        log.info("budget %s: searched the trained supernet of %s (no supernet training)", ctx.budget, path)
        results[str(ctx.budget)] = _deliver(run, ctx, cfg, fitted, clock, folder, progress, output_fn, False,
                                            supernet={"trained": False, "from": os.path.abspath(path), "steps": 0,
                                                      "trained_for": saved["budget"]})
        clock = Stopwatch()  # each budget's report times its own stages; the first also the shared prepare
    return results


def _load_trained(out_dir, options):
    """(supernet.pt's content, its path, the config of a later search with `options`)."""
    saved = supernets.load(out_dir, device="cpu")
    path = os.path.join(out_dir, supernets.FILE)
    return saved, path, supernets.config(saved, path, options)


def _prepare_trained(saved, path, cfg, model, budgets, folders, train_data, val_data, **prepare):
    """(one _Run per budget, the clock): the identity checks (before any expensive work), the
    trained run's latency measurements restored, the prepare stage, and the width space checked."""
    model = unwrap(model)
    if saved.get("task") is not None:
        raise ConfigError(f"{path} was trained with task {saved['task']!r}; search_trained and pareto_front score "
                          f"with classification only: run compress(..., task={saved['task']!r}) for each budget")
    supernets.check_identity(saved, model, train_data, path)
    supernets.restore_latency_caches(saved, prepare["latency_options"])
    clock = Stopwatch()
    with clock("prepare"):
        runs = _prepare(model, budgets, train_data, val_data, cfg, clock, out_dirs=folders, restart=False, **prepare)
    supernets.check_space(saved, runs[0].context.space, path)
    return runs, clock


def pareto_front(out_dir, model: nn.Module, train_data, val_data=None, *, metric="flops", limit=None, target=None,
                 example_input=None, device=None, progress=True, latency_options=None, source=None, output_fn=None,
                 **options):
    """One multi-objective search of the supernet kept in out_dir/supernet.pt (see search_trained):
    held-out score up, `metric` ("flops", "params", or "latency" on `target`) down, at most `limit`
    when given ("60%", "2.5M", "2ms"; default: the whole space). Writes out_dir/pareto/front.json
    (each point: widths, side, score, score_left, score_right, flops, params, and the predicted
    latency on a latency axis; every scored candidate; the supernet.pt it belongs to) and
    out_dir/pareto/front.png. Returns search.ParetoResult. Then pick_point(out_dir, ..., index)
    delivers one point. The model, data and options are checked as search_trained checks them;
    `effort`, `score_metric`, `calib_batches` and `seed_population` shape this search."""
    if metric not in pareto.AXES:
        raise ConfigError(f"unknown Pareto metric {metric!r}: use one of {', '.join(map(repr, pareto.AXES))}")
    if (metric == "latency") != (target is not None):
        raise ConfigError("a latency axis needs its target, e.g. metric='latency', target='ort-cpu' (CLI: --target)"
                          if metric == "latency" else f"target={target!r} is the target of a latency axis: leave it "
                          f"out with metric={metric!r}, or use metric='latency'")
    saved, path, cfg = _load_trained(out_dir, dict(options, export=()))  # the front is data: nothing to export
    budget = parse_budget(supernets.with_target(f"{metric}<={limit or '100%'}", target))
    (run,), _ = _prepare_trained(saved, path, cfg, model, [budget], [None], train_data, val_data,
                                 example_input=example_input, device=device, progress=progress,
                                 latency_options=latency_options, source=source, output_fn=output_fn)
    ctx = run.context
    net = _restore(ctx, saved)[0]
    sampler = _restored_sampler(ctx, saved)
    net.space = getattr(sampler, "space", net.space)  # bsnas: the front of the space its training shrank
    found = pareto_search(net, budget, ctx.calibration(), ctx.batched(ctx.held_out), effort=ctx.effort, seed=ctx.seed,
                          calib_batches=ctx.calib_batches, sides=ctx.sides or ctx.method.sides, progress=progress,
                          metric=ctx.score_metric, seeds=ctx.seeds, output_fn=output_fn, task=ctx.task)
    found.paths = pareto.write(out_dir, found, path, budget, target)
    return found


def pick_point(out_dir, model: nn.Module, index: int, train_data, val_data=None, *, example_input=None, device=None,
               progress=True, latency_options=None, source=None, output_fn=None, **options) -> CompressionResult:
    """Deliver point `index` of out_dir/pareto/front.json (pareto_front; 0 is the cheapest): its
    widths and side, slimmed from the trained supernet (weights as `inherit` says, BN recalibrated),
    fine-tuned, measured and written into out_dir/pareto/point-<index>/ as a budget run's folder
    (report.json, model.pt, pareto.png, exports). No search runs: the model has the point's widths,
    so its FLOPs and params are the point's; its report's budget is "flops<=F,params<=P" with those
    exact costs. A front searched on another supernet.pt is refused."""
    saved, path, cfg = _load_trained(out_dir, options)
    doc = pareto.read(out_dir, path)
    front = doc["front"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(front):
        raise ConfigError(f"pick {index!r}: the Pareto front in {out_dir} has {len(front)} points, 0 (cheapest) to "
                          f"{len(front) - 1} (best scoring); see {pareto.FOLDER}/{pareto.FRONT} or front.png")
    point = front[index]
    budget = parse_budget(f"flops<={point['flops']:.0f},params<={point['params']:.0f}")
    folder = os.path.join(out_dir, pareto.FOLDER, f"{pareto.POINT}{index}")
    (run,), clock = _prepare_trained(saved, path, cfg, model, [budget], [folder], train_data, val_data,
                                     example_input=example_input, device=device, progress=progress,
                                     latency_options=latency_options, source=source, output_fn=output_fn)
    ctx = run.context
    nan = float("nan")
    left, right = (nan if point[k] is None else point[k] for k in ("score_left", "score_right"))
    found = SearchResult(cfg=tuple(point["widths"]), side=point["side"], score_left=left, score_right=right,
                         score=point["score"], costs={k: point[k] for k in ("flops", "params")}, limits=ctx.limits,
                         history=doc["evaluated"])
    fitted = _fit_supernet(ctx, trained=saved, point=found)
    log.info("Pareto point %d of %s: %s, score %.4f (no search)", index, path, list(found.cfg), found.score)
    return _deliver(run, ctx, cfg, fitted, clock, folder, progress, output_fn, False,
                    supernet={"trained": False, "from": os.path.abspath(path), "steps": 0,
                              "trained_for": saved["budget"], "pareto_point": index, "pareto_metric": doc["metric"]})


@dataclass
class _Run:
    """What the prepare stage hands on: the fit step's context and what the later stages need."""
    context: FitContext
    train: object          # all the training data (fine-tuning)
    batches: object        # validate.LoaderOptions: how to batch it
    original: nn.Module    # the frozen user's model, on the device
    example: torch.Tensor  # one sample, on the device
    val_loader: object     # None without val_data
    before: dict           # the original's measurements so far (its accuracy)
    source: str | None     # the architecture's name for model.pt


def _prepare(model, budgets, train_data, val_data, cfg, clock, *, example_input, device, out_dirs, progress,
             latency_options, source, restart, output_fn, task=None) -> list:
    """Every check that needs no training, the width space and its constraints (an infeasible
    budget fails here), the latency models, and the channel order: one _Run per budget (and its
    out_dir, or None), sharing all but what depends on the budget (search_trained runs several).
    `task`: None or classification keeps the classification path; another, compress's docstring."""
    spec = get_method(cfg.method)
    options = spec.parse_options(cfg.method_options)
    ratio = check_ratio(spec.broaden if cfg.broaden is None else cfg.broaden, cfg.bins)
    binning = cfg.binning or ("channels" if ratio > 1 else "flops")
    if ratio > 1 and binning == "flops":  # before any work (the broadened space is built after the channel order)
        raise ConfigError(f"binning='flops' and broaden={ratio:g} (method {spec.name!r}) cannot be combined: FLOPs bins "
                          "are laid out on the original widths; use binning='channels' with broadening, or broaden=1")
    relative_latency = [str(c) for b in budgets for c in b if c.metric == "latency" and c.relative]
    if ratio > 1 and relative_latency:
        raise ConfigError(f"{relative_latency[0]} is relative to the original model, but a broadened space's latency "
                          f"model is timed on the broadened one: give an absolute limit (e.g. latency<=3ms), or "
                          f"broaden=1")
    if cfg.export and not all(out_dirs):
        raise ConfigError("export needs out_dir: the artifacts are written there")
    task = get_task(task)
    task = None if task is CLASSIFICATION else task
    check = dict(example_input=example_input, batch_size=cfg.batch_size, device=device, output_fn=output_fn,
                 latency_options=latency_options, search_fraction=cfg.search_fraction)
    if task is None:
        inputs = check_inputs(model, train_data, val_data, **check)
    else:
        _check_task_config(task, cfg, spec, model, budgets)
        inputs = check_task_inputs(task, model, train_data, val_data, **check)
    batches, device = inputs.options, inputs.device
    fit_data, held_out = train_val_split(inputs.train, cfg.search_fraction, cfg.seed, labels=inputs.labels)
    check_split(fit_data, held_out, batches, cfg.search_fraction)
    for out_dir in filter(None, out_dirs):
        check_writable(out_dir, 50 * 1024 * 1024)
        source = name_architecture(model, source)  # model.pt must be writable: fail before any training
        outputs.prepare(out_dir)

    original = copy.deepcopy(model).to(device).eval()  # the frozen reference (and distillation teacher)
    work = copy.deepcopy(model).to(device)
    before = {}
    if inputs.val is not None and task is not None:
        before["score"] = task.score(original, inputs.val_loader)
    elif inputs.val is not None:  # first: a bad label or file in val_data fails here, not after fine-tuning
        before["accuracy"] = accuracy(original, inputs.val_loader, output_fn=output_fn)
    x = inputs.example.to(device)
    with clock("analyze"):
        # groups whose slimming breaks a module are frozen now, not refused after training
        space = freeze_unsliceable(work, analyze(work, x, bins=cfg.bins, divisor=cfg.divisor, exclude=cfg.exclude,
                                                 binning=binning, map_shuffles=cfg.map_shuffles))
    if ratio == 1:  # a broadened space gets its latency models and bounds once it is built, below
        bounds_of = _bounds(work, space, budgets, clock, progress, latency_options)

    importance = None
    if cfg.channel_order != "none" or cfg.seed_population:
        criterion, layout = CHANNEL_ORDERS[cfg.channel_order] or ("l1", None)
        with clock("importance"), torch.random.fork_rng(devices=[]):  # the same batches and augmentations per seed
            torch.manual_seed(cfg.seed)
            importance = channel_importance(work, space, criterion,
                                            batches.loader(fit_data, shuffle=True, seed=cfg.seed), output_fn=output_fn)
    unordered = None
    if cfg.channel_order != "none":
        unordered, work = work, order_channels(work, space, layout=layout, importance=importance)
    if ratio > 1:  # after the channel order: the new channels come after the most important ones
        with clock("broaden"):
            if unordered is not None:
                unordered, _ = broaden(unordered, space, ratio, seed=cfg.seed)
            work, space = broaden(work, space, ratio, seed=cfg.seed)
        bounds_of = _bounds(work, space, budgets, clock, progress, latency_options)
    shared = FitContext(
        model=work, unordered=unordered, space=space, train_data=fit_data, held_out=held_out, budget=None,
        method=spec,
        options=options, teacher=original if cfg.distill and task is None else None, epochs=cfg.supernet_epochs,
        batch_size=batches.batch_size,
        lr=cfg.lr, effort=cfg.effort, calib_batches=cfg.calib_batches, conv_impl=cfg.conv_impl, seed=cfg.seed,
        progress=progress, score_metric=cfg.score_metric, inherit=cfg.inherit, sides=cfg.sides, restart=restart,
        final_batches=cfg.final_batches, output_fn=output_fn, batches=batches, score_original=cfg.score_original,
        sampling=cfg.supernet_sampling, reconstruct=cfg.reconstruct, task=task)
    runs, weights = [], weights_hash(model)
    for budget, bounds, out_dir in zip(budgets, bounds_of, out_dirs):
        context = replace(
            shared, budget=budget, latency=_latency_constraint(budget), limits={b.metric: b.limit for b in bounds},
            checkpoint_dir=os.path.join(out_dir, outputs.CHECKPOINTS) if out_dir else None,
            window=_training_window(bounds, cfg.supernet_window, cfg.supernet_sampling),
            # the user's weights define the run (the ordered copy follows from them and the data)
            # (train_supernet records the method, its options, the seed, batch size and lr itself)
            identity=dict({k: v for k, v in cfg.identity().items() if k not in _TRAINER_RECORDS},
                          weights=weights, budget=str(budget), latency_options=latency_options),
            # the seeds use the budget: uniform width too is widened, most important next channels first
            seeds=[widen(space, uniform_baseline(space, budget), importance, budget),
                   importance_baseline(space, importance, budget)] if cfg.seed_population else [])
        runs.append(_Run(context, inputs.train, batches, original, x,
                         inputs.val_loader if inputs.val is not None else None, before, source))
    return runs


def _bounds(work, space, budgets, clock, progress, latency_options) -> list:
    """Per budget, its constraints on `space` (InfeasibleBudgetError before any training), after the
    latency model of each latency target the budgets name is built."""
    bounds_of = []
    for budget in budgets:
        latency = _latency_constraint(budget)
        if latency is not None and latency.target not in space.latency_models:  # one table per target, any budgets
            with clock("latency_model"):
                build_latency_model(work, space, latency.target, progress=progress, **(latency_options or {}))
        bounds_of.append(constraints(space, budget))
        log.info("%d channel groups (%d frozen); budget %s", len(space), len(space.frozen),
                 ", ".join(f"{b.text}: {human(b.metric, b.limit)}" for b in bounds_of[-1]))
    return bounds_of


_TRAINER_RECORDS = ("method", "method_options", "seed", "batch_size", "lr", "sides")


def _check_task_config(task, cfg, spec, model, budgets):
    """The options a task other than classification cannot run with, refused before any work."""
    varies = data_dependent_cost(model)
    costs = sorted({c.metric for b in budgets for c in b} - {"params"})
    if varies and costs:
        raise ConfigError(f"a {' and '.join(costs)} budget cannot be met exactly on {type(model).__name__}: {varies}; "
                          "give a parameter budget (e.g. 'params<=50%')")
    refused = [(not spec.tasks, f"method={spec.name!r} trains with the classification loss or logits",
                f"use one of {', '.join(repr(n) for n in METHODS if METHODS.get(n).tasks)}"),
               (bool(cfg.export), f"export={list(cfg.export)}: exporting a detector's or segmenter's "
                                  "post-processing is not supported", "leave export out"),
               (cfg.reparam is not None, f"reparam={cfg.reparam!r} fine-tunes with the classification loss",
                "leave reparam out"),
               (cfg.channel_order.startswith("taylor"), f"channel_order={cfg.channel_order!r} takes gradients "
                                                         "of the classification loss", "use 'l2' or 'l1'")]
    for bad, what, fix in refused:
        if bad:
            raise ConfigError(f"task {task.name!r}: {what}; {fix}")


def _training_window(bounds, low, sampling):
    """The configurations supernet training draws: first constraint's cost in [low x limit, limit]
    and every constraint met (None: the whole space; anchored sampling keeps the constraints)."""
    if low is None and sampling != "anchored":
        return None
    return TrainingWindow(cost=bounds[0].cost, feasible=functools.partial(feasible, bounds),
                          low=(low or 0) * bounds[0].limit,
                          label=f"{low or 0} x the limit")  # the run records the budget


def _measure(run, small, attempts, output_fn):
    """(the original's measurements, the slim model's): FLOPs, params, CPU latency on a CPU device,
    the target latency with a latency budget, and accuracy on val_data when given."""
    x, original, ctx = run.example, run.original, run.context
    before = dict(run.before, flops=measure_flops(original, x), params=count_params(original))
    measured = {"flops": measure_flops(small.eval(), x), "params": count_params(small)}
    if x.device.type == "cpu":
        before["latency_ms"] = cpu_latency_ms(original, x)
        measured["latency_ms"] = cpu_latency_ms(small, x)
    if ctx.latency is not None:
        space, target = ctx.space, ctx.latency.target
        before["latency"] = space.latency_model(target).original_us
        before["latency_predicted"] = space.latency(space.max(), target)
        # predicted where the latency model was timed on another machine (attempts[-1]["note"])
        measured["latency"] = attempts[-1]["measured_us"] if attempts[-1]["measured_us"] is not None \
            else attempts[-1]["predicted_us"]
        measured["latency_predicted"] = attempts[-1]["predicted_us"]
    if run.val_loader is not None and ctx.task is not None:
        measured["score"] = ctx.task.score(small, run.val_loader)
    elif run.val_loader is not None:
        measured["accuracy"] = accuracy(small, run.val_loader, output_fn=output_fn)
    return before, measured


def _fit_method(ctx: FitContext) -> Fitted:
    """The fit step of a method that replaces it; with a latency budget, again with a tightened
    limit while the delivered model misses it (as _search_and_slim does for supernet methods)."""
    search_budget, attempts, timings = ctx.budget, [], {}
    while True:
        fitted = ctx.method.fit(replace(ctx, budget=search_budget))
        for k, v in fitted.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        if ctx.latency is not None:
            search_budget = _delivery_check(fitted.model, ctx.space, fitted.found, ctx.latency,
                                            ctx.limits["latency"], search_budget, attempts)
        if ctx.latency is None or search_budget is None:
            return replace(fitted, attempts=attempts or fitted.attempts, timings=timings)


def _fit_supernet(ctx: FitContext, trained=None, point=None) -> Fitted:
    """The fit step of a supernet method: train the supernet, search it (again, with a tightened
    limit, while the delivered model misses a latency budget) and slim the chosen configuration.
    `trained`: a supernet.pt's content (search_trained): its weights replace the training.
    `point`: a SearchResult delivered instead of a search (pick_point)."""
    clock, space = Stopwatch(), ctx.space
    reference = copy.deepcopy(ctx.model) if ctx.reconstruct != "none" else None  # the full model, untrained
    if trained is None:
        net, before, records, anchors, steps, sampler = _train(ctx, reference, clock)
    else:
        net, before, records, anchors = _restore(ctx, trained)
        sampler = _restored_sampler(ctx, trained)
    # what search_trained needs, before the search recalibrates the supernet's BN statistics; the
    # trained sampler too, where the search reads it (bsnas: the shrunk space, mctnas: the tree)
    kept = None if trained is not None or not ctx.keep_supernet else {
        "supernet": _cloned(net.model), "before": None if before is None else _cloned(before.model),
        "records": [[float(l), list(c), s] for l, c, s in records], "anchors": [list(a) for a in anchors],
        "steps": steps, "sampler": None if sampler is None else sampler.state_dict()}
    with clock("search"):
        small, found, attempts = _search_and_slim(ctx, net, before, records, anchors, sampler, point)
    if ctx.reconstruct == "final":
        with clock("reconstruct"):  # the delivered configuration, from the weights before training
            small = slim(reference, space, found.cfg, found.side)
            reconstruct(small, reference, space, found.cfg, found.side, ctx.calibration())
            found.inherited = "reconstructed"
    return Fitted(small, found, attempts, clock.timings, supernet=kept)


def _cloned(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(ctx, reference, clock):
    """(supernet, supernet over the weights before training or None, records, anchors, steps, the
    trained sampler): the anchor, its reconstruction and the supernet training."""
    net = supernet(ctx.model, ctx.space, impl=ctx.conv_impl)
    window = ctx.window
    if ctx.sampling == "anchored" and window is not None and ctx.seeds:
        with clock("anchor"):
            anchor, anchor_score = _best_seed(ctx, net)
            window = replace(window, anchors=(anchor,))
        if ctx.reconstruct == "anchor":
            with clock("reconstruct"):  # ctx.model holds net's parameters: the supernet starts there
                _reconstruct_anchor(ctx, net, reference, anchor, anchor_score)
    # training changes ctx.model: a supernet over a copy keeps the weights before it
    before = supernet(copy.deepcopy(ctx.model), ctx.space, impl=ctx.conv_impl) if ctx.inherit != "supernet" else None
    with clock("supernet"):
        trained = train_supernet(net, ctx.batched(ctx.train_data), method=ctx.method, method_options=ctx.options,
                                 epochs=ctx.epochs, batch_size=ctx.batch_size, lr=ctx.lr, teacher=ctx.teacher,
                                 seed=ctx.seed, progress=ctx.progress, checkpoint_dir=ctx.checkpoint_dir,
                                 restart=ctx.restart, identity=ctx.identity, output_fn=ctx.output_fn,
                                 window=window, sides=ctx.sides, task=ctx.task)
    return (net, before, trained.records, window.anchors if window is not None else (), trained.steps,
            trained.sampler)


def _restore(ctx, trained):
    """(supernet, supernet over the weights before training or None, records, anchors) from a
    supernet.pt: the trained budget's anchors only for that budget (elsewhere they may be infeasible)."""
    untrained = copy.deepcopy(ctx.model) if ctx.inherit != "supernet" else None
    ctx.model.load_state_dict(trained["supernet"])  # the channel-ordered model: the same keys and shapes
    net = supernet(ctx.model, ctx.space, impl=ctx.conv_impl)
    before = None
    if ctx.inherit != "supernet":  # trained.config() checked that the run kept them
        untrained.load_state_dict(trained["before"])
        before = supernet(untrained, ctx.space, impl=ctx.conv_impl)
    records = [(loss, tuple(cfg), side) for loss, cfg, side in trained["records"]]
    anchors = [tuple(a) for a in trained.get("anchors", ())] if str(ctx.budget) == trained["budget"] else ()
    return net, before, records, anchors


def _restored_sampler(ctx, trained):
    """The trained sampler of a supernet.pt, or None where the file predates keeping it (the search
    then starts from the seeds, on the whole space)."""
    if trained.get("sampler") is None:
        return None
    sampler = ctx.method.sampler(ctx.space, ctx.seed, ctx.options, None, ctx.sides)
    sampler.load_state_dict(trained["sampler"])
    return sampler


def _best_seed(ctx, net):
    """The seed configuration whose left path scores best on the held-out split with the weights
    before training (BN recalibrated): the anchor supernet training moves around."""
    calib, scoring = ctx.calibration(), ctx.batched(ctx.held_out)
    scores = [same_draws(score, net, cfg, "left", scoring, calib, calib_batches=ctx.calib_batches,
                         metric=ctx.score_metric, output_fn=ctx.output_fn, task=ctx.task) for cfg in ctx.seeds]
    best = max(range(len(scores)), key=scores.__getitem__)  # ties: the first seed
    log.info("training anchor %s (seed scores before training: %s)", list(ctx.seeds[best]),
             ", ".join(f"{s:.4f}" for s in scores))
    return tuple(ctx.seeds[best]), scores[best]


def _reconstruct_anchor(ctx, net, reference, anchor, score_before):
    """Refit the anchor's layers by least squares toward the untrained full model and write them
    into the supernet's weights, kept only when the anchor's held-out score does not drop (a
    network whose pruned features no longer resemble the full one's can fit noise)."""
    calib, scoring = ctx.calibration(), ctx.batched(ctx.held_out)
    saved = copy.deepcopy(ctx.model.state_dict())
    small = slim(ctx.model, ctx.space, anchor, "left")
    write_back(ctx.model, small, ctx.space, anchor, "left",
               reconstruct(small, reference, ctx.space, anchor, "left", calib,
                           images=ctx.task.images if ctx.task is not None else None))
    after = same_draws(score, net, anchor, "left", scoring, calib, calib_batches=ctx.calib_batches,
                       metric=ctx.score_metric, output_fn=ctx.output_fn, task=ctx.task)
    log.info("reconstructed the anchor: held-out score %.4f -> %.4f%s", score_before, after,
             "" if after >= score_before else " (worse: the weights before it are kept)")
    if after < score_before:
        ctx.model.load_state_dict(saved)


def _search_and_slim(ctx, net, before, records, anchors=(), sampler=None, point=None):
    """Search the trained supernet and slim the chosen configuration; with a latency budget, again
    with a tightened limit while the delivered model misses it. `sampler`: the trained one, which
    the method's searcher_kwargs may hand the searcher. `point`: the configuration to slim instead
    of a search's (its budget bounds no latency)."""
    space = ctx.space
    calib, scoring = ctx.calibration(), ctx.batched(ctx.held_out)
    search_budget, attempts = ctx.budget, []
    while True:
        found = point if point is not None else ctx.method.searcher(
            net, search_budget, calib, scoring, records=records, effort=ctx.effort, seed=ctx.seed,
            calib_batches=ctx.calib_batches, sides=ctx.sides or ctx.method.sides, progress=ctx.progress,
            metric=ctx.score_metric, seeds=ctx.seeds, output_fn=ctx.output_fn, task=ctx.task,
            final_data=_second_look(calib, ctx.calib_batches, ctx.final_batches),
            alternate=before if ctx.score_original else None, anchors=anchors,
            **ctx.method.searcher_kwargs(ctx.options, sampler))
        source, found.inherited = _inheritance(net, before, found, ctx.inherit, calib, scoring,
                                               ctx.calib_batches, ctx.score_metric, ctx.output_fn, ctx.task)
        # the slim model inherits BN statistics calibrated for its configuration
        recalibrate_bn(source, found.cfg, found.side, calib, batches=ctx.calib_batches, task=ctx.task)
        source.full()
        small = slim(source.model, space, found.cfg, found.side)
        if ctx.latency is None:
            return small, found, attempts
        search_budget = _delivery_check(small, space, found, ctx.latency, ctx.limits["latency"], search_budget,
                                        attempts)
        if search_budget is None:
            return small, found, attempts


class Batches:
    """Batches start..stop of a loader, as a re-iterable (each pass the same batches when the loader
    yields the same ones): the search's second look uses training batches past the BN calibration's."""

    def __init__(self, data, start, stop):
        self.data, self.start, self.stop = data, start, stop

    def __iter__(self):
        return itertools.islice(iter(self.data), self.start, self.stop)


def _second_look(calib, calib_batches, final_batches):
    """The batches for the search's second look: those after the calibration batches (from the start
    when the data has no more), or None when final_batches is 0."""
    if not final_batches:
        return None
    start = calib_batches if len(calib) > calib_batches else 0
    return Batches(calib, start, start + final_batches)


def _inheritance(net, before, found, inherit, calib, scoring, calib_batches, metric, output_fn=None, task=None):
    """(the supernet to slim from, its name): the trained supernet `net`, or `before` (the weights
    before supernet training); with "best", the one whose held-out score of the chosen
    configuration and side is higher (ties keep the trained supernet)."""
    if inherit == "supernet":
        return net, "supernet"
    if inherit == "original":
        return before, "original"
    kept = found.score_alternate if found.side == "left" and not math.isnan(found.score_alternate) else \
        same_draws(score, before, found.cfg, found.side, scoring, calib, calib_batches=calib_batches,
                   metric=metric, output_fn=output_fn, task=task)  # the draws the search scored the candidate with
    trained = found.score_right if found.side == "right" else found.score_left  # a placement: its left score
    log.info("weights for the slim model: supernet scores %.4f, before supernet training %.4f", trained, kept)
    return (before, "original") if kept > trained else (net, "supernet")


def _latency_constraint(budget):
    """The budget's latency constraint, or None; compress() supports one latency target."""
    found = [c for c in budget if c.metric == "latency"]
    if len(found) > 1:
        raise ConfigError(f"compress() takes one latency target per run, got {', '.join(map(str, found))}")
    return found[0] if found else None


def _delivery_check(small, space, found, latency, limit, search_budget, attempts):
    """Measure the slim model end to end on the target and record the attempt. Returns None when it
    meets `limit`, else the budget to search again with: the latency limit divided by
    measured/limit. Raises LatencyBudgetMissed after LATENCY_RETRIES re-searches, or when the
    tightened limit is below anything the space reaches."""
    model = space.latency_model(latency.target)
    searched = next(c for c in search_budget if c.metric == "latency").limit(model.original_us)
    if "measured_on" in model.info:  # a latency model from the device's timings: this machine cannot check it
        attempts.append({"cfg": list(found.cfg), "limit_us": searched, "measured_us": None,
                         "predicted_us": space.latency(found.cfg, latency.target),
                         "note": f"not measured: the latency model was timed on {model.info['device']}; "
                                 "check model.onnx there with compressor bench"})
        return None
    delivered = runtime(model.target).measure(small, model.target.example(), what="the slim model")
    attempts.append({"cfg": list(found.cfg), "limit_us": searched, "predicted_us": space.latency(found.cfg, latency.target),
                     "measured_us": delivered.median_us, "p90_us": delivered.p90_us, "unstable": delivered.unstable})
    if delivered.median_us <= limit:
        return None
    ratio = delivered.median_us / limit
    missed = (f"the slim model measures {human('latency', delivered.median_us)} on {latency.target}, "
              f"{100 * (ratio - 1):.1f}% over the budget {latency} = {human('latency', limit)} (predicted "
              f"{human('latency', attempts[-1]['predicted_us'])})")
    if len(attempts) > LATENCY_RETRIES:
        raise LatencyBudgetMissed(f"{missed}, after {LATENCY_RETRIES} re-searches with tightened limits: "
                                  f"loosen the budget or rebuild the latency model with more calibration points",
                                  attempts)
    tightened = Constraint("latency", float(f"{searched / ratio:.4g}"), target=latency.target)  # readable in logs
    log.warning("%s: searching again with the limit tightened to %s", missed, human("latency", tightened.value))
    budget = Budget([tightened if c.metric == "latency" else c for c in search_budget])
    try:
        constraints(space, budget)
    except InfeasibleBudgetError as e:
        raise LatencyBudgetMissed(f"{missed}; a search with the limit tightened to "
                                  f"{human('latency', tightened.value)} is infeasible: {e}", attempts) from e
    return budget


def _write_outputs(result, small, source, space, found, bounds, x, out_dir, export, calib_data, keep_checkpoints,
                   trained=None):
    paths = result.paths
    with outputs.Staging(out_dir) as stage:
        if trained is not None:  # data only (weights_only=True): search_trained reads it back
            atomic_torch_save(trained, stage.path(supernets.FILE))
            paths["supernet"] = stage.final(stage.path(supernets.FILE))
        save_slim(small, stage.path("model.pt"), source=source)
        paths["model"] = stage.final(stage.path("model.pt"))
        history = [dict(e, score=(e["score_left"] + e["score_right"]) / 2 if e["score_right"] == e["score_right"]
                        else e["score_left"]) for e in result.search["history"]]
        chosen = next(e for e in history if tuple(e["cfg"]) == tuple(found.cfg))
        plot_pareto(history, chosen, bounds[0].limit, stage.path("pareto.png"), bounds[0].metric,
                    *([f"held-out {result.search['task']} score"] if "task" in result.search else []))
        paths["pareto"] = stage.final(stage.path("pareto.png"))
        for fmt in export:
            from .exporters import export_file
            meta = {"widths": json.dumps(result.widths), "side": result.side}
            form = export_format(fmt)
            written = export_file(small, x, stage.path(form.filename()), fmt=form.runtime, precision=form.precision,
                                  calib_data=calib_data if form.precision == "int8" else None, metadata=meta)
            paths[fmt] = stage.final(written[-1] if isinstance(written, (list, tuple)) else written)
        if keep_checkpoints and os.path.isdir(os.path.join(out_dir, outputs.CHECKPOINTS)):
            paths["checkpoints"] = os.path.join(os.path.abspath(out_dir), outputs.CHECKPOINTS)
        paths["report"] = stage.final(stage.path("report.json"))
        write_text_atomic(stage.path("report.json"), result.to_json())
