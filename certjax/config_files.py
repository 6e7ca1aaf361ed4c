"""Config files as the command line meets them: `--config=FILE[:VARIANTS]`, the families in configs/, the
resolved config as JSON.

A config file is a Python module with `get_config(variants)` (ml_collections' convention, configs/common.py
`parse_variant`), and for a family in configs/ also `VARIANT_NOTES` (variant -> one line on what it is for;
its keys are the valid variants) and `PUBLISHED` (the published figures the recipe aims at). `certjax list`
prints those; `load_config_file` turns every way a `--config` value can be wrong (no such file, a file that
does not import, an unknown variant) into one ConfigError line naming the fix, before absl parses the flags
(ml_collections would raise from inside flag parsing, with a traceback).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import textwrap
from pathlib import Path

NOT_FAMILIES = frozenset({"__init__", "common"})  # configs/ modules that hold no family


def _config_error(message: str) -> Exception:
    from certjax.config_checks import ConfigError

    return ConfigError(message)


def make_importable(path: str) -> None:
    """Put the folder that holds the config's package on sys.path: the family configs import
    `configs.common`, and the `certjax` console script does not run from the repository (sys.path[0] is
    its bin folder), unlike `python launch.py` and `python -m certjax`."""
    folder = Path(path).resolve().parent
    root = str(folder.parent if (folder / "__init__.py").exists() else folder)
    if root not in sys.path:
        sys.path.insert(0, root)


def load_module(path: str):
    """The config module at `path`, executed from its file (not registered in sys.modules)."""
    make_importable(path)
    spec = importlib.util.spec_from_file_location(f"_certjax_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(spec: str):
    """`FILE[:VARIANTS]` -> (module, config), or ConfigError with one line naming the fix.

    Args:
      spec: the --config value, e.g. "configs/lot.py:S,cosine".
    Returns:
      (the config module, its get_config(VARIANTS), or get_config() where spec has no colon).
    """
    path, colon, variant = spec.partition(":")
    if not path:
        raise _config_error("--config is empty; e.g. --config=configs/linf_dist.py:demo (certjax list)")
    if not os.path.isfile(path):
        folder = Path(path).parent
        if not folder.is_dir() or folder == Path("."):
            folder = configs_folder()
        files = sorted(p.name for p in folder.glob("*.py") if p.stem not in NOT_FAMILIES) if folder else []
        found = f"; config files in {folder}: {', '.join(files)}" if files else ""
        raise _config_error(f"--config={spec}: no such file {path!r}{found} (certjax list)")
    try:
        module = load_module(path)
    except Exception as error:  # a syntax error or a failing import in the user's file: name it, one line
        raise _config_error(
            f"--config={spec}: {path} does not load ({type(error).__name__}: {error})"
        ) from None
    if not callable(getattr(module, "get_config", None)):
        raise _config_error(f"--config={spec}: {path} has no get_config(); a config file defines one")
    try:
        config = module.get_config(variant) if colon else module.get_config()  # as config_flags calls it
    except Exception as error:  # parse_variant's ValueError names the valid variants
        listing = ""
        if hasattr(module, "VARIANTS") and "valid" not in str(error):
            listing = f"; valid variants: {', '.join(sorted(module.VARIANTS))}"
        raise _config_error(f"--config={spec}: {error}{listing} (certjax list describes them)") from None
    return module, config


def configs_folder() -> Path | None:
    """./configs when it holds family configs, else the configs/ of the checkout certjax runs from."""
    for folder in (Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs"):
        if (folder / "common.py").is_file():
            return folder
    return None


def default_variant(module) -> str:
    """The variant get_config uses without one (its `arg` default), "" if none."""
    parameters = list(inspect.signature(module.get_config).parameters.values())
    default = parameters[0].default if parameters else ""
    return "" if default is inspect.Parameter.empty or default is None else str(default)


def families(folder: Path) -> dict[str, object]:
    """family (file stem) -> module, for every configs/<family>.py with get_config and VARIANTS."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem in NOT_FAMILIES:
            continue
        module = load_module(str(path))
        if callable(getattr(module, "get_config", None)) and hasattr(module, "VARIANTS"):
            found[path.stem] = module
    return found


def family_listing(folder: Path) -> str:
    """`certjax list`: per family its file, what it is (the docstring's first line), its variants with
    their notes (the default marked) and the published figures."""
    relative = os.path.relpath(folder)
    relative = str(folder) if relative.startswith("..") else relative  # the shorter, readable one
    lines = [
        f"Families in {relative}/ (use: certjax --config={relative}/<family>.py:<variant>[,<variant>...] "
        "--workdir=DIR; variants combine with commas):"
    ]
    for name, module in families(folder).items():
        summary = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
        lines += ["", textwrap.fill(f"{name}  ({relative}/{name}.py)  {summary}".rstrip(), width=110,
                                    subsequent_indent="    ")]  # fmt: skip
        notes = getattr(module, "VARIANT_NOTES", {})
        default = set(default_variant(module).split(","))
        width = max((len(v) for v in module.VARIANTS), default=0)
        for variant in [*notes, *sorted(set(module.VARIANTS) - set(notes))]:
            mark = " (default)" if variant in default else ""
            lines.append(f"  {variant:<{width}}  {notes.get(variant, '(no note)')}{mark}")
        published = f"published: {getattr(module, 'PUBLISHED', 'not recorded')}"
        lines.append(textwrap.fill(published, width=110, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)


def resolved_config_json(config) -> str:
    """The whole config (after every override) as readable JSON: `certjax config` prints it and every run
    writes it to <workdir>/config.json."""
    return json.dumps(config.to_dict(), indent=2, default=repr) + "\n"
