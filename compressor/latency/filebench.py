"""`compressor bench`: the latency of a deployed file. `.onnx` needs only onnxruntime and numpy and
`.engine` only tensorrt and pycuda (through exporters/engine_runner.py): this module imports no
torch. `.pt` (a save_slim file) loads torch when it is asked for."""
from __future__ import annotations

import os

import numpy as np

from ..errors import ConfigError
from .ort_bench import RuntimeMissing, bench_onnx
from .stats import Measurement, time_calls

DEFAULT_SHAPE = (3, 224, 224)


def parse_shape(text):
    """'1x3x224x224' -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigError(f"bad input shape {text!r}: expected NxCxHxW such as 1x3x224x224")
    return shape


def bench_file(path, target="ort-cpu", batch=None, input_shape=None, threads=1, warmup=10,
               reps=100, trust_source=False) -> Measurement:
    """Time `path` on `target`. `input_shape` is the full shape with the batch first; `batch`
    overrides its first dim (default 1, or the shape's). `trust_source`: see cz.load_slim."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path!r} does not exist")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"batch must be a positive integer, got {batch!r}")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"{path!r} is empty: export or copy it again")
    if input_shape is not None and batch is not None and input_shape[0] != batch:
        raise ConfigError(f"--batch {batch} disagrees with --input {'x'.join(map(str, input_shape))}")
    batch = batch if batch is not None else (input_shape[0] if input_shape else 1)
    sample = tuple(input_shape[1:]) if input_shape else None
    ext = os.path.splitext(path)[1].lower()
    family, _, device = target.partition("-")
    if ext == ".onnx":
        if family != "ort":
            raise ConfigError(f"an .onnx file runs on ort-cpu or ort-cuda, not {target!r}")
        try:
            m = bench_onnx(path, batch=batch, shape=sample, device=device, threads=threads, warmup=warmup, reps=reps)
        except (RuntimeMissing, ValueError) as e:  # ValueError: symbolic input dims and no --input
            raise ConfigError(str(e)) from e
    elif ext == ".engine":
        if family != "trt":
            raise ConfigError(f"an .engine file runs on its TensorRT target (trt-fp32/fp16/int8), not {target!r}")
        m = _bench_engine(path, batch, sample or DEFAULT_SHAPE, warmup, reps)
    elif ext == ".pt":
        m = _bench_slim(path, target, batch, sample or DEFAULT_SHAPE, threads, warmup, reps, trust_source)
    else:
        raise ConfigError(f"cannot bench {path!r}: expected a .pt (save_slim), .onnx or .engine file")
    m.info.update(file=os.path.abspath(path), target=target)
    return m


def _bench_engine(path, batch, sample, warmup, reps):
    from ..exporters.engine_runner import EngineRunner  # numpy only at import; TensorRT checked here
    run = EngineRunner(path)
    x = np.random.default_rng(0).standard_normal((batch, *sample)).astype(np.float32)
    m = time_calls(lambda: run(x), warmup=warmup, reps=reps, batch=batch, what=path)
    m.info = {"runtime": "tensorrt", "tensorrt": run._trt.__version__, "input_shape": list(x.shape),
              "note": "host-device copies included"}
    return m


def _bench_slim(path, target, batch, sample, threads, warmup, reps, trust_source=False):
    from ..slim import load_slim
    from .targets import Target, runtime
    t = Target(target, batch=batch, input_shape=sample, threads=threads, warmup=warmup, reps=reps)
    return runtime(t).measure(load_slim(path, trust_source=trust_source), t.example(), what=path)
