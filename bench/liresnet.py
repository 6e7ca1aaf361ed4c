"""LiResNet (GloroNet) training-step cost on this machine, split into phases measured side by side in one run
(XS = L6W128 at batch 256 by default).

  "train step": certjax's own jitted training step (Trainer.train_step of configs/liresnet.py at this
            size: augmentation, forward, EMMA loss, backward, gradient clipping 3, AdamW), the figure to set
            against ../shared/bench-originals/liresnet_speed.py;
  "gradient": gradient of the EMMA loss w.r.t. the parameters with 10 warm-started power iterations per layer
            (what Trainer.train_step computes, without the optimiser update and augmentation);
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
from timing import time_train_steps, timed, train_step_timer

from certjax.losses import emma
from certjax.models import liresnet
from certjax.models.common import lipschitz
from configs.liresnet import get_config


def loss_gradient(model):
    def loss(params, state, images, labels, eps):
        output, _ = model.apply({"params": params, **state}, images, train=True, mutable=[lipschitz.POWER])
        return jnp.mean(emma(output.logits, output.pair_bound, labels, {"eps_train": eps}, None))

    return jax.jit(jax.grad(loss))


def power_only(model):
    """Gradient of prod_l sigma_l (10 warm-started iterations each) w.r.t. the kernels as applied."""
    geometry = liresnet.layer_geometry(model)

    def linear_map(name):
        if geometry[name] is None:
            return lipschitz.dense
        _, stride, padding = geometry[name]
        return lambda v, w: lipschitz.conv(v, w, stride, padding)

    def product(kernels, vectors):
        total = 1.0
        for name, kernel in kernels.items():
            apply = linear_map(name)
            fixed = jax.lax.stop_gradient(kernel)
            step = lambda v, a=apply, k=fixed: a(v, k)  # noqa: E731
            u = lipschitz.power_iteration(step, vectors[name], model.iterations)
            total = total * jnp.sqrt(jnp.sum(jnp.square(apply(u, kernel))))
        return total

    return jax.jit(jax.grad(product))


def conv_phases(model, variables, images, *, repeats: int, xla_kernel_gradient: bool = False):
    """Seconds of every conv layer's forward, input gradient and kernel gradient at its training shape
    (stem, blocks, neck), each phase jitted alone on random inputs and cotangents."""
    _, frozen = model.apply(variables, images[:1], mutable=[lipschitz.FROZEN])
    shapes = {"stem": images.shape}
    for name in liresnet.layer_geometry(model):
        if name.startswith("block"):
            shapes[name] = (images.shape[0], images.shape[1] // 2, images.shape[2] // 2, model.width)
        elif name == "neck_conv":
            shapes[name] = (images.shape[0], images.shape[1] // 2, images.shape[2] // 2, model.width)
    key = jax.random.key(1)
    totals = {"forwards": 0.0, "input gradients": 0.0, "kernel gradients": 0.0}
    for name, shape in shapes.items():
        kernel = frozen[lipschitz.FROZEN][name]["kernel"]
        size, stride, padding = liresnet.layer_geometry(model)[name]
        inputs = jax.random.normal(key, shape)

        def forward(x, k, s=stride, p=padding):
            return lipschitz.conv(x, k, s, p)

        g = jax.random.normal(key, jax.eval_shape(forward, inputs, kernel).shape)
        totals["forwards"] += timed(jax.jit(forward), inputs, kernel, repeats=repeats)
        if name != "stem":  # the images need no gradient
            input_grad = jax.jit(lambda x, k, g, f=forward: jax.vjp(lambda a: f(a, k), x)[1](g)[0])
            totals["input gradients"] += timed(input_grad, inputs, kernel, g, repeats=repeats)

        def kernel_grad(x, k, g, s=stride, p=padding, fast=not xla_kernel_gradient):
            return jax.vjp(lambda w: lipschitz.conv(x, w, s, p, fast_gradient=fast), k)[1](g)[0]

        totals["kernel gradients"] += timed(jax.jit(kernel_grad), inputs, kernel, g, repeats=repeats)
    return totals


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
    params, state = variables["params"], {lipschitz.POWER: variables[lipschitz.POWER]}
    images = jax.random.uniform(key, (args.batch, 32, 32, 3), minval=-0.5, maxval=0.5)
    labels = jax.random.randint(key, (args.batch,), 0, 10)
    eps = np.float32(36 / 255)

    t_step = timed(loss_gradient(model), params, state, images, labels, eps, repeats=args.repeats)
    t_plain = timed(
        loss_gradient(model.clone(iterations=0)), params, state, images, labels, eps, repeats=args.repeats
    )
    _, frozen = model.apply(variables, images[:1], mutable=[lipschitz.FROZEN])
    kernels = {name: value["kernel"] for name, value in frozen[lipschitz.FROZEN].items()}
    vectors = {name: value["u"] for name, value in state[lipschitz.POWER].items()}
    t_power = timed(power_only(model), kernels, vectors, repeats=args.repeats)
    t_convs = conv_phases(model, variables, images, repeats=args.repeats)
    t_convs_xla = conv_phases(model, variables, images, repeats=args.repeats, xla_kernel_gradient=True)[
        "kernel gradients"
    ]
    config = get_config(args.size)
    config.model.depth, config.model.width = depth, width
    config.model.power_iterations = args.iterations
    t_train = time_train_steps(*train_step_timer(config, args.batch), repeats=args.repeats)
    print(f"train step (Trainer.train_step):  {t_train:8.3f} s  ({args.batch / t_train:8.1f} img/s)")
    print(f"gradient (fwd+bwd with power iter.): {t_step:8.3f} s  ({args.batch / t_step:8.1f} img/s)")
    print(f"fwd+bwd without power iteration:     {t_plain:8.3f} s  ({args.batch / t_plain:8.1f} img/s)")
    print(
        f"power iteration alone:               {t_power:8.3f} s  = {100 * t_power / t_train:5.1f} % of the "
        f"train step (gradient - fwd+bwd: {t_step - t_plain:+.3f} s)"
    )
    convs = sum(t_convs.values())
    for phase, seconds in t_convs.items():
        print(f"  {phase:<34} {seconds:8.3f} s  = {100 * seconds / t_train:5.1f} % of the train step")
    print(
        f"convolutions (all layers, 3 phases): {convs:8.3f} s  = {100 * convs / t_train:5.1f} %; the rest "
        f"(MinMax, bias, loss, power iteration, optimiser, augmentation): {t_train - convs:.3f} s"
    )
    print(f"  (XLA's own kernel gradient instead of the chunked one: {t_convs_xla:.3f} s)")


if __name__ == "__main__":
    main()
