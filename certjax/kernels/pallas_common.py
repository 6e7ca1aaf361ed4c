"""What the Pallas (Triton) kernels of the l_p-dist op share: tile sizes, the padded grid, compiler options.

Moved from certjax/kernels/linf_dist_pallas.py (`BlockSizes`, `_round_up`, `_pad_to`, `_compiler_params`),
whose private names the interval-bounds kernel (certjax.kernels.lp_bounds_pallas) imported; both kernel
modules now take them from here. The tiling follows the original CUDA kernel (zbh2047/L_inf-dist-net-v2
core/cuda/inf_dist_cuda.cu: a 64 x 64 output tile per block of 256 threads).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["DEFAULT_BLOCKS", "BlockSizes", "compiler_params", "pad_to", "round_up_to", "tile_grid"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two: Triton's tensors must be). Defaults mirror the original CUDA kernel's
    64 x 64 output tile over 256 threads; not tuned on a GPU yet."""

    block_b: int = 64  # batch rows per program (forward, grad_x)
    block_o: int = 64  # output units per program (forward, grad_w)
    block_i: int = 64  # input coordinates per program in the backward kernels
    unroll: int = 8  # loop steps unrolled per iteration (over I forward, over O or B backward)
    num_warps: int = 8

    def __post_init__(self):
        for name in ("block_b", "block_o", "block_i", "unroll"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two, got {value}")
        if self.unroll > min(self.block_b, self.block_o):
            raise ValueError(f"unroll {self.unroll} exceeds a tile ({self.block_b} x {self.block_o})")


DEFAULT_BLOCKS = BlockSizes()  # every kernel's default (the bounds kernel's two accumulators: not tuned yet)


def round_up_to(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def pad_to(a: jax.Array, shape) -> jax.Array:
    """a zero-padded at the end of each axis to `shape` (a padded coordinate has |x - w| = 0)."""
    return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


def compiler_params(blocks: BlockSizes):
    """The Triton backend's parameters: passing them to `pallas_call` selects Triton over Mosaic GPU."""
    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=1)


def tile_grid(batch: int, out: int, size: int, blocks: BlockSizes, size_multiple: int):
    """The [B, O] output tiling of a kernel over x [B, I] and w [O, I].

    Args:
      batch, out, size: B, O and I.
      blocks: the tile sizes; a tile is cut down to the next power of two of a smaller B or O.
      size_multiple: I is padded to a multiple of it (the unroll of a loop over I, or its tile).

    Returns:
      (block_b, block_o, padded_b, padded_o, padded_i): the tile and B, O, I padded to whole tiles.
    """
    block_b = min(blocks.block_b, pl.next_power_of_2(batch))
    block_o = min(blocks.block_o, pl.next_power_of_2(out))
    padded = round_up_to(batch, block_b), round_up_to(out, block_o), round_up_to(size, size_multiple)
    return (block_b, block_o, *padded)
