"""kernel="auto": a candidate kernel is checked once per configuration, and a broken one falls back to jnp
(certjax.kernels.autoselect).

On CPU "auto" has no candidate (the Triton kernels lower for CUDA only), so these tests inject one with
`autoselect.candidate_for_auto`: the Pallas kernels in interpret mode (small tiles, so the grid has several
programs), one that raises as a failed Triton compilation would, and two that compute wrong values (the jnp
path, perturbed at p = inf) or wrong gradients (the interpret-mode kernels, perturbed at p = 8). A broken
candidate must give exactly one warning per configuration and outputs bitwise
those of the jnp path; a training run with one proceeds.
"""

import functools
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.kernels import autoselect, linf_dist_pallas
from certjax.kernels.linf_dist import lp_distance, masked_lp_distance

# unroll 1: the smallest interpret-mode programs to compile (test_kernels.py covers unrolled loops)
SMALL = linf_dist_pallas.BlockSizes(block_b=8, block_o=8, block_i=8, unroll=1, num_warps=4)
SHAPE = (13, 37, 21)  # (B, I, O): no multiple of the tiles, 2 x 5 x 3 programs
PS = (np.inf, 8.0)


@pytest.fixture(autouse=True)
def _fresh_decisions():
    autoselect.clear_decisions()
    yield
    autoselect.clear_decisions()


def interpret_candidate(x, w, mask, p):
    return autoselect.pallas_distance(x, w, mask, p, blocks=SMALL, interpret=True)


def raising_candidate(x, w, mask, p):
    raise RuntimeError("Triton compilation failed: out of shared memory (injected)")


def wrong_values_candidate(x, w, mask, p):
    """The jnp path (quicker to compile than interpret mode), 1e-4 too large at p = inf, right at p = 8: only
    the p = inf check can see it."""
    y = autoselect.jnp_distance(x, w, mask, p)
    return jnp.where(jnp.isinf(p), y * (1 + 1e-4), y)


@jax.custom_vjp
def _gradient_times_1_05_at_finite_p(y, p):
    return y


_gradient_times_1_05_at_finite_p.defvjp(
    lambda y, p: (y, p), lambda p, g: (g * jnp.where(jnp.isinf(p), 1.0, 1.05), jnp.zeros_like(p))
)


def wrong_gradients_candidate(x, w, mask, p):
    """Right values everywhere, gradients 5 % too large at finite p: only the p = 8 gradient check sees it."""
    return _gradient_times_1_05_at_finite_p(interpret_candidate(x, w, mask, p), p)


def _data(masked: bool):
    batch, size, out = SHAPE
    kx, kw, kg, km = jax.random.split(jax.random.key(0), 4)
    x, w = jax.random.normal(kx, (batch, size)), jax.random.normal(kw, (out, size))
    g = jax.random.normal(kg, (batch, out))
    mask = (jax.random.uniform(km, (batch, size)) < 0.7).astype(jnp.float32) if masked else None
    return x, w, g, mask


def _values_and_grads(kernel: str, masked: bool):
    """A fresh jit of p -> (y, grad_x, grad_w) of sum(g * y) through the public op with `kernel`."""
    x, w, g, mask = _data(masked)

    def distance(x, w, p):
        if masked:
            return masked_lp_distance(x, w, mask, p, kernel=kernel)
        return lp_distance(x, w, p, kernel=kernel)

    @jax.jit
    def run(p):
        y, vjp = jax.vjp(lambda x, w: distance(x, w, p), x, w)
        return (y, *vjp(g))

    return [run(jnp.float32(p)) for p in PS]


@functools.cache
def _jnp_values_and_grads(masked: bool):
    return _values_and_grads("jnp", masked)


def _fallback_warnings(record) -> list[str]:
    return [str(r.message) for r in record if issubclass(r.category, autoselect.KernelFallbackWarning)]


def _assert_falls_back_to_jnp(candidate, masked: bool, *expected_in_message: str, traces: int = 1):
    """`traces` fresh traces of the same configuration: one check, one warning, the jnp path's numbers."""
    with autoselect.candidate_for_auto(candidate), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        runs = [_values_and_grads("auto", masked) for _ in range(traces)]
    messages = _fallback_warnings(record)
    assert len(messages) == 1, messages
    for text in ("13 x 37 x 21", "uses the jnp path", *expected_in_message):
        assert text in messages[0], (text, messages[0])
    for run in runs:
        for got, want in zip(jax.tree.leaves(run), jax.tree.leaves(_jnp_values_and_grads(masked))):
            np.testing.assert_array_equal(got, want)
    (result,) = autoselect.decisions().values()
    assert not result.ok


