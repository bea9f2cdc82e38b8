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
BENCH_FORMAT = "compressor-bench-1"


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
    batch = batch or (input_shape[0] if input_shape else None)  # None: an .onnx file's own batch, else 1
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
        m = _bench_engine(path, batch or 1, sample or DEFAULT_SHAPE, warmup, reps)
    elif ext == ".pt":
        m = _bench_slim(path, target, batch or 1, sample or DEFAULT_SHAPE, threads, warmup, reps, trust_source)
    else:
        raise ConfigError(f"cannot bench {path!r}: expected a .pt (save_slim), .onnx or .engine file")
    m.info.update(file=os.path.abspath(path), target=target)
    return m


def report(m: Measurement, path, target) -> dict:
    """The JSON record of one file's timing (what `compressor bench --json` writes, and what
    `build_latency_model(measurements=...)` reads back)."""
    return {"model": os.path.basename(path), "target": target, "batch": m.batch, "p50_ms": m.median_us / 1e3,
            "p90_ms": m.p90_us / 1e3, "p99_ms": m.p99_us / 1e3, "mean_ms": m.mean_us / 1e3,
            "throughput_per_s": m.throughput, "reps": m.reps, "cv": m.cv, "unstable": m.unstable, "info": m.info}


def bench_files(path, target="ort-cpu", **options) -> dict:
    """Bench `path` (a file, or every .onnx file in a folder, sorted by name) and return the JSON
    document `compressor bench --json` writes: {"format", "machine", "results": [report, ...]}."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(".onnx"))
        if not files:
            raise ConfigError(f"folder {path!r} holds no .onnx file to bench")
    else:
        files = [path]
    results = [report(bench_file(f, target=target, **options), f, target) for f in files]
    try:
        from .ort_bench import machine
        where = machine()
    except ImportError:  # a .pt or .engine bench without onnxruntime
        where = {}
    return {"format": BENCH_FORMAT, "machine": where, "results": results}


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
