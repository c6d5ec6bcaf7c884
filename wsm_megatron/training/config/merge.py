"""``merge``: the merge window, and the online merge during training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from wsm_megatron.theory import MergeWeightsError, canonical_schedule
from wsm_megatron.training.config.errors import ConfigError, _positive


@dataclass
class MergeConfig:
    """The merge window WSM uses, and the online merge that forms the merged model while training.

    ``quantity`` is the number of newest checkpoints merged; ``window`` is the merge duration in
    the save interval's unit (iterations or tokens), ``quantity = window / interval``. ``schedule``
    names the merge weights (see ``wsm-coeffs``; ``linear`` is the plain mean), with
    ``min_lr_ratio`` and ``ema_beta`` as in ``wsm-merge``. The window decides which checkpoints
    training keeps.

    ``online``: at every ``every``-th checkpoint save, each rank merges the values of its own shard
    from a ring of snapshots of the window's newest saves (on ``snapshot_device``, at most
    ``snapshot_memory_gb`` per rank), evaluates the merged model on the validation batches,
    optionally saves it under ``save_dir`` in ``wsm-merge``'s format, and puts the live values
    back.
    """

    quantity: int | None = None
    window: int | None = None
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    ema_beta: float | None = None
    online: bool = False
    every: int = 1
    snapshot_device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where the ring of snapshots lives: ``auto``, the (sharded) ring in GPU memory when it fits
    ``gpu_memory_share`` of the free GPU memory, else pinned host memory (``cpu``); ``gpu``, GPU
    memory. CPU-only machines: host memory."""
    snapshot_memory_gb: float = 64.0
    shard_ring: bool = True
    """Each data-parallel rank keeps only its 1/DP slice of every snapshot (dense parameters over
    the DP x CP group, expert parameters over the expert-data-parallel group); off: every replica
    keeps the whole shard."""
    gpu_memory_share: float = 0.5
    """The share of the free GPU memory an ``auto`` ring may take on the GPU, in (0, 1]."""
    node_memory_gb: float | None = None
    """The host memory the rings of a node may take; ``null``: half the node's physical memory."""
    save_dir: str | None = None
    keep_last: int | None = None
    """Retention of merged models under ``save_dir``: the newest this many (default: all)."""
    keep_every: int | None = None
    """... and every merged model whose iteration is a multiple of this."""

    def __post_init__(self) -> None:
        _positive(
            "merge",
            quantity=self.quantity,
            window=self.window,
            every=self.every,
            snapshot_memory_gb=self.snapshot_memory_gb,
            node_memory_gb=self.node_memory_gb,
            keep_last=self.keep_last,
            keep_every=self.keep_every,
        )
        if not 0 < self.gpu_memory_share <= 1:
            raise ConfigError(
                f"merge.gpu_memory_share: must be in (0, 1], got {self.gpu_memory_share}"
            )
        if self.quantity is not None and self.window is not None:
            raise ConfigError("merge.window: set either merge.quantity or merge.window, not both")
        try:
            self.schedule = canonical_schedule(self.schedule)
        except MergeWeightsError as err:
            raise ConfigError(f"merge.schedule: {err}") from None
        try:
            self.weighting()
        except ValueError as err:  # the flag names of wsm-merge, as keys of this section
            message = str(err).replace("--min-lr-ratio", "merge.min_lr_ratio")
            message = message.replace("--ema-beta", "merge.ema_beta")
            message = message.replace("--schedule", "merge.schedule")
            message = message if message.startswith("merge.") else f"merge: {message}"
            raise ConfigError(message) from None
        if self.save_dir is not None and not self.online:
            raise ConfigError("merge.save_dir: saving merged models needs merge.online=true")
        if (self.keep_last or self.keep_every) and self.save_dir is None:
            raise ConfigError("merge.keep_last: retention of merged models needs merge.save_dir")

    def weighting(self) -> Any:
        """The merge weights, as ``wsm-merge`` resolves them (one rule for both)."""
        from wsm_megatron.merge.config import Weighting

        return Weighting(
            schedule=self.schedule, min_lr_ratio=self.min_lr_ratio, ema_beta=self.ema_beta
        )
