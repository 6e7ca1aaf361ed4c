"""LiResNet (GloroNet) training-step cost on this machine, split into the network's forward + backward and the
power iteration, measured side by side in one run (XS = L6W128 at batch 256 by default).

  "step"  : gradient of the EMMA loss w.r.t. the parameters with 10 warm-started power iterations per layer
            (what Experiment.train_step computes, without the optimiser update and augmentation);
  "fwd+bwd": the same with 0 power iterations (the estimate sigma = ||A u|| from the stored vectors only);
  "power" : the power iteration alone: 10 iterations per layer on the layer's true input shape, the estimates
            sigma = ||A u||, their product and its gradient w.r.t. the kernels (independent of the batch).

  python bench/liresnet.py                      # XS, batch 256
  python bench/liresnet.py --width 64 --depth 4 --batch 128 --repeats 3
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from timing import timed

from certjax.losses import emma
from certjax.models import liresnet


def loss_gradient(model):
    def loss(params, state, images, labels, eps):
        (logits, pair), _ = model.apply(
            {"params": params, **state}, images, train=True, mutable=[liresnet.POWER]
        )
        return jnp.mean(emma(logits, pair, labels, {"eps_train": eps}, None))

    return jax.jit(jax.grad(loss))


def power_only(model):
    """Gradient of prod_l sigma_l (10 warm-started iterations each) w.r.t. the kernels as applied."""
    geometry = liresnet.layer_geometry(model)

    def linear_map(name):
        if geometry[name] is None:
            return liresnet.dense
        _, stride, padding = geometry[name]
        return lambda v, w: liresnet.conv(v, w, stride, padding)

    def product(kernels, vectors):
        total = 1.0
        for name, kernel in kernels.items():
            apply = linear_map(name)
            fixed = jax.lax.stop_gradient(kernel)
            u = liresnet.power_iteration(lambda v, a=apply, k=fixed: a(v, k), vectors[name], model.iterations)
            total = total * jnp.sqrt(jnp.sum(jnp.square(apply(u, kernel))))
        return total

    return jax.jit(jax.grad(product))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", default="XS", choices=sorted(liresnet.SIZES))
    parser.add_argument("--width", type=int, default=0, help="override the size's width")
    parser.add_argument("--depth", type=int, default=0, help="override the size's depth")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=liresnet.POWER_ITERATIONS)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    depth, width = liresnet.SIZES[args.size]
    depth, width = args.depth or depth, args.width or width
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, LiResNet L{depth}W{width} "
        f"(size {args.size}{' overridden' if args.width or args.depth else ''}), batch {args.batch}, "
        f"{args.iterations} power iterations per layer and step"
    )
    key = jax.random.key(0)
    model = liresnet.LiResNet(depth=depth, width=width, iterations=args.iterations)
    variables = model.init(key, jnp.zeros((1, 32, 32, 3)))
    params, state = variables["params"], {liresnet.POWER: variables[liresnet.POWER]}
    images = jax.random.uniform(key, (args.batch, 32, 32, 3), minval=-0.5, maxval=0.5)
    labels = jax.random.randint(key, (args.batch,), 0, 10)
    eps = np.float32(36 / 255)

    t_step = timed(loss_gradient(model), params, state, images, labels, eps, repeats=args.repeats)
    t_plain = timed(
        loss_gradient(model.clone(iterations=0)), params, state, images, labels, eps, repeats=args.repeats
    )
    _, frozen = model.apply(variables, images[:1], mutable=[liresnet.FROZEN])
    kernels = {name: value["kernel"] for name, value in frozen[liresnet.FROZEN].items()}
    vectors = {name: value["u"] for name, value in state[liresnet.POWER].items()}
    t_power = timed(power_only(model), kernels, vectors, repeats=args.repeats)
    print(f"step (fwd+bwd with power iteration): {t_step:8.3f} s  ({args.batch / t_step:8.1f} img/s)")
    print(f"fwd+bwd without power iteration:     {t_plain:8.3f} s  ({args.batch / t_plain:8.1f} img/s)")
    print(
        f"power iteration alone:               {t_power:8.3f} s  = {100 * t_power / t_step:5.1f} % of the "
        f"step (step - fwd+bwd: {t_step - t_plain:+.3f} s)"
    )


if __name__ == "__main__":
    main()
