"""certjax command line: train or evaluate a model family from its config file.

  python launch.py --config=configs/linf_dist.py:demo --workdir=runs/demo
  python launch.py --config=configs/linf_dist.py --workdir=runs/linf --config.train.epochs=10
  python launch.py --config=configs/linf_dist.py --workdir=runs/linf --mode=evaluate --checkpoint=best

Training resumes from the latest checkpoint in --workdir. Evaluation reads the config saved with the
checkpoint (so --config only needs to name the file).
"""

from __future__ import annotations

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
    ["train", "evaluate", "train_and_evaluate"],
    "train (then a final evaluation record), or evaluate a saved checkpoint.",
)
flags.DEFINE_string("checkpoint", "best", "Which checkpoint to evaluate: best, last or a step.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from certjax import evaluate, train
    from certjax.data.sources import DataError

    try:
        if FLAGS.mode in ("train", "train_and_evaluate"):
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        if FLAGS.mode in ("evaluate", "train_and_evaluate"):
            evaluate.evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint)
    except DataError as error:  # bad or unreachable data: one clear message, no traceback
        print(f"certjax: data error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
