"""Wall time of a job's named stages: `with clock("search"): ...` adds the seconds to
clock.timings["search_s"], so a report says where the time went without a time.time() per line."""
from __future__ import annotations

import contextlib
import time


class Stopwatch:
    def __init__(self):
        self.timings = {}
        self.start = time.time()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t = time.time()
        try:
            yield
        finally:
            key = stage + "_s"
            self.timings[key] = self.timings.get(key, 0.0) + time.time() - t

    def total(self) -> dict:
        """The stage timings plus total_s, rounded to 10 ms."""
        return {k: round(v, 2) for k, v in {**self.timings, "total_s": time.time() - self.start}.items()}
