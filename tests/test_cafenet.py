"""CafeNet's mechanism (METHOD section 8): placements of free channels that the supernet runs and
slim() removes exactly, min-min training that trains the lowest-loss placement, FLOPs-sensitive
bins, and the delivered placement being what gets slimmed."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import compressor as cz
from compressor import placement
from compressor.methods import get_method
from compressor.finetune import loader
from compressor.search import same_draws, score
from compressor.methods.cafenet import (CafeNetOptions, CafeNetSampler, placement_search, placements_of,
                                       search_placements)
from compressor.train import _epoch_batches, lowest_loss
from conftest import DDP_TINYNET, TinyNet, quadrant_data, tiny_compress_cli, tinynet_file, torchrun, with_real_statistics


def random_placements(space, cfg, count, free=1.0, seed=0):
    return [p for p in placements_of(space, cfg, CafeNetOptions(free=free, placements=count + 1),
                                     torch.Generator().manual_seed(seed)) if p != "left"]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_the_supernet_runs_any_placement_and_slims_exactly_to_it(name):
    torch.manual_seed(0)
    model = with_real_statistics(getattr(torchvision.models, name)(num_classes=10), size=32)
    x = torch.randn(4, 3, 32, 32)
    space = cz.analyze(model, x[:1], bins=8, divisor=1)
    net = cz.supernet(model, space).eval()
    cfg = space.random(3)
    with torch.no_grad():
        left = net.set(cfg, "left")(x)
    sides = random_placements(space, cfg, 3)
    assert len(sides) == 3
    for side in sides:
        small = cz.slim(model, space, cfg, side).eval()  # slim's own parity check runs too
        kept = space.positions(cfg, side)
        assert [len(p) for p in kept] == space.channels(cfg)  # a placement keeps the width
        with torch.no_grad():
            y_net, y_small = net.set(cfg, side)(x), small(x)
        assert float((y_net - y_small).abs().max() / y_small.abs().max()) <= 1e-4
        assert float((left - y_net).abs().max() / left.abs().max()) > 1e-3  # another network than the left one
        # the slim model holds exactly the placement's channels: the first conv's rows
        first = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
        group = next(g for g, grp in enumerate(space.groups) if (first, "out") in grp.index)
        rows = space.groups[group].index[(first, "out")][kept[group]].ravel()
        assert torch.equal(small.get_submodule(first).weight, model.get_submodule(first).weight[rows])


def test_placements_are_checked_against_their_zone():
    model = TinyNet()
    space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1)
    cfg = (4, 4, 4)
    widths = space.channels(cfg)
    assert placement.encode([range(k - 1, k) for k in widths], widths) == "left"  # the left window is "left"
    zone_end = widths[0] + 1
    inside = placement.encode([(zone_end - 1,), (), ()], widths)
    assert inside.startswith("free:") and space.positions(cfg, inside)[0][-1] == zone_end - 1
    for bad, message in ((f"free:{widths[0] + 5}||", "not 1 distinct positions in its zone"),
                         ("free:1|2", "names 2 groups, the width space has 3"),
                         ("free:a||", "malformed"),
                         ("middle", "unknown side 'middle'")):
        with pytest.raises(cz.ConfigError, match=message):
            space.positions(cfg, bad)


def test_min_min_trains_the_placement_with_the_lowest_loss():
    """A case where the loss depends on the placement: the left window's free channels of the stem are
    made harmful, so the left placement loses; the trainer's first step trains exactly the placement
    lowest_loss picks on that batch, and the probes leave the BN statistics alone."""
    torch.manual_seed(0)
    model = TinyNet()
    space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1)
    options = CafeNetOptions(free=1.0, placements=4)
    data = quadrant_data(64)
    x, y = next(_epoch_batches(data, 16, 0, None, 0, 0, 0, 1, 0))
    subnets = CafeNetSampler(space, 0, options).next()
    cfg = subnets[0][0]
    assert [s for _, s, _ in subnets][0] == "left" and len(subnets) == 4
    k = space.channels(cfg)[0]
    r = int(placement.free_counts(space.sizes, space.bins, options.free)[0])
    with torch.no_grad():  # the left window's free channels of the stem: huge, so the left placement is worst
        model.stem[0].weight[k - r:k] *= 50

    net = cz.supernet(model, space).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for c, side, _ in subnets:
        with torch.no_grad():
            losses.append(float(torch.nn.functional.cross_entropy(net.set(c, side)(x), y, label_smoothing=0.1)))
        model.load_state_dict(before)
    assert len(set(losses)) == len(losses) and int(np.argmax(losses)) == 0  # the placement matters; left worst
    picked = lowest_loss(net, subnets, lambda m: torch.nn.functional.cross_entropy(m(x), y, label_smoothing=0.1))
    assert picked == subnets[int(np.argmin(losses))]
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key  # probes are no training step

    trained = cz.train_supernet(net, data, method="cafenet", method_options=options, steps=1, batch_size=16,
                                progress=False)
    assert [(c, s) for _, c, s in trained.records] == [(picked[0], picked[1])]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_flops_bins_give_every_width_step_about_the_same_flops(name):
    """Tolerance (stated): every step of a group with at least 3 widths lies within 25 % of the common
    step plus the FLOPs of one channel of that group (widths are whole channels); channel bins on the
    same model spread their steps several times wider. Each group keeps about span / step widths (at
    least 2), so the space shrinks."""
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    by = {b: cz.analyze(model, x, bins=20, divisor=1, binning=b) for b in ("channels", "flops")}
    space = by["flops"]
    full = float(space.cost.flops(space.sizes))
    spans = np.array([full - float(space.cost.flops(np.where(np.arange(len(space)) == g, 0, space.sizes)))
                      for g in range(len(space))])
    unit = spans.max() / space.bins  # the costliest group keeps every bin

    def steps(s, g):
        widths = np.unique(s.width_table[g, 1:])
        cfgs = np.tile(s.sizes, (len(widths), 1))
        cfgs[:, g] = widths
        return np.diff(np.asarray(s.cost.flops(cfgs), dtype=np.float64)), len(widths)

    ratios = {}
    for binning, s in by.items():
        every = np.concatenate([steps(s, g)[0] for g in range(len(s))])
        ratios[binning] = every.max() / every.min()
    counts = []
    for g in range(len(space)):
        step, count = steps(space, g)
        counts.append(count)
        channel = spans[g] / space.sizes[g]
        if count >= 3:
            assert np.all(np.abs(step - unit) <= 0.25 * unit + channel), (g, step / unit)
        expected = spans[g] / unit
        assert count == 2 if expected < 1.5 else abs(count - expected) <= 0.5 + channel / unit, (g, count, expected)
    assert ratios["flops"] * 2 < ratios["channels"], ratios
    assert space.size() == int(np.prod(counts, dtype=object)) < by["channels"].size()
    assert min(counts) < space.bins == max(counts)  # cheap groups got coarser bins


def test_binning_is_an_option_of_analyze_compress_and_the_cli(tmp_path):
    with pytest.raises(cz.ConfigError, match="unknown binning 'fine'"):
        cz.analyze(TinyNet(), torch.randn(1, 3, 16, 16), binning="fine")
    with pytest.raises(cz.ConfigError, match="unknown binning 'fine'"):
        cz.compress(TinyNet(), "flops<=50%", quadrant_data(64), binning="fine", progress=False)
    run = subprocess.run([sys.executable, "-m", "compressor.cli", "analyze", "--model", tinynet_file(tmp_path),
                          "--image-size", "16", "--binning", "flops", "--bins", "8"], capture_output=True, text=True)
    assert run.returncode == 0 and "groups" in run.stdout, run.stderr


def test_options_are_validated_with_the_option_named():
    spec = get_method("cafenet")
    assert spec.parse_options({"free": 1.0, "placements": 2}) == CafeNetOptions(free=1.0, placements=2)
    for bad, message in (({"free": 0}, "cafenet option free must be a number in"),
                         ({"free": "half"}, "cafenet option free"),
                         ({"placements": 0}, "cafenet option placements must be an integer >= 1, got 0"),
                         ({"placements": True}, "cafenet option placements")):
        with pytest.raises(cz.ConfigError, match=message):
            spec.parse_options(bad)


def test_a_width_scores_as_its_best_placement():
    torch.manual_seed(0)
    model = with_real_statistics(TinyNet(), size=16)
    space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1)
    net = cz.supernet(model, space)
    options = CafeNetOptions(free=1.0, placements=3)
    calib, held_out = loader(quadrant_data(64, seed=1), 16), loader(quadrant_data(64, seed=2), 16)
    found = placement_search(net, "flops<=60%", calib, held_out, options=options, effort=0.02, calib_batches=2,
                             sides=("left",), progress=False, metric="loss", seed=3)

    def placement_scores(cfg):
        return [same_draws(score, net, cfg, side, held_out, calib, calib_batches=2, metric="loss")
                for side in search_placements(space, cfg, options, 3)]

    scores = placement_scores(found.cfg)
    assert len(set(scores)) == 3  # three placements, three different networks
    assert found.score_left == max(scores)
    assert found.side == search_placements(space, found.cfg, options, 3)[int(np.argmax(scores))]
    first = found.history[0]  # another candidate: its left score is its best placement's too
    assert first.score_left == max(placement_scores(first.cfg))


def test_compress_delivers_and_slims_the_best_placement(tmp_path):
    """End to end with an out_dir: the report, the saved model and the ONNX file carry the placement, and the
    delivered model's weights are the trained supernet's at exactly the placement's channels."""
    torch.manual_seed(0)
    out = tmp_path / "out"
    result = cz.compress(TinyNet(), "flops<=50%", quadrant_data(256), method="cafenet",
                         method_options={"free": 1.0, "placements": 4}, supernet_epochs=0.5, finetune_epochs=0,
                         batch_size=16, bins=8, divisor=1, inherit="supernet", reconstruct="none",
                         binning="flops", export=["onnx"], out_dir=str(out), progress=False)
    assert result.meets_budget() and result.method == "cafenet"
    assert placement.is_placement(result.side), "the search's best placement was the left window: pick a case " \
                                                "where it is not, or the test proves nothing"
    report = json.loads((out / "report.json").read_text())
    assert report["side"] == result.side and report["search"]["side"] == result.side
    assert cz.load_slim(str(out / "model.pt"), trust_source=True).compressor_info["side"] == result.side
    import onnx
    metadata = {p.key: p.value for p in onnx.load(result.paths["onnx"]).metadata_props}
    assert metadata["side"] == result.side

    saved = torch.load(out / "supernet.pt", weights_only=True)
    ordered = TinyNet()
    ordered.load_state_dict(saved["supernet"])
    space = cz.analyze(ordered, torch.randn(1, 3, 16, 16), bins=8, divisor=1, binning="flops")
    expected = cz.slim(ordered, space, result.widths, result.side, check=False)
    left = cz.slim(ordered, space, result.widths, "left", check=False)
    params = dict(result.model.named_parameters())
    for name, p in expected.named_parameters():
        assert torch.equal(params[name], p), name
    assert any(not torch.equal(params[n], p) for n, p in left.named_parameters())  # not the left window's