def test_a_correct_candidate_passes_the_check_and_is_used():
    calls = []  # the thread of each call: the check's, or the caller's trace

    def counting_candidate(x, w, mask, p):
        calls.append(threading.current_thread().name)
        return interpret_candidate(x, w, mask, p)

    with autoselect.candidate_for_auto(counting_candidate), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        auto = _values_and_grads("auto", masked=False)
    assert _fallback_warnings(record) == []
    (result,) = autoselect.decisions().values()
    assert result.ok and result.reason == "" and result.signature.describe().startswith("B x I x O = 13")
    assert result.errors["p=inf y"] == 0.0  # the same max of the same |x - w|
    assert max(result.errors.values()) < 1e-5
    assert "certjax-kernel-check" in calls  # checked ...
    assert threading.current_thread().name in calls  # ... then traced into the caller's program
    for got, want in zip(jax.tree.leaves(auto), jax.tree.leaves(_jnp_values_and_grads(False))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_a_candidate_that_fails_to_compile_falls_back_to_jnp(masked):
    _assert_falls_back_to_jnp(
        raising_candidate,
        masked,
        "RuntimeError: Triton compilation failed",
        "masked" if masked else "float32",
        traces=1 if masked else 2,  # a second trace of the configuration: no second check or warning
    )


@pytest.mark.parametrize(
    "candidate, label",
    [(wrong_values_candidate, "p=inf "), (wrong_gradients_candidate, "p=8 grad_")],
    ids=["values", "gradients"],
)
def test_a_candidate_that_computes_wrong_numbers_falls_back_to_jnp(candidate, label):
    _assert_falls_back_to_jnp(candidate, False, label, "differs from the jnp path by", "tolerance")


def test_training_proceeds_with_a_failing_kernel():
    """Train steps of a tiny l_inf-dist Net through Trainer.train_step (p = 8, then inf): one warning per
    layer shape, finite losses."""
    from certjax.experiment import Experiment
    from certjax.train import Trainer
    from configs.linf_dist import get_config

    config = get_config("demo")
    config.model.depth, config.model.width, config.train.batch_size = 3, 16, 16
    rng = np.random.default_rng(0)
    with autoselect.candidate_for_auto(raising_candidate), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        exp = Experiment(config, data="test")
        trainer = Trainer(exp)
        state = exp.init_state()
        for p in (8.0, np.inf):
            batch = {
                "image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                "label": rng.integers(0, 10, (16,), dtype=np.int32),
            }
            schedule = {"p": np.float32(p), "lam": np.float32(0.1), "eps_train": np.float32(24 / 255)}
            state, metrics = trainer.train_step(state, exp.global_batch(batch), schedule)
            assert np.isfinite(float(metrics.compute()["loss"]))
    assert int(state.step) == 2 and trainer.train_step._cache_size() == 1
    messages = _fallback_warnings(record)
    # layers 3072 -> 16 -> 16 -> 10 at the init batch (2) and the training batch (16): six configurations
    assert len(messages) == 6 and len(set(messages)) == 6, messages
    assert len(autoselect.decisions()) == 6 and not any(r.ok for r in autoselect.decisions().values())


def test_off_gpu_auto_is_the_jnp_path_without_a_check():
    x, w, _, _ = _data(masked=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = lp_distance(x, w, jnp.float32(8.0))
    np.testing.assert_array_equal(y, lp_distance(x, w, jnp.float32(8.0), kernel="jnp"))
    assert autoselect.decisions() == {}


def test_pallas_fails_loudly():
    """kernel="pallas" is never checked nor replaced: off GPU (no interpret mode) the error surfaces."""
    x, w, _, _ = _data(masked=False)
    with pytest.raises(ValueError, match="interpret mode"):
        lp_distance(x, w, jnp.float32(np.inf), kernel="pallas")
    assert autoselect.decisions() == {}


# One of two cooperating processes: a candidate that fails on process 1 only, used inside jit(grad(...)).
_TWO_PROCESSES = """
import sys, warnings
import jax, jax.numpy as jnp, numpy as np
jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
from certjax.kernels import autoselect
from certjax.kernels.linf_dist import lp_distance

def candidate(x, w, mask, p):
    if jax.process_index() == 1:
        raise RuntimeError("injected failure on process 1")
    return autoselect.jnp_distance(x, w, mask, p)

with autoselect.candidate_for_auto(candidate), warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    loss = lambda x, w: jnp.sum(lp_distance(x, w, jnp.float32(8.0)))
    x, w = np.ones((4, 8), np.float32), np.zeros((3, 8), np.float32)
    jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1)))(x, w))
print("WARNINGS", [str(r.message) for r in record if r.category is autoselect.KernelFallbackWarning])
print("USED", [r.ok for r in autoselect.decisions().values()])
"""


def test_processes_use_the_candidate_only_if_it_passed_in_every_one():
    """Two processes (CPU, jax.distributed): the candidate fails on process 1 only, and both use jnp."""
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO, launch_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", _TWO_PROCESSES]
    processes = [
        subprocess.Popen(
            [*command, str(i), str(port)],
            cwd=REPO,
            env=launch_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    (first, _), (second, _) = outputs
    assert "USED [False]" in first and "USED [False]" in second
    assert "it failed on process(es) [1]" in first and "4 x 8 x 3" in first
    assert "RuntimeError: injected failure on process 1" in second


def test_unknown_kernel_name_is_refused():
    x, w, _, _ = _data(masked=False)
    with pytest.raises(ValueError, match="unknown distance kernel 'triton'.*valid"):
        lp_distance(x, w, jnp.float32(np.inf), kernel="triton")
