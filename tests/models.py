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
# dynamic padding), a plain ResNet variant, and CSPNet's channel split that analyze refuses.
TIMM_CI_SUBSET = ["mobilenetv3_small_050", "tf_efficientnet_lite0", "resnet10t", "cspresnet50"]


def input_size(name, default=DEFAULT_SIZE):
    """The square input size a model is tested at."""
    if name.startswith("vit_"):
        return 224
    return INPUT_SIZE.get(name, default)


def build(name, **kwargs):
    """A randomly initialised torchvision model."""
    return torchvision.models.get_model(name, weights=None, **kwargs)


def build_timm(name, **kwargs):
    """A randomly initialised timm model (never downloads weights)."""
    import timm
    return timm.create_model(name, pretrained=False, **kwargs)
