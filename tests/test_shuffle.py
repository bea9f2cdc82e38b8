"""Shuffled streams (compressor.shuffle): the channels ShuffleNetV2 passes between its blocks through
cat, channel shuffle and chunk are one width variable per stage, slimmed with parity and exact cost,
in the order the slim network's own shuffles need."""
import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import compressor as cz
from compressor.errors import UnsupportedModelError
from compressor.layers import kind_of
from compressor.placement import encode
from compressor.slim import freeze_unsliceable, kept_indices
from conftest import assert_unchanged, quadrant_data, snapshot, with_real_statistics
from test_reshapes import parity_and_cost


@pytest.fixture(scope="module")
def shufflenet():
    torch.manual_seed(0)
    model = with_real_statistics(torchvision.models.shufflenet_v2_x0_5(weights=None))
    example = torch.randn(1, 3, 64, 64)
    return model, example, cz.analyze(model, example, map_shuffles=True)


def streams_of(space):
    return [g for g, group in enumerate(space.groups) if group.stream is not None]


def test_streams_stay_frozen_unless_asked_for():
    """By default (measured: worse delivered networks with mapped streams on a CIFAR-10 ShuffleNetV2,
    README) the shuffled stream keeps its width, and the reason names the option that maps it."""
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None).eval()
    space = cz.analyze(model, torch.randn(1, 3, 64, 64))
    assert not streams_of(space) and len(space) == 18
    reasons = [r for r in space.frozen.values() if "as a channel shuffle does" in r]
    assert reasons and all("map_shuffles=True" in r for r in reasons)
    with pytest.raises(cz.ConfigError, match="map_shuffles must be True or False"):
        cz.analyze(model, torch.randn(1, 3, 64, 64), map_shuffles="yes")


def test_each_stage_is_one_stream_slimmed_with_parity_and_exact_cost(shufflenet):
    """Before: the stream between blocks was frozen (22 frozen groups). Now each stage's stream is
    a width variable whose members are its producers (every block's last branch conv and batch
    norm), the readers (the next block's branch convs, the next stage's depthwise convs, conv5), and
    only the classifier stays fixed. Both BCNet sides and a CafeNet placement slim with parity."""
    model, example, space = shufflenet
    before = snapshot(model)
    streams = streams_of(space)
    assert [space.groups[g].size for g in streams] == [24, 48, 96]
    assert list(space.frozen) == ["fc"]
    stage2 = space.groups[streams[0]]
    members = {m.module for m in stage2.members}
    assert {"stage2.0.branch1.2", "stage2.3.branch2.5", "stage2.1.branch2.0", "stage3.0.branch1.0",
            "stage3.0.branch2.0"} <= members
    for g in streams:
        widths = space.groups[g].stream.widths
        assert widths[-1] == space.groups[g].size and len(widths) >= 8
    configs = [space.random(seed=s) for s in range(3)]
    assert all(any(space.channels(c)[g] < space.groups[g].size for c in configs) for g in streams)
    assert parity_and_cost(model, space, example, configs) <= 1e-4
    # a placement with free channels in every group: the streams keep their left window
    cfg = configs[0]
    widths = space.channels(cfg)
    free = [(k,) if k < n else () for k, n in zip(widths, space.sizes)]
    placement = encode(free, widths)
    small = cz.slim(model, space, cfg, placement)  # parity checked inside
    assert cz.measure_flops(small, example) == space.flops(cfg)
    assert_unchanged(model, before)


def test_the_slim_network_needs_its_channels_in_the_wiring_order(shufflenet):
    """Keeping the right channels in ascending order is not enough: a kept channel must sit where
    the slim network's shuffles send it to the same layers as in the full one. The arrangement
    reorders them; the same channels in ascending order compute something else."""
    model, example, space = shufflenet
    g = streams_of(space)[1]  # stage 3: 8 blocks, the deepest shuffling
    cfg = list(space.max())
    cfg[g] = int(space.levels(g)[len(space.levels(g)) // 2])
    keeps = kept_indices(space, model, cfg, "left")
    assert any(not np.all(np.diff(keep) > 0) for keep in keeps.values())
    good = cz.slim(model, space, cfg, "left")
    ascending = copy.deepcopy(model)
    for (name, role), keep in keeps.items():
        module = ascending.get_submodule(name)
        kind_of(module).select(module, role, torch.from_numpy(np.sort(keep)))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        y, y_good, y_sorted = model(x), good.eval()(x), ascending.eval()(x)
        masked = cz.supernet(model, space).set(cfg, "left").eval()(x)
    scale = masked.abs().max()
    assert (y_good - masked).abs().max() / scale < 1e-4
    assert (y_sorted - masked).abs().max() / scale > 1e-2
    assert not torch.allclose(y, masked)  # the narrowed stream changes the function


def _channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ThreeWayUnit(nn.Module):
    """A ShuffleNet-v1-like unit: three branch convs (each on a third of the input, or on all of it),
    concatenated and shuffled in three groups."""

    def __init__(self, cin, width, split):
        super().__init__()
        self.split = split
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin // 3 if split else cin, width, 3, padding=1, bias=False),
                          nn.BatchNorm2d(width), nn.ReLU()) for _ in range(3))

    def forward(self, x):
        parts = x.chunk(3, 1) if self.split else (x, x, x)
        return _channel_shuffle(torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1), 3)


