"""Metric writing: TensorBoard event files and the console, from process 0 only.

`clu.metric_writers` imports tensorflow for its summary writer; certjax does not depend on tensorflow
(a ~600 MB install that nothing else here needs), so scalars go to TensorBoard through tensorboardX, which
writes the same event-file format. Aggregation still uses `clu.metrics` (tensorflow-free).
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger("certjax")


class MetricWriter:
    def __init__(self, logdir: str):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self._writer = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def console(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
