"""compressor: BCNet width search and physical slimming for pretrained PyTorch CNNs.

The public names load on first use (a module-level __getattr__), so `import compressor` imports no
torch: `compressor bench model.onnx` runs where only onnxruntime and numpy are installed."""
import importlib
import importlib.util
import sys
import types

from ._version import __version__  # noqa: F401
from .errors import CompressorError, ConfigError, InfeasibleBudgetError, UnsupportedModelError  # noqa: F401

# public name -> the submodule that defines it (each of these imports torch)
_LAZY = {
    "ChannelGroup": "groups", "Member": "groups",
    "count_params": "cost", "measure_flops": "cost",
    "WidthSpace": "space", "analyze": "space",
    "Supernet": "supernet", "supernet": "supernet",
    "load_slim": "slim", "order_channels": "slim", "save_slim": "slim", "slim": "slim",
    "load_model": "models",
    "Budget": "budget", "Constraint": "budget", "parse_budget": "budget",
    "TrainResult": "train", "train_supernet": "train",
    "SearchResult": "search", "recalibrate_bn": "search", "score": "search", "search": "search",
    "uniform_baseline": "search",
    "accuracy": "finetune", "finetune": "finetune",
    "CompressionResult": "api", "compress": "api", "search_trained": "api", "pareto_front": "api",
    "pick_point": "api", "CompressConfig": "config",
}

__all__ = ["CompressorError", "ConfigError", "InfeasibleBudgetError", "UnsupportedModelError", "__version__",
           *_LAZY]


def __getattr__(name):
    if name not in _LAZY:  # a submodule (cz.exporters, cz.latency, ...), as the eager imports used to bind
        if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'compressor' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Root(types.ModuleType):
    """`cz.search`, `cz.slim` and `cz.supernet` are functions named like their modules: importing
    the module (as any stage does) must not replace the function on the package."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Root
