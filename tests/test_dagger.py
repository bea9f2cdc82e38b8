"""DAGGER (compressor/methods/dagger.py): its cost regulariser is the cost model's exact cost, its
gates with 0/1 values compute the slimmed network, the regulariser alone moves the gates to the
budget, and compress(method="dagger") delivers a network inside the budget, from the API and the
CLI, resuming its own checkpoints and refusing another run's. The resume after SIGKILL is the
contract every fit method passes (tests/test_methods.py)."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import compressor as cz
from compressor.budget import parse_budget
from compressor.cifar import resnet20
from compressor.methods import FitContext, get_method
from compressor.methods.dagger import (CHECKPOINT, INITIAL_GATE, DaggerOptions, GateNet, Gates, cost_penalty, fit,
                                       gate_points, gated_cost, weight_features)
from compressor.search import constraints
from compressor.slim import max_rel_diff
from conftest import (assert_unchanged, quadrant_data, snapshot, tinynet_file, with_real_statistics,
                      write_image_folder)
from models import build, input_size


@pytest.fixture(scope="module", params=["cifar:resnet20", "resnet18", "mobilenet_v2"])
def analysed(request):
    """(model with real BN statistics, one input, its width space): a CIFAR ResNet, a torchvision
    ResNet and a network of depthwise convolutions at small input."""
    torch.manual_seed(0)
    if request.param == "cifar:resnet20":
        model, size = resnet20(), 32
    else:
        model, size = build(request.param), input_size(request.param)
    model = with_real_statistics(model, size=size)
    x = torch.randn(2, 3, size, size)
    return model, x, cz.analyze(model, x[:1])


def hard_gates(space, cfg, rng):
    """0/1 gates, one tensor per group, with as many ones as cfg keeps, at random channels."""
    gates = []
    for n, k in zip(space.sizes, space.channels(cfg)):
        g = np.zeros(n)
        g[rng.choice(n, k, replace=False)] = 1
        gates.append(torch.tensor(g, dtype=torch.float64))
    return gates


def test_the_regulariser_is_the_cost_models_cost_for_hard_gates(analysed):
    _, _, space = analysed
    rng = np.random.default_rng(0)
    for seed in range(5):
        cfg = space.random(seed)
        gates = hard_gates(space, cfg, rng)
        assert float(gated_cost(space, gates, "flops")) == pytest.approx(space.flops(cfg), rel=1e-12)
        assert float(gated_cost(space, gates, "params")) == pytest.approx(space.params(cfg), rel=1e-12)
        bounds = constraints(space, "flops<=40%")
        expected = (space.flops(cfg) / bounds[0].limit - 1) ** 2
        assert float(cost_penalty(space, gates, bounds)) == pytest.approx(expected, rel=1e-9)
    counts = rng.integers(1, space.sizes + 1)  # any channel counts, not only the bins'
    gates = [torch.tensor((np.arange(n) < k).astype(float)) for n, k in zip(space.sizes, counts)]
    assert float(gated_cost(space, gates)) == pytest.approx(float(space.cost.flops(counts)), rel=1e-12)


def test_hard_gates_compute_the_slim_network(analysed):
    """Gates of 0 and 1 on a copy of the model compute what slimming the gated-off channels gives
    (the channels ordered by gate, as DAGGER orders them before slimming)."""
    model, x, space = analysed
    before = snapshot(model)
    cfg = space.random(1)
    gates = hard_gates(space, cfg, np.random.default_rng(1))
    small = cz.slim(cz.order_channels(model, space, importance=[g.numpy() for g in gates]), space, cfg, "left").eval()
    work = copy.deepcopy(model).eval()
    gated = Gates(work, gate_points(work, space))
    gated.set(torch.cat(gates).float())
    with torch.no_grad():
        assert max_rel_diff(small(x), work(x)) < 1e-4 < max_rel_diff(small(x), model(x))  # the gates matter
        gated.set(torch.ones(int(space.sizes.sum())))
        assert max_rel_diff(model(x), work(x)) < 1e-6  # all gates 1: the model itself
    gated.remove()
    assert_unchanged(model, before)


@pytest.mark.parametrize("percent", [50, 95])
def test_the_regulariser_alone_moves_the_gates_to_the_budget(percent):
    """From INITIAL_GATE (cost about 0.81 of the original) the regulariser pulls the gates down to a
    50 % budget and up to a 95 % one, and the gated cost ends near the limit."""
    model = resnet20()
    space = cz.analyze(model, torch.randn(1, 3, 32, 32))
    bounds = constraints(space, f"flops<={percent}%")
    features, group = weight_features(model, space)
    torch.manual_seed(0)
    net = GateNet(features, group, len(space), hidden=8, temperature=1.0)
    sizes = [int(n) for n in space.sizes]

    def ratio():
        return float(gated_cost(space, net().split(sizes)) / bounds[0].limit)

    def mean():
        return float(net().mean())

    with torch.no_grad():
        start, mean_gate = ratio(), mean()
    assert mean_gate == pytest.approx(INITIAL_GATE, abs=1e-6)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        cost_penalty(space, net().split(sizes), bounds).backward()
        optimizer.step()
    with torch.no_grad():
        assert abs(ratio() - 1) < 0.05 * abs(start - 1)
        assert (mean() < mean_gate) == (start > 1)


def test_compress_with_dagger(pretrained):
    before = snapshot(pretrained)
    result = cz.compress(pretrained, "flops<=50%", quadrant_data(512), quadrant_data(256, seed=1), method="dagger",
                         finetune_epochs=1, batch_size=32, bins=10, divisor=1, progress=False)
    assert_unchanged(pretrained, before)
    space = cz.analyze(pretrained, torch.randn(1, 3, 16, 16), bins=10, divisor=1, binning="flops")  # compress's
    assert result.result["flops"] == cz.measure_flops(result.model, torch.randn(1, 3, 16, 16)) == \
        space.flops(result.widths) <= result.limits["flops"]
    assert result.result["accuracy"] > 0.8 and result.original["accuracy"] > 0.9
    assert result.method == "dagger" and result.side == "left" and result.search["inherited"] == "original"
    assert {"gates_s", "prune_s", "finetune_s"} <= set(result.timings) and "supernet_s" not in result.timings
    assert json.loads(result.to_json())["meets_budget"]


@pytest.mark.parametrize("budget", ["params<=40%", "flops<=70%,params<=45%"])
def test_dagger_meets_params_and_combined_budgets_exactly(pretrained, budget):
    result = cz.compress(pretrained, budget, quadrant_data(256), method="dagger", finetune_epochs=0, batch_size=32,
                         bins=10, divisor=1, progress=False)
    x = torch.randn(1, 3, 16, 16)
    measured = {"flops": cz.measure_flops(result.model, x), "params": cz.count_params(result.model)}
    assert result.limits.keys() == {c.metric for c in parse_budget(budget)}
    for metric, limit in result.limits.items():
        assert measured[metric] == result.result[metric] <= limit


def test_a_checkpoint_of_another_run_is_refused_and_the_same_run_resumes(pretrained, tmp_path):
    common = dict(method="dagger", finetune_epochs=0, batch_size=32, bins=10, divisor=1, out_dir=str(tmp_path),
                  keep_checkpoints=True, progress=False)
    first = cz.compress(pretrained, "flops<=50%", quadrant_data(256), method_options={"lam": 10.0}, **common)
    saved = torch.load(tmp_path / "checkpoints" / CHECKPOINT, weights_only=True)
    assert saved["step"] == saved["steps"] > 0
    again = cz.compress(pretrained, "flops<=50%", quadrant_data(256), method_options={"lam": 10.0}, **common)
    assert again.widths == first.widths  # resumed from the finished checkpoint: the same gates
    for k, v in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    with pytest.raises(cz.ConfigError, match="is the checkpoint of another run: .*options .* differ.*restart=True"):
        cz.compress(pretrained, "flops<=50%", quadrant_data(256), method_options={"lam": 5.0}, **common)
    other = cz.compress(pretrained, "flops<=50%", quadrant_data(256), method_options={"lam": 5.0}, restart=True,
                        **common)
    assert other.meets_budget()


@pytest.mark.parametrize("options, message", [
    ({"epochs": 0}, "dagger option epochs must be a number > 0, got 0"),
    ({"lam": -1.0}, "dagger option lam must be a number >= 0, got -1.0"),
    ({"temperature": float("nan")}, "dagger option temperature must be a number > 0, got nan"),
    ({"hidden": 2.5}, "dagger option hidden must be an integer > 0, got 2.5"),
    ({"lr": "fast"}, "dagger option lr must be a number > 0, got 'fast'"),
    ({"checkpoint_every": True}, "dagger option checkpoint_every must be an integer > 0, got True"),
])
def test_options_are_validated(options, message):
    with pytest.raises(cz.ConfigError, match=message.replace("(", r"\(")):
        get_method("dagger").parse_options(options)
    assert DaggerOptions().lam >= 0  # the defaults pass


def test_a_latency_budget_is_refused_before_training():
    latency = parse_budget("latency<=3ms@ort-cpu")[0]
    ctx = FitContext(model=None, space=None, train_data=None, held_out=None, budget=None, method=get_method("dagger"),
                     options=DaggerOptions(), latency=latency)
    with pytest.raises(cz.ConfigError, match="does not support latency budgets .*use a flops or params budget"):
        fit(ctx)


def test_cli_compress_with_dagger(tmp_path):
    write_image_folder(tmp_path / "data" / "train", quadrant_data(128))
    write_image_folder(tmp_path / "data" / "val", quadrant_data(32, seed=1))
    cli = [sys.executable, "-m", "compressor.cli", "-q", "compress", "--model", tinynet_file(tmp_path), "--data",
           str(tmp_path / "data"), "--budget", "flops<=50%", "--out", str(tmp_path / "out"), "--image-size", "16",
           "--finetune-epochs", "0", "--batch-size", "16", "--method", "dagger"]
    run = subprocess.run(cli + ["--method-option", "epochs=1", "--method-option", "hidden=8"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["result"]["flops"] <= summary["limits"]["flops"] and summary["side"] == "left"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "dagger" and report["meets_budget"]
    bad = subprocess.run(cli + ["--method-option", "temperature=0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "dagger option temperature must be a number > 0, got 0" in bad.stderr
