"""The README's first two commands are the ones users and CI run."""

from tests.conftest import REPO


def _readme_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    return [line.strip() for line in lines if line.startswith("    python3 -m venv")][:2]


def test_ci_runs_exactly_the_readme_test_command():
    demo, tests = _readme_commands()
    assert "launch.py --config=configs/linf_dist.py:demo" in demo and "--mode=train_and_evaluate" in demo
    assert "pytest" in tests
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def _readme_api_snippet() -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("    import numpy as np")
    snippet = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        snippet.append(line[4:])
    return "\n".join(snippet)


def test_readme_api_example_runs(tiny_run, capsys):
    snippet = _readme_api_snippet()
    assert 'certjax.restore("runs/demo"' in snippet and "model.certify(images)" in snippet
    workdir = str(tiny_run("linf_dist"))
    capsys.readouterr()  # the fixture's own training output, when this test is the first to ask for it
    exec(compile(snippet.replace("runs/demo", workdir), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[1].startswith("linf_dist linf")
