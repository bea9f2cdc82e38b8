"""RepNAS (compressor/reparam.py): every branch kind fuses exactly for every conv geometry, a fused
model keeps the slim model's architecture, cost and ONNX operators, the search keeps the branch
budget, and compress(reparam="repnas") runs end to end from the API and the CLI."""
import collections
import copy
import json
import math
import os
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

import compressor as cz
from compressor.cli import main
from compressor.exporters.onnx import PARITY_RTOL, export_onnx, onnxruntime_session, run_onnxruntime
from compressor.reparam import (BRANCH_KINDS, Geometry, RepBlock, add_branches, blocks, conv_bn_pairs,
                                finetune_repnas, fuse, unavailable)
from compressor.slim import max_rel_diff
from conftest import TinyNet, assert_unchanged, quadrant_data, snapshot, with_real_statistics, write_image_folder
from test_config import Unreadable

TESTS = os.path.dirname(os.path.abspath(__file__))
EXACT = 1e-5  # the fused network against the branched one, eval mode, relative to max |output|
GEOMETRIES = {  # nn.Conv2d arguments
    "plain": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, bias=True),
    "strided": dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1),
    "padded": dict(in_channels=8, out_channels=8, kernel_size=5, padding=3),
    "unpadded": dict(in_channels=8, out_channels=8, kernel_size=3),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1, groups=8),
    "dilated": dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2),
    "grouped": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4),
    "even": dict(in_channels=6, out_channels=6, kernel_size=2, padding=1),
    "pointwise": dict(in_channels=8, out_channels=8, kernel_size=1),
    "rectangular": dict(in_channels=8, out_channels=8, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1)),
}
NOT_OFFERED = {("1x1", "pointwise"), ("avg", "pointwise"), ("avg", "dilated"), ("identity", "strided"),
               ("identity", "grouped")}


def randomised(module, seed=0):
    """Every BN with a non-trivial affine map and running statistics, every architecture weight non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (low, high) in ((m.weight, (0.5, 1.5)), (m.running_var, (0.5, 2.0))):
                    t.copy_(low + (high - low) * torch.rand(t.shape, generator=g))
                for t in (m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g))
            if isinstance(m, RepBlock):
                m.alpha.copy_(torch.randn(m.alpha.shape, generator=g))
    return module.eval()


@pytest.mark.parametrize("kind, geometry", [(k, g) for g in GEOMETRIES for k in BRANCH_KINDS
                                            if (k, g) not in NOT_OFFERED])
def test_each_branch_kind_fuses_exactly(kind, geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(**{"bias": False, **GEOMETRIES[geometry]})
    block = RepBlock(conv, nn.BatchNorm2d(conv.out_channels), [kind])
    x = torch.randn(2, conv.in_channels, 11, 10)
    block.train()(x)  # the training forward runs too (BNs on batch statistics)
    randomised(block)
    with torch.no_grad():
        branched, pair = block(x), block.bn(block.conv(x))
        fused_conv, fused_bn = block.fuse()
        fused = fused_bn(fused_conv(x))
    assert fused_conv is conv and fused.shape == branched.shape == pair.shape
    assert max_rel_diff(branched, pair) > 1e-2  # the branch contributes: the check below means something
    assert max_rel_diff(branched, fused) <= EXACT


def test_kinds_that_cannot_fuse_exactly_are_not_offered():
    refused = {(k, g) for g, args in GEOMETRIES.items() for k in BRANCH_KINDS
               if unavailable(k, Geometry.of(nn.Conv2d(**args)))}
    assert refused == NOT_OFFERED
    with pytest.raises(cz.ConfigError, match="average pooling has no dilation"):
        RepBlock(nn.Conv2d(**GEOMETRIES["dilated"]), nn.BatchNorm2d(8), ["avg"])


class MixedNet(nn.Module):
    """The geometries inside one network, and two convs that must get no branches."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())  # conv with bias
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dilated = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(8))
        self.wide = nn.Sequential(nn.Conv2d(8, 16, 5, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16))
        self.no_bn = nn.Conv2d(16, 16, 1)                       # no BN after it
        self.shared = nn.Conv2d(16, 16, 3, padding=1, bias=False)  # its output goes to a BN and to an add
        self.shared_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.dw(self.stem(x))
        x = torch.relu(x + self.dilated(x))
        x = torch.relu(self.no_bn(self.grouped(self.wide(x))))
        y = self.shared(x)
        return self.fc(torch.relu(self.shared_bn(y) + y).mean((2, 3)))


