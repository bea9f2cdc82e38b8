"""The raw tensors a torchvision detection model computes before its post-processing.

In eval mode a detector returns boxes after score thresholds, top-k and non-maximum suppression:
outputs of a discontinuous function, where a 1e-7 difference between two equal networks can swap
two boxes. Analysis traces, and slim's parity check compares, what the heads compute instead: the
regression and classification maps of SSD, RetinaNet and FCOS per feature level, and of Faster R-CNN
the region proposal head and the box predictor (with the box head and the FPN features it reads).
The model still runs its whole forward pass (the hooks only keep what the heads return), so every
layer the model runs is in the graph. Any other model's output is its own."""
from __future__ import annotations

from torch import nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

from .errors import UnsupportedModelError


def head_modules(model: nn.Module) -> list:
    """The modules whose outputs are a torchvision detector's raw outputs; [] for any other model.
    The per-level maps before the heads reshape them to (anchors, values): Torch-Pruning's tracing
    of those reshapes and concatenations over six levels runs for minutes (SSDlite: over 300 s)."""
    if isinstance(model, SSD):  # one module per level, each run on its level's features
        return [*model.head.classification_head.module_list, *model.head.regression_head.module_list]
    if isinstance(model, RetinaNet):  # each run on every level
        return [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg]
    if isinstance(model, FCOS):
        return [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg,
                model.head.regression_head.bbox_ctrness]
    if isinstance(model, GeneralizedRCNN):  # Faster R-CNN (check_supported): per-level maps already
        return [model.rpn.head, model.roi_heads.box_predictor]
    return []


def check_supported(model: nn.Module):
    """Mask and Keypoint R-CNN are refused: their mask or keypoint head reads the FPN features at
    the detected boxes, so it runs only when the example image has detections (a random or
    untrained model often has none), and a width the trace never saw it read would be slimmed
    under it."""
    if isinstance(model, GeneralizedRCNN):
        for name in ("mask_head", "keypoint_head"):
            if getattr(model.roi_heads, name, None) is not None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} is not supported: module 'roi_heads.{name}' reads the FPN features "
                    f"at the detected boxes, after non-maximum suppression, so the channel graph cannot be traced "
                    f"from an example image; its Faster R-CNN (without that head) is", module=f"roi_heads.{name}",
                    op="MultiScaleRoIAlign on detections")


def data_dependent_cost(model: nn.Module) -> str | None:
    """Why the model's FLOPs depend on the image (then only a parameter budget can be met
    exactly), or None. Faster R-CNN's box head runs once per proposal that survives the RPN's
    non-maximum suppression: 254 on the analysis image and 259 on the slim model's in a test."""
    if isinstance(model, GeneralizedRCNN):
        return ("its box head ('roi_heads.box_head') runs once per region proposal that survives non-maximum "
                "suppression, so its FLOPs change with the image and with the slimmed RPN")
    return None


def region_layers(model: nn.Module) -> tuple:
    """Name prefixes of the layers that run on the regions a detector proposes (Faster R-CNN's box
    head and predictor): the full and the slim model propose different regions, so these layers'
    inputs and outputs do not pair up row by row, and reconstruction leaves them as they are."""
    return ("roi_heads.",) if isinstance(model, GeneralizedRCNN) else ()


def raw_outputs(model: nn.Module, *args):
    """model(*args), or a detector's head outputs from that forward pass (a list in the order they
    were computed)."""
    heads = head_modules(model)
    if not heads:
        return model(*args)
    captured = []
    handles = [m.register_forward_hook(lambda m, i, out: captured.append(out)) for m in heads]
    try:
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return captured
