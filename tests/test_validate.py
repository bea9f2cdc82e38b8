"""What compress() checks before training, and the checks its loops make on every batch: real data
(image folders of real PNG/JPEG files, DataLoaders), real models (TinyNet, torchvision GoogLeNet),
no mocks. Each bad input must be a CompressorError naming the problem, raised before training."""
import copy
import logging

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchvision.datasets import ImageFolder

import compressor as cz
from compressor.data import image_folder
from compressor.progress import Progress
from conftest import TinyNet, assert_unchanged, quadrant_data, snapshot

FAST = dict(supernet_epochs=0.25, finetune_epochs=0.1, batch_size=16, effort=0.05, bins=4, divisor=1,
            calib_batches=1, progress=False)


def write_folder(root, classes, per_class=4, size=16, ext="png", seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{ext}")
    return root


def fails_before_training(model, train, val=None, tmp_path=None, match="", error=cz.ConfigError, **options):
    """compress() raises `error` matching `match`, and nothing was trained or written."""
    out = tmp_path / "out" if tmp_path else None
    options = {**FAST, **options}
    with pytest.raises(error, match=match) as e:
        cz.compress(model, "flops<=50%", train, val, out_dir=str(out) if out else None, **options)
    assert out is None or not (out / "checkpoints").exists()
    return e.value


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet(classes=4, width=8)


# -- item 5: a batched example input -----------------------------------------------------------
def test_a_batched_example_input_gives_per_sample_costs(net):
    before = snapshot(net)
    result = cz.compress(net, "flops<=50%", quadrant_data(128), example_input=torch.randn(4, 3, 16, 16), **FAST)
    assert_unchanged(net, before)
    one = torch.randn(1, 3, 16, 16)
    assert result.original["flops"] == cz.measure_flops(copy.deepcopy(net).eval(), one)
    assert result.result["flops"] == cz.measure_flops(result.model.eval(), one) <= result.limits["flops"]
    assert result.meets_budget()


# -- item 6: bad data --------------------------------------------------------------------------
def test_validation_labels_outside_the_models_classes(net, tmp_path):
    val = TensorDataset(torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 7]))
    fails_before_training(net, quadrant_data(64), val, tmp_path, match="val_data: label 7 is outside the model's 4")


def test_a_bad_validation_label_in_a_later_batch_of_a_plain_dataset(net, tmp_path):
    """A dataset that does not keep its labels: found as the original's accuracy is measured, first."""
    val = [(torch.randn(3, 16, 16), i % 4) for i in range(40)] + [(torch.randn(3, 16, 16), 9)]
    fails_before_training(net, quadrant_data(64), val, tmp_path, match="evaluation batch 2: label 9 is outside")


def test_train_and_val_folders_with_different_classes(net, tmp_path):
    train = image_folder(write_folder(tmp_path / "train", ["ant", "bee", "cat", "dog"]), 16)
    val = image_folder(write_folder(tmp_path / "val", ["ant", "bee", "cat", "eel"]), 16)
    fails_before_training(net, train, val, tmp_path, batch_size=4,
                          match=r"different classes \(only in train_data: \['dog'\]; only in val_data: \['eel'\]\)")


def test_a_one_class_folder(net, tmp_path):
    train = image_folder(write_folder(tmp_path / "train", ["only"], per_class=8), 16)
    fails_before_training(net, train, None, tmp_path, batch_size=4, match="only one class")


# -- clear errors ------------------------------------------------------------------------------
def _tuples_from_dicts(items):
    return torch.stack([d["image"] for d in items]), torch.tensor([d["label"] for d in items])


class Mapped(torch.utils.data.Dataset):
    """`data` with each item i replaced by fn(i, x, y)."""

    def __init__(self, data, fn):
        self.data, self.fn = data, fn

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.fn(i, *self.data[i])


def DictDataset(data):
    return Mapped(data, lambda i, x, y: {"image": x, "label": int(y)})


