"""A new family is one model file and one config file (issue 21): a throwaway family, written to a temporary
package outside certjax, trains with launch.py, evaluates, certifies through the API and is audited, with no
other file touched.

The family ("toyfam.toy") is one layer of l_inf-distance neurons: logit k is -||x - w_k||_inf, 1-Lipschitz in
l_inf, so the l_inf certificate (every margin 2-Lipschitz) holds for it, and the audit's attacks must break
no certificate it gives. Its model file imports only certjax's public pieces.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np

from tests.conftest import REPO, launch_env

MODEL_FILE = '''
"""A throwaway l_inf family: one layer of l_inf-distance neurons (each logit 1-Lipschitz in l_inf)."""

import flax.linen as nn
import jax.numpy as jnp

from certjax.models import Family, ModelOutput


class Toy(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, p=None, *, train=False, interval=None, certify=False, dropout=True):
        del p, train, interval, certify, dropout
        flat = x.reshape(x.shape[0], -1)
        w = self.param("w", nn.initializers.normal(0.5), (self.num_classes, flat.shape[1]))
        scale = self.param("scale", nn.initializers.constant(10.0), ())
        logits = -jnp.max(jnp.abs(flat[:, None, :] - w[None]), axis=-1)
        return ModelOutput(logits=logits, logit_scale=scale)


def build(model_config, num_classes):
    del model_config
    return Toy(num_classes)


FAMILY = Family(name="toyfam.toy", threat_model="linf", build=build)
'''

CONFIG_FILE = '''
"""The throwaway family's config: the shared defaults, the embedded demo data, one tiny epoch."""

from configs.common import get_common


def get_config(arg=""):
    config = get_common()
    config.family = "toy"
    config.variant = arg
    config.model = dict(name="toyfam.toy")
    config.data.real = "demo"
    config.data.real_subset = 256
    config.train.epochs = 1
    config.train.batch_size = 64
    config.train.eval_batch_size = 250
    config.train.eval_subset = 250
    config.checkpoint.every_epochs = 1
    config.loss = dict(name="cross_entropy")
    config.optimizer = dict(name="adam", lr=0.01, scale_lr=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                            schedule="cosine", warmup_epochs=0, clip_norm=0.0)
    config.p_schedule = dict(enabled=False, p_start=8.0, p_end=1000.0, start_fraction=0.0, end_fraction=0.0)
    config.certify.eps = 1 / 255
    config.certify.method = "margin"
    return config
'''


def _write_family(root):
    package = root / "toyfam"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(textwrap.dedent(MODEL_FILE))
    config = root / "toy_config.py"
    config.write_text(textwrap.dedent(CONFIG_FILE))
    return config


def _run(args, root):
    env = launch_env()
    env["PYTHONPATH"] = f"{REPO}:{root}"
    result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_a_family_outside_certjax_trains_evaluates_certifies_and_is_audited(tmp_path, monkeypatch):
    config = _write_family(tmp_path)
    workdir = tmp_path / "run"
    launch = [sys.executable, str(REPO / "launch.py"), f"--config={config}", f"--workdir={workdir}"]
    _run(launch + ["--mode=train"], tmp_path)
    assert (workdir / "checkpoints").is_dir()

    _run(launch + ["--mode=evaluate", "--checkpoint=best"], tmp_path)
    record = json.loads((workdir / "results.jsonl").read_text().splitlines()[-1])
    assert record["family"] == "toy" and record["threat_model"] == "linf"
    assert record["num_test"] == 1000 and 0.0 <= record["certified_accuracy"] <= record["clean_accuracy"]
    assert record["step"] == 4 and record["epoch"] == 1  # 256 real images at batch 64: 4 train steps

    # the API: the same family found from its module name, certificates that agree with evaluation's radii
    monkeypatch.syspath_prepend(str(tmp_path))
    import certjax
    from certjax.data.sources import make_real_source

    model = certjax.restore(str(workdir))
    assert model.info["family"] == "toy" and model.info["threat_model"] == "linf"
    images, labels = make_real_source("demo", "test", "cifar10", None).read(np.arange(64))
    out = model.certify(np.asarray(images, np.uint8), labels=np.asarray(labels))
    with np.load(record["radii_path"]) as radii:
        np.testing.assert_array_equal(out["prediction"], radii["prediction"][:64])
        np.testing.assert_array_equal(out["radius"], radii["radius"][:64])  # bit for bit

    # the audit: attacks in the family's threat model break no certificate
    result = _run([sys.executable, "-m", "certjax.audit", f"--workdir={workdir}", "--limit=100", "--steps=10",
                   "--restarts=1"], tmp_path)  # fmt: skip
    (path,) = workdir.glob("audit_best_step*.json")
    report = json.loads(path.read_text())
    assert report["sound"] is True and report["broken"] == 0, result.stdout[-2000:]
    assert report["num_points"] == 100 and report["threat_model"] == "linf"