class _ThreeWayNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.units = nn.Sequential(_ThreeWayUnit(16, 12, False), _ThreeWayUnit(36, 12, True),
                                   _ThreeWayUnit(36, 12, True), _ThreeWayUnit(36, 12, True))
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


def test_a_three_way_shuffle_is_mapped_too():
    """The probe reads the wiring from the model's own forward, so a shuffle in three groups with
    chunk(3) maps as well: each unit's three convs are one stream read by the next unit's convs."""
    torch.manual_seed(0)
    model = with_real_statistics(_ThreeWayNet(), size=16)
    example = torch.randn(1, 3, 16, 16)
    space = freeze_unsliceable(model, cz.analyze(model, example, divisor=1, map_shuffles=True))
    streams = streams_of(space)
    assert [space.groups[g].name for g in streams] == ["units.0.convs.0.0", "units.1.convs.0.0", "units.2.convs.0.0"]
    configs = [space.random(seed=s) for s in range(4)]
    assert any(space.channels(c)[g] < 12 for c in configs for g in streams)
    assert parity_and_cost(model, space, example, configs) <= 1e-4


class _MixedStream(nn.Module):
    """Three-way units whose first stream is added to the stem's output before the next unit."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 36, 3, padding=1), nn.BatchNorm2d(36), nn.ReLU())
        self.u0, self.u1, self.u2 = _ThreeWayUnit(36, 12, False), _ThreeWayUnit(36, 12, True), _ThreeWayUnit(36, 12, True)
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        stem = self.stem(x)
        y = self.u1(self.u0(stem) + stem)
        return self.fc(self.u2(y).mean((2, 3)))


def test_a_stream_mixed_into_an_add_stays_frozen_with_the_reason():
    """u0's shuffled channels are added to the stem's before u1 reads them: which of them may go
    depends on the stem too, so they keep their width (a NaN probe finds the add) and analyze says
    why; u1's stream, read whole by u2, still maps."""
    torch.manual_seed(0)
    model = with_real_statistics(_MixedStream(), size=16)
    example = torch.randn(1, 3, 16, 16)
    space = freeze_unsliceable(model, cz.analyze(model, example, divisor=1, map_shuffles=True))
    assert [space.groups[g].name for g in streams_of(space)] == ["u1.convs.0.0"]
    assert "as a channel shuffle does" in space.frozen["u0.convs.2.0"]
    assert "map_shuffles=True" in space.frozen["u0.convs.2.0"]
    assert parity_and_cost(model, space, example, [space.random(seed=s) for s in range(2)]) <= 1e-4


def test_compress_delivers_a_shufflenet_with_a_narrower_stream():
    """compress() end to end (BCNet: both sides trained, searched, reconstructed, fine-tuned): the
    budget is met, the reported FLOPs are the delivered model's, and the streams are narrower."""
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=4).eval()
    before = snapshot(model)
    result = cz.compress(model, "flops<=50%", quadrant_data(192, size=32), method="bcnet", map_shuffles=True,
                         supernet_epochs=0.2,
                         finetune_epochs=0, batch_size=32, effort=0.02, seed=0)
    assert result.meets_budget()
    small = result.model.eval()
    assert cz.measure_flops(small, torch.randn(1, 3, 32, 32)) == result.result["flops"]
    widths = [small.get_submodule(f"stage{s}.0.branch1.2").out_channels for s in (2, 3, 4)]
    assert all(w <= n for w, n in zip(widths, (24, 48, 96))) and widths != [24, 48, 96]
    assert_unchanged(model, before)


def test_broadening_refuses_a_shuffled_stream_before_training():
    """BS-NAS widens groups above their original width; a stream's wiring depends on its width, so
    compress refuses up front, naming the stream and the fix."""
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=4).eval()
    with pytest.raises(UnsupportedModelError, match="shuffled stream .*broaden=1"):
        cz.compress(model, "flops<=50%", quadrant_data(64, size=32), method="bsnas", map_shuffles=True,
                    supernet_epochs=0.2,
                    finetune_epochs=0, batch_size=32, effort=0.02, seed=0)
