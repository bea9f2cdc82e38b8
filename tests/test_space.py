"""Channel groups, the width space and the exact cost model on real torchvision models."""
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import compressor as cz
from compressor.space import kept_channels
from conftest import assert_unchanged, snapshot

X = torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def space18(resnet18):
    return cz.analyze(resnet18, X)


def test_resnet18_groups(space18):
    # stem+layer1 residual stream, the three other stages' streams, and one inner group per block
    assert len(space18) == 12
    names = {g.name for g in space18.groups}
    assert "layer1.0.conv1" in names and "layer4.1.conv1" in names
    stream = next(g for g in space18.groups if any(m.module == "layer4.0.downsample.0" for m in g.members))
    roles = {(m.module, m.role) for m in stream.members}
    assert ("layer4.0.bn2", "out") in roles and ("layer4.1.conv1", "in") in roles and ("fc", "in") in roles
    assert stream.size == 512
    # the classifier's output is never a group
    assert "fc" in space18.frozen and "output" in space18.frozen["fc"]


def test_width_rule():
    assert kept_channels(20, 64, 20, 8) == 64
    assert kept_channels(10, 64, 20, 8) == 32
    assert kept_channels(1, 64, 20, 8) == 8           # never below the divisor
    assert kept_channels(19, 13, 20, 8) == 13         # never above the group size (16 > 13)
    assert kept_channels(20, 20, 20, 8) == 20         # the last bin is the original width
    assert kept_channels(7, 100, 20, 1) == 35         # divisor 1 disables alignment
    for c in range(1, 21):
        assert kept_channels(c, 512, 20, 8) % 8 == 0


