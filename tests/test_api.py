"""compress() end to end and the command line, on a real small network and real files."""
import json
import os
import subprocess
import sys

import pytest
import torch

import compressor as cz
from conftest import assert_unchanged, quadrant_data, snapshot, tinynet_file, write_image_folder


@pytest.fixture(scope="module")
def bcnet_run(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    before = snapshot(pretrained)
    result = cz.compress(pretrained, "flops<=50%", quadrant_data(512), quadrant_data(256, seed=1), method="bcnet",
                         supernet_epochs=1, finetune_epochs=1, batch_size=32, effort=0.1, bins=10, divisor=1,
                         out_dir=str(out), export=["onnx"], progress=False)
    return result, out, before


def test_compress_meets_the_budget_and_keeps_accuracy(bcnet_run, pretrained):
    result, out, before = bcnet_run
    assert_unchanged(pretrained, before)  # the user's model is never touched
    assert result.result["flops"] <= 0.5 * result.original["flops"] == result.limits["flops"]
    assert result.result["flops"] == cz.measure_flops(result.model, torch.randn(1, 3, 16, 16))
    assert result.result["params"] < result.original["params"]
    assert result.result["accuracy"] > 0.8 and result.original["accuracy"] > 0.9
    assert result.side in ("left", "right") and len(result.widths) == 3
    assert set(result.timings) >= {"analyze_s", "supernet_s", "search_s", "finetune_s", "total_s"}


def test_compress_writes_its_outputs(bcnet_run):
    result, out, _ = bcnet_run
    report = json.loads((out / "report.json").read_text())
    assert report["meets_budget"] and report["widths"] == result.widths
    assert len(report["search"]["history"]) >= 8
    assert (out / "pareto.png").stat().st_size > 1000
    with pytest.raises(cz.ConfigError, match="conftest:TinyNet.*trust_source=True"):
        cz.load_slim(str(out / "model.pt"))  # the tests' own class is not a known builder
    loaded = cz.load_slim(str(out / "model.pt"), trust_source=True).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    assert os.path.isfile(result.paths["onnx"])
    assert not (out / "checkpoints").exists()  # removed after success (keep_checkpoints=False)
    # supernet.pt: the trained supernet, for searches of other budgets (test_trained.py)
    assert sorted(os.listdir(out)) == ["model.onnx", "model.pt", "pareto.png", "report.json", "supernet.pt"]
    assert report["paths"] == {k: str(out / v) for k, v in [("supernet", "supernet.pt"), ("model", "model.pt"),
                                                           ("pareto", "pareto.png"), ("onnx", "model.onnx"),
                                                           ("report", "report.json")]}


def test_ua_baseline_runs_left_only(pretrained):
    result = cz.compress(pretrained, "flops<=60%,params<=80%", quadrant_data(256), None, method="ua",
                         supernet_epochs=1, finetune_epochs=0, batch_size=32, effort=0.1, bins=10, divisor=1,
                         progress=False)
    assert result.side == "left" and result.meets_budget()
    assert all(e["score_right"] != e["score_right"] for e in result.search["history"])  # NaN: not scored
    json.loads(result.to_json())  # valid JSON (no NaN)


@pytest.mark.parametrize("budget, error, message", [
    ("flops<50%", cz.ConfigError, "bad budget"),
    ("flops<=1%", cz.InfeasibleBudgetError, "smallest configuration costs"),
    ("latency<=1ms@tpu", cz.ConfigError, "tpu"),
])
def test_bad_budgets_fail_before_training(pretrained, budget, error, message, tmp_path):
    with pytest.raises(error, match=message):
        cz.compress(pretrained, budget, quadrant_data(64), batch_size=16, out_dir=str(tmp_path), progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_arguments(pretrained, tmp_path):
    with pytest.raises(cz.ConfigError, match="method"):
        cz.compress(pretrained, "flops<=50%", quadrant_data(64), method="fancy", progress=False)
    with pytest.raises(cz.ConfigError, match="channel_order 'random'.*'l1', 'l1-both-ends', 'none'"):
        cz.compress(pretrained, "flops<=50%", quadrant_data(64), channel_order="random", progress=False)
    with pytest.raises(cz.ConfigError, match="empty"):
        cz.compress(pretrained, "flops<=50%", quadrant_data(0), progress=False)
    with pytest.raises(cz.ConfigError, match="export"):
        cz.compress(pretrained, "flops<=50%", quadrant_data(64), export=["tflite"], out_dir=str(tmp_path),
                    progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(cz.ConfigError, match="cannot write"):
        cz.compress(pretrained, "flops<=50%", quadrant_data(64), batch_size=16, out_dir=str(blocker / "out"),
                    progress=False)


def test_cli_compress_and_export(tmp_path):
    write_image_folder(tmp_path / "data" / "train", quadrant_data(256))
    write_image_folder(tmp_path / "data" / "val", quadrant_data(64, seed=1))
    cli = [sys.executable, "-m", "compressor.cli", "-q"]
    args = ["compress", "--model", tinynet_file(tmp_path), "--data", str(tmp_path / "data"), "--budget", "flops<=50%",
            "--out", str(tmp_path / "out"), "--image-size", "16", "--supernet-epochs", "1", "--finetune-epochs", "0",
            "--batch-size", "32", "--effort", "0.1", "--conv-impl", "reference", "--keep-checkpoints", "--method", "bcnet"]
    run = subprocess.run(cli + args + ["--lr", "0.02"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "checkpoints").is_dir()
    summary = json.loads(run.stdout)
    assert summary["result"]["flops"] <= summary["limits"]["flops"] and "accuracy" in summary["result"]
    model_path = tmp_path / "out" / "model.pt"
    run = subprocess.run(cli + ["export", str(model_path), "--image-size", "16"], capture_output=True, text=True)
    assert run.returncode == 2 and "--trust-source" in run.stderr  # its source is a .py file: not run by default
    run = subprocess.run(cli + ["export", str(model_path), "--image-size", "16", "--trust-source"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "model.onnx").exists()
    rerun = subprocess.run(cli + args + ["--lr", "0.05"], capture_output=True, text=True)  # another run, same --out
    assert rerun.returncode == 2 and "lr (0.02 then, 0.05 now)" in rerun.stderr and "--restart" in rerun.stderr
    rerun = subprocess.run(cli + args + ["--lr", "0.05", "--restart"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not (tmp_path / "out" / "model.onnx").exists()  # the earlier export is not this run's: removed
    bad = subprocess.run(cli + ["compress", "--model", "torchvision:resnet1000", "--data", str(tmp_path),
                                "--budget", "flops<=50%", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "torchvision has no model 'resnet1000'" in bad.stderr


def _conv_weights(model):
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("inherit", ["original", "supernet", "best"])
def test_inherit_picks_where_the_slim_weights_come_from(pretrained, inherit):
    """Ordered by Taylor importance, the slim model's convolutions are either a slice of the ordered
    original (inherit="original") or of the trained supernet; "best" names the one it took (BCNet,
    without the anchor's reconstruction, which changes the weights before training)."""
    result = cz.compress(pretrained, "flops<=50%", quadrant_data(256), None, supernet_epochs=2, finetune_epochs=0,
                         batch_size=32, effort=0.1, bins=10, divisor=1, lr=0.05, inherit=inherit, progress=False,
                         method="bcnet", channel_order="taylor", reconstruct="none")
    from compressor.data import train_val_split
    from compressor.finetune import loader
    from compressor.slim import channel_importance
    space = cz.analyze(pretrained, torch.randn(1, 3, 16, 16), bins=10, divisor=1, binning="flops")  # compress's
    with torch.random.fork_rng(devices=[]):  # the importance compress computed: same seed, same batches
        torch.manual_seed(0)
        fit, _ = train_val_split(quadrant_data(256), 0.1, 0)
        importance = channel_importance(pretrained, space, "taylor", loader(fit, 32, shuffle=True, seed=0))
    ordered = cz.order_channels(pretrained, space, importance=importance)
    sliced = cz.slim(ordered, space, result.widths, result.side)
    same = all(torch.equal(a, b) for a, b in zip(_conv_weights(result.model), _conv_weights(sliced)))
    if inherit != "best":
        assert result.search["inherited"] == inherit
    assert result.search["inherited"] in ("original", "supernet")
    assert same == (result.search["inherited"] == "original")


def test_the_seed_alone_decides_the_result():
    """With augmented data (drawn from torch's default generator, which torch seeds at random in
    every process), two runs with one seed deliver the same network whatever the caller drew
    before, and compress neither resets nor consumes the caller's generator."""
    from compressor.data import ImageTensorDataset
    from conftest import TinyNet
    x = quadrant_data(256).tensors
    images = ((x[0] - x[0].min()) / (x[0].max() - x[0].min()) * 255).to(torch.uint8)
    data = ImageTensorDataset(images, x[1], ["a", "b", "c", "d"], augment=True)
    fast = dict(supernet_epochs=1, finetune_epochs=1, batch_size=32, effort=0.05, bins=10, divisor=1, progress=False)
    results = []
    for caller_seed in (1, 2):
        torch.manual_seed(0)
        model = TinyNet(width=8)
        torch.manual_seed(caller_seed)
        state = torch.get_rng_state()
        results.append(cz.compress(model, "flops<=50%", data, **fast))
        assert torch.equal(torch.get_rng_state(), state)
    a, b = (r.model.state_dict() for r in results)
    assert results[0].widths == results[1].widths
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(3)  # and the augmentations do differ with the generator's state
    assert not torch.equal(data[list(range(8))][0][0], data[list(range(8))][0][0])
