"""The `certjax` command (also `python -m certjax` and `python launch.py`, the same code): train, evaluate or
certify with a family's config file, list the families, print and check a resolved config.

  certjax --config=configs/linf_dist.py:demo --workdir=runs/demo --mode=train_and_evaluate
  certjax --config=configs/linf_dist.py --workdir=runs/linf --config.train.epochs=10
  certjax --workdir=runs/linf --mode=evaluate --checkpoint=best
  certjax --workdir=runs/linf --mode=certify --images=my_images.zip --out=certified.csv
  certjax list
  certjax config --config=configs/lot.py:S,cosine --config.train.epochs=10
  certjax check-labels --workdir=runs/linf --generated=/data/cifar10_edm_1m.npz --limit=20000

Training resumes from the latest checkpoint in --workdir and writes the resolved config to
<workdir>/config.json. Evaluation and certification read the config saved with the checkpoint (so --config
is not needed). absl / orbax INFO logging shows with --verbosity=1 only. Several processes (hosts) train one
model together when each is started with the same command plus --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or the CERTJAX_* environment variables), or with --distributed under a
cluster manager JAX detects: README, "Many devices, many hosts, and failures".

Every value a user passes is checked before anything runs (certjax/cli_checks.py, and
certjax/config_files.py for --config): bad input ends in ONE line `certjax: <kind> error: ...` naming the
fix, exit status 2, and nothing written. absl parses the flags (ml_collections' config_flags the
--config.KEY=VALUE overrides) into a FlagValues of certjax's own, made afresh per call, so `certjax config`
and a run resolve a config by the same parse, and `main` can be called more than once in one process.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import textwrap

from absl import app, flags
from ml_collections import config_flags

from certjax import config_files
from certjax.cli_checks import MODES, BadInput, check_checkpoint, check_config_arguments, check_run_arguments

# The commands (the keys) besides the modes, and what each does (the help prints them).
COMMANDS = {
    "list": "the families in configs/, their variants, what each is for and the published figures",
    "config": "print the config of --config=FILE[:VARIANTS] after its --config.KEY=VALUE overrides, as "
    "JSON, and check it",
    "check-labels": "score the labels of a generated .npz (--generated=FILE) with the model of a run trained "
    "on the real data (--workdir=RUN, --checkpoint; --limit=N random images, --batch_size=B, "
    "--min_label_agreement=F): agreement, per class, the best permutation; a JSON report to --out (default "
    "<FILE>.labels.json) that training reads; exit 1 when the labels fail",
}
HELP_FLAGS = frozenset({"--help", "-h", "-?", "--helpshort", "--helpfull"})
EXAMPLES = [line.strip() for line in __doc__.splitlines() if line.startswith("  certjax ")]


def one_line(message) -> str:
    """A (possibly multi-line) message as one line: a line ending in ':' runs on, the others join with ';'."""
    text = ""
    for line in str(message).splitlines():
        line = line.strip().removeprefix("- ").strip()
        if line:
            text += ("" if not text else " " if text.endswith(":") else "; ") + line
    return text


def report(kind: str, message) -> None:
    print(f"certjax: {kind} error: {one_line(message)}", file=sys.stderr, flush=True)


def _fail(kind: str, message) -> None:
    report(kind, message)
    sys.exit(2)


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise BadInput("usage", f"{name}={value!r} in the environment: must be an integer") from None


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    """certjax's flags, in `values` (the --config.* overrides are taken from `argv`)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file and variants, e.g. configs/linf_dist.py:demo (certjax list).",
        flag_values=values, lock_config=True, sys_argv=argv,
    )  # fmt: skip
    define = dict(flag_values=values)
    flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, TensorBoard events and results.", **define
    )
    flags.DEFINE_string("mode", "train", f"One of {', '.join(MODES)}.", **define)
    flags.DEFINE_string(
        "checkpoint", "best", "Which checkpoint to evaluate or certify with: best, last or a step.", **define
    )
    flags.DEFINE_string(
        "images", None, "--mode=certify: a folder or zip of images, an .npz or one image file.", **define
    )
    flags.DEFINE_string(
        "out", None, "--mode=certify: rows file, .jsonl or .csv (default <workdir>/certify/).", **define
    )
    flags.DEFINE_float(
        "eps", None, "--mode=certify: budget in pixel units (default the checkpoint's certify.eps).", **define
    )
    flags.DEFINE_bool(
        "skip-bad-images", False, "--mode=certify: skip unreadable images with a warning.", **define
    )
    flags.DEFINE_string(
        "labels",
        "names",
        "--mode=certify: how class folders are labelled: names (the model's dataset's class names), sorted "
        "(sorted folder names are labels 0, 1, ...) or a JSON file {folder: label}.",
        **define,
    )
    flags.DEFINE_bool(
        "distributed",
        False,
        "jax.distributed.initialize() with the cluster detected from the environment.",
        **define,
    )
    flags.DEFINE_string(
        "coordinator_address", os.environ.get("CERTJAX_COORDINATOR_ADDRESS", ""),
        "HOST:PORT of process 0 for a multi-process run (env CERTJAX_COORDINATOR_ADDRESS).", **define,
    )  # fmt: skip
    flags.DEFINE_integer(
        "num_processes", _environment_int("CERTJAX_NUM_PROCESSES", 0),
        "Processes in the run (env CERTJAX_NUM_PROCESSES).", **define,
    )  # fmt: skip
    flags.DEFINE_integer(
        "process_id", _environment_int("CERTJAX_PROCESS_ID", -1),
        "This process's index (env CERTJAX_PROCESS_ID).", **define,
    )  # fmt: skip


