"""Wall-clock latency of a model on the CPU: warm-up, repetitions, median (torch eager)."""
import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, example_input: torch.Tensor, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of one forward pass of `example_input` (eval mode, flag restored)."""
    training = model.training
    model.eval()
    for _ in range(warmup):
        model(example_input)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model(example_input)
        times.append(time.perf_counter() - start)
    model.train(training)
    return statistics.median(times) * 1e3
