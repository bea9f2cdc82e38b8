"""SWP (stage-wise pruning): the stage split of real ResNets, the stage loss as the distance to the
full network's stage output (checked against the physically slimmed network), the sandwich each
step trains, a stage scored independently of the other stages' widths, the per-stage candidate
counts against the whole space's, the budget, the options, compress(), the CLI and DDP."""
import dataclasses
import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F
import torchvision

import compressor as cz
from compressor.cifar import resnet20
from compressor.finetune import loader
from compressor.losses import kd
from compressor.methods import get_method
from compressor.methods.swp import SWPOptions, stage_losses, training_forward, _full_network
from compressor.stages import find_stages, relative_distance, space_size
from conftest import DDP_TINYNET, TinyNet, quadrant_data, tiny_compress_cli, torchrun

X32 = torch.randn(1, 3, 32, 32)


def cifar_net(bins=8, seed=0):
    torch.manual_seed(seed)
    model = resnet20().eval()
    return model, cz.analyze(model, X32, bins=bins, divisor=1)


def producers(space, g):
    return {name for name, role in space.groups[g].index if role == "out"}


def test_stages_end_where_the_resolution_drops_on_real_resnets():
    model, space = cifar_net()
    stages = find_stages(model, space)
    # CIFAR ResNet-20: 32x32 (stem + layer1), 16x16 (layer2), 8x8 (layer3, then the pooled head)
    assert stages.ends == ("layer1", "layer2")
    for s, groups in enumerate(stages.groups):
        for g in groups:  # each stage owns the groups its own blocks produce (the stem's is layer1's stream)
            assert all(n.startswith(f"layer{s + 1}.") or (s == 0 and n in ("conv1", "bn1"))
                       for n in producers(space, g)), (s, space.groups[g].name)
    assert sorted(g for groups in stages.groups for g in groups) == list(range(len(space)))

    # torchvision ResNet-18 at 64x64: the stem (32x32) produces layer1's stream, the head no group:
    # both merge, and the four 16..2-pixel stages remain
    resnet18 = torchvision.models.resnet18().eval()
    space18 = cz.analyze(resnet18, torch.randn(1, 3, 64, 64), bins=4)
    stages18 = find_stages(resnet18, space18)
    assert stages18.ends == ("layer1", "layer2", "layer3")
    assert [{n.split(".")[0] for g in groups for n in producers(space18, g)} - {"conv1", "bn1"}
            for groups in stages18.groups] == [{"layer1"}, {"layer2"}, {"layer3"}, {"layer4"}]


def test_stages_the_user_names():
    model, space = cifar_net()
    stages = find_stages(model, space, ["layer2"])
    assert stages.ends == ("layer2",) and [len(g) for g in stages.groups] == [8, 4]
    with pytest.raises(cz.ConfigError, match="'layer9', which is not a module the model runs"):
        find_stages(model, space, ["layer9"])
    with pytest.raises(cz.ConfigError, match="stage ending at 'conv1' owns no width group"):
        find_stages(model, space, ["conv1", "layer1"])  # conv1's channels are layer1's stream
    resnet18 = torchvision.models.resnet18()
    with pytest.raises(cz.ConfigError, match="'layer1.0.relu', which runs 2 times"):
        find_stages(resnet18, cz.analyze(resnet18, torch.randn(1, 3, 64, 64), bins=4), ["layer1.0.relu"])


