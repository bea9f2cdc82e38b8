"""Runs whose random numbers come from their seed alone. torch seeds its default generator at
random in every process, and the augmentations (data.augment_batch) draw from it: without a seed
of its own, the same compress() call gave another network in another process."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def seeded(seed: int):
    """torch's generators (CPU and every CUDA device) seeded with `seed` inside, restored after, so
    the caller's random numbers are neither reset nor consumed."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
