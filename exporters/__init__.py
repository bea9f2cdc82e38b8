"""Exporters for slimmed models: ONNX (onnx.py), TensorRT engines (tensorrt.py) and the engine
runner (engine_runner.py), plus `export_file`, the one call behind the CLI's export step."""
import os

from compressor.errors import ConfigError
from compressor.formats import RUNTIMES as FORMATS

from .engine_runner import EngineRunner, TensorRTUnavailable
from .onnx import ExportError, ExportReport, export_onnx, load_onnx_metadata
from .tensorrt import (
    DEFAULT_MAX_BATCH,
    EngineBuild,
    build_engine,
    calibration_batches,
    check_build_args,
    check_engine_parity,
    require_tensorrt,
)

__all__ = [
    "EngineBuild", "EngineRunner", "ExportError", "ExportReport", "FORMATS", "TensorRTUnavailable",
    "build_engine", "calibration_batches", "check_engine_parity", "export_file", "export_onnx",
    "load_onnx_metadata",
]


def export_file(model, example_input, out_path, fmt="onnx", precision="fp32", calib_data=None,
                metadata=None):
    """Export `model` for deployment and return the list of paths written.

    fmt="onnx": one verified ONNX file at `out_path` (always fp32; see `export_onnx`).
    fmt="trt": `out_path` is the engine file; the ONNX file it is built from is written next to
    it with the suffix ".onnx". The engine (batch 1..max(32, example batch), tuned for the
    example batch) is then checked against ONNX Runtime: on the example input for fp32/fp16, on
    the calibration batches for int8 (so `calib_data` must be re-iterable: a DataLoader, dataset
    or array). An engine that fails the check is removed and ExportError raised.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        if precision != "fp32" or calib_data is not None:
            raise ConfigError("precision and calibration data apply to fmt='trt'; ONNX export "
                              "is fp32")
        return [export_onnx(model, example_input, out_path, metadata=metadata).path]

    engine_path = os.path.abspath(os.fspath(out_path))
    stem, suffix = os.path.splitext(engine_path)
    if suffix == ".onnx":
        raise ConfigError(f"for fmt='trt', out_path names the engine (e.g. model.engine), got "
                          f"{out_path!r}")
    onnx_path = stem + ".onnx"
    # Fail on bad arguments or a missing TensorRT/GPU before the slow ONNX export.
    check_build_args(precision, calibration_data=calib_data)
    require_tensorrt()

    export_onnx(model, example_input, onnx_path, metadata=metadata)
    batch = int(example_input.shape[0])
    build = build_engine(onnx_path, engine_path, precision=precision, calibration_data=calib_data,
                         opt_batch=batch, max_batch=max(DEFAULT_MAX_BATCH, batch))
    if precision == "int8":
        [(_, opt_shape, _)] = build.profiles.values()
        batches = calibration_batches(calib_data, opt_shape[0], opt_shape[1:])
    else:
        batches = [example_input.detach().cpu().numpy()]
    try:
        check_engine_parity(engine_path, onnx_path, batches, precision)
    except ExportError:
        os.remove(engine_path)
        raise
    return [onnx_path, engine_path]