def test_the_stage_loss_is_the_distance_to_the_full_networks_stage_output():
    model, space = cifar_net()
    net = cz.supernet(model, space).eval()
    run = training_forward(net, SWPOptions())
    x = torch.randn(4, 3, 32, 32)
    state = {}
    with torch.no_grad():
        full = run(net.full(), x, 0, state)
        run(net.set(space.max()), x, 1, state)
        assert [float(v) for v in state["stage_losses"]] == [0.0, 0.0]  # the full configuration: the full network

        cfg = space.random(3)
        out = run(net.set(cfg), x, 1, state)
        # the same from the physically slimmed network, each stage run on the full network's stage input
        small = cz.slim(model, space, cfg).eval()
        t1 = model.layer1(F.relu(model.bn1(model.conv1(x))))
        t2 = model.layer2(t1)
        a1, a2 = net.active_channels("layer1.0.bn2"), net.active_channels("layer2.0.bn2")
        own2 = torch.zeros_like(t2)
        own2[:, a2] = small.layer2(t1[:, a1])
        own1 = torch.zeros_like(t1)
        own1[:, a1] = small.layer1(F.relu(small.bn1(small.conv1(x))))
        logits = small.linear(torch.flatten(small.pool(small.layer3(t2[:, a2])), 1))
    losses = [float(v) for v in state["stage_losses"]]
    assert losses[0] == pytest.approx(float(relative_distance(own1, t1)), rel=1e-4)
    assert losses[1] == pytest.approx(float(relative_distance(own2, t2)), rel=1e-4)
    assert min(losses) > 0
    torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-5)  # the last stage: on the full network's input
    loss = get_method("swp").loss(1, out, None, {**state, "largest": full})
    assert float(loss) == pytest.approx(sum(losses) + float(kd(out, full)), rel=1e-6)


def test_every_step_trains_the_full_network_the_smallest_and_random_ones():
    torch.manual_seed(0)
    model = TinyNet()
    space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1)
    net = cz.supernet(model, space)
    trained_cfgs = []
    set_cfg = net.set

    def recording_set(cfg, side="left"):  # what each step trains (the real set still runs)
        trained_cfgs.append((tuple(cfg), side))
        return set_cfg(cfg, side)

    net.set = recording_set
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cz.train_supernet(net, quadrant_data(64), method="swp", method_options={"n_random": 2}, steps=4, batch_size=16,
                      progress=False)
    steps = [trained_cfgs[i:i + 4] for i in range(0, len(trained_cfgs), 4)]
    assert len(steps) == 4 and all(side == "left" for step in steps for _, side in step)
    assert all(step[0][0] == space.max() and step[1][0] == space.min() for step in steps)
    randoms = [cfg for step in steps for cfg, _ in step[2:]]
    assert len(set(randoms)) > 4 and not set(randoms) & {space.max(), space.min()}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_stage_is_scored_without_the_other_stages_widths():
    model, space = cifar_net()
    net = cz.supernet(model, space)
    data = loader(torch.utils.data.TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), 16)
    teacher = _full_network(net, data, 2)
    stages = find_stages(net.model, space)
    inner2 = next(g for g in stages.groups[1] if space.groups[g].name == "layer2.1.conv1")
    a = list(space.random(1))
    b = list(a)
    b[inner2] = 1 if a[inner2] != 1 else 8  # only a block inside stage 2 changes width
    la, lb = (stage_losses(net, teacher, stages, cfg, data, data, calib_batches=2) for cfg in (a, b))
    assert la[0] == lb[0] and la[2] == lb[2]  # stages 1 and 3: the same losses, bit for bit
    assert la[1] != lb[1]


def test_each_stage_ranks_far_fewer_candidates_than_the_whole_space():
    model = resnet20()
    space = cz.analyze(model, X32, divisor="auto")  # compress's defaults: 20 bins, divisor "auto"
    sizes = find_stages(model, space).sizes(space)
    whole = space_size(space)
    assert math.prod(sizes) == whole  # the stages split the space: their product is the whole
    assert sum(sizes) * 1000 < whole
    print(f"per-stage candidates {sizes} (sum {sum(sizes)}) vs the whole space {whole}")


def test_search_meets_the_budget_and_ranks_stage_parts():
    torch.manual_seed(0)
    model = TinyNet()
    space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1)
    net = cz.supernet(model, space)
    cz.train_supernet(net, quadrant_data(128), method="swp", steps=8, batch_size=16, lr=0.05, progress=False)
    calib, held_out = loader(quadrant_data(64, seed=1), 16), loader(quadrant_data(64, seed=2), 16)
    found = get_method("swp").searcher(net, "flops<=50%", calib, held_out, options=SWPOptions(candidates=12),
                                       calib_batches=2, seeds=[space.uniform(0.5)], progress=False)
    small = cz.slim(model, space, found.cfg, found.side)
    assert cz.measure_flops(small, torch.randn(1, 3, 16, 16)) == space.flops(found.cfg) <= found.limits["flops"]
    report = found.stages
    assert report["probes"] == 12 and report["whole_space"] == space_size(space) == 8 ** 3
    assert all(0 < n <= size for n, size in zip(report["scored"], report["stage_space"]))
    assert sum(report["stage_space"]) < report["whole_space"]
    assert [f["cfg"] for f in found.finalists][-1] == list(space.uniform(0.5))  # the seed is a finalist
    assert found.score == max(f["fitness"] for f in found.finalists)


