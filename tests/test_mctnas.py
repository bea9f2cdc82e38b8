"""MCT-NAS as a method (compressor/methods/mctnas.py, mcts.TreeSampler): the training tree learns from
the losses where the steps should go, keeps to the training window, survives a checkpoint, agrees
across DDP ranks, and seeds the search; compress() and the CLI run it end to end."""
import collections
import functools
import json
import subprocess

import numpy as np
import pytest
import torch

import compressor as cz
from compressor.mcts import TreeSampler
from compressor.methods import get_method
from compressor.methods.mctnas import MCTNASOptions, warm_seeds
from compressor.samplers import TrainingWindow
from compressor.search import constraints, feasible
from conftest import DDP_TINYNET, TinyNet, quadrant_data, tiny_compress_cli, torchrun

TARGET = (3, 6, 2)  # the widths whose synthetic training loss is lowest


def tiny_space():
    return cz.analyze(TinyNet(), torch.randn(1, 3, 16, 16), bins=8, divisor=1)


def loss_of(cfg, step, steps):
    """A training loss that grows with the distance of each width from TARGET and falls as training
    goes on (as a real one does: the reward must not favour what late steps drew)."""
    return (1.0 + 0.1 * sum(abs(c - t) for c, t in zip(cfg, TARGET))) * (2.0 - step / steps)


def train(sampler, steps, start=0, total=None):
    """Run `steps` steps of the sampler with loss_of as the losses; the configurations drawn."""
    drawn = []
    for step in range(start, start + steps):
        subnets = sampler.next()
        cfg = subnets[0][0]
        sampler.observe([(loss_of(cfg, step, total or steps), c, side) for c, side, _ in subnets])
        drawn.append(cfg)
    return drawn


def window(space, budget="flops<=60%", low=0.8):
    bounds = constraints(space, budget)
    return TrainingWindow(cost=bounds[0].cost, feasible=functools.partial(feasible, bounds), low=low * bounds[0].limit)


def test_the_steps_concentrate_on_the_widths_of_lower_loss():
    space = tiny_space()
    sampler = TreeSampler(space, seed=0)
    drawn = train(sampler, 400)
    late = collections.Counter(drawn[300:])
    assert late.most_common(1)[0][0] == TARGET
    # within one width of TARGET in every group: 27 of the 512 configurations (5 %) under uniform draws
    near = sum(n for cfg, n in late.items() if all(abs(c - t) <= 1 for c, t in zip(cfg, TARGET)))
    assert near >= 70
    visits = {c: sampler.tree.visits[(c,)] for c in sampler.tree.children(())}
    assert max(visits, key=visits.get) == TARGET[0]
    # without a signal in the losses (all equal), nothing concentrates like that
    flat = TreeSampler(space, seed=0)
    for _ in range(400):
        subnets = flat.next()
        flat.observe([(1.0, c, side) for c, side, _ in subnets])
    assert max(flat.tree.visits[(c,)] for c in flat.tree.children(())) < 0.3 * 400


def test_every_draw_is_inside_the_training_window():
    space = tiny_space()
    for low in (0.8, 0.97):  # 0.97: a band so narrow that some prefixes have no candidate in it
        w = window(space, low=low)
        sampler = TreeSampler(space, seed=1, window=w)
        drawn = train(sampler, 120)
        assert w.contains(np.array(drawn)).all(), f"a draw outside the window [{low}, 1] x the limit"
        assert len(set(drawn)) > 3
    assert sampler.tree.dead, "the narrow band should have met a dead end: the test would prove less"


