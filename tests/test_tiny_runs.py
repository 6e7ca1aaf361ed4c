"""The tests' tiny runs are found from the config files (tests/conftest.py): every configs/<family>.py with a
"tiny" variant is one, its config get_config("demo,tiny").

The reference is the hand-written table conftest held before (issue 21), written out here and built the old
way (variant, then the shared settings, then the family's overrides), so the check is an independent
computation of the same configs.
"""

from __future__ import annotations

import pytest

from tests.conftest import REPO, TINY_RUNS, _tiny_config, discover_tiny_runs, load_config_module

_LINF_TINY = {"model.depth": 3, "model.width": 32, "certify.eps": 2 / 255}
_OLD_TINY_RUNS = {
    "linf_dist": ("configs/linf_dist.py", "demo", _LINF_TINY),
    "sortnet": ("configs/sortnet.py", "demo,nodropout", _LINF_TINY),
    "sortnet_hybrid": ("configs/sortnet_hybrid.py", "demo",
                       {**_LINF_TINY, "model.depth": 4, "model.hidden": 16, "model.mode": "exact"}),
    "lot": ("configs/lot.py", "S,demo,cosine",
            {"model.init_channels": 4, "optimizer.lr": 0.05, "certify.eps": 0.02}),
    "liresnet": ("configs/liresnet.py", "XS,demo",
                 {"model.width": 8, "model.neck_features": 32, "model.eval_power_iterations": 50,
                  "optimizer.warmup_epochs": 0, "certify.eps": 0.02}),
    "liresnet_pp": ("configs/liresnet_pp.py", "demo",
                    {"model.width": 8, "model.neck_features": 32, "model.eval_power_iterations": 50,
                     "optimizer.warmup_epochs": 0, "certify.eps": 0.02}),
    "bronet": ("configs/bronet.py", "demo",  # issue 24, written the same way
               {"model.width": 8, "model.neck_features": 32, "model.eval_power_iterations": 50,
                "optimizer.warmup_epochs": 0, "certify.eps": 0.02}),
}  # fmt: skip
_OLD_SETTINGS = {
    "train.epochs": 1, "train.batch_size": 64, "data.real_subset": 256, "train.eval_batch_size": 250,
    "train.eval_subset": 250, "checkpoint.every_epochs": 1,
}  # fmt: skip


def _old_tiny_config(family: str):
    path, variant, overrides = _OLD_TINY_RUNS[family]
    config = load_config_module(REPO / path).get_config(variant)
    for key, value in {**_OLD_SETTINGS, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _leaves(tree, prefix: str = "") -> dict[str, object]:
    """'a.b.c' -> value for every leaf of a (nested) config dict."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_every_family_with_tiny_is_found_and_nothing_else():
    assert sorted(TINY_RUNS) == sorted(_OLD_TINY_RUNS)
    assert all(variant == "demo,tiny" for _, variant in TINY_RUNS.values())


@pytest.mark.parametrize("family", sorted(_OLD_TINY_RUNS))
def test_tiny_config_equals_the_old_table_field_by_field(family):
    new = _leaves(_tiny_config(family).to_dict())
    old = _leaves(_old_tiny_config(family).to_dict())
    # The variant string is recorded as given: "demo,tiny" now (was e.g. "S,demo,cosine"); every other field
    # is the same value of the same type.
    assert new.pop("variant") == "demo,tiny" and old.pop("variant") == _OLD_TINY_RUNS[family][1]
    assert sorted(new) == sorted(old)
    differences = {
        key: (old[key], new[key])
        for key in old
        if old[key] != new[key] or type(old[key]) is not type(new[key])
    }
    assert not differences, differences


def test_a_config_without_tiny_is_no_tiny_run(tmp_path):
    (tmp_path / "common.py").write_text("VARIANTS = {'tiny'}  # not a family\n")
    (tmp_path / "with_tiny.py").write_text((REPO / "configs" / "linf_dist.py").read_text())
    (tmp_path / "without_tiny.py").write_text(
        "from configs.common import get_common, parse_variant\n\n"
        "VARIANTS = {'demo'}\n\n\n"
        "def get_config(arg=''):\n"
        "    parse_variant(arg, VARIANTS)\n"
        "    return get_common()\n"
    )
    runs = discover_tiny_runs(tmp_path)
    assert sorted(runs) == ["with_tiny"]
    assert runs["with_tiny"] == (str(tmp_path / "with_tiny.py"), "demo,tiny")


@pytest.mark.parametrize("family", sorted(_OLD_TINY_RUNS))
def test_unknown_variant_still_names_the_valid_ones(family):
    module = load_config_module(REPO / "configs" / f"{family}.py")
    with pytest.raises(ValueError, match=r"Unknown config variant\(s\) \['tinyy'\]; valid: .*'tiny'"):
        module.get_config("demo,tinyy")


@pytest.mark.parametrize(
    "family, variant, message",
    [("sortnet", "dropout,demo,tiny", "drop 'dropout'"), ("lot", "demo,tiny,multistep", "drop 'multistep'")],
)
def test_tiny_names_its_fixed_choices_when_contradicted(family, variant, message):
    module = load_config_module(REPO / "configs" / f"{family}.py")
    with pytest.raises(ValueError, match=message):
        module.get_config(variant)
