"""The `certjax` command (certjax/cli.py) as a user types it: `python -m certjax` subprocesses (the console
script `certjax` and `python launch.py` call the same `main`), --help, `certjax list`, `certjax config`,
config.json, and a table of bad inputs for every mode: each ends in exactly one `certjax: ` line on stderr
and exit status 2, with the workdir neither created nor changed.
"""

import json
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tests.conftest import REPO, _tiny_config, launch_env, load_config_module

TINY = "--config=configs/linf_dist.py:demo,tiny"
DEMO_TEST = REPO / "certjax" / "data" / "demo" / "cifar10-demo-test.zip"  # real CIFAR-10 JPEGs


def _certjax(*args, cwd=REPO):
    command = [sys.executable, "-m", "certjax", *map(str, args)]
    return subprocess.run(command, env=launch_env(), cwd=cwd, capture_output=True, text=True)


def _family_modules() -> dict:
    """Every configs/<family>.py with get_config, found here by a walk of its own."""
    modules = {}
    for path in sorted((REPO / "configs").glob("*.py")):
        module = load_config_module(path)
        if path.stem not in ("__init__", "common") and hasattr(module, "get_config"):
            modules[path.stem] = module
    return modules


# ----------------------------------------------------------------------------------------- one command


def test_certjax_command_module_and_launch_py_run_the_same_main(capsys):
    from certjax import cli

    pyproject = (REPO / "pyproject.toml").read_text()  # the console script (tomllib needs Python 3.11)
    assert re.search(r'^\[project\.scripts\]\ncertjax = "certjax\.cli:main"', pyproject, re.M)
    module, launch = _certjax("--help"), subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--help"], env=launch_env(), cwd=REPO, capture_output=True,
        text=True,
    )  # fmt: skip
    assert module.returncode == 0 and launch.returncode == 0, module.stderr + launch.stderr
    assert module.stdout == launch.stdout and not module.stderr.strip()
    for args in (["--help"], [], ["help"], ["config", "-h"]):  # the console script's entry point, directly
        assert cli.main(["certjax", *args]) == 0
        assert capsys.readouterr().out == module.stdout, args
    text = module.stdout
    for word in [*cli.MODES, *cli.COMMANDS, "--workdir", "--checkpoint", "--images", "--eps", "--config.KEY"]:
        assert re.search(rf"^\s+{re.escape(word)}\b", text, re.M), word
    assert "certjax list" in text and "certjax config" in text


def test_help_and_docstrings_point_only_to_readme_sections_that_exist():
    headings = {
        line[3:].strip() for line in (REPO / "README.md").read_text().splitlines() if line[:3] == "## "
    }
    from certjax.cli import help_text

    sources = {"help": help_text()}
    for path in [REPO / "launch.py", *(REPO / "certjax").rglob("*.py"), *(REPO / "configs").glob("*.py")]:
        sources[str(path.relative_to(REPO))] = path.read_text()
    references = [
        (where, " ".join(name.split()))
        for where, text in sources.items()
        for name in re.findall(r'README,\s+"([^"]+)"', text)
    ]
    assert ("help", "Command line") in references and (
        "launch.py",
        "Many devices, many hosts, and failures",
    ) in (references)
    missing = [(where, name) for where, name in references if name not in headings]
    assert not missing, f"no such README section: {missing}; sections: {sorted(headings)}"


def test_list_shows_every_family_its_variants_notes_and_published_figures(capsys):
    from certjax import cli

    result = _certjax("list")
    assert result.returncode == 0, result.stderr
    assert cli.main(["certjax", "list"]) == 0 and capsys.readouterr().out == result.stdout
    families = _family_modules()
    assert set(families) == {
        "linf_dist",
        "sortnet",
        "lot",
        "liresnet",
        "liresnet_pp",
        "bronet",
        "sortnet_hybrid",
    }
    sections = re.split(r"\n\n", result.stdout)[1:]
    assert [section.split()[0] for section in sections] == sorted(families)
    for (name, module), section in zip(sorted(families.items()), sections):
        # a family's config must say what every variant is for, and what was published
        assert set(module.VARIANT_NOTES) == set(module.VARIANTS), name
        assert all(note.strip() for note in module.VARIANT_NOTES.values()), name
        assert isinstance(module.PUBLISHED, str) and module.PUBLISHED.strip(), name
        for variant, note in module.VARIANT_NOTES.items():
            assert re.search(rf"^  {re.escape(variant)} +{re.escape(note)}", section, re.M), (name, variant)
        assert f"published: {module.PUBLISHED}" in " ".join(section.split())  # wrapped at 110
    assert re.search(r"^  S +LipConvNet-10 \(default\)$", result.stdout, re.M)  # get_config's default


