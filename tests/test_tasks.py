"""Beyond classification: torchvision's detection and segmentation models analysed and slimmed with
parity (backbone, FPN and heads), and compress() with a detection and a segmentation task on a
synthetic data set of rectangles and discs drawn on generated images."""
import json
import math
import os

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

import compressor as cz
from compressor.errors import ConfigError
from compressor.heads import raw_outputs
from compressor.tasks import Task, detection, segmentation
from conftest import assert_unchanged, snapshot

SIZE = 128
DETECTION = {  # torchvision builder: keyword arguments (min/max size: the transform resizes to SIZE)
    "ssdlite320_mobilenet_v3_large": {},  # SSD resizes every image to its fixed 320 x 320
    "fasterrcnn_mobilenet_v3_large_fpn": dict(min_size=SIZE, max_size=SIZE),
    "retinanet_resnet50_fpn": dict(min_size=SIZE, max_size=SIZE),
    "fcos_resnet50_fpn": dict(min_size=SIZE, max_size=SIZE),
}
SEGMENTATION = {"lraspp_mobilenet_v3_large": {}, "deeplabv3_mobilenet_v3_large": {}}
# the layers whose output channels are the model's raw outputs (classes or anchors x values): frozen
OUTPUT_LAYERS = {
    "ssdlite320_mobilenet_v3_large": [f"head.{h}_head.module_list.{i}.1" for h in ("classification", "regression")
                                      for i in range(6)],
    "fasterrcnn_mobilenet_v3_large_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred",
                                          "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"],
    "retinanet_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
    "fcos_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                          "head.regression_head.bbox_ctrness"],
    "lraspp_mobilenet_v3_large": ["classifier.low_classifier"],  # its group holds high_classifier (summed)
    "deeplabv3_mobilenet_v3_large": ["classifier.4"],
}


def build(name, classes=3):
    """A random-init model (no downloads) with batch-norm statistics of real magnitude."""
    torch.manual_seed(0)
    if name in DETECTION:
        model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None,
                                                            num_classes=classes, **DETECTION[name])
    else:
        model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                               num_classes=classes)
    return with_statistics(model)


