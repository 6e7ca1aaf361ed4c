"""Everything a GPU machine should confirm, in one command and one markdown table, in at most 8 minutes.

  python bench/gpu_check.py            # one H100 / H200: <= 8 minutes; the table goes to stdout

Sections (rows of one table; progress goes to stderr):
  tests       `pytest -q tests/test_kernels.py -k "not Interpret"` in a subprocess: the KernelTest class runs
              the Pallas kernels for real (its interpret-mode twin is the CPU suite's), pass/fail counts;
  auto check  what kernel="auto" decides for the paper's l_inf-dist shapes (certjax.kernels.autoselect:
              values and gradients at p = inf and p = 8 against the jnp path), the error closest to its
              tolerance; the same for the interval-bounds kernel (autoselect.bounds_op: both ends within the
              tolerance, and its interval containing the jnp path's up to rounding);
  kernel      the l_p-dist op at B x I x O = 512 x 3072 x 5120 and 512 x 5120 x 5120, Pallas and the XLA jnp
              path, forward and forward + backward at p = inf and p = 8: time, elements/s (B*I*O per second;
              for forward + backward too) and % of the FP32 peak of the device (`FP32_PEAK_TFLOPS`, keyed by
              device_kind), one element counted as 3 FLOP (subtract, abs, max); and the interval bounds of
              the layer (certjax.certify.interval.lp_distance_bounds, box x +- 0.1), Pallas bounds kernel and
              jnp,
              forward only (the kernel's backward is the jnp path's), elements/s counting B*I*O once;
  throughput  one train step (certjax.train.Trainer.train_step: augmentation, forward, loss, backward,
              optimiser) of each family at its paper size on random uint8 batches of the config's batch size
              (no dataset: the embedded demo test split only gives Experiment its class count), img/s after
              compilation and the device's peak memory; the l_inf families at a p of the l_p phase and at
              p = inf, with how many of their distance configurations "auto" runs on Pallas.

Every section runs in a subprocess of this script (`--worker`) with a time limit taken from one deadline, so
the whole run stays under 8 minutes; rows arrive as they are measured, so a section that fails, crashes or
runs out of time still reports what it finished and one row saying what went wrong; the rest go on. A family
that would not fit in the time left is reported as skipped. Each throughput run has its own process, so its
peak memory is its own.

Without a GPU it prints one line saying so (naming the backend it found) and exits 0. `--force-cpu-smoke`
runs every section on CPU with tiny shapes (interpret-mode kernels, demo-size models): the script's own
logic, for tests/test_gpu_check.py. The exit status is 1 if a row failed, else 0. The table of a GPU run
belongs in docs/results/gpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # configs/ is imported as a package

BUDGET_SECONDS = 460  # the whole run; the table itself takes no time
ROW = "ROW "  # prefix of a worker's result lines on stdout
INF = float("inf")
FLOP_PER_ELEMENT = 3  # subtract, abs, max (forward); the same count is used for forward + backward

# FP32 peak (non-tensor-core, FMA = 2 FLOP) by a substring of jax's device_kind; the first match counts.
FP32_PEAK_TFLOPS = (
    ("GH200", 67.0),  # the H100 SXM chip
    ("H200 NVL", 60.0),
    ("H200", 67.0),  # SXM: the H100 SXM chip with more memory
    ("H100 PCIe", 51.0),
    ("H100 NVL", 60.0),
    ("H100", 67.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 19.5),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each section runs and the most seconds it may take (capped by the time left)."""

    pytest_args: tuple[str, ...]
    tests_seconds: float
    check_shapes: tuple[tuple[int, int, int, bool], ...]  # (B, I, O, masked)
    check_seconds: float
    kernel_shapes: tuple[tuple[int, int, int], ...]
    kernel_seconds: float
    families: tuple[str, ...]  # "config[:variant]" in order of priority
    family_seconds: float
    family_min_seconds: float  # a family is not started with less time left
    measure_seconds: float  # timed steps per measurement (at least 3 steps)


