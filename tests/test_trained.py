"""One trained supernet, many budgets: compress() with a supernet method keeps its supernet in
out_dir/supernet.pt, and search_trained() / `compressor search` search it for other budgets without
training it again, on real tiny models and real files."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import compressor as cz
from compressor.api import search_trained
from conftest import TinyNet, assert_unchanged, quadrant_data, snapshot, tinynet_file, write_image_folder

# a supernet trained on the whole width space (no window around one budget): what serves any budget
# channel bins: on this 8-channel network FLOPs bins leave two or three widths a group, too few for a
# Pareto front of several points
ANY_BUDGET = dict(method="bcnet", supernet_epochs=1, finetune_epochs=1, batch_size=32, effort=0.05, bins=10,
                  divisor=1, progress=False, supernet_window=None, supernet_sampling="window", binning="channels")


def tiny(seed=0, width=8):
    torch.manual_seed(seed)
    return TinyNet(width=width)


def same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def data():
    return quadrant_data(256), quadrant_data(64, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    first = cz.compress(tiny(), "flops<=50%", *data(), out_dir=str(out), **ANY_BUDGET)
    return first, out


def test_two_budgets_from_one_supernet_equal_two_compress_runs(trained):
    first, out = trained
    model = tiny()
    before = snapshot(model)
    results = search_trained(str(out), model, ["flops<=50%", "flops<=30%"], *data(), progress=False)
    assert_unchanged(model, before)
    assert list(results) == ["flops<=50%", "flops<=30%"]
    separate = cz.compress(tiny(), "flops<=30%", *data(), **ANY_BUDGET)  # its own supernet, trained again
    for reference, got in [(first, results["flops<=50%"]), (separate, results["flops<=30%"])]:
        assert got.widths == reference.widths and got.side == reference.side
        assert same_model(got.model, reference.model)
        assert got.result == {k: v for k, v in reference.result.items() if k != "latency_ms"} | \
            {"latency_ms": got.result["latency_ms"]}  # CPU timings differ run to run
    assert first.widths != separate.widths  # two budgets, two models: the comparison above means something
    for budget, folder in [("flops<=50%", "budget-flops50pct"), ("flops<=30%", "budget-flops30pct")]:
        got, report = results[budget], json.loads((out / folder / "report.json").read_text())
        # no supernet stage: the supernet was loaded, not trained
        assert "supernet_s" not in got.timings and "search_s" in got.timings and "finetune_s" in got.timings
        assert report["supernet"] == {"trained": False, "from": str(out / "supernet.pt"), "steps": 0,
                                      "trained_for": "flops<=50%"}
        assert report["budget"] == budget and report["widths"] == got.widths and report["meets_budget"]
        assert sorted(os.listdir(out / folder)) == ["model.pt", "pareto.png", "report.json"]
        loaded = cz.load_slim(str(out / folder / "model.pt"), trust_source=True).eval()
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(loaded(x), got.model.eval()(x))
    assert "prepare_s" not in results["flops<=30%"].timings  # the budgets shared one prepare stage
    report = json.loads((out / "report.json").read_text())
    assert report["supernet"]["trained"] and report["supernet"]["steps"] > 0 and "supernet_s" in first.timings


def test_supernet_pt_is_data_only(trained):
    _, out = trained
    saved = torch.load(out / "supernet.pt", weights_only=True)  # no pickled code
    assert saved["method"] == "bcnet" and saved["budget"] == "flops<=50%" and saved["window"] is None
    assert saved["config"]["bins"] == 10 and len(saved["space"]["groups"]) == 3 and len(saved["records"]) > 0
    assert set(saved["identity"]) == {"architecture", "weights", "data"}
    assert saved["supernet"].keys() == saved["before"].keys() == tiny().state_dict().keys()


def test_the_trained_budget_with_a_budget_window_reproduces_compress(tmp_path):
    """The default supernet is trained around the budget's anchor: searched again for that budget it
    gives compress()'s model exactly (anchors and the weights before training are kept too)."""
    options = dict(ANY_BUDGET, supernet_window=0.8, supernet_sampling="anchored", finetune_epochs=0)
    first = cz.compress(tiny(), "flops<=50%", *data(), out_dir=str(tmp_path), **options)
    again = search_trained(str(tmp_path), tiny(), "flops<=50%", *data(), progress=False)["flops<=50%"]
    assert again.widths == first.widths and same_model(again.model, first.model)


