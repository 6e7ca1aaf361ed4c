"""Soundness audit of a checkpoint's certificates: attack every certified point, measure Lipschitz ratios.

  python -m certjax.audit --workdir runs/lot_s [--checkpoint best|last|STEP] [--limit 1000]

Loads the checkpoint as `certjax.evaluate` does (the config saved beside it), certifies the test set (or a
fixed random subset of --limit points), then:

1. PGD (Madry et al., 2018; certjax.attack.pgd) in the family's threat model, 100 steps, several random
   restarts, on the smallest margin z_y - max_{j != y} z_j of every correctly classified point (PGD
   accuracy), and a margin-targeted PGD on each single margin z_y - z_j for the `targets` largest other
   logits j of every certified point (by the margin or, with certify.method ibp | both, by interval bounds).
   A certified point whose smallest margin an attack brings to <= 0 is a *broken certificate* (must be 0).
   It also checks that no margin drops by more than the certificate's Lipschitz bound allows
   (max_j K_yj * eps / min(std)).
2. Empirical Lipschitz ratios of the whole network on random nearby pairs, gradient-aligned pairs and the
   attack's (x, x_adv) pairs, in normalised input space, next to the bound the certificate uses: l_inf
   families every logit 1-Lipschitz (|dz_k| <= ||dx||_inf); l_2 families |d(z_a - z_b)| <= K_ab ||dx||_2
   with K the family's `certificate_bounds` pair_lipschitz (the per-layer figures of its report are copied
   alongside).

What differs between the threat models (the attack's steps, the bound, the probe) is their record,
certjax/certify/threat_models.py. The weights are arguments of the compiled attack, not constants baked into
it (paper-size nets hold hundreds of MB). Writes the JSON report to
`<workdir>/audit_<checkpoint>_step<step>.json` atomically; the exit code is 1 if the audit finds anything
unsound (a broken certificate, a margin drop or a Lipschitz ratio above its bound), else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from certjax.attack import pgd
from certjax.certify.margins import mask_true_class, smallest_margin
from certjax.certify.threat_models import ThreatModel, get_threat_model
from certjax.progress import tracked

RATIO_TOLERANCE = 1e-3  # float32 rounding of logit differences at the probe distances used below
PROBE_DISTANCE = 0.1  # normalised input units: large against float32 rounding, small against the input range

_COMPILED: dict = {}  # (model, normalisation, threat model, steps, restarts) -> jitted functions


def make_attack(model, mean, std, threat_model: str, steps: int, restarts: int):
    """Jitted (PGD, logits of pixel images, logits of normalised inputs, probe direction), built once per
    process and model, so that every batch and checkpoint of one architecture reuses the compilations.

    PGD(variables, images, labels, targets, eps, rng) -> (adversarial images, smallest margins); targets[b] =
    -1 attacks the smallest margin, else the single margin z_y - z_targets[b] (certjax.attack.pgd). Images
    in [0, 1]."""
    key = (
        repr(model),
        tuple(np.ravel(mean).tolist()),
        tuple(np.ravel(std).tolist()),
        threat_model,
        steps,
        restarts,
    )
    if key not in _COMPILED:
        _COMPILED[key] = _make_attack(model, mean, std, get_threat_model(threat_model), steps, restarts)
    return _COMPILED[key]


def _make_attack(model, mean, std, threat: ThreatModel, steps: int, restarts: int):
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def logits_normalised(variables, xn):
        return model.apply(variables, xn, jnp.float32(jnp.inf), train=False).logits

    def logits_of(variables, x):
        return model.apply(variables, (x - mean) / std, jnp.float32(jnp.inf), train=False).logits

    def attack(variables, images, labels, targets, eps, rng):
        return pgd(
            logits_of, variables, images, labels, eps, rng,
            threat_model=threat.name, targets=targets, steps=steps, restarts=restarts,
        )  # fmt: skip

    @jax.jit
    def probe_direction(variables, xn, labels):
        """The steepest direction of a unit step for the threat model's probed output (l_inf: z_y, so that
        every logit's own bound is probed; l_2: the smallest margin, so that the pair bound is)."""
        objective = threat.probe_objective
        g = jax.grad(lambda v: jnp.sum(objective(logits_normalised(variables, v), labels)))(xn)
        return threat.ascent_direction(g)

    return attack, jax.jit(logits_of), jax.jit(logits_normalised), probe_direction


