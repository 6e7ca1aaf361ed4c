"""What a user passes to the `certjax` command (certjax/cli.py), checked before anything runs: the mode, the
workdir, the checkpoint, the images and eps, and the --config file with its --config.KEY=VALUE overrides.

Each problem is a BadInput (kind: usage, config, checkpoint or data; the message names the fix) that the
command prints as one `certjax: <kind> error: ...` line with exit status 2. The checks read the file system
only (a workdir's checkpoints/ listing, the --images path) and load the config file
(certjax/config_files.py), so a bad value never gets as far as creating a workdir, importing jax or
compiling anything.
"""

from __future__ import annotations

import difflib
import math
import os
import re

from absl import flags

from certjax import config_files

# The valid --mode values (the keys) and what each does (the help prints them).
MODES = {
    "train": "train (needs --config), resuming from the latest checkpoint in --workdir, then evaluate "
    "--checkpoint (its record in <workdir>/results.jsonl); checkpoints, TensorBoard events and config.json "
    "go to --workdir; on a finished run it says so and does nothing",
    "evaluate": "evaluate --checkpoint of --workdir on the test set: prints clean and certified accuracy, "
    "appends a record to <workdir>/results.jsonl",
    "train_and_evaluate": "the same as train",
    "certify": "certify --images with --checkpoint of --workdir: one row per image to --out",
}
CHECKPOINT_NAMES = ("best", "last")


class BadInput(Exception):
    """A value the user passed cannot work: `kind` (usage, config, checkpoint, data) and the fix."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# The parsers config_flags applies to a field of each type (its _FIELD_TYPE_TO_PARSER), and what they take.
VALUE_PARSERS = {
    bool: (flags.BooleanParser(), "true or false"),
    int: (flags.IntegerParser(), "an integer"),
    float: (flags.FloatParser(), "a number"),
}
OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.S)


def config_arguments(args: list[str]) -> tuple[int, str | None, list[tuple[int, str, str | None]]]:
    """(index of --config, its value, [(index, key, value or None)] of the --config.KEY=VALUE overrides)."""
    index, spec, overrides = -1, None, []
    for i, arg in enumerate(args):
        if arg.startswith(("--config=", "-config=")):
            index, spec = i, arg.split("=", 1)[1]
        elif arg in ("--config", "-config") and i + 1 < len(args):
            index, spec = i, args[i + 1]
        elif match := OVERRIDE.match(arg):
            overrides.append((i, match.group(1), match.group(2)))
    return index, spec, overrides


def _field(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def override_value_errors(overrides, config, spec: str) -> list[str]:
    """One message per --config.KEY=VALUE whose VALUE the field's type does not take (absl would stop
    inside flag parsing with a FATAL line and exit status 1)."""
    errors = []
    for _, key, value in overrides:
        try:
            current = _field(config, key)
        except (KeyError, AttributeError, TypeError):
            continue  # an unknown key: reported by unknown_key_errors
        if value is None or type(current) not in VALUE_PARSERS:
            continue
        parser, what = VALUE_PARSERS[type(current)]
        try:
            parser.parse(value)
        except (ValueError, TypeError):
            errors.append(
                f"--config.{key}={value}: {key} takes {what} ({current!r} in {spec}), "
                f"e.g. --config.{key}={current!r}"
            )
    return errors


def check_config_arguments(args: list[str]) -> None:
    """--config FILE[:VARIANTS] and its overrides: the file, the variants, every override's key and value."""
    from certjax.config_checks import ConfigError, unknown_key_errors

    index, spec, overrides = config_arguments(args)
    if overrides and spec is None:
        key = overrides[0][1]
        raise BadInput("config", f"--config.{key} needs --config=FILE[:VARIANTS] before it (certjax list)")
    if spec is None:
        return
    early = [f"--config.{key}" for i, key, _ in overrides if i < index]
    if early:
        raise BadInput("config", f"{', '.join(early)} before --config={spec}: put the overrides after it")
    _, config = config_files.load_config_file(spec)
    errors = [f"--config.{e}" for e in unknown_key_errors([key for _, key, _ in overrides], config, spec)]
    errors += override_value_errors(overrides, config, spec)
    if errors:
        raise ConfigError("\n".join(errors))


def saved_steps(workdir: str) -> list[int]:
    """The finalised checkpoint steps in <workdir>/checkpoints (orbax renames a finished save to its step;
    an unfinished one keeps a temporary name)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def check_checkpoint(workdir: str, which: str, must_exist: bool) -> None:
    """--checkpoint names best, last or a saved step (any step for a run still to train)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if which not in CHECKPOINT_NAMES and not which.isdigit():
        raise BadInput("checkpoint", f"--checkpoint={which}: use best, last or a step number")
    if not must_exist:
        return
    steps = saved_steps(workdir)
    if not steps:
        raise BadInput(
            "checkpoint",
            f"no checkpoints in {directory}: pass the --workdir of a trained run "
            "(certjax --mode=train writes them there)",
        )
    if which.isdigit() and int(which) not in steps:
        raise BadInput(
            "checkpoint",
            f"--checkpoint={which}: no such step in {directory}; use best, last or a saved step: "
            f"{', '.join(map(str, steps))}",
        )


def check_run_arguments(values: flags.FlagValues) -> None:
    """Everything a run needs, checked before anything is imported, read or written."""
    mode = values.mode
    if mode not in MODES:
        close = difflib.get_close_matches(mode, MODES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        modes = ", ".join(MODES)
        raise BadInput("usage", f"--mode={mode}: use one of {modes}{hint} (certjax --help)")
    if not values.workdir:
        raise BadInput(
            "usage", f"--mode={mode} needs --workdir=DIR, e.g. --workdir=runs/demo (certjax --help)"
        )
    if os.path.exists(values.workdir) and not os.path.isdir(values.workdir):
        raise BadInput("usage", f"--workdir={values.workdir} is a file; pass a directory")
    training = mode in ("train", "train_and_evaluate")
    if training and values.config is None:
        raise BadInput("config", f"--mode={mode} needs --config, e.g. --config=configs/linf_dist.py:demo "
                       "(certjax list shows the families)")  # fmt: skip
    check_checkpoint(values.workdir, values.checkpoint, must_exist=not training)
    if mode == "certify":
        if not values.images:
            raise BadInput(
                "config",
                "--mode=certify needs --images=PATH (a folder or zip of images, an .npz or an image)",
            )
        if not os.path.exists(values.images):
            raise BadInput("data", f"--images={values.images}: no such file or folder")
        eps = values.eps
        if eps is not None and (not math.isfinite(eps) or eps < 0):
            raise BadInput(
                "config", f"--eps={eps}: the budget must be a number >= 0 (pixel units, e.g. 36/255 = 0.1412)"
            )