def test_tree_statistics_survive_a_checkpoint_round_trip(tmp_path):
    space = tiny_space()
    w = window(space)
    sampler = TreeSampler(space, seed=2, window=w)
    train(sampler, 60, total=100)
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    restored = TreeSampler(space, seed=99, window=w)  # another seed: everything must come from the state
    restored.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    assert restored.tree.state_dict() == sampler.tree.state_dict() and restored.baseline == sampler.baseline
    assert train(restored, 40, start=60, total=100) == train(sampler, 40, start=60, total=100)
    # the tree decides the draws: the same generator state with a fresh tree draws otherwise
    fresh = TreeSampler(space, seed=2, window=w)
    fresh.load_state_dict(dict(torch.load(tmp_path / "sampler.pt", weights_only=True),
                               tree=TreeSampler(space, window=w).tree.state_dict()))
    assert train(fresh, 40, start=60, total=100) != train(restored, 40, start=100, total=140)
    other = cz.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2)),
                       torch.randn(1, 3, 8, 8), bins=4, divisor=1)
    with pytest.raises(cz.ConfigError, match="another search space"):
        TreeSampler(other).load_state_dict(sampler.state_dict())


def test_the_training_tree_seeds_the_search_with_its_best_configurations_in_the_budget():
    space = tiny_space()
    sampler = TreeSampler(space, seed=0)
    train(sampler, 400)
    assert warm_seeds(sampler.tree, space, "flops<=100%", 3)[0] == TARGET
    cheap = warm_seeds(sampler.tree, space, "flops<=20%", 3)  # TARGET costs 24 %
    assert cheap and TARGET not in cheap and feasible(constraints(space, "flops<=20%"), np.array(cheap)).all()
    assert warm_seeds(sampler.tree, space, "flops<=100%", 0) == []


def test_options_are_validated_with_the_fix_named():
    spec = get_method("mctnas")
    assert spec.parse_options({"exploration": 0.2, "queries": 7}) == MCTNASOptions(exploration=0.2, queries=7)
    for bad, message in (({"exploration": -1}, "mctnas option exploration must be a finite number >= 0, got -1"),
                         ({"sharing": float("nan")}, "mctnas option sharing must be a finite number"),
                         ({"queries": 0}, "mctnas option queries must be a positive integer or None, got 0"),
                         ({"warm": -2}, "mctnas option warm must be an integer >= 0, got -2")):
        with pytest.raises(cz.ConfigError, match=message):
            spec.parse_options(bad)


def test_compress_with_mctnas_meets_the_budget_and_scores_its_queries():
    torch.manual_seed(0)
    result = cz.compress(TinyNet(), "flops<=50%", quadrant_data(256), method="mctnas", method_options={"queries": 6},
                         supernet_epochs=0.5, finetune_epochs=0, batch_size=16, bins=8, divisor=1, progress=False)
    assert result.method == "mctnas" and result.meets_budget() and result.side in ("left", "right")
    assert len(result.search["history"]) == 6  # the queries option reached the tree search


DDP_SCRIPT = DDP_TINYNET + """
trained = cz.train_supernet(cz.supernet(model, space), quadrant_data(256), method="mctnas", steps=6, batch_size=16,
                            seed=rank, progress=False)  # different seeds and shards: the trees must still agree
torch.save(trained.sampler.tree.state_dict(), os.path.join(sys.argv[1], f"tree{{rank}}.pt"))
dist.destroy_process_group()
"""


def test_ddp_ranks_keep_the_same_tree(tmp_path):
    torchrun(tmp_path, DDP_SCRIPT, 29518)
    t0, t1 = (torch.load(tmp_path / f"tree{r}.pt", weights_only=True) for r in (0, 1))
    assert sum(v for n, v in zip(t0["nodes"], t0["visits"]) if not n) == 6
    assert t0 == t1


def test_cli_compress_with_mctnas(tmp_path):
    cli = tiny_compress_cli(tmp_path, "mctnas")
    run = subprocess.run(cli + ["--method-option", "queries=4"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["result"]["flops"] <= summary["limits"]["flops"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "mctnas" and report["meets_budget"] and len(report["search"]["history"]) == 4
    bad = subprocess.run(cli + ["--method-option", "exploration=-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "mctnas option exploration must be a finite number >= 0, got -1" in bad.stderr
