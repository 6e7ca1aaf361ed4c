"""The l_p-dist layer op (certjax.kernels.linf_dist) on every path the backend has, side by side in one run.

For each (B, I, O) and p: forward and forward + backward (gradients of sum(g * y) w.r.t. x and w) time and
elements/s (B*I*O per second) of
  pallas     the Triton kernels of certjax.kernels.linf_dist_pallas (GPU only),
  jnp        the jnp custom_vjp (what "auto" runs off GPU): blockwise max forward, arg-max scan + scatter
             backward at p = inf,
  previous   (p = inf) the jnp path before the arg-max scan: first arg-max recomputed in the backward,
  naive      broadcast-reduce over a materialised [B, O, I] with plain autodiff (skipped when that buffer
             would exceed --naive-max-gb),
  bounds     the interval bounds of the layer (certjax.certify.interval.lp_distance_bounds, kernel="jnp":
  lower and
             upper in one blocked pass, a box of half-width 0.1 around x; backward: gradients of
             sum(g * (lo + hi))),
  bounds pallas  the same through the Pallas bounds kernel (certjax.kernels.lp_bounds_pallas, GPU only;
             its backward is the jnp path's, so only its forward differs from "bounds").
On a GPU also the fraction of the FP32 vector peak: the l_inf op needs at least two FP32 instructions per
element (a subtract, then a max with |.| folded in as an operand modifier), and an FMA-rated peak of F FLOP/s
issues F / 2 instructions/s, so the element-rate limit is F / 4 (H100 SXM: 67 TFLOP/s -> 16.7 T elements/s).
On CPU the run ends with the acceptance ratio: naive / chosen forward + backward at width 1024
(B, I, O = 512, 1024, 1024, p = inf).

  python bench/linf_dist.py                                     # (512, 3072, 5120), (512, 5120, 5120)
  python bench/linf_dist.py --shapes 512x1024x1024 256x3072x256 --repeats 3     # CPU-sized
  python bench/linf_dist.py --train-steps --width 128 --depth 6 --batch 128 # v1 / v1 IBP / v2 train steps

--train-steps times whole training steps (Trainer.train_step: augmentation, forward, loss, backward,
optimiser) of configs/linf_dist.py:v2, :v1 (the original's hinge on Lipschitz margins) and :v1 with
loss.bound=ibp (the hinge on interval bounds through every layer), interleaved in one run, at p = 8 and
p = inf, and prints img/s with the ratios to v2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from certjax.kernels.linf_dist import lp_distance
from certjax.kernels.linf_dist_jnp import (
    _forward,
    _lp_backward,
    check_shapes,
    lp_distance_reference,
    scatter_to_argmax,
)

INF = float("inf")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # configs/ is imported as a package


def timed(fn, *args, repeats: int) -> float:
    """Best of `repeats` wall times after one compile-and-run (the CPU is shared: the minimum is the
    least disturbed run)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def naive_distance(x, w, p):
    """The definition with autodiff: jnp.max(|x - w|) at p = inf, the l_p formula otherwise."""
    if math.isinf(p):
        return jnp.max(jnp.abs(x[:, None, :] - w[None, :, :]), axis=-1)
    return lp_distance_reference(x, w, p)


def _first_argmax_by_sign(x, w, y):
    """The previous backward's arg-max: min over i of i - I * sign(|d_i| - y), a fused reduction."""
    size = x.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.float32, (1, 1, size), 2)
    gap = jnp.sign(jnp.abs(x[:, None, :] - w[None, :, :]) - y[..., None])
    return jnp.min(iota - size * gap, axis=-1).astype(jnp.int32)


@jax.custom_vjp
def previous_lp_distance(x, w, p):
    """The jnp path as it was (same code as before this bench): the blockwise forward with its p cond, and a
    backward that recomputes the first arg-max under `lax.cond(isinf(p), ...)`."""
    check_shapes(x, w)
    return _forward(x, w, p, None)[0]


def _previous_fwd(x, w, p):
    y, p = _forward(x, w, p, None)
    return y, (x, w, p, y)


def _previous_bwd(residuals, g):
    x, w, p, y = residuals
    grad_x, grad_w = jax.lax.cond(
        jnp.isinf(p),
        lambda: scatter_to_argmax(x, w, _first_argmax_by_sign(x, w, y), g),
        lambda: _lp_backward(x, w, p, y, g),
    )
    return grad_x, grad_w, jnp.zeros_like(p)


previous_lp_distance.defvjp(_previous_fwd, _previous_bwd)


def bounds_sum(x, w, p, kernel="jnp"):
    """lower + upper interval bound of the layer over the box x +- 0.1 (one [B, O] output, so that the
    forward + backward timing below differentiates both ends)."""
    from certjax.certify.interval import lp_distance_bounds

    lower, upper = lp_distance_bounds(x - 0.1, x + 0.1, w, p, kernel=kernel)
    return lower + upper


