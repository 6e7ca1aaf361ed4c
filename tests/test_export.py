"""python -m certjax.export / certjax.load_exported on every family: a fresh process that never imports flax
gives every field and number of the API's `certify` (the l_inf families' interval-bound certificates
included) and its logits exactly; the export applies the API's input checks with the API's messages; a
changed byte in any exported file, or an export of an older format, is refused."""

import inspect
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import certjax
from certjax.data.sources import make_real_source
from certjax.inference.export import ARTIFACTS, IBP_ARTIFACTS, export_model, sealed_manifest_bytes
from certjax.inference.exported import ExportError, load_exported
from tests.conftest import REPO, TINY_RUNS, launch_env

FAMILIES = sorted(TINY_RUNS)  # every family, as its tiny run


def certify_calls(model, images, labels, eps):
    """The calls compared, made on the API's model here and on the export in the loader's fresh process."""
    import numpy as np

    return {
        "labels": model.certify(images, labels=labels),
        "plain": model.certify(images),
        "ibp_eps": model.certify(images, eps=eps, labels=labels),  # an eps with interval-only certificates
        "float64": model.certify(images / 255.0, labels=labels),  # rounded to float32, minus the distance
        "int64": model.certify(images.astype(np.int64), labels=list(labels)),  # as uint8; a list of labels
    }


LOADER = (
    inspect.getsource(certify_calls)
    + """
import sys
import numpy as np
import certjax

data = np.load(sys.argv[1])
results = {}
for i, directory in enumerate(sys.argv[2:]):
    model = certjax.load_exported(directory)
    results[f"{i}/logits"] = model.logits(data["image"])
    calls = certify_calls(model, data["image"], data["label"], float(data[f"eps{i}"]))
    results.update({f"{i}/{call}/{key}": v for call, out in calls.items() for key, v in out.items()})
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "orbax", "optax") or
                m.startswith("certjax.models") or m in ("certjax.inference.restore", "certjax.train"))
assert not leaked, leaked
np.savez(sys.argv[1].replace(".npz", "_out.npz"), **results)
"""
)


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


def interval_eps(model, images) -> float:
    """An eps at which interval bounds prove some prediction the margin does not (l_inf families), so that
    the comparison covers interval-only certificates; else half the checkpoint's eps."""
    eps = float(model.info["eps"])
    if model._exp.certify_method == "margin":
        return eps / 2
    for factor in (1.0, 0.5, 0.25, 2.0, 0.125):
        out = model.certify(images, eps=eps * factor)
        if np.any(out["robust_ibp"] & ~out["robust_margin"]):
            return eps * factor
    return eps


def test_exported_models_load_without_flax_and_give_every_field_of_the_api(exports, tmp_path):
    # 260 real test images: two artifact batches of 250, the second padded
    images, labels = make_real_source("demo", "test", "cifar10").read(np.arange(0, 1000)[::3][:260])
    epsilons = {family: interval_eps(exports[family][1], images) for family in FAMILIES}
    eps_arrays = {f"eps{i}": np.float64(epsilons[family]) for i, family in enumerate(FAMILIES)}
    np.savez(tmp_path / "images.npz", image=images, label=labels, **eps_arrays)
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
        np.testing.assert_array_equal(loaded[f"{i}/logits"], model.logits(images), err_msg=family)
        for call, out in certify_calls(model, images, labels, epsilons[family]).items():
            exported = {key[len(f"{i}/{call}/") :] for key in loaded.files if key.startswith(f"{i}/{call}/")}
            assert exported == set(out), (family, call, sorted(exported), sorted(out))
            for key, value in out.items():
                got = loaded[f"{i}/{call}/{key}"]
                assert got.dtype == value.dtype, (family, call, key, got.dtype, value.dtype)
                np.testing.assert_array_equal(got, value, err_msg=f"{family} {call} {key}")
        if model._exp.certify_method != "margin":  # the IBP points: certified by interval bounds only
            prefix = f"{i}/ibp_eps/"
            out = {key[len(prefix) :]: loaded[key] for key in loaded.files if key.startswith(prefix)}
            assert np.any(out["robust_ibp"] & ~out["robust_margin"]), family
            np.testing.assert_array_equal(out["robust"], out["robust_margin"] | out["robust_ibp"])
            np.testing.assert_array_equal(out["certified"], out["correct"] & out["robust"])


