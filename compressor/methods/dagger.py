"""DAGGER, data-agnostic filter gating (METHOD section 8; Su et al., arXiv 2010.15041): a small
network reads each channel's pretrained weights and outputs its gate; the gated network is trained
on the task loss plus a cost regulariser computed exactly from the gates by the cost model; then
the channels with the lowest gates are removed until the budget holds. No supernet and no search:
it replaces compress()'s whole fit step (the fast path).

Choices where the paper is silent are marked (choice). The main ones:
- gates act per channel of a width group, on the outputs of the group's member layers after
  normalisation (a conv that feeds a batch norm is not gated, its batch norm is), so every member
  of a group shares one gate per channel and a 0/1 gate pattern is exactly a slimmed network;
- the pretrained network is frozen (weights and batch-norm statistics, eval mode): only the gate
  network learns, and fine-tuning comes after slimming;
- gate = sigmoid((offset[group] + centred MLP score) / temperature): a learned offset per group
  sets the group's width, an MLP shared by all groups ranks the channels inside a group from
  features of their weights (and their position in the channel order compress() chose);
- the regulariser is lam * (r - 1)^2 with r the gated cost relative to the budget (the largest
  cost / limit over its constraints): two-sided, so an overshoot is pulled back, and over the
  binding constraint only, so flops and params budgets can be combined;
- the widths are the groups' soft widths (sums of gates) scaled down together until every
  constraint holds exactly, each group keeping its highest gates (allocation_scores says why not
  one threshold on the raw gates).
Measured defaults (CIFAR ResNet-56, the quality benchmark's quick setting, flops<=50%, seed 0, one
run each, top-1 after compress's fine-tuning; the MLP then also read two per-group features, since
dropped as the offsets carry the widths): Adam lr 0.01 / 0.02 / 0.05 gave 65.1 / 64.9 / 55.3 %; an
uncentred MLP (it moved widths too) 17.9 to 61.2 %; a threshold on the raw gates 15.4 to 20.7 %.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..batches import check_labels, logits, read_batches
from ..checkpoint import resume, rng_state, set_rng_state
from ..errors import ConfigError
from ..files import atomic_torch_save
from ..layers import kind_of
from ..losses import kd
from ..progress import Progress
from ..run_identity import run_identity, weights_hash
from ..search import Evaluated, SearchResult, constraints, importance_baseline, recalibrate_bn, same_draws, score
from ..slim import order_channels, per_layer_index, slim
from ..stopwatch import Stopwatch
from ..supernet import supernet
from .base import Fitted, Method, register

log = logging.getLogger("compressor.dagger")
CHECKPOINT = "dagger-last.pt"
INITIAL_GATE = 0.9      # (choice) every gate starts here: the gated network starts close to the original
LABEL_SMOOTHING = 0.1   # (choice) the task loss of supernet training and fine-tuning ...
DISTILL_WEIGHT = 0.5    # ... and its distillation weight when compress() distils
FEATURES = ("l1", "l2", "bn_scale", "bn_shift", "position")


@dataclass(frozen=True)
class DaggerOptions:
    epochs: float = 0.5         # gate training, in epochs of the training split (a fraction: the fast path)
    lam: float = 10.0           # weight of the cost regulariser
    temperature: float = 1.0    # gate = sigmoid(logit / temperature)
    hidden: int = 16            # hidden units of the gate network
    lr: float = 0.02            # Adam's learning rate for the gate network
    checkpoint_every: int = 50  # steps between checkpoints (with compress's out_dir)

    def __post_init__(self):
        for name, low, integer in (("epochs", 0, False), ("lam", None, False), ("temperature", 0, False),
                                   ("hidden", 0, True), ("lr", 0, False), ("checkpoint_every", 0, True)):
            value = getattr(self, name)
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or \
                    (value <= low if low is not None else value < 0):
                kind = "an integer" if integer else "a number"
                raise ConfigError(f"dagger option {name} must be {kind} {'> 0' if low is not None else '>= 0'}, "
                                  f"got {value!r}")


# -- gates on a model ------------------------------------------------------------------------------
def gate_points(model: nn.Module, space) -> dict:
    """{module name: LongTensor over its output channels}: where the gates act. Entry i of a
    layer's tensor is the position of its output channel i in [1, all the groups' gates] (0: not
    gated, gate 1); group g's gates follow group g-1's. Every member that produces a group's
    channels is gated, except a conv or linear layer whose output goes straight into a batch norm
    of the group (choice): that batch norm is gated instead, after it normalises."""
    offsets = np.cumsum([0] + [group.size for group in space.groups])
    picks = {}
    for g, group in enumerate(space.groups):
        for (name, role), table in group.index.items():
            if role == "out":
                module = model.get_submodule(name)
                pick = picks.setdefault(name, np.zeros(kind_of(module).size(module, "out"), dtype=np.int64))
                pick[table] = 1 + offsets[g] + np.arange(group.size)[:, None]
    normalised = _feeding_norms(model, space.example_input, picks)
    return {name: torch.from_numpy(pick) for name, pick in picks.items() if name not in normalised}


def _feeding_norms(model, example, names) -> set:
    """The modules of `names` whose output is the input of a batch norm layer, from one forward."""
    outputs, feeding = {}, set()
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
             for n in names]
    hooks += [m.register_forward_pre_hook(lambda m, args: feeding.update(n for n, o in outputs.items() if o is args[0]))
              for m in model.modules() if kind_of(m) is not None and kind_of(m).name == "bn"]
    try:
        with torch.no_grad():
            model(example.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return feeding


class Gates:
    """Hooks that multiply the outputs of `model`'s gated layers (gate_points) by the gates given
    to set(): a flat tensor, group after group. remove() takes the hooks off."""

    def __init__(self, model: nn.Module, picks: dict):
        self.picks, self.all = picks, None
        self.handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in picks]

    def _hook(self, name):
        def hook(module, inputs, output):
            shape = [1] * output.dim()
            shape[kind_of(module).channel_dim] = -1
            return output * self.all[self.picks[name]].view(shape)
        return hook

    def set(self, gates: torch.Tensor):
        self.all = torch.cat([gates.new_ones(1), gates])

    def remove(self):
        for h in self.handles:
            h.remove()


# -- the gate network ------------------------------------------------------------------------------
def _per_index(module, role, p):
    """The L-p norm of the module's weight per layer index of its channels on `role`, divided by
    the mean over indices."""
    w = module.weight.detach().abs().float()
    norm = per_layer_index(module, role, w ** p) ** (1 / p) if w.dim() > 1 else w
    return (norm / norm.mean().clamp_min(1e-12)).cpu().numpy()


def weight_features(model: nn.Module, space) -> tuple:
    """(features (C, len(FEATURES)), group index (C,)) for the C channels of all groups, group
    after group: the L1 and L2 norms of the channel's weights in each conv or linear member (its
    filter or its input columns, each layer's values divided by their mean) averaged over the
    members, its batch-norm scale |gamma| (divided by the layer's mean) and shift
    beta / mean |gamma|, and its position in the group (0 first, 1 last); every column
    standardised over all channels. The weights only, and their order (choice: compress() has
    ordered the channels by its channel_order, Taylor importance by default, so the position
    carries that ranking to a gate network that trains for a fraction of an epoch)."""
    rows = []
    for group in space.groups:
        values = {"l1": [], "l2": [], "bn_scale": [], "bn_shift": []}
        for (name, role), table in group.index.items():
            module = model.get_submodule(name)
            kind, weight = kind_of(module), getattr(module, "weight", None)
            if weight is None:
                continue
            if kind.name == "bn":
                scale = weight.detach().abs().float().mean().clamp_min(1e-12)
                values["bn_scale"].append(_per_index(module, "out", 1)[table].mean(1))
                values["bn_shift"].append((module.bias.detach().float() / scale).cpu().numpy()[table].mean(1)
                                          if module.bias is not None else np.zeros(group.size))
            else:
                for p, key in ((1, "l1"), (2, "l2")):
                    values[key].append(_per_index(module, role, p)[table].mean(1))
        neutral = {"l1": 1.0, "l2": 1.0, "bn_scale": 1.0, "bn_shift": 0.0}
        columns = [np.mean(values[k], axis=0) if values[k] else np.full(group.size, neutral[k]) for k in neutral]
        rows.append(np.stack(columns + [np.linspace(0, 1, group.size)], axis=1))
    features = torch.tensor(np.concatenate(rows), dtype=torch.float32)
    std = features.std(0, unbiased=False)
    features = (features - features.mean(0)) / torch.where(std > 1e-6, std, torch.ones_like(std))
    group = torch.repeat_interleave(torch.arange(len(space)), torch.as_tensor(space.sizes))
    return features, group


class GateNet(nn.Module):
    """Channel features -> gates in (0, 1), gate = sigmoid((offset[group] + rank score) / temperature):
    one learned offset per group sets the group's width, and an MLP shared by all groups scores
    each channel from its features, centred on its group's mean so that it only ranks the channels
    inside a group (choice: a width is the offsets' business, which channels the MLP's). The MLP's
    last layer starts at zero: every gate starts at INITIAL_GATE, ties that keep the model's channel
    order until training separates them."""

    def __init__(self, features, group, groups, hidden, temperature):
        super().__init__()
        self.features, self.group, self.temperature = features, group, temperature
        self.count = torch.bincount(group, minlength=groups).clamp_min(1).to(features.dtype)
        self.mlp = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        self.offset = nn.Parameter(torch.full((groups,), temperature * math.log(INITIAL_GATE / (1 - INITIAL_GATE))))

    def forward(self):
        rank = self.mlp(self.features).squeeze(1)
        mean = torch.zeros_like(self.offset).index_add(0, self.group, rank) / self.count
        return torch.sigmoid((self.offset[self.group] + rank - mean[self.group]) / self.temperature)


# -- the cost of gates -----------------------------------------------------------------------------
def gated_cost(space, gates, metric: str = "flops") -> torch.Tensor:
    """The exact cost (FLOPs or params of one sample) of the network whose group g keeps
    sum(gates[g]) channels: space.flops of the configuration when the gates are 0 or 1.
    `gates`: one tensor per group. Differentiable in the gates."""
    kept = torch.stack([g.sum() for g in gates]).double()
    return space.cost.differentiable(metric, kept)


def cost_penalty(space, gates, bounds) -> torch.Tensor:
    """(r - 1)^2, where r = max over the constraints `bounds` (search.constraints) of cost / limit:
    the gated network's cost relative to the budget, pulled to the budget from either side
    (choice: two-sided, so that an overshoot below the budget is pulled back and the gates keep
    the budget's channels; over the binding constraint only, so a constraint that does not bind
    pulls nothing)."""
    ratio = torch.stack([gated_cost(space, gates, b.metric) / b.limit for b in bounds]).max()
    return (ratio - 1) ** 2


# -- the fit step ----------------------------------------------------------------------------------
def fit(ctx) -> Fitted:
    """compress()'s fit step for DAGGER: train the gates, remove the lowest until the budget holds, slim."""
    if ctx.latency is not None:
        raise ConfigError(f"method 'dagger' does not support latency budgets ({ctx.latency}): its regulariser "
                          f"is the cost model's FLOPs and params; use a flops or params budget, or method 'bcnet'")
    clock = Stopwatch()
    with clock("gates"):
        gates = train_gates(ctx, constraints(ctx.space, ctx.budget))
    with clock("prune"):
        small, found = _prune(ctx, gates)
    return Fitted(small, found, [], clock.timings)


def train_gates(ctx, bounds) -> list:
    """Train the gate network on a frozen copy of ctx.model; returns the final gates, one numpy
    array per group. Resumes from ctx.checkpoint_dir as supernet training does."""
    options, space = ctx.options, ctx.space
    device = next(ctx.model.parameters()).device
    work = copy.deepcopy(ctx.model).eval().requires_grad_(False)
    features, group = weight_features(work, space)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        net = GateNet(features.to(device), group.to(device), len(space), options.hidden, options.temperature).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=options.lr)
    batched = ctx.batched
    per_epoch = len(batched(ctx.train_data, shuffle=True))
    if per_epoch == 0:
        raise ConfigError(f"the training split has {len(ctx.train_data)} samples: fewer than one batch of "
                          f"{ctx.batch_size}; lower batch_size")
    total = max(1, math.ceil(options.epochs * per_epoch))
    start, path, run, saved_rng = 0, None, None, None
    if ctx.checkpoint_dir:
        run = run_identity(work, ctx.train_data, method=ctx.method.name, steps=total, seed=ctx.seed,
                           options={k: v for k, v in dataclasses.asdict(options).items() if k != "checkpoint_every"},
                           batch_size=ctx.batches.batch_size if ctx.batches else ctx.batch_size,
                           distill_weight=DISTILL_WEIGHT,
                           teacher=weights_hash(ctx.teacher) if ctx.teacher is not None else None, **ctx.identity)
        path, state = resume(ctx.checkpoint_dir, CHECKPOINT, run, restart=ctx.restart, device=device,
                             size=4 * sum(t.numel() * t.element_size() for t in net.state_dict().values()),
                             keys=("run", "step", "steps", "gates", "optimizer", "rng"),
                             what="a DAGGER checkpoint written by compress(method='dagger')")
        if state is not None:
            net.load_state_dict(state["gates"])
            optimizer.load_state_dict(state["optimizer"])
            start, saved_rng = state["step"], state["rng"]
            log.info("resuming %s from step %d of %d", path, start, total)

    def save(step):
        if path:
            atomic_torch_save({"run": run, "step": step, "steps": total, "gates": net.state_dict(),
                               "optimizer": optimizer.state_dict(), "rng": rng_state()}, path)

    gated = Gates(work, {name: pick.to(device) for name, pick in gate_points(work, space).items()})
    sizes = [int(n) for n in space.sizes]
    bar = Progress(total, "dagger gates", initial=start, enabled=ctx.progress, log=log)
    batches = None
    try:
        for step in range(start, total):
            epoch, offset = divmod(step, per_epoch)
            if batches is None or offset == 0:
                batches = read_batches(batched(ctx.train_data, shuffle=True, seed=ctx.seed * 100003 + epoch),
                                       f"DAGGER gate training, epoch {epoch}")
                for _ in range(offset):  # resumed mid-epoch: the batches the killed run trained on
                    next(batches)
                if saved_rng is not None:  # now that they drew their augmentations: as the killed run was
                    set_rng_state(saved_rng)
                    saved_rng = None
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                target = logits(ctx.teacher(x), ctx.output_fn) if ctx.teacher is not None else None
            gates = net()
            gated.set(gates)
            out = logits(work(x), ctx.output_fn)
            check_labels(y, out.shape[-1], f"DAGGER gate training step {step} (epoch {epoch}, batch {offset})")
            task = F.cross_entropy(out, y, label_smoothing=LABEL_SMOOTHING)
            if target is not None:
                task = (1 - DISTILL_WEIGHT) * task + DISTILL_WEIGHT * kd(out, target)
            penalty = cost_penalty(space, gates.split(sizes), bounds)
            loss = task + options.lam * penalty
            if not torch.isfinite(loss):
                raise ConfigError(f"DAGGER's gate training loss became {loss.item()} at step {step}: lower the "
                                  f"dagger option lr (now {options.lr}) or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1, loss=f"{task.item():.3f}", penalty=f"{penalty.item():.3g}")
            if (step + 1) % options.checkpoint_every == 0 and step + 1 < total:
                save(step + 1)
    finally:
        gated.remove()
    bar.close()
    if start < total:
        save(total)
    with torch.no_grad():
        final = [g.cpu().numpy().astype(np.float64) for g in net().split(sizes)]
    log.info("gates after %d steps: %s", total, ", ".join(
        f"{b.metric} {float(gated_cost(space, [torch.from_numpy(g) for g in final], b.metric)) / b.limit:.2f} "
        f"x the limit" for b in bounds))
    return final


def allocation_scores(gates) -> list:
    """Per group, the score of its channels in gate order: k / (rank + 1), where k is the group's sum
    of gates (its soft width, what the regulariser steers) and rank 0 its highest gate. One
    threshold t on these keeps floor(k / t) channels of every group, the highest-gated ones: the
    soft widths scaled down together (choice). A threshold on the gates themselves would not do:
    after a fraction of an epoch they are far from 0 or 1, and a common threshold turns the small
    differences between groups into whole groups removed (ResNet-56, quick setting: its widest
    group cut from 64 channels to 8, 15 % top-1)."""
    scores = []
    for g in gates:
        ranks = np.empty(len(g))
        ranks[np.argsort(-g, kind="stable")] = np.arange(len(g))
        scores.append(float(g.sum()) / (ranks + 1))
    return scores


def _prune(ctx, gates):
    """(the slim model, its SearchResult): channels ordered by gate, the widest scaling of the soft
    widths that meets every constraint (search.importance_baseline on allocation_scores), BN
    statistics recalibrated for it, its held-out score, and the physically slimmed model
    (the pretrained weights of the kept channels)."""
    space, batched = ctx.space, ctx.batched
    cfg = importance_baseline(space, allocation_scores(gates), ctx.budget, normalise=False)
    ordered = order_channels(ctx.model, space, layout="left", importance=gates)
    net = supernet(ordered, space, impl=ctx.conv_impl)
    calib = ctx.calibration()
    recalibrate_bn(net, cfg, "left", calib, batches=ctx.calib_batches)
    held_out = same_draws(score, net, cfg, "left", batched(ctx.held_out), calib, calib_batches=ctx.calib_batches,
                          metric=ctx.score_metric, output_fn=ctx.output_fn)
    net.full()
    small = slim(ordered, space, cfg, "left")
    nan = float("nan")
    costs = {"flops": float(space.flops(cfg)), "params": float(space.params(cfg))}
    found = SearchResult(cfg=cfg, side="left", score_left=held_out, score_right=nan, score=held_out, costs=costs,
                         limits=ctx.limits, history=[Evaluated(cfg, held_out, nan, costs["flops"], costs["params"], 0)],
                         inherited="original")
    log.info("dagger: soft widths %s", [round(float(g.sum()), 1) for g in gates])
    log.info("dagger: widths %s, %s channels kept, held-out %s %.4f", list(cfg), space.channels(cfg),
             ctx.score_metric, held_out)
    return small, found


DAGGER = register(Method(
    name="dagger", options=DaggerOptions, sampler=None, fit=fit, sides=("left",),
    tasks=False,  # its gates train on the classification loss
    summary="data-agnostic filter gating: gates from the weights, a FLOPs regulariser, one threshold"))
