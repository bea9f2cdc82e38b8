"""Masked supernet and physical slimming: parity, exact cost, round trip, bad input."""
import copy

import pytest
import torch
import torchvision

import compressor as cz
from conftest import assert_unchanged, snapshot, with_real_statistics
from models import CI_SUBSET, DEFAULT_SIZE, input_size

X = torch.randn(1, 3, DEFAULT_SIZE, DEFAULT_SIZE)


def tol(y):
    return 1e-4 * y.abs().max()


@pytest.mark.parametrize("name", CI_SUBSET)
def test_parity_and_exact_cost(name):
    """Each of the CI subset passes parity with exact cost, or raises UnsupportedModelError."""
    torch.manual_seed(0)
    size = input_size(name)
    model = with_real_statistics(torchvision.models.get_model(name, weights=None), size=size)
    before = snapshot(model)
    example = torch.randn(1, 3, size, size)
    try:
        space = cz.analyze(model, example)
    except cz.UnsupportedModelError as e:
        assert e.module and e.op and e.module in str(e)
        return
    x = torch.randn(2, 3, size, size)
    for side in ("left", "right"):
        for seed in range(3):
            cfg = space.random(seed=seed)
            small = cz.slim(model, space, cfg, side, check=False).eval()
            net = cz.supernet(model, space).set(cfg, side).eval()
            with torch.no_grad():
                y_net, y_small = net(x), small(x)
            assert (y_net - y_small).abs().max() <= tol(y_net), (side, cfg)
            assert cz.measure_flops(small, example) == space.flops(cfg)
            assert cz.count_params(small) == space.params(cfg)
    assert_unchanged(model, before)


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return with_real_statistics(torchvision.models.mobilenet_v2(weights=None))


@pytest.fixture(scope="module")
def mspace(mobilenet):
    return cz.analyze(mobilenet, X)


def test_slim_is_physically_smaller_and_sides_differ(mobilenet, mspace):
    cfg = mspace.uniform(0.5)
    left = cz.slim(mobilenet, mspace, cfg, "left")
    right = cz.slim(mobilenet, mspace, cfg, "right")
    assert cz.count_params(left) < 0.5 * cz.count_params(mobilenet)
    assert cz.count_params(left) == cz.count_params(right)
    conv = left.features[1].conv[0][0]  # the first depthwise conv: 32 -> 16 channels
    assert conv.weight.shape[0] == conv.groups == 16
    assert not torch.equal(left.features[0][0].weight, right.features[0][0].weight)
    assert torch.equal(left.features[0][0].weight, mobilenet.features[0][0].weight[:16])
    assert torch.equal(right.features[0][0].weight, mobilenet.features[0][0].weight[16:])


def test_supernet_shares_parameters_and_full_is_identity(mobilenet, mspace):
    net = cz.supernet(mobilenet, mspace)
    assert {id(p) for p in net.parameters()} == {id(p) for p in mobilenet.parameters()}
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(X), mobilenet(X))
        net.set(mspace.max(), "right")
        assert torch.equal(net(X), mobilenet(X))
        net.set(mspace.uniform(0.25), "left")
        assert not torch.allclose(net(X), mobilenet(X))
        assert torch.equal(net.full()(X), mobilenet(X))


def test_supernet_zeroes_inactive_channels(mobilenet, mspace):
    net = cz.supernet(mobilenet, mspace).eval()
    cfg = mspace.uniform(0.5)
    outputs = {}
    bn = net.model.features[0][1]
    handle = bn.register_forward_hook(lambda m, i, o: outputs.setdefault("bn", o))
    with torch.no_grad():
        net.set(cfg, "left")(X)
        left = outputs.pop("bn")
        net.set(cfg, "right")(X)
        right = outputs.pop("bn")
    handle.remove()
    # forward hooks run in registration order and each sees the previous one's result, so this
    # hook (registered after the supernet's) records the masked output
    assert left[:, 16:].abs().sum() == 0 and left[:, :16].abs().sum() > 0
    assert right[:, :16].abs().sum() == 0 and right[:, 16:].abs().sum() > 0


