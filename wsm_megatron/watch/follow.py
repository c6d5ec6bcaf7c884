"""What ``wsm-watch`` reads: the complete checkpoints of a live run and, per new checkpoint, the
candidates whose windows end at it (wsm-tune's candidates, :func:`build_grid`, per window).

Everything here reads the run's folder and nothing writes it; the watcher calls it on rank 0
only and gives the result to every rank (:func:`wsm_megatron.runtime.decided_on_rank0`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from wsm_megatron.layout import (
    TRACKER_FILENAME,
    is_complete,
    is_stop_save,
    list_iterations,
    read_tracker,
)
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.selection import read_run_point, run_positions
from wsm_megatron.tune.candidates import Candidate, TuneGrid, build_grid


def check_root(root: Path, once: bool) -> bool:
    """Whether ``root`` holds checkpoints yet: a missing or empty folder is a run that has
    not saved yet (waited for, unless ``once``); a folder of other things is refused."""
    if root.exists() and not root.is_dir():
        raise MergeError(f"--checkpoints {root} is not a directory")
    if not root.exists() or not any(root.iterdir()):
        if once:
            raise MergeError(f"--checkpoints {root} holds no checkpoint (with --once)")
        return False
    if not (root / TRACKER_FILENAME).is_file() and not list_iterations(root):
        raise MergeError(
            f"--checkpoints {root} is not a checkpoint root (no {TRACKER_FILENAME} and no "
            "iter_* folders)"
        )
    return True


@dataclass(frozen=True)
class Pending:
    """Rank 0's answer to "what is new", from one reading of the tracker and one listing:
    ``complete``, the checkpoints that count, oldest first (complete, reached by the tracker,
    on the save interval: not a stop save); ``iterations``, those not yet done (up to
    ``--until-iteration``); ``finished``, whether the watch ends after them."""

    complete: tuple[int, ...]
    iterations: tuple[int, ...]
    finished: bool


def pending(root: Path, done: Collection[int], until: int | None) -> Pending:
    """What is complete and not yet done under ``root``. The tracker is read first: every
    checkpoint it has reached is complete, so a watch that ends at ``until`` has listed them."""
    try:
        tracker = read_tracker(root) if root.is_dir() else None
    except ValueError:  # a tracker being replaced reads whole (atomic); a foreign one: wait
        tracker = None
    complete = (
        ()
        if tracker is None
        else tuple(
            it
            for it in list_iterations(root)
            if it <= tracker and is_complete(root, it) and not is_stop_save(root, it)
        )
    )
    found = tuple(it for it in complete if it not in done and (until is None or it <= until))
    finished = until is not None and tracker is not None and tracker >= until
    return Pending(complete, found, finished)


@dataclass(frozen=True)
class Plan:
    """What to score at one checkpoint: the newest alone first, then the merges; the lines
    for what is not scored. ``removed``: the checkpoint itself is gone (retention).
    ``span``: every checkpoint of the windows scored (each window whole, before any interval
    thins it), oldest first: what the watcher's sliding window holds."""

    iteration: int
    candidates: tuple[Candidate, ...] = ()
    skipped: tuple[str, ...] = ()
    tokens: int | None = None
    removed: bool = False
    span: tuple[int, ...] = ()


def plan_iteration(
    root: Path,
    grid: TuneGrid,
    iteration: int,
    known: Collection[int],
    unusable: Collection[int] = (),
) -> Plan:
    """The candidates of ``grid`` whose windows end at ``iteration``, one window at a time: a
    window that cannot be filled from what is on disk, that lacks a checkpoint the watcher
    has seen complete (``known``: retention removed it), or that holds one it could not use
    (``unusable``: it failed to load, or holds non-finite values) is skipped with a line; the
    others are exactly wsm-tune's candidates with ``--end-iteration iteration``."""
    if not is_complete(root, iteration):
        return Plan(iteration, removed=True)
    try:
        (position,), unit, _ = run_positions([read_run_point(root, iteration)])
    except MergeError:
        if not is_complete(root, iteration):
            return Plan(iteration, removed=True)
        raise
    tokens = position if unit == "tokens" else None
    newest = Candidate("newest", "1", None, (iteration,), (position,), (1.0,))
    merges: list[Candidate] = []
    skipped: list[str] = []
    span = {iteration}
    seen = sorted(it for it in set(known) | {iteration} if it <= iteration)
    single = [((n,), ()) for n in grid.durations] + [((), (t,)) for t in grid.durations_tokens]
    for durations, window_tokens in single:
        one = dataclasses.replace(
            grid, durations=durations, durations_tokens=window_tokens, end_iteration=iteration
        )
        label = one.windows()[0][0]
        try:
            built = build_grid(root, one)
        except MergeError as err:
            if not is_complete(root, iteration):
                return Plan(iteration, removed=True)
            skipped.append(f"window {label} ending at iteration {iteration}: {err}; skipped")
            continue
        ((_, selected),) = built.windows
        lacking = [it for it in seen if it >= selected.iterations[0]]
        lacking = [it for it in lacking if it not in selected.iterations]
        if lacking:
            skipped.append(
                f"window {label} ending at iteration {iteration}: checkpoint(s) {lacking} "
                f"were removed (retention); skipped"
            )
            continue
        bad = [it for it in selected.iterations if it in unusable]
        if bad:
            skipped.append(
                f"window {label} ending at iteration {iteration}: checkpoint(s) {bad} could "
                "not be used (see above); skipped"
            )
            continue
        skipped.extend(s.describe() for s in built.skipped)
        merges.extend(built.rows[1:])
        span.update(selected.iterations)
    return Plan(iteration, (newest, *merges), tuple(skipped), tokens, span=tuple(sorted(span)))


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies under it (resolved)."""
    return path.resolve().is_relative_to(root.resolve())
