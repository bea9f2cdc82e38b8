"""The one list of test models: torchvision classification models with the input size each
needs, and the representative subset that the slim and export tests run. benchmarks/coverage.py
reads the same sizes."""
import torchvision

DEFAULT_SIZE = 64
# Models whose forward needs a particular input size (the ViTs: 224, their patch grid is fixed).
INPUT_SIZE = {"inception_v3": 96, "googlenet": 64, "maxvit_t": 224}

# The representative subset CI runs at small input size: residual adds, grouped and depthwise
# convs, squeeze-excitation, concatenation, channel shuffle, fire modules, a plain VGG.
CI_SUBSET = ["resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
             "densenet121", "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_0", "vgg11_bn"]


# timm models CI runs (timm 1.0.x, random weights, 64x64): BatchNormAct2d (mobilenetv3, a BN
# subclass that also applies its activation), Conv2dSame (tf_efficientnet_lite0, TF "same"
# dynamic padding), a plain ResNet variant, and CSPNet's channel split (mapped by analyze, its
# fixed-size pieces kept).
TIMM_CI_SUBSET = ["mobilenetv3_small_050", "tf_efficientnet_lite0", "resnet10t", "cspresnet50"]


# One small model per timm CNN family (and CNN-transformer hybrids), the list benchmarks/coverage.py
# --zoo timm sweeps: family -> model.
TIMM_FAMILIES = {
    "resnet": "resnet18", "resnet-d": "resnet18d", "resnet-t": "resnet10t", "resnet26t": "resnet26t",
    "seresnet": "seresnet18", "ecaresnet": "ecaresnet26t", "resnext (byob)": "resnext26ts",
    "resnetv2": "resnetv2_18", "resnetblur": "resnetblur18", "skresnet": "skresnet18", "resnest": "resnest14d",
    "res2net": "res2net50_14w_8s", "regnetx": "regnetx_002", "regnety": "regnety_002", "regnetz": "regnetz_005",
    "efficientnet": "efficientnet_b0", "tf_efficientnet": "tf_efficientnet_b0",
    "efficientnet_lite": "tf_efficientnet_lite0", "efficientnetv2": "tf_efficientnetv2_b0",
    "mobilenetv2": "mobilenetv2_050", "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv4": "mobilenetv4_conv_small_050", "mnasnet": "mnasnet_050", "semnasnet": "semnasnet_050",
    "fbnet": "fbnetc_100", "fbnetv3": "fbnetv3_b", "lcnet": "lcnet_035", "mixnet": "mixnet_s",
    "spnasnet": "spnasnet_100", "tinynet": "tinynet_e", "hardcorenas": "hardcorenas_a", "ghostnet": "ghostnet_050",
    "ghostnetv2": "ghostnetv2_100", "repghost": "repghostnet_050", "densenet": "densenet121", "dla": "dla34",
    "dla_c": "dla46_c", "dpn": "dpn48b", "vovnet": "ese_vovnet19b_slim_dw", "hrnet": "hrnet_w18_small",
    "rexnet": "rexnet_100", "cspnet": "cspresnet50", "cs3darknet": "cs3darknet_s", "cspnext": "cspnext_tiny",
    "darknet": "darknet17", "selecsls": "selecsls42b", "xception_aligned": "xception41",
    "xception": "legacy_xception", "inception_v3": "inception_v3", "inception_v4": "inception_v4",
    "inception_resnet_v2": "inception_resnet_v2", "vgg": "vgg11_bn", "convnext": "convnext_atto",
    "convnextv2": "convnextv2_atto", "nfnet (nf_regnet)": "nf_regnet_b0", "gernet": "gernet_s",
    "repvgg": "repvgg_a0", "mobileone": "mobileone_s0", "hgnet": "hgnet_tiny", "hgnetv2": "hgnetv2_b0",
    "repvit": "repvit_m0_9", "fastvit": "fastvit_t8", "efficientformer": "efficientformer_l1",
    "edgenext": "edgenext_xx_small", "mobilevit": "mobilevit_xxs", "mobilevitv2": "mobilevitv2_050",
    "tresnet": "tresnet_m", "legacy_senet": "legacy_seresnet18", "gcresnet": "gcresnet33ts",
    "starnet": "starnet_s050", "fasternet": "fasternet_t0", "inception_next": "inception_next_atto",
    "efficientvit_mit": "efficientvit_b0", "efficientvit_msra": "efficientvit_m0", "mambaout": "mambaout_femto",
    "rdnet": "rdnet_tiny", "lcnetv2": "lcnetv2_small", "poolformer": "poolformer_s12", "visformer": "visformer_tiny",
}
TIMM_INPUT_SIZE = {"inception_v3": 96, "inception_v4": 96, "inception_resnet_v2": 96, "legacy_xception": 96}


def input_size(name, default=DEFAULT_SIZE):
    """The square input size a model is tested at."""
    if name.startswith("vit_"):
        return 224
    return INPUT_SIZE.get(name, TIMM_INPUT_SIZE.get(name, default))


def build(name, **kwargs):
    """A randomly initialised torchvision model."""
    return torchvision.models.get_model(name, weights=None, **kwargs)


def build_timm(name, **kwargs):
    """A randomly initialised timm model (never downloads weights)."""
    import timm
    return timm.create_model(name, pretrained=False, **kwargs)
