"""BS-NAS (compressor/broaden.py, compressor/shrink.py, compressor/methods/bsnas.py): broadening keeps
the pretrained function on real networks and lets a budget at the original cost move channels between
layers, slimmed at the exact cost; shrinking only ever removes widths, at the scheduled points, never
a group's last (narrowest) one, never draws a switched-off width again (also after a resume, and
under DDP on every rank alike), and the search runs on what remains; compress() and the CLI run it."""
import functools
import json
import subprocess

import numpy as np
import pytest
import torch
import torchvision

import compressor as cz
from compressor.api import search_trained
from compressor.broaden import broaden
from compressor.finetune import loader
from compressor.methods import get_method
from compressor.methods.bsnas import BSNASOptions
from compressor.samplers import TrainingWindow
from compressor.search import constraints, feasible
from compressor.shrink import ShrinkingSampler
from conftest import DDP_TINYNET, TinyNet, assert_unchanged, quadrant_data, snapshot, tiny_compress_cli, torchrun, with_real_statistics

SIZE = 64  # input side for the torchvision networks: small, and every stride still leaves a pixel


@functools.lru_cache(maxsize=None)
def broadened(name):
    """(original model, its space, broadened copy, its space) of a torchvision network with BN
    statistics of order 1, so that output comparisons mean something."""
    torch.manual_seed(0)
    model = with_real_statistics(getattr(torchvision.models, name)(num_classes=10), size=SIZE)
    space = cz.analyze(model, torch.randn(1, 3, SIZE, SIZE))
    before = snapshot(model)
    wide, wide_space = broaden(model, space, 1.5)
    assert_unchanged(model, before)  # the user's model is not mutated
    return model, space, wide, wide_space


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_broadening_is_function_preserving(name):
    model, space, wide, wide_space = broadened(name)
    assert (wide_space.sizes > space.sizes).all() and (wide_space.original_sizes == space.sizes).all()
    assert wide_space.channels(wide_space.original()) == space.channels(space.max())
    x = torch.randn(4, 3, SIZE, SIZE)
    net = cz.supernet(wide, wide_space)
    with torch.no_grad():
        y = model(x)
        y_wide = wide(x)                     # every new channel on
        y_original = net.set(wide_space.original())(x)  # the original widths of the broadened supernet
    scale = y.abs().max()
    assert (y_wide - y).abs().max() <= 1e-5 * scale
    assert (y_original - y).abs().max() <= 1e-5 * scale
    # the new channels are real: they compute something (no zero filters), only nobody reads them yet
    net.full()
    first = wide_space.groups[0]
    module, role = next(key for key in first.index if key[1] == "out")
    produced = wide.get_submodule(module).weight[first.index[(module, role)][space.sizes[0]:].ravel()]
    assert produced.abs().sum() > 0
    # relative budgets stay relative to the original model
    flops = cz.measure_flops(model, x[:1])
    assert constraints(wide_space, "flops<=100%")[0].limit == flops == wide_space.flops(wide_space.original())
    assert wide_space.flops(wide_space.max()) > flops


def equal_cost_refinement(space):
    """A configuration at no more than the original FLOPs with the costliest group broadened to its
    widest: every other group one width narrower at a time, the one that saves most first."""
    limit = space.flops(space.original())
    big = int(np.argmax([space.flops(space.step(space.original(), np.eye(len(space), dtype=int)[g])[0]) for g in
                         range(len(space))]))
    cfg = np.array(space.original())
    cfg[big] = space.bins
    while space.flops(cfg) > limit:
        moves = -np.eye(len(space), dtype=int)
        moves[big] = 0
        narrower = space.step(np.repeat(cfg[None], len(space), 0), moves)
        cfg = narrower[np.argmin(space.flops(narrower))]
    return tuple(int(c) for c in cfg), big


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_a_broadened_configuration_at_the_original_flops_is_slimmable_with_exact_cost(name):
    model, space, wide, wide_space = broadened(name)
    cfg, big = equal_cost_refinement(wide_space)
    channels, original = np.array(wide_space.channels(cfg)), wide_space.original_sizes
    assert channels[big] > original[big] and (channels < original).any()  # channels moved between layers
    x = torch.randn(1, 3, SIZE, SIZE)
    small = cz.slim(wide, wide_space, cfg)  # checks its output against the supernet's (parity)
    assert cz.measure_flops(small, x) == wide_space.flops(cfg) <= cz.measure_flops(model, x)
    assert cz.count_params(small) == wide_space.params(cfg)


