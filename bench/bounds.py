"""The cost of the guaranteed layer bounds at the paper's sizes, per layer kind and family, by bound method.

For LiResNet-L (L18W256, configs/liresnet.py), LiResNet++ (configs/liresnet_pp.py), BRONet-L
(configs/bronet.py) and LOT-L (configs/lot.py), on freshly initialised weights (the bounds' cost does not
depend on training):
- per layer kind: one layer of each kind timed with each bound method (exact: the float64 SVDs of 8811d5e,
  norms.py; fast: the Cholesky certificates, spectral.py), times the number of such layers;
- the "assumed" figure: model.eval_power_iterations power iterations (the original's; timed on 20 and
  scaled) and model.eval_lanczos_steps Lanczos steps from the same vectors (the configs' default), timed
  whole;
- the whole `certificate_bounds` as the evaluations during training call it (fast, no assumed figure)
  and, with --full, as the final evaluation calls it with each method (the assumed figure included).

  python bench/bounds.py                          # LiResNet++ only, per layer kind
  python bench/bounds.py --families liresnet_pp liresnet lot --full
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from certjax.certify import spectral  # noqa: E402
from certjax.models import FAMILIES  # noqa: E402
from certjax.models.common.layers import computed_collection  # noqa: E402
from certjax.models.common.lipschitz import (  # noqa: E402
    FROZEN,
    POWER,
    assumed_estimates,
    linear_maps,
    power_estimates,
)

SHAPE = (1, 32, 32, 3)
PAPER_VARIANTS = {"liresnet_pp": "cifar10", "liresnet": "L", "lot": "L", "bronet": "cifar10"}  # -L sizes
PROBE_ITERATIONS = 20


def seconds(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def build(family: str):
    config = importlib.import_module(f"configs.{family}").get_config(PAPER_VARIANTS[family])
    model = FAMILIES[family].build(config.model, 10)
    variables = jax.jit(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, *SHAPE[1:])), jnp.float32(jnp.inf), train=False)
    )()
    return model, jax.tree.map(np.asarray, variables)


def layer_kinds(family: str, model, variables):
    """{kind: (count, [(method name, fn)])}: one representative layer of each kind."""
    if family == "lot":
        from certjax.models.lot import FROZEN as LOT_FROZEN

        frozen = jax.tree.map(np.asarray, computed_collection(model, variables, SHAPE, LOT_FROZEN))
        kinds = {}
        for layer, leaves in sorted(frozen.items()):
            w = leaves["weights"] if "weights" in leaves else next(iter(leaves.values()))
            if layer == "last":
                continue
            kinds.setdefault(f"{tuple(w.shape)}", [0, w])
            kinds[f"{tuple(w.shape)}"][0] += 1
        return {
            f"LOT blocks {shape}": (count, {name: (lambda m=m, w=w: m.stack(w)) for name, m in _methods()})
            for shape, (count, w) in kinds.items()
        }
    frozen = jax.tree.map(np.asarray, computed_collection(model, variables, SHAPE, FROZEN))
    module = importlib.import_module(f"certjax.models.{family}")
    geometry = module.layer_geometry(model, SHAPE[1]) if _takes_side(module) else None
    if geometry is None:
        side = {"stem": 32}
        geometry = {
            name: (None if g is None else (*g, side.get(name, 16)))
            for name, g in module.layer_geometry(model).items()
        }
    kinds = {}
    for name, g in geometry.items():
        if "weights" in frozen[name]:  # a BRO layer: its cached W(f), bounded as a stack
            weights = frozen[name]["weights"]
            kind = f"BRO layer W(f) {weights.shape}"
            kinds.setdefault(kind, [0, {n: (lambda m=m, w=weights: m.stack(w)) for n, m in _methods()}])
            kinds[kind][0] += 1
            continue
        kernel = np.asarray(frozen[name]["kernel"], np.float64)
        what = f"conv {g[0]}x{g[0]}/{g[1]} on {g[3]}" if g else "dense"
        kind = f"{name.rstrip('0123456789')} {what} {kernel.shape}"
        if kind in kinds:
            kinds[kind][0] += 1
            continue
        calls = {
            method_name: (
                (lambda m=method, k=kernel: m.dense(k))
                if g is None
                else (lambda m=method, k=kernel, g=g: m.conv(k, g[1], g[2], g[3]))
            )
            for method_name, method in _methods()
        }
        kinds[kind] = [1, calls]
    return {kind: tuple(v) for kind, v in kinds.items()}


def _geometry(family: str, model) -> dict:
    module = importlib.import_module(f"certjax.models.{family}")
    return module.layer_geometry(model, SHAPE[1]) if _takes_side(module) else module.layer_geometry(model)


def _takes_side(module) -> bool:
    """Whether the family's layer_geometry takes the input side (and gives it per layer)."""
    return len(inspect.signature(module.layer_geometry).parameters) == 2


