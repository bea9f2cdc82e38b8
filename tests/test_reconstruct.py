"""Least-squares reconstruction of a slim model (compressor.reconstruct) on real torchvision and
CIFAR networks: it brings the slim network's output closer to the full one's, changes nothing
where nothing was removed, handles depthwise convolutions and biases, and write_back puts the
fitted weights where a later slim() finds them."""
import copy

import numpy as np
import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn

import compressor as cz
from compressor.cifar import resnet20
from compressor.reconstruct import _output_positions, _patches, reconstruct, write_back
from conftest import assert_unchanged, snapshot, with_real_statistics


def batches(n=4, size=32, seed=0, batch=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.zeros(batch, dtype=torch.long)) for _ in range(n)]


def relative_error(a, b, x):
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).norm() / yb.norm())


def test_reconstruction_brings_the_slim_output_closer_to_the_full_one():
    torch.manual_seed(0)
    full = with_real_statistics(resnet20())
    space = cz.analyze(full, torch.randn(1, 3, 32, 32), divisor=1)
    cfg = space.uniform(0.5)
    small = cz.slim(full, space, cfg, "left")
    before = snapshot(full)
    x = torch.randn(32, 3, 32, 32)  # inputs the fit never saw
    plain = relative_error(small, full, x)
    fitted = reconstruct(small, full, space, cfg, "left", batches(n=8, batch=32), batches=8)
    assert len(fitted) == 20  # every trainable conv and the classifier (the frozen shortcuts are left alone)
    assert relative_error(small, full, x) < 0.5 * plain
    assert_unchanged(full, before)  # the reference is only read


def test_a_pretrained_network_recovers_its_accuracy(shared_data):
    """The real case: CIFAR-10 ResNet-20 pruned to half its width in every group, 256 training
    images, accuracy on 1,000 test images: slimming alone (BN recalibrated) against reconstruction."""
    from compressor.cifar import load_pretrained, pretrained_path
    from compressor.data import cifar10
    from compressor.finetune import accuracy, loader
    torch.manual_seed(0)
    full = load_pretrained(resnet20(), pretrained_path("resnet20", shared_data)).eval()
    space = cz.analyze(full, torch.randn(1, 3, 32, 32), divisor=1)
    ordered = cz.order_channels(full, space)
    cfg = space.uniform(0.5)
    train = loader(cifar10("train", shared_data, limit=256, seed=0), 64)
    test = cifar10("test", shared_data, limit=1000, seed=0)
    net = cz.recalibrate_bn(cz.supernet(copy.deepcopy(ordered), space), cfg, "left", train, batches=4)
    plain = accuracy(cz.slim(net.model, space, cfg, "left"), test)
    small = cz.slim(ordered, space, cfg, "left")
    reconstruct(small, ordered, space, cfg, "left", train, batches=4)
    fitted = accuracy(small, test)
    assert fitted > plain + 0.15, (plain, fitted)


def test_nothing_removed_nothing_changed():
    """At full width each layer already computes its target from the same inputs: the fit gives back
    the layer's own weights (up to the ridge term), and the network computes what it did (its batch
    norms' statistics and affine parameters change together)."""
    torch.manual_seed(0)
    full = with_real_statistics(resnet20())
    space = cz.analyze(full, torch.randn(1, 3, 32, 32), divisor=1)
    small = cz.slim(full, space, space.max(), "left")
    reconstruct(small, full, space, space.max(), "left", batches(), batches=4, ridge=1e-9)
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    for (name, a), (_, b) in zip(full.named_modules(), small.named_modules()):
        if isinstance(a, layers):
            assert torch.allclose(a.weight, b.weight, rtol=1e-3, atol=1e-4), name
    x = torch.randn(16, 3, 32, 32)
    assert relative_error(small, full, x) < 1e-4