def test_gradients_reach_only_active_channels(mobilenet, mspace):
    model = torchvision.models.mobilenet_v2(weights=None)
    net = cz.supernet(model, mspace)
    net.set(mspace.uniform(0.5), "left")
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    grad = model.features[0][0].weight.grad
    assert grad[:16].abs().sum() > 0 and grad[16:].abs().sum() == 0


def test_save_and_load_round_trip(tmp_path):
    model = with_real_statistics(cz.load_model("torchvision:resnet18"))
    space = cz.analyze(model, X)
    cfg = space.random(seed=1)
    small = cz.slim(model, space, cfg, "right").eval()
    path = tmp_path / "sub" / "small.pt"
    cz.save_slim(small, str(path))
    assert [p.name for p in path.parent.iterdir()] == ["small.pt"]  # no temp files left
    payload = torch.load(path, weights_only=True)  # data only: loads without unpickling code
    assert payload["widths"] == list(cfg) and payload["side"] == "right"
    loaded = cz.load_slim(str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))
    assert loaded.compressor_info["channels"] == space.channels(cfg)


def test_save_needs_a_source(tmp_path, mobilenet, mspace):
    small = cz.slim(mobilenet, mspace, mspace.uniform(0.5))
    with pytest.raises(cz.ConfigError, match="source="):
        cz.save_slim(small, str(tmp_path / "m.pt"))
    cz.save_slim(small, str(tmp_path / "m.pt"), source="torchvision:mobilenet_v2")
    assert cz.count_params(cz.load_slim(str(tmp_path / "m.pt"))) == cz.count_params(small)
    with pytest.raises(cz.ConfigError, match="cz.slim"):
        cz.save_slim(mobilenet, str(tmp_path / "x.pt"))
    with pytest.raises(cz.ConfigError, match="does not exist"):
        cz.load_slim(str(tmp_path / "missing.pt"))


def test_bad_side_and_config_leave_model_unchanged(mobilenet, mspace):
    before = snapshot(mobilenet)
    with pytest.raises(cz.ConfigError, match="side"):
        cz.slim(mobilenet, mspace, mspace.max(), side="up")
    with pytest.raises(cz.ConfigError, match="side"):
        cz.supernet(mobilenet, mspace).set(mspace.max(), side="middle")
    with pytest.raises(cz.ConfigError, match="entries"):
        cz.slim(mobilenet, mspace, (3, 4))
    with pytest.raises(cz.ConfigError, match="different model"):
        cz.slim(torchvision.models.resnet18(), mspace, mspace.max())
    with pytest.raises(cz.ConfigError, match="nn.Module"):
        cz.slim(None, mspace, mspace.max())
    small = cz.slim(mobilenet, mspace, mspace.random(seed=5), "right")
    net = cz.supernet(mobilenet, mspace).set(mspace.random(seed=6), "left")
    net.train()(torch.randn(2, 3, 64, 64))  # a forward of the supernet in train mode is training: allowed
    assert small is not mobilenet
    # slim and supernet construction alone must not touch the model; the train-mode forward above
    # updated the shared BN statistics by design, so compare structure, hooks and parameters only
    after = snapshot(mobilenet)
    assert after["structure"] == before["structure"] and after["hooks"] == before["hooks"]
    for k, v in before["state"].items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(after["state"][k], v)


def test_parity_failure_is_reported_not_returned():
    """A layer Torch-Pruning does not see (a functional op that mixes channels) makes the
    slim model wrong; slim must raise instead of returning it."""

    class ChannelFlip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3)
            self.conv2 = torch.nn.Conv2d(16, 16, 3)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            x = self.conv1(x)
            x = torch.flip(x, dims=[1])  # reverses channel order: left window becomes right
            x = self.conv2(x)
            return self.fc(x.mean((2, 3)))

    model = ChannelFlip().eval()
    space = cz.analyze(model, torch.randn(1, 3, 16, 16))
    cfg = space.uniform(0.5)
    with pytest.raises(cz.UnsupportedModelError, match="disagrees"):
        cz.slim(model, space, cfg, "left")


