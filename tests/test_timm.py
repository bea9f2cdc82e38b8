"""timm models: layer subclasses keep their own behaviour in the supernet (BatchNormAct2d's
activation, Conv2dSame's dynamic padding), CSPNet's split is refused by analyze, and the CI subset
passes parity with exact cost in eval and train mode."""
import pytest
import torch

import compressor as cz
from conftest import assert_unchanged, snapshot, with_real_statistics
from models import TIMM_CI_SUBSET, build_timm

pytest.importorskip("timm")
SIZE = 64


def parity(model, space, cfg, side, x, train=False):
    small = cz.slim(model, space, cfg, side, check=False)
    net = cz.supernet(model, space).set(cfg, side)
    small.train(train), net.train(train)
    with torch.no_grad():
        y_net, y_small = net(x), small(x)
    return (y_net - y_small).abs().max().item() / y_net.abs().max().item(), small


@pytest.mark.parametrize("name", TIMM_CI_SUBSET)
def test_timm_parity_and_exact_cost(name):
    """Each model passes parity with exact cost on 3 configurations x 2 sides, or analyze refuses
    it naming module and op."""
    torch.manual_seed(0)
    model = with_real_statistics(build_timm(name, num_classes=10), size=SIZE).eval()
    before = snapshot(model)
    example = torch.randn(1, 3, SIZE, SIZE)
    try:
        space = cz.analyze(model, example)
    except cz.UnsupportedModelError as e:
        assert name == "cspresnet50", f"{name} refused: {e}"
        assert e.module and e.op and e.module in str(e)
        return
    assert len(space) > 5
    x = torch.randn(2, 3, SIZE, SIZE)
    for side in ("left", "right"):
        for seed in range(3):
            cfg = space.random(seed=seed)
            diff, small = parity(model, space, cfg, side, x)
            assert diff <= 1e-4, (side, cfg, diff)
            assert cz.measure_flops(small, example) == space.flops(cfg)
            assert cz.count_params(small) == space.params(cfg)
    assert_unchanged(model, before)


def test_batchnormact_keeps_its_activation_in_windows():
    """mobilenetv3's BatchNormAct2d layers are windowed (computed at the window's cost) and still
    apply their activation: the supernet equals the slim model in eval and train mode. Before, the
    window dropped the activation and slim's check refused the model (relative difference ~1)."""
    torch.manual_seed(0)
    model = with_real_statistics(build_timm("mobilenetv3_small_050", num_classes=10), size=SIZE).eval()
    space = cz.analyze(model, torch.randn(1, 3, SIZE, SIZE))
    net = cz.supernet(model, space)
    windowed = [n for n in net._norm_groups if type(model.get_submodule(n)).__name__ == "BatchNormAct2d"]
    assert windowed
    activations = {type(model.get_submodule(n).act).__name__ for n in windowed}
    assert activations - {"Identity"}, activations  # ReLU / Hardswish ones among them
    x = torch.randn(4, 3, SIZE, SIZE)
    cfg = space.uniform(0.5)
    for train in (False, True):
        diff, _ = parity(model, space, cfg, "right", x, train=train)
        assert diff <= 1e-4, (train, diff)


def test_conv2d_same_keeps_its_dynamic_padding():
    """tf_efficientnet_lite0's Conv2dSame pads its input like TF "same" in its own forward: the
    windowed conv pads the same way (before, the supernet crashed at full width)."""
    torch.manual_seed(0)
    model = with_real_statistics(build_timm("tf_efficientnet_lite0", num_classes=10), size=SIZE).eval()
    space = cz.analyze(model, torch.randn(1, 3, SIZE, SIZE))
    net = cz.supernet(model, space).eval()
    same = [n for n in net._conv_groups if type(model.get_submodule(n)).__name__ == "Conv2dSame"]
    assert same
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=0, rtol=0)
    diff, _ = parity(model, space, space.uniform(0.4), "left", x)
    assert diff <= 1e-4


def test_csp_split_refused_by_analyze():
    """cspresnet50 splits conv_exp's output in two and one half feeds both a block and its residual
    add; Torch-Pruning maps that half past the layer's width. analyze refuses the model naming the
    module before the split and the op, instead of the supernet's raw IndexError."""
    model = build_timm("cspresnet50", num_classes=10).eval()
    with pytest.raises(cz.UnsupportedModelError) as info:
        cz.analyze(model, torch.randn(1, 3, SIZE, SIZE))
    assert info.value.op == "split"
    assert info.value.module.endswith("conv_exp.bn") and info.value.module in str(info.value)


def test_cost_counts_linears_on_folded_batches():
    """MobileViT folds the patch grid into the batch dimension ((4 patch positions, tokens, dim)
    for one image): the cost model counts every row of the linears, not only the first batch
    entry's (before: 26.56 M predicted vs 24.25 M measured on a slim mobilevit_xxs, +9.5 %)."""
    torch.manual_seed(0)
    model = build_timm("mobilevit_xxs", num_classes=10).eval()
    example = torch.randn(1, 3, SIZE, SIZE)
    space = cz.analyze(model, example)
    for seed in range(3):
        cfg = space.random(seed=seed)
        small = cz.slim(model, space, cfg, "left", check=False)
        assert cz.measure_flops(small, example) == space.flops(cfg), seed
        assert cz.count_params(small) == space.params(cfg)


def test_slim_names_the_module_a_slim_model_fails_in():
    """resnetblur18's BlurPool2d filters its input with a buffer of fixed channel count, outside
    Torch-Pruning's graph: the slim model cannot run, and slim refuses naming that module instead
    of the raw RuntimeError."""
    model = build_timm("resnetblur18", num_classes=10).eval()
    example = torch.randn(1, 3, SIZE, SIZE)
    space = cz.analyze(model, example)
    with pytest.raises(cz.UnsupportedModelError) as info:
        cz.slim(model, space, space.uniform(0.5), "left")
    assert info.value.module == "maxpool.1" and "BlurPool2d" in str(info.value)
