"""Which checkpoints a merge uses: explicit iterations, the last N, or a window ending at E."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsm_megatron.layout import (
    TRACKER_FILENAME,
    is_stop_save,
    iteration_dir,
    list_iterations,
    read_tracker,
)
from wsm_megatron.merge.config import Selection
from wsm_megatron.merge.dcp_format import Metadata, MetadataIndex, read_metadata
from wsm_megatron.merge.errors import MergeError

COMMON_FILENAME = "common.pt"
# megatron-core >= 0.17 stores the common state inside the torch_dist checkpoint instead, as the
# ShardedObject "common_state" (global shape (1,), offset (0,)): one pickled ``[state]`` item.
EMBEDDED_COMMON_KEY = "common_state/shard_0_1"


@dataclass(frozen=True)
class Selected:
    """The chosen iterations (oldest first), how they were chosen, and their positions in the
    run (what the weights and token windows use; see :func:`run_positions`)."""

    iterations: tuple[int, ...]
    end_iteration: int | None
    tokens_per_iter: int | None
    positions: tuple[int, ...]
    position_unit: str  # "tokens", "samples" or "iterations"
    position_source: str
    partial_window: str | None = None  # what is missing, when --allow-partial-window took it


@dataclass(frozen=True)
class RunPoint:
    """What a checkpoint's saved args say about its place in the run."""

    iteration: int
    consumed_samples: int | None  # ``args.consumed_train_samples`` when saved and positive
    seq_length: int | None
    global_batch_size: int | None


def has_common_state(ckpt_dir: Path, metadata: Metadata) -> bool:
    """Whether the checkpoint holds its common state, in ``common.pt`` or embedded."""
    return (ckpt_dir / COMMON_FILENAME).is_file() or (
        EMBEDDED_COMMON_KEY in metadata.state_dict_metadata
    )