@pytest.mark.parametrize("model, train, options, message", [
    (lambda: tiny(seed=1), None, {}, "the supernet of another run: the model weights differ"),
    (lambda: tiny(width=16), None, {}, "another run: the model architecture, the model weights differ"),
    (tiny, lambda: quadrant_data(256, seed=2), {}, "another run: the training data differ"),
    (tiny, None, {"lr": 0.5}, r"trained with lr=0.01, not lr=0.5: these options define the trained supernet"),
])
def test_another_model_data_or_training_is_refused(trained, model, train, options, message):
    _, out = trained
    before = set(os.listdir(out))
    with pytest.raises(cz.ConfigError, match=message):
        search_trained(str(out), model(), ["flops<=40%"], train() if train else quadrant_data(256), progress=False,
                       **options)
    assert set(os.listdir(out)) == before  # refused before any folder is written


def test_bad_requests_fail_before_any_work(trained, tmp_path):
    _, out = trained
    with pytest.raises(cz.ConfigError, match="target='ort-cpu' names the target of latency budgets"):
        search_trained(str(out), tiny(), ["flops<=40%"], quadrant_data(256), target="ort-cpu")
    with pytest.raises(cz.ConfigError, match="repeat one budget"):
        search_trained(str(out), tiny(), ["flops<=40%", "flops<=40.0%"], quadrant_data(256))
    with pytest.raises(cz.ConfigError, match="another width space .*example_input"):
        search_trained(str(out), tiny(), ["flops<=40%"], quadrant_data(256), example_input=torch.randn(1, 3, 32, 32),
                       progress=False)
    with pytest.raises(cz.ConfigError, match="trained with bins=10, not bins=8"):
        search_trained(str(out), tiny(), ["flops<=40%"], quadrant_data(256), bins=8, effort=0.5)
    (tmp_path / "supernet.pt").write_bytes(b"half a file")
    with pytest.raises(cz.ConfigError, match="supernet.pt is not readable.*compress\\(\\) again"):
        search_trained(str(tmp_path), tiny(), ["flops<=40%"], quadrant_data(256))


def test_a_folder_without_a_supernet_is_refused(tmp_path, caplog):
    """A recon run trains no supernet; run over a bcnet run's folder, it removes that supernet.pt (not its own)
    and says that the models searched from it are left as they are."""
    cz.compress(tiny(), "flops<=50%", quadrant_data(256), out_dir=str(tmp_path), **dict(ANY_BUDGET, finetune_epochs=0))
    assert (tmp_path / "supernet.pt").exists()
    search_trained(str(tmp_path), tiny(), ["flops<=40%"], quadrant_data(256), finetune_epochs=0, progress=False)
    cz.compress(tiny(), "flops<=50%", quadrant_data(256), out_dir=str(tmp_path),
                **dict(ANY_BUDGET, method="recon", finetune_epochs=0))
    assert not (tmp_path / "supernet.pt").exists() and (tmp_path / "budget-flops40pct" / "model.pt").exists()
    assert "models searched from an earlier run's supernet.pt (budget-flops40pct)" in caplog.text
    with pytest.raises(cz.ConfigError, match="holds no trained supernet .*method 'recon', which trains no supernet.*"
                                             "method='bcnet'"):
        search_trained(str(tmp_path), tiny(), ["flops<=40%"], quadrant_data(256))
    with pytest.raises(cz.ConfigError, match="is not a folder"):
        search_trained(str(tmp_path / "absent"), tiny(), ["flops<=40%"], quadrant_data(256))