ELIGIBLE = ["stem.0", "dw.0", "dilated.0", "wide.0", "grouped.0"]


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    slim = with_real_statistics(MixedNet(), size=16)
    branched = copy.deepcopy(slim)
    report = add_branches(branched, torch.randn(1, 3, 16, 16))
    return slim, randomised(branched), report


def test_only_conv_bn_pairs_get_branches_and_the_others_say_why(mixed):
    _, branched, report = mixed
    assert list(report["layers"]) == list(blocks(branched)) == ELIGIBLE
    assert report["layers"]["dilated.0"] == {"bn": "dilated.1", "offered": ["1x1", "1x1-kxk", "identity", "kxk"]}
    assert set(report["skipped"]) == {"no_bn", "shared"}
    assert "not to one nn.BatchNorm2d alone" in report["skipped"]["shared"]
    assert "the op AddBackward0" in report["skipped"]["shared"] and "'shared_bn'" in report["skipped"]["shared"]
    assert "the op ReluBackward0" in report["skipped"]["no_bn"]
    assert isinstance(branched.dilated[1], nn.Identity)


def test_conv_bn_pairs_leaves_a_reused_conv_alone():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x)))

    pairs, skipped = conv_bn_pairs(Reused(), torch.randn(1, 3, 8, 8))
    assert pairs == [] and skipped == {"conv": "runs 2 times per forward pass, not once"}


def test_branches_start_at_zero_so_the_model_computes_what_it_did(mixed):
    slim, _, _ = mixed
    x = torch.randn(4, 3, 16, 16)
    branched = copy.deepcopy(slim)
    add_branches(branched, x[:1])
    with torch.no_grad():
        assert torch.equal(branched.eval()(x), slim(x))


def test_the_fused_network_is_the_branched_one_with_the_slim_architecture(mixed):
    slim, branched, _ = mixed
    x = torch.randn(4, 3, 16, 16)
    fused = fuse(copy.deepcopy(branched))
    with torch.no_grad():
        assert max_rel_diff(branched(x), slim(x)) > 1e-2  # the randomised branches change the function
        assert max_rel_diff(branched(x), fused(x)) <= EXACT
    assert repr(fused) == repr(slim) and not blocks(fused)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in slim.state_dict().items()}
    assert cz.measure_flops(fused, x[:1]) == cz.measure_flops(slim, x[:1]) < cz.measure_flops(branched, x[:1])
    assert cz.count_params(fused) == cz.count_params(slim) < cz.count_params(branched)


def onnx_ops(path):
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


def test_onnx_of_a_branched_model_is_the_fused_graph(mixed, tmp_path):
    slim, branched, _ = mixed
    before = snapshot(branched)
    x = torch.randn(2, 3, 16, 16)
    slim_file = export_onnx(slim, x, tmp_path / "slim.onnx").path
    fused_file = export_onnx(branched, x, tmp_path / "fused.onnx").path  # the export fuses a copy
    assert_unchanged(branched, before)
    assert onnx_ops(fused_file) == onnx_ops(slim_file)
    assert "Conv" in onnx_ops(slim_file)
    with torch.no_grad():
        expected = branched(x).numpy()
    (got,) = run_onnxruntime(onnxruntime_session(fused_file), x.numpy())
    assert abs(got - expected).max() <= PARITY_RTOL * abs(expected).max()


@pytest.mark.parametrize("budget", [3, 1000])
def test_the_search_keeps_the_budgets_strongest_branches(pretrained, budget):
    model = copy.deepcopy(pretrained)
    x = torch.randn(1, 3, 16, 16)
    report = finetune_repnas(model, quadrant_data(256), x, {"branches": budget, "search_part": 0.5},
                             epochs=1, batch_size=32, progress=False)
    weights = [(abs(w), name, kind) for name, layer in report["layers"].items() for kind, w in layer["weights"].items()]
    kept = {(name, kind) for name, layer in report["layers"].items() for kind in layer["kept"]}
    assert report["candidates"] == len(weights) == sum(len(layer["offered"]) for layer in report["layers"].values())
    assert [("identity" in layer["offered"]) for layer in report["layers"].values()] == [False, False, True, True]
    assert report["kept"] == len(kept) == min(budget, len(weights))
    assert kept == {(name, kind) for _, name, kind in sorted(weights, reverse=True)[:budget]}
    assert all(w > 0 for w, _, _ in weights)  # every architecture weight trained from 0
    assert report["selected_at_step"] == math.ceil(0.5 * report["steps"]) and report["fusion_rel_diff"] <= EXACT
    assert not blocks(model) and repr(model) == repr(pretrained)


