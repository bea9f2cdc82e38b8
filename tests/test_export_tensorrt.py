"""TensorRT exporter: the parts that need no TensorRT run everywhere (argument checks, profile
shapes, calibration batching, cache files, parity verdicts, clear errors without TensorRT); the
engine builds and runs skip without TensorRT or a CUDA GPU."""
import contextlib
import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper
from PIL import Image

from compressor.errors import ConfigError
from compressor.exporters import export_file
from compressor.exporters import tensorrt as trt_export
from compressor.exporters import engine_runner
from compressor.exporters.engine_runner import EngineRunner, TensorRTUnavailable
from compressor.exporters.onnx import ExportError, export_onnx
from compressor.exporters.tensorrt import (
    EngineParity,
    batch_range,
    build_engine,
    calibration_batches,
    check_build_args,
    compare_outputs,
    input_shapes,
    profile_shapes,
)

ENGINE_RUNNER_FILE = engine_runner.__file__
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="tensorrt not installed")
needs_gpu = pytest.mark.gpu  # conftest.py skips it without a CUDA GPU


class SmallClassifier(torch.nn.Module):
    """conv -> BN -> ReLU -> flatten -> linear: the shape of a slimmed classifier, small."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(4))
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    export_onnx(SmallClassifier(), torch.randn(2, 3, 16, 16), path)
    return str(path)


# --- argument checks -------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["FP16", "bf16", "int4", None])
def test_unknown_precision(precision):
    with pytest.raises(ConfigError, match="precision must be one of"):
        check_build_args(precision)


def test_int8_needs_calibration_data_or_cache(tmp_path):
    with pytest.raises(ConfigError, match="int8 needs calibration_data"):
        check_build_args("int8")
    with pytest.raises(ConfigError, match="int8 needs calibration_data"):
        check_build_args("int8", calibration_cache=tmp_path / "missing.cache")
    cache = tmp_path / "calib.cache"
    cache.write_bytes(b"TRT-100-EntropyCalibration2\n")
    check_build_args("int8", calibration_cache=cache)
    check_build_args("int8", calibration_data=[np.zeros((3, 16, 16))])


def test_calibration_only_for_int8():
    with pytest.raises(ConfigError, match="int8 only"):
        check_build_args("fp16", calibration_data=[np.zeros((3, 16, 16))])


@pytest.mark.parametrize("workspace", [0, -1.0])
def test_workspace_must_be_positive(workspace):
    with pytest.raises(ConfigError, match="workspace_gb"):
        check_build_args("fp32", workspace_gb=workspace)


@pytest.mark.parametrize("args, expected", [
    ((), (1, 32, 32)),
    ((1, 4), (1, 4, 32)),
    ((1, 4, 8), (1, 4, 8)),
    ((2, None, 8), (2, 8, 8)),
    ((64,), (64, 64, 64)),
    ((1, 48), (1, 48, 48)),
])
def test_batch_range_defaults(args, expected):
    assert batch_range(*args) == expected


@pytest.mark.parametrize("args", [(4, 2, 8), (1, 16, 8), (8, None, 4), (0,), (1, 2.5), (True,)])
def test_batch_range_rejects_bad_order_and_values(args):
    with pytest.raises(ConfigError):
        batch_range(*args)


def test_fixed_batch_in_the_file():
    assert batch_range(fixed=8) == (8, 8, 8)
    assert batch_range(1, 8, 8, fixed=8) == (8, 8, 8)
    with pytest.raises(ConfigError, match="fixes the batch to 8"):
        batch_range(1, 4, 16, fixed=8)


# --- profile shapes from ONNX files ----------------------------------------------------------

def test_profile_shapes_of_a_dynamic_batch_export(small_onnx):
    assert input_shapes(small_onnx) == {"input": (None, 3, 16, 16)}
    assert profile_shapes(small_onnx, 1, 4, 8) == {
        "input": ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}


def _graph_file(path, input_dims, initializer_as_input=False):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims)]
    if initializer_as_input:  # older exporters listed weights among the graph inputs
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], "g", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, input_dims)], [weight])
    onnx.save(helper.make_model(graph), path)
    return path


def test_profile_shapes_static_file_and_weights_listed_as_inputs(tmp_path):
    path = _graph_file(tmp_path / "static.onnx", [2, 3, 8, 8], initializer_as_input=True)
    assert input_shapes(path) == {"x": (2, 3, 8, 8)}
    assert profile_shapes(path) == {"x": ((2, 3, 8, 8),) * 3}


def test_profile_shapes_reject_dynamic_spatial_dims(tmp_path):
    path = _graph_file(tmp_path / "hw.onnx", ["N", 3, "H", "W"])
    with pytest.raises(ConfigError, match="only the batch"):
        profile_shapes(path)


# --- calibration batches ---------------------------------------------------------------------

SAMPLE = (3, 4, 4)


def _samples(n):
    return np.arange(n * 48, dtype=np.float64).reshape(n, *SAMPLE)


def _check_batches(batches, expected_rows, batch_size):
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in batches)
    assert all(b.shape == (batch_size, *SAMPLE) for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), expected_rows.astype(np.float32))


def test_calibration_from_a_dataloader_with_labels_drops_the_last_partial_batch():
    data = torch.utils.data.TensorDataset(torch.from_numpy(_samples(10)), torch.arange(10))
    loader = torch.utils.data.DataLoader(data, batch_size=3)  # 3+3+3+1 regrouped into 4+4
    batches = list(calibration_batches(loader, 4, SAMPLE))
    assert len(batches) == 2
    _check_batches(batches, _samples(8), 4)


def test_calibration_from_single_samples_and_one_array():
    singles = list(calibration_batches(iter(list(_samples(5))), 2, SAMPLE))
    _check_batches(singles, _samples(4), 2)
    whole = list(calibration_batches(torch.from_numpy(_samples(7)), 3, SAMPLE, max_batches=1))
    _check_batches(whole, _samples(3), 3)


def test_calibration_from_an_image_folder(tmp_path):
    for i in range(5):
        folder = tmp_path / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    dataset = torchvision.datasets.ImageFolder(
        tmp_path, transform=torchvision.transforms.Compose([
            torchvision.transforms.Resize((4, 4)), torchvision.transforms.ToTensor()]))
    batches = list(calibration_batches(dataset, 2, SAMPLE))
    assert len(batches) == 2  # 5 images: two full batches, one image dropped
    assert all(b.shape == (2, *SAMPLE) and b.dtype == np.float32 for b in batches)
    raw = torchvision.datasets.ImageFolder(tmp_path)  # PIL images, no tensor transform
    with pytest.raises(ValueError, match="transform"):
        list(calibration_batches(raw, 2, SAMPLE))


def test_calibration_rejects_wrong_shapes_and_types():
    with pytest.raises(ValueError, match="matches neither"):
        list(calibration_batches([np.zeros((2, 3, 5, 5))], 2, SAMPLE))
    with pytest.raises(TypeError, match="numeric"):
        list(calibration_batches(["a.png", "b.png"], 1, SAMPLE))
    with pytest.raises(TypeError, match="calibration data must be"):
        list(calibration_batches(42, 1, SAMPLE))
    with pytest.raises(ConfigError, match="batch_size"):
        list(calibration_batches([], 0, SAMPLE))


def test_calibration_batches_are_independent_arrays():
    a, b = calibration_batches(_samples(4), 2, SAMPLE)
    assert not np.shares_memory(a, b)


# --- parity verdicts -------------------------------------------------------------------------

def _logits(rng, n=50, classes=10):
    return rng.standard_normal((n, classes)).astype(np.float32)


@pytest.mark.parametrize("precision, rel_error, passed", [
    ("fp32", 5e-4, True), ("fp32", 5e-3, False), ("fp16", 5e-3, True), ("fp16", 5e-2, False),
])
def test_float_parity_tolerances(precision, rel_error, passed):
    y = _logits(np.random.default_rng(0))
    noisy = y.copy()
    noisy[0, 0] += rel_error * np.abs(y).max()
    parity = compare_outputs(precision, [[y]], [[noisy]])
    assert isinstance(parity, EngineParity) and parity.passed is passed
    assert parity.max_abs_diff == pytest.approx(rel_error * np.abs(y).max(), rel=1e-3)


@pytest.mark.parametrize("flipped, passed", [(2, True), (10, False)])
def test_int8_top1_agreement(flipped, passed):
    y = _logits(np.random.default_rng(1))
    out = y.copy()
    rows = np.arange(flipped)
    out[rows, np.argmax(y[rows], axis=1)] = -100.0  # change the top-1 class of these samples
    parity = compare_outputs("int8", [[y[:25]], [y[25:]]], [[out[:25]], [out[25:]]])
    assert parity.top1_agreement == pytest.approx(1 - flipped / 50)
    assert parity.passed is passed


def test_compare_outputs_rejects_mismatches():
    y = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        compare_outputs("fp32", [[y]], [[y[:1]]])
    with pytest.raises(ValueError, match="batches"):
        compare_outputs("fp32", [], [])


# --- without TensorRT ------------------------------------------------------------------------

@pytest.mark.skipif(HAS_TRT and HAS_GPU, reason="TensorRT and a GPU are present")
def test_build_without_tensorrt_is_a_clear_error(small_onnx, tmp_path):
    with pytest.raises(TensorRTUnavailable, match=r"pip install 'compressor\[trt\]'") as info:
        build_engine(small_onnx, tmp_path / "m.engine")
    assert isinstance(info.value, RuntimeError)
    missing = ["tensorrt not installed"] if not HAS_TRT else []
    missing += ["no CUDA GPU"] if not HAS_GPU else []
    assert all(reason in str(info.value) for reason in missing)
    assert os.listdir(tmp_path) == []
    with pytest.raises(TensorRTUnavailable):
        EngineRunner(tmp_path / "m.engine")


def test_arguments_are_checked_before_tensorrt(small_onnx, tmp_path):
    with pytest.raises(ConfigError):
        build_engine(small_onnx, tmp_path / "m.engine", precision="int8")
    with pytest.raises(ConfigError):
        build_engine(small_onnx, tmp_path / "m.engine", min_batch=8, opt_batch=4)


@pytest.mark.skipif(HAS_TRT and HAS_GPU, reason="TensorRT and a GPU are present")
def test_export_file_trt_fails_before_exporting(tmp_path):
    with pytest.raises(TensorRTUnavailable):
        export_file(SmallClassifier(), torch.randn(1, 3, 16, 16), tmp_path / "m.engine",
                    fmt="trt")
    assert os.listdir(tmp_path) == []


def test_export_file_trt_wants_an_engine_path(tmp_path):
    with pytest.raises(ConfigError, match="names the engine"):
        export_file(SmallClassifier(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx",
                    fmt="trt")


def test_engine_runner_file_runs_without_torch_onnx_or_the_package():
    # A deployment box may have TensorRT, pycuda and numpy only: the file must import there.
    code = (
        "import importlib.util, sys\n"
        "for name in ('torch', 'onnx', 'onnxruntime', 'compressor'):\n"
        "    sys.modules[name] = None\n"
        f"spec = importlib.util.spec_from_file_location('engine_runner', {ENGINE_RUNNER_FILE!r})\n"
        "module = sys.modules['engine_runner'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert issubclass(module.TensorRTUnavailable, RuntimeError)\n"
        "print(module.missing_requirements())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if not HAS_TRT:
        assert "tensorrt not installed" in result.stdout


# --- the build sequence against a fake TensorRT ----------------------------------------------
# No GPU here, so the builder runs against a stand-in with the TensorRT 10 Python API names this
# module calls. It checks our sequence (profiles, flags, calibrator, caches, atomic writes), not
# TensorRT itself; the real builds are the GPU tests further down.

class FakeTrt:
    __version__ = "10.99-fake"

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            self.severity = severity

    class BuilderFlag:
        FP16, INT8, TF32 = "fp16", "int8", "tf32"

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class IInt8EntropyCalibrator2:
        def __init__(self):
            self.base_initialized = True

    class Builder:
        def __init__(self, logger):
            self.result = b"engine"

        def create_network(self, flags):
            assert flags == 0
            return types.SimpleNamespace(inputs=[])

        def create_builder_config(self):
            return FakeConfig()

        def create_optimization_profile(self):
            return FakeProfile()

        def build_serialized_network(self, network, config):
            FakeTrt.last_config = config
            calibrator = config.int8_calibrator
            if calibrator is not None and calibrator.read_calibration_cache() is None:
                assert calibrator.base_initialized
                while (pointers := calibrator.get_batch([network.inputs[0]])) is not None:
                    config.calibration_pointers.append(pointers)
                calibrator.write_calibration_cache(memoryview(b"scales"))
            return FakeTrt.build_result

    build_result = b"serialized engine"
    parse_errors = []

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = len(FakeTrt.parse_errors)

        def parse_from_file(self, path):
            self.network.inputs = list(input_shapes(path))
            self.network.num_inputs = len(self.network.inputs)
            self.network.get_input = lambda i: types.SimpleNamespace(name=self.network.inputs[i])
            return not FakeTrt.parse_errors

        def get_error(self, i):
            return FakeTrt.parse_errors[i]


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, low, opt, high):
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class FakeTimingCache:
    def __init__(self, blob):
        self.blob = bytes(blob)

    def serialize(self):
        return self.blob + b"+timings"


class FakeConfig:
    def __init__(self):
        self.flags, self.cleared, self.profiles, self.pools = set(), set(), [], {}
        self.int8_calibrator = self.calibration_profile = self.timing_cache = None
        self.calibration_pointers = []

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.cleared.add(flag)

    def set_calibration_profile(self, profile):
        self.calibration_profile = profile

    def create_timing_cache(self, blob):
        return FakeTimingCache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.blob.startswith(b"foreign") and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True


class HostMemory:
    """A numpy stand-in for the CUDA backend."""

    copies = []

    def active(self):
        return contextlib.nullcontext()

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def copy_in(self, buffer, array):
        buffer[...] = array
        self.copies.append(array.copy())

    def synchronize(self):
        pass

    def ptr(self, buffer):
        return buffer.ctypes.data


@pytest.fixture
def fake_trt(monkeypatch):
    FakeTrt.build_result, FakeTrt.parse_errors, HostMemory.copies = b"serialized engine", [], []
    monkeypatch.setattr(trt_export, "require_tensorrt", lambda: FakeTrt)
    monkeypatch.setattr(trt_export, "cuda_backend", HostMemory)
    return FakeTrt


def test_fake_fp32_build_sets_profile_workspace_and_timing_cache(fake_trt, small_onnx, tmp_path):
    timing = tmp_path / "timing.cache"
    build = build_engine(small_onnx, tmp_path / "m.engine", opt_batch=4, max_batch=8,
                         workspace_gb=0.5, timing_cache=timing)
    config = fake_trt.last_config
    assert (tmp_path / "m.engine").read_bytes() == b"serialized engine"
    assert build.profiles == {"input": ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}
    assert [p.shapes for p in config.profiles] == [build.profiles]
    assert config.pools == {"workspace": 2**29}
    assert config.cleared == {"tf32"} and config.flags == set()
    assert config.int8_calibrator is None
    assert timing.read_bytes() == b"+timings"
    build_engine(small_onnx, tmp_path / "m.engine", timing_cache=timing)  # reuses the cache
    assert fake_trt.last_config.timing_cache.blob == b"+timings"
    timing.write_bytes(b"foreign cache")
    build_engine(small_onnx, tmp_path / "m.engine", timing_cache=timing)  # mismatch: fresh one
    assert fake_trt.last_config.timing_cache.blob == b""


def test_fake_int8_build_calibrates_at_the_opt_batch_then_reuses_the_cache(
        fake_trt, small_onnx, tmp_path):
    cache = tmp_path / "calib.cache"
    data = torch.utils.data.TensorDataset(torch.randn(10, 3, 16, 16), torch.zeros(10))
    build_engine(small_onnx, tmp_path / "m.engine", precision="int8", calibration_data=data,
                 opt_batch=4, max_batch=8, calibration_cache=cache)
    config = fake_trt.last_config
    assert config.flags == {"fp16", "int8"}
    assert config.calibration_profile.shapes == {"input": ((4, 3, 16, 16),) * 3}
    assert len(config.calibration_pointers) == 2  # 10 samples: two batches of 4, 2 dropped
    assert [c.shape for c in HostMemory.copies] == [(4, 3, 16, 16)] * 2
    np.testing.assert_array_equal(np.concatenate(HostMemory.copies), data.tensors[0][:8].numpy())
    assert cache.read_bytes() == b"scales"
    build_engine(small_onnx, tmp_path / "again.engine", precision="int8", opt_batch=4,
                 calibration_cache=cache)
    assert fake_trt.last_config.calibration_pointers == []  # scales read from the cache


def test_fake_int8_build_with_too_little_data_fails_before_building(fake_trt, small_onnx,
                                                                    tmp_path):
    with pytest.raises(ConfigError, match="no full batch"):
        build_engine(small_onnx, tmp_path / "m.engine", precision="int8", opt_batch=4,
                     calibration_data=[np.zeros((3, 3, 16, 16), np.float32)])


@pytest.mark.parametrize("failure, match", [("parse", "could not parse.*bad node"),
                                            ("build", "failed to build")])
def test_fake_failures_leave_no_engine(fake_trt, small_onnx, tmp_path, failure, match):
    if failure == "parse":
        fake_trt.parse_errors = ["bad node"]
    else:
        fake_trt.build_result = None
    with pytest.raises(ExportError, match=match):
        build_engine(small_onnx, tmp_path / "m.engine")
    assert os.listdir(tmp_path) == []


# --- with TensorRT and a GPU -----------------------------------------------------------------

class ChannelVote(torch.nn.Sequential):
    """Votes for the input channel with the largest mean: int8 noise cannot flip a clear vote,
    so the int8 test checks the pipeline rather than the luck of random weights."""

    def __init__(self):
        super().__init__(torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                         torch.nn.Flatten(), torch.nn.Linear(3, 3))
        with torch.no_grad():
            self[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self[4].weight.copy_(torch.eye(3))
            self[0].bias.zero_()
            self[4].bias.zero_()


@pytest.fixture(scope="module")
def vote_onnx_and_data(tmp_path_factory):
    x = 0.5 * torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(64) % 3
    x[torch.arange(64), labels] += 2.0
    path = tmp_path_factory.mktemp("vote") / "vote.onnx"
    export_onnx(ChannelVote(), x[:2], path)
    return str(path), torch.utils.data.TensorDataset(x, labels)


@needs_gpu
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_float_engine_matches_onnxruntime(small_onnx, tmp_path, precision):
    timing = tmp_path / "timing.cache"
    build = build_engine(small_onnx, tmp_path / "m.engine", precision=precision, min_batch=1,
                         opt_batch=4, max_batch=8, timing_cache=timing)
    assert build.profiles["input"][2] == (8, 3, 16, 16)
    assert timing.stat().st_size > 0
    batches = [np.random.default_rng(b).standard_normal((b, 3, 16, 16)).astype(np.float32)
               for b in (1, 4, 8)]
    assert trt_export.check_engine_parity(build.path, small_onnx, batches, precision).passed
    rebuilt = build_engine(small_onnx, tmp_path / "again.engine", precision=precision,
                           timing_cache=timing)  # loads the saved timing cache
    assert os.path.getsize(rebuilt.path) > 0


@needs_gpu
@needs_trt
def test_int8_engine_with_calibration_cache(vote_onnx_and_data, tmp_path):
    onnx_path, dataset = vote_onnx_and_data
    cache = tmp_path / "calib.cache"
    build = build_engine(onnx_path, tmp_path / "int8.engine", precision="int8",
                         calibration_data=dataset, opt_batch=8, max_batch=8,
                         calibration_cache=cache)
    assert cache.stat().st_size > 0
    batches = list(calibration_batches(dataset, 8, (3, 16, 16)))
    assert len(batches) == 8
    parity = trt_export.check_engine_parity(build.path, onnx_path, batches, "int8")
    assert parity.top1_agreement >= 0.9
    # The cache alone is enough for a rebuild.
    build_engine(onnx_path, tmp_path / "cached.engine", precision="int8", opt_batch=8,
                 max_batch=8, calibration_cache=cache)


@needs_gpu
@needs_trt
def test_engine_runner_with_torch_tensors_and_range_errors(small_onnx, tmp_path):
    build = build_engine(small_onnx, tmp_path / "m.engine", max_batch=4)
    runner = EngineRunner(build.path)
    assert runner.batch_range == (1, 4)
    x = torch.randn(3, 3, 16, 16, device="cuda")
    (y,) = runner(x)
    assert y.is_cuda and y.shape == (3, 10)
    (y_np,) = runner(x.cpu().numpy())
    np.testing.assert_allclose(y.cpu().numpy(), y_np, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner(np.zeros((5, 3, 16, 16), np.float32))


@needs_gpu
@needs_trt
def test_export_file_trt_writes_onnx_and_engine(tmp_path):
    paths = export_file(SmallClassifier(), torch.randn(2, 3, 16, 16), tmp_path / "m.engine",
                        fmt="trt", precision="fp16")
    assert paths == [str(tmp_path / "m.onnx"), str(tmp_path / "m.engine")]
    assert all(os.path.getsize(p) > 0 for p in paths)

