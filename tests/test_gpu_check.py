"""benchmarks/gpu_check.py on this CPU machine: the skip without CUDA, the choice of test files, the
time boxes, the budget and the summary JSON, by running the real script in a subprocess."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402


def check(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def summary(folder):
    [path] = glob.glob(os.path.join(folder, "gpu-check-*[0-9].json"))
    with open(path) as f:
        return {p["part"]: p for p in json.load(f)["parts"]}, path


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    run = check(tmp_path / "out")
    assert run.returncode == 0 and "no CUDA device here" in run.stdout and "nothing was run" in run.stdout
    assert not (tmp_path / "out").exists()


def test_it_selects_every_gpu_test_and_only_files_with_some():
    files = gpu_check.gpu_test_files()
    assert "tests/test_kernels.py" in files and all(f.startswith("tests/test_") for f in files)
    run = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "--collect-only", "-q", "-m", "gpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    assert ids and {i.split("::")[0] for i in ids} == set(files), run.stdout[-2000:]


def test_parts_are_time_boxed_and_reported_in_json(tmp_path):
    start = time.time()
    run = check(tmp_path, "--allow-cpu", "--parts", "pytest-gpu,kernels-layers,ort-cuda",
                "--timeout", "kernels-layers=3")
    parts, path = summary(tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr  # a part ran out of time
    assert parts["kernels-layers"]["status"] == "timeout" and parts["kernels-layers"]["seconds"] < 10
    assert time.time() - start < 120  # the CPU kernel benchmark alone takes minutes: it was cut off
    gpu = parts["pytest-gpu"]
    assert gpu["status"] == "ok" and gpu["result"]["tests"] > 0
    if not torch.cuda.is_available():
        assert gpu["result"]["skipped"] == gpu["result"]["tests"]
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert parts["ort-cuda"]["status"] == "skipped" and "onnxruntime-gpu" in parts["ort-cuda"]["reason"]
    assert "kernels-layers" in run.stdout and path in run.stdout


def test_a_spent_budget_skips_the_rest_and_bad_arguments_are_refused(tmp_path):
    run = check(tmp_path, "--allow-cpu", "--parts", "kernels-layers", "--budget", "1")
    parts, _ = summary(tmp_path)
    assert run.returncode == 0 and parts["kernels-layers"]["status"] == "skipped"
    assert "budget of 1s is spent" in parts["kernels-layers"]["reason"]
    run = check(tmp_path, "--parts", "kernels,nope")
    assert run.returncode == 2 and "unknown part kernels, nope" in run.stderr
    run = check(tmp_path, "--timeout", "pytest-gpu")
    assert run.returncode == 2 and "--timeout takes PART=SECONDS" in run.stderr


def test_the_checkout_laid_out_as_installed_imports(tmp_path):
    site = tmp_path / "site"
    gpu_check.layout_checkout(str(site))
    run = subprocess.run([sys.executable, "-c", "import compressor.kernels, compressor.exporters.engine_runner as e; "
                          "print(compressor.kernels.__file__, e.__file__)"], cwd=tmp_path, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(site)))
    assert run.returncode == 0, run.stderr
    assert all(p.startswith(str(site)) for p in run.stdout.split())
