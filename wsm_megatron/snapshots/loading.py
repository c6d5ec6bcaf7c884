"""Snapshots from checkpoints on disk: the loading path of the ring rebuild and of ``wsm-tune``.

Each checkpoint is read weights only, once per data-parallel group (Megatron's fully parallel
load: every replica reads a share and they exchange), into the live model; the ring then takes
this rank's slice, and the compute stream waits for that copy (a fence) before the next load
overwrites the parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from wsm_megatron.layout import iteration_dir
from wsm_megatron.snapshots.ring import SnapshotRing
from wsm_megatron.training.checkpointing import load_model_only


def load_checkpoints(
    model: list[torch.nn.Module],
    root: str | Path,
    iterations: Sequence[int],
    seq_length: int,
    *,
    verified: bool = False,
) -> Iterator[tuple[int, int]]:
    """Load the checkpoints ``root/iter_*`` of ``iterations`` into the model in turn (weights
    only, this rank's shard; checked first unless ``verified``), yielding each one's iteration
    and position once it is in: the tokens it had consumed (``consumed_train_samples x
    seq_length``)."""
    for it in iterations:
        ckpt = iteration_dir(root, it)
        load_model_only(model, ckpt, verified=verified)
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
        yield it, int(getattr(common["args"], "consumed_train_samples", 0)) * seq_length


def load_snapshots(
    model: list[torch.nn.Module],
    ring: SnapshotRing,
    root: str | Path,
    iterations: Sequence[int],
    seq_length: int,
    *,
    verified: bool = False,
) -> None:
    """Take the checkpoints of ``iterations`` (oldest first) into ``ring``; the model ends
    with the last one's values."""
    for it, position in load_checkpoints(model, root, iterations, seq_length, verified=verified):
        ring.take(it, position)
        ring.fence()  # the next load must not overwrite the parameters under the copy
