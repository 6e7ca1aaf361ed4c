"""What kernel="auto" runs for an op: a candidate kernel checked once per configuration, else the jnp path.

Renamed from certjax/kernels/verify.py (kernel selection, not certificate checking); its two copies of every
function became one check over an `Op` record: `DISTANCE` (the l_p-dist op of certjax.kernels.linf_dist) and
`bounds_op(...)` (its interval bounds, certjax.certify.interval.lp_distance_bounds, which hands in its own
rounding so that no kernel module imports the bounds module).

Why: the Pallas (Triton) kernels are the fast path on a GPU, but a Triton or jaxlib version, a GPU generation
or a shape they were never run on can fail to compile them or, worse, compile them into something that
computes wrong numbers. A training run of days should neither die on the first step nor train on wrong
gradients because of that. So the first time "auto" meets a static configuration (`Signature`: the op,
shapes and dtypes of x and w, masked or not; the candidate fixes the tile sizes), it compiles the candidate
for exactly that configuration and compares it with the jnp path (the same function on every backend) on
random inputs of those shapes, at p = inf and p = 8 (the keys of `TOLERANCES`):

* the l_p-dist op: values of the plain forward and of the forward that keeps the arg-max, and both gradients
  (the backward of sum(g * y) for a random g): all four Pallas kernels (l_inf with and without arg-max, l_p
  forward, l_p backward) and the scatter backward;
* interval bounds: each end of the interval the models use (the candidate's raw ends rounded outward with
  the kernel allowance, through the bounds module's own function) on random boxes; and containment: the
  candidate's interval must contain the jnp path's, up to what rounding can explain. Both contain the exact
  bound, and the jnp end is within its allowance a of it after widening by a, so a sound candidate's lower
  end is <= jnp lower + 2 a |jnp lower| + 2 ulp + 2 tiny (the upper end mirrored). A tighter candidate fails
  even when it is well within the tolerance: a bound that claims more than the math proves must never
  certify anything.

A compile (or run) error or a difference above the tolerance gives one `KernelFallbackWarning` naming the
error or the difference and the configuration, and "auto" uses the jnp path for that configuration. The
verdict is kept for the life of the process (`decisions()`), so the check runs once per configuration, not
once per step. kernel="pallas" never goes through here: it uses the kernels unchecked and fails loudly.

When: while the model is traced (shapes are static then), so the check must not become part of the traced
program. It runs in a fresh thread: JAX's trace state is thread-local, so there the check's jit calls
execute on its own concrete arrays instead of being staged into the caller's program, and it only ever sees
the `Signature` (Python ints and dtype names), never the caller's tracers.

Many processes: SPMD programs must be identical in every process, so every process must choose the same
path. Each process checks on the same inputs (a fixed seed) and the verdicts are then combined with an
all-gather across processes (`jax.experimental.multihost_utils`): the candidate is used only if it passed
everywhere. Every process reaches the check at the same point of the same trace, which is what a collective
needs; a process whose own check passed names the other processes' failure in its warning.

Tolerances (largest |candidate - jnp| / largest |jnp| per output). p = inf, 1e-5: both paths take the max of
the same float32 |x - w| and the same (lowest) arg-max, so values agree bitwise and gradients up to the order
of the scatter-add's sums (atomics on a GPU, ~1e-7). A kernel fault (a wrong tile or offset, a lost mask, a
skipped coordinate, a wrong arg-max) moves some value or gradient by O(0.01-1) there. p = 8, 1e-2: the
kernel sums the p-th powers one coordinate at a time with a running rescale, the jnp path in XLA's order
after the global max, so rounding grows with I: measured (interpret mode, CPU) 2e-5 of the largest gradient
at I = 1024 and 1e-4 at I = 5120, the paper's widest layer; 1e-2 leaves ~100x for other GPU rounding and
still catches a wrong tile of the l_p kernels (O(1)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from certjax.kernels import linf_dist_pallas, lp_bounds_pallas
from certjax.kernels.linf_dist_jnp import lp_distance_jnp, masked_lp_distance_jnp
from certjax.kernels.pallas_common import DEFAULT_BLOCKS

__all__ = [
    "DISTANCE",
    "TOLERANCES",
    "CheckResult",
    "KernelFallbackWarning",
    "Op",
    "Signature",
    "bounds_op",
    "candidate_for_auto",
    "check",
    "clear_decisions",
    "decisions",
    "jnp_distance",
    "pallas_bounds",
    "pallas_distance",
    "select",
]

# p -> largest |candidate - jnp| / largest |jnp| allowed per output (module docstring). The p checked: the
# l_inf phase and the start of the l_p phase of the p schedule.
TOLERANCES = {float("inf"): 1e-5, 8.0: 1e-2}


class KernelFallbackWarning(RuntimeWarning):
    """kernel="auto" found a candidate kernel broken for a configuration and uses the jnp path for it."""


@dataclasses.dataclass(frozen=True)
class Signature:
    """A static configuration of an op: everything a compiled kernel depends on besides the tile sizes."""

    x_shape: tuple[int, int]
    w_shape: tuple[int, int]
    x_dtype: str
    w_dtype: str
    mask_dtype: str | None  # None: not masked
    op: str = (
        "distance"  # Op.name: "distance" (the l_p-dist op) | "bounds" (its interval bounds; x: a box end)
    )

    @classmethod
    def of(cls, x, w, mask=None, op: str = "distance") -> Signature:
        """From arrays, tracers or ShapeDtypeStructs: only their static shapes and dtypes are read."""
        return cls(
            tuple(int(n) for n in x.shape),
            tuple(int(n) for n in w.shape),
            jnp.dtype(x.dtype).name,
            jnp.dtype(w.dtype).name,
            None if mask is None else jnp.dtype(mask.dtype).name,
            op,
        )

    def describe(self) -> str:
        """The configuration in words, e.g. "B x I x O = 13 x 37 x 21, float32, masked (float32)"."""
        (batch, size), out = self.x_shape, self.w_shape[0]
        dtypes = self.x_dtype if self.x_dtype == self.w_dtype else f"x {self.x_dtype}, w {self.w_dtype}"
        masked = f", masked ({self.mask_dtype})" if self.mask_dtype else ""
        what = "interval bounds, " if self.op == "bounds" else ""
        return f"{what}B x I x O = {batch} x {size} x {out}, {dtypes}{masked}"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One configuration's verdict. errors: {"p=8 grad_w": largest difference / largest magnitude, ...}
    (empty when the candidate did not compile or run); closest: the error nearest its tolerance, in words;
    reason: why it failed, "" if it passed."""

    signature: Signature
    ok: bool
    reason: str
    errors: dict[str, float]
    closest: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Op:
    """An op that kernel="auto" chooses a kernel for, and how a check compares a candidate with the jnp path.

    name: `Signature.op` and the key of `candidate_for_auto`. title: what the warning calls its kernel.
    pallas: the candidate on a GPU (the Pallas kernels at their default tiles). inputs(signature, seed): the
    random inputs of a check, the same numbers in every process. collect(fn, inputs): {p: {output: array}}
    for each p of TOLERANCES, fn a candidate or None for the jnp path (the reference). allowance(size, p):
    the jnp path's relative rounding allowance, for the containment check of `containment` ({output: +1 for
    a lower end, -1 for an upper end}); None: no containment check.
    """

    name: str
    title: str
    pallas: Callable
    inputs: Callable[[Signature, int], tuple]
    collect: Callable[[Callable | None, tuple], dict[float, dict[str, np.ndarray]]]
    allowance: Callable | None = None
    containment: tuple[tuple[str, float], ...] = ()


