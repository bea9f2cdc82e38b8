"""Naming a model's architecture so that model.pt can rebuild it: recognised torchvision, timm
and project builders (with the num_classes they need), DataParallel unwrapped, and a clear error
when nothing names it. Real models throughout; the user's model is never modified."""
import subprocess
import sys

import pytest
import torch
import torchvision

import compressor as cz
from compressor.cifar import resnet20
from compressor.models import _layout, name_architecture, parse_spec
from conftest import assert_unchanged, snapshot


@pytest.mark.parametrize("build, spec", [
    (lambda: torchvision.models.resnet18(num_classes=4), "torchvision:resnet18(num_classes=4)"),
    (lambda: torchvision.models.resnet50(), "torchvision:resnet50"),
    (lambda: torchvision.models.mobilenet_v2(num_classes=7), "torchvision:mobilenet_v2(num_classes=7)"),
    (lambda: torchvision.models.squeezenet1_1(num_classes=3), "torchvision:squeezenet1_1(num_classes=3)"),
    (lambda: torch.nn.DataParallel(torchvision.models.resnet18(num_classes=4)), "torchvision:resnet18(num_classes=4)"),
    (lambda: resnet20(num_classes=100), "compressor.cifar:resnet20(num_classes=100)"),
])
def test_builders_are_recognised_with_their_arguments(build, spec):
    model = build()
    before = snapshot(model)
    assert name_architecture(model) == spec
    assert_unchanged(model, before)
    inner = model.module if isinstance(model, torch.nn.DataParallel) else model
    assert _layout(cz.load_model(spec)) == _layout(inner)  # the spec builds exactly this architecture


def test_timm_models_are_recognised():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    assert name_architecture(model) == "timm:resnet18(num_classes=5)"
    assert _layout(cz.load_model("timm:resnet18(num_classes=5)")) == _layout(model)


class NeedsArguments(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, 3)


def test_an_unnamed_architecture_says_how_to_name_it():
    with pytest.raises(cz.ConfigError, match="cannot name the architecture of NeedsArguments.*source="):
        name_architecture(NeedsArguments(4))
    with pytest.raises(cz.ConfigError, match="builds another architecture"):
        name_architecture(torchvision.models.resnet18(), source="torchvision:resnet34")
    assert name_architecture(torchvision.models.resnet18(num_classes=4), source="torchvision:resnet18") == \
        "torchvision:resnet18"  # the caller's name wins; load_slim restores the saved shapes


def test_spec_arguments_are_literals_only():
    assert parse_spec("torchvision:resnet18(num_classes=4)") == ("torchvision", "resnet18", {"num_classes": 4})
    for bad in ("torchvision:resnet18(num_classes=__import__('os').getpid())", "torchvision:resnet18(4)", "resnet18"):
        with pytest.raises(cz.ConfigError, match="model spec"):
            parse_spec(bad)


def test_a_scripts_own_class_is_not_named_by_its_module():
    """'__main__:Net' would name whatever script loads model.pt later: ask for a source instead."""
    script = ("import torch, compressor as cz\n"
              "from compressor.models import name_architecture\n"
              "class Net(torch.nn.Module):\n"
              "    def __init__(self, width=4):\n"
              "        super().__init__()\n"
              "        self.conv = torch.nn.Conv2d(3, width, 3)\n"
              "try:\n"
              "    print(name_architecture(Net()))\n"
              "except cz.ConfigError as e:\n"
              "    print('ConfigError:', e)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ConfigError: cannot name the architecture of Net (__main__)"), run.stdout
