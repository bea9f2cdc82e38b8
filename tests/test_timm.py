"""timm models: layer subclasses keep their own behaviour in the supernet (BatchNormAct2d's
activation, Conv2dSame's dynamic padding), channel splits are mapped and their fixed piece sizes
kept (CSPNet), and the CI subset passes parity with exact cost."""
import pytest
import torch

import compressor as cz
from compressor.broaden import broaden
from compressor.errors import UnsupportedModelError
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


def assert_two_configurations_slim(model, space, example, side):
    """Two random configurations slim on `side` with parity and exact FLOPs and parameters."""
    for seed in range(2):
        cfg = space.random(seed=seed)
        diff, small = parity(model, space, cfg, side, torch.randn(2, *example.shape[1:]))
        assert diff <= 1e-4
        assert cz.measure_flops(small, example) == space.flops(cfg)
        assert cz.count_params(small) == space.params(cfg)


@pytest.mark.parametrize("name", TIMM_CI_SUBSET)
def test_timm_parity_and_exact_cost(name):
    """Each model passes parity with exact cost on 3 configurations x 2 sides."""
    torch.manual_seed(0)
    model = with_real_statistics(build_timm(name, num_classes=10), size=SIZE).eval()
    before = snapshot(model)
    example = torch.randn(1, 3, SIZE, SIZE)
    space = cz.analyze(model, example)
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


def test_csp_split_mapped_and_its_pieces_kept():
    """cspresnet50 splits conv_exp's output in two with x.split(n) and one half feeds both a block
    and its residual add. Torch-Pruning's offsets for it run past the layer ([0, 256, 384, 512] for
    256 channels: before, a raw IndexError in the supernet); analyze maps each consumer to the piece
    autograd says it reads, and keeps the split channels fixed (the piece size is a constant of the
    model's code), leaving the blocks' inner widths free."""
    model = build_timm("cspresnet50", num_classes=10).eval()
    space = cz.analyze(model, torch.randn(1, 3, SIZE, SIZE))
    split = [g for g, why in space.frozen.items() if "divides these channels at fixed positions" in why]
    assert len(split) >= 4  # the split of each of the 4 stages
    outputs = {m.module for group in space.groups for m in group.members if m.role == "out"}
    assert not any("conv_exp" in m for m in outputs)  # its input channels may be free
    assert any(m.endswith("blocks.0.conv1.conv") for m in outputs)
    for group in space.groups:
        for (mname, role), table in group.index.items():
            module = model.get_submodule(mname)
            width = module.weight.shape[0 if role == "out" else 1]  # conv, linear, batch norm
            assert table.max() < width, (mname, role)


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


@pytest.mark.parametrize("conv_mlp", [True, False])
def test_convnext_v2_slims_its_mlp_through_global_response_norm(conv_mlp):
    """ConvNeXt-V2's MLP hidden width passes through GlobalResponseNorm, which divides each
    channel's spatial L2 norm by their mean over the channels (before: the analysis froze every group,
    nothing to slim). Its channels (first or last, conv or linear MLP) are now free: the slim GRN's
    scale is multiplied by n / kept so that it equals the masked supernet (whose mean counts the
    removed channels as zeros). Parity with non-zero GRN parameters, exact cost; broadening refused."""
    torch.manual_seed(0)
    model = with_real_statistics(build_timm("convnextv2_atto", num_classes=10, conv_mlp=conv_mlp), size=SIZE).eval()
    with torch.no_grad():  # timm initialises GRN's scale and shift to zero, where it is the identity
        for module in model.modules():
            if type(module).__name__ == "GlobalResponseNorm":
                module.weight.normal_(0, 0.5)
                module.bias.normal_(0, 0.1)
    before = snapshot(model)
    example = torch.randn(1, 3, SIZE, SIZE)
    space = cz.analyze(model, example)
    assert len(space) == 12 and all(g.name.endswith("mlp.fc1") for g in space.groups)
    assert {m.kind for g in space.groups for m in g.members} >= {"grn" if conv_mlp else "grn_last"}
    for side in ("left", "right"):
        assert_two_configurations_slim(model, space, example, side)
    cfg = list(space.max())
    cfg[0] = space.levels(0)[0]
    small = cz.slim(model, space, cfg, "left")
    grn, full = small.stages[0].blocks[0].mlp.grn, model.stages[0].blocks[0].mlp.grn
    kept = space.channels(cfg)[0]
    assert torch.allclose(grn.weight, full.weight[:kept] * 160 / kept)
    with pytest.raises(UnsupportedModelError, match="GlobalResponseNorm"):
        broaden(model, space, 1.5)
    assert_unchanged(model, before)


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


