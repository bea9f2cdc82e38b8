"""Latency as a budget: target runtimes, timing statistics and the measured latency model."""
from .model import LatencyModel, attach_model, attached, build_latency_model, default_cache_dir
from .stats import Measurement, time_calls
from .targets import Target, runtime, target_for

__all__ = ["LatencyModel", "Measurement", "Target", "attach_model", "attached", "build_latency_model",
           "default_cache_dir", "runtime", "target_for", "time_calls"]
