"""Wall-clock timing shared by the benches (run as `python bench/<script>.py`: this file is importable)."""

import time

import jax


def timed(fn, *args, repeats: int) -> float:
    """Mean seconds per call over `repeats` calls, after one call that compiles (not counted)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats
