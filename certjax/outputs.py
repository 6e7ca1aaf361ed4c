"""What certjax writes for a user: whole files or nothing, with the permissions the user's umask gives.

`atomic_write_bytes` writes a file under a temporary name in the same folder and renames it over the target,
so a reader (or a process killed mid-write) never sees half a file. `tempfile.mkstemp` creates that temporary
file with mode 0600 whatever the umask is, so before the rename it gets the mode a plain `open(path, "w")`
would have given it (0o666 & ~umask): results, radii, certify rows and audit reports are then readable by
whoever may read the user's other files. `publish_mode` does the same for other temporary files (the
extracted generated images).

`append_record` keeps `<workdir>/results.jsonl`: one JSON record per evaluation, where an evaluation is a
(checkpoint kind, step) pair (`record_key`; certjax.analysis.records reads the file with the same key).
Evaluating the same checkpoint again replaces its record instead of adding a second copy.
"""

from __future__ import annotations

import json
import os
import tempfile


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status); elsewhere
    os.umask is the only way to read it (set and restored at once)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: str, directory: bool = False) -> None:
    """Give a file made by tempfile (mode 0600, or 0700 for a folder) the mode the umask gives new ones."""
    try:
        os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
    except OSError:  # a file system without modes (vfat, some network mounts): keep what it gives
        pass


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write `payload` to `path` whole or not at all (temporary file, fsync, rename), with the umask's mode.

    Args:
      path: the file to (re)write; its folder is created if missing.
      payload: the file's new contents.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def record_key(record: dict) -> tuple | None:
    """The evaluation a results record is of: (checkpoint kind, step); None for a record without a step."""
    if not isinstance(record, dict) or "step" not in record:
        return None
    return (str(record.get("checkpoint", "best")), record["step"])


def append_record(path: str, record: dict) -> None:
    """Add `record` as the last line of the JSON Lines file `path`, dropping an earlier record of the same
    evaluation (record_key); the file is rewritten whole (atomic_write_bytes). Lines that are not JSON and
    records without a step are kept as they are.

    Args:
      path: the results file (created if missing).
      record: a JSON-serialisable dict.
    """
    new_line = json.dumps(record, sort_keys=True) + "\n"  # first: an unserialisable record changes nothing
    key = record_key(record)
    kept = []
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f.read().splitlines(keepends=True):
                if key is not None and _line_key(line) == key:
                    continue
                kept.append(line if line.endswith(b"\n") else line + b"\n")
    atomic_write_bytes(path, b"".join(kept) + new_line.encode())


def _line_key(line: bytes) -> tuple | None:
    try:
        return record_key(json.loads(line))
    except ValueError:  # not JSON (a damaged line): kept, never matched
        return None
