"""Export formats by name ("onnx", "trt-fp32", "trt-fp16", "trt-int8"): the one parser the API,
the CLI and the latency targets read them with, so the valid names live here only. Imports no
torch (the CLI and budget parsing use it)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

RUNTIMES = ("onnx", "trt")             # what exporters.export_file writes
PRECISIONS = ("fp32", "fp16", "int8")  # TensorRT's; an ONNX file is fp32
TRT_FORMATS = tuple(f"trt-{p}" for p in PRECISIONS)
EXPORT_FORMATS = ("onnx", *TRT_FORMATS)


@dataclass(frozen=True)
class ExportFormat:
    name: str       # "onnx", "trt-fp16", ...
    runtime: str    # "onnx" or "trt": export_file's fmt
    precision: str  # "fp32" for onnx

    def filename(self, stem="model") -> str:
        """The file this format is written to: model.onnx, model-fp16.engine (`stem` replaces "model")."""
        return stem + (".onnx" if self.runtime == "onnx" else f"-{self.precision}.engine")


def export_format(text, precision=None) -> ExportFormat:
    """The format `text` names, or a ConfigError naming the valid ones. With `precision`, `text`
    is a runtime alone ("onnx" or "trt"), as the CLI's --format and --precision give them."""
    if precision is not None:
        if text == "onnx" and precision != "fp32":
            raise ConfigError(f"ONNX export is fp32, got precision {precision!r}: the formats are "
                              f"{', '.join(EXPORT_FORMATS)}")
        text = text if text == "onnx" else f"{text}-{precision}"
    if text not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {text!r}: use {', '.join(EXPORT_FORMATS[:-1])} "
                          f"or {EXPORT_FORMATS[-1]}")
    runtime, _, precision = text.partition("-")
    return ExportFormat(text, runtime, precision or "fp32")
