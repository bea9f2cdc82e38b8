"""Build TensorRT 10 engines from ONNX files (fp32, fp16, int8 with entropy calibration).

Written against the TensorRT 10 Python API (`trt.Builder`, `trt.OnnxParser`, optimization
profiles, `IInt8EntropyCalibrator2`, timing caches, `build_serialized_network`). TensorRT 11
removed the FP16/INT8 builder flags and implicit int8 calibration, so 10.x is required.

Everything that does not need TensorRT (argument checks, profile shapes, calibration batching,
cache files, the parity verdict) is a plain function, testable on any machine.
"""

import dataclasses
import logging
import os

import numpy as np
import onnx

from compressor.errors import ConfigError
from compressor.formats import PRECISIONS

from .engine_runner import (  # noqa: F401  (TensorRTUnavailable is part of this module's API)
    EngineRunner,
    TensorRTUnavailable,
    cuda_backend,
    require_tensorrt,
)
from compressor.files import check_output_folder, read_bytes_or_none, write_bytes_atomic

from .onnx import ExportError, onnxruntime_session, run_onnxruntime

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_GB = 4.0
# Engine vs ONNX Runtime (fp32 reference): max|y_trt - y_ort| <= RTOL * max|y_ort| ...
PARITY_RTOL = {"fp32": 1e-3, "fp16": 1e-2}
# ... and for int8, the top-1 class (argmax over axis 1 of the first output) must agree with
# ONNX Runtime on at least this fraction of the calibration samples.
INT8_MIN_TOP1_AGREEMENT = 0.9


@dataclasses.dataclass(frozen=True)
class EngineBuild:
    """What `build_engine` wrote. `profiles` maps each input to its (min, opt, max) shapes."""

    path: str
    precision: str
    profiles: dict
    tensorrt_version: str


@dataclasses.dataclass(frozen=True)
class EngineParity:
    """Engine outputs against ONNX Runtime over some batches (see `compare_outputs`)."""

    precision: str
    max_abs_diff: float
    max_abs_reference: float
    top1_agreement: float
    passed: bool


