"""Which checkpoints a merge uses: explicit iterations, the last N, or a window ending at E."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsm_megatron.layout import iteration_dir, list_iterations, read_tracker
from wsm_megatron.merge.config import Selection
from wsm_megatron.merge.dcp_format import Metadata, MetadataIndex, read_metadata
from wsm_megatron.merge.errors import MergeError

COMMON_FILENAME = "common.pt"
# megatron-core >= 0.17 stores the common state inside the torch_dist checkpoint instead, as the
# ShardedObject "common_state" (global shape (1,), offset (0,)): one pickled ``[state]`` item.
EMBEDDED_COMMON_KEY = "common_state/shard_0_1"


@dataclass(frozen=True)
class Selected:
    """The chosen iterations (oldest first) and how they were chosen."""

    iterations: tuple[int, ...]
    end_iteration: int | None
    tokens_per_iter: int | None


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


def tokens_per_iteration(ckpt_dir: Path) -> int:
    """``seq_length * global_batch_size`` from the checkpoint's saved Megatron args."""
    args = load_common_state(ckpt_dir).get("args")
    seq = getattr(args, "seq_length", None)
    gbs = getattr(args, "global_batch_size", None)
    if not isinstance(seq, int) or not isinstance(gbs, int):
        raise MergeError(
            f"checkpoint {ckpt_dir}: saved args lack seq_length/global_batch_size; "
            "pass --tokens-per-iter"
        )
    return seq * gbs


def _thin(newest_first: list[int], every: int) -> list[int]:
    return newest_first[::every]


def select_checkpoints(root: Path, selection: Selection) -> Selected:
    """Resolve ``selection`` against the ``iter_*`` directories under ``root``."""
    if not root.is_dir():
        raise MergeError(f"--input {root} is not a directory")
    if selection.iterations is not None:
        missing = [it for it in selection.iterations if not iteration_dir(root, it).is_dir()]
        if missing:
            raise MergeError(f"checkpoint {iteration_dir(root, missing[0])} does not exist")
        chosen = list(selection.iterations)
        end, tpi = None, None
    else:
        available = list_iterations(root)
        if not available:
            raise MergeError(f"no iter_* checkpoint directories under {root}")
        end = selection.end_iteration
        if end is None:
            try:
                end = read_tracker(root)
            except ValueError as err:
                raise MergeError(str(err)) from None
            end = max(available) if end is None else end
        candidates = [it for it in available if it <= end]
        if not candidates:
            raise MergeError(f"no checkpoint under {root} at or before iteration {end}")
        newest_first = _thin(sorted(candidates, reverse=True), selection.every)
        tpi = None
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
            chosen = [it for it in newest_first if it > end - selection.window_iters]
        else:
            tpi = selection.tokens_per_iter
            if tpi is None:
                tpi = tokens_per_iteration(iteration_dir(root, candidates[-1]))
            chosen = [it for it in newest_first if it * tpi > end * tpi - selection.window_tokens]
        chosen.sort()
    if len(chosen) < 2:
        raise MergeError(
            f"the selection picks {len(chosen)} checkpoint(s) {chosen} under {root}; "
            "a merge needs at least 2"
        )
    return Selected(tuple(chosen), end, tpi)