def tiny():
    """TinyNet's space (3 groups) broadened, 8 bins: 12 bins up to 1.5 x."""
    model = TinyNet()
    wide, space = broaden(model, cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1), 1.5)
    return wide, space


BAD = (0, 4)  # group 0's width at bin 4 trains badly (synthetic losses below)


def loss_of(space, cfg):
    """A loss that falls with the cost and is high wherever group BAD[0] is at bin BAD[1]."""
    return 2.0 - space.flops(cfg) / space.flops(space.max()) + (1.0 if cfg[BAD[0]] == BAD[1] else 0.0)


def run(sampler, steps):
    """The configurations `steps` steps draw, and the allowed bins before each step."""
    drawn, allowed = [], []
    for _ in range(steps):
        allowed.append(sampler.space.allowed.copy())
        subnets = sampler.next()
        drawn.append([cfg for cfg, _, _ in subnets])
        sampler.observe([(loss_of(sampler.base, cfg), cfg, side) for cfg, side, _ in subnets])
    return drawn, allowed


def test_shrinking_only_removes_widths_at_the_scheduled_points_and_never_draws_them_again():
    _, space = tiny()
    sampler = ShrinkingSampler(space, seed=0)
    sampler.schedule(40)
    assert sampler.points == (10, 20, 30)
    drawn, allowed = run(sampler, 40)
    changes = [step for step in range(1, 40) if not np.array_equal(allowed[step], allowed[step - 1])]
    assert changes == [10, 20, 30] == [h["step"] for h in sampler.history]
    for step in range(1, 40):
        assert not (allowed[step] & ~allowed[step - 1]).any()  # the space only shrinks
        for cfg in drawn[step]:
            assert allowed[step][np.arange(len(cfg)), cfg].all()  # nothing switched off is drawn
    final = sampler.space
    for g in range(len(space)):
        narrowest = space.levels(g)[0]
        assert final.allowed[g, narrowest]  # a group's narrowest (its last) width is never switched off
        assert final.levels(g).size < space.levels(g).size  # and every group did shrink
    # the width whose subnets train worst went first
    assert [BAD[0], int(space.width_table[BAD])] in sampler.history[0]["off"]
    # only widths the stage sampled are switched off, and never all of a group's sampled ones
    for start, shrink in zip((0, 10, 20), sampler.history):
        sampled = {(g, int(space.width_table[g, c])) for cfgs in drawn[start:shrink["step"]] for cfg in cfgs
                   for g, c in enumerate(cfg)}
        off = {tuple(o) for o in shrink["off"]}
        assert off <= sampled
        for g in range(len(space)):
            assert {w for h, w in sampled if h == g} - {w for h, w in off if h == g}


def test_switched_off_widths_stay_off_after_a_resume():
    _, space = tiny()
    ref = ShrinkingSampler(space, seed=3)
    ref.schedule(40)
    run(ref, 25)
    state = ref.state_dict()
    drawn_ref, _ = run(ref, 15)
    resumed = ShrinkingSampler(space, seed=99)  # another seed: everything must come from the state
    resumed.schedule(40)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.space.allowed, ref.base.shrunk(state["off"].numpy()).allowed)
    drawn, allowed = run(resumed, 15)
    assert drawn == drawn_ref and resumed.history == ref.history
    assert all(allowed[i][np.arange(len(c)), c].all() for i, step in enumerate(drawn) for c in step)