def test_dataloaders_with_their_own_collate_are_accepted(net):
    """DataLoaders for train and val, over a dataset of dicts that only their collate_fn turns into
    (images, labels): their batch size and collate function are used for every stage."""
    train = DataLoader(DictDataset(quadrant_data(128)), batch_size=16, collate_fn=_tuples_from_dicts)
    val = DataLoader(DictDataset(quadrant_data(32, seed=1)), batch_size=8, collate_fn=_tuples_from_dicts)
    result = cz.compress(net, "flops<=50%", train, val, **dict(FAST, batch_size=64))
    assert result.meets_budget() and 0 <= result.result["accuracy"] <= 1
    # without the collate function the same dataset is refused up front, naming the keys
    fails_before_training(net, DictDataset(quadrant_data(64)), match=r"dicts with keys \['image', 'label'\]")


@pytest.mark.parametrize("make, match", [
    (lambda tmp: ImageFolder(str(write_folder(tmp / "pil", ["a", "b"]))), "PIL images: add transforms.ToTensor"),
    (lambda tmp: [(np.zeros((16, 16, 3), np.uint8), i % 2) for i in range(32)], r"uint8 .* \(numpy arrays\)"),
    (lambda tmp: TensorDataset(torch.randn(32, 3, 16, 16), nn.functional.one_hot(torch.arange(32) % 4).float()),
     "one-hot"),
    (lambda tmp: [(torch.randn(3, 16 + 4 * (i % 2), 16), i % 4) for i in range(32)], "images of different sizes"),
    (lambda tmp: TensorDataset(torch.randn(0, 3, 16, 16), torch.zeros(0, dtype=torch.long)), "train_data is empty"),
])
def test_bad_training_items(net, tmp_path, make, match):
    fails_before_training(net, make(tmp_path), None, tmp_path, batch_size=4, match=match)


def test_an_iterable_dataset(net):
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(quadrant_data(32))
    fails_before_training(net, Stream(), match="IterableDataset")
    fails_before_training(net, DataLoader(Stream(), batch_size=4), match="IterableDataset")


def test_options(net, tmp_path):
    data = quadrant_data(64)
    fails_before_training(net, data, match="batch_size must be a positive integer", batch_size=0)
    fails_before_training(net, data, TensorDataset(torch.randn(0, 3, 16, 16), torch.zeros(0).long()),
                          match="val_data is empty")
    fails_before_training(net, data, match=r"search_fraction=0.01 of 64 .* holds out none", search_fraction=0.01)
    fails_before_training(net, data, match=r"unknown latency_options \['calibraton'\]: valid keys are .*calibration",
                          latency_options={"calibraton": 3})
    fails_before_training(net, data, match="bad device 'gpu0'", device="gpu0")
    if not torch.cuda.is_available():
        fails_before_training(net, data, match="device='cuda' but .* sees no CUDA GPU", device="cuda")
    fails_before_training(torch.jit.script(net), data, match="pass the eager module")


@pytest.mark.parametrize("folder", ["compressor", "torchvision"])
def test_a_corrupt_image_in_a_run_is_named(net, tmp_path, folder):
    """Found when the run reads it (not among the items read up front), named, for the project's
    image_folder and for a user's own torchvision ImageFolder (left unchanged)."""
    root = write_folder(tmp_path / "train", ["a", "b", "c", "d"], per_class=8, ext="jpg")
    corrupt = root / "b" / "3.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a real JPEG header, truncated: undecodable
    if folder == "compressor":
        data = image_folder(root, 16)
    else:
        data = ImageFolder(str(root), transform=torchvision.transforms.Compose(
            [torchvision.transforms.Resize(16), torchvision.transforms.ToTensor()]))
    loader = getattr(data, "loader")
    with pytest.raises(cz.ConfigError, match=f"cannot read image '{corrupt}'"):
        cz.compress(net, "flops<=50%", data, None, **dict(FAST, batch_size=4))
    assert data.loader is loader