def test_masked_training_keeps_inactive_bn_statistics(mobilenet, mspace):
    model = torchvision.models.mobilenet_v2(weights=None)
    bn = model.features[0][1]
    bn.running_mean.fill_(0.5)
    net = cz.supernet(model, mspace).set(mspace.uniform(0.5), "right").train()
    with torch.no_grad():
        net(torch.randn(4, 3, 64, 64))
    assert (bn.running_mean[:16] == 0.5).all()      # inactive (left half) untouched
    assert (bn.running_mean[16:] != 0.5).all()      # active half updated


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_a_training_step_matches_the_slim_network(name):
    """Train mode, where batch norms use batch statistics and update running ones: the supernet
    (whose batch norms compute only their window) and the physically slimmed network give the
    same output, the same BN statistics and BN gradients on the active channels, and leave the
    inactive channels' statistics and gradients alone."""
    torch.manual_seed(0)
    model = with_real_statistics(torchvision.models.get_model(name, weights=None))
    space = cz.analyze(model, X)
    x = torch.randn(4, 3, 64, 64)
    for side in ("left", "right"):
        cfg = space.random(seed=5)
        small = cz.slim(model, space, cfg, side, check=False).train()
        full = copy.deepcopy(model)
        net = cz.supernet(full, space).set(cfg, side).train()
        assert net._norm_windows  # the windowed path is the one under test
        for module in (*small.modules(), *net.modules()):
            if isinstance(module, torch.nn.Dropout):
                module.eval()
        y_net, y_small = net(x), small(x)
        assert (y_net - y_small).abs().max() <= tol(y_small)
        y_net.square().sum().backward()
        y_small.square().sum().backward()
        slim_norms = dict(small.named_modules())
        # float error of the whole backward pass, not of one layer: some BN gradients are ~0 sums
        scale = max(p.grad.abs().max() for p in small.parameters() if p.grad is not None)
        for bn_name in net._norm_windows:
            bn, slim_bn, before = full.get_submodule(bn_name), slim_norms[bn_name], model.get_submodule(bn_name)
            active = net.active_channels(bn_name)
            inactive = torch.ones(bn.num_features, dtype=torch.bool)
            inactive[active] = False
            for stat in ("running_mean", "running_var"):
                assert torch.allclose(getattr(bn, stat)[active], getattr(slim_bn, stat), rtol=1e-4, atol=1e-6)
                assert torch.equal(getattr(bn, stat)[inactive], getattr(before, stat)[inactive])
            assert bn.num_batches_tracked == slim_bn.num_batches_tracked == before.num_batches_tracked + 1
            for param in ("weight", "bias"):
                grad, slim_grad = getattr(bn, param).grad, getattr(slim_bn, param).grad
                assert torch.allclose(grad[active], slim_grad, rtol=1e-3, atol=1e-6 * scale)
                assert not grad[inactive].any()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_windowed_convolutions_agree_with_dense_masking(name):
    """The supernet runs eligible convs through compressor.kernels.masked_conv2d ('sliced' on
    CPU); 'reference' computes the dense conv and masks. Both must give the same network."""
    torch.manual_seed(0)
    model = with_real_statistics(torchvision.models.get_model(name, weights=None))
    space = cz.analyze(model, X)
    sliced, reference = cz.supernet(model, space, impl="sliced"), cz.supernet(model, space, impl="reference")
    assert len(sliced._conv_groups) > 0
    cfg = space.random(seed=2)
    x = torch.randn(2, 3, 64, 64)
    for side in ("left", "right"):
        sliced.set(cfg, side).eval()
        reference.set(cfg, side).eval()
        with torch.no_grad():
            a, b = sliced(x), reference(x)
        assert len(sliced._conv_windows) > 0
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("factory", ["resnet20", "resnet56"])
def test_cifar_resnets_slim_with_parity(factory):
    from compressor import cifar
    model = with_real_statistics(getattr(cifar, factory)(), size=32)
    x = torch.randn(1, 3, 32, 32)
    space = cz.analyze(model, x)
    assert len(space) == (3 + 3 * (3 if factory == "resnet20" else 9))  # 3 stage streams + 1 per block
    for side in ("left", "right"):
        cfg = space.random(seed=7)
        small = cz.slim(model, space, cfg, side).eval()  # raises on a parity failure
        assert cz.measure_flops(small, x) == space.flops(cfg) and cz.count_params(small) == space.params(cfg)
        # the fixed identity shortcut stays frozen in the slim model
        assert not small.layer2[0].shortcut.weight.requires_grad