def test_the_classifier_bias_is_fitted():
    torch.manual_seed(0)
    full = with_real_statistics(resnet20())
    with torch.no_grad():
        full.linear.bias.add_(3.0)  # a bias the fit must carry over
    space = cz.analyze(full, torch.randn(1, 3, 32, 32), divisor=1)
    cfg = space.uniform(0.6)
    small = cz.slim(full, space, cfg, "left")
    assert "linear" in reconstruct(small, full, space, cfg, "left", batches(), batches=4)
    assert abs(float(small.linear.bias.mean()) - float(full.linear.bias.mean())) < 1.0


@pytest.mark.parametrize("side", ["left", "right"])
def test_write_back_puts_the_fitted_weights_where_slim_finds_them(side):
    torch.manual_seed(0)
    full = with_real_statistics(torchvision.models.mobilenet_v2(num_classes=10), size=32)  # depthwise convs
    space = cz.analyze(full, torch.randn(1, 3, 32, 32), divisor=1)
    cfg = space.uniform(0.5)
    small = cz.slim(full, space, cfg, side)
    names = reconstruct(small, full, space, cfg, side, batches(), batches=2)
    model = copy.deepcopy(full)
    write_back(model, small, space, cfg, side, names)
    again = cz.slim(model, space, cfg, side)
    for (name, a), (_, b) in zip(small.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # the channels the configuration removes keep their weights
    kept_rows = space.channels(cfg)[0]
    stem = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][0]
    original = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)][0]
    rows = np.arange(stem.weight.shape[0])
    removed = rows[kept_rows:] if side == "left" else rows[:len(rows) - kept_rows]
    if len(removed):
        assert torch.equal(stem.weight[removed], original.weight[removed])


def test_bad_arguments_are_refused():
    full = resnet20()
    space = cz.analyze(full, torch.randn(1, 3, 32, 32), divisor=1)
    small = cz.slim(full, space, space.max(), "left")
    with pytest.raises(cz.ConfigError, match="batches and positions"):
        reconstruct(small, full, space, space.max(), "left", batches(), batches=0)
    with pytest.raises(cz.ConfigError, match="no batch"):
        reconstruct(small, full, space, space.max(), "left", [], batches=2)


def test_batch_norms_are_left_computing_the_same_in_eval_mode_and_near_it_in_train_mode():
    """After reconstruction every batch norm's running statistics are its inputs' (so train mode,
    which normalises by the batch's, starts where eval mode is), and its scale and shift make up for
    the change: the eval-mode function is the fitted one."""
    torch.manual_seed(0)
    full = with_real_statistics(resnet20())
    space = cz.analyze(full, torch.randn(1, 3, 32, 32), divisor=1)
    cfg = space.uniform(0.4)
    small = cz.slim(full, space, cfg, "left")
    data = batches(n=4, batch=32)
    x = torch.cat([b[0] for b in data])
    reconstruct(small, full, space, cfg, "left", data, batches=4)
    with torch.no_grad():
        evaluated = small.eval()(x)
        trained = copy.deepcopy(small).train()(x)  # batch statistics of the same images
    assert float((trained - evaluated).norm() / evaluated.norm()) < 1e-3


@pytest.mark.parametrize("kernel,stride,dilation,padding,size", [
    (3, 1, 1, 1, (8, 8)), (3, 2, 1, 1, (9, 7)), (1, 1, 1, 0, (5, 5)), (5, 2, 2, 3, (11, 10)),
    ((3, 1), (2, 1), 1, (1, 0), (6, 5)), (3, 1, 1, 0, (4, 4))])
def test_sampled_patches_are_the_unfold_columns(kernel, stride, dilation, padding, size):
    """The input rows a conv's fit reads equal F.unfold's columns at the sampled positions, for
    strided, dilated, unpadded, over-padded and rectangular kernels."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, dilation=dilation, padding=padding)
    x = torch.randn(3, 4, *size)
    columns = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert _output_positions(conv, x) == columns.shape[2] == conv(x).shape[2] * conv(x).shape[3]
    at = torch.randint(columns.shape[2], (3, 5))
    expected = torch.gather(columns, 2, at[:, None].expand(3, columns.shape[1], 5)).permute(0, 2, 1)
    assert torch.equal(_patches(conv, x, at), expected.reshape(-1, columns.shape[1]))
