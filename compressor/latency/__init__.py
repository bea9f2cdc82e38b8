"""Latency as a budget: target runtimes, timing statistics and the measured latency model.

`stats` and `ort_bench` (what `compressor bench model.onnx` uses) import no torch; the names from
`model` and `targets` load on first use."""
import importlib

from .stats import Measurement, time_calls

_LAZY = {"LatencyModel": "model", "attach_model": "model", "attached": "model", "build_latency_model": "model",
         "default_cache_dir": "model", "export_probes": "model", "Target": "targets", "runtime": "targets",
         "target_for": "targets"}

__all__ = ["Measurement", "time_calls", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'compressor.latency' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