FULL = Plan(
    pytest_args=("tests/test_kernels.py", "-k", "not Interpret"),
    tests_seconds=120,
    check_shapes=((512, 3072, 5120, False), (512, 5120, 5120, False), (512, 5120, 5120, True)),
    check_seconds=75,
    kernel_shapes=((512, 3072, 5120), (512, 5120, 5120)),
    kernel_seconds=100,
    families=(
        "linf_dist",
        "sortnet",
        "lot:S",
        "liresnet:XS",
        "liresnet:L",
        "lot:L",
        "liresnet:S",
        "liresnet:M",
    ),
    family_seconds=90,  # the l_inf families check each distance configuration first (kernels.autoselect)
    family_min_seconds=45,
    measure_seconds=3.0,
)
SMOKE = Plan(  # --force-cpu-smoke: tiny everything, the same code paths
    pytest_args=("tests/test_kernels.py", "-k", "LoweringTest"),
    tests_seconds=120,
    check_shapes=((5, 11, 7, False), (5, 11, 7, True)),
    check_seconds=120,
    kernel_shapes=((6, 10, 9),),
    kernel_seconds=120,
    families=("linf_dist",),
    family_seconds=120,
    family_min_seconds=0,
    measure_seconds=0.0,
)


# ---------------------------------------------------------------------------------------------- workers


def emit(section: str, item: str, status: str, result: str = "", detail: str = "") -> None:
    """One table row, sent to the parent on stdout as it is measured."""
    row = dict(section=section, item=item, status=status, result=result, detail=detail)
    print(ROW + json.dumps(row), flush=True)


def error_text(error: BaseException, limit: int = 200) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit] + " ..."


