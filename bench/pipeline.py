"""Pipeline throughput next to the train step's, measured in one run (shared/DESIGN.md, "Data flow" 3).

Prints images/s of (a) the grain pipeline alone (real + generated mix, uint8 batches, reader threads), and
(b) the jitted train step alone on a fixed device batch, and their ratio: the pipeline must never be the
bottleneck (ratio well above 1).

  python bench/pipeline.py --real='../shared/data/cifar10-jpeg-{split}.zip' --width=512 --steps=20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from certjax.experiment import Experiment  # noqa: E402
from certjax.optim import schedules  # noqa: E402
from certjax.train import Trainer  # noqa: E402
from configs.linf_dist import get_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--real", default="demo")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--generated_images", type=int, default=200_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "generated.npz")
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.generated_images, 32, 32, 3), dtype=np.uint8)
        np.savez(npz, image=images, label=rng.integers(0, 10, args.generated_images))
        del images

        config = get_config("")
        config.data.real = args.real
        config.data.generated = npz
        config.model.width, config.model.depth = args.width, args.depth
        config.train.batch_size = args.batch
        exp = Experiment(config)
        trainer = Trainer(exp)

        iterator = exp.batches.iterate(0, args.steps + 2, threads=config.data.reader_threads)
        next(iterator)
        start = time.perf_counter()
        batches = [next(iterator) for _ in range(args.steps)]
        pipeline_s = time.perf_counter() - start
        pipeline_rate = args.steps * args.batch / pipeline_s

        state = exp.init_state()
        batch = jax.device_put(batches[0], exp.batch_sharding)
        rates = {}
        for label, step in (("l_p phase", 0), ("l_inf phase", exp.total_steps - 1)):
            values = {
                k: np.float32(v) for k, v in schedules.schedule_values(config, step, exp.total_steps).items()
            }
            state, _ = trainer.train_step(state, batch, values)  # compile / warm up
            jax.block_until_ready(state.params)
            n = max(args.steps // 4, 2)
            start = time.perf_counter()
            for _ in range(n):
                state, _ = trainer.train_step(state, batch, values)
            jax.block_until_ready(state.params)
            rates[label] = n * args.batch / (time.perf_counter() - start)

    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"width {args.width}, depth {args.depth}, "
        f"batch {args.batch} ({exp.batches.num_real} real + {exp.batches.num_generated} generated)"
    )
    print(f"pipeline:            {pipeline_rate:10.1f} img/s")
    for label, rate in rates.items():
        print(f"train step ({label}): {rate:10.1f} img/s   pipeline / step = {pipeline_rate / rate:6.1f}x")


if __name__ == "__main__":
    main()
