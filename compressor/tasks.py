"""What a model is trained and judged on: a task. compress(task=...) fine-tunes with its loss and
ranks candidate widths with its score; classification (cross-entropy, top-1) is the default and
runs compress()'s classification path unchanged.

A Task is three functions of a batch as the data loader yields it:
  loss(model, batch) -> scalar tensor to minimise; the model is in train mode (fine-tuning);
  samples(model, batch) -> (batch size,) tensor of per-sample scores, higher is better; the model
      is in eval mode, under torch.no_grad (the search's ranking and its paired guard,
      search.clearly_better, read per-sample values);
  images(batch) -> the batch's images as one (N, C, H, W) tensor (costs, reconstruction).
and `collate`, how a list of dataset items becomes a batch. `move(batch, device)` moves any nest
of tensors, lists, tuples and dicts. Write your own Task(...) with these, or use the built-ins:
  classification(): items (image, label); cross-entropy, top-1.
  detection(): items (image, {"boxes": (K, 4) xyxy float, "labels": (K,) int64}) for torchvision's
      detectors; the loss is the sum of the loss dict the model returns in train mode given the
      targets; the score is minus that loss per image, with batch norms in eval mode (choice:
      mAP needs pycocotools and many images to be stable; the held-out loss ranks candidates
      from a few).
  segmentation(): items (image, (H, W) int64 mask, 255 = ignore) for torchvision's segmenters;
      the loss is pixel cross-entropy on the "out" map (plus 0.5 x the "aux" map's when the model
      has one, as torchvision's reference training does); the score is each image's mean IoU over
      the classes present in its mask or its prediction.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data._utils.collate import default_collate

from .batches import read_batches
from .errors import ConfigError
from .modes import eval_mode

IGNORE = 255  # the mask value torchvision's segmentation references ignore (object borders)


def move(batch, device):
    """`batch` with every tensor in it (through lists, tuples and dicts) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device) for v in batch)
    return batch


def as_lists(items):
    """Collate detection items: (images, targets) as tuples (boxes per image differ in number)."""
    return tuple(zip(*items))


def stacked(batch):
    """A batch's images, (images, ...) with images a tensor or a sequence of same-sized ones."""
    images = batch[0]
    return images if isinstance(images, torch.Tensor) else torch.stack(list(images))


@dataclass(frozen=True)
class Task:
    name: str
    loss: Callable[[nn.Module, Any], torch.Tensor]
    samples: Callable[[nn.Module, Any], torch.Tensor]
    images: Callable[[Any], torch.Tensor] = stacked
    collate: Callable = default_collate

    @torch.no_grad()
    def score(self, model: nn.Module, batches) -> float:
        """Mean per-sample score over `batches` (the model in eval mode; its modes restored)."""
        values = self.sample_scores(model, batches)
        if not len(values):
            raise ConfigError(f"task {self.name!r}: no batch to score")
        return float(values.mean())

    @torch.no_grad()
    def sample_scores(self, model: nn.Module, batches, device=None) -> torch.Tensor:
        """Per-sample scores (float64, CPU) over `batches`, in order (eval mode; modes restored)."""
        device = device or next(model.parameters()).device
        with eval_mode(model):
            values = [self.samples(model, move(batch, device)).detach().double().cpu().flatten()
                      for batch in read_batches(batches, f"scoring ({self.name})")]
        return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


# -- classification ------------------------------------------------------------------------------
def _classification_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _top1(model, batch):
    x, y = batch
    return (model(x).argmax(-1) == y).double()


CLASSIFICATION = Task("classification", _classification_loss, _top1)


def classification() -> Task:
    """Cross-entropy and top-1: compress()'s default, which keeps its classification path (label
    smoothing, distillation, output_fn, the label checks)."""
    return CLASSIFICATION


# -- detection -----------------------------------------------------------------------------------
def _detection_loss(model, batch):
    images, targets = batch
    return sum(model(list(images), list(targets)).values())


def _detection_samples(model, batch):
    """Minus each image's summed train-mode loss, batch norms (and dropout) in eval mode: the
    losses exist only in train mode, and batch statistics of one image would score the batch,
    not the network."""
    images, targets = batch
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()
    try:
        return torch.stack([-sum(model([image], [target]).values()) for image, target in zip(images, targets)])
    finally:
        model.eval()


