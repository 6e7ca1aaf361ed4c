"""python -m certjax.export / certjax.load_exported on every family: a fresh process that never imports flax
gives the API's logits and radii exactly; a changed byte in any exported file is refused."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import certjax
from certjax.data.sources import make_real_source
from certjax.inference.export import export_model
from certjax.inference.exported import ExportError, load_exported
from tests.conftest import REPO, TINY_RUNS, launch_env

FAMILIES = sorted(TINY_RUNS)  # every family, as its tiny run

LOADER = """
import sys
import numpy as np
import certjax

images = np.load(sys.argv[1])["image"]
results = {}
for i, directory in enumerate(sys.argv[2:]):
    model = certjax.load_exported(directory)
    out = model.certify(images)
    results[f"logits{i}"] = model.logits(images)
    results[f"radius{i}"] = out["radius"]
    results[f"prediction{i}"] = out["prediction"]
    results[f"certified{i}"] = out["certified"]
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "orbax", "optax") or
                m.startswith("certjax.models") or m in ("certjax.inference.restore", "certjax.train"))
assert not leaked, leaked
np.savez(sys.argv[1].replace(".npz", "_out.npz"), **results)
"""


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory):
    """family -> (export directory, the API model it came from)."""
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for family in FAMILIES:
        model = certjax.restore(str(tiny_run(family)))
        export_model(model, str(root / family))
        made[family] = (root / family, model)
    return made


def test_exported_models_load_without_flax_and_match_the_api_exactly(exports, tmp_path):
    # 260 real test images: two artifact batches of 250, the second padded
    images, _ = make_real_source("demo", "test", "cifar10").read(np.arange(0, 1000)[::3][:260])
    np.savez(tmp_path / "images.npz", image=images)
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    directories = [str(exports[family][0]) for family in FAMILIES]
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "images.npz"), *directories],
        env=launch_env(), cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = np.load(tmp_path / "images_out.npz")
    for i, family in enumerate(FAMILIES):
        model = exports[family][1]
        out = model.certify(images)
        np.testing.assert_array_equal(loaded[f"logits{i}"], model.logits(images), err_msg=family)
        np.testing.assert_array_equal(loaded[f"radius{i}"], out["radius"], err_msg=family)
        np.testing.assert_array_equal(loaded[f"prediction{i}"], out["prediction"], err_msg=family)
        # the export carries the margin certificate only (the l_inf families' IBP needs the model code)
        margin = out.get("certified_margin", out["certified"])
        np.testing.assert_array_equal(loaded[f"certified{i}"], margin, err_msg=family)


def test_manifest_describes_the_model_and_both_platforms(exports):
    directory, model = exports["lot"]
    manifest = load_exported(str(directory)).info
    for key in ("family", "threat_model", "eps", "mean", "std", "input_shape", "pair_lipschitz"):
        assert manifest[key] == model.info[key], key
    assert manifest["platforms"] == ["cpu", "cuda"]
    assert manifest["certjax_version"] == certjax.__version__
    assert set(manifest["sha256"]) == {"forward_uint8.jax", "forward_float32.jax", "weights.npz"}
    import jax

    for name in manifest["artifacts"].values():
        exported = jax.export.deserialize(bytearray((directory / name).read_bytes()))
        assert tuple(exported.platforms) == ("cpu", "cuda")


@pytest.mark.parametrize("name", ["manifest.json", "weights.npz", "forward_uint8.jax", "forward_float32.jax"])
def test_a_changed_byte_is_refused(exports, tmp_path, name):
    copy = tmp_path / "copy"
    shutil.copytree(exports["linf_dist"][0], copy)
    load_exported(str(copy))  # intact: loads
    data = bytearray((copy / name).read_bytes())
    if name == "manifest.json":  # a digit of eps
        text = data.decode()
        position = text.index('"eps": ') + len('"eps": ') + 3
    else:
        position = len(data) // 2
    data[position] = (
        (data[position] + 1) % 256
        if name != "manifest.json"
        else ord("7" if data[position] != ord("7") else "3")
    )
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=name.replace(".", r"\.")) as error:
        load_exported(str(copy))
    assert "changed" in str(error.value) or "damaged" in str(error.value)


def test_export_command_line(tiny_run, tmp_path):
    out = tmp_path / "model"
    command = [sys.executable, "-m", "certjax.export", f"--workdir={tiny_run('sortnet')}", f"--out={out}"]
    result = subprocess.run(command, env=launch_env(), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("exported sortnet") and not result.stderr.strip()
    assert json.loads((out / "manifest.json").read_text())["manifest"]["family"] == "sortnet"
    again = subprocess.run(command, env=launch_env(), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten
