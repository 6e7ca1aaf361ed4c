"""Every family with a 64 x 64 config, end to end on the Tiny-ImageNet-200 fixture (tests/data64.py: real
CIFAR images at 64 x 64 in the distributed layout) mixed with a 64 x 64 generated .npz (issue 25, point 4):
launch.py trains a few steps and evaluates; the Python API and the export certify 64 x 64 images with the same
numbers and refuse 32 x 32 ones; --mode=certify reads 64 x 64 images; the PGD audit breaks no certificate.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

import certjax
from certjax.data.sources import make_real_source
from certjax.inference.export import export_model
from certjax.inference.exported import load_exported
from tests.conftest import REPO, launch_env, run_launch
from tests.data64 import cifar_images_64, write_tiny_imagenet

# family -> its config's variants at 64 x 64 (the tests' tiny sizes)
CONFIGS_64 = {
    "liresnet_pp": "configs/liresnet_pp.py:demo,tiny,tiny_imagenet",
    "bronet": "configs/bronet.py:demo,tiny,tiny_imagenet",
    "lot": "configs/lot.py:demo,tiny,tiny_imagenet",
    "liresnet": "configs/liresnet.py:demo,tiny,tiny_imagenet",
}


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    root = tmp_path_factory.mktemp("data64")
    images, classes = cifar_images_64(96, start=3)
    generated = root / "generated64.npz"
    np.savez(generated, image=images, label=(classes * 20 + 7).astype(np.int64))  # labels in [0, 200)
    return {"real": write_tiny_imagenet(root), "generated": generated}


@pytest.fixture(scope="module", params=sorted(CONFIGS_64))
def run64(request, data64, tmp_path_factory):
    family = request.param
    workdir = tmp_path_factory.mktemp(f"run64_{family}")
    result = run_launch(
        CONFIGS_64[family], workdir, f"--config.data.real={data64['real']}",
        f"--config.data.generated={data64['generated']}", "--config.data.real_fraction=0.5",
        "--config.data.real_subset=128", mode="train_and_evaluate",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return family, workdir, result


def _val_images(data64, n=6):
    source = make_real_source(str(data64["real"]), "test", "tiny_imagenet")
    return source.read(np.arange(n))


def test_launch_trains_on_64x64_real_and_generated_images_and_evaluates(run64):
    family, workdir, result = run64
    record = json.loads((workdir / "results.jsonl").read_text().splitlines()[-1])
    assert record["dataset"] == "tiny_imagenet" and record["num_test"] == 200
    assert 0.0 <= record["certified_accuracy"] <= record["clean_accuracy"] <= 1.0
    assert "real 32 + generated 32" in result.stdout  # both sources in every batch


def test_api_and_export_certify_64x64_images_alike_and_refuse_32x32(run64, data64, tmp_path):
    family, workdir, _ = run64
    images, labels = _val_images(data64)
    model = certjax.restore(str(workdir), "last")
    out = model.certify(images, labels=labels)
    assert out["prediction"].shape == (6,) and model.logits(images).shape == (6, 200)
    export_model(model, str(tmp_path / "export"), platforms=("cpu",))
    exported = load_exported(str(tmp_path / "export"))
    again = exported.certify(images, labels=labels)
    for key, value in out.items():
        np.testing.assert_array_equal(again[key], value, err_msg=f"{family}: {key}")
    for api in (model, exported):
        with pytest.raises(ValueError, match=r"images must be \[N, 64, 64, 3\].*got shape \(2, 32, 32, 3\)"):
            api.certify(np.zeros((2, 32, 32, 3), np.uint8))


def _certify_cli(workdir, *flags):
    command = [sys.executable, str(REPO / "launch.py"), f"--workdir={workdir}", "--mode=certify",
               "--checkpoint=last", *flags]  # fmt: skip
    return subprocess.run(command, env=launch_env(), cwd=REPO, capture_output=True, text=True)


# the image files' shape check is the model's, whatever the family: one family's run suffices
@pytest.mark.parametrize("run64", ["liresnet_pp"], indirect=True)
def test_certify_mode_reads_64x64_images_and_refuses_32x32_in_one_line(run64, data64, tmp_path):
    family, workdir, _ = run64
    images, labels = _val_images(data64)
    np.savez(tmp_path / "mine.npz", image=images, label=labels)
    result = _certify_cli(workdir, f"--images={tmp_path / 'mine.npz'}", f"--out={tmp_path / 'out.csv'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((tmp_path / "out.csv").read_text().strip().splitlines()) == 1 + len(images)
    np.savez(tmp_path / "small.npz", image=np.zeros((2, 32, 32, 3), np.uint8))
    result = _certify_cli(workdir, f"--images={tmp_path / 'small.npz'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "64" in result.stderr and "32" in result.stderr


def test_the_audit_breaks_no_certificate_at_64x64(run64):
    family, workdir, _ = run64
    command = [sys.executable, "-m", "certjax.audit", f"--workdir={workdir}", "--checkpoint=last",
               "--limit=12", "--steps=20", "--restarts=1"]  # fmt: skip
    result = subprocess.run(command, env=launch_env(), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "broken certificates 0 of" in result.stdout
