"""One command for every GPU check, sized for a GPU machine lent for a few minutes.

    python benchmarks/gpu_check.py [OUT_DIR] [--budget 450] [--wheels .whl] [--parts a,b] [--timeout PART=S]

Runs, each part in its own process with its own time box (and all of them inside --budget seconds):
  pytest-gpu          every test marked `gpu` (pytest -m gpu on the test files that hold such marks)
  kernels-layers      benchmarks/kernels.py --part layers: masked conv, reference / sliced / cuda, per layer
  supernet-step       benchmarks/kernels.py --part step: one BCNet training step on CUDA (needs torch-pruning)
  latency-torch-cuda  benchmarks/latency_model.py --quick --models resnet18 --target torch-cuda (torch-pruning)
  ort-cuda            `compressor bench` of ResNet-18's ONNX file on ort-cuda and ort-cpu (when ONNX Runtime
                      has the CUDA execution provider)
and writes OUT_DIR/gpu-check-STAMP.json (every part: status, seconds, its numbers, the end of its output)
next to each part's own JSON, rewritten after every part, then prints a summary. Without a CUDA device
it says so and exits 0 having run nothing (--allow-cpu runs the parts anyway: how the script is tested).
Exit status 1 when a part failed or ran out of time.

The machine needs torch with CUDA, numpy, onnx and onnxruntime(-gpu). The project does not have to be
installed: when `compressor.kernels` does not import, the checkout is laid out as installed in a
temporary folder. Pure-Python wheels in --wheels (default .whl/ at the repository root, ignored by git:
e.g. torch_pruning, tqdm, pytest, pluggy, iniconfig) are unpacked onto the path; the parts that need
torch-pruning are skipped, saying so, when it is missing.
"""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUDGET_S = 450  # inside the 8 minutes the machine is lent for, with room for its start
# name -> (its own time box in seconds, modules it needs besides torch)
PARTS = {
    "pytest-gpu": (150, ("pytest",)),
    "kernels-layers": (120, ()),
    "supernet-step": (90, ("torch_pruning",)),
    "latency-torch-cuda": (90, ("torch_pruning",)),
    "ort-cuda": (60, ("onnxruntime",)),
}
ORT_PART = """
import json, os, sys, torch, torchvision
import compressor as cz
from compressor.cli import main
out, targets = sys.argv[1], sys.argv[2:] or ["ort-cuda", "ort-cpu"]
cz.exporters.export_onnx(torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 224, 224), out + ".onnx")
results = {}
for target in targets:
    if main(["bench", out + ".onnx", "--target", target, "--reps", "50", "--json", out + "." + target]) != 0:
        sys.exit(1)
    with open(out + "." + target) as f:
        results[target] = json.load(f)
    os.remove(out + "." + target)
os.remove(out + ".onnx")
with open(out, "w") as f:
    json.dump(results, f, indent=1)
"""
PYTEST = "import sys, pytest; sys.path.pop(0); sys.exit(pytest.main(sys.argv[1:]))"  # no checkout on sys.path


def gpu_test_files():
    """The test files that hold a `gpu` mark: `pytest -m gpu` on them alone, so that the other
    files (some need torch-pruning) are not even imported."""
    files = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py"))):
        with open(path) as f:
            if "mark.gpu" in f.read():
                files.append(os.path.relpath(path, REPO))
    return files


def unpack_wheels(folder, site):
    """Unpack the pure-Python wheels in `folder` into `site`; returns their names (others: skipped)."""
    names = []
    for wheel in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        if not wheel.endswith("-none-any.whl"):
            print(f"gpu check: skipping {os.path.basename(wheel)}: not a pure-Python wheel", flush=True)
            continue
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        names.append(os.path.basename(wheel))
    return names


