"""Building a model from a spec string, so that files can name an architecture without pickling
code, and naming the spec of a model that was built some other way.

Specs: `torchvision:resnet18`, `timm:resnet18`, `compressor.cifar:resnet56` (the known builders),
`path/to/file.py:factory` or `package.module:factory` (code the caller chose), each optionally
with literal keyword arguments: `torchvision:resnet18(num_classes=4)`."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re

import torch
import torchvision
from torch import nn

from .errors import ConfigError

SPEC_HELP = ("use 'torchvision:NAME', 'timm:NAME', 'path/to/file.py:factory' or 'package.module:factory', "
             "optionally with keyword arguments: 'torchvision:resnet18(num_classes=4)'")
# The project's own builders: safe to call with the arguments a file records (SAFE_KWARGS).
PROJECT_BUILDERS = ("compressor.demo:DemoNet", "compressor.cifar:resnet20", "compressor.cifar:resnet56")
# The only constructor arguments a known builder is called with from a file: integers that
# change shapes, never strings or flags (a torchvision `weights=` or timm `pretrained=` downloads).
SAFE_KWARGS = ("num_classes",)
_SPEC = re.compile(r"(?P<where>.+):(?P<name>[A-Za-z_][\w.]*)(?:\((?P<args>.*)\))?", re.S)


def parse_spec(spec: str):
    """(where, name, kwargs) of a spec; the arguments must be literals (nothing is evaluated)."""
    match = _SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ConfigError(f"bad model spec {spec!r}: {SPEC_HELP}")
    kwargs = {}
    if match["args"]:
        try:
            call = ast.parse(f"f({match['args']})", mode="eval").body
            if call.args:
                raise ValueError("positional arguments")
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError, TypeError) as e:
            raise ConfigError(f"bad arguments in model spec {spec!r} (keyword arguments with literal values "
                              f"only): {e}") from e
    return match["where"], match["name"], kwargs


def format_spec(where: str, name: str, kwargs=None) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in sorted((kwargs or {}).items()))
    return f"{where}:{name}" + (f"({args})" if args else "")


def is_known_builder(spec: str) -> bool:
    """True when `spec` names a torchvision, timm or project builder with only SAFE_KWARGS:
    building it runs no code that a file chose."""
    where, name, kwargs = parse_spec(spec)
    known = where in ("torchvision", "timm") or f"{where}:{name}" in PROJECT_BUILDERS
    return known and all(k in SAFE_KWARGS and type(v) is int for k, v in kwargs.items())


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def _factory(spec: str):
    """A no-argument callable that builds the model `spec` names."""
    where, name, kwargs = parse_spec(spec)
    if where == "torchvision":
        available = torchvision.models.list_models()
        if name not in available:
            close = [m for m in available if name.split("_")[0] in m][:8]
            raise ConfigError(f"torchvision has no model {name!r}" + (f"; did you mean {close}?" if close else ""))
        # weights=None: nothing is ever downloaded; pass --weights to load a file
        return lambda: torchvision.models.get_model(name, **{**kwargs, "weights": None})
    if where == "timm":
        timm = _timm()
        if timm is None:
            raise ConfigError(f"model spec {spec!r} needs timm, which is not installed: pip install timm")
        if not timm.is_model(name):
            raise ConfigError(f"timm has no model {name!r}")
        return lambda: timm.create_model(name, **{**kwargs, "pretrained": False})
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
    return lambda: factory(**kwargs)


def canonical_spec(spec: str) -> str:
    """File specs become absolute so a saved file can be loaded from another folder."""
    where, name, kwargs = parse_spec(spec)
    return format_spec(os.path.abspath(where), name, kwargs) if where.endswith(".py") else spec


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


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel (the same object, not a copy)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _layout(model: nn.Module, shapes=True):
    """Module names and types, and (with `shapes`) every state tensor's name and shape."""
    layout = [(name, type(m).__qualname__) for name, m in model.named_modules()]
    if shapes:
        layout += [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    return layout


def _build_like(spec: str):
    """The model `spec` builds, on the meta device when it can be (no memory, no init cost)."""
    factory = _factory(spec)
    try:
        with torch.device("meta"):
            return factory()
    except Exception:  # a builder that computes on its tensors while constructing: build it for real
        return factory()


def _candidates(model: nn.Module):
    """Known builder specs (without arguments) that may have built `model`'s class."""
    cls = type(model)
    if cls.__module__.startswith("torchvision.models"):
        for name in torchvision.models.list_models():
            if torchvision.models.get_model_builder(name).__module__ == cls.__module__:
                yield f"torchvision:{name}"
    elif cls.__module__.startswith("timm.") and _timm() is not None:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if arch and _timm().is_model(arch):
            yield f"timm:{arch}"
    for spec in PROJECT_BUILDERS:
        if spec.split(":")[0] == cls.__module__:
            yield spec


def _class_counts(model: nn.Module):
    """Plausible `num_classes` values: the output size of the last linear and of the last conv."""
    counts = []
    for kind, attr in ((nn.Linear, "out_features"), (nn.Conv2d, "out_channels")):
        last = [m for m in model.modules() if isinstance(m, kind)]
        if last:
            counts.append(getattr(last[-1], attr))
    return list(dict.fromkeys(counts))


def _builds_same(spec: str, layout, shapes=True) -> bool:
    """True when `spec` builds a model whose _layout is `layout`."""
    try:
        built = _build_like(spec)
    except Exception:
        return False
    return _layout(built, shapes) == layout


def recognise(model: nn.Module) -> str | None:
    """The known builder spec (with the `num_classes` it needs) that builds exactly `model`'s
    architecture (module names, types and tensor shapes), or None."""
    modules, layout = _layout(model, shapes=False), _layout(model)
    for base in _candidates(model):
        try:
            built = _build_like(base)
        except Exception:
            continue
        if _layout(built, shapes=False) != modules:  # another depth or block: no argument we try fixes it
            continue
        if _layout(built) == layout:
            return base
        for n in _class_counts(model):
            spec = format_spec(*base.split(":", 1), {"num_classes": n})
            if _builds_same(spec, layout):
                return spec
    return None


def _no_argument_class(model: nn.Module) -> str | None:
    """'module:Class' when the model's class builds without arguments into the same modules."""
    cls = type(model)
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
           for p in params if p.name != "self") or "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        return None  # a local class or a script's own cannot be imported where model.pt is loaded
    spec = f"{cls.__module__}:{cls.__qualname__}"
    return spec if _builds_same(spec, _layout(model, shapes=False), shapes=False) else None


