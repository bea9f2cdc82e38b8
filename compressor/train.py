"""Supernet training (METHOD section 3): BCNet's bilateral sampler or the UA baseline, the record of
the lowest-loss subnets for the prior, atomic checkpoints that resume to the same result, and DDP
under torchrun (every rank trains the same configuration on its own shard of the data)."""
from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .distributed import rank_and_world
from .errors import CompressorError, ConfigError
from .checkpoint import resume, rng_state, set_rng_state
from .files import atomic_torch_save, check_writable
from .losses import kd
from .methods import get_method
from .progress import Progress
from .run_identity import run_identity, weights_hash
from .supernet import Supernet
from .tasks import move
from .batches import check_labels, logits, read_batches

log = logging.getLogger("compressor.train")
CHECKPOINT = "supernet-last.pt"


class TrainingDivergedError(CompressorError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Records:
    """The K lowest-loss (loss, configuration, side) evaluations of a whole run."""

    def __init__(self, k=100, items=()):
        self.k = k
        self._heap = [(-loss, list(cfg), side) for loss, cfg, side in items]  # max-heap on loss
        heapq.heapify(self._heap)

    def add(self, loss, cfg, side):
        item = (-float(loss), list(cfg), side)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:
            heapq.heapreplace(self._heap, item)

    def items(self):
        """[(loss, cfg tuple, side)], lowest loss first."""
        return [(-neg, tuple(cfg), side) for neg, cfg, side in sorted(self._heap, reverse=True)]


@dataclass
class TrainResult:
    method: str
    steps: int
    seconds: float
    final_loss: float
    records: list = field(repr=False)
    checkpoint: str | None = None
    sampler: object = field(default=None, repr=False)  # the trained sampler (mctnas: its tree feeds the search)


def _as_dataset(train_data, batch_size):
    """(dataset, batch size, workers, collate) from a Dataset or a DataLoader."""
    if isinstance(train_data, DataLoader):
        return (train_data.dataset, batch_size or train_data.batch_size, train_data.num_workers,
                train_data.collate_fn)
    if isinstance(train_data, Dataset) or hasattr(train_data, "__getitem__"):
        return train_data, batch_size or 64, 0, None
    raise ConfigError(f"train_data must be a torch Dataset or DataLoader, got {type(train_data).__name__}")


def _epoch_batches(dataset, batch_size, workers, collate, seed, epoch, rank, world, skip):
    """Batches of one epoch in a fixed order (seed, epoch), this rank's shard, skipping `skip`
    batches: a resumed run sees exactly the batches the interrupted one would have."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    shard = order[rank::world][: (len(dataset) // world)].tolist()
    indices = shard[skip * batch_size:]
    # its own generator, so creating the loader does not advance the global RNG (augmentations)
    return read_batches(DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
                                   drop_last=True, generator=torch.Generator().manual_seed(epoch),
                                   **({"collate_fn": collate} if collate else {})), f"supernet training, epoch {epoch}")


_check_writable = check_writable  # the old name, for callers that used it


def _classes(x, net, output_fn):
    """The model's class count, from an eval-mode forward (a train-mode one would move the BN statistics)."""
    net.eval()
    with torch.no_grad():
        return logits(net.full()(x[:2]), output_fn).shape[-1]


def lowest_loss(net: Supernet, subnets, loss_of):
    """CafeNet's min-min selection: of `subnets` [(cfg, side, weight)], the one whose loss
    `loss_of(net)` (the step's loss on its batch) is lowest, each measured without gradient in the
    supernet's current mode; the BN running statistics are left as they were (a probe is not a
    training step). Under torch.distributed the losses are averaged over ranks, so every rank picks
    the same subnet."""
    if len(subnets) == 1:
        return subnets[0]
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
    losses = []
    with torch.no_grad():
        for cfg, side, _ in subnets:
            net.set(cfg, side)
            losses.append(loss_of(net))
            for m, buffers in zip(norms, saved):
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)
    losses = torch.stack(losses).double()
    if rank_and_world()[1] > 1:
        dist.all_reduce(losses)
    return subnets[int(torch.argmin(losses))]  # ties: the first


