"""Wall-clock latency of a model on the CPU in torch eager mode, for the before/after report."""
import torch
from torch import nn

from .latency.stats import time_calls


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, example_input: torch.Tensor, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of one forward pass of `example_input` (eval mode, flag restored)."""
    training = model.training
    model.eval()
    try:
        return time_calls(lambda: model(example_input), warmup=warmup, reps=reps, warn=False).median_us / 1e3
    finally:
        model.train(training)