def test_one_latency_table_serves_every_budget_on_its_target(tmp_path):
    """The latency measurements of the trained run are kept in supernet.pt and restored into an empty
    cache: the two budgets on torch-cpu measure no layer again (the cache file stays what was saved).
    The limits are loose: what is tested is the reuse, not the machine's speed."""
    options = dict(ANY_BUDGET, finetune_epochs=0, bins=4, divisor=4)
    plan = dict(points=2, calibration=4)
    cz.compress(tiny(), "flops<=60%,latency<=50ms@torch-cpu", quadrant_data(256), out_dir=str(tmp_path / "out"),
                latency_options=dict(cache_dir=str(tmp_path / "cache"), **plan), **options)
    saved = torch.load(tmp_path / "out" / "supernet.pt", weights_only=True)["latency"]["torch-cpu"]
    results = search_trained(str(tmp_path / "out"), tiny(), ["flops<=60%,latency<=50ms", "flops<=80%,latency<=60ms"],
                             quadrant_data(256), target="torch-cpu", progress=False,
                             latency_options=dict(cache_dir=str(tmp_path / "fresh"), **plan))
    with open(tmp_path / "fresh" / saved["file"]) as f:
        assert json.load(f) == saved["data"]  # nothing measured again
    first, second = results.values()
    assert "latency_model_s" in first.timings and "latency_model_s" not in second.timings  # built once
    assert first.original["latency"] == second.original["latency"]
    assert all(r.search["latency_attempts"] and r.meets_budget() for r in results.values())


