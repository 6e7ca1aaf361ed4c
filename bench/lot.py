"""LOT cost on this machine: forward + backward of one LOT layer and of LipConvNet (LOT-S by default) at batch
256, and the training step the original times (shared/bench-originals/lot_speed.py: cross-entropy on the
logits, SGD lr 0.1 momentum 0.9, random normal images), split into phases measured side by side in one run.

The phases of the network's forward + backward:
  ortho  the orthogonalisation of every layer (DFT of the kernel, Gram matrix, Newton-Schulz, W' = Z W) and
         its backward: the gradient of a random linear function of every W' w.r.t. the kernels. Its cost is
         fixed per step (parameters only), so its share falls as the batch grows.
  conv   the frequency-domain convolution of every layer with W' held fixed (rfft2 of the input, the
         per-frequency product, irfft2 and crop) and its backward w.r.t. W' and the input.
  rest   the step minus the two: MaxMin, bias, loss, optimizer update, glue.
The figures are printed, not checked: they vary with the machine and its load.

  python bench/lot.py --init-channels 8 --size S --batch 256 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import timed

from certjax.models import lot


def full_step(model):
    def loss(params, x, g):
        out = model.apply({"params": params}, x)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(g * out)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def train_step(model, optimizer):
    """The original's step: mean cross-entropy, its gradient, one SGD-momentum update (jitted once, state
    donated)."""

    def loss(params, images, labels):
        logits, _ = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images, labels):
        value, grads = jax.value_and_grad(loss)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def timed_training(step, params, opt_state, batches, repeats: int) -> float:
    """Mean seconds per training step over `repeats` steps after one that compiles (state threaded through,
    as the donation requires)."""
    params, opt_state, loss = step(params, opt_state, *batches[0])
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i in range(repeats):
        params, opt_state, loss = step(params, opt_state, *batches[(i + 1) % len(batches)])
    jax.block_until_ready((params, loss))
    return (time.perf_counter() - start) / repeats


def ortho_step(grids):
    """Gradient of sum(Re(G_l * W'_l)) over layers on grids n_l w.r.t. their kernels: the orthogonalisation
    alone."""

    def loss(kernels, probes):
        total = 0.0
        for kernel, n, probe in zip(kernels, grids, probes, strict=True):
            total = total + jnp.sum(jnp.real(probe * lot.orthogonal_frequency_weights(kernel, n)))
        return total

    return jax.jit(jax.grad(loss))


def conv_step(pads):
    """Gradient of sum(G_l * conv_l(x_l, W'_l)) over layers w.r.t. W'_l and x_l: the FFT convolutions only."""

    def loss(weights, inputs, probes):
        total = 0.0
        for w, x, pad, probe in zip(weights, inputs, pads, probes, strict=True):
            total = total + jnp.sum(probe * lot.fft_conv(x, w, pad))
        return total

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def layer_specs(model: lot.LipConvNet, side: int = 32):
    """(name, kernel size, cin as seen, cout, grid n) of every LOT layer, in order."""
    specs, planes, cin = [], model.init_channels, 3
    for stage in range(5):
        for block in range(model.blocks):
            last = block == model.blocks - 1
            stride = 2 if last else 1
            k = 1 if (stage == 4 and last) else 3
            seen = cin * stride * stride
            side_out = side // stride
            specs.append(
                (f"stage{stage + 1}_block{block + 1}", k, seen, planes * stride, side_out + 2 * (k // 2))
            )
            cin, side = planes * stride, side_out
        planes *= 2
    if not model.lln:
        specs.append(("last", 1, cin, model.num_classes, 1))
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", default="S", choices=sorted(lot.SIZES))
    parser.add_argument("--init-channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-layer", action="store_true", help="skip the one-layer figure")
    parser.add_argument("--per-layer", action="store_true", help="also time ortho and conv layer by layer")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}, forward + backward")
    key = jax.random.key(0)
    c = args.init_channels

    if not args.skip_layer:  # one layer: the first stage's stride-1 square layer (c -> c at 32x32)
        layer = lot.LOTConv(c, 3, 1)
        x = jax.random.normal(key, (args.batch, 32, 32, c))
        params = layer.init(key, x)["params"]
        params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(key, p.shape), params)
        g = jax.random.normal(key, (args.batch, 32, 32, c))
        t_full = timed(full_step(layer), params, x, g, repeats=args.repeats)
        probes = [jax.random.normal(key, (34, 18, c, c)).astype(jnp.complex64)]
        t_ortho = timed(ortho_step([34]), [params["kernel"]], probes, repeats=args.repeats)
        print(
            f"one LOT layer {c}->{c} at 32x32: {t_full * 1e3:9.1f} ms  ({args.batch / t_full:8.1f} img/s); "
            f"orthogonalisation {t_ortho * 1e3:8.1f} ms = {100 * t_ortho / t_full:5.1f} %"
        )

    model = lot.LipConvNet(blocks=lot.SIZES[args.size], init_channels=c)
    x = jax.random.normal(key, (args.batch, 32, 32, 3))
    params = model.init(key, x[:1])["params"]
    name = f"LOT-{args.size} (LipConvNet-{5 * lot.SIZES[args.size]}, init_channels {c})"

    # the training step as the original times it
    optimizer = optax.sgd(0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(rng.standard_normal((args.batch, 32, 32, 3)), jnp.float32),
            jnp.asarray(rng.integers(0, model.num_classes, args.batch), jnp.int32),
        )
        for _ in range(2)
    ]
    state = jax.tree.map(jnp.copy, params)
    t_train = timed_training(
        train_step(model, optimizer), state, optimizer.init(state), batches, repeats=args.repeats
    )

    # its phases
    g = jax.random.normal(key, (args.batch, model.num_classes))
    t_full = timed(full_step(model), params, x, g, repeats=args.repeats)
    specs = layer_specs(model)
    kernels = [params[layer_name]["kernel"] for layer_name, *_ in specs]
    probes = [
        jax.random.normal(key, (n, n // 2 + 1, cout, cin)).astype(jnp.complex64)
        for _, _, cin, cout, n in specs
    ]
    t_ortho = timed(ortho_step([n for *_, n in specs]), kernels, probes, repeats=args.repeats)
    weights = [lot.orthogonal_frequency_weights(kernel, n) for kernel, (*_, n) in zip(kernels, specs)]
    sides = [n - 2 * (k // 2) for _, k, _, _, n in specs]
    inputs = [jax.random.normal(key, (args.batch, s, s, cin)) for (_, _, cin, _, _), s in zip(specs, sides)]
    outs = [jax.random.normal(key, (args.batch, s, s, cout)) for (_, _, _, cout, _), s in zip(specs, sides)]
    t_conv = timed(conv_step([k // 2 for _, k, *_ in specs]), weights, inputs, outs, repeats=args.repeats)
    t_rest = t_train - t_ortho - t_conv
    if args.per_layer:
        for i, (layer_name, k, cin, cout, n) in enumerate(specs):
            t_o = timed(ortho_step([n]), kernels[i : i + 1], probes[i : i + 1], repeats=args.repeats)
            t_c = timed(
                conv_step([k // 2]),
                weights[i : i + 1],
                inputs[i : i + 1],
                outs[i : i + 1],
                repeats=args.repeats,
            )
            print(
                f"  {layer_name:14s} k{k} {cin:5d} -> {cout:5d} on {n:2d}x{n // 2 + 1:2d} bins: "
                f"ortho {t_o * 1e3:8.1f} ms, conv {t_c * 1e3:8.1f} ms"
            )
    print(f"{name}: {t_full:8.3f} s per batch forward + backward ({args.batch / t_full:8.1f} img/s)")
    print(
        f"{name}: training step (cross-entropy + SGD momentum) {t_train:8.3f} s ({args.batch / t_train:8.1f} "
        f"img/s) = ortho {t_ortho:7.3f} s ({100 * t_ortho / t_train:5.1f} %) + conv {t_conv:7.3f} s "
        f"({100 * t_conv / t_train:5.1f} %) + rest {t_rest:7.3f} s ({100 * t_rest / t_train:5.1f} %)"
    )


if __name__ == "__main__":
    main()