def test_cli_compress_with_cafenet(tmp_path):
    cli = tiny_compress_cli(tmp_path, "cafenet") + ["--binning", "flops"]
    run = subprocess.run(cli + ["--method-option", "placements=2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "cafenet" and report["meets_budget"]
    assert report["side"] == "left" or placement.is_placement(report["side"])
    bad = subprocess.run(cli + ["--method-option", "free=-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cafenet option free must be a number in (0, 4]" in bad.stderr


DDP_SCRIPT = DDP_TINYNET + """
trained = cz.train_supernet(cz.supernet(model, space), quadrant_data(256), method="cafenet",
                            method_options={{"free": 1.0}}, steps=6, batch_size=16, seed=rank,
                            progress=False)  # different seeds and shards: placements and picks must agree
torch.save({{"state": model.state_dict(), "records": trained.records}}, os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
dist.destroy_process_group()
"""


def test_ddp_ranks_train_the_same_placements(tmp_path):
    torchrun(tmp_path, DDP_SCRIPT, 29519)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    sides = [s for _, _, s in r0["records"]]
    assert len(sides) == 6 and any(placement.is_placement(s) for s in sides)
    # each rank records its own shard's losses (so their order may differ): the same subnets
    assert sorted((c, s) for _, c, s in r0["records"]) == sorted((c, s) for _, c, s in r1["records"])
    for k, v in r0["state"].items():  # the same subnet each step, gradients averaged: the same weights
        assert torch.allclose(r1["state"][k], v, atol=1e-6), k