def lipschitz_ratios(logits_fn, threat_model, pair_bound, x, x_other):
    """Ratio of the empirical Lipschitz quotient to the certificate's bound, per pair of normalised inputs.

    l_inf: max_k |dz_k| / ||dx||_inf (bound: every logit 1-Lipschitz); l_2: max_{a != b} |d(z_a - z_b)| /
    (K_ab ||dx||_2) (certjax.certify.threat_models)."""
    threat = get_threat_model(threat_model)
    dz = logits_fn(x_other) - logits_fn(x)
    return threat.lipschitz_ratio(dz, threat.norm(x_other - x), pair_bound)


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


@dataclasses.dataclass
class _Audit:
    """What every batch of one audit uses (the model's functions and bounds) and what it finds."""

    threat: ThreatModel
    variables: dict
    pair_bound: np.ndarray
    attack: object
    logits_of: object
    logits_with: object
    probe_direction: object
    mean: np.ndarray
    std: np.ndarray
    eps: float
    survived: np.ndarray
    broken: np.ndarray
    drop_violations: int = 0
    worst_drop_ratio: float = 0.0
    ratios: dict = dataclasses.field(
        default_factory=lambda: {"random_pairs": [], "gradient_pairs": [], "attack_pairs": []}
    )

    def logits_normalised(self, xn):
        return self.logits_with(self.variables, xn)


def _start_audit(exp, state, bounds, num_points: int, steps: int, restarts: int) -> _Audit:
    """The audit's model functions (compiled once per architecture) and bounds, with nothing found yet."""
    config = exp.config
    threat = get_threat_model(exp.family.threat_model)
    std = np.asarray(config.data.std, np.float32)
    functions = make_attack(exp.model, config.data.mean, std, threat.name, steps, restarts)
    return _Audit(
        threat,
        {"params": state.params, **state.model_state, **bounds["variables"]},
        threat.pair_bound(exp.num_classes, bounds["pair_lipschitz"]),
        *functions,
        mean=np.asarray(config.data.mean, np.float32),
        std=std,
        eps=float(config.certify.eps),
        survived=np.zeros(num_points, bool),
        broken=np.zeros(num_points, bool),
    )


def _attack_batch(audit: _Audit, x, y, is_cert, targets: int, rng):
    """PGD on the smallest margin, then margin-targeted PGD of the certified points on each of the `targets`
    largest other logits. Returns (clean margins, smallest margins reached, [(x_adv, margins)], rng)."""
    clean_logits = np.asarray(audit.logits_of(audit.variables, x))
    clean_margin = np.asarray(smallest_margin(jnp.asarray(clean_logits), y))
    eps32 = np.float32(audit.eps)
    rng, key = jax.random.split(rng)
    x_adv, margin = audit.attack(audit.variables, x, y, -jnp.ones_like(y), eps32, key)
    margin = np.asarray(margin)
    pairs = [(x_adv, margin)]
    if is_cert.any():
        others = np.asarray(mask_true_class(jnp.asarray(clean_logits), y, -jnp.inf))
        order = np.argsort(-others, axis=1)[:, : min(targets, clean_logits.shape[1] - 1)]
        for t in range(order.shape[1]):
            rng, key = jax.random.split(rng)
            target = np.where(is_cert, order[:, t], -1).astype(np.int32)
            x_t, margin_t = audit.attack(audit.variables, x, y, jnp.asarray(target), eps32, key)
            margin = np.minimum(margin, np.asarray(margin_t))
            pairs.append((x_t, np.asarray(margin_t)))
    return clean_margin, margin, pairs, rng


def _check_margin_drops(audit: _Audit, labels, clean_margin, margin) -> None:
    """The smallest margin may drop by at most max_j K_yj * eps / min(std): count the drops above it."""
    num_classes = audit.pair_bound.shape[0]
    others = np.where(np.eye(num_classes, dtype=bool)[labels], 0.0, audit.pair_bound[labels])
    allowed = np.max(others, 1) * audit.eps / float(np.min(audit.std))
    drop = clean_margin - margin
    audit.drop_violations += int(np.sum(drop > allowed * (1 + 1e-4) + 1e-5))
    audit.worst_drop_ratio = max(audit.worst_drop_ratio, float(np.max(drop / allowed)))


def _probe_lipschitz(audit: _Audit, x, y, pairs, rng):
    """Empirical Lipschitz ratios in normalised input space on random, gradient-aligned and attack pairs."""
    threat, pair_bound = audit.threat, audit.pair_bound

    def ratios(x_other):
        return np.asarray(lipschitz_ratios(audit.logits_normalised, threat.name, pair_bound, xn, x_other))

    xn = (x - audit.mean) / audit.std
    rng, key = jax.random.split(rng)
    noise = threat.unit_direction(jax.random.normal(key, xn.shape))
    audit.ratios["random_pairs"] += ratios(xn + PROBE_DISTANCE * noise).tolist()
    step = PROBE_DISTANCE * audit.probe_direction(audit.variables, xn, y)
    audit.ratios["gradient_pairs"] += ratios(xn + step).tolist()
    for x_other, _ in pairs:
        moved = np.asarray(threat.norm(x_other - x)) > 1e-3 * audit.eps
        if moved.any():
            audit.ratios["attack_pairs"] += ratios((x_other - audit.mean) / audit.std)[moved].tolist()
    return rng