def with_prefix(value: float) -> str:
    """3.2e12 -> '3.20 T'."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value:.2f} "


def peak_fraction(elements_per_second: float, device_kind: str) -> str:
    for key, tflops in FP32_PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return (
                f"{elements_per_second * FLOP_PER_ELEMENT / (tflops * 1e12):.1%} of {tflops:g} TFLOP/s FP32"
            )
    return f"no FP32 peak known for {device_kind!r}"


def check_worker(plan: Plan, smoke: bool) -> None:
    """What kernel="auto" decides for each shape: autoselect.check of the Pallas kernels, for the op and for
    its interval bounds."""
    import functools

    from certjax.certify import interval as bounds
    from certjax.kernels import autoselect

    bounds_op = autoselect.bounds_op(bounds.lp_distance_bounds_with, bounds.lp_rounding_allowance)
    ops = (
        (autoselect.DISTANCE, autoselect.pallas_distance, ""),
        (bounds_op, autoselect.pallas_bounds, "bounds "),
    )
    for op, pallas, prefix in ops:
        candidate = functools.partial(pallas, interpret=smoke)
        for batch, size, out, masked in plan.check_shapes:
            signature = autoselect.Signature(
                (batch, size), (out, size), "float32", "float32", "float32" if masked else None, op=op.name
            )
            item = f"{prefix}{batch}x{size}x{out}{' masked' if masked else ''}"
            try:
                result = autoselect.check(op, candidate, signature)
            except Exception as error:  # the jnp reference itself failed
                emit("auto check", item, "FAIL", "jnp reference failed", error_text(error))
                continue
            emit_check(item, result)


def emit_check(item: str, result) -> None:
    if result.ok:
        detail = f"closest: {result.closest}; {result.seconds:.1f} s"
        emit("auto check", item, "PASS", "Pallas used", detail)
    else:
        emit("auto check", item, "FAIL", "falls back to jnp", result.reason)


def kernel_worker(plan: Plan, smoke: bool) -> None:
    """Pallas vs the XLA jnp path on the op alone (p traced: one compilation per path, shape and kind)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from timing import timed

    from certjax.certify.interval import lp_distance_bounds
    from certjax.kernels.linf_dist import lp_distance

    device_kind = jax.devices()[0].device_kind
    paths = (("Pallas (interpret)", "interpret") if smoke else ("Pallas", "pallas"), ("XLA jnp", "jnp"))
    for batch, size, out in plan.kernel_shapes:
        kx, kw, kg = jax.random.split(jax.random.key(0), 3)
        x, w = jax.random.normal(kx, (batch, size)), jax.random.normal(kw, (out, size))
        g = jax.random.normal(kg, (batch, out))
        elements = batch * size * out
        for name, kernel in paths:

            def forward(x, w, p, g, kernel=kernel):  # g unused: both kinds take the same arguments
                return lp_distance(x, w, p, kernel=kernel)

            def loss(x, w, p, g, kernel=kernel):
                return jnp.sum(g * lp_distance(x, w, p, kernel=kernel))

            kinds = {"forward": jax.jit(forward), "fwd+bwd": jax.jit(jax.grad(loss, (0, 1)))}
            for p in (INF, 8.0):
                for kind, fn in kinds.items():
                    item = f"{batch}x{size}x{out} p={p:g} {kind} {name}"
                    try:
                        seconds = timed(fn, x, w, np.float32(p), g, repeats=2 if smoke else 5)
                    except Exception as error:
                        emit("kernel", item, "FAIL", "", error_text(error))
                        continue
                    rate = elements / seconds
                    peak = peak_fraction(rate, device_kind)
                    emit(
                        "kernel",
                        item,
                        "ok",
                        f"{seconds * 1e3:.2f} ms",
                        f"{with_prefix(rate)}elements/s, {peak}",
                    )
        for name, kernel in paths:  # interval bounds of the layer, forward: both ends in one pass

            def bounds_forward(x, w, p, kernel=kernel):
                lower, upper = lp_distance_bounds(x - 0.1, x + 0.1, w, p, kernel=kernel)
                return lower, upper

            fn = jax.jit(bounds_forward)
            for p in (INF, 8.0):
                item = f"{batch}x{size}x{out} p={p:g} bounds forward {name}"
                try:
                    seconds = timed(fn, x, w, np.float32(p), repeats=2 if smoke else 5)
                except Exception as error:
                    emit("kernel", item, "FAIL", "", error_text(error))
                    continue
                rate = elements / seconds
                emit("kernel", item, "ok", f"{seconds * 1e3:.2f} ms", f"{with_prefix(rate)}elements/s")