def test_draws_in_a_window_keep_to_the_allowed_widths_and_the_window():
    _, space = tiny()
    bounds = constraints(space, "flops<=80%")
    window = TrainingWindow(cost=bounds[0].cost, feasible=functools.partial(feasible, bounds),
                            low=0.7 * bounds[0].limit, anchors=(space.original(),))
    sampler = ShrinkingSampler(space, seed=0, window=window)
    sampler.schedule(40)
    drawn, allowed = run(sampler, 40)
    assert sampler.history and any(h["off"] for h in sampler.history)
    for step, cfgs in enumerate(drawn):
        cfgs = np.array(cfgs)
        assert allowed[step][np.arange(len(space)), cfgs].all()
        assert window.contains(cfgs).all()


def test_the_search_runs_on_the_shrunk_space():
    wide, space = tiny()
    net = cz.supernet(wide, space)
    spec = get_method("bsnas")
    trained = cz.train_supernet(net, quadrant_data(256), method="bsnas", steps=16, batch_size=16, progress=False)
    sampler = trained.sampler
    assert [h["step"] for h in sampler.history] == [4, 8, 12] and (~sampler.space.allowed & space.allowed).any()
    calib, held_out = (loader(quadrant_data(64, seed=s), 16) for s in (1, 2))
    found = spec.searcher(net, "flops<=100%", calib, held_out, records=trained.records, effort=0.1, calib_batches=2,
                          sides=spec.sides, progress=False, **spec.searcher_kwargs(spec.options(), sampler))
    scored = np.array([e.cfg for e in found.history])
    assert len(scored) > 5 and sampler.space.allows(scored).all()
    assert net.space is space  # the supernet keeps its whole space
    assert sampler.space.allows(found.cfg)[0] and space.flops(found.cfg) <= found.limits["flops"]


def test_compress_with_bsnas_delivers_an_exact_model_from_a_broadened_space(tmp_path):
    """And supernet.pt keeps the trained sampler: search_trained searches the space shrinking left,
    not the whole broadened one."""
    torch.manual_seed(0)
    model = TinyNet()
    before = snapshot(model)
    result = cz.compress(model, "flops<=100%", quadrant_data(256), method="bsnas", supernet_epochs=1,
                         finetune_epochs=0, batch_size=16, bins=8, divisor=1, progress=False, out_dir=str(tmp_path),
                         method_options={"shrink_fraction": 0.5})
    assert_unchanged(model, before)
    x = torch.randn(1, 3, 16, 16)
    assert result.method == "bsnas" and result.side == "left" and result.meets_budget()
    assert result.result["flops"] == cz.measure_flops(result.model, x) <= cz.measure_flops(model, x)
    assert result.result["params"] == cz.count_params(result.model)
    scored = np.array([e["cfg"] for e in result.search["history"]])
    assert len(scored) and scored.max() > 8  # the search scored widths above the original's (bin 8 of 8)
    saved = torch.load(tmp_path / "supernet.pt", weights_only=True)
    off = saved["sampler"]["off"].numpy()
    assert off.any()  # the training switched widths off
    torch.manual_seed(0)  # the same model again: measure_flops ran `model` in train mode (its BN statistics moved)
    again = search_trained(str(tmp_path), TinyNet(), "flops<=80%", quadrant_data(256), batch_size=16, bins=8, divisor=1,
                           method_options={"shrink_fraction": 0.5}, progress=False)["flops<=80%"]
    searched = np.array([e["cfg"] for e in again.search["history"]])
    assert len(searched) and not off[np.arange(off.shape[0]), searched].any()  # no switched-off width scored
    assert not off[np.arange(off.shape[0]), again.widths].any()
    torch.manual_seed(0)
    front = cz.pareto_front(str(tmp_path), TinyNet(), quadrant_data(256), batch_size=16, bins=8, divisor=1,
                            method_options={"shrink_fraction": 0.5}, effort=0.1, progress=False)
    fronted = np.array([e.cfg for e in front.history])
    assert len(fronted) and not off[np.arange(off.shape[0]), fronted].any()


