"""CI: the package as a normal (non-editable) wheel install sees it, run from outside the checkout.

Imports every subpackage, runs `compressor --help`, a tiny compress with an ONNX export, and
`compressor bench` on the exported file. Exits non-zero on any failure."""
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile

import torch

import compressor
from compressor.demo import DemoNet, shapes_dataset

here = os.path.dirname(os.path.abspath(compressor.__file__))
assert "site-packages" in here, f"compressor imported from {here}, not from the installed wheel"
for info in pkgutil.walk_packages(compressor.__path__, "compressor."):
    __import__(info.name)
print("imported", len(list(pkgutil.walk_packages(compressor.__path__, "compressor."))), "modules from", here)

exe = shutil.which("compressor", path=os.path.dirname(sys.executable))
assert exe, "the console script is not installed"
subprocess.run([exe, "--help"], check=True, stdout=subprocess.DEVNULL)

torch.set_num_threads(1)
torch.manual_seed(0)
out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="wheel-smoke-")  # .ci/run reuses model.onnx
data = shapes_dataset(256, size=16)
result = compressor.compress(DemoNet(width=8), "flops<=60%", data, example_input=torch.zeros(1, 3, 16, 16),
                             supernet_epochs=0.25, finetune_epochs=0.25, effort=0.05, calib_batches=1, divisor=4,
                             out_dir=out, export=["onnx"], progress=False)
assert result.meets_budget(), result.to_json()
assert os.path.isfile(os.path.join(out, "model.onnx")) and os.path.isfile(os.path.join(out, "model.pt"))
report = os.path.join(out, "bench.json")
subprocess.run([exe, "bench", os.path.join(out, "model.onnx"), "--json", report], check=True)
with open(report) as f:
    print("bench:", json.load(f)["results"][0])
print("wheel smoke test passed")
