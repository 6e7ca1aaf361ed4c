"""No TF32 on the certifying path (issue 21, acceptance): every float32 dot and convolution of a certifying
forward, and of the export's function, runs at precision HIGHEST when lowered for CUDA.

NVIDIA GPUs may run a float32 dot or convolution of DEFAULT precision in TF32 (10-bit mantissa), whose error
the certificates' rounding allowances do not cover. The lowering for CUDA needs no GPU: each golden checkpoint
(tests/golden/<case>, see tests/test_golden.py) is restored, its certifying forward
(`certjax.models.certified_logits`) lowered with `lowering_platforms=("cuda",)` and the export's artifacts
(the forward, and the l_inf families' interval bound step) written for CUDA only; every
`stablehlo.dot_general` / `stablehlo.convolution` with a float32 operand in the StableHLO text must carry
HIGHEST precision for both operands.
"""

from __future__ import annotations

import re
import shutil

import jax
import jax.numpy as jnp
import pytest

from tests.test_golden import CASES, GOLDEN

OPS = re.compile(r"stablehlo\.(dot_general|convolution)")
# both spellings of the attribute: "precision = [HIGHEST, HIGHEST]" (pretty) or "precision_config = [...]"
HIGHEST = re.compile(
    r"precision = \[HIGHEST, HIGHEST\]"
    r"|precision_config = \[#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>\]"
)


def low_precision_float32_ops(stablehlo: str) -> list[str]:
    """The lines of a StableHLO module with a float32 dot / convolution that lacks HIGHEST precision."""
    found = []
    for line in stablehlo.splitlines():
        if not OPS.search(line):
            continue
        signature = line.rsplit(" : ", 1)[-1]  # "(tensor<..xf32>, tensor<..xf32>) -> tensor<..>"
        operands = signature.split("->")[0]
        if re.search(r"xf32>", operands) and not HIGHEST.search(line):
            found.append(line.strip())
    return found


def test_the_check_finds_a_default_precision_float32_dot():
    x = jnp.ones((2, 3), jnp.float32)
    lowered = jax.jit(lambda a: a @ a.T).trace(x).lower(lowering_platforms=("cuda",))
    assert len(low_precision_float32_ops(lowered.as_text())) == 1
    highest = jax.jit(lambda a: jnp.matmul(a, a.T, precision="highest")).trace(x)
    assert low_precision_float32_ops(highest.lower(lowering_platforms=("cuda",)).as_text()) == []


@pytest.fixture(scope="module", params=CASES)
def restored(request, tmp_path_factory):
    import certjax

    workdir = tmp_path_factory.mktemp(request.param) / "workdir"
    shutil.copytree(GOLDEN / request.param / "workdir", workdir)
    return certjax.restore(str(workdir))


def test_certifying_forward_has_no_tf32_dot_or_convolution_on_cuda(restored):
    from certjax.models import certified_logits

    exp = restored._exp
    variables = {"params": restored._params, **restored._model_state, **restored._bounds["variables"]}
    images = jax.ShapeDtypeStruct((restored.batch_size, *restored.info["input_shape"]), jnp.float32)
    lowered = (
        jax.jit(lambda v, x: certified_logits(exp.model, v, x))
        .trace(variables, images)
        .lower(lowering_platforms=("cuda",))
    )
    assert low_precision_float32_ops(lowered.as_text()) == []


def test_export_for_cuda_has_no_tf32_dot_or_convolution(restored, tmp_path):
    from certjax.inference.export import ARTIFACTS, IBP_ARTIFACTS, export_model

    manifest = export_model(restored, str(tmp_path / "export"), platforms=("cuda",))
    names = [name for by_dtype in manifest["artifacts"].values() for name in by_dtype.values()]
    # every program: the certifying forward, and the interval bound step where the family certifies by it
    interval = restored._exp.certify_method != "margin"
    expected = [*ARTIFACTS.values(), *(IBP_ARTIFACTS.values() if interval else [])]
    assert sorted(names) == sorted(expected)
    for name in names:
        artifact = jax.export.deserialize(bytearray((tmp_path / "export" / name).read_bytes()))
        assert low_precision_float32_ops(artifact.mlir_module()) == [], name