def test_broaden_is_an_option_of_every_method_and_is_validated():
    torch.manual_seed(0)
    result = cz.compress(TinyNet(), "flops<=100%", quadrant_data(128), method="bcnet", broaden=1.25,
                         supernet_epochs=0.25, finetune_epochs=0, batch_size=16, bins=8, divisor=1, effort=0.05,
                         progress=False)
    assert result.meets_budget() and result.result["flops"] == cz.measure_flops(result.model, torch.randn(1, 3, 16, 16))
    for bad in (0.5, 4, "wide", True):
        with pytest.raises(cz.ConfigError, match="broaden must be a width ratio"):
            cz.compress(TinyNet(), "flops<=50%", quadrant_data(64), broaden=bad, progress=False)
    with pytest.raises(cz.ConfigError, match="broaden=1.01 adds no bin to a space of 8 bins"):
        cz.compress(TinyNet(), "flops<=50%", quadrant_data(64), broaden=1.01, bins=8, progress=False)
    with pytest.raises(cz.ConfigError, match="relative to the original model.*absolute limit"):
        cz.compress(TinyNet(), "latency<=50%@torch-cpu", quadrant_data(64), method="bsnas", progress=False)


def test_broadening_refuses_grouped_convolutions_by_name():
    model = torchvision.models.regnet_x_400mf(num_classes=10).eval()
    space = cz.analyze(model, torch.randn(1, 3, SIZE, SIZE))
    with pytest.raises(cz.UnsupportedModelError, match=r"grouped convolutions read or write \(trunk_output.*broaden=1"):
        broaden(model, space, 1.5)


@pytest.mark.parametrize("bad, message", [
    ({"subnets": 0}, "bsnas option subnets must be an integer >= 1, got 0"),
    ({"shrink_at": (0.5, 0.25)}, "bsnas option shrink_at must be increasing fractions"),
    ({"shrink_at": (0.5, 1.0)}, "bsnas option shrink_at must be increasing fractions"),
    ({"shrink_at": 0.5}, "bsnas option shrink_at must be increasing fractions"),
    ({"shrink_fraction": 1.0}, "bsnas option shrink_fraction must be a fraction"),
])
def test_bad_options_name_the_option(bad, message):
    with pytest.raises(cz.ConfigError, match=message):
        get_method("bsnas").parse_options(bad)


def test_options_reach_the_sampler():
    _, space = tiny()
    spec = get_method("bsnas")
    options = spec.parse_options({"subnets": 3, "shrink_at": [0.5], "shrink_fraction": 0.5})
    assert options == BSNASOptions(3, (0.5,), 0.5)
    sampler = spec.sampler(space, 0, options)
    sampler.schedule(10)
    assert len(sampler.next()) == 3 and sampler.points == (5,) and sampler.sides == ("left",)


DDP_SCRIPT = DDP_TINYNET + """
from compressor.broaden import broaden
model, space = broaden(model, space, 1.5)
trained = cz.train_supernet(cz.supernet(model, space), quadrant_data(256), method="bsnas", steps=8, batch_size=16,
                            seed=rank, progress=False)  # different seeds and shards: the shrinks must still agree
torch.save({{"off": torch.as_tensor(trained.sampler.off), "history": trained.sampler.history,
            "state": model.state_dict()}}, os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
dist.destroy_process_group()
"""


def test_ddp_ranks_shrink_alike(tmp_path):
    torchrun(tmp_path, DDP_SCRIPT, 29523)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert [h["step"] for h in r0["history"]] == [2, 4, 6] and r0["off"].any()
    assert r0["history"] == r1["history"] and torch.equal(r0["off"], r1["off"])
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k


def test_cli_compress_with_bsnas(tmp_path):
    cli = tiny_compress_cli(tmp_path, "bsnas", "flops<=100%") + ["--effort", "0.05"]
    done = subprocess.run(cli + ["--method-option", "shrink_at=[0.5]"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["result"]["flops"] <= summary["limits"]["flops"] == summary["original"]["flops"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "bsnas" and report["meets_budget"]
    bad = subprocess.run(cli + ["--broaden", "5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "broaden must be a width ratio in [1, 3]" in bad.stderr
