"""certjax command line: train or evaluate a model family from its config file.

  python launch.py --config=configs/linf_dist.py:demo --workdir=runs/demo
  python launch.py --config=configs/linf_dist.py --workdir=runs/linf --config.train.epochs=10
  python launch.py --config=configs/linf_dist.py --workdir=runs/linf --mode=evaluate --checkpoint=best
  python launch.py --workdir=runs/linf --mode=certify --images=my_images.zip --out=certified.csv

Training resumes from the latest checkpoint in --workdir and ends with the evaluation record of --checkpoint
in <workdir>/results.jsonl; the same command on a finished run says so and does nothing. Evaluation and
certification read the config saved with the checkpoint (so --config is not needed). absl / orbax INFO
logging shows with --verbosity=1 only.

Several processes (hosts) train one model together when each is started with the same command plus
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the CERTJAX_COORDINATOR_ADDRESS /
CERTJAX_NUM_PROCESSES / CERTJAX_PROCESS_ID environment variables), or with --distributed under a cluster
manager JAX detects (SLURM, Open MPI, Kubernetes): README, "Running on a cluster".
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/linf_dist.py:demo", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and results.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "train_and_evaluate", "certify"],
    "train (then a final evaluation record of --checkpoint; train_and_evaluate is the same), evaluate a "
    "saved checkpoint, or certify --images with it.",
)
flags.DEFINE_string(
    "checkpoint", "best", "Which checkpoint to evaluate or certify with: best, last or a step."
)
flags.DEFINE_string("images", None, "--mode=certify: a folder or zip of images, an .npz or one image file.")
flags.DEFINE_string("out", None, "--mode=certify: rows file, .jsonl or .csv (default <workdir>/certify/).")
flags.DEFINE_float(
    "eps", None, "--mode=certify: budget in pixel units (default the checkpoint's certify.eps)."
)
flags.DEFINE_bool("skip-bad-images", False, "--mode=certify: skip unreadable images with a warning.")
flags.DEFINE_bool(
    "distributed", False, "jax.distributed.initialize() with the cluster detected from the environment."
)
flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("CERTJAX_COORDINATOR_ADDRESS", ""),
    "HOST:PORT of process 0 for a multi-process run (env CERTJAX_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer(
    "num_processes", int(os.environ.get("CERTJAX_NUM_PROCESSES", "0")), "Processes in the run."
)
flags.DEFINE_integer("process_id", int(os.environ.get("CERTJAX_PROCESS_ID", "-1")), "This process's index.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def _fail(kind: str, message: str) -> None:
    print(f"certjax: {kind} error: {message}", file=sys.stderr)
    sys.exit(2)


def check_override_keys(argv: list[str]) -> None:
    """Unknown `--config.a.b=v` keys, named with the nearest valid key, before absl parses the flags
    (ml_collections would raise from inside flag parsing, with a traceback)."""
    from certjax.config_checks import unknown_key_errors

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:  # "--config PATH"
        spec = argv[argv.index("--config") + 1]
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if spec is None or not overrides:
        return
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        _fail("config", f"--config={spec}: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_certjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    errors = unknown_key_errors(overrides, config, spec)
    if errors:
        _fail("config", "\n".join(f"--config.{e}" for e in errors))


def quiet_logging() -> None:
    """absl (and so orbax) logs INFO by default: hundreds of lines per run. Show warnings and errors only,
    unless --verbosity=1 or more is given; certjax prints its own one line per checkpoint save / restore."""
    from absl import logging

    if FLAGS.verbosity < 1:
        logging.set_verbosity(logging.WARNING)


def initialize_distributed() -> None:
    """jax.distributed from the flags / environment; a no-op for a single process."""
    import jax

    if FLAGS.coordinator_address:
        if FLAGS.num_processes < 1 or not 0 <= FLAGS.process_id < FLAGS.num_processes:
            _fail(
                "config",
                f"--coordinator_address={FLAGS.coordinator_address} needs --num_processes >= 1 and "
                f"0 <= --process_id < --num_processes (got {FLAGS.num_processes}, {FLAGS.process_id})",
            )
        jax.distributed.initialize(
            FLAGS.coordinator_address, num_processes=FLAGS.num_processes, process_id=FLAGS.process_id
        )
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    quiet_logging()
    if FLAGS.mode in ("train", "train_and_evaluate") and FLAGS.config is None:
        _fail("config", f"--mode={FLAGS.mode} needs --config, e.g. --config=configs/linf_dist.py:demo")
    if FLAGS.mode == "certify" and not FLAGS.images:
        _fail("config", "--mode=certify needs --images=PATH (a folder or zip of images, an .npz or an image)")
    initialize_distributed()
    from certjax import evaluate, train
    from certjax.config_checks import ConfigError
    from certjax.data.sources import DataError

    try:
        if FLAGS.mode == "certify":
            from certjax.inference.certify_files import certify_files

            certify_files(
                FLAGS.workdir,
                FLAGS.images,
                FLAGS.checkpoint,
                FLAGS.eps,
                FLAGS.out,
                FLAGS["skip-bad-images"].value,
            )
            return
        if FLAGS.mode in ("train", "train_and_evaluate"):  # one mode: train, then the final record
            from certjax.run import train_then_evaluate

            train_then_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
        else:
            evaluate.evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint)
    except DataError as error:  # bad or unreachable data: one clear message, no traceback
        _fail("data", str(error))
    except ConfigError as error:
        _fail("config", str(error))
    except FileNotFoundError as error:  # no checkpoint in the workdir to evaluate or certify with
        if FLAGS.mode == "train":
            raise
        _fail("checkpoint", str(error))
    except train.NonFiniteError as error:  # the message names the step and the checkpoint kept
        print(f"certjax: training stopped: {error}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    check_override_keys(sys.argv[1:])
    app.run(main)