@pytest.mark.parametrize("name,layout", [("resnet18", "left"), ("mobilenet_v2", "left"), ("densenet121", "left"),
                                         ("googlenet", "left"), ("resnet18", "both-ends"),
                                         ("mobilenet_v2", "both-ends")])
def test_order_channels_keeps_the_function_and_sorts_by_magnitude(name, layout):
    """Residual adds (ResNet), depthwise convs (MobileNetV2), concatenations (DenseNet, GoogLeNet)."""
    import numpy as np

    from compressor.slim import channel_importance

    torch.manual_seed(0)
    model = with_real_statistics(torchvision.models.get_model(name, weights=None, **(
        {"init_weights": True, "aux_logits": False} if name == "googlenet" else {})))
    before = snapshot(model)
    space = cz.analyze(model, X)
    ordered = cz.order_channels(model, space, layout=layout)
    assert_unchanged(model, before)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        assert (y - ordered(x)).abs().max() <= tol(y)
    original, now = channel_importance(model, space), channel_importance(ordered, space)
    for group, old, new in zip(space.groups, original, now):
        assert np.allclose(np.sort(new), np.sort(old), rtol=1e-5), group.name  # the same scores, moved
        eps = 1e-6 * old.max()
        if layout == "left":
            assert np.all(np.diff(new) <= eps), group.name
        else:  # falling from the left end to the middle, rising from the middle to the right end
            half = (len(new) + 1) // 2
            assert np.all(np.diff(new[:half]) <= eps) and np.all(np.diff(new[half:]) >= -eps), group.name
            assert new[0] >= new[-1] - eps and (len(new) < 3 or new[-1] >= new[1] - eps), group.name
    assert sum(not np.allclose(old, new) for old, new in zip(original, now)) > len(space) // 2
    # the space still describes the ordered model: slimming it passes the parity check inside slim
    cz.slim(ordered, space, space.uniform(0.5), "right" if layout == "both-ends" else "left")


def test_order_channels_rejects_an_unknown_layout():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(cz.ConfigError, match="layout must be 'left' or 'both-ends'"):
        cz.order_channels(model, cz.analyze(model, X), layout="middle")


@pytest.fixture(scope="module")
def slim_file(tmp_path_factory):
    """A real save_slim file of a slimmed torchvision ResNet-18 with 4 classes, and its model."""
    model = with_real_statistics(torchvision.models.resnet18(num_classes=4))
    space = cz.analyze(model, X)
    small = cz.slim(model, space, space.uniform(0.5), "left").eval()
    path = tmp_path_factory.mktemp("slim") / "model.pt"
    cz.save_slim(small, str(path), source="torchvision:resnet18(num_classes=4)")
    return path, small


def test_load_slim_rebuilds_a_recorded_builder_with_its_arguments(slim_file):
    path, small = slim_file
    loaded = cz.load_slim(str(path)).eval()
    assert loaded.fc.out_features == 4 and loaded.compressor_info["source"] == "torchvision:resnet18(num_classes=4)"
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))


EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("code from a model file ran")
import torchvision
def build(**kwargs):
    pathlib.Path({marker!r}).write_text("code from a model file ran")
    return torchvision.models.resnet18(num_classes=4)