def test_config_prints_the_resolved_config_and_checks_it():
    result = _certjax("config", "--config=configs/lot.py:S,cosine", "--config.train.epochs=7",
                      "--config.optimizer.lr=0.05", "--config.augment.flip=false")  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = load_config_module(REPO / "configs" / "lot.py").get_config("S,cosine")
    expected.train.epochs, expected.optimizer.lr, expected.augment.flip = 7, 0.05, False
    assert json.loads(result.stdout) == json.loads(json.dumps(expected.to_dict()))
    assert json.loads(result.stdout)["optimizer"]["schedule"] == "cosine"


def test_every_run_writes_its_resolved_config(tiny_run, tmp_path):
    trained = tiny_run("linf_dist")
    written = json.loads((trained / "config.json").read_text())
    assert written == json.loads(json.dumps(_tiny_config("linf_dist").to_dict()))
    # a run from the command line: the overrides are in it (a rerun of the finished tiny run trains nothing)
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    result = _certjax(TINY, f"--workdir={workdir}", "--config.train.log_every_steps=7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["train"]["log_every_steps"] == 7


# ------------------------------------------------------------------------------------------ bad input

# (arguments, a text the one line must hold, the workdir the command names: new (must not appear), empty
# (must stay empty), trained (the session's tiny l_inf-dist run: must not change) or None)
BAD_INPUTS = {
    "train: no such config file": (["--config=configs/nosuch.py", "--workdir=<new>"], "no such file", "new"),
    "train: unknown variant": (["--config=configs/lot.py:XS", "--workdir=<new>"], "'XS'", "new"),
    "train: config file that does not load": (
        ["--config=<tmp>/broken.py", "--workdir=<new>"],
        "SyntaxError",
        "new",
    ),
    "train: non-numeric override": (
        [TINY, "--workdir=<new>", "--config.train.epochs=abc"],
        "train.epochs takes an integer",
        "new",
    ),
    "train: unknown override key": (
        [TINY, "--workdir=<new>", "--config.train.epoch=3"],
        "did you mean train.epochs",
        "new",
    ),
    "train: override before --config": (
        ["--config.train.epochs=3", TINY, "--workdir=<new>"],
        "before --config",
        "new",
    ),
    "train: invalid config values": (
        [TINY, "--workdir=<new>", "--config.data.real_fraction=1.5", "--config.certify.eps=-1"],
        "data.real_fraction: 1.5",
        "new",
    ),
    "train: missing data": (
        [TINY, "--workdir=<new>", "--config.data.real=<tmp>/nowhere-{split}.zip"],
        "nowhere-",
        "new",
    ),
    "train: no --workdir": ([TINY], "needs --workdir", None),
    "train: no --config": (["--workdir=<new>"], "needs --config", "new"),
    "train: unknown flag": ([TINY, "--wrkdir=<new>"], "did you mean --workdir", "new"),
    "train: stray argument": ([TINY, "--workdir=<new>", "trian"], "unexpected argument", "new"),
    "unknown mode": ([TINY, "--workdir=<new>", "--mode=trian"], "--mode=trian", "new"),
    "train_and_evaluate: unknown variant": (
        ["--config=configs/sortnet.py:fast", "--workdir=<new>", "--mode=train_and_evaluate"],
        "'fast'",
        "new",
    ),
    "train_and_evaluate: bad --checkpoint": (
        [TINY, "--workdir=<new>", "--mode=train_and_evaluate", "--checkpoint=newest"],
        "--checkpoint=newest",
        "new",
    ),
    "train: a --checkpoint step the run will not keep": (
        [TINY, "--workdir=<new>", "--checkpoint=3"],
        "--checkpoint=3: this run ends with steps 4",
        "new",
    ),
    "evaluate: workdir without checkpoints": (
        ["--workdir=<empty>", "--mode=evaluate"],
        "no checkpoints",
        "empty",
    ),
    "evaluate: no such workdir": (["--workdir=<new>", "--mode=evaluate"], "no checkpoints", "new"),
    "evaluate: no such step": (
        ["--workdir=<trained>", "--mode=evaluate", "--checkpoint=999"],
        "--checkpoint=999: no such step",
        "trained",
    ),
    "evaluate: no --workdir": (["--mode=evaluate"], "needs --workdir", None),
    "certify: no such images": (
        ["--workdir=<trained>", "--mode=certify", "--images=<tmp>/nothing.zip"],
        "no such file or folder",
        "trained",
    ),
    "certify: no --images": (["--workdir=<trained>", "--mode=certify"], "needs --images", "trained"),
    "certify: negative eps": (
        ["--workdir=<trained>", "--mode=certify", "--images=<images>", "--eps=-0.1"],
        "--eps=-0.1",
        "trained",
    ),
    "certify: non-numeric eps": (
        ["--workdir=<trained>", "--mode=certify", "--images=<images>", "--eps=abc"],
        "--eps=abc",
        "trained",
    ),
    "certify: no such step": (
        ["--workdir=<trained>", "--mode=certify", "--images=<images>", "--checkpoint=999"],
        "no such step",
        "trained",
    ),
    "certify: workdir without checkpoints": (
        ["--workdir=<empty>", "--mode=certify", "--images=<images>"],
        "no checkpoints",
        "empty",
    ),
    "certify: class folders not named by the dataset's classes": (
        ["--workdir=<trained>", "--mode=certify", "--images=<pets>"],
        "are not the dataset's class names",
        "trained",
    ),
    "certify: --labels neither a policy nor a file": (
        ["--workdir=<trained>", "--mode=certify", "--images=<pets>", "--labels=<tmp>/nomap.json"],
        "neither 'names', 'sorted' nor a JSON file",
        "trained",
    ),
    "certify: rows file of another format": (
        ["--workdir=<trained>", "--mode=certify", "--images=<images>", "--out=<tmp>/rows.txt"],
        ".jsonl",
        "trained",
    ),
    "config: unknown variant": (["config", "--config=configs/lot.py:XS"], "'XS'", None),
    "config: non-numeric override": (
        ["config", TINY, "--config.optimizer.lr=fast"],
        "optimizer.lr takes a number",
        None,
    ),
    "config: invalid value": (
        ["config", TINY, "--config.data.real_fraction=1.5"],
        "data.real_fraction",
        None,
    ),
    "config: no --config": (["config"], "needs --config", None),
    "list: an argument": (["list", "lot"], "takes no arguments", None),
}


def _snapshot(directory):
    return {
        str(path.relative_to(directory)): (path.is_dir(), path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
    }


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tiny_run, tmp_path):
    arguments, expected, named = BAD_INPUTS[case]
    trained = tiny_run("linf_dist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", image=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    with zipfile.ZipFile(DEMO_TEST) as source, zipfile.ZipFile(tmp_path / "pets.zip", "w") as pets:
        for folder, cls in (("cats", "cat"), ("dogs", "dog")):  # real JPEGs in folders of other names
            member = f"test/{cls}/0000.jpg"
            pets.writestr(f"{folder}/0.jpg", source.read(member))
    places = {"<new>": tmp_path / "new", "<empty>": tmp_path / "empty", "<trained>": trained}
    places["<pets>"] = tmp_path / "pets.zip"
    places.update({"<tmp>": tmp_path, "<images>": tmp_path / "images.npz"})
    args = []
    for argument in arguments:
        for token, place in places.items():
            argument = argument.replace(token, str(place))
        args.append(argument)
    before = _snapshot(trained)

    result = _certjax(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (case, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("certjax: ") and " error: " in lines[0], (case, lines)
    assert expected in lines[0], (case, lines[0])
    if named == "new":
        assert not (tmp_path / "new").exists(), case
    if named == "empty":
        assert not list((tmp_path / "empty").iterdir()), case
    assert _snapshot(trained) == before, case  # no record, radii, certify rows or checkpoint moved
    assert not (tmp_path / "rows.txt").exists()
    if "no such step" in expected:  # the steps that exist are listed
        steps = sorted(int(p.name) for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
        assert lines[0].endswith(", ".join(map(str, steps))), lines[0]
    if "variant" in case:  # the valid variants are listed
        valid = load_config_module(
            REPO / args[-1 if case.startswith("config") else 0].split("=")[1].split(":")[0]
        )
        assert all(variant in lines[0] for variant in valid.VARIANTS), lines[0]


def test_bad_input_through_the_entry_point_function(tmp_path, capsys):
    from certjax import cli

    workdir = tmp_path / "run"
    status = cli.main(["certjax", f"--config={REPO}/configs/lot.py:XS", f"--workdir={workdir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        status == 2
        and len(err) == 1
        and err[0].startswith(f"certjax: config error: --config={REPO}/configs/lot.py:XS")
    )
    assert "cosine" in err[0] and not workdir.exists()
    assert (
        cli.one_line("2 invalid config value(s):\n  - a: x\n  - b: y")
        == "2 invalid config value(s): a: x; b: y"
    )


def test_kept_steps_are_the_last_saves_of_the_schedule():
    """By hand: 10 epochs of 5 steps, saves every 3 epochs (15, 30, 45) and at the end (50)."""
    from certjax.checkpoints import kept_steps

    assert kept_steps(10, 5, 3, 2) == [45, 50]
    assert kept_steps(10, 5, 3, 9) == [15, 30, 45, 50]
    assert kept_steps(6, 5, 3, 2) == [15, 30]  # the end is a scheduled save: not counted twice
    assert kept_steps(1, 4, 1, 0) == [
        4
    ]  # keep 0 still keeps the latest (make_manager: LatestN(max(keep, 1)))


def test_train_with_a_step_the_run_keeps_evaluates_that_step(tmp_path):
    """--checkpoint=<a kept step> is accepted before training and evaluated after it (the tiny run's 4)."""
    result = _certjax(TINY, f"--workdir={tmp_path / 'run'}", "--mode=train_and_evaluate", "--checkpoint=4")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4
