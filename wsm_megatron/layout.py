"""Megatron-LM's checkpoint directory layout: ``ROOT/iter_0000100/`` and the tracker file.

``ROOT/latest_checkpointed_iteration.txt`` holds the newest complete iteration.
A ``torch_dist`` iteration directory holds ``.metadata`` (written last by DCP), ``__R_I.distcp``
shard files, ``common.pt`` and ``metadata.json``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from wsm_megatron.atomic import atomic_write_text

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
STOP_SAVE_FILENAME = "wsm_stop_save.json"
"""Marks a checkpoint saved on a stop request (a signal, the time budget), off the save interval:
resumed from like any other, but no member of a merge window and deleted by retention once a
newer checkpoint is complete."""
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iteration_dirname(iteration: int) -> str:
    """``iter_0000100`` for iteration 100, as Megatron-LM names it."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return f"iter_{iteration:07d}"


def parse_iteration_dirname(name: str) -> int | None:
    """The iteration of an ``iter_0000100``-style directory name; None for any other name."""
    match = _ITER_RE.match(name)
    return int(match.group(1)) if match else None


def iteration_dir(root: str | os.PathLike[str], iteration: int) -> Path:
    """The directory of ``iteration`` under checkpoint root ``root``."""
    return Path(root) / iteration_dirname(iteration)


def list_iterations(root: str | os.PathLike[str]) -> list[int]:
    """Iterations that have an ``iter_*`` directory under ``root``, ascending (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (parse_iteration_dirname(entry.name) for entry in root.iterdir() if entry.is_dir())
    return sorted(it for it in found if it is not None)


def is_complete(root: str | os.PathLike[str], iteration: int) -> bool:
    """Whether ``iter_<iteration>`` holds a finished save (DCP's ``.metadata`` and Megatron's
    ``metadata.json``, both written last; a re-save removes them first)."""
    path = iteration_dir(root, iteration)
    return (path / "metadata.json").is_file() and (path / ".metadata").is_file()


def is_stop_save(root: str | os.PathLike[str], iteration: int) -> bool:
    """Whether ``iter_<iteration>`` was saved on a stop request (see :data:`STOP_SAVE_FILENAME`)."""
    return (iteration_dir(root, iteration) / STOP_SAVE_FILENAME).is_file()


def read_tracker(root: str | os.PathLike[str]) -> int | None:
    """The iteration in ``ROOT/latest_checkpointed_iteration.txt``; None if there is no tracker."""
    path = Path(root) / TRACKER_FILENAME
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, found {text!r}") from None


def write_tracker(root: str | os.PathLike[str], iteration: int) -> None:
    """Atomically point the tracker file at ``iteration`` (temporary file, fsync, rename)."""
    atomic_write_text(Path(root) / TRACKER_FILENAME, f"{iteration}\n")
