"""Which checkpoints a WSM run keeps: the newest ones its merge window needs, plus a record.

Pruning runs on one rank right after the tracker file points at a new checkpoint. It only ever
removes iterations older than the tracker's (so never the checkpoint being written, nor the one
a restart would resume from), keeps the newest ``keep_last`` complete ones and every iteration
that is a multiple of ``keep_every``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from wsm_megatron.layout import iteration_dir, list_iterations, read_tracker


def checkpoints_to_prune(
    iterations: list[int], tracker: int, keep_last: int, keep_every: int | None = None
) -> list[int]:
    """The iterations to delete, given those on disk and the tracker's (pure, for testing)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    done = sorted(it for it in iterations if it <= tracker)
    keep = set(done[-keep_last:]) | {tracker}
    if keep_every:
        keep |= {it for it in done if it % keep_every == 0}
    return [it for it in done if it not in keep and it < tracker]


def prune_checkpoints(root: str | Path, keep_last: int, keep_every: int | None = None) -> list[int]:
    """Delete the checkpoints under ``root`` that :func:`checkpoints_to_prune` selects."""
    tracker = read_tracker(root)
    if tracker is None:
        return []
    removed = []
    for iteration in checkpoints_to_prune(list_iterations(root), tracker, keep_last, keep_every):
        path = iteration_dir(root, iteration)
        if not path.is_symlink():  # a link points at a checkpoint someone keeps elsewhere
            shutil.rmtree(path)
            removed.append(iteration)
    return removed