def check_build_args(precision, *, calibration_data=None, calibration_cache=None,
                     workspace_gb=DEFAULT_WORKSPACE_GB):
    """Raise ConfigError for a bad precision, misplaced or missing calibration, or workspace."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8":
        has_cache = calibration_cache is not None and read_bytes_or_none(calibration_cache)
        if calibration_data is None and not has_cache:
            raise ConfigError("int8 needs calibration_data (a DataLoader, dataset or batches of "
                              "representative inputs) or an existing calibration_cache file")
    elif calibration_data is not None or calibration_cache is not None:
        raise ConfigError(f"calibration data and caches are used by int8 only, not {precision}")
    if not workspace_gb > 0:
        raise ConfigError(f"workspace_gb must be > 0, got {workspace_gb!r}")


def batch_range(min_batch=1, opt_batch=None, max_batch=None, *, fixed=None):
    """Resolve the (min, opt, max) batch of the optimization profile.

    Defaults for a dynamic batch: max = max(32, min, opt), opt = max. When the ONNX file fixes
    the batch to `fixed`, the range is (fixed, fixed, fixed) and any other requested value is an
    error.
    """
    for name, value in (("min_batch", min_batch), ("opt_batch", opt_batch),
                        ("max_batch", max_batch)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if min_batch is None:
        raise ConfigError("min_batch must be an int >= 1, got None")
    if fixed is not None:
        if (opt_batch not in (None, fixed) or max_batch not in (None, fixed)
                or min_batch > fixed):
            raise ConfigError(f"the ONNX file fixes the batch to {fixed}; export it with "
                              f"dynamic_batch=True to build for other batch sizes")
        return fixed, fixed, fixed
    if max_batch is None:
        max_batch = max(DEFAULT_MAX_BATCH, min_batch, opt_batch or 0)
    if opt_batch is None:
        opt_batch = max_batch
    if not min_batch <= opt_batch <= max_batch:
        raise ConfigError(f"need min_batch <= opt_batch <= max_batch, got "
                          f"{min_batch} <= {opt_batch} <= {max_batch}")
    return min_batch, opt_batch, max_batch


def input_shapes(onnx_path):
    """Map each graph input of an ONNX file to its shape, with None for a symbolic dimension."""
    proto = onnx.load(os.fspath(onnx_path), load_external_data=False)
    weights = {init.name for init in proto.graph.initializer}
    return {
        i.name: tuple(d.dim_value if d.HasField("dim_value") else None
                      for d in i.type.tensor_type.shape.dim)
        for i in proto.graph.input if i.name not in weights
    }


def profile_shapes(onnx_path, min_batch=1, opt_batch=None, max_batch=None):
    """The (min, opt, max) shape of every input: the batch range on axis 0, the file's dims
    elsewhere (which must be static)."""
    profiles = {}
    for name, shape in input_shapes(onnx_path).items():
        if not shape or any(d is None for d in shape[1:]):
            raise ConfigError(f"input {name!r} has shape {shape}; only the batch (axis 0) may be "
                              f"dynamic")
        batches = batch_range(min_batch, opt_batch, max_batch, fixed=shape[0])
        profiles[name] = tuple((b, *shape[1:]) for b in batches)
    return profiles


def calibration_batches(data, batch_size, sample_shape, *, max_batches=None):
    """Yield contiguous float32 arrays of shape (batch_size, *sample_shape) taken from `data`.

    `data` may be a torch DataLoader or any iterable yielding batches or single samples
    (tensors or arrays, or (input, label) pairs whose first element is used), a map-style
    dataset such as torchvision's ImageFolder (`len()` and `[i]` returning (image, label); give
    it the same tensor transform as at evaluation), or one array/tensor of shape
    (N, *sample_shape). Samples are regrouped into full batches; the last partial batch is
    DROPPED, because padding would repeat images and skew the activation histograms.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ConfigError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    sample_shape = tuple(sample_shape)
    batch, filled, produced = np.empty((batch_size, *sample_shape), np.float32), 0, 0
    for rows in _row_blocks(data, sample_shape):
        start = 0
        while start < len(rows):
            take = min(batch_size - filled, len(rows) - start)
            batch[filled:filled + take] = rows[start:start + take]
            filled, start = filled + take, start + take
            if filled == batch_size:
                yield batch
                produced += 1
                if produced == max_batches:
                    return
                batch, filled = np.empty_like(batch), 0


def _row_blocks(data, sample_shape):
    """Yield arrays of shape (n, *sample_shape) from the forms `calibration_batches` accepts."""
    if _is_array(data):
        items = [data]  # one array of samples (or a single sample)
    elif hasattr(data, "__iter__"):
        items = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = (data[i] for i in range(len(data)))
    else:
        raise TypeError(f"calibration data must be a DataLoader, an iterable, a map-style "
                        f"dataset or an array, got {type(data).__name__}")
    for item in items:
        if isinstance(item, (tuple, list)):
            item = item[0]  # (input, label) pairs from datasets and loaders
        rows = _to_numpy(item)
        if rows.shape == sample_shape:
            rows = rows[None]
        if rows.shape[1:] != sample_shape:
            raise ValueError(f"calibration item of shape {rows.shape} matches neither a sample "
                             f"{sample_shape} nor a batch (N, *{sample_shape}); datasets need a "
                             f"transform producing the model's input tensor")
        yield rows


def _is_array(x):
    return isinstance(x, np.ndarray) or hasattr(x, "detach")


def _to_numpy(x):
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"calibration items must be numeric tensors or arrays, got {x.dtype}")
    return x


