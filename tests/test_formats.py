"""Export formats (compressor.formats): one parser for the names the API, the CLI and the latency
targets use."""
import pytest

from compressor.budget import LATENCY_TARGETS
from compressor.cli import main
from compressor.errors import ConfigError
from compressor.formats import EXPORT_FORMATS, TRT_FORMATS, ExportFormat, export_format
from compressor.latency.targets import Target


def test_every_format_parses_to_its_runtime_precision_and_file():
    assert EXPORT_FORMATS == ("onnx", "trt-fp32", "trt-fp16", "trt-int8")
    assert export_format("onnx") == ExportFormat("onnx", "onnx", "fp32")
    assert export_format("trt-int8") == ExportFormat("trt-int8", "trt", "int8")
    assert [export_format(f).filename() for f in EXPORT_FORMATS] == \
        ["model.onnx", "model-fp32.engine", "model-fp16.engine", "model-int8.engine"]
    assert export_format("trt-fp16").filename("out/small") == "out/small-fp16.engine"
    # the CLI's --format/--precision name the same formats
    assert [export_format(f.partition("-")[0], f.partition("-")[2] or "fp32") for f in EXPORT_FORMATS] == \
        [export_format(f) for f in EXPORT_FORMATS]


@pytest.mark.parametrize("args", [("tflite",), ("trt-fp8",), ("TRT-FP16",), ("trt",), ("trt", "bf16")])
def test_an_unknown_format_names_the_valid_ones(args):
    with pytest.raises(ConfigError, match="unknown export format") as e:
        export_format(*args)
    assert all(f in str(e.value) for f in EXPORT_FORMATS)


def test_onnx_is_fp32_only(capsys):
    with pytest.raises(ConfigError, match="ONNX export is fp32, got precision 'fp16'"):
        export_format("onnx", "fp16")
    # the CLI says so before it reads the model file
    assert main(["export", "absent.pt", "--format", "onnx", "--precision", "int8"]) == 2
    assert "ONNX export is fp32, got precision 'int8'" in capsys.readouterr().err


def test_latency_targets_on_tensorrt_are_the_export_formats():
    assert [t for t in LATENCY_TARGETS if t.startswith("trt")] == list(TRT_FORMATS)
    assert [Target(t).precision for t in TRT_FORMATS] == ["fp32", "fp16", "int8"]
