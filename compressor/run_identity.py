"""What a run is: a few short hashes and plain values that a checkpoint stores, so that a resume
continues the same run and a reused folder never hands back another run's network.

Parts: the architecture (repr and tensor shapes), the initial weights (every state tensor), the
data (its length and a hash of a few sampled items, read under a fixed seed so that random
augmentation does not change it), and the options (learning rates, epochs, seed, budget, ...)."""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

DATA_SAMPLES = 8  # items hashed from the data: cheap, and a changed dataset almost surely changes one


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
    return h.hexdigest()[:16]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def architecture_hash(model: nn.Module) -> str:
    return _digest([repr(model)] + [f"{k}:{tuple(v.shape)}:{v.dtype};" for k, v in model.state_dict().items()])


def weights_hash(model: nn.Module) -> str:
    return _digest(b for v in model.state_dict().values() for b in (str(v.dtype).encode(), _tensor_bytes(v)))


def _item_bytes(item):
    """Bytes of one data item: tensors, arrays, PIL images, numbers, strings and their containers."""
    if isinstance(item, torch.Tensor):
        return [str(tuple(item.shape)).encode(), _tensor_bytes(item)]
    if isinstance(item, np.ndarray):
        return [str(item.shape).encode(), np.ascontiguousarray(item).tobytes()]
    if isinstance(item, dict):
        return [b for k in sorted(item, key=str) for b in [str(k).encode(), *_item_bytes(item[k])]]
    if isinstance(item, (list, tuple)):
        return [b for v in item for b in _item_bytes(v)]
    if hasattr(item, "tobytes") and hasattr(item, "size"):  # a PIL image
        return [str(item.size).encode(), item.tobytes()]
    return [repr(item).encode()]


def data_hash(data) -> str:
    """Length and a few evenly spaced items of a Dataset (or a DataLoader's dataset)."""
    dataset = getattr(data, "dataset", data) if isinstance(data, torch.utils.data.DataLoader) else data
    try:
        n = len(dataset)
    except TypeError:
        return _digest([type(dataset).__qualname__])  # an iterable without a length: its type only
    indices = sorted({int(i) for i in np.linspace(0, n - 1, min(n, DATA_SAMPLES))}) if n else []
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            parts = [str(n).encode()] + [b for i in indices for b in _item_bytes(dataset[i])]
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
    return _digest(parts)


def plain(value):
    """`value` as JSON-able data (tuples become lists, unknown objects their repr), so that it can
    be stored in a weights_only checkpoint and compared."""
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def run_identity(model: nn.Module, data, **options) -> dict:
    """{part: value} of a run: architecture, weights, data, then each option as plain data."""
    return {"architecture": architecture_hash(model), "weights": weights_hash(model), "data": data_hash(data),
            **{k: plain(v) for k, v in options.items()}}


NAMES = {"architecture": "the model architecture", "weights": "the model weights", "data": "the training data",
         "teacher": "the distillation teacher"}  # hashes: named, not printed


def check_same_run(saved: dict, current: dict, path: str, fix: str, what="the checkpoint of another run"):
    """Raise ConfigError naming every part in which the run that wrote `path` differs from this one."""
    if saved == current:
        return
    differ = []
    for key in sorted(saved.keys() | current.keys(), key=lambda k: (list(NAMES).index(k) if k in NAMES else len(NAMES), k)):
        was, now = saved.get(key, "<not recorded>"), current.get(key, "<not recorded>")
        if was != now:
            differ.append(NAMES[key] if key in NAMES else f"{key} ({was!r} then, {now!r} now)")
    raise ConfigError(f"{path} is {what}: {', '.join(differ)} differ. {fix}")
