"""BRONet's train step and where its time goes: the BRO layers' solves (V^H V, the regularised solve and the
projections, forward and backward), their FFTs (rfft2 of the padded input, irfft2 back), and the rest (stem,
centring, MinMax, neck, CHORD MLP, loss, optimiser). Each BRO part is timed alone on one layer's shapes, with
its gradient, and multiplied by the depth; the rest is the whole step minus both.

  python bench/bronet.py                               # width 128, depth 12, batch 32 (CPU-sized)
  python bench/bronet.py --width 512 --batch 256       # the paper's layer (a GPU machine)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import time_train_steps, timed, train_step_timer  # noqa: E402

from certjax.models import bronet  # noqa: E402
from certjax.models.common.solve import solve  # noqa: E402
from configs.bronet import get_config  # noqa: E402


def layer_parts(batch: int, side: int, width: int, rank: int, repeats: int) -> tuple[float, float, float]:
    """Seconds per (FFT part, solve part, solve part with jaxlib's batched solve) of one BRO layer, forward
    and backward, at these shapes. The batched solve is safe here (one call at a time) but not in the train
    step on CPU (certjax/models/common/solve.py): its time says what that workaround costs."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, side, side, width)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, width, rank)) / (9 * width), jnp.float32)
    kernel = kernel.at[1, 1, :rank, :rank].add(jnp.eye(rank))
    grid = side + 2

    def fft_only(x):  # rfft2 of the padded input and irfft2 back: the layer with W = I
        spectrum, _ = bronet.padded_spectrum(x)
        return jnp.sum(jnp.square(bronet.cropped(spectrum, grid, side)))

    spectrum, _ = bronet.padded_spectrum(x)

    def solve_only(solver):  # everything between the two FFTs
        def part(spectrum, kernel):
            v = bronet.kernel_spectrum(kernel, grid)
            projected = jnp.einsum("fgcr,bfgc->fgrb", jnp.conj(v), spectrum)
            solved = solver(bronet.regularised_gram(v), projected)
            out = spectrum - 2.0 * jnp.einsum("fgcr,fgrb->bfgc", v, solved)
            return jnp.sum(jnp.abs(out) ** 2)

        return jax.jit(jax.grad(part, argnums=(0, 1)))

    fft_time = timed(jax.jit(jax.grad(fft_only)), x, repeats=repeats)
    solve_time = timed(solve_only(solve), spectrum, kernel, repeats=repeats)
    batched_time = timed(solve_only(jnp.linalg.solve), spectrum, kernel, repeats=repeats)
    return fft_time, solve_time, batched_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = get_config("nogen")
    config.model.width, config.model.depth = args.width, args.depth
    config.model.neck_features = min(2048, 4 * args.width)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs; BRONet depth "
          f"{args.depth}, width {args.width}, rank {int(args.width * config.model.rank_ratio)}, batch "
          f"{args.batch}")  # fmt: skip
    step, state, batch, schedule = train_step_timer(config, args.batch)
    whole = time_train_steps(step, state, batch, schedule, args.repeats)
    rank = int(args.width * config.model.rank_ratio)
    fft_time, solve_time, batched_time = layer_parts(args.batch, 16, args.width, rank, args.repeats)
    fft_total, solve_total = args.depth * fft_time, args.depth * solve_time
    rest = whole - fft_total - solve_total
    print(f"train step {whole:8.3f} s  ({args.batch / whole:7.1f} img/s)")
    for name, seconds in [("BRO solve", solve_total), ("BRO FFT", fft_total), ("the rest", rest)]:
        print(f"  {name:10s} {seconds:8.3f} s  {100 * seconds / whole:5.1f} %")
    print(f"  (the BRO solve with jaxlib's batched solve, one layer alone, x {args.depth}: "
          f"{args.depth * batched_time:.3f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
