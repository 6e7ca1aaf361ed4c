"""LOT cost on this machine: forward + backward of one LOT layer and of LipConvNet (LOT-S by default) at batch
256, with the share of the time spent in the orthogonalisation (FFT of the kernel, Gram matrix, Newton-Schulz,
W' = Z W), measured side by side in one run.

The orthogonalisation depends on the parameters only, not on the batch: its cost per step is fixed, and its
share falls as the batch grows. "ortho" below is the forward + backward of the orthogonalisation alone (the
gradient of a random linear function of W' w.r.t. the kernel); "full" is the forward + backward of the layer
or network (gradient of a random linear function of the output w.r.t. parameters and input).

  python bench/lot.py --init-channels 32 --size S --batch 256 --repeats 2
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from timing import timed

from certjax.models import lot


def full_step(model):
    def loss(params, x, g):
        out = model.apply({"params": params}, x)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(g * out)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def ortho_step(grids):
    """Gradient of sum(Re(G_l * W'_l)) over layers on grids n_l w.r.t. their kernels: the orthogonalisation
    alone."""

    def loss(kernels, probes):
        total = 0.0
        for kernel, n, probe in zip(kernels, grids, probes, strict=True):
            total = total + jnp.sum(jnp.real(probe * lot.orthogonalize(lot.frequency_weights(kernel, n))))
        return total

    return jax.jit(jax.grad(loss))


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
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}, forward + backward")
    key = jax.random.key(0)

    # one layer: the first stage's stride-1 square layer (init_channels -> init_channels at 32x32)
    c = args.init_channels
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
    g = jax.random.normal(key, (args.batch, model.num_classes))
    t_full = timed(full_step(model), params, x, g, repeats=args.repeats)
    specs = layer_specs(model)
    kernels = [params[name]["kernel"] for name, _, _, _, _ in specs]
    probes = [
        jax.random.normal(key, (n, n // 2 + 1, cout, cin)).astype(jnp.complex64)
        for _, _, cin, cout, n in specs
    ]
    t_ortho = timed(ortho_step([n for *_, n in specs]), kernels, probes, repeats=args.repeats)
    name = f"LOT-{args.size} (LipConvNet-{5 * lot.SIZES[args.size]}, init_channels {c})"
    print(
        f"{name}: {t_full:8.3f} s per batch ({args.batch / t_full:8.1f} img/s); "
        f"orthogonalisation {t_ortho:7.3f} s = {100 * t_ortho / t_full:5.1f} %"
    )


if __name__ == "__main__":
    main()