def build_engine(onnx_path, engine_path, *, precision="fp32", calibration_data=None,
                 min_batch=1, opt_batch=None, max_batch=None, workspace_gb=DEFAULT_WORKSPACE_GB,
                 timing_cache=None, calibration_cache=None):
    """Build a TensorRT engine from an ONNX file and write it atomically to `engine_path`.

    precision: "fp32", "fp16" (FP16 kernels allowed), or "int8" (INT8 and FP16 kernels allowed,
    scales from entropy calibration on `calibration_data`, see `calibration_batches`, batched at
    the profile's opt batch; or read from `calibration_cache` when that file exists; a fresh
    calibration is written there). The profile covers batches min_batch..max_batch and is tuned
    for opt_batch (defaults in `batch_range`). `timing_cache`: a file loaded when present and
    saved after the build, so rebuilds on the same GPU and TensorRT version are faster.
    Raises ConfigError for bad arguments, TensorRTUnavailable without TensorRT 10 or a GPU, and
    ExportError when parsing or building fails.
    """
    check_build_args(precision, calibration_data=calibration_data,
                     calibration_cache=calibration_cache, workspace_gb=workspace_gb)
    onnx_path, engine_path = os.path.abspath(onnx_path), os.path.abspath(engine_path)
    profiles = profile_shapes(onnx_path, min_batch, opt_batch, max_batch)
    if precision == "int8" and len(profiles) != 1:
        raise ConfigError(f"int8 calibration supports single-input models, got {list(profiles)}")
    for path in (engine_path, timing_cache, calibration_cache):
        if path is not None:  # checked now: a bad cache folder would only show after the build
            check_output_folder(os.path.dirname(os.path.abspath(path)))
    trt = require_tensorrt()
    cuda = cuda_backend()

    with cuda.active():
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        # TensorRT keeps raw pointers to the parser's weights, the timing cache and the
        # calibrator: they are bound to locals here so that they outlive the build.
        network, parser = _parse(trt, builder, logger, onnx_path, profiles)
        config = _builder_config(trt, builder, profiles, precision, workspace_gb)
        cache = None if timing_cache is None else _attach_timing_cache(config, timing_cache)
        calibrator = None
        if precision == "int8":
            calibrator = _attach_calibrator(trt, cuda, builder, config, profiles,
                                            calibration_data, calibration_cache)
        serialized = builder.build_serialized_network(network, config)
        timings = None if cache is None else cache.serialize()  # updated by the build
        del parser, cache, calibrator  # released only now that TensorRT is done with them
    if serialized is None:
        raise ExportError(f"TensorRT failed to build a {precision} engine from {onnx_path} "
                          f"(see the TensorRT log above)")
    write_bytes_atomic(engine_path, serialized)
    if timings is not None:
        write_bytes_atomic(timing_cache, timings)
    return EngineBuild(engine_path, precision, profiles, trt.__version__)


def _parse(trt, builder, logger, onnx_path, profiles):
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if network_inputs != set(profiles):
        raise ExportError(f"TensorRT sees inputs {sorted(network_inputs)}, the ONNX file "
                          f"{sorted(profiles)}")
    return network, parser


def _builder_config(trt, builder, profiles, precision, workspace_gb):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    if precision == "fp32":
        # TensorRT enables TF32 by default, which rounds matmul/conv inputs to 10-bit mantissas.
        config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(trt.BuilderFlag.FP16)  # int8 too: layers without INT8 kernels use FP16
    return config


def _attach_calibrator(trt, cuda, builder, config, profiles, calibration_data, cache_path):
    [(name, (_, opt_shape, _))] = profiles.items()
    batches = iter(())  # with no data, the scales come from the cache file
    if calibration_data is not None:
        batches = _checked_nonempty(
            calibration_batches(calibration_data, opt_shape[0], opt_shape[1:]), opt_shape)
    calibrator = _entropy_calibrator(trt, cuda, batches, opt_shape, cache_path)
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = calibrator
    # Calibration runs at one shape: a separate profile fixed at the opt shape.
    calibration_profile = builder.create_optimization_profile()
    calibration_profile.set_shape(name, opt_shape, opt_shape, opt_shape)
    config.set_calibration_profile(calibration_profile)
    return calibrator


