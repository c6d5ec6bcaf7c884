"""Which checkpoints a WSM run keeps: the newest ones its merge window needs, plus a record.

Pruning runs on one rank after the tracker file points at a new checkpoint, on a background
thread (:class:`BackgroundPruner`), so no save waits while old checkpoints are deleted. It only
ever removes iterations older than the tracker's (so never the checkpoint being written, nor the
one a restart would resume from), keeps the newest ``keep_last`` complete ones and every
complete iteration that is a multiple of ``keep_every``, and removes incomplete folders older
than the tracker (what killed saves left) and the saves made on a stop request once a newer
checkpoint is complete (they exist to resume from, off the save interval). A checkpoint is
first renamed out of the ``iter_*`` namespace, then deleted: a half-deleted folder never looks
like a checkpoint. A failed delete is a warning, never an error.

A reader beside the run (``wsm-watch``) *pins* the iterations it still needs: a JSON file
``ROOT/.wsm-pins/OWNER.json`` (``{"iterations": [...]}``, written atomically) that retention
reads before every prune and never deletes from; the reader rewrites it as its needs move and
removes it when done. A pinned iteration is kept on top of ``keep_last``. A pin a reader left
behind (killed for good) is removed by hand: ``rm ROOT/.wsm-pins/OWNER.json``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
from collections.abc import Collection
from pathlib import Path

from wsm_megatron.atomic import atomic_write_text
from wsm_megatron.layout import (
    is_complete,
    is_stop_save,
    iteration_dir,
    list_iterations,
    read_tracker,
)

DELETING_PREFIX = ".deleting-"
PINS_DIRNAME = ".wsm-pins"


def pin_path(root: str | Path, owner: str) -> Path:
    """Where ``owner``'s pin of checkpoints under ``root`` lives."""
    return Path(root) / PINS_DIRNAME / f"{owner}.json"


def write_pin(root: str | Path, owner: str, iterations: Collection[int]) -> None:
    """Pin ``iterations`` under ``root`` for ``owner`` (replacing its earlier pin)."""
    data = {"iterations": sorted(set(iterations)), "pid": os.getpid()}
    atomic_write_text(pin_path(root, owner), json.dumps(data) + "\n")


def release_pin(root: str | Path, owner: str) -> None:
    """Remove ``owner``'s pin (nothing when there is none)."""
    pin_path(root, owner).unlink(missing_ok=True)


def pinned_iterations(root: str | Path) -> set[int]:
    """Every iteration some reader pins under ``root``. A pin that does not parse (a foreign
    file) is a warning and pins nothing; pins are written atomically, so none is torn."""
    pinned: set[int] = set()
    folder = Path(root) / PINS_DIRNAME
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            pinned |= {int(it) for it in json.loads(path.read_text())["iterations"]}
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"WARNING: retention: ignoring the pin {path}: {err}", file=sys.stderr)
    return pinned


def checkpoints_to_prune(
    iterations: list[int],
    tracker: int,
    keep_last: int,
    keep_every: int | None = None,
    complete: set[int] | None = None,
    stop_saves: Collection[int] = (),
) -> list[int]:
    """The iterations to delete, given those on disk, the tracker's, which are complete
    (default: all) and which were saved on a stop request (pure, for testing). Only complete
    checkpoints on the save interval count towards ``keep_last``; an incomplete folder older
    than the tracker is the leftover of a killed save, and an older stop save is superseded:
    both deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    complete = set(iterations) if complete is None else complete
    done = sorted(
        it for it in iterations if it <= tracker and it in complete and it not in stop_saves
    )
    keep = set(done[-keep_last:]) | {tracker}
    if keep_every:
        keep |= {it for it in done if it % keep_every == 0}
    return [it for it in iterations if it < tracker and it not in keep]


def prune_checkpoints(root: str | Path, keep_last: int, keep_every: int | None = None) -> list[int]:
    """Delete the checkpoints under ``root`` that :func:`checkpoints_to_prune` selects, but
    none that a reader pins (:func:`write_pin`), and what earlier deletions left; returns the
    iterations removed."""
    root = Path(root)
    tracker = read_tracker(root)
    if tracker is None:
        return []
    removed = []
    on_disk = list_iterations(root)
    complete = {it for it in on_disk if is_complete(root, it)}
    stops = {it for it in on_disk if is_stop_save(root, it)}
    pinned = pinned_iterations(root)
    for iteration in checkpoints_to_prune(on_disk, tracker, keep_last, keep_every, complete, stops):
        if iteration in pinned:
            continue
        path = iteration_dir(root, iteration)
        if path.is_symlink():  # a link points at a checkpoint someone keeps elsewhere
            continue
        doomed = root / f"{DELETING_PREFIX}{path.name}.{os.getpid()}"
        os.replace(path, doomed)  # atomic: from here on it is not a checkpoint
        removed.append(iteration)
    for doomed in root.glob(f"{DELETING_PREFIX}*"):
        shutil.rmtree(doomed)
    return removed


class BackgroundPruner:
    """Runs :func:`prune_checkpoints` on a worker thread, one request after another."""

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[Path, int, int | None]] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, root: str | Path, keep_last: int, keep_every: int | None = None) -> None:
        """Prune ``root`` soon; returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="wsm-retention", daemon=True)
            self._thread.start()
        self._requests.put((Path(root), keep_last, keep_every))

    def drain(self) -> None:
        """Wait until every request so far is done."""
        if self._thread is not None:
            self._requests.join()

    def _work(self) -> None:
        while True:
            root, keep_last, keep_every = self._requests.get()
            try:
                prune_checkpoints(root, keep_last, keep_every)
            except OSError as err:
                print(
                    f"WARNING: retention: could not delete an old checkpoint under {root}: "
                    f"{err}; it stays, training goes on",
                    file=sys.stderr,
                    flush=True,
                )
            finally:
                self._requests.task_done()