def test_models_returning_aux_logits_need_and_use_output_fn():
    """GoogLeNet returns (logits, aux2, aux1) in train mode and a tensor in eval mode; its aux
    classifiers run only in train mode and must be slimmed with the channels they consume."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=4, aux_logits=True, init_weights=False)
    before = snapshot(model)
    data = quadrant_data(48, size=32)
    fails_before_training(model, data, match=r"in train mode, the model returned a GoogLeNetOutputs .*pass output_fn",
                          batch_size=8)
    result = cz.compress(model, "flops<=60%", data, data, output_fn=lambda out: out.logits,
                         **dict(FAST, batch_size=8, divisor=8))
    assert result.meets_budget() and "accuracy" in result.result
    small = result.model.train()
    with torch.no_grad():
        out = small(torch.randn(2, 3, 32, 32))  # the aux heads take the slim channels
    assert out.logits.shape == out.aux_logits1.shape == (2, 4)
    assert_unchanged(model, before)


class DictOutput(nn.Module):
    """A classifier returning {"logits", "features"} in both modes, as detection-style heads do."""

    def __init__(self):
        super().__init__()
        self.body = TinyNet(classes=4, width=8)

    def forward(self, x):
        logits = self.body(x)
        return {"logits": logits, "features": logits.detach() * 2}


def test_models_returning_dicts():
    torch.manual_seed(0)
    model = DictOutput()
    fails_before_training(model, quadrant_data(64), match=r"in eval mode, the model returned a dict with keys "
                                                          r"\['logits', 'features'\]")
    result = cz.compress(model, "flops<=50%", quadrant_data(128), quadrant_data(32, seed=1),
                         output_fn=lambda out: out["logits"], **FAST)
    assert result.meets_budget() and 0 <= result.result["accuracy"] <= 1
    assert result.model(torch.randn(2, 3, 16, 16))["logits"].shape == (2, 4)


class ChunkResidual(nn.Module):
    """A stem whose output is split by torch.chunk: one half feeds a conv, the other is added to it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        return self.fc(torch.relu(self.head(self.conv(a) + b)).mean((2, 3)))


def test_chunk_splits_are_found_by_analyze():
    """Slimming the channels a torch.chunk divides moves its split point (the slim model fails or
    computes something else): analyze keeps them fixed and says why; the rest stays slimmable."""
    model, x = ChunkResidual().eval(), torch.randn(1, 3, 16, 16)
    space = cz.analyze(model, x, bins=4, divisor=1)
    assert [g.name for g in space.groups] == ["head"]
    assert "torch.chunk/split" in space.frozen["conv"]
    for cfg in (space.min(), space.uniform(0.5)):
        small = cz.slim(model, space, cfg)
        assert small.head.out_channels < 24


# -- loops check every batch -------------------------------------------------------------------
def test_a_bad_label_in_a_later_training_batch(net):
    """Data whose labels only show when read (a target_transform ImageFolder-style datasets do not
    apply to `targets`) is checked batch by batch: the error names the step and the label."""
    def Relabel(data):  # one bad label, in whichever batch holds the last item
        return Mapped(data, lambda i, x, y: (x, torch.tensor(7) if i == 63 else y))
    space = cz.analyze(net, torch.randn(1, 3, 16, 16), bins=4, divisor=1)
    with pytest.raises(cz.ConfigError, match=r"supernet training step \d+ \(epoch 0, batch \d\): label 7 is outside"):
        cz.train_supernet(cz.supernet(net, space), Relabel(quadrant_data(64)), steps=8, batch_size=8,
                          progress=False)
    loader = DataLoader(Relabel(quadrant_data(64)), batch_size=8)
    with pytest.raises(cz.ConfigError, match=r"fine-tuning step \d: label 7 is outside"):
        cz.finetune(net, loader, epochs=1, progress=False)


# -- logs a pipeline can read ------------------------------------------------------------------
def test_progress_off_a_terminal_is_a_few_log_lines(net, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="compressor"):
        with Progress(500, "steps", tty=False) as bar:
            for _ in range(500):
                bar.update(1, loss="0.1")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("steps:")]
    assert 20 <= len(lines) <= 22 and lines[-1] == "steps: 500/500 (100%), loss 0.1"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="compressor"):
        cz.finetune(net, quadrant_data(64), epochs=4, batch_size=4, progress=True)  # 64 steps, stderr no tty
    assert "\r" not in capsys.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tune:")]
    assert 10 <= len(lines) <= 22 and lines[-1].startswith("fine-tune: 64/64 (100%)")
