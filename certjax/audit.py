"""Soundness audit of a checkpoint's certificates: attack every certified test point, measure Lipschitz
ratios.

  python -m certjax.audit --workdir runs/lot_s [--checkpoint best|last|STEP] [--limit 1000]

Loads the checkpoint as `certjax.evaluate` does (the config saved beside it), certifies the test set (or a
fixed random subset of --limit points), then:

1. PGD (Madry et al., 2018) in the family's threat model (l_inf: signed-gradient steps; l_2:
   normalised-gradient steps; both projected on the eps ball and [0, 1]), 100 steps, several random restarts,
   on the smallest margin z_y - max_{j != y} z_j of every correctly classified point (PGD accuracy), and a
   margin-targeted PGD on each single margin z_y - z_j for the `targets` largest other logits j of every
   certified point (by the margin or, with certify.method ibp | both, by interval bounds). A certified point
   whose smallest margin an attack brings to <= 0 is a *broken certificate*
   (must be 0). It also checks that no margin drops by more than the certificate's Lipschitz bound allows
   (max_j K_yj * eps / min(std)).
2. Empirical Lipschitz ratios of the whole network on random nearby pairs, gradient-aligned pairs and the
   attack's (x, x_adv) pairs, in normalised input space, next to the bound the certificate uses: l_inf
   families every logit 1-Lipschitz (|dz_k| <= ||dx||_inf); l_2 families |d(z_a - z_b)| <= K_ab ||dx||_2 with
   K the family's `certificate_bounds` pair_lipschitz (the per-layer figures of its report are copied
   alongside).

The PGD here is attack.py's algorithm with the weights as arguments of the compiled function (not constants
baked into it: paper-size nets hold hundreds of MB) and a per-example target class. Writes the JSON report to
`<workdir>/audit_<checkpoint>_step<step>.json` atomically; the exit code is 1 if the audit finds anything
unsound (a broken certificate, a margin drop or Lipschitz ratio above its bound), else 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify.margins import margin_lipschitz_linf, mask_true_class, smallest_margin, true_class_logit
from certjax.certify.norms import l2_norm_per_example

RATIO_TOLERANCE = 1e-3  # float32 rounding of logit differences at the probe distances used below
PROBE_DISTANCE = 0.1  # normalised input units: large against float32 rounding, small against the input range


def _norm(delta, threat_model):
    flat = delta.reshape(delta.shape[0], -1)
    return jnp.max(jnp.abs(flat), axis=1) if threat_model == "linf" else l2_norm_per_example(flat)


def _expand(v, like):
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


_COMPILED: dict = {}  # (model, normalisation, threat model, steps, restarts) -> jitted functions


def make_attack(model, mean, std, threat_model: str, steps: int, restarts: int):
    """Jitted (PGD, logits of pixel images, logits of normalised inputs), compiled once per process and model.

    PGD(variables, images, labels, targets, eps, rng) -> (adversarial images, smallest margins); targets[b] =
    -1 attacks the smallest margin, else the single margin z_y - z_targets[b]. Images in [0, 1]."""
    key = (
        repr(model),
        tuple(np.ravel(mean).tolist()),
        tuple(np.ravel(std).tolist()),
        threat_model,
        steps,
        restarts,
    )
    if key not in _COMPILED:
        _COMPILED[key] = _make_attack(model, mean, std, threat_model, steps, restarts)
    return _COMPILED[key]


def _make_attack(model, mean, std, threat_model: str, steps: int, restarts: int):
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def logits_normalised(variables, xn):
        return model.apply(variables, xn, jnp.float32(jnp.inf), train=False).logits

    def logits_of(variables, x):
        return model.apply(variables, (x - mean) / std, jnp.float32(jnp.inf), train=False).logits

    def objective(variables, x, labels, targets):
        z = logits_of(variables, x)
        true_logit = true_class_logit(z, labels)[:, 0]
        target_logit = true_class_logit(z, jnp.maximum(targets, 0))[:, 0]
        return jnp.where(targets >= 0, true_logit - target_logit, smallest_margin(z, labels))

    @jax.jit
    def attack(variables, images, labels, targets, eps, rng):
        step_size = eps / 4
        grad_fn = jax.grad(lambda x: -jnp.sum(objective(variables, x, labels, targets)))

        def project(x):
            delta = x - images
            if threat_model == "linf":
                delta = jnp.clip(delta, -eps, eps)
            else:
                delta = delta * _expand(jnp.minimum(1.0, eps / jnp.maximum(_norm(delta, "l2"), 1e-12)), delta)
            return jnp.clip(images + delta, 0.0, 1.0)

        def ascend(x, _):
            g = grad_fn(x)
            if threat_model == "linf":
                direction = jnp.sign(g)
            else:
                direction = g / _expand(jnp.maximum(_norm(g, "l2"), 1e-12), g)
            return project(x + step_size * direction), None

        def one_restart(carry, key):
            best_x, best_margin = carry
            noise = jax.random.uniform(key, images.shape, minval=-1.0, maxval=1.0)
            if threat_model != "linf":
                noise = noise / _expand(jnp.maximum(_norm(noise, "l2"), 1e-12), noise)
            x, _ = jax.lax.scan(ascend, project(images + eps * noise), None, length=steps)
            margin = smallest_margin(logits_of(variables, x), labels)
            better = margin < best_margin
            return (jnp.where(_expand(better, x), x, best_x), jnp.minimum(margin, best_margin)), None

        start = (images, smallest_margin(logits_of(variables, images), labels))
        (best_x, best_margin), _ = jax.lax.scan(one_restart, start, jax.random.split(rng, restarts))
        return best_x, best_margin

    @jax.jit
    def probe_direction(variables, xn, labels):
        """The steepest direction of a unit step: sign of the gradient of z_y (l_inf: every logit's own bound
        is probed) or the normalised gradient of the smallest margin (l_2: the pair bound is probed)."""
        if threat_model == "linf":
            g = jax.grad(lambda v: jnp.sum(true_class_logit(logits_normalised(variables, v), labels)))(xn)
            return jnp.sign(g)
        g = jax.grad(lambda v: jnp.sum(smallest_margin(logits_normalised(variables, v), labels)))(xn)
        return g / _expand(jnp.maximum(_norm(g, "l2"), 1e-12), g)

    return attack, jax.jit(logits_of), jax.jit(logits_normalised), probe_direction


def _pair_ratios(dz, delta_norm, pair_bound):
    """max over class pairs (a, b) of |dz_a - dz_b| / (||dx|| K_ab), per example."""
    diff = jnp.abs(dz[:, :, None] - dz[:, None, :]) / _expand(delta_norm, dz[:, :, None])
    ratio = diff / pair_bound[None]
    eye = jnp.eye(dz.shape[1], dtype=bool)[None]
    return jnp.max(jnp.where(eye, 0.0, ratio), axis=(1, 2))


def lipschitz_ratios(logits_fn, threat_model, pair_bound, x, x_other):
    """Ratio of the empirical Lipschitz quotient to the certificate's bound, per pair of normalised inputs.

    l_inf: max_k |dz_k| / ||dx||_inf (bound: every logit 1-Lipschitz); l_2: max_{a != b} |d(z_a - z_b)| /
    (K_ab ||dx||_2)."""
    dz = logits_fn(x_other) - logits_fn(x)
    delta_norm = _norm(x_other - x, threat_model)
    if threat_model == "linf":
        return jnp.max(jnp.abs(dz), axis=1) / delta_norm
    return _pair_ratios(dz, delta_norm, pair_bound)


def _summary(values) -> dict:
    values = np.asarray(values, np.float64)
    if not len(values):
        return {"count": 0}
    return {"count": int(len(values)), "max": float(values.max()), "mean": float(values.mean())}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    return value


def _by_method(cert, broken) -> dict:
    """Certified and broken counts by the margin and by interval bounds, when the evaluation used IBP."""
    if "certified_ibp" not in cert:
        return {}
    by_margin = np.asarray(cert["certified_margin"], bool)
    by_ibp = np.asarray(cert["certified_ibp"], bool)
    return {
        "certified_points_margin": int(by_margin.sum()),
        "certified_points_ibp": int(by_ibp.sum()),
        "certified_points_ibp_only": int((by_ibp & ~by_margin).sum()),
        "broken_ibp": int((broken & by_ibp).sum()),
    }


def audit_model(exp, state, images, labels, *, steps=100, restarts=5, targets=3, batch_size=256, seed=0):
    """The audit of one model on the given test points (uint8 images, int labels); returns the report dict."""
    config = exp.config
    threat_model = exp.family.threat_model
    eps = float(config.certify.eps)
    std = np.asarray(config.data.std, np.float32)
    min_std = float(np.min(std))
    started = time.perf_counter()

    cert = exp.certify_batches(
        state.params,
        state.model_state,
        [
            {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}
            for i in range(0, len(labels), batch_size)
        ],
    )
    bounds = exp.certificate_bounds(state.params, state.model_state)
    variables = {"params": state.params, **state.model_state, **bounds["variables"]}
    num_classes = exp.num_classes
    if threat_model == "linf":
        pair_bound = np.asarray(margin_lipschitz_linf(jnp.zeros((num_classes, num_classes))))
    else:
        pair_bound = np.asarray(bounds["pair_lipschitz"], np.float32)
    attack, logits_of, logits_with, probe_direction = make_attack(
        exp.model, config.data.mean, std, threat_model, steps, restarts
    )

    def logits_normalised(xn):
        return logits_with(variables, xn)

    pixels_all = images.astype(np.float32) / 255.0
    eps32 = np.float32(eps)
    rng = jax.random.key(seed)

    correct = cert["correct"].astype(bool)
    certified = cert["certified"].astype(bool)
    attacked = np.flatnonzero(correct)
    survived = np.zeros(len(labels), bool)
    broken = np.zeros(len(labels), bool)
    worst_drop_ratio = 0.0
    drop_violations = 0
    ratios = {"random_pairs": [], "gradient_pairs": [], "attack_pairs": []}
    mean = np.asarray(config.data.mean, np.float32)

    for start in range(0, len(attacked), batch_size):
        idx = attacked[start : start + batch_size]
        x = jnp.asarray(pixels_all[idx])
        y = jnp.asarray(labels[idx], jnp.int32)
        clean_logits = np.asarray(logits_of(variables, x))
        clean_margin = np.asarray(smallest_margin(jnp.asarray(clean_logits), y))
        rng, key = jax.random.split(rng)
        x_adv, margin = attack(variables, x, y, -jnp.ones_like(y), eps32, key)
        margin = np.asarray(margin)
        pairs = [(x_adv, margin)]
        # margin-targeted attacks on the certified points: each of the `targets` largest other logits
        is_cert = certified[idx]
        if is_cert.any():
            others = np.asarray(
                mask_true_class(jnp.asarray(clean_logits), jnp.asarray(labels[idx]), -jnp.inf)
            )
            order = np.argsort(-others, axis=1)[:, : min(targets, num_classes - 1)]
            for t in range(order.shape[1]):
                rng, key = jax.random.split(rng)
                target = np.where(is_cert, order[:, t], -1).astype(np.int32)
                x_t, margin_t = attack(variables, x, y, jnp.asarray(target), eps32, key)
                margin = np.minimum(margin, np.asarray(margin_t))
                pairs.append((x_t, np.asarray(margin_t)))
        survived[idx] = margin > 0
        broken[idx] = is_cert & (margin <= 0)
        # the smallest margin may drop by at most max_j K_yj * eps / min(std)
        allowed = np.max(
            np.where(np.eye(num_classes, dtype=bool)[labels[idx]], 0.0, pair_bound[labels[idx]]), 1
        )
        allowed = allowed * eps / min_std
        drop = clean_margin - margin
        drop_violations += int(np.sum(drop > allowed * (1 + 1e-4) + 1e-5))
        worst_drop_ratio = max(worst_drop_ratio, float(np.max(drop / allowed)))

        # empirical Lipschitz ratios, normalised input space
        xn = (x - mean) / std
        rng, key = jax.random.split(rng)
        noise = jax.random.normal(key, xn.shape)
        if threat_model == "linf":
            noise = jnp.sign(noise)
        else:
            noise = noise / _expand(_norm(noise, "l2"), noise)
        ratios["random_pairs"] += np.asarray(
            lipschitz_ratios(logits_normalised, threat_model, pair_bound, xn, xn + PROBE_DISTANCE * noise)
        ).tolist()
        step = PROBE_DISTANCE * probe_direction(variables, xn, y)
        ratios["gradient_pairs"] += np.asarray(
            lipschitz_ratios(logits_normalised, threat_model, pair_bound, xn, xn + step)
        ).tolist()
        for x_other, _ in pairs:
            moved = np.asarray(_norm(x_other - x, threat_model)) > 1e-3 * eps
            if moved.any():
                values = lipschitz_ratios(
                    logits_normalised, threat_model, pair_bound, xn, (x_other - mean) / std
                )
                ratios["attack_pairs"] += np.asarray(values)[moved].tolist()

    lipschitz = {name: _summary(values) for name, values in ratios.items()}
    max_ratio = max((s.get("max", 0.0) for s in lipschitz.values()), default=0.0)
    lipschitz.update(
        {
            "norm": "l_inf" if threat_model == "linf" else "l_2",
            "bound": "every logit 1-Lipschitz (l_inf, normalised input)"
            if threat_model == "linf"
            else "K_ab = certificate_bounds pair_lipschitz for each margin z_a - z_b (l_2, normalised input)",
            "probe_distance": PROBE_DISTANCE,
            "max_ratio_to_bound": max_ratio,
            "bounds_report": _jsonable(bounds["report"]),
        }
    )
    n = len(labels)
    report = {
        "family": config.get("family", config.model.name),
        "variant": config.get("variant", ""),
        "threat_model": threat_model,
        "eps": eps,
        "num_points": int(n),
        "clean_accuracy": float(correct.mean()),
        "certified_accuracy": float(certified.mean()),
        "pgd_accuracy": float(survived.sum() / n),
        "certified_points": int(certified.sum()),
        "attacked_points": int(len(attacked)),
        "broken": int(broken.sum()),
        "broken_indices": np.flatnonzero(broken).tolist(),
        # with interval bounds (certify.method ibp | both) every IBP-certified point is attacked too
        **_by_method(cert, broken),
        "margin_drop_violations": drop_violations,
        "max_margin_drop_to_bound": worst_drop_ratio,
        "attack": {"steps": steps, "restarts": restarts, "targets": targets, "step_size": "eps / 4"},
        "lipschitz": lipschitz,
        "seconds": round(time.perf_counter() - started, 1),
    }
    report["sound"] = bool(
        report["broken"] == 0 and drop_violations == 0 and max_ratio <= 1 + RATIO_TOLERANCE
    )
    return report


def audit_workdir(workdir: str, checkpoint: str = "best", limit: int = 0, **kwargs) -> dict:
    """Load a checkpoint like certjax.evaluate, audit it, write the report into the workdir atomically."""
    from certjax import checkpoints
    from certjax.data import pipeline
    from certjax.evaluate import atomic_write_bytes
    from certjax.train import Experiment

    manager = checkpoints.make_manager(workdir, read_only=True)
    step = checkpoints.select_step(manager, checkpoint)
    config = checkpoints.restore_config(manager, step)
    exp = Experiment(config, need_train_data=False)
    state = checkpoints.restore_state(manager, step, exp.abstract_restore_target())
    manager.close()
    batches = list(
        pipeline.eval_batches(exp.sources.test, config.train.eval_batch_size, limit, seed=config.seed)
    )
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    report = audit_model(exp, state, images, labels, seed=config.seed, **kwargs)
    report.update(
        workdir=os.path.abspath(workdir),
        checkpoint=checkpoint,
        step=int(step),
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    path = os.path.join(workdir, f"audit_{checkpoint}_step{step}.json")
    atomic_write_bytes(path, (json.dumps(_jsonable(report), indent=1, sort_keys=True) + "\n").encode())
    report["path"] = path
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m certjax.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default="best", help="best | last | a saved step")
    parser.add_argument(
        "--limit", type=int, default=0, help="a fixed random subset of N test points (0: all)"
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--targets", type=int, default=3, help="margin-targeted attacks per certified point")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    report = audit_workdir(
        args.workdir,
        args.checkpoint,
        args.limit,
        steps=args.steps,
        restarts=args.restarts,
        targets=args.targets,
        batch_size=args.batch_size,
    )
    lip = report["lipschitz"]
    print(
        f"audit {report['family']} step {report['step']} ({report['num_points']} test points, eps "
        f"{report['eps']:.5f}, {report['threat_model']}): clean {report['clean_accuracy']:.4f} certified "
        f"{report['certified_accuracy']:.4f} PGD {report['pgd_accuracy']:.4f}; broken certificates "
        f"{report['broken']} of {report['certified_points']}; margin drops above the bound "
        f"{report['margin_drop_violations']}; empirical Lipschitz / bound: max "
        f"{lip['max_ratio_to_bound']:.4f} (random {lip['random_pairs'].get('max', math.nan):.4f}, gradient "
        f"{lip['gradient_pairs'].get('max', math.nan):.4f}, attack "
        f"{lip['attack_pairs'].get('max', math.nan):.4f})"
    )
    print(f"report: {report['path']}")
    if not report["sound"]:
        print("UNSOUND: see the report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
