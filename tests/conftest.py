import os

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
SHARED_DATA = os.environ.get("COMPRESSOR_DATA", os.path.join(REPO, "..", "shared", "data"))


def snapshot(model: torch.nn.Module):
    """Everything a public call must leave untouched: tensors, structure, modes, hooks."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "structure": repr(model),
        "training": [m.training for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["structure"] == before["structure"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"


def pytest_runtest_setup(item):
    """Every `@pytest.mark.gpu` test is device-only: skipped, with the reason, where CUDA is absent."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("no CUDA device: a gpu test (pytest -m gpu runs them all on a machine with one)")


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def with_real_statistics(model: torch.nn.Module, size=64, batches=2) -> torch.nn.Module:
    """A random-init model in eval mode has BN statistics (0, 1) that shrink activations to ~1e-10;
    estimate them on random data so outputs are of order 1 and comparisons mean something."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, size, size))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


class TinyNet(torch.nn.Module):
    """A small residual CNN: three channel groups (stem, stage stream, inner block)."""

    def __init__(self, classes=4, width=16):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(2 * width), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(2 * width))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.down(self.stem(x))
        x = torch.relu(x + self.conv2(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


def quadrant_data(n=512, size=16, seed=0):
    """A learnable 4-class task: the class is the quadrant holding a bright square, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.5 * torch.randn(n, 3, size, size, generator=g)
    h = size // 2
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, :, r * h + 2: r * h + h - 2, col * h + 2: col * h + h - 2] += 2.0
    return torch.utils.data.TensorDataset(x, y)


def write_image_folder(root, data):
    """An ImageFolder (one folder per class, PNG files) of a dataset of (image, label) tensors."""
    import numpy as np
    from PIL import Image
    for i, (x, y) in enumerate(data):
        folder = root / f"class{int(y)}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((x.clamp(-2, 2) + 2) / 4 * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{i}.png")


def tiny_compress_cli(folder, method, budget="flops<=50%"):
    """The CLI's compress command for `method` on TinyNet(width=8) and a small ImageFolder it writes
    under `folder` (`budget`, half a supernet epoch, no fine-tuning; report in folder/out)."""
    import sys
    write_image_folder(folder / "data" / "train", quadrant_data(128))
    write_image_folder(folder / "data" / "val", quadrant_data(32, seed=1))
    return [sys.executable, "-m", "compressor.cli", "-q", "compress", "--model", tinynet_file(folder), "--data",
            str(folder / "data"), "--budget", budget, "--out", str(folder / "out"), "--image-size", "16",
            "--finetune-epochs", "0", "--supernet-epochs", "0.5", "--batch-size", "16", "--method", method]


# the start of a torchrun script that trains TinyNet: the gloo process group, `rank`, `model` and its `space`
DDP_TINYNET = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
import compressor as cz
from conftest import TinyNet, quadrant_data

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = TinyNet()
space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1)
"""


def torchrun(folder, script, port, processes=2):
    """Run the text `script` (a template whose {tests} is this folder) under torchrun with `processes`
    processes on `port`, its one argument `folder` (where it writes); raises when a process fails."""
    import shutil
    import subprocess
    import sys
    path = folder / "ddp.py"
    path.write_text(script.format(tests=TESTS))
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    subprocess.run([launcher, "--nproc_per_node", str(processes), "--master_port", str(port), str(path), str(folder)],
                   check=True, timeout=300)


def tinynet_file(folder):
    """A model spec for the CLI, 'FILE:build': a .py file in `folder` whose build() makes TinyNet(width=8)."""
    path = folder / "net.py"
    path.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import TinyNet\n"
                    "def build():\n    return TinyNet(width=8)\n")
    return f"{path}:build"


@pytest.fixture(scope="module")
def pretrained():
    """TinyNet(width=16) trained on quadrant_data: over 90 % accurate, the model compress() is tested on."""
    torch.manual_seed(0)
    model = TinyNet(width=16)
    from compressor.finetune import finetune
    finetune(model, quadrant_data(512), epochs=8, lr=0.1, progress=False)
    return model
