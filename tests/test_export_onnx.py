"""ONNX export: real torchvision CNNs exported once each with a dynamic batch, run by ONNX Runtime
at batch 1 and 4 from the same file; metadata, non-mutation, atomic writes and input errors."""
import copy
import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from onnx import TensorProto, helper

import compressor
from conftest import assert_unchanged, snapshot, with_real_statistics
from models import CI_SUBSET, input_size
from compressor.errors import ConfigError
from compressor.exporters import export_file
from compressor.exporters import onnx as onnx_export
from compressor.exporters.onnx import ExportError, export_onnx, load_onnx_metadata
from compressor.files import atomic_output, read_bytes_or_none, write_bytes_atomic

MODELS = CI_SUBSET  # (vgg's adaptive pool upsamples 2x2 -> 7x7 at 64x64)
METADATA = {"widths": json.dumps([16, 32, 64]), "side": "left"}


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    """Each model exported once at batch 4. BN statistics are estimated first so outputs are of
    order 1 (random-init mobilenets give ~1e-9 otherwise); the model is then left in train mode
    on purpose: an export that ran it in training mode would change those statistics."""
    torch.manual_seed(0)
    size = input_size(request.param)
    model = with_real_statistics(getattr(torchvision.models, request.param)(weights=None),
                                 size=size).train()
    snap = snapshot(model)
    folder = tmp_path_factory.mktemp(request.param)
    report = export_onnx(model, torch.randn(4, 3, size, size), folder / "model.onnx",
                         metadata=METADATA)
    return model, snap, report


def test_one_file_runs_at_batch_1_and_4(exported):
    model, _, report = exported
    reference = copy.deepcopy(model).eval()
    session = onnxruntime.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2:]  # the exported model's own input size (models.input_size)
    for batch in (1, 4):
        x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = reference(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == expected.shape and np.max(np.abs(expected)) > 1e-2
        assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))
    assert set(report.max_abs_diff) == {4, 1}


def test_batch_is_symbolic_and_file_is_single(exported):
    _, _, report = exported
    proto = onnx.load(report.path)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert os.listdir(os.path.dirname(report.path)) == ["model.onnx"]  # no side or temp file
    assert report.input_names == ("input",) and report.output_names == ("output",)
    assert report.opset == 20


def test_metadata_round_trip(exported):
    _, _, report = exported
    assert load_onnx_metadata(report.path) == {"compressor_version": compressor.__version__,
                                               **METADATA}


def test_user_model_unchanged(exported):
    model, snap, _ = exported
    assert_unchanged(model, snap)


class FlattenHead(torch.nn.Module):
    def __init__(self, batch_in_view=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)
        self.batch_in_view = batch_in_view

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(self.batch_in_view or x.size(0), -1))


def test_view_flatten_linear_with_dynamic_batch(tmp_path):
    model = FlattenHead()
    report = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert set(report.max_abs_diff) == {2, 1}
    session = onnx_export.onnxruntime_session(report.path)
    (y,) = onnx_export.run_onnxruntime(session, np.zeros((5, 3, 8, 8), np.float32))
    assert y.shape == (5, 5)


def test_batch_fixed_by_the_model_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match=r"batch dimension is fixed to 2.*flatten"):
        export_onnx(FlattenHead(batch_in_view=2), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_static_batch_export(tmp_path):
    report = export_onnx(FlattenHead(), torch.randn(3, 3, 8, 8), tmp_path / "m.onnx",
                         dynamic_batch=False)
    assert set(report.max_abs_diff) == {3}
    assert not report.dynamic_batch
    dim = onnx.load(report.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 3 and not dim.dim_param


def test_several_outputs_get_numbered_names(tmp_path):
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return y.mean((2, 3)), y.amax((2, 3))

    report = export_onnx(TwoHeads(), torch.randn(2, 3, 4, 4), tmp_path / "m.onnx")
    assert report.output_names == ("output_0", "output_1")


def test_parity_failure_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")
    monkeypatch.setattr(onnx_export, "PARITY_RTOL", -1.0)  # every comparison now fails
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(FlattenHead(), torch.randn(2, 3, 8, 8), target)
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert target.read_bytes() == b"previous export"


def test_exporter_failure_leaves_no_file(tmp_path):
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # branch on data: torch.export cannot trace it

    with pytest.raises(ExportError, match="torch.onnx.export failed"):
        export_onnx(DataDependent(), torch.randn(2, 3), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_invalid_graph_is_an_export_error(tmp_path, monkeypatch):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 5])
    broken = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["input", "undefined"], ["output"])], "g", [x], [y]))
    monkeypatch.setattr(onnx_export, "_torch_to_onnx", lambda *args: broken)
    with pytest.raises(ExportError, match="not valid ONNX"):
        export_onnx(FlattenHead(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("model, example, error, match", [
    ("not a model", torch.randn(1, 3, 8, 8), TypeError, "torch.nn.Module"),
    (FlattenHead(), np.zeros((1, 3, 8, 8), np.float32), TypeError, "torch.Tensor"),
    (FlattenHead(), torch.zeros(1, 3, 8, 8, dtype=torch.int64), TypeError, "floating-point"),
    (FlattenHead(), torch.zeros(0, 3, 8, 8), ValueError, "batch dimension"),
])
def test_bad_arguments(tmp_path, model, example, error, match):
    with pytest.raises(error, match=match):
        export_onnx(model, example, tmp_path / "m.onnx")


@pytest.mark.parametrize("metadata, error", [
    ({"widths": [1, 2]}, TypeError),
    ({"compressor_version": "9"}, ValueError),
])
def test_bad_metadata(tmp_path, metadata, error):
    with pytest.raises(error):
        export_onnx(FlattenHead(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", metadata=metadata)


def test_missing_or_non_folder_output(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(FlattenHead(), x, tmp_path / "missing" / "m.onnx")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        export_onnx(FlattenHead(), x, tmp_path / "file" / "m.onnx")


def test_unwritable_folder_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="not writable"):
        export_onnx(FlattenHead(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="not writable"):
        export_onnx(FlattenHead(), torch.randn(1, 3, 8, 8), folder / "m.onnx")


def test_atomic_write_helpers(tmp_path):
    target = tmp_path / "cache.bin"
    assert read_bytes_or_none(target) is None
    target.write_bytes(b"")
    assert read_bytes_or_none(target) is None  # empty counts as absent
    write_bytes_atomic(target, b"v1")
    assert read_bytes_or_none(target) == b"v1"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target) as tmp, open(tmp, "wb") as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"v1"
    assert os.listdir(tmp_path) == ["cache.bin"]


def test_export_file_onnx(tmp_path):
    paths = export_file(FlattenHead(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx",
                        metadata={"side": "right"})
    assert paths == [str(tmp_path / "m.onnx")]
    assert load_onnx_metadata(paths[0])["side"] == "right"


@pytest.mark.parametrize("kwargs", [{"fmt": "tflite"}, {"precision": "fp16"},
                                    {"calib_data": [np.zeros((3, 8, 8))]}])
def test_export_file_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        export_file(FlattenHead(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", **kwargs)
    assert os.listdir(tmp_path) == []
