"""LOT training-step cost on this machine, split into phases measured side by side in one run.

  train step  certjax's own jitted step (Trainer.train_step of configs/lot.py:<size>: augmentation,
              forward, cross-entropy, backward, SGD momentum), the figure to set next to
              shared/bench-originals/lot_speed.py at the same size and batch.
  ortho       every layer's orthogonalisation (DFT of the kernel, Gram matrix, Newton-Schulz, W' = Z W) and
              its backward: the gradient of a random linear function of every W' w.r.t. the kernels. It
              depends on the parameters only, so its cost per step is fixed and its share falls with batch.
  conv        every layer's frequency-domain convolution with W' held fixed (rfft2, per-frequency product,
              irfft2, crop) and its backward w.r.t. W' and the input.
  rest        train step - ortho - conv: MaxMin, bias, loss, optimiser, augmentation, glue.
With --definition the ortho and conv phases are also timed on lot.py's definition (complex orthogonalize of
frequency_weights, the NHWC einsum), the implementation before certjax/kernels/orthogonal_conv.py.
The figures are printed, not checked: they vary with the machine and its load.

  python bench/lot.py --init-channels 8 --size S --batch 256 --repeats 5
  python bench/lot.py --init-channels 32 --size S --batch 256 --repeats 2
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from timing import time_train_steps, timed, train_step_timer

from certjax.kernels import orthogonal_conv
from certjax.models import lot
from configs import lot as lot_config


def definition_weights(kernel, n, iterations):
    return lot.orthogonalize(lot.frequency_weights(kernel, n), iterations)


def definition_conv(x, w, pad):
    n = x.shape[1] + 2 * pad
    spectrum = jnp.fft.rfft2(jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), axes=(1, 2))
    out = jnp.einsum("hwoi,bhwi->bhwo", w, spectrum, precision=jax.lax.Precision.HIGHEST)
    return jnp.fft.irfft2(out, s=(n, n), axes=(1, 2))[:, pad : -pad or None, pad : -pad or None, :]


def ortho_step(grids, weights_fn, iterations):
    """Gradient of sum(Re(G_l * W'_l)) over layers w.r.t. their kernels: the orthogonalisation alone."""

    def loss(kernels, probes):
        total = 0.0
        for kernel, n, probe in zip(kernels, grids, probes, strict=True):
            total = total + jnp.sum(jnp.real(probe * weights_fn(kernel, n, iterations)))
        return total

    return jax.jit(jax.grad(loss))


def conv_step(pads, conv_fn):
    """Gradient of sum(G_l * conv_l(x_l, W'_l)) over layers w.r.t. W'_l and x_l: the FFT convolutions only."""

    def loss(weights, inputs, probes):
        total = 0.0
        for w, x, pad, probe in zip(weights, inputs, pads, probes, strict=True):
            total = total + jnp.sum(probe * conv_fn(x, w, pad))
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
            side_out = side // stride
            specs.append(
                (
                    f"stage{stage + 1}_block{block + 1}",
                    k,
                    cin * stride**2,
                    planes * stride,
                    side_out + 2 * (k // 2),
                )
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
    parser.add_argument("--definition", action="store_true", help="also time lot.py's definition")
    parser.add_argument("--per-layer", action="store_true", help="also time ortho and conv layer by layer")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}")
    config = lot_config.get_config(args.size)
    config.model.init_channels = args.init_channels
    name = f"LOT-{args.size} (LipConvNet-{5 * lot.SIZES[args.size]}, init_channels {args.init_channels})"
    t_train = time_train_steps(*train_step_timer(config, args.batch), repeats=args.repeats)
    print(f"{name}: train step (Trainer.train_step) {t_train:8.3f} s ({args.batch / t_train:8.1f} img/s)")

    key = jax.random.key(0)
    iterations = config.model.iterations
    model = lot.LipConvNet(blocks=lot.SIZES[args.size], init_channels=args.init_channels)
    params = model.init(key, jnp.zeros((1, 32, 32, 3)))["params"]
    specs = layer_specs(model)
    kernels = [params[layer]["kernel"] for layer, *_ in specs]
    grids = [n for *_, n in specs]
    pads = [k // 2 for _, k, *_ in specs]
    probes = [
        jax.random.normal(key, (n, n // 2 + 1, cout, cin)).astype(jnp.complex64) for *_, cin, cout, n in specs
    ]
    weights = [orthogonal_conv.orthogonal_frequency_weights(k, n, iterations) for k, n in zip(kernels, grids)]
    sides = [n - 2 * pad for n, pad in zip(grids, pads)]
    inputs = [jax.random.normal(key, (args.batch, s, s, cin)) for (_, _, cin, _, _), s in zip(specs, sides)]
    outs = [jax.random.normal(key, (args.batch, s, s, cout)) for (_, _, _, cout, _), s in zip(specs, sides)]

    def phases(weights_fn, conv_fn, select=slice(None)):
        t_o = timed(
            ortho_step(grids[select], weights_fn, iterations),
            kernels[select],
            probes[select],
            repeats=args.repeats,
        )
        t_c = timed(
            conv_step(pads[select], conv_fn),
            weights[select],
            inputs[select],
            outs[select],
            repeats=args.repeats,
        )
        return t_o, t_c

    t_ortho, t_conv = phases(orthogonal_conv.orthogonal_frequency_weights, orthogonal_conv.fft_conv)
    t_rest = t_train - t_ortho - t_conv
    print(
        f"{name}: ortho {t_ortho:7.3f} s ({100 * t_ortho / t_train:5.1f} %), conv {t_conv:7.3f} s "
        f"({100 * t_conv / t_train:5.1f} %), rest {t_rest:7.3f} s ({100 * t_rest / t_train:5.1f} %)"
    )
    if args.definition:
        d_ortho, d_conv = phases(definition_weights, definition_conv)
        print(
            f"{name}: definition (lot.py): ortho {d_ortho:7.3f} s ({d_ortho / t_ortho:5.2f}x the fast path), "
            f"conv {d_conv:7.3f} s ({d_conv / t_conv:5.2f}x)"
        )
    if args.per_layer:
        for i, (layer, k, cin, cout, n) in enumerate(specs):
            t_o, t_c = phases(
                orthogonal_conv.orthogonal_frequency_weights, orthogonal_conv.fft_conv, slice(i, i + 1)
            )
            print(
                f"  {layer:14s} k{k} {cin:5d} -> {cout:5d} on {n:2d}x{n // 2 + 1:2d} bins: "
                f"ortho {t_o * 1e3:8.1f} ms, conv {t_c * 1e3:8.1f} ms"
            )


if __name__ == "__main__":
    main()