def parse_flags(argv: list[str]) -> tuple[flags.FlagValues, list[str]]:
    """(certjax's parsed flags, what they leave: argv[0] and absl's own flags such as --verbosity)."""
    check_config_arguments(argv[1:])
    values = flags.FlagValues()
    define_flags(values, argv)
    try:
        rest = values(argv, known_only=True)
    except flags.Error as error:
        name = re.match(r"flag --([\w.-]+)", str(error))
        hint = (
            f" (--{name.group(1)}: {values[name.group(1)].help})" if name and name.group(1) in values else ""
        )
        raise BadInput("usage", f"{error}{hint}") from None
    return values, rest


def parse_absl_flags(rest: list[str], values: flags.FlagValues) -> None:
    """absl's own flags (--verbosity, --logtostderr, ...) from what certjax's left; anything else is an
    unknown flag or a stray argument."""
    try:
        remaining = flags.FLAGS(rest)
    except flags.UnrecognizedFlagError as error:
        names = [*values, *flags.FLAGS]
        close = difflib.get_close_matches(error.flagname, names, n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        raise BadInput("usage", f"unknown flag --{error.flagname}{hint} (certjax --help)") from None
    except flags.Error as error:
        raise BadInput("usage", f"{error} (certjax --help)") from None
    if len(remaining) > 1:
        raise BadInput(
            "usage",
            f"unexpected argument(s) {' '.join(remaining[1:])}: the commands are {', '.join(COMMANDS)}, "
            "flags are --name=value (certjax --help)",
        )


# ----------------------------------------------------------------------------------------------- commands


def help_text() -> str:
    """`certjax --help`: usage, the modes and commands (from their registries), every flag, examples."""
    values = flags.FlagValues()
    define_flags(values, [])
    wrap = dict(width=110, initial_indent=" " * 26, subsequent_indent=" " * 26)

    def entry(name: str, text: str) -> str:
        body = textwrap.fill(text, **wrap)
        head = f"  {name}"
        return head + body[len(head) :] if len(head) < 25 else f"{head}\n{body}"

    seen, flag_lines = set(), []
    for name in values:
        flag = values[name]
        if id(flag) not in seen:
            seen.add(id(flag))
            default = "" if flag.default is None else f" (default {flag.default_as_str})"
            flag_lines.append(entry(f"--{flag.name}", f"{flag.help}{default}"))
    return "\n".join(
        [
            "usage: certjax --config=FILE[:VARIANTS] --workdir=DIR [--mode=MODE] [--config.KEY=VALUE ...]",
            "       certjax list",
            "       certjax config --config=FILE[:VARIANTS] [--config.KEY=VALUE ...]",
            textwrap.fill(CHECK_LABELS_USAGE, width=110, initial_indent=" " * 7, subsequent_indent=" " * 29),
            "(python -m certjax and python launch.py take the same arguments)",
            "",
            "Train, evaluate and certify certified-robust (Lipschitz) image classifiers.",
            "",
            "modes (--mode=MODE, default train):",
            *(entry(name, text) for name, text in MODES.items()),
            "",
            "commands:",
            *(entry(name, text) for name, text in COMMANDS.items()),
            "",
            "flags:",
            *flag_lines,
            entry(
                "--config.KEY=VALUE",
                "override one field of the config, e.g. --config.train.epochs=10 "
                "(certjax config prints every field)",
            ),
            entry("--verbosity=1", "show absl / orbax INFO logging (hidden by default)"),
            "",
            "examples:",
            *(f"  {line}" for line in EXAMPLES),
            "",
            textwrap.fill(
                'Bad input ends in one "certjax: <kind> error: ..." line and exit status 2, nothing written. '
                'More: README, "Command line"; several hosts: '
                'README, "Many devices, many hosts, and failures".',
                width=110,
            ),
        ]
    )


def list_command(args: list[str]) -> int:
    if args:
        raise BadInput("usage", f"certjax list takes no arguments (got {' '.join(args)})")
    folder = config_files.configs_folder()
    if folder is None:
        raise BadInput("config", "no configs/ folder here or beside certjax: run from the repository root")
    print(config_files.family_listing(folder))
    return 0


def config_command(argv: list[str]) -> int:
    """`certjax config --config=FILE[:VARIANTS] [overrides]`: the resolved config as JSON, if valid."""
    values, rest = parse_flags(argv)
    parse_absl_flags(rest, values)
    if values.config is None:
        raise BadInput("config", "certjax config needs --config=FILE[:VARIANTS], e.g. "
                       "--config=configs/lot.py:S,cosine (certjax list)")  # fmt: skip
    import jax  # after the arguments: a bad one is reported without starting jax

    from certjax.config_checks import check_config

    check_config(values.config, device_count=jax.device_count(), process_count=1)
    sys.stdout.write(config_files.resolved_config_json(values.config))
    print(f"certjax: config valid for {jax.device_count()} device(s)", file=sys.stderr)
    return 0


CHECK_LABELS_USAGE = (
    "certjax check-labels --workdir=RUN --generated=FILE.npz [--checkpoint=best|last|STEP] [--limit=N] "
    "[--batch_size=B] [--out=REPORT.json] [--min_label_agreement=F]"
)


def check_labels_flags(argv: list[str]) -> flags.FlagValues:
    """The flags of `certjax check-labels` (its own set: the run's flags mean nothing to it), parsed."""
    values = flags.FlagValues()
    define = dict(flag_values=values)
    flags.DEFINE_string("workdir", None, "the run whose model scores the labels", **define)
    flags.DEFINE_string("generated", None, "the generated .npz (image, label)", **define)
    flags.DEFINE_string("checkpoint", "best", "best, last or a step of --workdir", **define)
    flags.DEFINE_integer("limit", 0, "a fixed random subset of N images (0: all)", **define)
    flags.DEFINE_integer("batch_size", 0, "images per forward (0: the run's eval batch)", **define)
    flags.DEFINE_string("out", "", "the JSON report (default <FILE>.labels.json)", **define)
    flags.DEFINE_float("min_label_agreement", 0.5, "pass: agreement >= F x clean accuracy", **define)
    try:
        rest = values(argv, known_only=True)
    except flags.Error as error:
        raise BadInput("usage", f"{error} ({CHECK_LABELS_USAGE})") from None
    if len(rest) > 1:
        names = [f"--{name}" for name in values]
        close = difflib.get_close_matches(rest[1].split("=")[0], names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise BadInput(
            "usage", f"certjax check-labels: unknown argument {rest[1]}{hint}; {CHECK_LABELS_USAGE}"
        )
    return values


def check_labels_command(argv: list[str]) -> int:
    """`certjax check-labels ...` (certjax/label_check.py): 0 when the labels pass, 1 when they fail."""
    values = check_labels_flags(argv)
    if not values.workdir or not values.generated:
        raise BadInput("usage", f"certjax check-labels needs --workdir and --generated: {CHECK_LABELS_USAGE}")
    check_checkpoint(values.workdir, values.checkpoint, must_exist=True)
    if not os.path.isfile(values.generated):
        raise BadInput("data", f"--generated={values.generated}: no such file (a generated .npz)")
    if values.limit < 0 or values.batch_size < 0:
        raise BadInput("usage", "--limit and --batch_size must be >= 0 (0: all images, the run's batch)")
    if not 0.0 <= values.min_label_agreement <= 1.0:
        raise BadInput("usage", f"--min_label_agreement={values.min_label_agreement}: must be in [0, 1]")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines on restore
    from certjax import label_check
    from certjax.data.sources import DataError

    try:
        report = label_check.check_labels(values.workdir, values.generated, values.checkpoint, values.limit,
                                          values.batch_size, values.min_label_agreement)  # fmt: skip
        path = label_check.write_report(report, values.out)
    except DataError as error:
        raise BadInput("data", str(error)) from None
    print("\n".join(label_check.report_lines(report, path)), flush=True)
    return 0 if report["passed"] else 1


# ---------------------------------------------------------------------------------------------------- run


def quiet_logging() -> None:
    """absl (and so orbax) logs INFO by default: hundreds of lines per run. Show warnings and errors only,
    unless --verbosity=1 or more is given; certjax prints its own one line per checkpoint save / restore."""
    from absl import logging

    if flags.FLAGS.verbosity < 1:
        logging.set_verbosity(logging.WARNING)


def initialize_distributed(values: flags.FlagValues) -> None:
    """jax.distributed from the flags / environment; a no-op for a single process."""
    import jax

    if values.coordinator_address:
        if values.num_processes < 1 or not 0 <= values.process_id < values.num_processes:
            _fail(
                "config",
                f"--coordinator_address={values.coordinator_address} needs --num_processes >= 1 and "
                f"0 <= --process_id < --num_processes (got {values.num_processes}, {values.process_id})",
            )
        jax.distributed.initialize(
            values.coordinator_address, num_processes=values.num_processes, process_id=values.process_id
        )
    elif values.distributed:
        jax.distributed.initialize()


def run_mode(values: flags.FlagValues) -> None:
    """Train, evaluate or certify; an error of the data, the config or a checkpoint ends in one line."""
    quiet_logging()
    initialize_distributed(values)
    from certjax import evaluate, train
    from certjax.config_checks import ConfigError
    from certjax.data.sources import DataError

    mode = values.mode
    try:
        if mode == "certify":
            from certjax.inference.certify_files import certify_files

            certify_files(values.workdir, values.images, values.checkpoint, values.eps, values.out,
                          values["skip-bad-images"].value, values.labels)  # fmt: skip
            return
        if mode in ("train", "train_and_evaluate"):  # one mode: train, then the final record
            from certjax.run import train_then_evaluate

            train_then_evaluate(values.config, values.workdir, values.checkpoint)
        else:
            evaluate.evaluate_checkpoint(values.workdir, values.checkpoint)
    except DataError as error:  # bad or unreachable data: one clear message, no traceback
        _fail("data", error)
    except ConfigError as error:
        _fail("config", error)
    except FileNotFoundError as error:  # no checkpoint in the workdir to evaluate or certify with
        if mode == "train":
            raise
        _fail("checkpoint", error)
    except train.NonFiniteError as error:  # the message names the step and the checkpoint kept
        print(f"certjax: training stopped: {error}", file=sys.stderr)
        sys.exit(3)
    except ValueError as error:  # train_and_evaluate --checkpoint=<a step the run did not save>
        if not str(error).startswith("--checkpoint="):
            raise
        _fail("checkpoint", error)


def main(argv: list[str] | None = None) -> int:
    """The `certjax` command. Returns the exit status (0, or 2 for bad input) where no run starts; a run
    ends the process through absl's app.run (0, 2 for bad data / config / checkpoint, 3 for divergence)."""
    from certjax.config_checks import ConfigError

    argv = list(sys.argv if argv is None else argv)
    args = argv[1:]
    try:
        if not args or args[:1] == ["help"] or HELP_FLAGS.intersection(args):  # anywhere, as absl took them
            print(help_text())
            return 0
        if args[:1] == ["list"]:
            return list_command(args[1:])
        if args[:1] == ["config"]:
            return config_command(argv[:1] + args[1:])
        if args[:1] == ["check-labels"]:
            return check_labels_command(argv[:1] + args[1:])
        values, rest = parse_flags(argv)
        parse_absl_flags(rest, values)
        check_run_arguments(values)
    except BadInput as error:
        report(error.kind, error)
        return 2
    except ConfigError as error:
        report("config", error)
        return 2
    except BrokenPipeError:  # `certjax list | head`: the reader left; no traceback for what it did not read
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # absl's flags are parsed: app.run sets up its logging and runs the mode, then exits the process
    app.run(lambda _: run_mode(values), argv=argv[:1], flags_parser=lambda parsed: parsed)
    return 0