def layout_checkout(site):
    """The checkout laid out as installed (compressor/, with kernels/ and exporters/ inside) in `site`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build")
    shutil.copytree(os.path.join(REPO, "compressor"), os.path.join(site, "compressor"), ignore=ignore)
    for sub in ("kernels", "exporters"):
        shutil.copytree(os.path.join(REPO, sub), os.path.join(site, "compressor", sub), ignore=ignore)


def importable(module, env):
    return subprocess.run([sys.executable, "-c", f"import {module}"], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True).returncode == 0


def prepare_env(wheels, scratch):
    """(environment for the parts, notes): the project and the carried wheels importable."""
    env, notes, paths = dict(os.environ, PYTHONUNBUFFERED="1"), [], []
    if wheels and os.path.isdir(wheels):
        deps = os.path.join(scratch, "deps")
        found = unpack_wheels(wheels, deps)
        if found:
            paths.append(deps)
            notes.append(f"wheels from {wheels}: {', '.join(found)}")
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if not importable("compressor.kernels", env):
        site = os.path.join(scratch, "site")
        layout_checkout(site)
        paths.insert(0, site)
        env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]]).rstrip(os.pathsep)
        notes.append(f"the project is not installed: the checkout laid out in {site}")
    return env, notes


def commands(out, stamp):
    """name -> (argv, the JSON file the part writes, or None)."""
    py = sys.executable
    result = {name: os.path.join(out, f"gpu-check-{stamp}-{name}.json") for name in PARTS}
    junit = os.path.join(out, f"gpu-check-{stamp}-pytest.xml")
    kernels = [py, os.path.join(HERE, "kernels.py"), "--reps", "5", "--warmup", "2"]
    return {
        "pytest-gpu": ([py, "-c", PYTEST, "-m", "gpu", *gpu_test_files(), "-p", "no:cacheprovider", "-rs",
                        f"--junitxml={junit}"], junit),
        "kernels-layers": (kernels + ["--part", "layers", "--out", result["kernels-layers"]], result["kernels-layers"]),
        "supernet-step": (kernels + ["--part", "step", "--out", result["supernet-step"]], result["supernet-step"]),
        "latency-torch-cuda": ([py, os.path.join(HERE, "latency_model.py"), "--quick", "--models", "resnet18",
                                "--target", "torch-cuda", "--out", result["latency-torch-cuda"]],
                               result["latency-torch-cuda"]),
        "ort-cuda": ([py, "-c", ORT_PART, result["ort-cuda"]], result["ort-cuda"]),
    }


def run_boxed(argv, env, timeout):
    """(return code or None on timeout, output): the process group is killed at the time box."""
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


def junit_counts(path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def read_result(path):
    if not path or not os.path.isfile(path):
        return None
    if path.endswith(".xml"):
        return junit_counts(path)
    with open(path) as f:
        return json.load(f)


def machine(env):
    code = ("import json, sys; sys.path.insert(0, %r); from common import machine_info; "
            "print(json.dumps(machine_info()))" % HERE)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return json.loads(run.stdout) if run.returncode == 0 else {"error": run.stderr[-500:]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.path.join(HERE, "results"), help="folder for every JSON")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                        help="another time box for one part")
    parser.add_argument("--wheels", default=os.path.join(REPO, ".whl"), help="folder of pure-Python wheels to use")
    parser.add_argument("--allow-cpu", action="store_true", help="run the parts without a CUDA device (testing)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)}: use {', '.join(PARTS)}")
    boxes = {name: float(box) for name, (box, _) in PARTS.items()}
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds:
            parser.error(f"--timeout takes PART=SECONDS with PART one of {', '.join(PARTS)}, got {item!r}")
        boxes[name] = float(seconds)

    import torch
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}, sees "
              "none): nothing was run. Run it on a machine with an NVIDIA GPU.")
        return 0

    t0 = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    summary_path = os.path.join(args.out, f"gpu-check-{stamp}.json")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        env, notes = prepare_env(args.wheels, scratch)
        summary = {"check": "gpu", "machine": machine(env), "cuda": torch.cuda.is_available(), "budget_s": args.budget,
                   "notes": notes, "parts": []}
        for name in parts:
            argv, result_path = commands(args.out, stamp)[name]
            entry = {"part": name, "command": " ".join(argv[:2] if argv[1] == "-c" else argv)}
            left = args.budget - (time.time() - t0)
            missing = [m for m in PARTS[name][1] if not importable(m, env)]
            if name == "ort-cuda" and not missing and not provider_present(env):
                entry.update(status="skipped", reason="this onnxruntime has no CUDAExecutionProvider "
                                                      "(pip install onnxruntime-gpu)")
            elif missing:
                entry.update(status="skipped", reason=f"{', '.join(missing)} not importable: put its wheel into "
                                                      f"{args.wheels} (pip download --no-deps ...)")
            elif left < 5:
                entry.update(status="skipped", reason=f"the budget of {args.budget:.0f}s is spent")
            else:
                timeout = min(boxes[name], left)
                start = time.time()
                rc, output = run_boxed(argv, env, timeout)
                entry.update(seconds=round(time.time() - start, 1), timeout_s=round(timeout, 1),
                             status="timeout" if rc is None else "ok" if rc == 0 else "failed", returncode=rc,
                             result=read_result(result_path), output_tail=output[-3000:])
                if rc is None:
                    entry["reason"] = f"killed at its time box of {timeout:.0f}s"
            print(f"gpu check: {name}: {entry['status']}" + (f" ({entry['reason']})" if "reason" in entry else "")
                  + (f", {entry['seconds']}s" if "seconds" in entry else ""), flush=True)
            summary["parts"].append(entry)
            summary["total_s"] = round(time.time() - t0, 1)
            with open(summary_path, "w") as f:  # after every part: a killed run keeps what it did
                json.dump(summary, f, indent=1)
    print_summary(summary, summary_path)
    return 1 if any(p["status"] in ("failed", "timeout") for p in summary["parts"]) else 0


def provider_present(env):
    code = "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def print_summary(summary, path):
    print(f"\ngpu check on {summary['machine'].get('gpu') or 'no GPU'}, {summary['total_s']}s of "
          f"{summary['budget_s']:.0f}s; {path}")
    for p in summary["parts"]:
        detail = p.get("reason", "")
        r = p.get("result")
        if p["part"] == "pytest-gpu" and r:
            detail = f"{r['tests']} tests, {r['failures'] + r['errors']} failed, {r['skipped']} skipped " + \
                     " ".join(r["failed"][:5])
        elif p["part"] == "ort-cuda" and r:
            detail = ", ".join(f"{t} p50 {d['results'][0]['p50_ms']:.3f} ms" for t, d in r.items())
        elif p["part"] == "supernet-step" and r:
            detail = "; ".join(", ".join(f"{k} {v}" for k, v in row.items() if k.endswith("_ms") or k == "network")
                               for row in r["supernet_step"])
        elif p["part"] == "latency-torch-cuda" and r:
            detail = "; ".join(f"{row['model']}: MAPE {row['mape']:.1%}, tau {row['kendall_tau']:.2f}" for row in r["results"])
        print(f"  {p['part']:20s} {p['status']:8s} {p.get('seconds', '')!s:>6s}  {detail}")


if __name__ == "__main__":
    sys.exit(main())
