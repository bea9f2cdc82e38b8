"""Least-squares reconstruction: refit the weights of a slim model's convolutions and linear layers
so that each reproduces, from the slim network's own inputs, what the same layer of the full model
computes on its kept output channels (He et al. 2017 and ThiNet fit the layer after the removed
channels; here every layer is fitted, so each also absorbs the error of the layers before it).

A few hundred training images suffice: a layer is a linear map of its inputs, and the fit is a
small ridge regression per layer (at most in_channels x kernel area unknowns per output channel).
Measured on CIFAR ResNet-56 at half the FLOPs (README, quality section): before any fine-tuning the
reconstructed network scores as well as the pruned network fine-tuned for two epochs.

One forward of the full model records every layer's targets; in one forward of the slim model,
each layer is fitted just before it runs, to the inputs the layers before it, already fitted, now
give it (fitting all layers to the inputs of the unfitted network instead gave 10 % top-1). Batch
norms stay in eval mode: a reconstructed layer feeds its batch norm the pre-normalisation values the
full model's statistics were measured on.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batches import read_batches
from .errors import ConfigError
from .slim import inactive_indices

log = logging.getLogger("compressor.reconstruct")


def _fittable(module) -> bool:
    """Trainable Conv2d (zero padding given as numbers, the class's own forward) and Linear layers."""
    if type(module).forward is nn.Conv2d.forward:
        return module.weight.requires_grad and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return type(module).forward is nn.Linear.forward and module.weight.requires_grad


def _rows(module, value, index, positions, role, kept=None):
    """Sampled rows (positions x images, channels) of a layer's input columns (the columns a conv
    multiplies: F.unfold) or of its output on the `kept` channels; the positions come from a
    generator seeded by the layer's `index`, so the input and the output rows of one layer match."""
    conv = isinstance(module, nn.Conv2d)
    if role == "in" and conv:
        value = F.unfold(value, module.kernel_size, dilation=module.dilation, padding=module.padding,
                         stride=module.stride)
    else:
        value = value.flatten(2) if conv else value.reshape(-1, value.shape[-1], 1)
    if kept is not None:
        value = value[:, kept]
    n, d, length = value.shape
    at = torch.randint(length, (n, min(positions, length)), generator=torch.Generator().manual_seed(index))
    at = at.to(value.device)[:, None].expand(n, d, at.shape[1])
    return torch.gather(value.detach(), 2, at).permute(0, 2, 1).reshape(-1, d).double().cpu()


def _solve(x, y, weight, bias, groups, ridge):
    """Ridge least squares y ~ x w + b, pulled toward the layer's current `weight` (rows, flattened)
    and `bias` (None: no bias), block-diagonal over `groups`: directions the sampled rows do not
    determine (a classifier sees one row per image) keep the current weights."""
    out_g, in_g = y.shape[1] // groups, x.shape[1] // groups
    weights, biases = [], []
    for j in range(groups):
        xj, yj = x[:, j * in_g:(j + 1) * in_g], y[:, j * out_g:(j + 1) * out_g]
        w0 = weight[j * out_g:(j + 1) * out_g].T
        if bias is not None:
            xj = torch.cat([xj, torch.ones(len(xj), 1, dtype=xj.dtype)], 1)
            w0 = torch.cat([w0, bias[None, j * out_g:(j + 1) * out_g]])
        gram = xj.T @ xj
        strength = ridge * gram.diagonal().mean().clamp_min(1e-12)
        w = torch.linalg.solve(gram + strength * torch.eye(len(gram), dtype=gram.dtype), xj.T @ yj + strength * w0).T
        weights.append(w[:, :in_g])
        biases.append(w[:, in_g] if bias is not None else None)
    return torch.cat(weights), (torch.cat(biases) if bias is not None else None)


def reconstruct(small: nn.Module, full: nn.Module, space, cfg, side: str, data, *, batches: int = 6,
                positions: int = 32, ridge: float = 1e-3) -> list:
    """Refit `small` (slim(full, space, cfg, side)) in place toward `full` on `batches` batches of
    `data` (an iterable of (x, y); the labels are not used), `positions` sampled output positions
    per image and layer, each fit pulled toward the layer's current weights with `ridge` (relative
    to the mean input energy). Returns the names of the layers refitted. Both models run in eval
    mode; their modes are restored."""
    if batches < 1 or positions < 1:
        raise ConfigError(f"reconstruct needs batches and positions >= 1, got {batches}, {positions}")
    drop = inactive_indices(space, cfg, side)
    names = [name for name, m in small.named_modules() if _fittable(m)]
    device = next(small.parameters()).device
    images = []
    for x, _ in read_batches(data, "reconstruction"):
        if len(images) == batches:
            break
        images.append(x.to(device))
    if not images:
        raise ConfigError("reconstruction got no batch from its data")
    images = torch.cat(images)  # one forward: every layer is fitted to the inputs the layers before it now give
    targets, calls, fitted, handles = {}, dict.fromkeys(names, 0), [], []

    def record(index, name):
        removed = drop.get((name, "out"))
        kept = None if removed is None else torch.from_numpy(
            np.setdiff1d(np.arange(full.get_submodule(name).weight.shape[0]), removed))

        def hook(module, inputs, output):
            calls[name] += 1
            targets[name] = _rows(module, output, index, positions, "out", kept)
        return hook

    def fit(index, name):
        def hook(module, inputs):
            if calls[name] != 1:  # a module run twice per forward (shared) has no single target
                return
            x = _rows(module, inputs[0], index, positions, "in")
            weight, bias = _solve(x, targets[name], module.weight.detach().flatten(1).double().cpu(),
                                  None if module.bias is None else module.bias.detach().double().cpu(),
                                  getattr(module, "groups", 1), ridge)
            with torch.no_grad():
                module.weight.copy_(weight.reshape(module.weight.shape))
                if bias is not None:
                    module.bias.copy_(bias)
            fitted.append(name)
        return hook

    modes = [(m, m.training) for m in (*small.modules(), *full.modules())]
    small.eval()
    full.eval()
    try:
        handles = [full.get_submodule(name).register_forward_hook(record(i, name)) for i, name in enumerate(names)]
        with torch.no_grad():
            full(images)
        for h in handles:
            h.remove()
        handles = [small.get_submodule(name).register_forward_pre_hook(fit(i, name)) for i, name in enumerate(names)]
        with torch.no_grad():
            small(images)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    log.info("reconstructed %d layers from %d images", len(fitted), len(images))
    return fitted


def write_back(model: nn.Module, small: nn.Module, space, cfg, side: str, names) -> None:
    """Copy the weights of `small`'s layers `names` (reconstruct's result) into the channels of
    `model` that slim(model, space, cfg, side) kept, so that a supernet over `model` starts from
    the reconstructed network at that configuration (its other channels keep their weights)."""
    drop = inactive_indices(space, cfg, side)
    for name in names:
        target, source = model.get_submodule(name), small.get_submodule(name)
        index = []
        for role, dim in (("out", 0), ("in", 1)):
            size = target.weight.shape[dim]
            removed = drop.get((name, role), np.array([], dtype=np.int64))
            index.append(torch.from_numpy(np.setdiff1d(np.arange(size), removed)).to(target.weight.device))
        if getattr(target, "groups", 1) != 1:  # depthwise: the input index is the output's
            index[1] = torch.arange(target.weight.shape[1], device=target.weight.device)
        with torch.no_grad():
            target.weight[index[0][:, None], index[1]] = source.weight
            if target.bias is not None:
                target.bias[index[0]] = source.bias