def test_configurations(space18):
    assert space18.max() == (20,) * 12
    assert space18.channels(space18.max()) == [g.size for g in space18.groups]
    half = space18.uniform(0.5)
    assert half == (10,) * 12
    assert space18.channels(half) == [g.size // 2 for g in space18.groups]
    a, b = space18.random(seed=3), space18.random(seed=3)
    assert a == b and len(a) == 12 and all(1 <= c <= 20 for c in a)
    assert space18.random(seed=4) != a
    left, right = space18.windows(half, "left"), space18.windows(half, "right")
    assert left[0] == (0, space18.groups[0].size // 2)
    assert right[0] == (space18.groups[0].size // 2, space18.groups[0].size // 2)


def test_cost_matches_measurement_at_full_width(resnet18, space18):
    assert space18.flops(space18.max()) == cz.measure_flops(resnet18, X)
    assert space18.params(space18.max()) == cz.count_params(resnet18)
    assert space18.flops(space18.uniform(0.5)) < space18.flops(space18.max()) / 3


def test_cost_batch_equals_single(space18):
    rng = np.random.default_rng(0)
    cfgs = rng.integers(1, 21, size=(50, len(space18)))
    flops, params = space18.flops(cfgs), space18.params(cfgs)
    for cfg, f, p in zip(cfgs, flops, params):
        assert space18.flops(tuple(cfg)) == int(round(f))
        assert space18.params(tuple(cfg)) == int(round(p))


def test_exclude_keeps_groups_fixed(resnet18):
    space = cz.analyze(resnet18, X, exclude=["layer1.0.conv1"])
    assert len(space) == 11 and "excluded" in space.frozen["layer1.0.conv1"]
    by_type = cz.analyze(resnet18, X, exclude=[nn.Linear])
    assert len(by_type) == 12  # the only Linear is the classifier, which is frozen anyway
    with pytest.raises(cz.ConfigError, match="not in the model"):
        cz.analyze(resnet18, X, exclude=["layer9"])


def test_min_max_ratio(resnet18):
    space = cz.analyze(resnet18, X, min_ratio=0.25, max_ratio=0.75)
    assert space.min() == (5,) * 12 and space.max() == (15,) * 12
    for seed in range(20):
        assert all(5 <= c <= 15 for c in space.random(seed))
    with pytest.raises(cz.ConfigError, match="outside"):
        space.check((20,) * 12)


def test_grouped_convs_keep_the_same_offsets_of_every_group():
    """ResNeXt's grouped 3x3 convs (32 groups of 4 channels in layer1): the width of the groups
    through them is the channels per group, and slimming keeps the same offsets in every group."""
    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d(weights=None).eval()
    space = cz.analyze(model, X)
    assert not any("grouped" in r for r in space.frozen.values()), space.frozen
    conv = model.layer1[0].conv2
    into, out_of = ([g for g in space.groups if ("layer1.0.conv2", role) in g.index] for role in ("in", "out"))
    assert [g.size for g in into + out_of] == [4, 4]  # 128 channels = 32 groups x 4
    cfg = list(space.max())
    for group, width in ((into[0], 2), (out_of[0], 3)):  # the bins of 2 and 3 channels per group
        g = space.groups.index(group)
        cfg[g] = int(np.flatnonzero(space.width_table[g] == width)[0])
    for side in ("left", "right"):
        small = cz.slim(model, space, tuple(cfg), side)  # checks it computes what the supernet computes
        assert cz.measure_flops(small, X) == space.flops(tuple(cfg)) and cz.count_params(small) == space.params(tuple(cfg))
        slim_conv = small.layer1[0].conv2
        assert (slim_conv.groups, slim_conv.in_channels, slim_conv.out_channels) == (32, 64, 96)
        reads, writes = (range(2), range(3)) if side == "left" else (range(2, 4), range(1, 4))
        rows = [g * 4 + j for g in range(32) for j in writes]
        assert torch.equal(slim_conv.weight, conv.weight[rows][:, list(reads)])


@pytest.mark.parametrize("cfg, message", [
    ((20,) * 11, "12 entries"),
    ((0,) + (20,) * 11, "outside"),
    ((21,) + (20,) * 11, "outside"),
    ((1.5,) + (20,) * 11, "integers"),
    ("abc", "entries"),
])
def test_bad_configurations(space18, cfg, message):
    with pytest.raises(cz.ConfigError, match=message):
        space18.flops(cfg)


def test_bad_inputs(resnet18):
    with pytest.raises(cz.ConfigError, match="torch.nn.Module"):
        cz.analyze("resnet18", X)
    with pytest.raises(cz.ConfigError, match="torch.Tensor"):
        cz.analyze(resnet18, [1, 2, 3])
    with pytest.raises(cz.ConfigError, match="conv1"):  # names the module that failed
        cz.analyze(resnet18, torch.randn(1, 4, 64, 64))
    with pytest.raises(cz.ConfigError, match="bins"):
        cz.analyze(resnet18, X, bins=0)
    with pytest.raises(cz.ConfigError, match="divisor"):
        cz.analyze(resnet18, X, divisor=0)


def test_model_without_prunable_group():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10))
    with pytest.raises(cz.UnsupportedModelError, match="no channel group"):
        cz.analyze(model, X)


def test_analyze_leaves_model_unchanged():
    model = torchvision.models.mobilenet_v3_small(weights=None)  # train mode: BN would update
    before = snapshot(model)
    cz.analyze(model, X)
    assert_unchanged(model, before)


def test_auto_divisor_keeps_narrow_groups_choosable():
    from compressor.space import auto_divisor
    assert [auto_divisor(n) for n in (8, 15, 16, 24, 32, 63, 64, 512)] == [1, 1, 2, 2, 4, 4, 8, 8]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    space = cz.analyze(model, torch.randn(1, 3, 16, 16), divisor="auto")
    widths = {int(n): sorted(set(space.width_table[g, 1:].tolist())) for g, n in enumerate(space.sizes)}
    assert widths[16] == list(range(2, 17, 2))          # 8 widths instead of {8, 16} with divisor 8
    assert widths[64] == list(range(8, 65, 8))
    for cfg in (space.min(), space.uniform(0.5), space.max()):   # the cost model follows the table
        small = cz.slim(model, space, cfg, "left")
        assert cz.measure_flops(small, torch.randn(1, 3, 16, 16)) == space.flops(cfg)


class _ConcatIntoGroupedConv(nn.Module):
    """Two convs concatenated (6 + 10 channels) into a conv of 4 groups of 4: the concat's pieces
    straddle the conv groups."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 10, 3, padding=1)
        self.g, self.bn, self.head = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.g(torch.cat([self.a(x), self.b(x)], 1))))).mean((2, 3))


def test_a_group_holding_part_of_a_grouped_convs_channels_stays_fixed_with_the_reason():
    torch.manual_seed(0)
    model = _ConcatIntoGroupedConv().eval()
    x = torch.randn(1, 3, 16, 16)
    space = cz.analyze(model, x, divisor=1)
    assert "part of the inputs of the grouped convolution 'g'" in space.frozen["a"]
    assert "part of the inputs of the grouped convolution 'g'" in space.frozen["b"]
    assert [(g.name, g.size) for g in space.groups] == [("g", 4)]  # its outputs: 4 offsets of 4 groups
    for seed in range(3):
        cfg = space.random(seed=seed)
        assert cz.measure_flops(cz.slim(model, space, cfg, "right"), x) == space.flops(cfg)
