"""The table of per-layer-kind behaviour (compressor.layers): every kind it lists is slimmed in a
real model of tests/models.py, costs what FlopCounterMode and the parameter count measure, and
its latency probe builds a layer of the widths asked for."""
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

import compressor as cz
from compressor.latency.layers import find_layers, widths
from compressor.layers import LAYER_KINDS, kind_of, layer_kind
from conftest import with_real_statistics
from models import build, build_timm, input_size

# conv, bn and linear in all; depthwise convs in mobilenet_v2, grouped ones in regnet_x_400mf,
# torchvision's FrozenBatchNorm2d (its detectors' pretrained backbones) in resnet18-frozen-bn,
# timm's GlobalResponseNorm channels first (conv MLP) and last (linear MLP) in ConvNeXt-V2
FROZEN_BN = "resnet18-frozen-bn"
GRN = {"convnextv2-conv-mlp": True, "convnextv2-linear-mlp": False}
MODELS = ["mobilenet_v2", "regnet_x_400mf", FROZEN_BN, *GRN]


def build_model(name):
    if name in GRN:
        model = build_timm("convnextv2_atto", conv_mlp=GRN[name])
        with torch.no_grad():  # timm starts GRN at zero scale and shift, where it is the identity
            for m in model.modules():
                if layer_kind(m) in ("grn", "grn_last"):
                    m.weight.normal_(0, 0.5), m.bias.normal_(0, 0.1)
        return model
    if name != FROZEN_BN:
        return build(name)
    model = build("resnet18", norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():  # statistics of real magnitude: not the identity FrozenBatchNorm2d starts as
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1), m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(1, 4)
    return model


@pytest.fixture(scope="module", params=MODELS)
def analysed(request):
    torch.manual_seed(0)
    size = input_size(request.param)
    model = with_real_statistics(build_model(request.param), size=size)
    return model, cz.analyze(model, torch.randn(1, 3, size, size))


def test_the_models_hold_every_kind_of_the_table():
    """A new entry needs a model here that has it."""
    kinds = {layer_kind(m) for name in MODELS for m in build_model(name).modules()}
    assert set(LAYER_KINDS) <= kinds, sorted(set(LAYER_KINDS) - kinds)


def test_every_kind_slims_and_costs_what_is_measured(analysed):
    model, space = analysed
    cfg = space.uniform(0.5)
    small = cz.slim(model, space, cfg, "left")  # checks that the masked supernet computes the same
    assert cz.measure_flops(small, space.example_input) == space.flops(cfg)
    assert cz.count_params(small) == space.params(cfg)
    original = dict(model.named_modules())
    present, changed = set(), set()
    for name, module in small.named_modules():
        kind = kind_of(module)
        if kind is None:
            continue
        present.add(kind.name)
        sizes = (kind.size(module, "out"), kind.size(module, "in"))
        assert module.weight.shape[0] == sizes[0], name
        if kind.in_dim is not None:
            assert module.weight.shape[kind.in_dim] * getattr(module, "groups", 1) == sizes[1], name
        if sizes != (kind.size(original[name], "out"), kind.size(original[name], "in")):
            changed.add(kind.name)
    # every kind that a width group may touch was slimmed somewhere; the others never. ConvNeXt-V2
    # slims only its MLP (conv or linear, GRN): its depthwise convs and classifier keep the residual
    # stream's width, which its LayerNorms fix
    maskable = {k for k in present if LAYER_KINDS[k].maskable}
    if any(k.startswith("grn") for k in present):
        assert changed & {"grn", "grn_last"} and changed <= maskable
    else:
        assert changed == maskable


def test_every_timed_kind_probes_the_widths_asked_for(analysed):
    model, space = analysed
    probed = set()
    for layer in find_layers(model, space):
        if layer.kind in probed:
            continue
        probed.add(layer.kind)
        kind = LAYER_KINDS[layer.kind]
        cout = int(widths(space, layer.cout)[-1])
        cin = cout if layer.in_follows_out else int(widths(space, layer.cin)[-1])
        module, x = layer.module_and_input(cin, cout, batch=2)
        assert kind_of(module) is kind
        with torch.no_grad():
            y = module(x)
        assert y.shape[0] == 2 and y.shape[kind.channel_dim] == cout
    kinds = {kind_of(m).name for m in model.modules() if kind_of(m) is not None}
    assert probed == {k for k in kinds if LAYER_KINDS[k].probe is not None}