def family_worker(plan: Plan, spec: str, smoke: bool) -> None:
    """img/s of Trainer.train_step at the config's size and batch, and the device's peak memory."""
    import jax
    import numpy as np

    from certjax.experiment import Experiment
    from certjax.kernels import autoselect
    from certjax.optim import schedules
    from certjax.train import Trainer

    name, _, variant = spec.partition(":")
    if smoke:
        variant = ",".join(part for part in (variant, "demo") if part)
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    config.data.real = "demo"  # gives Experiment its test split (class count); batches below are random
    if smoke:
        config.train.batch_size = 8
    batch_size = config.train.batch_size
    exp = Experiment(config, data="test")
    trainer = Trainer(exp)
    rng = np.random.default_rng(0)
    batch = exp.global_batch(
        {
            "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, exp.num_classes, (batch_size,), dtype=np.int32),
        }
    )
    start = time.perf_counter()
    state = exp.init_state()
    params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    item = f"configs/{name}.py:{variant} ({params / 1e6:.1f} M params), batch {batch_size}"
    total = exp.total_steps
    # a step in the l_p phase (if the family has one) and one at the end (p = inf)
    schedule_points = {}
    for step in (total // 2, total - 1):
        values = schedules.schedule_values(config, step, total)
        schedule_points.setdefault(values["p"], {k: np.float32(v) for k, v in values.items()})
    results, compile_seconds = [], None
    for p, schedule in schedule_points.items():
        state, metrics = trainer.train_step(state, batch, schedule)  # compiles once (p is traced)
        jax.block_until_ready(state)
        if compile_seconds is None:
            compile_seconds = time.perf_counter() - start
        begin = time.perf_counter()
        state, metrics = trainer.train_step(state, batch, schedule)
        jax.block_until_ready(state)
        # enough steps for measure_seconds, dispatched back to back as in training, synchronised once
        steps = max(3, int(plan.measure_seconds / max(time.perf_counter() - begin, 1e-6)))
        begin = time.perf_counter()
        for _ in range(steps):
            state, metrics = trainer.train_step(state, batch, schedule)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - begin
        loss = float(metrics.compute()["loss"])
        finite = "" if np.isfinite(loss) else " (loss not finite)"
        results.append(f"{batch_size * steps / seconds:,.0f} img/s at p={p:.3g}{finite}")
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    detail = [
        f"device peak {peak / 2**30:.2f} GiB" if peak is not None else "device peak n/a on this backend"
    ]
    decided = autoselect.decisions()
    if decided:  # the checks ran in this process: their buffers count in the device peak
        on_candidate = sum(result.ok for result in decided.values())
        detail[0] += " (auto's checks included)"
        detail.append(f"auto: {on_candidate} of {len(decided)} distance configurations on Pallas")
    try:  # what the step itself needs, from XLA's buffer assignment (the compilation is cached)
        memory = trainer.train_step.lower(state, batch, schedule).compile().memory_analysis()
        need = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        )
        detail.append(f"step {need / 2**30:.2f} GiB (XLA: arguments + outputs - donated + temporaries)")
    except Exception as error:  # memory_analysis is not on every backend / version
        detail.append(f"step memory n/a ({error_text(error, 80)})")
    detail.append(f"first step (init, checks, compile) {compile_seconds:.0f} s")
    emit("throughput", item, "ok", "; ".join(results), ", ".join(detail))


def worker(args) -> int:
    plan = SMOKE if args.force_cpu_smoke else FULL
    kind, _, spec = args.worker.partition(":")
    if kind == "check":
        check_worker(plan, args.force_cpu_smoke)
    elif kind == "kernel":
        kernel_worker(plan, args.force_cpu_smoke)
    elif kind == "family":
        family_worker(plan, spec, args.force_cpu_smoke)
    else:
        raise ValueError(f"--worker {args.worker!r}; valid: check, kernel, family:<config[:variant]>")
    return 0


# ----------------------------------------------------------------------------------------------- parent


def run_subprocess(command, timeout: float, section: str, item: str, env=None):
    """(rows the subprocess emitted, the CompletedProcess or None on timeout, a failure row or None)."""
    try:
        completed = subprocess.run(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=max(timeout, 1),
        )
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        rows = parse_rows(stdout)
        result = f"timed out after {timeout:.0f} s"
        return rows, None, dict(section=section, item=item, status="FAIL", result=result, detail="")
    rows = parse_rows(completed.stdout)
    failure = None
    if completed.returncode != 0:
        tail = [line for line in completed.stderr.strip().splitlines() if line.strip()][-1:] or [""]
        result = f"exit status {completed.returncode}"
        failure = dict(section=section, item=item, status="FAIL", result=result, detail=tail[0][:200])
    return rows, completed, failure


def parse_rows(stdout: str) -> list[dict]:
    return [json.loads(line[len(ROW) :]) for line in stdout.splitlines() if line.startswith(ROW)]


def pytest_counts(output: str) -> str:
    """'20 passed, 13 skipped' from pytest's summary line."""
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", output)
    return ", ".join(f"{n} {what}" for n, what in counts) or "no summary"


