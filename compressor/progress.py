"""Progress of the long loops (supernet training, search, fine-tuning, latency measurements).

On a terminal (stderr is a tty) a tqdm bar; anywhere else (a pipeline, a CI log) a plain log
line at most every `PERCENT_STEP` percent or every `SECONDS` seconds, whichever comes first,
and one at the end: a log a reader (or a parser) can follow, instead of hundreds of
carriage-return updates.
"""
from __future__ import annotations

import logging
import sys
import time

PERCENT_STEP = 5
SECONDS = 10.0


class Progress:
    """`update(n, **postfix)` after each unit of work, `close()` at the end (or use `with`).
    `enabled=False` shows nothing; `tty` forces the choice (default: sys.stderr.isatty())."""

    def __init__(self, total, desc, *, enabled=True, initial=0, log=None, tty=None):
        self.total, self.desc, self.done = total, desc, initial
        self.log = log or logging.getLogger("compressor")
        self.enabled = enabled
        self.bar = None
        self.postfix = {}
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc)
        self._last_time, self._last_done = time.monotonic(), initial

    def update(self, n=1, **postfix):
        self.done += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)
            return
        now = time.monotonic()
        step = max(1, self.total * PERCENT_STEP // 100) if self.total else 1
        if self.done - self._last_done >= step or now - self._last_time >= SECONDS or self.done == self.total:
            self._line()
            self._last_time, self._last_done = now, self.done

    def _line(self):
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        self.log.info("%s: %d/%s%s%s", self.desc, self.done, self.total or "?", percent, extra)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done != self._last_done:
            self._line()
            self._last_done = self.done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def track(iterable, desc, *, total=None, enabled=True, log=None):
    """Iterate `iterable`, reporting progress as Progress does."""
    items = list(iterable) if total is None else iterable
    with Progress(len(items) if total is None else total, desc, enabled=enabled, log=log) as p:
        for item in items:
            yield item
            p.update()