def pallas_distance(x, w, mask, p, *, blocks=None, interpret=False):
    """The Pallas kernels (default tiles unless `blocks`): the distance candidate "auto" checks on a GPU."""
    blocks = DEFAULT_BLOCKS if blocks is None else blocks
    return linf_dist_pallas.lp_distance_pallas(x, w, mask, p, blocks, interpret)


def jnp_distance(x, w, mask, p):
    """The jnp path (certjax.kernels.linf_dist_jnp's custom_vjp): the check's reference and the fallback."""
    return lp_distance_jnp(x, w, p) if mask is None else masked_lp_distance_jnp(x, w, mask, p)


def _random_mask(rng, signature: Signature):
    """Bernoulli(0.7) [B, I] with the first row fully dropped (y = 0, no gradient: the kernels' special case);
    None for an unmasked signature. Drawn last from rng, after the op's other inputs."""
    if signature.mask_dtype is None:
        return None
    keep = rng.random(signature.x_shape) < 0.7
    keep[0] = False
    return keep.astype(jnp.dtype(signature.mask_dtype))


def _distance_inputs(signature: Signature, seed: int):
    """x, w ~ N(0, 1), g ~ N(0, 1), the mask: the same numbers in every process, on its first device."""
    rng = np.random.default_rng(seed)
    (batch, size), out = signature.x_shape, signature.w_shape[0]
    x = rng.standard_normal((batch, size), np.float32).astype(jnp.dtype(signature.x_dtype))
    w = rng.standard_normal((out, size), np.float32).astype(jnp.dtype(signature.w_dtype))
    g = rng.standard_normal((batch, out), np.float32)
    mask = _random_mask(rng, signature)
    return jax.device_put((x, w, mask, g), jax.local_devices()[0])


