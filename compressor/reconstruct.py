"""Least-squares reconstruction: refit the weights of a slim model's convolutions and linear layers
so that each reproduces, from the slim network's own inputs, what the same layer of the full model
computes on its kept output channels (He et al. 2017 and ThiNet fit the layer after the removed
channels; here every layer is fitted, so each also absorbs the error of the layers before it).

A few hundred training images suffice: a layer is a linear map of its inputs, and the fit is a
small ridge regression per layer (at most in_channels x kernel area unknowns per output channel).
Measured on CIFAR ResNet-56 at half the FLOPs (README, quality section): before any fine-tuning the
reconstructed network scores as well as the pruned network fine-tuned for two epochs.

One forward of the full model records every layer's targets (Targets, reusable for any number of
slim models of it); in one forward of the slim model, each layer is fitted just before it runs, to
the inputs the layers before it, already fitted, now give it (fitting all layers to the inputs of
the unfitted network instead gave 10 % top-1). Batch
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
from .heads import region_layers
from .layers import group_offsets, kind_of
from .modes import hooked_forward
from .slim import kept_indices

log = logging.getLogger("compressor.reconstruct")


def _fittable(module) -> bool:
    """Trainable Conv2d (zero padding given as numbers, the class's own forward) and Linear layers."""
    if type(module).forward is nn.Conv2d.forward:
        return module.weight.requires_grad and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return type(module).forward is nn.Linear.forward and module.weight.requires_grad


def _rows(module, value, index, positions, role):
    """Sampled rows (positions x images, channels) of a layer's input columns (the columns a conv
    multiplies, as F.unfold lays them out) or of its output; the positions come from a generator
    seeded by the layer's `index`, so the input and the output rows of one layer match."""
    conv = isinstance(module, nn.Conv2d)
    value = value.detach()
    if role == "in" and conv:
        n, length = value.shape[0], _output_positions(module, value)
        at = torch.randint(length, (n, min(positions, length)), generator=torch.Generator().manual_seed(index))
        return _patches(module, value, at.to(value.device)).float().cpu()
    value = value.flatten(2) if conv else value.reshape(-1, value.shape[-1], 1)
    n, d, length = value.shape
    at = torch.randint(length, (n, min(positions, length)), generator=torch.Generator().manual_seed(index))
    at = at.to(value.device)[:, None].expand(n, d, at.shape[1])
    return torch.gather(value, 2, at).permute(0, 2, 1).reshape(-1, d).float().cpu()


def _output_positions(conv, value) -> int:
    (h, w), (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (value.shape[2:], conv.kernel_size, conv.stride,
                                                      conv.dilation, conv.padding)
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _patches(conv, value, at):
    """F.unfold's columns of `value` (n, c, h, w) at the output positions `at` (n, p), as rows
    (n * p, c * kh * kw), read from the padded input directly: unfolding every position first
    spent more time than the fits (30 of 108 s of a ResNet-56 search)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    padded = F.pad(value, (pw, pw, ph, ph))
    out_w = (value.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = (at // out_w)[..., None] * sh + torch.arange(kh, device=at.device) * dh  # (n, p, kh)
    cols = (at % out_w)[..., None] * sw + torch.arange(kw, device=at.device) * dw  # (n, p, kw)
    images = torch.arange(len(value), device=at.device)[:, None, None, None]
    patches = padded[images, :, rows[..., :, None], cols[..., None, :]]  # (n, p, kh, kw, c)
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, value.shape[1] * kh * kw)


# float32 sums of ~10^4 rows are off by ~10^-6 of their size: a ridge of 10^-5 or more outweighs that
FLOAT32_RIDGE = 1e-5


def _solve(x, y, weight, bias, groups, ridge):
    """Ridge least squares y ~ x w + b, pulled toward the layer's current `weight` (rows, flattened)
    and `bias` (None: no bias), block-diagonal over `groups`: directions the sampled rows do not
    determine (a classifier sees one row per image) keep the current weights. The products over the
    rows are float32 when the ridge term (relative to the mean input energy) outweighs float32's
    rounding of them, else float64; the small system is solved in float64 (double-precision
    products took 40 % of the reconstruction time of a ResNet-56 search at the default ridge)."""
    out_g, in_g = y.shape[1] // groups, x.shape[1] // groups
    dtype = torch.float32 if ridge >= FLOAT32_RIDGE else torch.float64
    x, y = x.to(dtype), y.to(dtype)
    weights, biases = [], []
    for j in range(groups):
        xj, yj = x[:, j * in_g:(j + 1) * in_g], y[:, j * out_g:(j + 1) * out_g]
        w0 = weight[j * out_g:(j + 1) * out_g].T
        if bias is not None:
            xj = torch.cat([xj, torch.ones(len(xj), 1, dtype=xj.dtype)], 1)
            w0 = torch.cat([w0, bias[None, j * out_g:(j + 1) * out_g]])
        gram = (xj.T @ xj).double()
        strength = ridge * gram.diagonal().mean().clamp_min(1e-12)
        w = torch.linalg.solve(gram + strength * torch.eye(len(gram), dtype=gram.dtype),
                               (xj.T @ yj).double() + strength * w0).T
        weights.append(w[:, :in_g])
        biases.append(w[:, in_g] if bias is not None else None)
    return torch.cat(weights), (torch.cat(biases) if bias is not None else None)


class Targets:
    """What the full model computes, recorded once for any number of slim models of it: its outputs
    of every fittable layer at the sampled positions (all channels, float32), on the images of the
    first `batches` batches of `data` (an iterable of (x, y); the labels are not used; `images`
    picks the image tensor of another kind of batch, e.g. a tasks.Task's images)."""

    def __init__(self, full: nn.Module, data, *, batches: int = 6, positions: int = 32, images=None):
        if batches < 1 or positions < 1:
            raise ConfigError(f"reconstruct needs batches and positions >= 1, got {batches}, {positions}")
        self.full, self.positions = full, positions
        unpaired = region_layers(full)  # run on regions the slim model proposes differently
        self.names = [name for name, m in full.named_modules() if _fittable(m) and not name.startswith(unpaired)]
        device = next(full.parameters()).device
        pick, images = images or (lambda batch: batch[0]), []
        for batch in read_batches(data, "reconstruction"):
            if len(images) == batches:
                break
            images.append(pick(batch).to(device))
        if not images:
            raise ConfigError("reconstruction got no batch from its data")
        self.images = torch.cat(images)  # one forward: each layer is fitted to what the fitted layers before it give
        self.rows, calls = {}, dict.fromkeys(self.names, 0)

        def record(index, name):
            def hook(module, inputs, output):
                calls[name] += 1
                self.rows[name] = _rows(module, output, index, positions, "out")
            return hook

        hooked_forward(full, self.images, lambda: [full.get_submodule(name).register_forward_hook(record(i, name))
                                                    for i, name in enumerate(self.names)])
        for name, count in calls.items():
            if count != 1:  # a module run twice per forward (shared) has no single target
                self.rows.pop(name, None)


def reconstruct(small: nn.Module, full: nn.Module, space, cfg, side: str, data, *, batches: int = 6,
                positions: int = 32, ridge: float = 1e-3, targets: Targets | None = None, images=None) -> list:
    """Refit `small` (slim(full, space, cfg, side)) in place toward `full` on `batches` batches of
    `data` (an iterable of (x, y); the labels are not used), `positions` sampled output positions
    per image and layer, each fit pulled toward the layer's current weights with `ridge` (relative
    to the mean input energy). `targets`: a Targets of `full` to reuse (then `data`, `batches` and
    `positions` are its). Returns the names of the layers refitted. `small` runs in eval mode; its
    modes are restored."""
    targets = targets or Targets(full, data, batches=batches, positions=positions, images=images)
    keeps = kept_indices(space, full, cfg, side)
    fitted = []

    def fit(index, name):
        kept = torch.from_numpy(keeps[(name, "out")]) if (name, "out") in keeps else slice(None)

        def hook(module, inputs):
            x = _rows(module, inputs[0], index, targets.positions, "in")
            weight, bias = _solve(x, targets.rows[name][:, kept],
                                  module.weight.detach().flatten(1).double().cpu(),
                                  None if module.bias is None else module.bias.detach().double().cpu(),
                                  getattr(module, "groups", 1), ridge)
            with torch.no_grad():
                module.weight.copy_(weight.reshape(module.weight.shape))
                if bias is not None:
                    module.bias.copy_(bias)
            fitted.append(name)
        return hook

    # the batch norms' inputs are recorded in the same forward: each runs after the layers before it
    # were fitted, so it sees what a second forward would show it (matching leaves eval mode as is)
    inputs = {}
    hooked_forward(small, targets.images, lambda: [
        small.get_submodule(name).register_forward_pre_hook(fit(i, name))
        for i, name in enumerate(targets.names) if name in targets.rows] + _record_norm_inputs(small, inputs))
    _match_norm_statistics(inputs)
    log.info("reconstructed %d layers from %d images", len(fitted), len(targets.images))
    return fitted


def _record_norm_inputs(model, stats) -> list:
    """Pre-hooks (their handles) that put into `stats` the per-channel mean and variance of the first
    input each affine batch norm of `model` with running statistics sees."""
    def hook(module, inputs):
        if module not in stats:  # float32 moments (torch accumulates them stably), kept in float64
            var, mean = torch.var_mean(inputs[0].detach(), [d for d in range(inputs[0].dim()) if d != 1],
                                       unbiased=False)
            stats[module] = (mean.double(), var.double())

    return [m.register_forward_pre_hook(hook) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats
            and m.running_var is not None]


def _match_norm_statistics(stats):
    """Set each batch norm's running statistics to those of its actual inputs (`stats`, from
    _record_norm_inputs) and change its scale and shift so that it computes the same in eval mode:
    (z - m') g'/s' + b' with
    g' = g s'/s, b' = b + g (m' - m)/s equals (z - m) g/s + b. A fitted layer reproduces the full
    model's features only in part, with less variance; in train mode a batch norm divides by that
    smaller batch variance and amplifies what the fit missed, and the first fine-tuning steps
    undid the reconstruction (CIFAR ResNet-56 at 30 % of the FLOPs: 40 % top-1 fell to 9 % within 8
    steps). With matched statistics, train mode starts where eval mode is."""
    with torch.no_grad():
        for m, (mean, var) in stats.items():
            old_std = (m.running_var.double() + m.eps).sqrt()
            new_std = (var.to(old_std.device) + m.eps).sqrt()
            mean = mean.to(old_std.device)
            m.bias.copy_(m.bias.double() + m.weight.double() * (mean - m.running_mean.double()) / old_std)
            m.weight.copy_(m.weight.double() * new_std / old_std)
            m.running_mean.copy_(mean)
            m.running_var.copy_(new_std ** 2 - m.eps)


def _kept_columns(layer, kept_inputs):
    """The weight columns (dim 1) of `layer` that read its kept input channels `kept_inputs`."""
    kind = kind_of(layer)
    if kind.in_dim is None:  # depthwise: the input index is the output's, one column per group
        return torch.arange(layer.weight.shape[1], device=layer.weight.device)
    if kind.name == "grouped_conv":  # the same offsets in every group
        return torch.from_numpy(group_offsets(layer, kept_inputs, layer.in_channels)[0]).to(layer.weight.device)
    return kept_inputs


def write_back(model: nn.Module, small: nn.Module, space, cfg, side: str, names) -> None:
    """Copy the weights of `small`'s layers `names` (reconstruct's result) and of its batch norms
    (whose statistics and affine parameters reconstruct matched) into the channels of `model` that
    slim(model, space, cfg, side) kept, so that a supernet over `model` starts from the
    reconstructed network at that configuration (its other channels keep their weights)."""
    keeps = kept_indices(space, model, cfg, side)

    def kept(name, role, size, device):
        return torch.from_numpy(keeps[(name, role)] if (name, role) in keeps else np.arange(size)).to(device)

    norms = [name for name, m in small.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for name in names:
            target, source = model.get_submodule(name), small.get_submodule(name)
            rows = kept(name, "out", target.weight.shape[0], target.weight.device)
            cols = _kept_columns(target, kept(name, "in", kind_of(target).size(target, "in"), target.weight.device))
            target.weight[rows[:, None], cols] = source.weight
            if target.bias is not None:
                target.bias[rows] = source.bias
        for name in norms:
            target, source = model.get_submodule(name), small.get_submodule(name)
            rows = kept(name, "out", target.num_features, target.running_mean.device)
            for tensor in ("weight", "bias", "running_mean", "running_var"):
                if getattr(target, tensor, None) is not None:
                    getattr(target, tensor)[rows] = getattr(source, tensor)
