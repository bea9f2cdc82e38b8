"""Physical slimming: remove the inactive channels of a configuration, inherit the weights, and
prove the result computes what the masked supernet computes."""
from __future__ import annotations

import copy
import logging
import os
import pickle
from collections import defaultdict

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ._version import __version__
from .errors import ConfigError, UnsupportedModelError
from .files import atomic_torch_save
from .groups import innermost_module_on_error
from .heads import raw_outputs
from .layers import LAYER_KINDS, kind_of
from .models import PROJECT_BUILDERS, is_known_builder, load_model
from .space import WidthSpace, check_side
from .supernet import Supernet, check_space
from .batches import logits, read_batches

log = logging.getLogger("compressor.slim")

FORMAT = "compressor-slim-1"
_SHAPE_ATTRS = tuple(dict.fromkeys(a for kind in LAYER_KINDS.values() for a in kind.shape_attrs))


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a| (the parity measure used throughout)."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def inactive_indices(space: WidthSpace, cfg, side) -> dict:
    """{(module name, role): sorted layer indices to remove} for configuration `cfg` on `side`."""
    drop = defaultdict(list)
    for group, kept in zip(space.groups, space.positions(cfg, side)):
        if len(kept) == group.size:
            continue
        removed = np.setdiff1d(np.arange(group.size), kept)
        for key, table in group.index.items():
            drop[key].append(table[removed].ravel())
    return {key: np.unique(np.concatenate(parts)) for key, parts in drop.items()}


def kept_indices(space: WidthSpace, model: nn.Module, cfg, side) -> dict:
    """{(module name, role): the layer indices the slim layer keeps, in its order} for every layer
    that loses channels for configuration `cfg` on `side`: ascending, except in a shuffled stream,
    whose slim network wants its channels in the order of its own wiring (compressor.shuffle)."""
    arranged = {}
    for group, k in zip(space.groups, space.channels(cfg)):
        if group.stream is not None and k < group.size:
            arranged.update(group.stream.arrangements[k])
    kept = {}
    for key, drop in inactive_indices(space, cfg, side).items():
        if key in arranged:
            kept[key] = arranged[key]
        else:
            module = model.get_submodule(key[0])
            kept[key] = np.setdiff1d(np.arange(kind_of(module).size(module, key[1])), drop)
    return kept


IMPORTANCE = ("l1", "l2", "taylor")


def channel_importance(model: nn.Module, space: WidthSpace, criterion: str = "l1", data=None,
                       batches: int = 8, output_fn=None) -> list:
    """Per group, a (size,) array: each channel's weight importance summed over the group's layers
    (conv and linear rows or columns, depthwise filters, BN scales). criterion "l1": |w|, each
    layer's values divided by their mean first so that no layer dominates by its scale alone;
    "l2": w^2 summed over the whole group as it is (Torch-Pruning's group L2 magnitude: layers
    with larger weights count more); "taylor": |w * dL/dw|, per layer normalised like "l1", the
    first-order estimate of the loss change when the weight is removed
    (Molchanov et al. 2019), with the cross-entropy gradient accumulated over `batches` batches of
    `data` (an iterable of (x, y)) on a copy of the model in train mode (`output_fn` picks the
    logits from an output that is not a tensor)."""
    if criterion not in IMPORTANCE:
        raise ConfigError(f"unknown importance criterion {criterion!r}: use {' or '.join(map(repr, IMPORTANCE))}")
    if criterion == "taylor":
        model = _with_gradients(model, data, batches, output_fn)
    scores = []
    for group in space.groups:
        score = np.zeros(group.size)
        for (name, role), table in group.index.items():
            module = model.get_submodule(name)
            weight = getattr(module, "weight", None)
            if weight is None:
                continue
            w = weight.detach().abs().float()
            if criterion == "taylor":
                w = w * weight.grad.detach().abs().float()
            elif criterion == "l2":
                w = w ** 2
            per_index = per_layer_index(module, role, w).cpu().numpy()
            if criterion != "l2":
                per_index = per_index / max(per_index.mean(), 1e-12)
            score += per_index[table].sum(1)
        scores.append(score)
    return scores