def _distance_outputs(distance, inputs) -> dict[float, dict[str, np.ndarray]]:
    """{p: {"y": ..., "grad_x": ...}}: the plain forward, the forward of the backward pass and both
    gradients of sum(g * y); one compilation (p is traced). distance None: the jnp path."""
    distance = jnp_distance if distance is None else distance
    x, w, mask, g = inputs

    @jax.jit
    def run(x, w, mask, g, p):
        def forward(x, w):
            return distance(x, w, mask, p)

        y, vjp = jax.vjp(forward, x, w)
        grad_x, grad_w = vjp(g.astype(y.dtype))
        return {"y": forward(x, w), "y (forward with arg-max)": y, "grad_x": grad_x, "grad_w": grad_w}

    results = {}
    for p in TOLERANCES:
        values = jax.device_get(run(x, w, mask, g, np.float32(p)))
        results[p] = {name: np.asarray(value) for name, value in values.items()}
    return results


_PALLAS = functools.partial(pallas_distance)  # one object: decisions are keyed by the candidate's identity
DISTANCE = Op("distance", "distance kernel", _PALLAS, _distance_inputs, _distance_outputs)


def pallas_bounds(lower, upper, w, mask, p, *, blocks=None, interpret=False):
    """The Pallas bounds kernel's raw ends (default tiles unless `blocks`): the interval-bounds candidate
    "auto" checks on a GPU."""
    blocks = DEFAULT_BLOCKS if blocks is None else blocks
    return lp_bounds_pallas.lp_bounds_pallas(lower, upper, w, mask, p, blocks=blocks, interpret=interpret)


def _bounds_inputs(signature: Signature, seed: int):
    """Boxes [x - r, x + r] with x ~ N(0, 1), r ~ U(0, 0.5) (weights inside and outside their range), w ~ N(0,
    1), the mask: the same numbers in every process, on its first device."""
    rng = np.random.default_rng(seed)
    (batch, size), out = signature.x_shape, signature.w_shape[0]
    x = rng.standard_normal((batch, size))
    radius = 0.5 * rng.random((batch, size))
    dtype = jnp.dtype(signature.x_dtype)
    lower, upper = (x - radius).astype(dtype), (x + radius).astype(dtype)
    w = rng.standard_normal((out, size), np.float32).astype(jnp.dtype(signature.w_dtype))
    mask = _random_mask(rng, signature)
    return jax.device_put((lower, upper, w, mask), jax.local_devices()[0])


def _bounds_outputs(rounded, raw_bounds, inputs) -> dict[float, dict[str, np.ndarray]]:
    """{p: {"lower": ..., "upper": ...}} through rounded(raw_bounds, lower, upper, w, p, mask), the bounds
    module's function (raw_bounds None: the jnp path); one compilation (p is traced)."""
    lower, upper, w, mask = inputs
    run = jax.jit(lambda lower, upper, w, mask, p: rounded(raw_bounds, lower, upper, w, p, mask))
    results = {}
    for p in TOLERANCES:
        lo, hi = jax.device_get(run(lower, upper, w, mask, np.float32(p)))
        results[p] = {"lower": np.asarray(lo), "upper": np.asarray(hi)}
    return results


_PALLAS_BOUNDS = functools.partial(pallas_bounds)


@functools.cache
def bounds_op(rounded: Callable, allowance: Callable) -> Op:
    """The interval bounds of the l_p-dist op as an `Op`, checked through the bounds module's own functions
    (handed in: kernels do not import the bounds module).

    Args:
      rounded: (raw_bounds, lower, upper, w, p, mask) -> (lo, hi) rounded outward with the kernel allowance;
        raw_bounds None is the jnp path (certjax.certify.interval.lp_distance_bounds_with).
      allowance: (size, p) -> the jnp path's relative allowance
      (certjax.certify.interval.lp_rounding_allowance).

    Returns:
      One `Op` per pair of functions (cached), for `select` and `check`.
    """
    collect = functools.partial(_bounds_outputs, rounded)
    containment = (("lower", 1.0), ("upper", -1.0))
    return Op(
        "bounds", "interval-bounds kernel", _PALLAS_BOUNDS, _bounds_inputs, collect, allowance, containment
    )


