"""Labels of class folders, never guessed (issue 22, point 3).

A folder (or zip) of class folders is labelled by the dataset's class names (`DatasetInfo.class_names`,
certjax/data/sources/registry.py): CIFAR-10's folders are its ten names in CIFAR-10's order, CIFAR-100's its
hundred fine-label names in their (alphabetical) order. Folders with other names are an error that lists what
was found, unless the user says how to map them:

- ``"sorted"``: the sorted folder names are labels 0, 1, 2, ... (what a folder of folders means to
  torchvision's ImageFolder);
- a path to a JSON file ``{"<folder>": <label>}``, each label an integer index or one of the dataset's class
  names.

The policy is `config.data.labels` for training and evaluation data, `--labels` for `--mode=certify`.
"""

from __future__ import annotations

import json
from pathlib import Path

from certjax.data.sources.base import DataError

LABEL_POLICIES = ("names", "sorted")  # or the path of a JSON mapping file
FIX = (
    "pass --labels=sorted (sorted folder names are labels 0, 1, ...) or --labels=FILE.json ({folder: label})"
)


def _listed(names, limit: int = 12) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _from_file(path: Path, folders, class_names, num_classes: int, where: str) -> dict[str, int]:
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"labels file {path}: cannot read it as JSON ({error})") from error
    if not isinstance(mapping, dict):
        raise DataError(
            f"labels file {path}: expected a JSON object {{folder: label}}, got {type(mapping).__name__}"
        )
    missing = sorted(set(folders) - set(mapping))
    if missing:
        raise DataError(f"{where}: class folders missing from the labels file {path}: {_listed(missing)}")
    labels = {}
    for folder in folders:
        value = mapping[folder]
        if isinstance(value, str) and class_names and value in class_names:
            labels[folder] = class_names.index(value)
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_classes:
            labels[folder] = value
        else:
            raise DataError(
                f"labels file {path}: {folder!r} -> {value!r} is no label: use an integer in "
                f"[0, {num_classes})" + (" or a class name of the dataset" if class_names else "")
            )
    return labels


def folder_labels(folders, class_names, num_classes: int, policy: str = "names", where: str = "") -> dict:
    """The label of every class folder, by `policy`; a DataError naming the fix when it cannot be known.

    Args:
      folders: the class folder names found. class_names: the dataset's class names in label order (None:
        the dataset declares none). num_classes: labels lie in [0, num_classes). policy: "names",
        "sorted" or the path of a JSON mapping file (module docstring). where: the data, for messages.

    Returns:
      {folder: label}.
    """
    folders = sorted(folders)
    class_names = list(class_names) if class_names else None
    if policy == "sorted":
        if len(folders) > num_classes:
            raise DataError(f"{where}: {len(folders)} class folders, more than the {num_classes} classes")
        return {folder: label for label, folder in enumerate(folders)}
    if policy != "names":
        path = Path(policy).expanduser()
        if not path.is_file():
            raise DataError(f"--labels={policy}: neither 'names', 'sorted' nor a JSON file that exists")
        return _from_file(path, folders, class_names, num_classes, where)
    if class_names is None:
        raise DataError(f"{where}: this dataset declares no class names to label folders by: {FIX}")
    unknown = [folder for folder in folders if folder not in class_names]
    if unknown:
        raise DataError(
            f"{where}: class folders {_listed(unknown)} are not the dataset's class names "
            f"({_listed(class_names, 10)}): rename them, or {FIX}"
        )
    return {folder: class_names.index(folder) for folder in folders}