@pytest.mark.parametrize("name, broken", [("resnetblur18", "BlurPool2d"), ("nf_regnet_b0", "ScaledStdConv2d")])
def test_groups_whose_slimming_breaks_a_module_are_frozen_before_training(name, broken):
    """BlurPool2d filters with a buffer of fixed channel count, ScaledStdConv2d holds a gain of
    fixed size: both outside Torch-Pruning's graph, so slimming their channels breaks the model.
    freeze_unsliceable (compress's prepare stage) finds those groups one at a time and freezes
    them with the reason; the rest of the model still slims, with parity and exact cost."""
    from compressor.slim import freeze_unsliceable
    torch.manual_seed(0)
    model = with_real_statistics(build_timm(name, num_classes=10), size=SIZE).eval()
    example = torch.randn(1, 3, SIZE, SIZE)
    space = cz.analyze(model, example)
    with pytest.raises(cz.UnsupportedModelError):
        cz.slim(model, space, space.min(), "left")
    fixed = freeze_unsliceable(model, space)
    added = {n: r for n, r in fixed.frozen.items() if n not in space.frozen}
    assert added and 0 < len(fixed) == len(space) - len(added)
    assert all(f"({broken})" in reason and "slimming it breaks module" in reason for reason in added.values())
    assert_two_configurations_slim(model, fixed, example, "left")
    assert freeze_unsliceable(model, fixed) is fixed  # nothing left to freeze


def test_analysis_time_limit_names_module_and_op():
    """Torch-Pruning's grouping used to loop for hours on some graphs (rexnet_100, ecaresnet26t,
    gcresnet33ts before their reshape and concat mappings were fixed; none is left in the sweep):
    past `time_limit` analyze raises naming the module and op it was handling, and an alarm set
    before (pytest-timeout's) is back in place. densenet121 takes seconds, far above 0.2 s."""
    import signal
    import time
    model = build_timm("densenet121", num_classes=10).eval()
    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    start = time.monotonic()
    with pytest.raises(cz.UnsupportedModelError) as info:
        cz.analyze(model, torch.randn(1, 3, SIZE, SIZE), time_limit=0.2)
    assert time.monotonic() - start < 60
    assert info.value.module and info.value.op and info.value.module in str(info.value)
    assert "took more than 0.2 s" in str(info.value)
    if outer:
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0


def test_channel_moving_reshapes_are_cut_in_seconds():
    """ECA (ecaresnet26t) views the pooled channels as a sequence, (N, C) -> (N, 1, C), for a
    Conv1d and back: Torch-Pruning mapped the views as flattens of stride C and a group grew to
    C * C indices (before, analysis took hours; the sweep refused it at its time limit). Now the
    groups through the views are frozen naming the reshape and the module before it, analysis
    takes seconds, and the rest slims with parity and exact cost."""
    import time
    torch.manual_seed(0)
    model = with_real_statistics(build_timm("ecaresnet26t", num_classes=10), size=SIZE).eval()
    example = torch.randn(1, 3, SIZE, SIZE)
    start = time.monotonic()
    space = cz.analyze(model, example, time_limit=60)
    assert time.monotonic() - start < 60
    cut = [r for r in space.frozen.values() if "moves the channels out of dimension 1" in r]
    assert cut and all("ViewBackward0 after module 'layer" in r and ".se.conv'" in r for r in cut)
    assert len(space) > 5  # the blocks' inner widths stay free
    assert_two_configurations_slim(model, space, example, "right")


def test_unmappable_concat_refused_up_front_naming_module_and_op():
    """dpn48b's dual-path concatenations: Torch-Pruning's concat offsets are unknown (None) and
    map a group past a layer's width; analyze refuses the model naming the module and the ops the
    group passes (the concats among them), before any training."""
    model = build_timm("dpn48b", num_classes=10).eval()
    with pytest.raises(cz.UnsupportedModelError) as info:
        cz.analyze(model, torch.randn(1, 3, SIZE, SIZE))
    assert info.value.module and info.value.module in str(info.value)
    assert info.value.op in str(info.value) and "_ConcatOp" in str(info.value)


@pytest.mark.parametrize("name", ["cs3darknet_s", "rexnet_100"])
def test_concat_sizes_read_from_autograd(name):
    """cs3darknet_s concatenates a split half with a block's output, rexnet_100 a sliced residual
    with the rest: Torch-Pruning could not infer the concats' input sizes (before: a TypeError
    inside it on cs3darknet_s, a grouping loop past the sweep's limit on rexnet_100). They are read
    from autograd now, and both analyse in seconds and slim with parity and exact cost."""
    import time
    torch.manual_seed(0)
    model = with_real_statistics(build_timm(name, num_classes=10), size=SIZE).eval()
    example = torch.randn(1, 3, SIZE, SIZE)
    start = time.monotonic()
    space = cz.analyze(model, example, time_limit=60)
    assert time.monotonic() - start < 60
    assert len(space) > 5
    assert_two_configurations_slim(model, space, example, "left")
