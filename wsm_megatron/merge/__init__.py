"""Shard-local, streaming WSM merge of Megatron ``torch_dist`` checkpoints (``wsm-merge``).

``merge(MergeConfig(input=..., output=..., last=4, schedule="minus-sqrt"))`` merges on every
rank of the initialised process group (or in this process alone) and returns a
:class:`MergeResult`; failures raise :class:`MergeError` and leave the output root as it was.
"""

from wsm_megatron.merge.api import merge
from wsm_megatron.merge.config import MergeConfig, MergeJob, Selection, SweepEntry, Weighting
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.report import JobReport, MergeResult

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
