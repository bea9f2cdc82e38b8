"""Target runtimes: where a latency is measured. A Target is the budget's runtime name
(`ort-cpu`, `torch-cuda`, `trt-fp16`, ...) plus the batch size, the input shape and the thread count;
`runtime(target)` gives the object that measures a torch model (a whole network or one layer) there."""
from __future__ import annotations

import contextlib
import copy
import io
import platform
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..budget import LATENCY_TARGETS
from ..errors import ConfigError
from ..formats import TRT_FORMATS, export_format
from .ort_bench import RuntimeMissing, cpu_name, measure_session, require_ort, session
from .stats import Measurement, time_calls


@dataclass(frozen=True)
class Target:
    """`runtime` is one of LATENCY_TARGETS; `input_shape` excludes the batch. `threads` fixes the
    CPU thread count (torch.set_num_threads / ORT intra_op_num_threads); `channels_last` and
    `half` apply to torch-cuda only. `warmup`/`reps` set the timing effort."""
    runtime: str
    batch: int = 1
    input_shape: tuple = (3, 224, 224)
    threads: int = 1
    channels_last: bool = False
    half: bool = False
    warmup: int = 3
    reps: int = 20

    def __post_init__(self):
        if self.runtime not in LATENCY_TARGETS:
            raise ConfigError(f"unknown latency target {self.runtime!r}: use one of {', '.join(LATENCY_TARGETS)}")
        if (self.channels_last or self.half) and self.runtime != "torch-cuda":
            raise ConfigError("channels_last and half are options of the torch-cuda target only")
        if self.batch < 1 or self.threads < 1:
            raise ConfigError(f"batch and threads must be >= 1, got {self.batch}, {self.threads}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    @property
    def precision(self) -> str:
        if self.runtime in TRT_FORMATS:
            return export_format(self.runtime).precision
        return "fp16" if self.half else "fp32"

    @property
    def name(self) -> str:
        extras = "".join(f"+{k}" for k in ("channels_last", "half") if getattr(self, k))
        return f"{self.runtime}{extras}:b{self.batch}:{'x'.join(map(str, self.input_shape))}:t{self.threads}"

    def example(self, seed=0) -> torch.Tensor:
        return torch.randn((self.batch, *self.input_shape), generator=torch.Generator().manual_seed(seed))


def target_for(spec, example_input: torch.Tensor, **options) -> Target:
    """A Target from a runtime name (or a Target, returned as is) for `example_input`'s shape, at
    its batch size unless `options` give `batch` (a deployment's batch: latency budgets timed there)."""
    if isinstance(spec, Target):
        return spec
    options.setdefault("batch", int(example_input.shape[0]))
    return Target(spec, input_shape=tuple(example_input.shape[1:]), **options)


def runtime(target: Target):
    """The runtime measuring on `target`; ConfigError naming what is missing and how to install it
    (TensorRTUnavailable for the trt-* targets)."""
    family = target.runtime.partition("-")[0]
    if family == "torch":
        return TorchRuntime(target)
    if family == "ort":
        return OrtRuntime(target)
    return TrtRuntime(target)


@contextlib.contextmanager
def _torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _versions(**extra) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), **extra}


class TorchRuntime:
    """Eager PyTorch; on CUDA each call is timed with CUDA events."""

    def __init__(self, target: Target):
        self.target = target
        self.device = torch.device("cuda" if target.runtime == "torch-cuda" else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("target torch-cuda needs a CUDA GPU and a CUDA build of torch (this torch "
                              f"{torch.__version__} sees none): install torch from https://pytorch.org "
                              "with CUDA on a machine with an NVIDIA driver")
        self.info = {"runtime": target.runtime, "target": target.name, "precision": target.precision,
                     "device": torch.cuda.get_device_name(0) if self.device.type == "cuda" else cpu_name(),
                     "versions": _versions()}

    def measure(self, model: torch.nn.Module, x: torch.Tensor, what="model", warn=True) -> Measurement:
        model = copy.deepcopy(model).eval().to(self.device)
        x = x.to(self.device)
        if self.target.half:
            model, x = model.half(), x.half()
        if self.target.channels_last and x.dim() == 4:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        clock = _cuda_clock if self.device.type == "cuda" else None
        with torch.no_grad(), _torch_threads(self.target.threads):
            m = time_calls(lambda: model(x), warmup=self.target.warmup, reps=self.target.reps,
                           batch=x.shape[0], clock=clock, what=what, warn=warn)
        m.info = dict(self.info, threads=self.target.threads)
        return m


def _cuda_clock(call) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def onnx_bytes(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    """The model as ONNX, in memory. The TorchScript exporter is used because it takes ~20 ms on a
    layer and ~1 s on ResNet-18 where torch.export takes seconds; it folds BN into the preceding
    conv in eval mode, as a deployment export does (exporters.onnx remains the delivery path)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice, on every call
        torch.onnx.export(copy.deepcopy(model).eval().cpu(), (x.cpu(),), buf, dynamo=False,
                          input_names=["input"], output_names=["output"], do_constant_folding=True)
    return buf.getvalue()


class OrtRuntime:
    """ONNX Runtime (CPU or CUDA execution provider), fixed intra-op thread count."""

    def __init__(self, target: Target):
        self.target = target
        self.device = target.runtime.partition("-")[2]
        try:
            ort = require_ort(self.device)
        except RuntimeMissing as e:
            raise ConfigError(f"target {target.runtime}: {e}") from e
        self.info = {"runtime": target.runtime, "target": target.name, "precision": "fp32",
                     "device": cpu_name() if self.device == "cpu" else _gpu_name(),
                     "versions": _versions(onnxruntime=ort.__version__)}

    def measure(self, model: torch.nn.Module, x: torch.Tensor, what="model", warn=True) -> Measurement:
        sess = session(onnx_bytes(model, x), self.device, self.target.threads)
        m = measure_session(sess, np.ascontiguousarray(x.detach().cpu().numpy()), warmup=self.target.warmup,
                            reps=self.target.reps, what=what, warn=warn)
        m.info = dict(self.info, threads=self.target.threads)
        return m


def _gpu_name():
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown GPU"


class TrtRuntime:
    """TensorRT engines built through compressor.exporters (fp32, fp16 or int8 with random
    calibration data: only the speed matters here). Timed with numpy inputs through EngineRunner,
    so the host-device copies are included."""

    def __init__(self, target: Target):
        from ..exporters import engine_runner
        self.trt = engine_runner.require_tensorrt()  # raises TensorRTUnavailable, naming what is missing
        self.target = target
        self.info = {"runtime": target.runtime, "target": target.name, "precision": target.precision,
                     "device": _gpu_name(), "versions": _versions(tensorrt=self.trt.__version__)}

    def measure(self, model: torch.nn.Module, x: torch.Tensor, what="model", warn=True) -> Measurement:
        from ..exporters import EngineRunner, export_file
        calib = [np.random.default_rng(i).standard_normal(tuple(x.shape)).astype(np.float32) for i in range(4)]
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/m.engine"
            export_file(model, x.cpu(), path, fmt="trt", precision=self.target.precision,
                        calib_data=calib if self.target.precision == "int8" else None)
            run = EngineRunner(path)
            xn = np.ascontiguousarray(x.detach().cpu().numpy())
            m = time_calls(lambda: run(xn), warmup=self.target.warmup, reps=self.target.reps,
                           batch=x.shape[0], what=what, warn=warn)
        m.info = dict(self.info)
        return m
