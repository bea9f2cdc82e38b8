"""Supernet training on a real (small) network and data: learning, fairness, exact resume after
SIGKILL, DDP under torchrun, bad input."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import compressor as cz
from compressor.samplers import BCNetSampler, SandwichSampler
from compressor.train import CHECKPOINT, TrainingDivergedError, _check_writable
from conftest import TinyNet, quadrant_data, torchrun

TESTS = os.path.dirname(os.path.abspath(__file__))
X = torch.randn(1, 3, 16, 16)


def tiny(bins=8, divisor=1, seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    return model, cz.analyze(model, X, bins=bins, divisor=divisor)


def accuracy(model, data, calibration):
    """Top-1 at full width after re-estimating BN statistics (they are a mix of subnets')."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(calibration.tensors[0])
        model.eval()
        x, y = data.tensors
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("method", ["bcnet", "ua"])
def test_training_learns_and_records(method):
    model, space = tiny()
    data = quadrant_data(512)
    net = cz.supernet(model, space)
    result = cz.train_supernet(net, data, method=method, epochs=3, batch_size=32, lr=0.1, progress=False)
    assert result.steps == 48
    assert accuracy(model, quadrant_data(256, seed=1), data) > 0.9  # the shared weights learned the task
    losses = [r[0] for r in result.records]
    assert 0 < len(result.records) <= 100 and losses == sorted(losses)
    sides = {r[2] for r in result.records}
    assert sides == ({"left", "right"} if method == "bcnet" else {"left"})
    assert all(len(r[1]) == len(space) for r in result.records)
    assert net.cfg is None  # back at full width


def channel_counts(sampler, space, steps):
    counts = [np.zeros(n, dtype=int) for n in space.sizes]
    for _ in range(steps):
        for cfg, side, _ in sampler.next():
            for g, (start, k) in enumerate(space.windows(cfg, side)):
                counts[g][start:start + k] += 1
    return counts


def test_bcnet_trains_every_channel_equally():
    _, space = tiny(bins=8, divisor=1)  # group sizes 16, 32: every bin is a whole number of channels
    counts = channel_counts(BCNetSampler(space, seed=3), space, steps=400)
    for c in counts:
        assert c.min() == c.max() > 0  # exactly equal: complementary pairs cover each channel twice
    pair = channel_counts(BCNetSampler(space, seed=4), space, steps=2)
    assert all((c == pair[0][0]).all() for c in pair[:1])


def test_ua_favours_the_first_channels():
    _, space = tiny(bins=8, divisor=1)
    for c in channel_counts(SandwichSampler(space, seed=3), space, steps=400):
        assert c[0] > c[len(c) // 2] > c[-1]
        assert (np.diff(c) <= 0).all()  # never increasing with the channel index


def test_complement_rule():
    _, space = tiny(bins=8)
    sampler = BCNetSampler(space)
    assert sampler.complement((3, 8, 5)) == (5, 8, 3)  # N - c, and a full group stays full
    first, second = sampler.next(), sampler.next()
    assert second[0][0] == sampler.complement(first[0][0])


def cifar_resnet_space():
    from compressor.cifar import resnet20
    return cz.analyze(resnet20(), torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("budget", ["flops<=50%", "flops<=30%,params<=60%"])
def test_a_training_window_draws_only_subnets_near_the_budget(budget):
    from compressor.samplers import TrainingWindow
    from compressor.search import constraints
    space = cifar_resnet_space()
    bounds = constraints(space, budget)
    window = TrainingWindow(bounds[0].cost, lambda c: np.logical_and.reduce([b.ok(c) for b in bounds]),
                            0.8 * bounds[0].limit)
    bcnet = [cfg for _ in range(60) for cfg, _, _ in BCNetSampler(space, seed=1, window=window).next()]
    sandwich = SandwichSampler(space, seed=1, window=window)
    ua = [cfg for _ in range(30) for cfg, _, _ in sandwich.next()[2:]]  # the largest and the smallest stay
    for drawn in (bcnet, ua):
        assert all(window.contains(np.array([c]))[0] for c in drawn)
    plain = [BCNetSampler(space, seed=1).next()[0][0] for _ in range(60)]
    assert not all(window.contains(np.array([c]))[0] for c in plain)  # the window is a real restriction


def test_a_window_too_narrow_to_hit_trains_the_costliest_feasible_draw():
    from compressor.samplers import TrainingWindow
    from compressor.search import constraints
    space = cifar_resnet_space()
    bound = constraints(space, "flops<=50%")[0]
    window = TrainingWindow(bound.cost, bound.ok, 0.999999 * bound.limit)
    cfg = BCNetSampler(space, seed=0, window=window).random_cfg()
    assert bound.ok(np.array([cfg]))[0] and bound.cost(np.array([cfg]))[0] > 0.8 * bound.limit


RUN_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
import compressor as cz
from conftest import TinyNet, quadrant_data

class Slow(torch.utils.data.Dataset):  # slow enough for the parent to kill us mid-run
    def __init__(self, data): self.data = data
    def __len__(self): return len(self.data)
    def __getitem__(self, i):
        time.sleep({delay})
        x, y = self.data[i]
        return x + 0.1 * torch.randn_like(x), y  # augmentation noise from the global RNG

torch.manual_seed(0)
model = TinyNet()
space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1)
net = cz.supernet(model, space)
result = cz.train_supernet(net, Slow(quadrant_data(256)), method="bcnet", steps=24, batch_size=16,
                           checkpoint_dir=sys.argv[1], checkpoint_every=4, progress=False)
torch.save({{"state": model.state_dict(), "records": result.records}}, sys.argv[2])
"""


def test_sigkill_then_resume_gives_the_same_result(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(tests=TESTS, delay=0.004))
    ref_out, out = tmp_path / "ref.pt", tmp_path / "out.pt"
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), str(ref_out)], check=True)

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(out)])
    ckpt = run_dir / CHECKPOINT
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it was killed: the test proves nothing"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 24
    subprocess.run([sys.executable, str(script), str(run_dir), str(out)], check=True)

    ref, got = torch.load(ref_out, weights_only=True), torch.load(out, weights_only=True)
    assert got["records"] == ref["records"]
    for k, v in ref["state"].items():
        assert torch.equal(got["state"][k], v), k


DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
import compressor as cz
from compressor import samplers
from conftest import TinyNet, quadrant_data

dist.init_process_group("gloo")
rank = dist.get_rank()
seen = []
original_set = cz.Supernet.set
def recording_set(self, cfg, side="left"):
    seen.append((tuple(cfg), side))
    return original_set(self, cfg, side)
cz.Supernet.set = recording_set  # record what each rank trains (the real method still runs)

torch.manual_seed(0)
model = TinyNet()
space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1)
net = cz.supernet(model, space)
cz.train_supernet(net, quadrant_data(256), method="bcnet", steps=6, batch_size=16, seed=rank,
                  progress=False)  # different seeds: configurations must still come from rank 0
torch.save({{"state": model.state_dict(), "seen": seen}}, os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
dist.destroy_process_group()
"""


def test_ddp_two_processes_train_the_same_configurations(tmp_path):
    torchrun(tmp_path, DDP_SCRIPT, 29517)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(r0["seen"]) >= 12 and r0["seen"] == r1["seen"]
    assert len({c for c, _ in r0["seen"]}) > 2
    for k, v in r0["state"].items():  # gradients were averaged: identical weights on both ranks
        assert torch.allclose(r1["state"][k], v, atol=1e-6), k


def test_empty_and_mislabelled_data():
    model, space = tiny()
    net = cz.supernet(model, space)
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(cz.ConfigError, match="fewer than one batch"):
        cz.train_supernet(net, empty, steps=1, progress=False)
    x, y = quadrant_data(64).tensors
    with pytest.raises(cz.ConfigError, match="label 7 is outside the model's 4 classes"):
        cz.train_supernet(net, torch.utils.data.TensorDataset(x, y + 4), steps=1, batch_size=32, progress=False)
    with pytest.raises(cz.ConfigError, match="integer class"):
        cz.train_supernet(net, torch.utils.data.TensorDataset(x, y.float()), steps=1, batch_size=32, progress=False)
    with pytest.raises(cz.ConfigError, match="unknown method"):
        cz.train_supernet(net, quadrant_data(64), method="fair", steps=1, progress=False)
    with pytest.raises(cz.ConfigError, match="exactly one"):
        cz.train_supernet(net, quadrant_data(64), progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, space = tiny()
    net = cz.supernet(model, space)

    class PoisonedAfter(torch.utils.data.Dataset):
        """Real samples for the first 5 batches, then NaN images."""
        def __init__(self):
            self.data, self.calls = quadrant_data(256), 0

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            self.calls += 1
            x, y = self.data[i]
            return (x if self.calls <= 5 * 16 else torch.full_like(x, float("nan"))), y

    data = PoisonedAfter()
    with pytest.raises(TrainingDivergedError, match="last good checkpoint"):
        cz.train_supernet(net, data, steps=16, batch_size=16, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                          progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert 0 < state["step"] < 16
    assert all(torch.isfinite(v).all() for v in state["net"].values() if v.is_floating_point())


def test_unwritable_or_full_output_folder_fails_before_training(tmp_path):
    model, space = tiny()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(cz.ConfigError, match="cannot write checkpoints"):
        cz.train_supernet(cz.supernet(model, space), quadrant_data(64), steps=2, batch_size=16,
                          checkpoint_dir=str(blocker / "sub"), progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing trained
    with pytest.raises(cz.ConfigError, match="MB free"):
        _check_writable(str(tmp_path), needed_bytes=1 << 62)


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path):
    def train(seed=0, data=None, lr=0.01, restart=False, width=16):
        torch.manual_seed(seed)
        model = TinyNet(width=width)
        net = cz.supernet(model, cz.analyze(model, X, bins=8, divisor=1))
        cz.train_supernet(net, data or quadrant_data(64), steps=2, batch_size=16, lr=lr, checkpoint_dir=str(tmp_path),
                          restart=restart, progress=False)
        return model

    first = train()
    leftover = tmp_path / f".{CHECKPOINT}.0123abcd.tmp"  # what a kill inside atomic_torch_save leaves
    leftover.write_bytes(b"half a checkpoint")
    for kwargs, differ in [({"seed": 1}, "the model weights differ"),
                           ({"width": 8}, "the model architecture, the model weights differ"),
                           ({"data": quadrant_data(64, seed=5)}, "the training data differ"),
                           ({"lr": 0.1}, r"lr \(0.01 then, 0.1 now\) differ")]:
        with pytest.raises(cz.ConfigError, match=f"checkpoint of another run: {differ}.*restart=True"):
            train(**kwargs)
    assert not leftover.exists()  # cleaned on the next start
    again = train()  # the same run resumes at its last step: the same weights, 0 steps
    assert all(torch.equal(again.state_dict()[k], v) for k, v in first.state_dict().items())
    other = train(lr=0.1, restart=True)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["run"]["lr"] == 0.1
    assert not all(torch.equal(other.state_dict()[k], v) for k, v in first.state_dict().items())
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(cz.ConfigError, match="not a readable checkpoint.*restart=True"):
        train()


def test_data_identity_ignores_random_augmentation_and_keeps_the_rng():
    from compressor.run_identity import data_hash

    class Augmented(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            x, y = self.data[i]
            return x + torch.randn_like(x), y

    data = Augmented(quadrant_data(64))
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    assert data_hash(data) == data_hash(data) != data_hash(Augmented(quadrant_data(64, seed=1)))
    assert torch.equal(torch.rand(1), expected)  # the caller's random stream is untouched
