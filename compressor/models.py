"""Building a model from a spec string, so that files can name an architecture without pickling
code: `torchvision:resnet18`, `path/to/file.py:factory`, or `package.module:factory`."""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch
import torchvision
from torch import nn

from .errors import ConfigError

SPEC_HELP = "use 'torchvision:NAME', 'path/to/file.py:factory' or 'package.module:factory'"


def _factory(spec: str):
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"bad model spec {spec!r}: {SPEC_HELP}")
    where, name = spec.rsplit(":", 1)
    if where == "torchvision":
        available = torchvision.models.list_models()
        if name not in available:
            close = [m for m in available if name.split("_")[0] in m][:8]
            raise ConfigError(f"torchvision has no model {name!r}" + (f"; did you mean {close}?" if close else ""))
        # weights=None: nothing is ever downloaded; pass --weights to load a file
        return lambda: torchvision.models.get_model(name, weights=None)
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ConfigError(f"model file {where!r} does not exist ({SPEC_HELP})")
        module_spec = importlib.util.spec_from_file_location(f"compressor_user_{abs(hash(where))}", where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"cannot import {where!r} from model spec {spec!r}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"{where!r} has no callable {name!r} ({SPEC_HELP})")
    return factory


def canonical_spec(spec: str) -> str:
    """File specs become absolute so a saved file can be loaded from another folder."""
    where, _, name = spec.rpartition(":")
    return f"{os.path.abspath(where)}:{name}" if where.endswith(".py") else spec


def load_state(path: str) -> dict:
    """A state dict from a file saved with torch.save, loaded without unpickling code. Accepts
    {"state_dict": ...} wrappers and strips DataParallel's "module." prefix."""
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path!r} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model named by `spec` (and load `weights`, a state-dict file, strictly)."""
    model = _factory(spec)()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            model.load_state_dict(load_state(weights), strict=True)
        except RuntimeError as e:
            raise ConfigError(f"weights {weights!r} do not fit {spec!r}: {e}") from e
    model._compressor_source = canonical_spec(spec)  # lets save_slim name the architecture
    return model
