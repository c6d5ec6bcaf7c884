"""Shard-local, streaming WSM merge of Megatron ``torch_dist`` checkpoints (``wsm-merge``).

``merge(MergeConfig(input=..., output=..., last=4, schedule="minus-sqrt"))`` merges on every
rank of the initialised process group (or in this process alone) and returns a
:class:`MergeResult`; failures raise :class:`MergeError` and leave the output root as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsm_megatron.merge.config import MergeConfig, MergeJob, Selection, SweepEntry, Weighting
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.report import JobReport, MergeResult

if TYPE_CHECKING:
    from wsm_megatron.merge.api import merge


def __getattr__(name: str) -> Any:
    """``merge`` is imported on first use: the config and CLI never import torch for it."""
    if name == "merge":
        from wsm_megatron.merge.api import merge

        return merge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "JobReport",
    "MergeConfig",
    "MergeError",
    "MergeJob",
    "MergeResult",
    "Selection",
    "SweepEntry",
    "Weighting",
    "merge",
]
