"""LiResNet++'s whole `certificate_bounds` at paper size, timed end to end, on any checkout: copy this file
into a worktree of an older commit to time its code (8811d5e: exact SVDs and the 500 power iterations, the
only form it has), or run it on main, where it times the call the evaluations during training make.

  git worktree add /tmp/wt-8811 8811d5e && cp bench/bounds_whole.py /tmp/wt-8811/ \
      && (cd /tmp/wt-8811 && python bounds_whole.py)          # 534.9 s on 2 cores (2026-12-02)
  python bench/bounds_whole.py --calls 2                       # main: fast, no assumed figure
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT if os.path.isdir(os.path.join(ROOT, "certjax")) else os.path.dirname(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from certjax.models import liresnet_pp  # noqa: E402
from configs.liresnet_pp import get_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1)
    args = parser.parse_args()
    config = get_config("cifar10")
    build = liresnet_pp.build if hasattr(liresnet_pp, "build") else liresnet_pp.FAMILY.build
    model = build(config.model, 10)
    init = jax.jit(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), jnp.float32(jnp.inf), train=False)
    )
    variables = jax.tree.map(np.asarray, init())
    options = {}
    if "bound_method" in inspect.signature(liresnet_pp.certificate_bounds).parameters:
        options = {"bound_method": "fast", "assumed": False}  # as the evaluations during training call it
    for call in range(args.calls):
        start = time.perf_counter()
        bounds = liresnet_pp.certificate_bounds(model, variables, (1, 32, 32, 3), **options)
        print(
            f"certificate_bounds {options or '(the only form)'} call {call + 1}: "
            f"{time.perf_counter() - start:.1f} s; body {bounds['report']['lipschitz_body_measured']:.7f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
