"""certjax.audit on tiny trained models of both threat models: no certificate breaks, the Lipschitz ratios
stay under their bounds, and a doctored (absurdly loose) certificate is caught with a non-zero exit code."""

import dataclasses
import json

import numpy as np
import pytest

from certjax import audit
from certjax.certify import margins as certify


@pytest.fixture(scope="module")
def tiny_linf():
    from configs.linf_dist import get_config
    from tests.test_certify import train_tiny

    return train_tiny(get_config("demo"), depth=3, width=64, epochs=4)


@pytest.fixture(scope="module")
def lot_workdir(tiny_run):
    """LOT's tiny run (configs/lot.py:demo,tiny: init_channels 4, 4 launch steps, certify.eps 0.02, so that
    a model this small and this briefly trained certifies enough points), its checkpoint as a user has it."""
    return tiny_run("lot")


def _test_points(exp, n=200):
    images, labels = exp.sources.test.read(np.arange(0, 1000, 1000 // n))
    return images, labels


def test_linf_audit_breaks_nothing(tiny_linf):
    exp, state = tiny_linf
    images, labels = _test_points(exp)
    report = audit.audit_model(exp, state, images, labels, steps=30, restarts=2, targets=2)
    assert report["certified_points"] >= 5, "the tiny model certifies too few points for a meaningful audit"
    assert report["broken"] == 0 and report["margin_drop_violations"] == 0 and report["sound"]
    assert report["certified_accuracy"] <= report["pgd_accuracy"] <= report["clean_accuracy"]
    # certify.method "both": every IBP certificate was attacked as well, and none broke
    assert report["certified_points_ibp"] >= 5 and report["broken_ibp"] == 0
    by_method = (report["certified_points_ibp"], report["certified_points_margin"])
    assert report["certified_points"] >= max(by_method)
    lipschitz = report["lipschitz"]
    assert lipschitz["max_ratio_to_bound"] <= 1 + audit.RATIO_TOLERANCE
    # l_inf-dist logits are 1-Lipschitz with a one-hot gradient: gradient-aligned pairs reach the bound
    assert lipschitz["gradient_pairs"]["max"] > 0.9
    assert lipschitz["random_pairs"]["count"] == report["attacked_points"]


def test_linf_audit_catches_a_loose_certificate(tiny_linf, monkeypatch):
    exp, state = tiny_linf
    images, labels = _test_points(exp)
    # a margin "Lipschitz constant" 1000x too small: every correct point looks certified at eps
    monkeypatch.setattr(
        certify, "margin_lipschitz_linf", lambda logits: np.full(logits.shape, 2e-3, np.float32)
    )
    report = audit.audit_model(exp, state, images, labels, steps=30, restarts=2, targets=2)
    assert report["certified_accuracy"] == report["clean_accuracy"]
    assert report["broken"] > 0 and not report["sound"]


# fewer steps than the default 100 keep the test fast; the doctored run below reuses the compiled attack
AUDIT_ARGS = ["--checkpoint", "last", "--limit", "100", "--steps", "20", "--restarts", "2"]


def test_lot_audit_command_line(lot_workdir, monkeypatch, capsys):
    code = audit.main(AUDIT_ARGS + ["--workdir", str(lot_workdir), "--targets", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    (path,) = lot_workdir.glob("audit_last_step*.json")
    report = json.loads(path.read_text())
    assert report["threat_model"] == "l2" and report["num_points"] == 100
    assert report["certified_points"] >= 5, "the tiny model certifies too few points for a meaningful audit"
    assert report["broken"] == 0 and report["sound"]
    assert report["lipschitz"]["max_ratio_to_bound"] <= 1 + audit.RATIO_TOLERANCE
    assert report["lipschitz"]["bounds_report"]["lipschitz_body_measured"] <= 1 + 1e-4
    assert "broken certificates 0" in out

    # doctored bound: the family's pair Lipschitz constants 1000x too small -> broken certificates, exit 1
    from certjax.models import lot

    honest = lot.FAMILY.certificate_bounds

    def loose(*args, **kwargs):
        bounds = honest(*args, **kwargs)
        return dict(bounds, pair_lipschitz=bounds["pair_lipschitz"] * np.float32(1e-3))

    monkeypatch.setattr(lot, "FAMILY", dataclasses.replace(lot.FAMILY, certificate_bounds=loose))
    code = audit.main(AUDIT_ARGS + ["--workdir", str(lot_workdir), "--targets", "1"])
    assert code == 1
    report = json.loads(path.read_text())
    assert report["broken"] > 0 and not report["sound"]