def _lipschitz_report(audit: _Audit, bounds) -> dict:
    lipschitz = {name: _summary(values) for name, values in audit.ratios.items()}
    lipschitz.update(
        norm=audit.threat.display,
        bound=audit.threat.bound_description,
        probe_distance=PROBE_DISTANCE,
        max_ratio_to_bound=max((s.get("max", 0.0) for s in lipschitz.values()), default=0.0),
        bounds_report=_jsonable(bounds["report"]),
    )
    return lipschitz


def _report(exp, audit: _Audit, cert, attacked, bounds, attack_settings: dict) -> dict:
    config, n = exp.config, len(audit.broken)
    certified, lipschitz = cert["certified"].astype(bool), _lipschitz_report(audit, bounds)
    report = {
        "family": config.get("family", config.model.name),
        "variant": config.get("variant", ""),
        "threat_model": audit.threat.name,
        "eps": audit.eps,
        "num_points": int(n),
        "clean_accuracy": float(cert["correct"].astype(bool).mean()),
        "certified_accuracy": float(certified.mean()),
        "pgd_accuracy": float(audit.survived.sum() / n),
        "certified_points": int(certified.sum()),
        "attacked_points": int(len(attacked)),
        "broken": int(audit.broken.sum()),
        "broken_indices": np.flatnonzero(audit.broken).tolist(),
        # with interval bounds (certify.method ibp | both) every IBP-certified point is attacked too
        **_by_method(cert, audit.broken),
        "margin_drop_violations": audit.drop_violations,
        "max_margin_drop_to_bound": audit.worst_drop_ratio,
        "attack": {**attack_settings, "step_size": "eps / 4"},
        "lipschitz": lipschitz,
    }
    report["sound"] = bool(
        report["broken"] == 0
        and audit.drop_violations == 0
        and lipschitz["max_ratio_to_bound"] <= 1 + RATIO_TOLERANCE
    )
    return report


def audit_model(exp, state, images, labels, *, steps=100, restarts=5, targets=3, batch_size=256, seed=0):
    """The audit of one model on the given test points.

    Args:
      exp, state: the Experiment and its restored state. images, labels: uint8 test images and int labels.
      steps, restarts: PGD's per attack. targets: margin-targeted attacks per certified point.
      batch_size: points per attacked batch. seed: the attacks' and probes' random key.

    Returns:
      The report dict (see the module docstring); report["sound"] is False when anything is unsound.
    """
    started = time.perf_counter()
    cert = exp.certifier.certify_batches(
        state.params,
        state.model_state,
        [
            {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}
            for i in range(0, len(labels), batch_size)
        ],
        what="audit: certify",
    )
    bounds = exp.certifier.certificate_bounds(state.params, state.model_state)
    audit = _start_audit(exp, state, bounds, len(labels), steps, restarts)
    pixels_all = images.astype(np.float32) / 255.0
    certified = cert["certified"].astype(bool)
    attacked = np.flatnonzero(cert["correct"].astype(bool))
    rng = jax.random.key(seed)
    for start in tracked(range(0, len(attacked), batch_size), "audit: attack and probe"):
        idx = attacked[start : start + batch_size]
        x, y = jnp.asarray(pixels_all[idx]), jnp.asarray(labels[idx], jnp.int32)
        clean_margin, margin, pairs, rng = _attack_batch(audit, x, y, certified[idx], targets, rng)
        audit.survived[idx] = margin > 0
        audit.broken[idx] = certified[idx] & (margin <= 0)
        _check_margin_drops(audit, labels[idx], clean_margin, margin)
        rng = _probe_lipschitz(audit, x, y, pairs, rng)
    settings = {"steps": steps, "restarts": restarts, "targets": targets}
    report = _report(exp, audit, cert, attacked, bounds, settings)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def audit_workdir(workdir: str, checkpoint: str = "best", limit: int = 0, **kwargs) -> dict:
    """Load a checkpoint like certjax.evaluate, audit it, write the report into the workdir atomically."""
    from certjax.data import pipeline
    from certjax.evaluate import atomic_write_bytes
    from certjax.experiment import Experiment

    exp, state, info = Experiment.from_checkpoint(workdir, checkpoint, data="test")
    config, step = exp.config, info.step
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