"""


@pytest.mark.parametrize("kind", ["file", "module"])
def test_load_slim_runs_no_code_the_file_names_without_opt_in(slim_file, tmp_path, monkeypatch, kind):
    path, small = slim_file
    marker = tmp_path / "marker"
    evil = tmp_path / "evilmodels.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))  # so that 'evilmodels:build' is importable
    source = f"{evil}:build" if kind == "file" else "evilmodels:build"
    payload = torch.load(path, weights_only=True)
    payload["source"] = source
    bad = tmp_path / "model.pt"
    torch.save(payload, bad)
    with pytest.raises(cz.ConfigError, match=f"names the source '{source}'.*trust_source=True"):
        cz.load_slim(str(bad))
    assert not marker.exists(), "load_slim ran code named by the file"
    loaded = cz.load_slim(str(bad), trust_source=True).eval()  # the caller's explicit opt-in
    assert marker.exists()
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))


def test_load_slim_refuses_builder_arguments_that_are_not_shapes(slim_file, tmp_path):
    payload = torch.load(slim_file[0], weights_only=True)
    payload["source"] = "torchvision:resnet18(num_classes=4, weights='IMAGENET1K_V1')"  # would download
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(cz.ConfigError, match="not a known builder"):
        cz.load_slim(str(tmp_path / "m.pt"))
    payload["source"] = "torchvision:resnet18(num_classes=__import__('os').getpid())"
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(cz.ConfigError, match="malformed source"):
        cz.load_slim(str(tmp_path / "m.pt"))


def _truncated(path, good):
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path, good):
    path.write_bytes(b"")


def _directory(path, good):
    path.mkdir()


def _whole_module(path, good):
    torch.save(torchvision.models.resnet18(num_classes=4), path)


def _other_architecture(path, good):
    payload = torch.load(good, weights_only=True)
    payload["source"] = "torchvision:resnet34(num_classes=4)"  # the weights are a ResNet-18's
    torch.save(payload, path)


def _foreign_attribute(path, good):
    payload = torch.load(good, weights_only=True)
    payload["shapes"]["fc"]["training"] = True  # a file may set layer sizes only
    torch.save(payload, path)


def _plain_state_dict(path, good):
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)


@pytest.mark.parametrize("make, problem", [
    (_truncated, "not a readable torch file"),
    (_empty, "is empty"),
    (_directory, "is a directory"),
    (_whole_module, "pickled objects.*save_slim"),
    (_other_architecture, r"does not fit the architecture it names \('torchvision:resnet34"),
    (_foreign_attribute, r"does not fit .*fc.training = True is not a layer size"),
    (_plain_state_dict, "not a slim model written by compressor.save_slim"),
])
def test_load_slim_bad_files_raise_one_clear_error(slim_file, tmp_path, make, problem):
    path = tmp_path / "model.pt"
    make(path, slim_file[0])
    with pytest.raises(cz.ConfigError, match=problem) as error:
        cz.load_slim(str(path))
    assert str(path) in str(error.value)


def test_taylor_importance_is_the_first_order_loss_change_per_channel():
    """One group (the first conv's outputs with its BN and the second conv's inputs): each layer's
    |w * dL/dw| summed per channel, divided by the layer's mean, summed over the layers."""
    import numpy as np
    from torch import nn

    from compressor.slim import channel_importance
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))) for _ in range(3)]
    space = cz.analyze(model, torch.randn(1, 3, 8, 8), divisor=1)
    got = channel_importance(model, space, "taylor", data, batches=2)[0]
    reference = copy.deepcopy(model).train()
    for x, y in data[:2]:
        nn.functional.cross_entropy(reference(x), y).backward()
    parts = [(reference[0].weight, (1, 2, 3)), (reference[1].weight, ()), (reference[3].weight, (0, 2, 3))]
    expected = 0
    for w, dims in parts:
        t = (w * w.grad).abs()
        t = t.sum(dims) if dims else t
        expected = expected + t / t.mean()
    assert np.allclose(got, expected.detach().numpy(), rtol=1e-5)
    assert not np.allclose(got, channel_importance(model, space)[0])  # not the magnitude criterion
    with pytest.raises(cz.ConfigError, match="needs data"):
        channel_importance(model, space, "taylor")
    with pytest.raises(cz.ConfigError, match="'l1' or 'l2' or 'taylor'"):
        channel_importance(model, space, "hessian")