def per_layer_index(module, role, w):
    """`w` (values of the module's weight, e.g. |weight|) summed per layer index of the module's
    channels on `role`: (channels,)."""
    kind = kind_of(module)
    if role == "in" and kind.name == "grouped_conv":  # index g * per + j: offset j of group g's filters
        groups = module.groups
        return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).sum((1, 3)).flatten()
    dim = kind.weight_dim(role)
    others = tuple(d for d in range(w.dim()) if d != dim)
    return w.sum(others) if others else w  # sum over () would sum everything


def _with_gradients(model, data, batches, output_fn=None):
    """A copy of `model` whose every weight (frozen ones too) holds dL/dw summed over `batches`
    batches of `data`."""
    if data is None:
        raise ConfigError("Taylor importance needs data: pass data=, an iterable of (x, y) batches")
    model = copy.deepcopy(model).train().requires_grad_(True)
    device = next(model.parameters()).device
    seen = 0
    for x, y in read_batches(data, "Taylor importance"):
        if seen == batches:
            break
        nn.functional.cross_entropy(logits(model(x.to(device)), output_fn), y.to(device)).backward()
        seen += 1
    if seen == 0:
        raise ConfigError("Taylor importance got no batch from its data")
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return model


def order_channels(model: nn.Module, space: WidthSpace, layout: str = "left", importance=None) -> nn.Module:
    """A copy of `model` that computes the same function with every group's channels permuted
    by channel_importance. layout "left": most important first, so the left path of any width
    starts as the magnitude-pruned network; "both-ends": ranks alternate from the two ends
    (0 at the left end, 1 at the right end, 2 next to 0, ...), so the left and the right path of a
    width start equally good. `importance`: per group scores (default channel_importance's L1).
    `space` stays valid for the copy (same shapes and index tables)."""
    if layout not in ("left", "both-ends"):
        raise ConfigError(f"layout must be 'left' or 'both-ends', got {layout!r}")
    check_space(model, space)
    ordered = copy.deepcopy(model)
    orders = {}  # (module, role): new layer index -> old layer index
    for group, score in zip(space.groups, importance or channel_importance(model, space)):
        if group.stream is not None:
            continue  # a shuffled stream's rows follow its wiring; its producers ranked their channels already
        perm = np.argsort(-score, kind="stable")  # position -> group channel, for layout "left"
        if layout == "both-ends":
            n = group.size
            ends = np.empty(n, dtype=int)  # the position of rank r
            ends[0::2], ends[1::2] = np.arange((n + 1) // 2), n - 1 - np.arange(n // 2)
            perm = perm[np.argsort(ends)]
        for (name, role), table in group.index.items():
            module = model.get_submodule(name)
            order = orders.setdefault((name, role), np.arange(kind_of(module).size(module, role)))
            order[table.ravel()] = table[perm].ravel()
    for (name, role), order in orders.items():
        module = ordered.get_submodule(name)
        kind_of(module).select(module, role, torch.from_numpy(order))
    return ordered


def slim(model: nn.Module, space: WidthSpace, cfg, side: str = "left", check: bool = True,
         tolerance: float = 1e-4) -> nn.Module:
    """A new, physically smaller copy of `model` for configuration `cfg` on `side`.

    The channels to remove come from the index tables analysis took from Torch-Pruning's
    dependency graph; each member layer is sliced once. With `check`, the slim model's output on
    the space's example input is compared with the masked supernet's (eval mode); a mismatch
    beyond `tolerance` (relative to max |y|) raises UnsupportedModelError naming the first layer
    that disagrees.
    """
    check_space(model, space)
    cfg = space.check(cfg)
    check_side(side)
    small = copy.deepcopy(model)
    for (name, role), keep in kept_indices(space, model, cfg, side).items():
        module = small.get_submodule(name)
        kind_of(module).select(module, role, torch.from_numpy(keep))
    small.compressor_info = {"widths": list(cfg), "side": side, "channels": space.channels(cfg),
                             "source": space.source}
    if check:
        training = small.training
        small.eval()
        _check_parity(model, space, cfg, side, small, space.example_input.to(next(small.parameters()).device),
                      tolerance)
        small.train(training)
    return small


def freeze_unsliceable(model: nn.Module, space: WidthSpace, rounds: int = 3) -> WidthSpace:
    """`space` with every group frozen whose slimming breaks `model`: slims the smallest
    configuration with the parity check, and when that fails, finds the groups that fail it one
    at a time (each alone at its smallest width) and freezes them, naming the module each one
    breaks. A model whose failure no single group explains keeps the refusal
    (UnsupportedModelError), now before any training instead of after it."""
    for _ in range(rounds):
        try:
            slim(model, space, space.min(), "left")
            return space
        except UnsupportedModelError:
            failures = {g: e for g in range(len(space)) if (e := _failure(model, space, g)) is not None}
            if not failures:
                raise
            reasons = {g: f"slimming it breaks module '{e.module}' ({e.op}): something there uses these channels "
                          f"outside Torch-Pruning's graph (a buffer, a parameter or a functional op of a fixed channel count)"
                       for g, e in failures.items()}
            log.warning("freezing %d group(s) whose slimming breaks the model: %s", len(reasons),
                        "; ".join(f"{space.groups[g].name} (module '{failures[g].module}')" for g in reasons))
            space = space.without(model, reasons)
    slim(model, space, space.min(), "left")  # still failing after `rounds`: the refusal stands
    return space


def _failure(model, space, g):
    """The UnsupportedModelError of slimming group g alone to its smallest width, or None."""
    cfg = list(space.max())
    cfg[g] = int(space.min_bins[g])
    try:
        slim(model, space, cfg, "left")
    except UnsupportedModelError as e:
        return e
    return None


def _check_parity(model, space, cfg, side, small, x, tolerance):
    net = Supernet(model, space).set(cfg, side)
    net.eval()
    recorded = {"net": {}, "small": {}}
    order = []

    def recorder(which, name):
        def hook(module, inputs, output):
            if which == "net":
                order.append(name)
            recorded[which][name] = output.detach()
        return hook

    names = list(net._targets)
    handles = [net.model.get_submodule(n).register_forward_hook(recorder("net", n)) for n in names]
    handles += [small.get_submodule(n).register_forward_hook(recorder("small", n)) for n in names]
    try:
        with torch.no_grad():
            y_net = raw_outputs(net.model, x)  # a detector: its heads' outputs, before post-processing
            try:
                with innermost_module_on_error(small) as culprit:
                    y_small = raw_outputs(small, x)
            except RuntimeError as e:  # a shape error: channels used by an op no layer owns
                name, kind = culprit[0] if culprit else (type(model).__name__, "?")
                raise UnsupportedModelError(
                    f"slimming {type(model).__name__} leaves a model that cannot run: module '{name}' "
                    f"({kind}) fails on the slimmed channels ({(str(e).splitlines() or [''])[0][:200]}). "
                    f"Something in it uses these channels outside Torch-Pruning's graph (a buffer or a "
                    f"functional op with a fixed channel count, e.g. a blur filter): pass exclude=[...] "
                    f"to cz.analyze to keep the channels around it fixed.", module=name, op=kind) from e
    finally:
        for h in handles:
            h.remove()
    # a model may return a tuple or dict of tensors (output_fn picks the logits elsewhere): compare them all
    diff = max(max_rel_diff(a, b) for a, b in zip(tree_leaves(y_net), tree_leaves(y_small)))
    if diff <= tolerance:
        return
    culprit, where = "the model output", type(model).__name__
    for name in order:
        active = net.active_channels(name)
        full = recorded["net"][name]
        dim = kind_of(net.model.get_submodule(name)).channel_dim
        expected = full if active is None else full.index_select(dim, active.to(full.device))
        got = recorded["small"].get(name)
        if got is None or got.shape != expected.shape or max_rel_diff(expected, got) > tolerance:
            culprit, where = f"module '{name}' ({type(net.model.get_submodule(name)).__name__})", name
            break
    raise UnsupportedModelError(
        f"slimming {type(model).__name__} changed what it computes (relative difference {diff:.2e} "
        f"> {tolerance:.0e}); the first layer that disagrees is {culprit}. Either an op around it is "
        f"not captured exactly by Torch-Pruning's graph, or the layer computes something that masking "
        f"and slicing do not agree on (its own forward, e.g. a weight standardised over its input "
        f"channels): pass exclude=[...] naming that layer to cz.analyze to keep its channels fixed.",
        module=where, op="slim parity")


def _shapes(model: nn.Module) -> dict:
    return {name: {a: getattr(m, a) for a in kind_of(m).shape_attrs}
            for name, m in model.named_modules() if kind_of(m) is not None}


def save_slim(small: nn.Module, path: str, source: str | None = None):
    """Write a slim model as data only: state dict, layer shapes, width configuration and the
    spec of the original architecture (`source`, e.g. 'torchvision:resnet18'; taken from the
    model when it was built with cz.load_model)."""
    info = getattr(small, "compressor_info", None)
    if info is None:
        raise ConfigError("save_slim expects a model returned by cz.slim")
    source = source or info.get("source")
    if source is None:
        raise ConfigError(
            "save_slim needs to know how to rebuild the architecture: pass source='torchvision:resnet18', "
            "'path/to/file.py:factory' or 'package.module:factory', or build the model with cz.load_model")
    payload = {"format": FORMAT, "compressor_version": __version__, "source": source,
               "widths": info["widths"], "side": info["side"], "channels": info["channels"],
               "shapes": _shapes(small), "state_dict": small.state_dict()}
    atomic_torch_save(payload, path)


def load_slim(path: str, trust_source: bool = False) -> nn.Module:
    """Rebuild a model written by save_slim. The file is loaded with weights_only=True (no code is
    unpickled), and the architecture it names is built only when it is a known builder
    (torchvision:NAME, timm:NAME, the project's own; models.is_known_builder). Any other source
    (a .py file, a module:callable) would run code that the file chose: it is refused unless the
    caller trusts the file (`trust_source=True`, CLI --trust-source)."""
    payload = _read_slim(path)
    source = payload["source"]
    try:
        known = is_known_builder(source)
    except ConfigError as e:
        raise ConfigError(f"{path!r} names a malformed source: {e}") from e
    if not known and not trust_source:
        raise ConfigError(
            f"{path!r} names the source {source!r}, which is not a known builder (torchvision:NAME, timm:NAME, "
            f"{', '.join(PROJECT_BUILDERS)}): rebuilding it would run code that the file chose. If you trust the "
            f"file, call load_slim(path, trust_source=True) (CLI: --trust-source)")
    model = load_model(source)
    try:
        _restore(model, payload)
    except (AttributeError, KeyError, RuntimeError, TypeError) as e:
        raise ConfigError(f"{path!r} does not fit the architecture it names ({source!r}): "
                          f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from e
    model.compressor_info = {k: payload[k] for k in ("widths", "side", "channels", "source")}
    return model


def _read_slim(path):
    """The payload of a save_slim file, or a ConfigError naming the file and what is wrong."""
    if os.path.isdir(path):
        raise ConfigError(f"{path!r} is a directory, not a model file written by compressor.save_slim")
    if not os.path.isfile(path):
        raise ConfigError(f"{path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"{path!r} is empty (0 bytes): the file was not written completely; write it again")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ConfigError(f"{path!r} is not a readable torch file (corrupt: {(str(e).splitlines() or [''])[0]})") from e
        raise ConfigError(f"{path!r} holds pickled objects, not data (e.g. torch.save(model) of a whole module), "
                          f"and is not loaded because unpickling runs code: save it with cz.save_slim, or load "
                          f"a state dict into the model yourself") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path!r} is not a readable torch file (truncated or corrupt: "
                          f"{(str(e).splitlines() or [type(e).__name__])[0]}): write it again") from e
    missing = [k for k in ("source", "shapes", "state_dict", "widths", "side", "channels")
               if not isinstance(payload, dict) or k not in payload]
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or missing:
        raise ConfigError(f"{path!r} is not a slim model written by compressor.save_slim"
                          + (f" (missing {', '.join(missing)})" if isinstance(payload, dict) and
                             payload.get("format") == FORMAT else ""))
    return payload


def _restore(model, payload):
    """Give `model` the saved layer shapes, then load the saved tensors strictly."""
    for name, attrs in payload["shapes"].items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            if attr not in _SHAPE_ATTRS or type(value) is not int:  # the file sets layer sizes, nothing else
                raise TypeError(f"shape entry {name}.{attr} = {value!r} is not a layer size")
            setattr(module, attr, value)
    # Give every tensor whose shape changed an empty tensor of the saved shape, then load.
    state = payload["state_dict"]
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = getattr(owner, attr)
        if isinstance(current, torch.Tensor) and current.shape != value.shape:
            fresh = torch.empty(value.shape, dtype=value.dtype)
            if isinstance(current, nn.Parameter):
                setattr(owner, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                owner._buffers[attr] = fresh
    model.load_state_dict(state, strict=True)
