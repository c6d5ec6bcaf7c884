"""What a merged checkpoint records about how it was made: ``merge_info.json`` and the
provenance in its common state (``common.pt``'s ``wsm_merge``), the same for ``wsm-merge`` and
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


def merge_info(
    *,
    tool: str,
    input_root: Path,
    iterations: Sequence[int],
    weighting: Weighting,
    weights: MergeWeights,
    accumulate_dtype: str,
    output_dtype: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """``merge_info.json`` of the merge of ``iterations`` under ``input_root``; ``extra`` adds
    tool-specific fields (selection, counts...)."""
    return {
        "tool": tool,
        "version": wsm_megatron.__version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input_root": str(input_root),
        "iteration": iterations[-1],
        "inputs": [
            {"iteration": it, "path": str(iteration_dir(input_root, it)), "coefficient": c}
            for it, c in zip(iterations, weights.coefficients, strict=True)
        ],
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
