"""A model run in eval mode for a moment: its modules' train/eval modes are restored afterwards.
Analysis, stage detection, latency probing, reconstruction and scoring all need it (batch norms must
use, not update, their running statistics)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model` in eval mode inside the block; every module's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def hooked_forward(model: nn.Module, inputs, register):
    """One forward of `inputs` without gradients, in eval mode, with the hooks `register()` returns
    (removed afterwards; the modules' modes restored). Returns the output."""
    with eval_mode(model):
        handles = []
        try:
            handles = register()
            with torch.no_grad():
                return model(inputs)
        finally:
            for h in handles:
                h.remove()