def tests_section(plan: Plan, timeout: float, smoke: bool) -> list[dict]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plan.pytest_args]
    item = "pytest " + " ".join(a if " " not in a else repr(a) for a in plan.pytest_args)
    env = dict(os.environ)
    if not smoke:  # tests/conftest.py defaults JAX_PLATFORMS to cpu, which would skip every GPU test
        env["JAX_PLATFORMS"] = "cuda,cpu"
    _, completed, failure = run_subprocess(command, timeout, "tests", item, env=env)
    if completed is None:
        return [failure]
    lines = completed.stdout.strip().splitlines()
    counts = pytest_counts(lines[-1] if lines else "")
    failed = [line.split(" ")[1] for line in lines if line.startswith(("FAILED", "ERROR"))][:3]
    detail = " ".join(failed)
    status = "PASS" if completed.returncode == 0 else "FAIL"
    if status == "PASS" and not smoke and "skipped" in counts:  # a GPU test that skips did not run
        status, detail = "FAIL", "tests skipped on a GPU machine: " + detail
    return [dict(section="tests", item=item, status=status, result=counts, detail=detail)]


def worker_section(worker_spec: str, smoke: bool, timeout: float, section: str, item: str) -> list[dict]:
    command = [sys.executable, os.path.abspath(__file__), f"--worker={worker_spec}"]
    if smoke:
        command.append("--force-cpu-smoke")
    rows, _, failure = run_subprocess(command, timeout, section, item)
    return rows + ([failure] if failure else [])


def table(rows: list[dict]) -> str:
    columns = ("section", "item", "status", "result", "detail")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force-cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    started = time.perf_counter()
    deadline = started + BUDGET_SECONDS
    # This process only looks at the device: without preallocation it leaves the GPU to the subprocesses,
    # which then allocate as a training run does.
    preallocate = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    backend = jax.default_backend()
    device = jax.devices()[0]
    if backend != "gpu" and not args.force_cpu_smoke:
        print(f"gpu_check: no GPU (JAX backend: {backend}, device: {device.device_kind}); nothing to check.")
        return 0
    if preallocate is None:
        del os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]
    else:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = preallocate
    smoke = args.force_cpu_smoke
    plan = SMOKE if smoke else FULL
    header = f"gpu_check: {jax.device_count()} x {device.device_kind} ({backend}), jax {jax.__version__}" + (
        " -- CPU SMOKE RUN (--force-cpu-smoke): tiny shapes, not measurements" if smoke else ""
    )
    print(header, file=sys.stderr, flush=True)

    def left() -> float:
        return deadline - time.perf_counter()

    sections = [("tests", None, plan.tests_seconds, "tests", "pytest")]
    sections.append(("check", "check", plan.check_seconds, "auto check", "paper shapes"))
    sections.append(("kernel", "kernel", plan.kernel_seconds, "kernel", "l_p-dist op"))
    sections += [
        ("family", f"family:{spec}", plan.family_seconds, "throughput", spec) for spec in plan.families
    ]
    rows = []
    for kind, worker_spec, seconds, section, item in sections:
        timeout = min(seconds, left())
        if timeout < max(plan.family_min_seconds if kind == "family" else 10, 1):
            new = [
                dict(section=section, item=item, status="skipped", result=f"time budget: {left():.0f} s left")
            ]
        elif kind == "tests":
            new = tests_section(plan, timeout, smoke)
        else:
            new = worker_section(worker_spec, smoke, timeout, section, item)
        for row in new:
            print(
                f"  {row['section']}: {row['item']}: {row['status']} {row['result']}",
                file=sys.stderr,
                flush=True,
            )
        rows += new
    print(header)
    print()
    print(table(rows))
    print()
    print(
        f"Whole run {time.perf_counter() - started:.0f} s (budget {BUDGET_SECONDS} s). Kernel elements/s: "
        f"B*I*O per second of the timed call; % of peak counts {FLOP_PER_ELEMENT} FLOP per element "
        "(sub, abs, max)."
    )
    return 1 if any(row["status"] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