def load_common_state(ckpt_dir: Path, metadata: Metadata | None = None) -> dict[str, Any]:
    """The non-sharded state Megatron saved (args, iteration, ...): ``common.pt``, or the
    ``common_state`` item embedded in the checkpoint by megatron-core >= 0.17 (located through
    ``metadata``, the checkpoint's ``.metadata``, read here when not given)."""
    path = ckpt_dir / COMMON_FILENAME
    source = COMMON_FILENAME
    try:
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
        else:
            source = f"the embedded {EMBEDDED_COMMON_KEY!r}"
            metadata = metadata or read_metadata(ckpt_dir)
            if EMBEDDED_COMMON_KEY not in metadata.state_dict_metadata:
                raise MergeError(
                    f"checkpoint {ckpt_dir}: missing {COMMON_FILENAME} and no embedded common "
                    "state (incomplete checkpoint)"
                )
            info = metadata.storage_data[MetadataIndex(EMBEDDED_COMMON_KEY)]
            if not (ckpt_dir / info.relative_path).is_file():
                raise MergeError(
                    f"checkpoint {ckpt_dir}: shard file {info.relative_path} is missing (it "
                    f"holds {source})"
                )
            with open(ckpt_dir / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
            state = state[0] if isinstance(state, list) and len(state) == 1 else state
    except MergeError:
        raise
    except Exception as err:  # a truncated or foreign file: report it, whatever torch raises
        raise MergeError(f"checkpoint {ckpt_dir}: cannot read {source}: {err}") from None
    if not isinstance(state, dict):
        raise MergeError(f"checkpoint {ckpt_dir}: {source} does not hold a dict")
    return state


def _int_arg(args: Any, name: str) -> int | None:
    value = getattr(args, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def read_run_point(root: Path, iteration: int) -> RunPoint:
    """The :class:`RunPoint` of ``root/iter_XXXXXXX`` from its common state's ``args``."""
    args = load_common_state(iteration_dir(root, iteration)).get("args")
    return RunPoint(
        iteration,
        _int_arg(args, "consumed_train_samples"),
        _int_arg(args, "seq_length"),
        _int_arg(args, "global_batch_size"),
    )


def run_positions(
    points: Sequence[RunPoint], tokens_per_iter: int | None = None
) -> tuple[tuple[int, ...], str, str]:
    """Positions (oldest first), their unit and source, by the first rule that every point
    satisfies: ``iteration x tokens_per_iter`` when given (``--tokens-per-iter``); each
    checkpoint's own consumed samples x seq_length (tokens), or consumed samples alone; else
    ``iteration x seq_length x global_batch_size`` of the newest (a constant batch); else the
    iterations. Consumed samples stay right under batch-size ramp-up or a changed batch size."""
    its = [p.iteration for p in points]
    newest = points[-1]
    if tokens_per_iter is not None:
        return tuple(i * tokens_per_iter for i in its), "tokens", "iteration x --tokens-per-iter"
    if all(p.consumed_samples and p.seq_length for p in points):
        tokens = tuple(p.consumed_samples * p.seq_length for p in points)
        return tokens, "tokens", "consumed_train_samples x seq_length"
    if all(p.consumed_samples for p in points):
        return tuple(p.consumed_samples for p in points), "samples", "consumed_train_samples"
    if newest.seq_length and newest.global_batch_size:
        tpi = newest.seq_length * newest.global_batch_size
        source = "iteration x seq_length x global_batch_size (no consumed samples saved)"
        return tuple(i * tpi for i in its), "tokens", source
    return tuple(its), "iterations", "iteration (no consumed samples or batch size saved)"


def _checked_positions(
    root: Path, points: Sequence[RunPoint], tokens_per_iter: int | None
) -> tuple[tuple[int, ...], str, str]:
    positions, unit, source = run_positions(points, tokens_per_iter)
    for a, b, pa, pb in zip(points, points[1:], positions, positions[1:], strict=False):
        if pb <= pa:
            raise MergeError(
                f"checkpoints {iteration_dir(root, a.iteration)} and "
                f"{iteration_dir(root, b.iteration)}: positions from {source} do not increase "
                f"({pa} then {pb} {unit}); pass --iterations to choose the checkpoints"
            )
    return positions, unit, source


def _end_iteration(root: Path, selection: Selection, available: list[int]) -> int:
    end = selection.end_iteration
    if end is None:
        try:
            end = read_tracker(root)
        except ValueError as err:
            raise MergeError(str(err)) from None
        if end is None:
            return max(available)
        if is_stop_save(root, end):  # the newest save on the interval before it ends the merge
            older = [it for it in available if it < end]
            if older:
                return older[-1]
        where = f"the tracker {root / TRACKER_FILENAME} names iteration {end}"
    else:
        where = f"--end-iteration {end}"
    if end not in available:
        before = [it for it in available if it < end][-1:]
        after = [it for it in available if it > end][:1]
        raise MergeError(
            f"{where}, which is not a checkpoint under {root} (nearest: "
            + ", ".join(str(it) for it in before + after)
            + "); a merge ends at a checkpoint"
        )
    return end


def _unfilled_window(root: Path, flag: str, needed: str, oldest: str, allow: bool) -> str:
    """The line for a window that the checkpoints on disk cannot fill; raised unless allowed."""
    text = f"{flag}: the window reaches back to {needed}, but the oldest checkpoint under {root} "
    text += f"is {oldest} (older ones missing or pruned)"
    if not allow:
        raise MergeError(text + "; pass --allow-partial-window to merge what is there")
    return text


def select_checkpoints(root: Path, selection: Selection) -> Selected:
    """Resolve ``selection`` against the ``iter_*`` directories under ``root`` and read the
    chosen checkpoints' positions."""
    if not root.is_dir():
        raise MergeError(f"--input {root} is not a directory")
    tpi = selection.tokens_per_iter
    partial = None
    if selection.iterations is not None:
        missing = [it for it in selection.iterations if not iteration_dir(root, it).is_dir()]
        if missing:
            raise MergeError(f"checkpoint {iteration_dir(root, missing[0])} does not exist")
        chosen = list(selection.iterations)
        end = None
    else:
        # saves made on a stop request lie off the save interval: no window member
        available = [it for it in list_iterations(root) if not is_stop_save(root, it)]
        if not available:
            raise MergeError(f"no iter_* checkpoint directories under {root}")
        end = _end_iteration(root, selection, available)
        candidates = [it for it in available if it <= end]
        newest_first = candidates[::-1][:: selection.every]
        if selection.last is not None:
            if len(newest_first) < selection.last:
                raise MergeError(
                    f"--last {selection.last}: only {len(newest_first)} checkpoints under {root} "
                    f"up to iteration {end}"
                    + (f" with --every {selection.every}" if selection.every != 1 else "")
                    + f": {sorted(newest_first)}"
                )
            chosen = newest_first[: selection.last]
        elif selection.window_iters is not None:
            start = end - selection.window_iters
            chosen = [it for it in newest_first if it > start]
            if candidates[0] > start:
                flag = f"--window-iters {selection.window_iters} ending at {end}"
                partial = _unfilled_window(
                    root,
                    flag,
                    f"iteration {start}",
                    f"iteration {candidates[0]}",
                    selection.allow_partial_window,
                )
        else:
            chosen, partial = _token_window(root, selection, end, newest_first)
        chosen.sort()
    if len(chosen) < 2:
        raise MergeError(
            f"the selection picks {len(chosen)} checkpoint(s) {chosen} under {root}; "
            "a merge needs at least 2"
        )
    points = [read_run_point(root, it) for it in chosen]
    positions, unit, source = _checked_positions(root, points, tpi)
    return Selected(tuple(chosen), end, tpi, positions, unit, source, partial)


def _token_window(
    root: Path, selection: Selection, end: int, newest_first: list[int]
) -> tuple[list[int], str | None]:
    """Checkpoints within ``window_tokens`` before ``end`` by their token positions, read
    newest first until one at or before the window's start (which fills the window)."""
    points: list[RunPoint] = []
    for it in newest_first:
        points.insert(0, read_run_point(root, it))
        positions, unit, source = _checked_positions(root, points, selection.tokens_per_iter)
        if unit != "tokens":
            raise MergeError(
                f"checkpoint {iteration_dir(root, end)}: saved args lack seq_length/"
                "global_batch_size; pass --tokens-per-iter"
            )
        start = positions[-1] - selection.window_tokens
        if positions[0] <= start:
            return [p.iteration for p, x in zip(points, positions, strict=True) if x > start], None
    flag = f"--window-tokens {selection.window_tokens} ending at iteration {end}"
    partial = _unfilled_window(
        root,
        flag,
        f"token {start} ({source})",
        f"iteration {points[0].iteration} at token {positions[0]}",
        selection.allow_partial_window,
    )
    return [p.iteration for p in points], partial