def name_architecture(model: nn.Module, source: str | None = None) -> str:
    """The spec save_slim records for `model`: `source` if given (checked to build the same
    modules), else the one cz.load_model recorded, a recognised torchvision / timm / project
    builder, or the model's class when it builds without arguments. Raises ConfigError saying how
    to name the architecture when none of these works."""
    model = unwrap(model)
    given = source or getattr(model, "_compressor_source", None)
    if given:
        given = canonical_spec(given)
        try:
            built = _build_like(given)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"source {given!r} does not build: {type(e).__name__}: {e}") from e
        if _layout(built, shapes=False) != _layout(model, shapes=False):
            theirs, ours = dict(_layout(built, False)), dict(_layout(model, False))
            first = next((n for n in ours if theirs.get(n) != ours[n]), next(iter(theirs.keys() - ours.keys()), "?"))
            raise ConfigError(f"source {given!r} builds another architecture than the model (first difference: "
                              f"module {first!r}): name the builder that returns this model")
        return given
    spec = recognise(model) or _no_argument_class(model)
    if spec is None:
        raise ConfigError(
            f"cannot name the architecture of {type(model).__name__} ({type(model).__module__}), so model.pt "
            f"could not be written: pass source='path/to/file.py:factory' (or 'package.module:factory', "
            f"'torchvision:NAME(num_classes=N)') to compress (CLI: --model names it), or build the model with "
            f"cz.load_model(spec). Nothing was trained.")
    return spec
