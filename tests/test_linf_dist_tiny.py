"""The l_inf-dist Net+MLP Tiny-ImageNet recipe (configs/linf_dist.py `v1,tiny_imagenet`, issue 25): the hybrid
model's l_inf-dist body against an independent float64 forward and sampled points of its interval bounds, the
ibp_cross_entropy loss and the schedules against transcriptions of zbh2047/L_inf-dist-net main.py (`Loss`,
`create_schedule`), the config's variants, and one end-to-end run on the Tiny-ImageNet fixture."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.certify.interval import Interval
from certjax.losses import LOSSES
from certjax.models import certified_logits, get_family
from certjax.models.sortnet_hybrid import SortHybridNet
from certjax.optim.schedules import learning_rate_schedule, schedule_values
from configs.linf_dist import get_config
from tests.conftest import REPO, run_launch

CLASSES = 5


@pytest.fixture(scope="module")
def dist_model():
    model = SortHybridNet(depth=4, width=16, hidden=8, num_classes=CLASSES, mode="exact", body="dist",
                          distance_kernel="jnp")  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
    variables = model.init(jax.random.key(1), x)
    _, state = model.apply(variables, 0.5 * x, train=True, mutable=["batch_stats"])  # running means != 0
    return model, {**variables, **state}, x


def _float64_forward(variables, x):
    """MLPFeature + Predictor at p = inf, evaluation mode, float64 numpy (model/mlp.py, bound_module.py)."""
    params, means = variables["params"], variables["batch_stats"]
    h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    for k in range(2):
        w = np.asarray(params[f"DistLayer_{k}"]["kernel"], np.float64)
        h = np.abs(h[:, None, :] - w[None]).max(-1) - np.asarray(means[f"MeanShift_{k}"]["mean"], np.float64)
    for k, activation in ((0, np.tanh), (1, lambda a: a)):
        w = np.asarray(params[f"HeadLinear_{k}"]["kernel"], np.float64)
        h = activation(h @ w.T / math.sqrt(w.shape[1]) + np.asarray(params[f"HeadLinear_{k}"]["bias"]))
    return h


def test_dist_body_is_mlp_feature_then_the_predictor(dist_model):
    model, variables, x = dist_model
    params = variables["params"]
    assert sorted(params) == ["DistLayer_0", "DistLayer_1", "HeadLinear_0", "HeadLinear_1", "logit_scale"]
    second = np.asarray(params["DistLayer_1"]["kernel"])  # 16 -> 16: identity init, w[o, o mod in] = -10
    np.testing.assert_array_equal(second[np.arange(16), np.arange(16)], -10.0)
    assert not np.any(np.asarray(params["DistLayer_0"]["kernel"]) == -10.0)  # 48 -> 16: N(0, 1) only
    logits = np.asarray(model.apply(variables, x).logits)
    np.testing.assert_allclose(logits, _float64_forward(variables, x), rtol=1e-5, atol=1e-5)


def test_dist_body_bounds_contain_every_sampled_point_and_no_margin_is_claimed(dist_model):
    model, variables, x = dist_model
    eps = 0.05
    out = jax.jit(lambda v, x: model.apply(v, x, interval=Interval(x - eps, x + eps)))(variables, x)
    lower, upper = (np.asarray(end) for end in out.logit_bounds)
    k = np.asarray(out.logits).argmax(-1)
    logits_of = jax.jit(lambda v, x: model.apply(v, x).logits)
    key = jax.random.key(2)
    for trial in range(30):  # corners and interior points of the box
        key, sub = jax.random.split(key)
        if trial % 2:
            delta = eps * jax.random.rademacher(sub, x.shape, jnp.float32)
        else:
            delta = jax.random.uniform(sub, x.shape, minval=-eps, maxval=eps)
        z = np.asarray(logits_of(variables, x + delta))
        diff = z - z[np.arange(4), k][:, None]
        assert np.all(lower <= diff) and np.all(diff <= upper), trial
    _, error = certified_logits(model, variables, x)
    assert np.all(np.isinf(np.asarray(error)))  # the tanh head: no margin certificate


def test_dist_body_has_no_dropout():
    model = SortHybridNet(depth=4, width=8, hidden=4, num_classes=3, mode="dropout", body="dist")
    with pytest.raises(ValueError, match="use model.mode 'exact'"):
        model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="model.body"):
        SortHybridNet(body="conv").init(jax.random.key(0), jnp.zeros((2, 4, 4, 3)))


def _original_loss(outputs, worse_outputs, targets, kappa):
    """main.py `Loss(cross_entropy(), kappa)` with three arguments, in float64 numpy."""
    rows = np.arange(len(targets))

    def cross_entropy(scores):
        shifted = scores - scores.max(1, keepdims=True)
        return np.mean(np.log(np.exp(shifted).sum(1)) - shifted[rows, targets])

    margin_output = outputs - outputs[rows, targets][:, None]
    return kappa * cross_entropy(worse_outputs) + (1 - kappa) * cross_entropy(margin_output)


@pytest.mark.parametrize("kappa", [1.0, 0.3])
def test_ibp_cross_entropy_matches_the_original_formula(kappa):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(32, 6)).astype(np.float32)
    labels = np.where(rng.random(32) < 0.6, logits.argmax(1), rng.integers(0, 6, 32)).astype(np.int32)
    k = logits.argmax(1)  # bounds of z - z_k, k the prediction, as the model returns them
    upper = np.abs(rng.normal(size=(32, 6))).astype(np.float32) - 0.8
    lower = upper - np.abs(rng.normal(size=(32, 6))).astype(np.float32)
    upper[np.arange(32), k] = lower[np.arange(32), k] = 0.0
    bounds = (jnp.asarray(lower), jnp.asarray(upper))
    ours = LOSSES["ibp_cross_entropy"](
        jnp.asarray(logits), jnp.float32(3.0), jnp.asarray(labels), {}, {"kappa": kappa}, logit_bounds=bounds
    )
    worse = upper.astype(np.float64) - lower[np.arange(32), labels][:, None]  # u_j >= z_j - z_y
    worse[np.arange(32), labels] = 0.0
    expected = _original_loss(logits.astype(np.float64), worse, labels, kappa)
    np.testing.assert_allclose(float(jnp.mean(ours)), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="loss.bound='ibp'"):
        LOSSES["ibp_cross_entropy"](jnp.asarray(logits), 1.0, jnp.asarray(labels), {}, {"kappa": kappa})


def _original_schedule(step, batches, lr=0.04, eps_train=0.005, p_start=8.0, p_end=1000.0):
    """main.py create_schedule for --epochs 0,100,200,450,500: (lr, p, eps) at step (epoch, minibatch)."""
    epoch0, epoch1, epoch2, epoch3, tot_epoch = 0, 100, 200, 450, 500
    epoch, minibatch = divmod(step, batches)

    def num_batches(e, m=0):
        return e * batches + m

    ratio = max(num_batches(epoch - epoch1, minibatch) / num_batches(tot_epoch - epoch1), 0)
    lr_now = 0.5 * lr * (1 + math.cos(ratio * math.pi))
    ratio = min(max(num_batches(epoch - epoch1, minibatch) / num_batches(epoch3 - epoch1), 0), 1)
    p = math.inf if ratio >= 1 else p_start * math.exp(math.log(p_end / p_start) * ratio)
    ratio = min(max(num_batches(epoch - epoch0, minibatch) / num_batches(epoch2), 0), 1)
    return lr_now, p, eps_train * ratio


def test_schedules_match_create_schedule():
    config = get_config("v1,tiny_imagenet")
    batches = 196  # ceil(100000 / 512)
    total = config.train.epochs * batches
    lr_of = learning_rate_schedule(config.optimizer, config.optimizer.lr, total, batches)
    for step in (0, 1, 9_799, 19_599, 19_600, 19_601, 39_199, 39_200, 50_000, 88_199, 88_200, total - 1):
        lr, p, eps = _original_schedule(step, batches)
        values = schedule_values(config, step, total)
        assert float(lr_of(step)) == pytest.approx(lr, rel=1e-5, abs=1e-9), step
        assert values["p"] == pytest.approx(p, rel=1e-9), step
        assert values["eps_train"] == pytest.approx(eps, rel=1e-12, abs=1e-18), step


def test_config_variants():
    config = get_config("v1,tiny_imagenet")
    assert config.model.name == "sortnet_hybrid" and config.model.body == "dist" and config.model.depth == 7
    assert config.data.dataset == "tiny_imagenet" and config.certify.eps == 1 / 255
    assert config.optimizer.name == "adamw_lp" and config.certify.method == "ibp"
    assert get_family(config.model.name).interval_bounds
    tiny = get_config("demo,tiny,v1,tiny_imagenet")
    assert tiny.data.dataset == "tiny_imagenet" and tiny.train.batch_size == 64 and tiny.model.width == 32
    for variant in ("v2,tiny_imagenet", "tiny_imagenet"):
        with pytest.raises(ValueError, match="v1 recipe"):
            get_config(variant)
    with pytest.raises(ValueError, match="choose one dataset"):
        get_config("v1,tiny_imagenet,cifar100")


def test_end_to_end_on_the_tiny_imagenet_fixture(tmp_path):
    """launch.py trains demo,tiny,v1,tiny_imagenet for 4 steps at 64x64 and evaluates; the API and the export
    certify the same validation images alike; the audit breaks no certificate."""
    import certjax
    from certjax import audit
    from certjax.data.sources import make_real_source
    from certjax.inference.export import export_model
    from tests.data64 import write_tiny_imagenet

    tiny = write_tiny_imagenet(tmp_path)
    workdir = tmp_path / "run"
    config = str(REPO / "configs/linf_dist.py") + ":demo,tiny,v1,tiny_imagenet"
    done = run_launch(config, workdir, f"--config.data.real={tiny}", "--config.certify.eps=0.0005")
    assert done.returncode == 0, done.stderr[-3000:]
    images, labels = make_real_source(str(tiny), "test", "tiny_imagenet").read(np.arange(0, 200, 20))
    assert images.shape[1:] == (64, 64, 3)
    model = certjax.restore(str(workdir), "last")
    ours = model.certify(images, labels=labels)
    assert not ours["robust_margin"].any() and np.all(ours["radius"] == 0)  # no margin certificate
    np.testing.assert_array_equal(ours["robust"], ours["robust_ibp"])
    export_model(model, str(tmp_path / "export"), platforms=("cpu",))
    exported = certjax.load_exported(str(tmp_path / "export"))
    theirs = exported.certify(images, labels=labels)
    assert set(theirs) == set(ours)
    for key in ours:
        np.testing.assert_array_equal(theirs[key], ours[key], err_msg=key)
    np.testing.assert_array_equal(exported.logits(images), model.logits(images))
    report = audit.audit_workdir(str(workdir), "last", limit=20, steps=10, restarts=1, targets=2)
    assert report["broken"] == 0 and report.get("broken_ibp", 0) == 0 and report["sound"]
