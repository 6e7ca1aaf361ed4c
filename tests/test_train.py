"""The trainer end to end: one compilation, bit-exact resume after SIGKILL, launch.py train + evaluate."""

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from certjax.optim import schedules
from tests.conftest import REPO, launch_command, launch_env

TINY = [
    "--config.model.depth=3",
    "--config.model.width=32",
    "--config.train.batch_size=64",
    "--config.data.real_subset=256",
    "--config.train.eval_batch_size=250",
    "--config.train.log_every_steps=1000",
]


def _launch(workdir, *extra, mode="train"):
    return launch_command("configs/linf_dist.py:demo", workdir, *TINY, *extra, mode=mode)


def _final_params(workdir):
    directory = Path(workdir) / "checkpoints"
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    restored = ocp.StandardCheckpointer().restore(directory / str(step) / "state")
    return step, restored


def test_train_step_compiles_once_across_steps_and_schedule_changes():
    from certjax.experiment import Experiment
    from certjax.train import Trainer
    from configs.linf_dist import get_config

    config = get_config("demo")
    config.model.depth, config.model.width = 3, 16
    config.train.batch_size, config.train.epochs = 32, 1
    config.data.real_subset = 32 * 6
    config.p_schedule.start_fraction, config.p_schedule.end_fraction = 0.2, 0.7
    exp = Experiment(config)
    trainer = Trainer(exp)
    state = exp.init_state()
    ps = set()
    for step, batch in zip(range(exp.total_steps), exp.batches.iterate(0, exp.total_steps)):
        values = schedules.schedule_values(config, step, exp.total_steps)
        ps.add(values["p"])
        state, _ = trainer.train_step(state, batch, {k: np.float32(v) for k, v in values.items()})
    assert len(ps) >= 4 and np.inf in ps  # p really changed, through the l_p phase to inf
    assert trainer.train_step._cache_size() == 1


