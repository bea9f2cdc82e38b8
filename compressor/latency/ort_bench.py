"""ONNX Runtime timing. Needs only onnxruntime and numpy (no torch): `compressor bench model.onnx`
and the ort-* targets both time sessions through here."""
from __future__ import annotations

import importlib.util
import os
import platform

import numpy as np

from .stats import Measurement, time_calls

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
INSTALL = {"cpu": "pip install onnxruntime", "cuda": "pip install onnxruntime-gpu (needs CUDA and cuDNN)"}


class RuntimeMissing(RuntimeError):
    """onnxruntime, or the requested execution provider, is not installed."""


def require_ort(device="cpu"):
    """Import onnxruntime and check that `device`'s execution provider is available."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeMissing(f"onnxruntime is not installed: {INSTALL[device]}")
    import onnxruntime as ort
    provider = PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise RuntimeMissing(f"ONNX Runtime {ort.__version__} here has no {provider} (available: "
                             f"{', '.join(ort.get_available_providers())}): {INSTALL[device]}")
    return ort


def session(model, device="cpu", threads=1):
    """An InferenceSession on `model` (a path or serialized bytes) with a fixed intra-op thread
    count, so that timings do not depend on how many cores happen to be free."""
    ort = require_ort(device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = os.fspath(model) if not isinstance(model, bytes) else model
    return ort.InferenceSession(model, options, providers=[PROVIDERS[device]])


def input_array(sess, batch=None, shape=None, seed=0):
    """A random float input for the session's first input: `shape` (C, H, W, ...) or the model's
    own static dims, at `batch` (default: the model's static batch, else 1)."""
    meta = sess.get_inputs()[0]
    if batch is None:  # the model's own static batch, else 1
        batch = meta.shape[0] if meta.shape and isinstance(meta.shape[0], int) else 1
    if shape is None:
        shape = meta.shape[1:]
        if any(not isinstance(d, int) for d in shape):
            raise ValueError(f"input {meta.name!r} has symbolic dims {meta.shape}: pass an input shape")
    dtype = np.float16 if "float16" in meta.type else np.float32
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(dtype)


def measure_session(sess, x, *, warmup=3, reps=20, what="onnx model", warn=True) -> Measurement:
    import onnxruntime as ort
    feed = {sess.get_inputs()[0].name: x}
    m = time_calls(lambda: sess.run(None, feed), warmup=warmup, reps=reps, batch=x.shape[0], what=what, warn=warn)
    m.info = {"runtime": "onnxruntime", "onnxruntime": ort.__version__,
              "provider": sess.get_providers()[0], "device": cpu_name(), "input_shape": list(x.shape)}
    return m


class InvalidModelFile(ValueError):
    """ONNX Runtime cannot load the file (empty, truncated, not ONNX)."""


def machine() -> dict:
    """Where a timing was taken: the CPU, the system and the library versions."""
    import onnxruntime as ort
    return {"device": cpu_name(), "machine": platform.machine(), "system": platform.platform(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


def bench_onnx(path, *, batch=None, shape=None, device="cpu", threads=1, warmup=10, reps=100) -> Measurement:
    """Latency of an ONNX file on ONNX Runtime."""
    require_ort(device)
    try:
        sess = session(path, device, threads)
    except Exception as e:  # onnxruntime's load errors (InvalidProtobuf, InvalidArgument, ...) share no base
        reason = str(e).split(" failed:", 1)[-1].strip()
        raise InvalidModelFile(f"ONNX Runtime cannot load {str(path)!r} ({reason}): the file is empty, truncated "
                               f"or not an ONNX model; export it again") from e
    m = measure_session(sess, input_array(sess, batch, shape), warmup=warmup, reps=reps, what=str(path))
    m.info["threads"] = threads
    m.info["metadata"] = dict(sess.get_modelmeta().custom_metadata_map)  # e.g. a latency probe's signature
    return m


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
