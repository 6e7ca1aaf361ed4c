"""SortNet layer cost next to the l_inf-dist layer's, measured side by side in one run.

Forward + backward time of ONE layer (input width = output width = W) at batch 512, for
  l_inf-dist (p = inf and p = 8), SortNet exact (sort neuron, K = 10, blockwise lax.top_k),
  SortNet dropout (masked distance, q = 0.85; p = inf and p = 8),
and each one's ratio to the l_inf-dist layer at p = inf.

  python bench/sortnet.py --widths 1024 5120 --repeats 2
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from timing import timed

from certjax.kernels.linf_dist import lp_distance, masked_lp_distance
from certjax.kernels.sort_neuron import sort_distance
from certjax.models.sortnet import dropout_mask, float32_sort_weights

INF, EIGHT = float("inf"), 8.0


def fwd_bwd(layer):
    """(x, w, mask, weights, g) -> gradients of sum(g * layer) w.r.t. x and w: one forward + backward."""

    def loss(x, w, mask, weights, g):
        return jnp.sum(g * layer(x, w, mask, weights))

    return jax.grad(loss, argnums=(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 5120])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--q", type=float, default=0.85)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}, forward + backward of one layer")
    for width in args.widths:
        kx, kw, km, kg = jax.random.split(jax.random.key(0), 4)
        x = jax.random.normal(kx, (args.batch, width))
        w = jax.random.normal(kw, (width, width))
        g = jax.random.normal(kg, (args.batch, width))
        mask = dropout_mask(km, args.batch, width, args.q)
        weights = jnp.asarray(float32_sort_weights(args.q, width))

        layers = {
            "l_inf-dist p=inf": lambda x, w, m, c: lp_distance(x, w, INF),
            "l_inf-dist p=8": lambda x, w, m, c: lp_distance(x, w, EIGHT),
            "SortNet exact (sort, K=10)": lambda x, w, m, c: sort_distance(x, w, c),
            "SortNet dropout p=inf": lambda x, w, m, c: masked_lp_distance(x, w, m, INF),
            "SortNet dropout p=8": lambda x, w, m, c: masked_lp_distance(x, w, m, EIGHT),
        }
        cases = {name: jax.jit(fwd_bwd(layer)) for name, layer in layers.items()}
        baseline = None
        print(f"width {width}:")
        for name, fn in cases.items():
            seconds = timed(fn, x, w, mask, weights, g, repeats=args.repeats)
            baseline = baseline or seconds
            print(f"  {name:28s} {seconds * 1e3:10.1f} ms   x{seconds / baseline:6.2f}")


if __name__ == "__main__":
    main()