def _bad_inputs(images, labels):
    """(what, images, keyword arguments, a fragment of the message or None): input the API refuses."""
    nan = images[:3] / 255.0
    nan[0, 0, 0, 0] = np.nan
    return [
        ("float labels", images, {"labels": labels.astype(np.float64)}, "got dtype float64"),
        ("a label past the classes", images, {"labels": np.maximum(labels, 10)}, "[0, 10)"),
        ("a negative label", images, {"labels": -np.ones_like(labels)}, "[0, 10)"),
        ("bool labels", images, {"labels": labels > 4}, "integer class indices"),
        ("one label too many", images, {"labels": np.append(labels, 0)}, "one class index per image"),
        ("float images above 1", images / 100.0, {}, "[0, 1]"),
        ("integer images above 255", images.astype(np.int64) + 256, {}, "[0, 255]"),
        ("channels first", images.transpose(0, 3, 1, 2), {}, "channels first"),
        ("a NaN pixel", nan, {}, None),
        ("a negative eps", images, {"eps": -0.1}, "eps"),
        ("a NaN eps", images, {"eps": float("nan")}, "eps"),
        ("eps as text", images, {"eps": "0.1"}, "eps must be a number"),
        ("no images", images[:0], {}, "no images"),
    ]


def test_the_export_refuses_what_the_api_refuses_with_the_same_message(exports):
    images, labels = make_real_source("demo", "test", "cifar10").read(np.arange(8))
    for family in ("linf_dist", "lot"):  # one of each threat model
        directory, model = exports[family]
        exported = load_exported(str(directory))
        for what, bad, kwargs, fragment in _bad_inputs(images, labels):
            messages = []
            for certifier in (model, exported):
                with pytest.raises(ValueError) as error:
                    certifier.certify(bad, **kwargs)
                messages.append(str(error.value))
            assert messages[0] == messages[1], (family, what, messages)
            assert fragment is None or fragment in messages[0], (family, what, messages[0])
    # a float label has its own message, which names the fix (it used to read "must be integers of shape (8,),
    # got (8,)")
    float_label = r"integer class indices, got dtype float32: pass labels.astype\(int\)"
    with pytest.raises(ValueError, match=float_label):
        exported.certify(images, labels=labels.astype(np.float32))


def test_manifest_describes_the_model_and_both_platforms(exports):
    import jax

    forward, interval = list(ARTIFACTS.values()), list(IBP_ARTIFACTS.values())
    for family, expected in (("lot", forward), ("linf_dist", forward + interval)):
        directory, model = exports[family]
        manifest = load_exported(str(directory)).info
        for key in ("family", "threat_model", "eps", "mean", "std", "input_shape", "pair_lipschitz"):
            assert manifest[key] == model.info[key], key
        assert manifest["certify_method"] == model._exp.certify_method
        assert manifest["platforms"] == ["cpu", "cuda"]
        assert manifest["certjax_version"] == certjax.__version__
        names = [name for by_dtype in manifest["artifacts"].values() for name in by_dtype.values()]
        assert sorted(names) == sorted(expected)
        assert set(manifest["sha256"]) == {*names, "weights.npz"}
        for name in names:
            exported = jax.export.deserialize(bytearray((directory / name).read_bytes()))
            assert tuple(exported.platforms) == ("cpu", "cuda")


@pytest.mark.parametrize(
    "name", ["manifest.json", "weights.npz", "forward_uint8.jax", "forward_float32.jax", "ibp_uint8.jax"]
)
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


def test_an_export_of_the_margin_only_format_is_refused(exports, tmp_path):
    """Format 1 certified the l_inf families by the margin only: its numbers were not the API's."""
    copy = tmp_path / "copy"
    shutil.copytree(exports["lot"][0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())["manifest"]
    (copy / "manifest.json").write_bytes(sealed_manifest_bytes({**manifest, "format": 1}))
    with pytest.raises(ExportError, match="export format 1, this certjax reads 2: export again"):
        load_exported(str(copy))


def test_export_command_line(tiny_run, tmp_path):
    out = tmp_path / "model"
    command = [sys.executable, "-m", "certjax.export", f"--workdir={tiny_run('sortnet')}", f"--out={out}"]
    result = subprocess.run(command, env=launch_env(), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    noise = [line for line in result.stderr.splitlines() if not line.startswith("certjax: export: ")]
    assert result.stdout.startswith("exported sortnet") and not noise  # progress lines only (after ~30 s)
    assert json.loads((out / "manifest.json").read_text())["manifest"]["family"] == "sortnet"
    again = subprocess.run(command, env=launch_env(), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten
