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
