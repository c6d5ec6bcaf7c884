"""What a merged checkpoint records about how it was made: ``merge_info.json`` and the
provenance in its common state (``wsm_merge`` in ``common.pt``), the same for ``wsm-merge`` and
the trainer's online merge."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import wsm_megatron
from wsm_megatron.layout import iteration_dir
from wsm_megatron.merge.config import Weighting
from wsm_megatron.theory import MergeWeights

PROVENANCE_FIELDS = (
    "tool",
    "version",
    "inputs",
    "schedule",
    "min_lr_ratio",
    "ema_beta",
    "emulated_decay",
    "accumulate_dtype",
    "output_dtype",
)


def input_entries(
    root: Path, iterations: Sequence[int], positions: Sequence[int], coefficients: Sequence[float]
) -> list[dict[str, Any]]:
    """One record per merged checkpoint, oldest first: iteration, path, position, coefficient."""
    return [
        {"iteration": it, "path": str(iteration_dir(root, it)), "position": p, "coefficient": c}
        for it, p, c in zip(iterations, positions, coefficients, strict=True)
    ]


def merge_info(
    *,
    tool: str,
    input_root: Path,
    inputs: list[dict[str, Any]],
    weighting: Weighting,
    weights: MergeWeights,
    accumulate_dtype: str,
    output_dtype: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """``merge_info.json`` of a merge of ``inputs`` (:func:`input_entries`) under
    ``input_root``; ``extra`` adds tool-specific fields (selection, counts...)."""
    return {
        "tool": tool,
        "version": wsm_megatron.__version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input_root": str(input_root),
        "iteration": inputs[-1]["iteration"],
        "inputs": inputs,
        "schedule": weighting.schedule,
        "weights_given": list(weighting.weights) if weighting.weights else None,
        "min_lr_ratio": weighting.min_lr_ratio,
        "ema_beta": weighting.ema_beta,
        "emulated_decay": list(weights.decay),
        "accumulate_dtype": accumulate_dtype,
        "output_dtype": output_dtype,
        **extra,
    }


def provenance(info: dict[str, Any]) -> dict[str, Any]:
    """The part of ``merge_info`` that goes into the checkpoint's common state."""
    return {k: info[k] for k in PROVENANCE_FIELDS}