def test_branches_draw_their_own_random_numbers_and_no_step_still_fuses(pretrained):
    """Fine-tuning with branches sees the augmentations a run without them sees (paired rows)."""
    model, x = copy.deepcopy(pretrained), torch.randn(1, 3, 16, 16)
    state = torch.get_rng_state()
    report = finetune_repnas(model, quadrant_data(64), x, {"branches": 2}, epochs=0, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert report["steps"] == report["selected_at_step"] == 0 and report["kept"] == 2
    assert not blocks(model) and repr(model) == repr(pretrained)


def test_compress_with_repnas_end_to_end(pretrained, tmp_path):
    before = snapshot(pretrained)
    x = torch.randn(1, 3, 16, 16)
    result = cz.compress(pretrained, "flops<=50%", quadrant_data(512), quadrant_data(256, seed=1),
                         supernet_epochs=1, finetune_epochs=1, batch_size=32, effort=0.1, bins=10, divisor=1,
                         out_dir=str(tmp_path), export=["onnx"], progress=False, reparam="repnas",
                         reparam_options={"branches": 3})
    assert_unchanged(pretrained, before)
    assert result.meets_budget() and result.result["flops"] == cz.measure_flops(result.model, x)
    assert result.result["accuracy"] > 0.8
    space = cz.analyze(pretrained, x, bins=10, divisor=1, binning="flops")  # compress's default binning
    slim = cz.slim(pretrained, space, result.widths, result.side)
    assert repr(result.model) == repr(slim) and not blocks(result.model)
    branches = result.reparam
    assert branches["budget"] == 3 and branches["kept"] == sum(len(v["kept"]) for v in branches["layers"].values()) == 3
    assert all(set(v["kept"]) <= set(v["offered"]) for v in branches["layers"].values())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reparam"] == json.loads(json.dumps(branches))
    loaded = cz.load_slim(str(tmp_path / "model.pt"), trust_source=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    assert onnx_ops(result.paths["onnx"]) == onnx_ops(export_onnx(slim, x, tmp_path / "slim.onnx").path)


@pytest.mark.parametrize("options, message", [
    ({"reparam": "repvgg"}, "unknown reparam 'repvgg': use None, 'repnas'"),
    ({"reparam_options": {"branches": 2}}, 'reparam_options apply to reparam="repnas"'),
    ({"reparam": "repnas", "reparam_options": {"branchs": 2}},
     "unknown reparam option 'branchs': valid options are 'branches', 'kinds', 'search_part'"),
    ({"reparam": "repnas", "reparam_options": {"branches": -1}}, "branches must be an integer >= 0"),
    ({"reparam": "repnas", "reparam_options": {"kinds": ["5x5"]}}, "kinds must be a non-empty list of '1x1'"),
    ({"reparam": "repnas", "reparam_options": {"search_part": 0}}, "search_part must be a fraction"),
])
def test_a_wrong_reparam_option_is_refused_before_the_data_is_read(options, message):
    with pytest.raises(cz.ConfigError, match=message):
        cz.compress(TinyNet(), "flops<=50%", Unreadable(), **options)


def test_the_cli_flags(tmp_path, capsys):
    args = ["compress", "--model", "torchvision:resnet18", "--data", str(tmp_path), "--budget", "flops<=50%",
            "--out", str(tmp_path / "out")]
    assert main(args + ["--reparam-option", "branches=2"]) == 2
    assert 'reparam_options apply to reparam="repnas" (CLI: --reparam repnas)' in capsys.readouterr().err
    assert main(args + ["--reparam", "repnas", "--reparam-option", "branches"]) == 2
    assert "--reparam-option takes KEY=VALUE, got 'branches'" in capsys.readouterr().err

    write_image_folder(tmp_path / "data" / "train", quadrant_data(128))
    factory = tmp_path / "net.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import TinyNet\n"
                       "def build():\n    return TinyNet(width=8)\n")
    run = subprocess.run([sys.executable, "-m", "compressor.cli", "-q", "compress", "--model", f"{factory}:build",
                          "--data", str(tmp_path / "data"), "--budget", "flops<=50%", "--out", str(tmp_path / "out"),
                          "--image-size", "16", "--supernet-epochs", "1", "--finetune-epochs", "1",
                          "--batch-size", "32", "--effort", "0.1", "--reparam", "repnas",
                          "--reparam-option", "branches=2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reparam"]["kept"] == 2 and report["meets_budget"]