def bench_train_steps(width: int, depth: int, batch_size: int, repeats: int) -> None:
    """img/s of Trainer.train_step for v2, v1 and v1 with IBP training, interleaved, at p = 8 and inf."""
    import numpy as np

    from certjax.experiment import Experiment
    from certjax.train import Trainer
    from configs.linf_dist import get_config

    variants = {"v2": ("v2", {}), "v1": ("v1", {}), "v1 ibp": ("v1", {"bound": "ibp"})}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (batch_size,), dtype=np.int32)
    setups = {}
    for name, (variant, loss) in variants.items():
        config = get_config(variant)
        config.data.real = "demo"  # only the class count; the batch below is random
        config.model.width, config.model.depth = width, depth
        config.train.batch_size = batch_size
        config.loss.update(loss)
        exp = Experiment(config, data="test")
        trainer = Trainer(exp)
        batch = exp.global_batch({"image": images, "label": labels})
        setups[name] = [exp, exp.init_state(), batch]
    print(f"train steps: width {width}, depth {depth}, batch {batch_size} (best of {repeats})")
    for p in (8.0, INF):
        best = {name: INF for name in setups}
        for _ in range(repeats + 1):  # the first round compiles
            for name, setup in setups.items():
                exp, state, batch = setup
                schedule = {"p": np.float32(p), "lam": np.float32(0.01), "eps_train": np.float32(0.1)}
                start = time.perf_counter()
                state, _ = trainer.train_step(state, batch, schedule)
                jax.block_until_ready(state)
                best[name] = min(best[name], time.perf_counter() - start)
                setup[1] = state
        line = f"  p={p:g}:"
        for name, seconds in best.items():
            line += f"  {name} {batch_size / seconds:8.1f} img/s ({best['v2'] / seconds:.2f}x v2)"
        print(line, flush=True)


def paths(backend: str, p: float, shape, naive_max_gb: float):
    """{name: distance(x, w) or a reason it is skipped} for this backend and p."""
    batch, size, out = shape
    found = {}
    if backend == "gpu":
        found["pallas"] = lambda x, w: lp_distance(x, w, p, kernel="pallas")
    found["jnp"] = lambda x, w: lp_distance(x, w, p, kernel="jnp")
    if p == INF:
        found["previous"] = lambda x, w: previous_lp_distance(x, w, p)
    found["bounds"] = lambda x, w: bounds_sum(x, w, p)
    if backend == "gpu":
        found["bounds pallas"] = lambda x, w: bounds_sum(x, w, p, kernel="pallas")
    gigabytes = batch * size * out * 4 / 1e9
    if gigabytes <= naive_max_gb:
        found["naive"] = lambda x, w: naive_distance(x, w, p)
    else:
        found["naive"] = f"skipped: materialises [B, O, I] ({gigabytes:.0f} GB > --naive-max-gb)"
    return found


def bench_shape(shape, ps, repeats: int, naive_max_gb: float, peak_flops: float | None):
    batch, size, out = shape
    elements = batch * size * out
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, size))
    w = jax.random.normal(kw, (out, size))
    g = jax.random.normal(kg, (batch, out))
    print(f"(B, I, O) = {shape}: {elements:.3g} elements")
    results = {}
    for p in ps:
        for name, distance in paths(jax.default_backend(), p, shape, naive_max_gb).items():
            label = f"p={p:g} {name}"
            if isinstance(distance, str):
                print(f"  {label:20s} {distance}")
                continue
            forward = jax.jit(distance)
            forward_backward = jax.jit(jax.grad(lambda x, w, d=distance: jnp.sum(g * d(x, w)), (0, 1)))
            line = f"  {label:20s}"
            for kind, fn in (("forward", forward), ("fwd+bwd", forward_backward)):
                seconds = timed(fn, x, w, repeats=repeats)
                results[(p, name, kind)] = seconds
                line += f"   {kind} {seconds * 1e3:9.1f} ms {elements / seconds / 1e9:8.2f} G/s"
                if peak_flops:
                    line += f" ({elements / seconds / (peak_flops / 4):6.1%} of peak)"
            print(line, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="+", default=["512x3072x5120", "512x5120x5120"], help="BxIxO (batch, in, out)"
    )
    parser.add_argument("--ps", type=float, nargs="+", default=[INF, 8.0], help="p values (inf, 8, ...)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--naive-max-gb", type=float, default=4.0, help="largest [B, O, I] the naive path may use"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=67.0, help="FP32 peak, FMA = 2 FLOP (default: H100 SXM, 67)"
    )
    parser.add_argument("--no-ratio", action="store_true", help="skip the CPU width-1024 naive/chosen ratio")
    parser.add_argument("--train-steps", action="store_true", help="time v2 / v1 / v1-IBP train steps only")
    parser.add_argument("--width", type=int, default=128, help="--train-steps: model width")
    parser.add_argument("--depth", type=int, default=6, help="--train-steps: model depth")
    parser.add_argument("--batch", type=int, default=128, help="--train-steps: batch size")
    args = parser.parse_args()
    if args.train_steps:
        bench_train_steps(args.width, args.depth, args.batch, args.repeats)
        return
    backend = jax.default_backend()
    peak = args.peak_tflops * 1e12 if backend == "gpu" else None
    print(
        f"device: {jax.devices()[0].device_kind} ({backend})"
        + (f", peak {args.peak_tflops} TFLOP/s" if peak else "")
    )
    for text in args.shapes:
        shape = tuple(int(n) for n in text.lower().split("x"))
        if len(shape) != 3:
            raise ValueError(f"--shapes wants BxIxO, got {text!r}")
        bench_shape(shape, args.ps, args.repeats, args.naive_max_gb, peak)
    if backend == "cpu" and not args.no_ratio:
        shape = (512, 1024, 1024)
        print("acceptance, CPU, width 1024, p = inf, forward + backward:")
        times = bench_shape(shape, [INF], args.repeats, naive_max_gb=float("inf"), peak_flops=None)
        naive, chosen = times[(INF, "naive", "fwd+bwd")], times[(INF, "jnp", "fwd+bwd")]
        previous = times[(INF, "previous", "fwd+bwd")]
        print(
            f"  naive / jnp (chosen) = {naive / chosen:.2f}x   naive / previous = {naive / previous:.2f}x   "
            f"previous / jnp = {previous / chosen:.2f}x"
        )


if __name__ == "__main__":
    main()