def check(op: Op, candidate: Callable, signature: Signature, *, seed: int = 0) -> CheckResult:
    """Compile `candidate` for `signature` and compare it with the jnp path on random inputs (module
    docstring): every output within `TOLERANCES`, and for an op with containment each end containing the jnp
    path's. Must run outside any trace (`select` runs it in a fresh thread). Returns the verdict; a failure of
    the jnp path itself is raised (it is the fallback: nothing could be used instead)."""
    start = time.perf_counter()
    inputs = op.inputs(signature, seed)
    try:
        outputs = op.collect(candidate, inputs)
    except Exception as error:  # a Triton compile error, an XLA error at run time, a kernel bug raising
        reason = f"{type(error).__name__}: {_first_line(error)}"
        return CheckResult(signature, False, reason, {}, "", time.perf_counter() - start)
    reference = op.collect(None, inputs)  # after: a candidate that fails to compile costs no more
    sides = dict(op.containment)
    errors, problems, worst = {}, [], None  # worst: (error / tolerance, name, error, tolerance)
    for p, tolerance in TOLERANCES.items():
        allowance = None if op.allowance is None else float(op.allowance(signature.x_shape[1], np.float32(p)))
        for name, expected in reference[p].items():
            actual, label = outputs[p][name], f"p={p:g} {name}"
            if actual.shape != expected.shape or actual.dtype != expected.dtype:
                problems.append(
                    f"{label} is {actual.dtype}{list(actual.shape)}, "
                    f"not {expected.dtype}{list(expected.shape)}"
                )
                continue
            errors[label] = _relative_error(actual, expected)
            if worst is None or errors[label] / tolerance > worst[0]:
                worst = (errors[label] / tolerance, label, errors[label], tolerance)
            if name in sides:
                problems += _containment_problems(label, actual, expected, allowance, sides[name])
    return _check_result(signature, errors, problems, worst, start)


def _containment_problems(label: str, actual, expected, allowance: float, sign: float) -> list[str]:
    """[] if the candidate's end `actual` lies outside the jnp path's `expected` or inside it by no more than
    `_containment_slack`; sign +1 for a lower end, -1 for an upper end. nan counts as not contained."""
    slack = _containment_slack(expected, allowance)
    # lower: actual <= expected + slack; upper: actual >= expected - slack
    excess = sign * (actual.astype(np.float64) - expected.astype(np.float64)) - slack
    excess = np.where(np.isnan(excess), np.inf, excess)
    if not np.any(excess > 0):
        return []
    return [
        f"{label} bound is tighter than the jnp path's beyond rounding at "
        f"{int(np.sum(excess > 0))} of {excess.size} outputs (by up to "
        f"{float(np.max(excess)):.3g}): its interval does not contain the jnp interval"
    ]


def _containment_slack(expected: np.ndarray, allowance: float) -> np.ndarray:
    """How far a sound end may lie inside the jnp path's (float64): twice its relative allowance, two ulp,
    two smallest normal floats."""
    magnitude = np.abs(expected.astype(np.float64))
    ulp = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    return 2.0 * allowance * magnitude + 2.0 * ulp + 2.0 * float(np.finfo(np.float32).tiny)


