"""`compressor demo`: the whole job on an embedded default, in about two minutes on two CPU cores.

A small residual CNN is pretrained on a 10-class shapes task the project draws itself (filled and
hollow discs and squares, triangles, crosses, stripes, dots, at random positions, sizes and
colours, on noise), then compressed to half its FLOPs with compress()'s defaults, and the
before/after table is printed.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

CLASSES = ("disc", "ring", "square", "frame", "triangle", "plus", "cross", "h-stripes", "v-stripes", "dots")


def _draw(label, rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(0.15, 0.3) * size
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = yy - cy, xx - cx
    dist, box = np.hypot(dy, dx), np.maximum(abs(dy), abs(dx))
    shapes = {
        "disc": dist < r,
        "ring": (dist < r) & (dist > 0.6 * r),
        "square": box < r,
        "frame": (box < r) & (box > 0.6 * r),
        "triangle": (dy < r) & (dy > -r) & (abs(dx) < (dy + r) / 2),
        "plus": ((abs(dy) < 0.25 * r) | (abs(dx) < 0.25 * r)) & (box < r),
        "cross": ((abs(dy - dx) < 0.35 * r) | (abs(dy + dx) < 0.35 * r)) & (box < r),
        "h-stripes": (np.floor(yy / max(2, r / 3)) % 2 == 0) & (box < r),
        "v-stripes": (np.floor(xx / max(2, r / 3)) % 2 == 0) & (box < r),
        "dots": (np.hypot(dy, dx - 0.6 * r) < 0.3 * r) | (np.hypot(dy, dx + 0.6 * r) < 0.3 * r),
    }
    mask = shapes[CLASSES[label]].astype(np.float32)
    colour = rng.uniform(0.5, 1.0, 3) * rng.choice([-1, 1])
    return mask[None] * colour[:, None, None] + rng.normal(0, 0.7, (3, size, size))


def shapes_dataset(n=3000, size=24, seed=0):
    """n images (3, size, size) with balanced labels, as a TensorDataset."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    images = np.stack([_draw(int(c), rng, size) for c in labels]).astype(np.float32)
    return torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(labels).long())


def _conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = _conv(channels, channels)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(x + self.conv2(self.conv1(x)))


class DemoNet(nn.Module):
    """A CIFAR-style residual CNN: 8-16-32 channels, about 5 MFLOPs per 24x24 image."""

    def __init__(self, classes=len(CLASSES), width=8):
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, width), Block(width), _conv(width, 2 * width, 2), Block(2 * width),
            _conv(2 * width, 4 * width, 2), Block(4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.fc(self.features(x))


def run_demo(out_dir=None, seed=0, progress=True, budget="flops<=50%"):
    """Pretrain DemoNet, compress it to `budget`, print and return the before/after table."""
    torch.manual_seed(seed)
    # a 5-MFLOP network gains nothing from a second intra-op thread, and on a busy machine the
    # threads' spin-waiting makes every step many times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out_dir, seed, progress, budget)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, seed, progress, budget):
    from .api import compress
    from .finetune import finetune

    t0 = time.time()
    train, test = shapes_dataset(3000, seed=seed), shapes_dataset(1000, seed=seed + 1)
    model = DemoNet()
    print(f"pretraining DemoNet on {len(train)} generated images of {len(CLASSES)} shapes ...", flush=True)
    finetune(model, train, epochs=4, lr=0.1, batch_size=64, seed=seed, progress=progress)
    print(f"compressing to {budget} with compress()'s default method ...", flush=True)
    # divisor 4: the demo's groups have 8 to 32 channels, too few for the default alignment of 8
    result = compress(model, budget, train, test, supernet_epochs=3, finetune_epochs=2, effort=0.15, divisor=4,
                      calib_batches=10, lr=0.05, out_dir=out_dir, seed=seed, progress=progress)
    rows = [("top-1 accuracy (held-out test)", f"{result.original['accuracy']:.1%}", f"{result.result['accuracy']:.1%}"),
            ("MFLOPs per image", f"{result.original['flops'] / 1e6:.2f}", f"{result.result['flops'] / 1e6:.2f}"),
            ("parameters", f"{result.original['params']:,}", f"{result.result['params']:,}"),
            ("CPU latency, batch 1 (ms)", f"{result.original['latency_ms']:.2f}", f"{result.result['latency_ms']:.2f}")]
    print(f"\n{'':32s} {'original':>12s} {'compressed':>12s}")
    for name, a, b in rows:
        print(f"{name:32s} {a:>12s} {b:>12s}")
    print(f"\nwidths kept per group: {result.channels} ({result.side} side); budget {result.budget}: "
          f"{'met' if result.meets_budget() else 'MISSED'}; total {time.time() - t0:.0f}s")
    if result.paths:
        print("wrote " + ", ".join(result.paths.values()))
    return result