def resume_after_sigkill_matches(tmp_path, command, kill_from_step: int, final_step: int):
    """Run `command(workdir)` straight through, and again SIGKILLed once a checkpoint at step >=
    kill_from_step is committed, then resumed: every leaf of the two final checkpoints must be bitwise equal
    (params, model state, optimiser state, step, rng). Returns the final restored state."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    quiet = dict(env=launch_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(command(straight), check=True, **quiet)

    proc = subprocess.Popen(command(killed), **quiet)
    ckpt_dir = killed / "checkpoints"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        done = (
            [p for p in ckpt_dir.glob("*") if p.name.isdigit() and (p / "commit_success.txt").exists()]
            if ckpt_dir.exists()
            else []
        )
        if done and max(int(p.name) for p in done) >= kill_from_step:
            proc.send_signal(signal.SIGKILL)
            killed_at = max(int(p.name) for p in done)
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, "the run ended before it could be killed: make it longer"
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < final_step

    subprocess.run(command(killed), check=True, **quiet)
    step_a, state_a = _final_params(straight)
    step_b, state_b = _final_params(killed)
    assert step_a == step_b == final_step
    leaves_a = jax.tree_util.tree_leaves_with_path(state_a)
    leaves_b = jax.tree_util.tree_leaves_with_path(state_b)
    assert [k for k, _ in leaves_a] == [k for k, _ in leaves_b]
    for (path, a), (_, b) in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    return state_a


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    args = ["--config.train.epochs=12", "--config.checkpoint.every_epochs=1"]
    # >= 4 epochs done, 8 to go
    resume_after_sigkill_matches(tmp_path, lambda workdir: _launch(workdir, *args), 16, 12 * 4)


def test_resume_after_sigkill_of_liresnet_pp_is_bit_exact(tmp_path):
    """LiResNet++ (configs/liresnet_pp.py:demo at width 8) with its whole recipe: NAdam inside Lookahead
    (k = 3 here, and a sync at every epoch end), exact EMMA, the centred blocks' running means, half of
    every batch from a generated-format .npz with real-pass epochs (32 real of 64: 8 steps per epoch, so
    the checkpoints at steps 8 and 16 land at other phases of the k-cycle), RandAugment on the real rows
    and pad 2 on the generated ones. The slow weights and the step counter live in the optimiser state,
    the running means in the model state and the augmentation is a function of (seed, step): a resumed
    run is bitwise the uninterrupted one."""
    rng = np.random.default_rng(0)
    npz = tmp_path / "generated.npz"
    images = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    np.savez(npz, image=images, label=rng.integers(0, 10, 512))
    args = [
        f"--config.data.generated={npz}", "--config.data.real_fraction=0.5",
        "--config.optimizer.lookahead.k=3", "--config.model.width=8", "--config.model.neck_features=32",
        "--config.model.eval_power_iterations=20", "--config.optimizer.warmup_epochs=1",
        "--config.certify.eps=0.02", "--config.train.epochs=3", "--config.train.batch_size=64",
        "--config.data.real_subset=256", "--config.train.eval_batch_size=100",
        "--config.train.eval_subset=100", "--config.checkpoint.every_epochs=1",
        "--config.train.log_every_steps=1000",
    ]  # fmt: skip

    def command(workdir):
        return launch_command("configs/liresnet_pp.py:demo", workdir, *args)

    state = resume_after_sigkill_matches(tmp_path, command, 8, 3 * 8)  # killed after >= 1 of 3 epochs
    opt_state = state["opt_state"]
    # the checkpoint holds the slow weights (equal to the fast ones right after the epoch-end sync) and the
    # optimiser's own step counter
    assert int(opt_state["count"]) == 3 * 8
    leaves_slow, leaves_params = jax.tree.leaves(opt_state["slow"]), jax.tree.leaves(state["params"])
    assert len(leaves_slow) == len(leaves_params) > 0
    for a, b in zip(leaves_slow, leaves_params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("generated", [False, True])
def test_launch_trains_and_evaluates_on_real_images(tmp_path, generated):
    extra = ["--config.train.epochs=3"]
    if generated:  # real .npz of the EDM format, memory-mapped; 70 % of every batch
        rng = np.random.default_rng(0)
        npz = tmp_path / "gen.npz"
        np.savez(
            npz,
            image=rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8),
            label=rng.integers(0, 10, 500),
        )
        extra += [f"--config.data.generated={npz}", "--config.data.real_fraction=0.3"]
    workdir = tmp_path / "run"
    result = subprocess.run(
        _launch(workdir, *extra, mode="train_and_evaluate"),
        env=launch_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "img/s" in out and "ETA" in out
    assert "test clean" in out and "certified" in out
    # quiet: no absl / orbax INFO lines; the header, one line per epoch, one per checkpoint save / restore and
    # the result
    assert not [line for line in result.stderr.splitlines() if line.startswith("I")], result.stderr[:2000]
    lines = out.splitlines()
    assert sum(line.startswith("epoch") for line in lines) == 3
    assert sum(line.startswith("checkpoint: ") for line in lines) == 2  # the final save, evaluation's restore
    assert len(lines) <= 12, out
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    for key in (
        "family",
        "variant",
        "dataset",
        "aux_amount",
        "real_fraction",
        "epochs",
        "seed",
        "clean_accuracy",
        "certified_accuracy",
        "train_clean_accuracy",
        "best_epoch",
        "last_epoch",
        "radii_path",
    ):
        assert key in record, key
    assert record["num_test"] == 1000
    assert 0.0 <= record["certified_accuracy"] <= record["clean_accuracy"] <= 1.0
    assert record["aux_amount"] == (500 if generated else 0)
    assert record["last_epoch"] == 3
    radii = np.load(record["radii_path"])
    assert radii["certified_radius"].shape == (1000,)
    # the margin radius proves the margin certificates; with certify.method "both" (the l_inf default) a
    # point is certified by the margin or by interval bounds
    assert np.all(radii["certified_radius"][radii["certified_margin"]] > record["eps"])
    np.testing.assert_array_equal(radii["certified"], radii["certified_margin"] | radii["certified_ibp"])
    assert record["certified_accuracy"] == pytest.approx(radii["certified"].mean())
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    # evaluating again appends a second record and leaves the first intact
    again = subprocess.run(
        _launch(workdir, "--checkpoint=last", mode="evaluate"),
        env=launch_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    lines = (workdir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == record


def test_bad_data_stops_with_one_clear_message(tmp_path):
    missing = tmp_path / "nowhere-{split}.zip"
    result = subprocess.run(
        _launch(tmp_path / "run", f"--config.data.real={missing}"), env=launch_env(), cwd=REPO,
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "certjax: data error:" in result.stderr and "nowhere-test.zip" in result.stderr
    assert "Traceback" not in result.stderr