def test_options_are_validated():
    spec = get_method("swp")
    assert spec.parse_options({"stages": "layer1, layer2"}).stages == ("layer1", "layer2")
    for bad, message in (({"n_random": -1}, "swp option n_random must be an integer >= 0, got -1"),
                         ({"stages": [3]}, "swp option stages must be module names"),
                         ({"stages": []}, "swp option stages must be module names"),
                         ({"candidates": 0}, "swp option candidates must be a positive integer or None, got 0"),
                         ({"finalists": 1.5}, "swp option finalists must be a positive integer, got 1.5")):
        with pytest.raises(cz.ConfigError, match=message):
            spec.parse_options(bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SWPOptions().n_random = 3


def test_compress_with_swp_meets_the_budget():
    torch.manual_seed(0)
    result = cz.compress(TinyNet(), "flops<=50%", quadrant_data(256), method="swp",
                         method_options={"candidates": 8, "finalists": 2}, supernet_epochs=0.5, finetune_epochs=0,
                         batch_size=16, bins=8, divisor=1, calib_batches=2, progress=False)
    assert result.method == "swp" and result.meets_budget() and result.side == "left"
    assert result.search["stages"]["probes"] == 8
    assert math.isnan(result.search["score_alternate"])
    # score_original: the finalists are scored on the weights before supernet training too
    torch.manual_seed(0)
    both = cz.compress(TinyNet(), "flops<=50%", quadrant_data(256), method="swp",
                       method_options={"candidates": 8, "finalists": 2}, supernet_epochs=0.5, finetune_epochs=0,
                       batch_size=16, bins=8, divisor=1, calib_batches=2, score_original=True, progress=False)
    assert both.meets_budget() and not math.isnan(both.search["score_alternate"])
    assert both.search["score"] == max(both.search["score_left"], both.search["score_alternate"])


def test_cli_compress_with_swp(tmp_path):
    cli = tiny_compress_cli(tmp_path, "swp")
    run = subprocess.run(cli + ["--method-option", "candidates=6", "--method-option", "stages=stem"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["result"]["flops"] <= summary["limits"]["flops"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "swp" and report["meets_budget"]
    assert report["search"]["stages"]["ends"] == ["stem"] and report["search"]["stages"]["probes"] == 6
    bad = subprocess.run(cli + ["--method-option", "n_random=-1"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "swp option n_random must be an integer >= 0, got -1" in bad.stderr


DDP_SCRIPT = DDP_TINYNET + """
from compressor.finetune import loader
from compressor.methods import get_method
from compressor.methods.swp import SWPOptions
net = cz.supernet(model, space)
cz.train_supernet(net, quadrant_data(256), method="swp", steps=6, batch_size=16, seed=rank,
                  progress=False)  # different seeds and shards: the configurations come from rank 0
calib, held_out = loader(quadrant_data(64, seed=1), 16), loader(quadrant_data(64, seed=2), 16)
found = get_method("swp").searcher(net, "flops<=50%", calib, held_out, options=SWPOptions(candidates=6),
                                   calib_batches=2, progress=False)
torch.save({{"state": model.state_dict(), "cfg": list(found.cfg), "score": found.score}},
           os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
dist.destroy_process_group()
"""


def test_ddp_ranks_train_and_choose_the_same(tmp_path):
    torchrun(tmp_path, DDP_SCRIPT, 29563)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["cfg"] == r1["cfg"] and r0["score"] == r1["score"]
    for k, v in r0["state"].items():  # gradients were averaged: identical weights on both ranks
        assert torch.allclose(r1["state"][k], v, atol=1e-6), k