def _attach_timing_cache(config, path):
    cache = config.create_timing_cache(read_bytes_or_none(path) or b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s was made by another TensorRT version or GPU; starting a "
                    "new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _checked_nonempty(batches, shape):
    """Fail before the build, not inside a TensorRT callback, when there is no full batch."""
    first = next(batches, None)
    if first is None:
        raise ConfigError(f"calibration data gave no full batch of shape {shape}")

    def chained():
        yield first
        yield from batches

    return chained()


def _entropy_calibrator(trt, cuda, batches, shape, cache_path):
    """An IInt8EntropyCalibrator2 fed from `batches`, reading/writing `cache_path` if given."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            # pybind11 trampoline classes need the base __init__ called explicitly.
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device_batch = cuda.empty(shape, np.float32)

        def get_batch_size(self):
            return shape[0]

        def get_batch(self, names):
            batch = next(batches, None)
            if batch is None:
                return None
            cuda.copy_in(self.device_batch, batch)
            cuda.synchronize()  # TensorRT reads the buffer on its own stream
            return [cuda.ptr(self.device_batch)]

        def read_calibration_cache(self):
            return read_bytes_or_none(cache_path) if cache_path else None

        def write_calibration_cache(self, cache):
            if cache_path:
                write_bytes_atomic(cache_path, bytes(cache))

    return Calibrator()


def compare_outputs(precision, reference, candidate):
    """Compare engine outputs with ONNX Runtime outputs; returns an EngineParity.

    `reference` and `candidate` are lists over batches of lists over outputs. Tolerances:
    fp32: max abs diff <= 1e-3 * max|y_ort|; fp16: <= 1e-2 * max|y_ort|; int8: top-1 (argmax
    over axis 1 of the first output) agrees with ONNX Runtime on >= 90% of the samples.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not reference or len(reference) != len(candidate):
        raise ValueError(f"need the same non-zero number of batches, got {len(reference)} "
                         f"reference and {len(candidate)} candidate")
    diff = ref_max = 0.0
    agree = total = 0
    for ref_outputs, out_outputs in zip(reference, candidate):
        if len(ref_outputs) != len(out_outputs):
            raise ValueError(f"{len(ref_outputs)} reference outputs vs {len(out_outputs)}")
        for ref, out in zip(ref_outputs, out_outputs):
            ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
            if ref.shape != out.shape:
                raise ValueError(f"output shape {out.shape} != reference shape {ref.shape}")
            diff = max(diff, float(np.max(np.abs(ref - out), initial=0.0)))
            ref_max = max(ref_max, float(np.max(np.abs(ref), initial=0.0)))
        first_ref, first_out = np.asarray(ref_outputs[0]), np.asarray(out_outputs[0])
        if first_ref.ndim >= 2:
            hits = np.argmax(first_ref, axis=1) == np.argmax(first_out, axis=1)
            agree, total = agree + int(hits.sum()), total + hits.size
    top1 = agree / total if total else float("nan")
    if precision == "int8":
        passed = top1 >= INT8_MIN_TOP1_AGREEMENT
    else:
        passed = diff <= PARITY_RTOL[precision] * ref_max
    return EngineParity(precision, diff, ref_max, top1, passed)


def check_engine_parity(engine_path, onnx_path, batches, precision):
    """Run `batches` (float32 arrays) through the engine and ONNX Runtime and compare them with
    `compare_outputs`. Returns the EngineParity; raises ExportError when it fails."""
    runner = EngineRunner(engine_path)
    session = onnxruntime_session(onnx_path)
    reference, candidate = [], []
    for batch in batches:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        reference.append(run_onnxruntime(session, batch))
        candidate.append(runner(batch))
    parity = compare_outputs(precision, reference, candidate)
    if not parity.passed:
        raise ExportError(f"{precision} engine {engine_path} fails parity with ONNX Runtime: "
                          f"{parity}")
    return parity