def detection() -> Task:
    """torchvision detectors (SSD, RetinaNet, FCOS, Faster R-CNN): items (image, {"boxes",
    "labels"}); loss: the model's train-mode loss dict summed; score: minus that loss per image."""
    return Task("detection", _detection_loss, _detection_samples, collate=as_lists)


# -- segmentation --------------------------------------------------------------------------------
def _segmentation_loss(model, batch):
    x, mask = batch
    out = model(x)
    loss = F.cross_entropy(out["out"], mask, ignore_index=IGNORE)
    if out.get("aux") is not None:
        loss = loss + 0.5 * F.cross_entropy(out["aux"], mask, ignore_index=IGNORE)
    return loss


def _mean_iou(model, batch):
    x, mask = batch
    out = model(x)["out"]
    pred, classes = out.argmax(1), out.shape[1]
    valid = mask != IGNORE
    scores = []
    for p, m, v in zip(pred, mask, valid):
        p, m = p[v], m[v]
        hits = torch.bincount(m[p == m], minlength=classes).double()
        union = torch.bincount(p, minlength=classes).double() + torch.bincount(m, minlength=classes) - hits
        present = union > 0
        scores.append((hits[present] / union[present]).mean() if present.any() else torch.ones((), dtype=torch.float64))
    return torch.stack(scores)


def segmentation() -> Task:
    """torchvision segmenters (DeepLabV3, LRASPP, FCN): items (image, (H, W) int64 mask); loss:
    pixel cross-entropy on "out" (+ 0.5 x "aux"); score: per-image mean IoU."""
    return Task("segmentation", _segmentation_loss, _mean_iou)


TASKS = {"classification": classification, "detection": detection, "segmentation": segmentation}


def get_task(task) -> Task:
    """A Task from a Task, a built-in's name or None (classification)."""
    if task is None:
        return CLASSIFICATION
    if isinstance(task, str):
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}: use one of {', '.join(map(repr, TASKS))}, or a "
                              "compressor.tasks.Task(name, loss, samples, images, collate)")
        return TASKS[task]()
    if not isinstance(task, Task):
        raise ConfigError(f"task must be a compressor.tasks.Task or one of {', '.join(map(repr, TASKS))}, got "
                          f"{type(task).__name__}")
    return task


def check_task(task: Task, model: nn.Module, batch, device) -> torch.Tensor:
    """Run the task once on a copy of `model` and one batch, before any expensive work: the loss
    must be a finite scalar tensor with a gradient, the scores one finite value per image. Returns
    the batch's images (the example input comes from them)."""
    def fail(what, fix):
        raise ConfigError(f"task {task.name!r}: {what}; {fix}")

    batch = move(batch, device)
    try:
        images = task.images(batch)
    except Exception as e:
        fail(f"images(batch) failed ({type(e).__name__}: {e})",
             "it must return the batch's images as one (N, C, H, W) tensor (reconstruction reads them so): "
             "resize the images to one size in the dataset, or give the Task an images function that does")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        fail(f"images(batch) returned {type(images).__name__}"
             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else ''}",
             "it must return the batch's images as one float (N, C, H, W) tensor")
    probe = copy.deepcopy(model).to(device).train()
    try:
        loss = task.loss(probe, batch)
    except Exception as e:
        fail(f"loss(model, batch) failed on the first training batch ({type(e).__name__}: {e})",
             "check that the data's items match what the loss reads")
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        fail(f"loss(model, batch) returned {type(loss).__name__}"
             f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}",
             "it must return one scalar tensor (e.g. sum(model(images, targets).values()) for a detector's "
             "loss dict, or loss.mean() of per-sample losses)")
    if not loss.requires_grad:
        fail("loss(model, batch) returned a tensor without a gradient",
             "compute it from the model's output without torch.no_grad() or .detach()/.item()")
    if not torch.isfinite(loss):
        fail(f"loss(model, batch) is {loss.item()} on the first batch", "check the data and the loss")
    values = task.sample_scores(probe, [batch], device)
    if values.numel() != len(images) or not torch.isfinite(values).all():
        fail(f"samples(model, batch) gave {values.numel()} values for {len(images)} images"
             f"{'' if torch.isfinite(values).all() else ', not all finite'}",
             "it must return one finite score per image, higher is better")
    return images