def with_statistics(model):
    """Random-init batch norms hold (0, 1) statistics, which shrink activations to nothing; estimate
    them on random images with the model in eval mode (a detector's train mode needs targets)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        model(torch.rand(4, 3, SIZE, SIZE))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize("name", [*DETECTION, *SEGMENTATION])
def test_analyze_and_slim_with_parity(name):
    """Every model analyses, its output layers are frozen with their reason, backbone, FPN and head
    groups are slimmed, and slim's parity check (the heads' raw outputs for a detector) passes at
    the smallest and a random configuration; the cost model is exact and the slim model still runs
    end to end (boxes for a detector, an 'out' map for a segmenter)."""
    model = build(name)
    before = snapshot(model)
    x = torch.rand(1, 3, SIZE, SIZE)
    space = cz.analyze(model, x)
    names = [g.name for g in space.groups]
    for layer in OUTPUT_LAYERS[name]:
        assert "reach the model output" in space.frozen[layer], (layer, space.frozen.get(layer))
    assert any(n.startswith("backbone") for n in names)
    if name in DETECTION and name != "ssdlite320_mobilenet_v3_large":
        assert any(".fpn." in n for n in names)  # the FPN's output width is one group, heads included
    if name == "ssdlite320_mobilenet_v3_large":
        assert any(n.startswith("head.") for n in names)  # the depthwise-separable head's inner width
    if name == "fcos_resnet50_fpn":  # GroupNorm cannot be masked exactly: its towers keep their width
        assert all("GroupNorm" in space.frozen[f"head.{h}_head.conv.{i}"]
                   for h in ("classification", "regression") for i in (0, 3, 6, 9))
    for cfg in (space.min(), space.random(seed=1)):
        small = cz.slim(model, space, cfg)  # raises UnsupportedModelError on a parity failure
        assert cz.count_params(small) == space.params(cfg) < cz.count_params(model)
        if name != "fasterrcnn_mobilenet_v3_large_fpn":  # its box head runs once per proposal: see below
            assert cz.measure_flops(small, x) == space.flops(cfg)
        with torch.no_grad():
            out = small(x)
        assert set(out[0]) >= {"boxes", "scores", "labels"} if name in DETECTION else out["out"].shape[-2:] == (SIZE, SIZE)
    assert_unchanged(model, before)


def test_frozen_batch_norm_backbone():
    """With pretrained weights torchvision builds a detector's backbone with FrozenBatchNorm2d (four
    buffers, no parameters): its channels are slimmed with the convolutions around it, with parity
    and exact cost, instead of freezing the backbone."""
    model = build("retinanet_resnet50_fpn")
    for parent in list(model.backbone.body.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):  # as torchvision's builder with weights_backbone
                frozen = FrozenBatchNorm2d(child.num_features, child.eps)
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, k).copy_(getattr(child, k).detach())
                setattr(parent, child_name, frozen)
    x = torch.rand(1, 3, SIZE, SIZE)
    space = cz.analyze(model, x)
    body = [g for g in space.groups if g.name.startswith("backbone.body")]
    assert body and any(m.kind == "frozen_bn" for g in body for m in g.members)
    assert not [n for n in space.frozen if n.startswith("backbone")]
    for cfg in (space.min(), space.random(seed=2)):
        small = cz.slim(model, space, cfg)
        assert cz.measure_flops(small, x) == space.flops(cfg)
        assert cz.count_params(small) == space.params(cfg)
        assert small.backbone.body.layer2[0].bn1.weight.shape[0] == small.backbone.body.layer2[0].conv1.out_channels


def test_mask_rcnn_is_refused_by_analyze():
    """Its mask head reads the FPN at the detected boxes only: refused, naming the module and op."""
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                               min_size=SIZE, max_size=SIZE)
    with pytest.raises(cz.UnsupportedModelError, match="roi_heads.mask_head") as e:
        cz.analyze(model, torch.rand(1, 3, SIZE, SIZE))
    assert e.value.module == "roi_heads.mask_head" and "RoIAlign" in e.value.op


def test_parity_compares_head_outputs_not_post_processed_boxes():
    """A detector's parity is checked on the heads' raw maps: equal for the slim and the masked
    model, and a changed head weight shows in them (the check can fail)."""
    model = build("retinanet_resnet50_fpn")
    x = torch.rand(1, 3, SIZE, SIZE)
    space = cz.analyze(model, x)
    cfg = space.uniform(0.5)
    small = cz.slim(model, space, cfg)
    net = cz.supernet(model, space).set(cfg).eval()
    with torch.no_grad():
        masked, sliced = raw_outputs(net.model, x), raw_outputs(small, x)
        assert len(masked) == 10  # classification and regression maps of 5 FPN levels
        for a, b in zip(masked, sliced):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-4 * a.abs().max()
        small.head.regression_head.conv[0][0].weight.add_(0.1)
        changed = raw_outputs(small, x)
    assert max((a - b).abs().max() / a.abs().max() for a, b in zip(masked, changed)) > 1e-3


# -- compress() with a task, on shapes drawn on generated images ----------------------------------
class Shapes(torch.utils.data.Dataset):
    """`n` generated images (noise), each with one to three filled rectangles (class 1) and discs
    (class 2) of random colours; items (image, {"boxes", "labels"}) for detection, (image, mask)
    for segmentation. Image i is drawn from a generator seeded by (seed, i)."""

    def __init__(self, n, kind, seed=0, size=SIZE):
        self.n, self.kind, self.seed, self.size = n, kind, seed, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        s = self.size
        image = 0.2 * torch.rand(3, s, s, generator=g)
        mask = torch.zeros(s, s, dtype=torch.long)
        boxes, labels = [], []
        rows, cols = torch.arange(s)[:, None], torch.arange(s)[None, :]
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            label = int(torch.randint(1, 3, (1,), generator=g))
            w, h = (int(v) for v in torch.randint(s // 6, s // 3, (2,), generator=g))
            x0, y0 = int(torch.randint(0, s - w, (1,), generator=g)), int(torch.randint(0, s - h, (1,), generator=g))
            inside = (rows >= y0) & (rows < y0 + h) & (cols >= x0) & (cols < x0 + w)
            if label == 2:  # the disc (ellipse) inscribed in the box
                inside &= ((cols + 0.5 - x0 - w / 2) / (w / 2)) ** 2 + ((rows + 0.5 - y0 - h / 2) / (h / 2)) ** 2 <= 1
            image[:, inside] = (0.3 + 0.7 * torch.rand(3, generator=g))[:, None]
            mask[inside] = label
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        if self.kind == "segmentation":
            return image, mask
        return image, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def ssdlite():
    """The detector of the compress() test, as model.pt names it (source='test_tasks:ssdlite')."""
    return torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=3)


def lraspp():
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=3)


FAST = dict(batch_size=4, search_fraction=0.25, supernet_epochs=0, finetune_epochs=1, progress=False,
            method_options={"batches": 2, "positions": 8, "local": 1, "generations": 1})


# SSDlite's summed losses from random weights diverge at compress()'s fine-tuning lr of 0.01
@pytest.mark.parametrize("kind,factory,budget,lr", [("detection", ssdlite, "flops<=70%", 0.001),
                                                    ("segmentation", lraspp, "flops<=60%", 0.01)])
def test_compress_with_a_task(kind, factory, budget, lr, tmp_path):
    """compress() with the task's loss and score: budget met (measured), fine-tuning with the
    task's loss raises the task's score on val_data above the (random-weight) original's, the
    slim model runs as the original does, the search scored candidates with the task's score, the
    report is written."""
    torch.manual_seed(0)
    model = with_statistics(factory())
    before = snapshot(model)
    task = detection() if kind == "detection" else segmentation()
    train, val = Shapes(24, kind), Shapes(8, kind, seed=1)
    result = cz.compress(model, budget, train, val, task=task, out_dir=str(tmp_path), source=f"test_tasks:{factory.__name__}",
                         finetune_lr=lr, **FAST)
    assert result.meets_budget()
    assert result.result["flops"] <= 0.7 * result.original["flops"] if kind == "detection" else \
        result.result["flops"] <= 0.6 * result.original["flops"]
    assert result.result["params"] < result.original["params"]
    # the task's held-out score: minus a loss (detection), a mean IoU in [0, 1] (segmentation)
    held_out = [e["score_left"] for e in result.search["history"]]
    assert all(math.isfinite(v) for v in held_out) and held_out
    assert all(v < 0 for v in held_out) if kind == "detection" else all(0 <= v <= 1 for v in held_out)
    measured = task.score(result.model, torch.utils.data.DataLoader(val, batch_size=4, collate_fn=task.collate))
    assert result.result["score"] == pytest.approx(measured)
    assert result.result["score"] > result.original["score"]
    with torch.no_grad():
        out = result.model.eval()(torch.rand(1, 3, SIZE, SIZE))
    if kind == "detection":
        assert set(out[0]) >= {"boxes", "scores", "labels"}
    else:
        assert out["out"].shape == (1, 3, SIZE, SIZE)
    report = json.loads(open(os.path.join(tmp_path, "report.json")).read())
    assert report["search"]["task"] == kind and report["meets_budget"]
    assert "score" in report["original"] and "accuracy" not in report["original"]
    assert os.path.isfile(os.path.join(tmp_path, "model.pt"))
    assert_unchanged(model, before)


def test_a_bad_task_is_refused_before_any_work():
    """A loss that is no scalar tensor, a score per batch instead of per image, an unknown task
    name, or an option a task cannot run with: ConfigError naming the fix."""
    model = lraspp()
    train = Shapes(8, "segmentation")
    seg = segmentation()
    no_scalar = Task("mine", loss=lambda m, b: torch.nn.functional.cross_entropy(
        m(b[0])["out"], b[1], reduction="none"), samples=seg.samples)
    with pytest.raises(ConfigError, match="one scalar tensor"):
        cz.compress(model, "flops<=50%", train, task=no_scalar, progress=False)
    detached = Task("mine", loss=lambda m, b: seg.loss(m, b).detach(), samples=seg.samples)
    with pytest.raises(ConfigError, match="without a gradient"):
        cz.compress(model, "flops<=50%", train, task=detached, progress=False)
    per_batch = Task("mine", loss=seg.loss, samples=lambda m, b: seg.samples(m, b).mean())
    with pytest.raises(ConfigError, match="one finite score per image"):
        cz.compress(model, "flops<=50%", train, task=per_batch, progress=False)
    with pytest.raises(ConfigError, match="unknown task 'detect'"):
        cz.compress(model, "flops<=50%", train, task="detect", progress=False)
    with pytest.raises(ConfigError, match="method='ua' trains with the classification loss.*'bcnet'"):
        cz.compress(model, "flops<=50%", train, task=seg, method="ua", progress=False)
    with pytest.raises(ConfigError, match="leave output_fn out"):
        cz.compress(model, "flops<=50%", train, task=seg, output_fn=lambda out: out["out"], progress=False)
    with pytest.raises(ConfigError, match="detection.*loss.*failed"):  # segmentation items for a detector
        cz.compress(ssdlite(), "flops<=50%", train, task="detection", progress=False)
    rcnn = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None,
                                                                        num_classes=3)
    with pytest.raises(ConfigError, match="flops budget cannot be met exactly.*params<=50%"):
        cz.compress(rcnn, "flops<=50%", Shapes(8, "detection"), task="detection", progress=False)


@pytest.mark.parametrize("method", ["bcnet", "cafenet"])
def test_a_supernet_method_trains_and_searches_with_the_task(method, tmp_path):
    """BCNet (both sides, complementary pairs) and CafeNet (min-min over placements) train their
    supernet on the task's loss and search with its per-image score: budget met, mean IoU above the
    random-weight original's, every scored candidate a mean IoU; the kept supernet.pt records the
    task, and search_trained (which scores with classification) refuses it by name."""
    torch.manual_seed(0)
    model = with_statistics(lraspp())
    before = snapshot(model)
    train, val = Shapes(24, "segmentation"), Shapes(8, "segmentation", seed=1)
    options = {k: v for k, v in FAST.items() if k != "method_options"}
    result = cz.compress(model, "flops<=60%", train, val, task="segmentation", method=method, out_dir=str(tmp_path),
                         source="test_tasks:lraspp",
                         **dict(options, supernet_epochs=1, effort=0.05))
    assert result.meets_budget() and result.result["flops"] <= 0.6 * result.original["flops"]
    assert result.supernet["trained"] and result.supernet["steps"] > 0
    scored = [v for e in result.search["history"] for v in (e["score_left"], e["score_right"]) if not math.isnan(v)]
    assert scored and all(0 <= v <= 1 for v in scored)
    assert result.result["score"] > result.original["score"]
    with pytest.raises(ConfigError, match="trained with task 'segmentation'"):
        cz.search_trained(str(tmp_path), model, ["flops<=50%"], train, val, progress=False)
    assert_unchanged(model, before)


def test_compress_faster_rcnn_on_a_parameter_budget():
    """Faster R-CNN runs through compress() on a parameter budget (its FLOPs follow the proposals:
    a FLOPs budget is refused above): reconstruction leaves the box head, which runs on the regions
    each model proposes, as it is (refitting it paired rows of different regions and failed).
    No fine-tuning here: from random weights, six 4-image steps blow its held-out loss up (README)."""
    model = build("fasterrcnn_mobilenet_v3_large_fpn")
    before = snapshot(model)
    result = cz.compress(model, "params<=70%", Shapes(24, "detection"), Shapes(8, "detection", seed=1),
                         task="detection", **dict(FAST, finetune_epochs=0))
    assert result.meets_budget() and result.result["params"] <= 0.7 * result.original["params"]
    assert math.isfinite(result.result["score"])
    with torch.no_grad():
        out = result.model.eval()(torch.rand(1, 3, SIZE, SIZE))
    assert set(out[0]) >= {"boxes", "scores", "labels"}
    assert_unchanged(model, before)
