"""bench/gpu_check.py without a GPU: the "no GPU" line, the whole table in its CPU smoke mode, failure rows.

The GPU run itself cannot happen here; `--force-cpu-smoke` drives every section (pytest subprocess, the
auto check, the kernel bench in interpret mode, a throughput run of a demo-size family) through the same
code with tiny shapes, so the script's own logic (workers, row protocol, deadlines, table) is exercised.
"""

import importlib.util
import subprocess
import sys

from tests.conftest import REPO, launch_env

SCRIPT = REPO / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=launch_env(), capture_output=True, text=True
    )


def test_without_a_gpu_it_says_so_and_exits_0():
    result = _run()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "gpu_check: no GPU (JAX backend: cpu, device: cpu); nothing to check."


def test_cpu_smoke_run_prints_one_table_with_every_section():
    result = _run("--force-cpu-smoke")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "CPU SMOKE RUN" in lines[0]
    assert lines.count("| section | item | status | result | detail |") == 1
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "---" not in line][1:]
    sections = {row[0].lstrip("| ") for row in rows}
    assert sections == {"tests", "auto check", "kernel", "throughput"}, rows
    assert all(row[2] in ("PASS", "ok") for row in rows), rows
    # the op: 2 paths x 2 p x (forward, forward + backward); its interval bounds: 2 paths x 2 p, forward
    assert sum(row[0] == "| kernel" for row in rows) == 8 + 4
    assert sum(row[0] == "| kernel" and "bounds forward" in row[1] for row in rows) == 4
    assert sum(row[0] == "| auto check" and row[1].startswith("bounds ") for row in rows) == 2
    (throughput,) = [row for row in rows if row[0] == "| throughput"]
    assert "img/s at p=inf" in throughput[3] and "auto:" not in throughput[4]  # CPU: auto is jnp, unchecked


def test_a_crashing_or_hanging_section_becomes_a_row():
    gpu_check = _module()
    row = '{"section": "s", "item": "first", "status": "ok"}'
    hang = f"import time; print('ROW {row}', flush=True); time.sleep(60)"
    rows, completed, failure = gpu_check.run_subprocess(
        [sys.executable, "-c", hang], timeout=5, section="s", item="hangs"
    )
    assert completed is None and rows[0]["item"] == "first"  # what it finished is kept
    assert failure["status"] == "FAIL" and failure["result"] == "timed out after 5 s"
    rows = gpu_check.worker_section("family:no_such_family", True, 120, "throughput", "no_such_family")
    assert rows[-1]["status"] == "FAIL" and "exit status 1" in rows[-1]["result"]
    assert "ModuleNotFoundError" in rows[-1]["detail"] and "configs.no_such_family" in rows[-1]["detail"]


def test_fp32_peak_by_device_kind():
    gpu_check = _module()
    assert gpu_check.peak_fraction(67e12 / 3 / 2, "NVIDIA H100 80GB HBM3") == "50.0% of 67 TFLOP/s FP32"
    assert "67 TFLOP/s" in gpu_check.peak_fraction(1e12, "NVIDIA H200")
    assert "51 TFLOP/s" in gpu_check.peak_fraction(1e12, "NVIDIA H100 PCIe")
    assert gpu_check.peak_fraction(1e12, "cpu") == "no FP32 peak known for 'cpu'"
