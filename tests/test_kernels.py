"""The Pallas l_p-dist kernels (certjax.kernels.linf_dist_pallas) against the jnp definitions.

`KernelTest` runs the kernels for real and needs a GPU; `KernelInterpretTest` runs the same assertions with
Pallas' interpret mode on any backend (CPU here). Shapes are small, some multiples of the tiles and some not
(padding and masking), for p in {1, 2, 8, 100, inf}; one jitted function per shape serves every p (p is
traced). The lowering tests export the kernels, and the l_inf-dist Net's and SortNet's whole train steps with
kernel=pallas, for CUDA from this machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from certjax.kernels import linf_dist_pallas as pallas_kernels
from certjax.kernels.linf_dist import lp_distance, lp_distance_reference, masked_lp_distance
from certjax.models.linf_dist import LinfDistNet
from certjax.models.sortnet import SortNet

SMALL = pallas_kernels.BlockSizes(block_b=8, block_o=8, block_i=8, unroll=4, num_warps=4)
# (B, I, O): multiples of SMALL's tiles, then none of B, I, O a multiple
SHAPES = {"aligned": (16, 32, 16), "ragged": (13, 37, 21)}
PS = (1.0, 2.0, 8.0, 100.0, np.inf)
# float32 l_p values and gradients: relative error ~ p * eps in a power, damped by the 1/p root in y
# but not in the gradient (|d|/y)^(p-1), hence the looser gradient tolerance at p = 100.
VALUE_TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_TOL = {1.0: 2e-5, 2.0: 2e-5, 8.0: 5e-5, 100.0: 5e-4, np.inf: 1e-6}  # inf: summation order only


def _data(shape, seed, *, ties=False):
    batch, size, out = shape
    rng = np.random.default_rng(seed)
    if ties:  # small integers: many equal |x - w| in every row, the arg-max must be the first of them
        x, w = rng.integers(-3, 4, (batch, size)), rng.integers(-3, 4, (out, size))
    else:
        x, w = rng.normal(size=(batch, size)), rng.normal(size=(out, size))
    g = rng.normal(size=(batch, out))
    mask = rng.random((batch, size)) < 0.7
    mask[0] = False  # a fully dropped row: y = 0, arg-max 0, no gradient
    return [jnp.asarray(a, jnp.float32) for a in (x, w, g, mask)]


class KernelTest(parameterized.TestCase):
    """Pallas kernels compiled for the GPU (skipped without one)."""

    INTERPRET = False

    def setUp(self):
        super().setUp()
        if not self.INTERPRET and jax.default_backend() != "gpu":
            self.skipTest("needs a GPU; KernelInterpretTest runs the same assertions in interpret mode")
        self.kernel = "interpret" if self.INTERPRET else "pallas"

    def assert_same_sums(self, actual, desired):
        """Bitwise on CPU; on GPU XLA's scatter-add sums duplicates with atomics, in no fixed order."""
        if self.INTERPRET:
            np.testing.assert_array_equal(actual, desired)
        else:
            np.testing.assert_allclose(
                actual, desired, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(desired)))
            )

    def _values_and_grads(self, masked: bool, blocks=SMALL):
        """jit(x, w, g, mask, p) -> {name: (y, grad_x, grad_w)}: the kernel, the jnp path, the definition."""
        interpret = self.INTERPRET

        def pallas(x, w, mask, p):
            return pallas_kernels.lp_distance_pallas(x, w, mask if masked else None, p, blocks, interpret)

        def jnp_path(x, w, mask, p):
            if masked:
                return masked_lp_distance(x, w, mask, p, kernel="jnp")
            return lp_distance(x, w, p, kernel="jnp")

        def reference(x, w, mask, p):
            return lp_distance_reference(x, w, p, mask if masked else None)

        def run(x, w, g, mask, p):
            results = {}
            for name, fn in (("pallas", pallas), ("jnp", jnp_path), ("reference", reference)):
                y, vjp = jax.vjp(lambda x, w, fn=fn: fn(x, w, mask, p), x, w)
                results[name] = (y, *vjp(g))
            return results

        return jax.jit(run)

    @parameterized.product(shape=list(SHAPES), masked=[False, True])
    def test_values_and_gradients_match_the_definition(self, shape, masked):
        x, w, g, mask = _data(SHAPES[shape], seed=len(shape) + masked)
        run = self._values_and_grads(masked)
        for p in PS:
            results = run(x, w, g, mask, jnp.float32(p))
            y, grad_x, grad_w = results["pallas"]
            for other in ("jnp", "reference"):
                y_other, grad_x_other, grad_w_other = results[other]
                np.testing.assert_allclose(y, y_other, **VALUE_TOL, err_msg=f"y vs {other}, p={p}")
                scale = float(jnp.max(jnp.abs(grad_x_other))) + float(jnp.max(jnp.abs(grad_w_other)))
                tol = dict(rtol=GRAD_TOL[p], atol=GRAD_TOL[p] * scale)
                np.testing.assert_allclose(grad_x, grad_x_other, **tol, err_msg=f"grad_x vs {other}, p={p}")
                np.testing.assert_allclose(grad_w, grad_w_other, **tol, err_msg=f"grad_w vs {other}, p={p}")
            if np.isinf(p):  # a max is exact, and so is a gradient of +-g at the same arg-max
                np.testing.assert_array_equal(y, results["jnp"][0])
                for a, b in zip(results["pallas"][1:], results["jnp"][1:]):
                    self.assert_same_sums(a, b)
        self.assertEqual(run._cache_size(), 1)  # p is traced: one compilation for all p

    @parameterized.product(shape=list(SHAPES), masked=[False, True])
    def test_argmax_is_the_lowest_index_on_ties(self, shape, masked):
        x, w, _, mask = _data(SHAPES[shape], seed=7, ties=True)
        mask = mask if masked else None
        y, idx = pallas_kernels.linf_forward(x, w, mask, blocks=SMALL, interpret=self.INTERPRET)
        y_ref, idx_ref = pallas_kernels.linf_argmax_reference(x, w, mask)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(idx, idx_ref)
        d = jnp.abs(x[:, None, :] - w[None]) * (1.0 if mask is None else mask[:, None, :])
        self.assertGreater(int(jnp.sum(jnp.sum(d == y[..., None], -1) > 1)), x.shape[0])  # ties happen
        y_plain = pallas_kernels.linf_forward(
            x, w, mask, with_argmax=False, blocks=SMALL, interpret=self.INTERPRET
        )
        np.testing.assert_array_equal(y_plain, y_ref)

    def test_gradient_goes_to_the_first_argmax(self):
        x = jnp.array([[1.0, -1.0, 0.5, 1.0]])  # |x - 0| ties at coordinates 0, 1 and 3
        w = jnp.zeros((1, 4))
        grad_x = jax.grad(lambda x: jnp.sum(lp_distance(x, w, jnp.float32(jnp.inf), kernel=self.kernel)))(x)
        np.testing.assert_array_equal(grad_x, [[1.0, 0.0, 0.0, 0.0]])

    def test_large_p_is_finite_and_between_the_norm_bounds(self):
        x, w, _, _ = _data((6, 50, 5), seed=3)
        x = x * 30  # |d|^1000 overflows float32 without rescaling
        y = lp_distance(x, w, jnp.float32(1000.0), kernel=self.kernel)
        y_inf = lp_distance(x, w, jnp.float32(jnp.inf), kernel=self.kernel)
        self.assertTrue(bool(jnp.all(jnp.isfinite(y))))
        # ||d||_inf <= ||d||_p <= n^(1/p) ||d||_inf
        self.assertTrue(bool(jnp.all(y >= y_inf * (1 - 1e-6))))
        self.assertTrue(bool(jnp.all(y <= y_inf * 50 ** (1 / 1000) * (1 + 1e-6))))

    def test_default_blocks(self):
        """The default tiles (64 x 64, clipped to the padded batch) on a shape of several programs."""
        x, w, g, mask = _data((64, 40, 136), seed=5)
        run = self._values_and_grads(True, blocks=pallas_kernels.BlockSizes())
        for p in (8.0, np.inf):
            results = run(x, w, g, mask, jnp.float32(p))
            for a, b in zip(results["pallas"], results["jnp"]):
                np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-5)

    def test_l_inf_dist_net_is_identical_with_jnp_and_pallas(self):
        def net(kernel):
            return LinfDistNet(depth=3, width=24, num_classes=10, distance_kernel=kernel)

        x = jax.random.normal(jax.random.key(0), (9, 3, 3, 2))
        variables = net("jnp").init(jax.random.key(1), x, jnp.float32(jnp.inf))

        def loss_and_grads(kernel, p):
            def loss(params):
                output, _ = net(kernel).apply(
                    {**variables, "params": params}, x, p, train=True, mutable=["batch_stats"]
                )
                z = output.logits
                return jnp.sum(z * jnp.arange(10.0)), z

            return jax.value_and_grad(loss, has_aux=True)(variables["params"])

        p = jnp.float32(jnp.inf)
        ((_, z_jnp), grads_jnp), ((_, z_pallas), grads_pallas) = (
            jax.jit(loss_and_grads, static_argnums=0)(k, p) for k in ("jnp", self.kernel)
        )
        np.testing.assert_array_equal(z_pallas, z_jnp)
        for a, b in zip(jax.tree.leaves(grads_pallas), jax.tree.leaves(grads_jnp)):
            self.assert_same_sums(a, b)

    def test_sortnet_dropout_training_output_matches(self):
        """The masked distance inside SortNet's dropout training (p = inf exact, p = 8 to rounding)."""
        x = jax.random.normal(jax.random.key(0), (33, 2, 2, 3))

        def model(kernel):
            return SortNet(depth=3, width=16, num_classes=10, q=0.7, mode="dropout", distance_kernel=kernel)

        variables = model("jnp").init(jax.random.key(1), x, jnp.float32(jnp.inf))

        @jax.jit
        def outputs(p):
            return [
                model(kernel)
                .apply(
                    variables,
                    x,
                    p,
                    train=True,
                    mutable=["batch_stats"],
                    rngs={"dropout": jax.random.key(2)},
                )[0]
                .logits
                for kernel in ("jnp", self.kernel)
            ]

        np.testing.assert_array_equal(*outputs(jnp.float32(jnp.inf)))
        np.testing.assert_allclose(*outputs(jnp.float32(8.0)), rtol=1e-5, atol=1e-5)