def _check_result(signature, errors: dict, problems: list, worst, start: float) -> CheckResult:
    """The verdict of a check: `worst` = (error / tolerance, label, error, tolerance) of the output closest to
    its tolerance (None if none compared) becomes `closest` and, above its tolerance, the first problem."""
    closest = ""
    if worst is not None:
        ratio, label, error, tolerance = worst
        closest = f"{label} {error:.2g} (tolerance {tolerance:g})"
        if ratio > 1:
            problems.insert(
                0,
                f"{label} differs from the jnp path by {error:.3g} of its largest magnitude "
                f"(tolerance {tolerance:g})",
            )
    seconds = time.perf_counter() - start
    return CheckResult(signature, not problems, "; ".join(problems), errors, closest, seconds)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (1 if that is 0); inf where only one side is not finite."""
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    same_nonfinite = (np.isnan(actual) & np.isnan(expected)) | (actual == expected)
    difference = np.where(same_nonfinite, 0.0, np.abs(actual - expected))
    if not np.all(np.isfinite(difference)):
        return float("inf")
    finite = expected[np.isfinite(expected)]
    scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    return float(np.max(difference, initial=0.0)) / (scale or 1.0)


_overrides: dict[str, Callable] = {}  # Op.name -> candidate (candidate_for_auto)
_decisions: dict[tuple[Callable, Signature], CheckResult] = {}
_lock = threading.RLock()


@contextlib.contextmanager
def candidate_for_auto(candidate: Callable, op: str = "distance") -> Iterator[None]:
    """Within the block, kernel="auto" checks and uses `candidate` for the op named `op` ("distance": (x, w,
    mask, p) -> y; "bounds": (lower, upper, w, mask, p) -> raw (lo, hi)) on every backend, not only on a GPU.

    For tests: e.g. the Pallas kernels in interpret mode on CPU, or a deliberately broken kernel. A jitted
    function traced before the block keeps the path it was traced with: trace a fresh one inside.
    """
    if op not in ("distance", "bounds"):
        raise ValueError(f"unknown op {op!r}; valid: 'distance', 'bounds'")
    if not callable(candidate):
        raise TypeError(f"candidate must be a function, got {candidate!r}")
    with _lock:
        previous = _overrides.get(op)
        _overrides[op] = candidate
    try:
        yield
    finally:
        with _lock:
            _overrides[op] = previous


def decisions() -> dict[Signature, CheckResult]:
    """The verdicts reached so far in this process (the default candidates and any test candidate)."""
    with _lock:
        return {signature: result for (_, signature), result in _decisions.items()}


def clear_decisions() -> None:
    """Forget every verdict: the next use of each configuration checks again."""
    with _lock:
        _decisions.clear()


def select(op: Op, x, w, mask=None) -> Callable | None:
    """The function kernel="auto" uses for this configuration of `op` (`DISTANCE` or a `bounds_op`).

    Args: x, w, mask: the op's input (a box end for bounds), weights and mask; only their static shapes and
    dtypes are read (tracers are fine). Returns the candidate (the Pallas kernels on a GPU, or the one of
    `candidate_for_auto`) if it passed its check (run on first use of the configuration, then kept), else
    None for the jnp path.
    """
    with _lock:
        candidate = _overrides.get(op.name)
    if candidate is None:
        if jax.default_backend() != "gpu":  # the Triton kernels lower for CUDA only
            return None
        candidate = op.pallas
    return _checked(op, candidate, Signature.of(x, w, mask, op.name))


def _checked(op: Op, candidate, signature: Signature):
    """candidate if its verdict for signature (reached now if new, then kept) is a pass, else None."""
    key = (candidate, signature)
    with _lock:  # held through the check: two threads tracing at once check a configuration once
        result = _decisions.get(key)
        if result is None:
            result = _in_fresh_thread(lambda: _decide(op, candidate, signature))
            _decisions[key] = result
            if not result.ok:
                name = getattr(candidate, "__name__", None) or repr(candidate)
                name = "Pallas (Triton)" if candidate is op.pallas else name
                warnings.warn(
                    f"certjax: the {op.title} {name} failed its check for "
                    f"{signature.describe()}: {result.reason}. kernel='auto' uses the jnp path for this "
                    "configuration (model.kernel=pallas would use the kernel anyway; =jnp skips the check).",
                    KernelFallbackWarning,
                    stacklevel=5,  # the model code calling lp_distance / lp_distance_bounds
                )
    return candidate if result.ok else None


def _decide(op: Op, candidate, signature: Signature) -> CheckResult:
    """check, then the verdict all processes share. A process whose check raised (the jnp path failed) still
    takes part in the all-gather, as a failure, before raising: the others do not wait."""
    try:
        result, error = check(op, candidate, signature), None
    except Exception as raised:
        reason = f"the check itself failed: {type(raised).__name__}: {_first_line(raised)}"
        result, error = CheckResult(signature, False, reason, {}, "", 0.0), raised
    result = _agree_across_processes(result)
    if error is not None:
        raise error
    return result


def _agree_across_processes(result: CheckResult) -> CheckResult:
    """All processes use the candidate only if it passed in every one (module docstring)."""
    if jax.process_count() == 1:
        return result
    from jax.experimental import multihost_utils

    passed = np.asarray(multihost_utils.process_allgather(np.int32(result.ok)))
    if result.ok and not passed.all():
        failed = [int(i) for i in np.flatnonzero(passed == 0)]
        reason = f"it failed on process(es) {failed} (their warnings say why) and every process must agree"
        return dataclasses.replace(result, ok=False, reason=reason)
    return result


def _in_fresh_thread(fn):
    """fn() in a new thread (no trace is active there: JAX's trace state is thread-local); returns its
    result or raises its error."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="certjax-kernel-check", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else "(no message)"
    return line if len(line) <= limit else line[:limit] + " ..."