def test_cli_search(tmp_path):
    write_image_folder(tmp_path / "data" / "train", quadrant_data(256))
    torch.save(tiny().state_dict(), tmp_path / "weights.pt")  # the pretrained weights, given to both commands
    cli = [sys.executable, "-m", "compressor.cli", "-q"]
    model = ["--model", tinynet_file(tmp_path), "--weights", str(tmp_path / "weights.pt"), "--data",
             str(tmp_path / "data"), "--image-size", "16"]
    run = subprocess.run(cli + ["compress", *model, "--budget", "flops<=50%", "--out", str(tmp_path / "out"),
                                "--supernet-epochs", "1", "--finetune-epochs", "0", "--batch-size", "32", "--effort",
                                "0.05", "--method", "bcnet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    search = cli + ["search", *model, "--from", str(tmp_path / "out"), "--budget", "flops<=40%", "--budget",
                    "flops<=60%", "--finetune-epochs", "0"]
    run = subprocess.run(search, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert list(summary) == ["flops<=40%", "flops<=60%"]
    for budget, folder in [("flops<=40%", "budget-flops40pct"), ("flops<=60%", "budget-flops60pct")]:
        assert summary[budget]["result"]["flops"] <= summary[budget]["limits"]["flops"]
        assert summary[budget]["paths"]["model"] == str(tmp_path / "out" / folder / "model.pt")
        assert json.loads((tmp_path / "out" / folder / "report.json").read_text())["supernet"]["trained"] is False
    run = subprocess.run(search[:-4] + ["--effort", "0.05", "--image-size", "32"], capture_output=True, text=True)
    assert run.returncode == 2 and "the training data differ" in run.stderr and "--image-size" in run.stderr
    run = subprocess.run(cli + ["search", *model[:2], *model[4:], "--from", str(tmp_path / "out"), "--budget",
                                "flops<=40%"], capture_output=True, text=True)  # without --weights: other weights
    assert run.returncode == 2 and "the model weights differ" in run.stderr and "--weights" in run.stderr
    run = subprocess.run(cli + ["search", *model, "--from", str(tmp_path / "data"), "--budget", "flops<=40%"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "holds no trained supernet" in run.stderr


def test_weights_before_training_are_needed_to_inherit_them(tmp_path):
    cz.compress(tiny(), "flops<=50%", quadrant_data(256), out_dir=str(tmp_path),
                **dict(ANY_BUDGET, finetune_epochs=0, inherit="supernet"))
    assert torch.load(tmp_path / "supernet.pt", weights_only=True)["before"] is None
    with pytest.raises(cz.ConfigError, match="inherit='original' needs the weights before supernet training.*"
                                             "search with inherit='supernet'"):
        search_trained(str(tmp_path), tiny(), ["flops<=40%"], quadrant_data(256), inherit="original")
    assert not any(f.startswith("budget-") for f in os.listdir(tmp_path))


# -- the Pareto front of one trained supernet, and a point of it delivered -------------------------------------------
def covers(point, candidate):
    """`point` dominates or equals `candidate` (score up, FLOPs down)."""
    return point["score"] >= candidate[0] and point["flops"] <= candidate[1]


def test_pareto_front_then_a_picked_point(trained):
    """pareto_front: a non-dominated front from cheap to expensive that covers every scored candidate,
    written as front.json and front.png; pick_point: that point's widths, slimmed and fine-tuned,
    with exactly the point's measured FLOPs and params, in pareto/point-K/ as a budget run's folder."""
    _, out = trained
    model = tiny()
    before = snapshot(model)
    found = cz.pareto_front(str(out), model, *data(), metric="flops", effort=0.1, progress=False)
    assert_unchanged(model, before)
    front = found.front
    assert found.metric == "flops" and len(front) >= 3
    for a in front:
        assert not any(covers(b, (a["score"], a["flops"])) and (b["score"], b["flops"]) != (a["score"], a["flops"])
                       for b in front)  # no point dominates another
    candidates = [((e.score_left + e.score_right) / 2, e.flops) for e in found.history]
    assert all(any(covers(p, c) for p in front) for c in candidates)
    assert front[0]["flops"] == min(c for _, c in candidates) and front[-1]["score"] == max(s for s, _ in candidates)
    assert front[-1]["flops"] > 3 * front[0]["flops"]  # cheap to expensive
    doc = json.loads((out / "pareto" / "front.json").read_text())
    assert doc["metric"] == "flops" and doc["front"] == front and len(doc["evaluated"]) == len(found.history)
    assert doc["supernet"]["file"] == str(out / "supernet.pt")
    assert (out / "pareto" / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert found.paths == {"front": str(out / "pareto" / "front.json"), "plot": str(out / "pareto" / "front.png")}

    k = len(front) // 2
    got = cz.pick_point(str(out), model, k, *data(), finetune_epochs=0, progress=False)
    assert_unchanged(model, before)
    assert got.widths == front[k]["widths"] and got.side == front[k]["side"]
    assert got.result["flops"] == front[k]["flops"] == cz.measure_flops(got.model, torch.randn(1, 3, 16, 16))
    assert got.result["params"] == front[k]["params"] and got.meets_budget()
    folder = out / "pareto" / f"point-{k}"
    assert sorted(os.listdir(folder)) == ["model.pt", "pareto.png", "report.json"]
    report = json.loads((folder / "report.json").read_text())
    assert report["supernet"]["pareto_point"] == k and report["widths"] == front[k]["widths"]
    loaded = cz.load_slim(str(folder / "model.pt"), trust_source=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), got.model.eval()(x))


def test_pareto_requests_are_checked_before_any_work(trained, tmp_path):
    _, out = trained
    with pytest.raises(cz.ConfigError, match="unknown Pareto metric 'macs': use one of 'flops', 'params', 'latency'"):
        cz.pareto_front(str(out), tiny(), quadrant_data(256), metric="macs")
    with pytest.raises(cz.ConfigError, match="a latency axis needs its target.*target='ort-cpu'"):
        cz.pareto_front(str(out), tiny(), quadrant_data(256), metric="latency")
    with pytest.raises(cz.ConfigError, match="holds no trained supernet .*method='bcnet'"):
        cz.pareto_front(str(tmp_path), tiny(), quadrant_data(256))
    with pytest.raises(cz.ConfigError, match="the supernet of another run: the model weights differ"):
        cz.pareto_front(str(out), tiny(seed=1), quadrant_data(256), progress=False)
    # a supernet.pt without a front, then a front of another supernet.pt
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "supernet.pt").write_bytes((out / "supernet.pt").read_bytes())
    with pytest.raises(cz.ConfigError, match=r"holds no Pareto front \(pareto/front.json\): run the Pareto search "
                                             r"first.*--pareto flops"):
        cz.pick_point(str(tmp_path / "copy"), tiny(), 0, quadrant_data(256))
    if not (out / "pareto" / "front.json").exists():
        cz.pareto_front(str(out), tiny(), *data(), effort=0.05, progress=False)
    n = len(json.loads((out / "pareto" / "front.json").read_text())["front"])
    with pytest.raises(cz.ConfigError, match=f"pick {n}: the Pareto front in .* has {n} points, 0 \\(cheapest\\) to "
                                             f"{n - 1}"):
        cz.pick_point(str(out), tiny(), n, quadrant_data(256))
    (tmp_path / "copy" / "pareto").mkdir()
    doc = json.loads((out / "pareto" / "front.json").read_text())
    doc["supernet"]["sha256"] = "0" * 64
    (tmp_path / "copy" / "pareto" / "front.json").write_text(json.dumps(doc))
    with pytest.raises(cz.ConfigError, match="searched on another supernet.pt .*run the Pareto search first"):
        cz.pick_point(str(tmp_path / "copy"), tiny(), 0, quadrant_data(256))


def test_cli_pareto_then_pick(tmp_path):
    write_image_folder(tmp_path / "data" / "train", quadrant_data(256))
    torch.save(tiny().state_dict(), tmp_path / "weights.pt")
    cli = [sys.executable, "-m", "compressor.cli", "-q"]
    model = ["--model", tinynet_file(tmp_path), "--weights", str(tmp_path / "weights.pt"), "--data",
             str(tmp_path / "data"), "--image-size", "16"]
    out = tmp_path / "out"
    run = subprocess.run(cli + ["compress", *model, "--budget", "flops<=50%", "--out", str(out), "--supernet-epochs",
                                "1", "--finetune-epochs", "0", "--batch-size", "32", "--effort", "0.05", "--method",
                                "bcnet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    search = cli + ["search", *model, "--from", str(out)]
    run = subprocess.run(search + ["--pareto", "params", "--limit", "80%", "--effort", "0.1"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    doc = json.loads((out / "pareto" / "front.json").read_text())
    rows = run.stdout.splitlines()
    assert rows[0].split()[:3] == ["pick", "score", "side"] and len(rows) == len(doc["front"]) + 2
    assert f"wrote {out / 'pareto' / 'front.json'}" in rows[-1] and (out / "pareto" / "front.png").exists()
    assert doc["metric"] == "params" and all(p["params"] <= doc["limit"] for p in doc["front"])
    last = len(doc["front"]) - 1
    assert rows[1 + last].split()[0] == str(last) and rows[1 + last].split()[1] == f"{doc['front'][-1]['score']:.4f}"
    run = subprocess.run(search + ["--pick", str(last), "--finetune-epochs", "0"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)[f"pick {last}"]
    point = doc["front"][last]
    assert summary["widths"] == point["widths"] and summary["result"]["params"] == point["params"]
    assert summary["result"]["flops"] == point["flops"]
    assert summary["paths"]["model"] == str(out / "pareto" / f"point-{last}" / "model.pt")
    for flags, message in [(["--pick", str(last + 1)], f"the Pareto front in .* has {last + 1} points"),
                           (["--pareto", "flops", "--budget", "flops<=40%"], "takes one of --budget.*not --budget and "
                                                                              "--pareto"),
                           ([], "takes one of --budget"),
                           (["--budget", "flops<=40%", "--limit", "50%"], "--limit bounds the cost axis of --pareto"),
                           (["--pareto", "latency"], "a latency axis needs its target")]:
        run = subprocess.run(search + flags, capture_output=True, text=True)
        assert run.returncode == 2 and re.search(message, run.stderr), (flags, run.stderr)
    run = subprocess.run(search + ["--pareto", "macs"], capture_output=True, text=True)
    assert run.returncode == 2 and "invalid choice: 'macs'" in run.stderr


@pytest.mark.parametrize("method", ["mctnas", "cafenet"])
def test_another_supernet_method_serves_another_budget(tmp_path, method):
    """MCT-NAS and CafeNet keep their supernet like BCNet; searched again (MCT-NAS from the seeds: the
    training tree is not kept; CafeNet over placements again), it meets the new budget without
    training."""
    options = dict(ANY_BUDGET, method=method)
    cz.compress(tiny(), "flops<=50%", *data(), out_dir=str(tmp_path), **options)
    result = search_trained(str(tmp_path), tiny(), ["flops<=40%"], *data(), progress=False)["flops<=40%"]
    assert result.method == method and result.supernet["trained"] is False and result.supernet["steps"] == 0
    assert result.meets_budget() and "supernet_s" not in result.timings