class KernelInterpretTest(KernelTest):
    """The same assertions with Pallas' interpret mode: runs on CPU."""

    INTERPRET = True


class LoweringTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        try:
            from jax._src.pallas.triton import pallas_call_registration  # noqa: F401
        except ImportError as error:  # a jaxlib without the Triton lowering
            self.skipTest(f"the Pallas Triton lowering is not importable here: {error}")

    def test_kernels_lower_for_cuda_with_triton(self):
        """Forward and backward (l_inf and l_p, plain and masked) export for CUDA from a CPU-only machine.

        Lowering builds the Triton IR of every kernel; only a GPU shows that it compiles (PTX) and runs.
        """
        shape = dict(x=(100, 300), w=(200, 300), g=(100, 200))
        args = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shape.items()}
        p = jax.ShapeDtypeStruct((), jnp.float32)

        def forward_backward(x, w, g, mask, p):
            def loss(x, w):
                return jnp.sum(g * masked_lp_distance(x, w, mask, p, kernel="pallas"))

            return lp_distance(x, w, p, kernel="pallas"), jax.grad(loss, (0, 1))(x, w)

        exported = jax.export.export(
            jax.jit(forward_backward),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(args["x"], args["w"], args["g"], args["x"], p)
        module = exported.mlir_module()
        # plain forward: l_inf + l_p (both cond branches); masked: l_inf with arg-max, l_p, grad_x, grad_w
        self.assertEqual(module.count("stablehlo.custom_call @__gpu$xla.gpu.triton("), 6)
        self.assertEqual(exported.platforms, ("cuda",))

    @parameterized.named_parameters(("linf_dist", "linf_dist"), ("sortnet", "sortnet"))
    def test_train_step_with_pallas_lowers_for_cuda(self, family):
        """The whole Experiment train step (augmentation, model, loss, optimiser) with kernel=pallas exports
        for CUDA: a depth-3 net has 3 x (l_inf forward with arg-max, l_p forward) + 3 l_p grad_w + 2 l_p
        grad_x kernels (the images need no gradient). SortNet's dropout layers use the masked kernels."""
        import importlib

        from certjax.experiment import Experiment
        from certjax.optim import schedules
        from certjax.train import Trainer

        config = importlib.import_module(f"configs.{family}").get_config("demo")
        config.model.depth, config.model.width, config.model.kernel = 3, 16, "pallas"
        exp = Experiment(config, data="test")
        trainer = Trainer(exp)
        batch = {
            "image": jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.uint8),
            "label": jax.ShapeDtypeStruct((64,), jnp.int32),
        }
        schedule = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in schedules.schedule_values(config, 0, 1)}
        exported = jax.export.export(
            jax.jit(trainer._train_step),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(exp.abstract_state(), batch, schedule)
        self.assertEqual(exported.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton("), 11)
