"""Timing statistics: warm-up, repetitions, median/p90/p99, and a stability check.

Imports neither torch nor anything else of this package, so `ort_bench.py` (which the `.onnx` path
of `compressor bench` uses) stays free of torch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

log = logging.getLogger("compressor.latency")

CV_THRESHOLD = 0.15  # std / mean above this marks a timing as unstable


@dataclass
class Measurement:
    """Latency of one call in microseconds; `unstable` when the spread stayed above the threshold
    after a repeat. `info` carries the target, device and library versions."""
    median_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    cv: float
    reps: int
    batch: int = 1
    unstable: bool = False
    info: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch * 1e6 / self.median_us

    def to_dict(self) -> dict:
        return dict(asdict(self), throughput=self.throughput)


def summarize(times_us, batch=1) -> Measurement:
    t = np.asarray(times_us, dtype=np.float64)
    mean = float(t.mean())
    return Measurement(median_us=float(np.median(t)), p90_us=float(np.percentile(t, 90)),
                       p99_us=float(np.percentile(t, 99)), mean_us=mean,
                       cv=float(t.std() / mean) if mean > 0 else 0.0, reps=len(t), batch=batch)


def time_calls(call, *, warmup=3, reps=20, batch=1, cv_threshold=CV_THRESHOLD, clock=None,
               what="model", warn=True) -> Measurement:
    """Time `call()` `reps` times after `warmup` calls. `clock(call)` returns one call's seconds
    (wall clock by default; CUDA events for GPU targets). When the coefficient of variation exceeds
    `cv_threshold` the whole measurement is repeated once with twice the repetitions; if it is
    still unstable, the result is flagged and (with `warn`) a warning logged."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    clock = clock or _wall_clock
    for attempt in range(2):
        for _ in range(warmup):
            call()
        m = summarize([clock(call) * 1e6 for _ in range(reps)], batch)
        if m.cv <= cv_threshold:
            return m
        reps *= 2
    m.unstable = True
    (log.warning if warn else log.debug)("unstable timing of %s: coefficient of variation %.2f > %.2f after a repeat "
                "(a busy machine?); median %.1f us", what, m.cv, cv_threshold, m.median_us)
    return m


def _wall_clock(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