def _methods():
    return sorted(spectral.BOUND_METHODS.items())


def bench_family(family: str, full: bool) -> None:
    model, variables = build(family)
    params = sum(v.size for v in jax.tree.leaves(variables["params"]))
    print(f"\n{family} (paper size, {params / 1e6:.1f} M parameters)")
    seconds(computed_collection, model, variables, SHAPE, FROZEN if family != "lot" else "lot_frozen")
    frozen_time, _ = seconds(
        lambda: jax.block_until_ready(
            computed_collection(model, variables, SHAPE, FROZEN if family != "lot" else "lot_frozen")
        )
    )
    print(f"  weights as applied (frozen collection): {frozen_time:8.2f} s")
    totals = {name: frozen_time for name, _ in _methods()}
    for kind, (count, calls) in layer_kinds(family, model, variables).items():
        figures = {}
        for name, call in calls.items():
            figures[name] = seconds(call)
            totals[name] += count * figures[name][0]
        exact, fast = figures["exact"], figures["fast"]
        print(
            f"  {count:3d} x {kind:42s} exact {exact[0]:7.2f} s  fast {fast[0]:6.2f} s"
            f"  ({exact[0] / fast[0]:5.1f}x; sigma {exact[1]:.7f} -> {fast[1]:.7f},"
            f" +{fast[1] / exact[1] - 1:.1e})"
        )
    if family != "lot":
        power_estimates(model, variables, SHAPE, PROBE_ITERATIONS)  # compiles
        probe, probed = seconds(power_estimates, model, variables, SHAPE, PROBE_ITERATIONS)
        power = probe * model.eval_iterations / PROBE_ITERATIONS
        k_probed = np.prod(list(probed.values()))
        print(f"  assumed figure, power: {model.eval_iterations} iterations {power:8.1f} s"
              f" (timed {PROBE_ITERATIONS}: {probe:.2f} s, K {k_probed:.6f})")  # fmt: skip
        maps = linear_maps(_geometry(family, model), computed_collection(model, variables, SHAPE, FROZEN),
                           variables[POWER])  # fmt: skip
        lanczos = model.clone(assumed_estimator="lanczos")
        assumed_estimates(lanczos, variables, SHAPE, maps)  # compiles
        assumed, estimates = seconds(assumed_estimates, lanczos, variables, SHAPE, maps)
        k_lanczos = np.prod(list(estimates.values()))
        print(f"  assumed figure, lanczos: {lanczos.eval_lanczos_steps} steps {assumed:8.1f} s"
              f" (K {k_lanczos:.6f}; {power / assumed:.1f}x)")  # fmt: skip
        estimator = {"power": power, "lanczos": assumed}[model.assumed_estimator]
    else:
        power = estimator = 0.0
    for name, total in totals.items():
        how = model.assumed_estimator if family != "lot" else "none"
        print(f"  layer bounds, {name:5s}: {total:8.1f} s; with the assumed figure ({how})"
              f" {total + estimator:8.1f} s")  # fmt: skip
    module = importlib.import_module(f"certjax.models.{family}")

    def in_training():
        return module.certificate_bounds(model, variables, SHAPE, bound_method="fast", assumed=False)

    first, _ = seconds(in_training)  # compiles the frozen collection and the stored estimates, once per run
    training, _ = seconds(in_training)
    print(f"  certificate_bounds as in training (fast, no assumed figure): {training:8.1f} s"
          f" (the run's first call: {first:.1f} s)")  # fmt: skip
    print(f"  8811d5e's certificate_bounds (exact + assumed, sum above):    {totals['exact'] + power:8.1f} s"
          f"  -> {(totals['exact'] + power) / training:5.1f}x")  # fmt: skip
    if full:
        for name, _ in _methods():
            whole, _ = seconds(
                lambda n=name: module.certificate_bounds(model, variables, SHAPE, bound_method=n)
            )
            print(f"  certificate_bounds, {name} with the assumed figure (measured whole): {whole:8.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=["liresnet_pp"], choices=sorted(PAPER_VARIANTS))
    parser.add_argument(
        "--full", action="store_true", help="also time the whole certificate_bounds per method"
    )
    parser.add_argument(
        "--epoch", type=int, default=0, metavar="BATCH",
        help="also time LiResNet++'s paper-size train step at this batch and scale it to one epoch",
    )  # fmt: skip
    args = parser.parse_args()
    print(f"jax {jax.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    for family in args.families:
        bench_family(family, args.full)
    if args.epoch:
        epoch_seconds(args.epoch)


def epoch_seconds(batch: int, repeats: int = 2) -> None:
    """LiResNet++ at paper size: one epoch of its recipe (one pass of the 50,000 real images, 256 real + 768
    generated per step: 196 steps of 1024) against one evaluation during training (the fast bounds and the
    certifying forward of the 10,000 test images, certjax's Certifier). A step of 1024 images costs at least
    a step of `batch` < 1024, so 196 steps at `batch` bound the epoch from below; the evaluation's forward is
    timed on one batch of `batch` test images and scaled linearly."""
    from timing import time_train_steps, train_step_timer

    from certjax.data.pipeline import real_count

    config = importlib.import_module("configs.liresnet_pp").get_config("cifar10")
    step, state, data, schedule = train_step_timer(
        config, batch, real_count(batch, config.data.real_fraction)
    )
    per_step = time_train_steps(step, state, data, schedule, repeats)
    steps = -(-50_000 // 256)
    print(f"\nliresnet_pp train step at batch {batch}: {per_step:.1f} s; one epoch ({steps} steps of 1024)"
          f" >= {steps * per_step / 60:.0f} min on this machine")  # fmt: skip
    from certjax.experiment import Experiment

    experiment = Experiment(config, data="test")
    certifier, state = experiment.certifier, experiment.init_state()  # the train step donated its state
    bounds_time, bounds = seconds(
        lambda: certifier.certificate_bounds(state.params, state.model_state, "fast", assumed=False)
    )
    model_state = {**state.model_state, **bounds["variables"]}
    images = experiment.global_batch(
        {"image": np.zeros((batch, 32, 32, 3), np.uint8), "label": np.zeros((batch,), np.int32)}
    )
    gain = np.float32(bounds["input_error_gain"])
    jax.block_until_ready(certifier.eval_step(state.params, model_state, images, gain))  # compiles
    forward, _ = seconds(
        lambda: jax.block_until_ready(certifier.eval_step(state.params, model_state, images, gain))
    )
    evaluation = bounds_time + forward * 10_000 / batch
    print(f"one evaluation during training: bounds {bounds_time:.1f} s + certifying forward"
          f" {forward:.1f} s per {batch} images -> {evaluation / 60:.1f} min for 10,000 test images"
          f" ({evaluation / (steps * per_step):.2f} of the epoch's lower bound)")  # fmt: skip


if __name__ == "__main__":
    main()