def train_supernet(net: Supernet, train_data, *, method="bcnet", method_options=None, steps=None, epochs=None,
                   batch_size=None, lr=0.01, momentum=0.9, weight_decay=4e-5, label_smoothing=0.1,
                   teacher: nn.Module = None, distill_weight=0.5, checkpoint_dir=None, checkpoint_every=200,
                   seed=0, records_k=100, device=None, progress=True, identity=None, restart=False,
                   output_fn=None, window=None, sides=None, task=None) -> TrainResult:
    """Train `net` (a cz.supernet) on `train_data` (a Dataset or DataLoader of (image, label)).

    `method`: a registered method's name (compressor.methods): "bcnet", left and right subnets of
    one configuration per step, 0.5 each, in complementary pairs; "ua", the sandwich baseline with
    in-place distillation from the largest. `method_options`: a dict of that method's options
    (e.g. {"complementary": False} for bcnet, {"n_random": 2} for ua).
    `teacher`: a frozen model (usually the original) distilled into every subnet with weight
    `distill_weight`. Give `steps` or `epochs`. With `checkpoint_dir`, a checkpoint is written
    atomically every `checkpoint_every` steps and at the end, and an existing one is resumed when
    it belongs to the same run: the same architecture, initial weights, data (length and sampled
    items), options and `identity` (a dict of anything else that defines the run, e.g. compress()'s
    budget); a checkpoint of another run raises ConfigError naming what differs, unless
    `restart=True`, which discards it and starts over.
    `output_fn` picks the logits from a model output that is not a tensor (e.g. GoogLeNet's in
    train mode). Every batch's labels are checked against the model's classes. `window`: a
    samplers.TrainingWindow, the configurations the random draws come from (None: any), and the
    anchors its draws move around. `sides`: the sides each step trains (None: the method's).
    `task` (compressor.tasks, other than classification): each subnet's loss is task.loss(model,
    batch) on the batches as the data yields them (no labels checked, no teacher); only a method
    whose Method.tasks is true (its loss reads no class logits) can train with it.
    """
    if not isinstance(net, Supernet):
        raise ConfigError(f"net must be a cz.supernet(...), got {type(net).__name__}")
    spec = get_method(method)
    if spec.fit is not None:
        raise ConfigError(f"method {spec.name!r} does not train a supernet: use compress(method={spec.name!r})")
    options = spec.parse_options(method_options)
    method = spec.name
    if task is not None and (not spec.tasks or teacher is not None):
        raise ConfigError(f"method {method!r} cannot train with task {task.name!r}: its loss reads class logits "
                          f"{'(a teacher distils them)' if teacher is not None else ''}; use bcnet, mctnas, cafenet or "
                          f"bsnas, without a teacher")
    sampler = spec.sampler(net.space, seed, options, window, sides)
    run = spec.forward(net, options) if spec.forward is not None else (lambda model, x, i, state: model(x))
    dataset, batch_size, workers, collate = _as_dataset(train_data, batch_size)
    rank, world = rank_and_world()
    per_epoch = len(dataset) // world // batch_size
    if per_epoch == 0:
        raise ConfigError(f"training data has {len(dataset)} samples: fewer than one batch of {batch_size}"
                          + (f" per process ({world} processes)" if world > 1 else ""))
    if (steps is None) == (epochs is None):
        raise ConfigError("give exactly one of steps= or epochs=")
    total = steps if steps is not None else int(math.ceil(epochs * per_epoch))
    if total < 1:
        raise ConfigError(f"nothing to train: {total} steps")
    device = torch.device(device) if device else next(net.parameters()).device
    net.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)

    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    if hasattr(sampler, "schedule"):  # a sampler whose draws change at points of the run (bsnas: shrinking)
        sampler.schedule(total)
    records = Records(records_k)
    start, path, run_id = 0, None, None
    if checkpoint_dir:
        run_id = run_identity(net, dataset, method=spec.name, options=dataclasses.asdict(options), steps=total,
                              seed=seed, batch_size=batch_size, world=world, lr=lr, momentum=momentum,
                              weight_decay=weight_decay, label_smoothing=label_smoothing,
                              distill_weight=distill_weight, records_k=records_k,
                              window=None if window is None else (window.label or window.low),
                              anchors=None if window is None else [list(a) for a in window.anchors],
                              sides=None if sides is None else list(sides),
                              teacher=weights_hash(teacher) if teacher is not None else None,
                              task=task.name if task is not None else None, **(identity or {}))
        path, state = resume(checkpoint_dir, CHECKPOINT, run_id, restart=restart, device=device, owner=rank == 0,
                             size=3 * sum(t.numel() * t.element_size() for t in net.state_dict().values()),
                             keys=("net", "step", "optimizer"), what="a supernet checkpoint written by train_supernet")
        if state is not None:
            net.load_state_dict(state["net"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            sampler.load_state_dict(state["sampler"])
            set_rng_state(state["rng"])
            records = Records(records_k, state["records"])
            start = state["step"]
            log.info("resuming %s from step %d of %d", path, start, total)

    def save(step):
        if rank == 0 and path:
            atomic_torch_save({"run": run_id, "step": step, "net": net.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "sampler": sampler.state_dict(), "rng": rng_state(),
                               "records": [[l, list(c), s] for l, c, s in records.items()]}, path)

    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    net.train()
    t0, batches, running = time.time(), None, float("nan")
    bar = Progress(total, f"supernet ({method})", initial=start, enabled=progress and rank == 0, log=log)
    for step in range(start, total):
        epoch, offset = divmod(step, per_epoch)
        if batches is None or offset == 0:
            batches = _epoch_batches(dataset, batch_size, workers, collate, seed, epoch, rank, world, offset)
        batch = next(batches)
        if task is None:
            x, y = (t.to(device, non_blocking=True) for t in batch)
            if step == start:
                classes = _classes(x, net, output_fn)
                net.train()
            check_labels(y, classes, f"supernet training step {step} (epoch {epoch}, batch {offset})")

            def loss_of(model):
                return F.cross_entropy(logits(model(x), output_fn), y, label_smoothing=label_smoothing)
        else:
            batch = move(batch, device)

            def loss_of(model):
                return task.loss(model, batch)
        subnets = sampler.next()
        if world > 1 and spec.min_min:  # every rank weighs rank 0's alternatives (placements included)
            shared = [subnets]
            dist.broadcast_object_list(shared, 0)
            subnets = shared[0]
        elif world > 1:  # every rank trains rank 0's configurations
            cfgs = torch.tensor([c for c, _, _ in subnets], device=device)
            dist.broadcast(cfgs, 0)
            subnets = [(tuple(c.tolist()), s, w) for c, (_, s, w) in zip(cfgs, subnets)]
        if spec.min_min:  # the step's subnets are alternatives: train the one with the lowest loss
            subnets = [lowest_loss(net, subnets, loss_of)]
        with torch.no_grad():
            target = logits(teacher(x), output_fn) if teacher is not None else None
        optimizer.zero_grad(set_to_none=True)
        losses, state = [], {}
        for i, (cfg, side, weight) in enumerate(subnets):
            net.set(cfg, side)
            sync = i == len(subnets) - 1 or world == 1  # all-reduce gradients once, on the last backward
            with model.no_sync() if not sync else contextlib.nullcontext():
                if task is not None:
                    ce = loss = task.loss(model, batch)
                else:
                    out = logits(run(model, x, i, state), output_fn)
                    ce = F.cross_entropy(out, y, label_smoothing=label_smoothing)
                    base = (lambda: ce) if target is None else (
                        lambda: (1 - distill_weight) * ce + distill_weight * kd(out, target))
                    loss = spec.loss(i, out, base, state)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"the loss became {loss.item()} at step {step} ({side} subnet {list(cfg)}); weights were "
                        f"not updated and the last good checkpoint is {path or 'none (no checkpoint_dir)'}. "
                        f"Lower the learning rate (now {scheduler.get_last_lr()[0]:.3g}) or check the data.")
                (weight * loss).backward()
            losses.append((ce.item(), cfg, side))
        optimizer.step()
        scheduler.step()
        if hasattr(sampler, "observe"):  # a sampler that learns from the losses (mctnas)
            if world > 1:  # the mean over ranks, so every rank's sampler stays the same
                mean = torch.tensor([l for l, _, _ in losses], dtype=torch.float64, device=device)
                dist.all_reduce(mean)
                losses = [(l / world, c, s) for l, (_, c, s) in zip(mean.tolist(), losses)]
            sampler.observe(losses)
        for ce, cfg, side in losses:
            if spec.record(cfg, net.space):
                records.add(ce, cfg, side)
        running = sum(l for l, _, _ in losses) / len(losses)
        bar.update(1, loss=f"{running:.3f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < total:
            save(step + 1)
    bar.close()
    if world > 1:  # DDP syncs buffers at the start of a forward: make the last step's agree too
        for buffer in net.buffers():
            dist.broadcast(buffer, 0)
    net.full()
    save(total)
    seconds = time.time() - t0
    log.info("trained %s supernet: %d steps in %.1fs, last loss %.3f", method, total - start, seconds, running)
    return TrainResult(method, total, seconds, running, records.items(), path, sampler)

