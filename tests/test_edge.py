"""The edge bench: `compressor bench model.onnx` in a Python where torch cannot be imported, and
latency tables timed that way (probe files benched "on the device") fed back into
build_latency_model on this machine. Real ONNX files, real ONNX Runtime sessions, real
subprocesses; the torch-free interpreter is this one with a meta-path blocker for torch."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import compressor as cz
from compressor.demo import DemoNet
from compressor.errors import ConfigError
from compressor.latency import build_latency_model, export_probes

from conftest import quadrant_data

# installed first in the child: any import of torch, torchvision or torch_pruning fails, as on a
# device where only the wheel (--no-deps), onnxruntime and numpy are installed
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "torch_pruning"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a machine without torch)", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def run_without_torch(code, cwd):
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


def bench_without_torch(args, cwd):
    """`compressor bench ARGS` in the torch-free child; also checks that no torch module got in."""
    run = run_without_torch(f"""
from compressor.cli import main
rc = main({list(args)!r})
assert not [m for m in sys.modules if m.split(".")[0] == "torch"], "torch was imported"
sys.exit(rc)
""", cwd)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge")
    cz.exporters.export_onnx(DemoNet(width=4).eval(), torch.randn(1, 3, 24, 24), str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_the_blocker_blocks_torch(tmp_path):
    run = run_without_torch("import torch", tmp_path)
    assert run.returncode != 0 and "blocked: a machine without torch" in run.stderr


def test_package_root_imports_no_torch_and_loads_names_on_use(tmp_path):
    run = run_without_torch("""
import compressor as cz
assert "compress" in cz.__all__ and "compress" in dir(cz) and cz.ConfigError and cz.__version__
try:
    cz.compress
except ModuleNotFoundError as e:
    print("needs", e.name)
""", tmp_path)
    assert run.returncode == 0 and "needs torch" in run.stdout, run.stdout + run.stderr
    # with torch: the names load on first use, and importing a stage keeps cz.search etc. functions
    run = subprocess.run([sys.executable, "-c", """
import sys, compressor as cz
assert "torch" not in sys.modules
import compressor.search, compressor.slim, compressor.supernet, compressor.api
assert all(callable(f) and not isinstance(f, type(sys)) for f in (cz.search, cz.slim, cz.supernet, cz.compress))
assert cz.compress.__module__ == "compressor.api" and cz.exporters.__name__ == "compressor.exporters"
"""], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr


def test_bench_without_torch_writes_percentiles_machine_and_versions(onnx_file, tmp_path):
    out = tmp_path / "bench.json"
    run = bench_without_torch(["bench", str(onnx_file), "--reps", "20", "--warmup", "2", "--json", str(out)], tmp_path)
    assert "p50" in run.stdout and "p99" in run.stdout and "samples/s" in run.stdout
    doc = json.loads(out.read_text())
    assert doc["format"] == "compressor-bench-1"
    assert {"device", "machine", "system", "python", "numpy", "onnxruntime", "providers"} <= set(doc["machine"])
    [r] = doc["results"]
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_per_s"] > 0 and r["batch"] == 1
    assert r["info"]["onnxruntime"] == doc["machine"]["onnxruntime"] and r["info"]["input_shape"] == [1, 3, 24, 24]


def test_bench_errors_without_torch_name_the_fix(onnx_file, tmp_path):
    run = run_without_torch(f"from compressor.cli import main; sys.exit(main(['bench', {str(tmp_path)!r}]))", tmp_path)
    assert run.returncode == 2 and "holds no .onnx file" in run.stderr
    run = run_without_torch(f"from compressor.cli import main; sys.exit(main(['bench', {str(onnx_file)!r}, "
                            "'--target', 'torch-cpu']))", tmp_path)
    assert run.returncode == 2 and "runs on ort-cpu or ort-cuda" in run.stderr


# -- latency tables timed on the device, the model built here --------------------------------------
PLAN = dict(points=2, calibration=4, seed=0)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    torch.manual_seed(0)
    model = DemoNet(width=4).eval()
    space = cz.analyze(model, torch.randn(1, 3, 24, 24), bins=4, divisor=2)
    folder = tmp_path_factory.mktemp("probes")
    written = export_probes(model, space, str(folder / "layers"), "ort-cpu", **PLAN)
    # the calibration subnets in a folder of their own: two bench runs, two JSON files in one folder
    os.makedirs(folder / "subnets")
    for path in written:
        if os.path.basename(path).startswith("subnet-"):
            shutil.move(path, folder / "subnets")
    timings = folder / "timings"
    os.makedirs(timings)
    for part in ("layers", "subnets"):
        bench_without_torch(["bench", str(folder / part), "--reps", "5", "--warmup", "1",
                             "--json", str(timings / f"{part}.json")], folder)
    return model, space, folder, written


def test_probe_timings_from_the_device_build_the_latency_model(probes):
    model, space, folder, written = probes
    subnets = json.loads((folder / "timings" / "subnets.json").read_text())["results"]
    assert len(subnets) == PLAN["calibration"] and len(written) > PLAN["calibration"]
    built = build_latency_model(model, space, "ort-cpu", progress=False, attach=False,
                                measurements=str(folder / "timings"), **PLAN)
    assert built.info["measured_on"]["onnxruntime"] and built.info["cache"] is None
    assert built.info["measurements"] == len(written) - PLAN["calibration"]
    full = next(r for r in subnets if json.loads(r["info"]["metadata"]["compressor_probe"])["cfg"] == list(space.max()))
    assert built.original_us == pytest.approx(full["p50_ms"] * 1e3)  # the device's timing, not one made here
    assert built.predict([space.max()])[0] > built.predict([space.min()])[0] > 0


def test_missing_or_foreign_probe_timings_are_refused(probes, tmp_path):
    model, space, folder, _ = probes
    with pytest.raises(ConfigError, match=r"lack 0 of \d+ layer timings and 4 of 4 calibration subnets: export "
                                          r"the probes .*compressor bench DIR"):
        build_latency_model(model, space, "ort-cpu", progress=False, measurements=str(folder / "timings" / "layers.json"),
                            **PLAN)
    with pytest.raises(ConfigError, match=r"made for another space or target: .*calibration 4, here 5"):
        build_latency_model(model, space, "ort-cpu", progress=False, measurements=str(folder / "timings"),
                            **dict(PLAN, calibration=5))
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a `compressor bench --json` file"):
        build_latency_model(model, space, "ort-cpu", progress=False, measurements=str(tmp_path), **PLAN)
    with pytest.raises(ConfigError, match="ONNX models, timed on ort-cpu or ort-cuda"):
        export_probes(model, space, str(tmp_path / "p"), "torch-cpu")


def test_compress_takes_the_device_timings_and_says_the_result_was_not_measured_here(probes):
    model, space, folder, _ = probes
    # 90 %: the smallest configuration measured 82 % of the original on a loaded machine (80 % was infeasible)
    result = cz.compress(model, "latency<=90%@ort-cpu", quadrant_data(64, size=24), supernet_epochs=0.25,
                         finetune_epochs=0.1, batch_size=32, effort=0.05, bins=4, divisor=2, progress=False,
                         binning="channels",  # the space the probes were exported for
                         latency_options=dict(measurements=str(folder / "timings"), **PLAN))
    [attempt] = result.search["latency_attempts"]
    assert attempt["measured_us"] is None and "not measured: the latency model was timed on" in attempt["note"]
    assert result.result["latency"] == attempt["predicted_us"] <= result.limits["latency"] and result.meets_budget()
