"""Progress on long work (issue 22, point 7): a tqdm bar on a terminal, a line every ~30 s elsewhere.

Training's first epoch (with the compilation of the train step), long epochs, evaluation, certification of
many images, the export and the audit report how far they are. On a terminal that is a tqdm bar on stderr
that disappears when the work ends (the demo still fits on one screen); when stderr is a file or a pipe (a
cluster log, a test) it is one line `certjax: <what>: <done>/<total> <unit> (<percent>), <elapsed> s, about
<left> s left` every CERTJAX_PROGRESS_SECONDS seconds (default 30), and nothing for work shorter than that.
Only process 0 reports. Counting is host-side bookkeeping: no device synchronisation.
"""

from __future__ import annotations

import os
import sys
import time

import jax

DEFAULT_SECONDS = 30.0


def _interval() -> float:
    try:
        return max(float(os.environ.get("CERTJAX_PROGRESS_SECONDS", DEFAULT_SECONDS)), 0.0)
    except ValueError:
        return DEFAULT_SECONDS


class Progress:
    """Counts work done of `total` (None: unknown) and reports it (module docstring).

    Args:
      what: the work, e.g. "evaluate" or "epoch 1". total: units of work, or None. unit: their name.
      stream: where to report (stderr).
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "batches", stream=None):
        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self.stream = sys.stderr if stream is None else stream
        self.start = self.last = time.perf_counter()
        self.interval = _interval()
        self.bar = None
        self.enabled = jax.process_index() == 0
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", leave=False, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval and (self.total is None or self.done < self.total):
            self.last = now
            print(f"certjax: {self.line(now)}", file=self.stream, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        if not self.total:
            return f"{self.what}: {self.done} {self.unit}, {elapsed:.0f} s"
        left = elapsed * (self.total - self.done) / max(self.done, 1)
        percent = 100.0 * self.done / self.total
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} ({percent:.0f} %), {elapsed:.0f} s, "
            f"about {left:.0f} s left"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracked(iterable, what: str | None, total: int | None = None, unit: str = "batches"):
    """Yield from `iterable`, reporting progress as each item is done (what None: silently)."""
    if what is None:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(what, total, unit) as progress:
        for item in iterable:
            yield item
            progress.update()
