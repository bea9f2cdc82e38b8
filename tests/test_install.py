"""The installed package: one import root, a torch/torchvision pair that works, the console script."""
import importlib.util
import os
import shutil
import site
import subprocess
import sys

import torch
import torchvision


def test_torchvision_ops_work_with_this_torch():
    # fails with "operator torchvision::nms does not exist" on a mismatched pair
    keep = torchvision.ops.nms(torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1.0]]), torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]


def test_one_import_root():
    import compressor.exporters
    import compressor.kernels
    assert compressor.kernels.__name__ == "compressor.kernels"
    assert callable(compressor.kernels.masked_conv2d)
    for folder in site.getsitepackages():
        for name in ("kernels", "exporters"):
            assert not os.path.exists(os.path.join(folder, name)), f"top-level {name} installed in {folder}"
    assert importlib.util.find_spec("compressor").origin.endswith(os.path.join("compressor", "__init__.py"))


def test_console_script():
    exe = shutil.which("compressor", path=os.path.dirname(sys.executable))
    assert exe, "the compressor console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "compress" in out
