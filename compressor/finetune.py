"""Fine-tuning and evaluating a plain (slimmed) model: SGD with cosine decay and label smoothing,
optionally distilling a frozen teacher (usually the original model)."""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .errors import ConfigError
from .progress import Progress
from .batches import check_labels, logits, read_batches
from .seeding import seeded
from .tasks import move

log = logging.getLogger("compressor.finetune")


def loader(data, batch_size=64, shuffle=False, seed=0):
    """A DataLoader from a Dataset (a DataLoader is returned as it is)."""
    if isinstance(data, DataLoader):
        return data
    if data is None or len(data) == 0:
        raise ConfigError("the data set is empty")
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size=256, max_batches=None, output_fn=None) -> float:
    """Top-1 accuracy in [0, 1] (eval mode; the training flag is restored). `output_fn` picks the
    logits from the model's output."""
    training, device = model.training, device_of(model)
    model.eval()
    correct = total = 0
    try:
        for i, (x, y) in enumerate(read_batches(loader(data, batch_size), "evaluation")):
            if max_batches is not None and i >= max_batches:
                break
            out = logits(model(x.to(device)), output_fn)
            check_labels(y, out.shape[-1], f"evaluation batch {i}")
            correct += (out.argmax(-1) == y.to(device)).sum().item()
            total += len(y)
    finally:
        model.train(training)
    if total == 0:
        raise ConfigError("the evaluation data is empty")
    return correct / total


def finetune(model: nn.Module, train_data, *, epochs=1.0, batch_size=64, lr=0.01, momentum=0.9,
             weight_decay=4e-5, label_smoothing=0.1, teacher: nn.Module = None, distill_weight=0.5,
             seed=0, progress=True, output_fn=None, on_step=None, task=None) -> dict:
    """Train `model` in place; returns {"steps", "seconds", "final_loss"}. `output_fn` picks the
    logits from the model's (and the teacher's) output. `on_step(step, steps)` runs after each
    optimiser step (RepNAS ends its branch search there). `seed`: the order of the batches and every
    other draw (augmentations, dropout), which then do not depend on the caller's generator state.
    `task`: a compressor.tasks.Task whose loss(model, batch) replaces the classification loss
    (then label smoothing, the teacher and output_fn do not apply)."""
    with seeded(seed):
        return _train(model, train_data, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, label_smoothing=label_smoothing, teacher=teacher,
                      distill_weight=distill_weight, seed=seed, progress=progress, output_fn=output_fn,
                      on_step=on_step, task=task)


def _train(model, train_data, *, epochs, batch_size, lr, momentum, weight_decay, label_smoothing, teacher,
           distill_weight, seed, progress, output_fn, on_step, task=None) -> dict:
    data = loader(train_data, batch_size, shuffle=True, seed=seed)
    steps = int(math.ceil(epochs * len(data)))
    if steps <= 0:
        return {"steps": 0, "seconds": 0.0, "final_loss": float("nan")}
    device = device_of(model)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0, step, loss_value = time.time(), 0, float("nan")
    bar = Progress(steps, "fine-tune", enabled=progress, log=log)
    while step < steps:
        for batch in read_batches(data, f"fine-tuning after step {step}"):
            if task is not None:
                loss = task.loss(model, move(batch, device))
            else:
                x, y = batch
                x, y = x.to(device), y.to(device)
                out = logits(model(x), output_fn)
                check_labels(y, out.shape[-1], f"fine-tuning step {step}")
                loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(logits(teacher(x), output_fn), -1)
                loss = (1 - distill_weight) * loss + distill_weight * F.kl_div(
                    F.log_softmax(out, -1), soft, reduction="batchmean")
            if not torch.isfinite(loss):
                raise ConfigError(f"fine-tuning loss became {loss.item()} at step {step}: lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_value = loss.item()
            step += 1
            if on_step is not None:
                on_step(step, steps)
            bar.update(1, loss=f"{loss_value:.3f}")
            if step >= steps:
                break
    bar.close()
    model.eval()
    seconds = time.time() - t0
    log.info("fine-tuned %d steps in %.1fs, last loss %.3f", steps, seconds, loss_value)
    return {"steps": steps, "seconds": seconds, "final_loss": loss_value}
