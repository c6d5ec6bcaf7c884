"""The online WSM merge: a merged model at every checkpoint save, formed shard by shard in training.

At each checkpoint save, every rank copies its slice of the values it just checkpointed (its
TP/PP/EP shard, cut over its data-parallel group: about 1/DP of it) into a ring of the merge
window's newest snapshots (:class:`wsm_megatron.snapshots.SnapshotRing`). At every
``merge.every``-th save, once the ring holds two snapshots or more, :meth:`OnlineMerge.merged`
writes the merged values into the live model — each rank combines its slices through
:func:`wsm_megatron.merge.combine.combine`, the computation ``wsm-merge`` runs, with the
coefficients ``wsm-merge`` resolves for the same positions, so the bits agree, and the merged
slices are all-gathered into every replica — and puts the live values back afterwards from the
newest slices (they are what was just saved), and the modules' extra state (FP8 scales) as it was.

After a restart, :meth:`OnlineMerge.rebuild` fills the ring from the window's checkpoints on
disk (chosen on rank 0), each checkpoint read once per data-parallel group, so the merges after
the restart are bitwise those of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from wsm_megatron.integrity import verify_checkpoint
from wsm_megatron.layout import is_stop_save, iteration_dir, list_iterations
from wsm_megatron.runtime import decided_on_rank0
from wsm_megatron.snapshots.loading import load_snapshots
from wsm_megatron.snapshots.memory import GIB, check_ring_memory, gather_ring_memory, ring_device
from wsm_megatron.snapshots.ring import SnapshotRing, ring_bytes
from wsm_megatron.snapshots.values import extra_state_kept, shard_values
from wsm_megatron.theory import MergeWeights
from wsm_megatron.training.checkpointing import Progress
from wsm_megatron.training.config import WSMConfig


@dataclass(frozen=True)
class MergePoint:
    """One online merge: the window's checkpoints, their positions and coefficients."""

    iteration: int
    iterations: tuple[int, ...]
    positions: tuple[int, ...]
    weights: MergeWeights
    schedule: str
    nonfinite: str | None = None
    """Why the merged values are unusable (NaN/Inf in a snapshot), or None."""


class OnlineMerge:
    """The ring and the merges of one training process (see the module docstring).

    Lifecycle: :meth:`rebuild` and :meth:`on_resume` around resuming, :meth:`on_save` after
    each checkpoint save (:meth:`due`: whether a merge follows it), :meth:`merged` around the
    evaluation and saving of the merged model, :meth:`fence` before each optimizer step.
    """

    def __init__(self, config: WSMConfig, model: list[torch.nn.Module]) -> None:
        self.config = config
        self.model = model
        self.values = shard_values(model)
        m = config.merge
        capacity = config.merge_quantity
        assert capacity is not None and capacity >= 2  # checked with the config
        need = ring_bytes(self.values, capacity, m.shard_ring)
        compute = self.values[0].tensor.device if self.values else torch.device("cpu")
        device = ring_device(m.snapshot_device, compute, need, m.gpu_memory_share)
        self.memory = gather_ring_memory(need, device.type == "cpu")
        check_ring_memory(self.memory, capacity, m.snapshot_memory_gb, m.node_memory_gb)
        self.ring = SnapshotRing(self.values, capacity, device, shard=m.shard_ring)
        self.weighting = m.weighting()
        self.last_point: MergePoint | None = None
        self.damaged: dict[int, str] = {}
        """Window checkpoints the last rebuild skipped, and why."""
        self.resumed_stop_save = False
        """Whether the checkpoint resumed from was a stop save (then not in the ring)."""

    def describe(self) -> str:
        m, ring = self.config.merge, self.ring
        where = "GPU memory" if ring.device.type == "cuda" else "host memory"
        if ring.device.type == "cpu" and ring.compute.type == "cuda":
            where = "pinned host memory"
        sliced = max(rb.bucket.size for rb in ring.buckets) if ring.buckets else 1
        cut = f"sliced over {sliced} data-parallel ranks" if sliced > 1 else "whole shard"
        return (
            f"  online merge: the newest {ring.capacity} checkpoints, {m.schedule}, every "
            f"{m.every} save(s); {self.memory.describe(ring.capacity, where)} "
            f"({len(self.values)} tensors, {cut}; merge buffers {ring.device_bytes / GIB:.3g} GiB "
            f"on {ring.compute.type}; budget {m.snapshot_memory_gb:g} GiB)"
        )

    def position(self, progress: Progress) -> int:
        """A save's position: the tokens consumed so far, as ``wsm-merge`` reads them from the
        checkpoint (``consumed_train_samples x seq_length``: right under batch-size changes)."""
        return progress.consumed_train_samples * self.config.seq_length

    # ------------------------------------------------------------------ lifecycle
    def rebuild(self, root: str | Path, resume_iteration: int) -> tuple[list[int], list[int]]:
        """Fill the ring with the window's checkpoints before ``resume_iteration`` from disk
        (weights only, this rank's shard, each read once per data-parallel group; the window
        is chosen on rank 0); :meth:`on_resume` adds the resumed one. Call before loading the
        resume checkpoint: the model's values are overwritten.

        Returns the iterations loaded and those of the window that are missing on disk (with
        an iteration save interval: the saves an uninterrupted run would hold in its ring).
        """

        def window() -> tuple[list[int], bool]:
            stop_save = is_stop_save(root, resume_iteration)  # not a window member
            keep = self.ring.capacity - (0 if stop_save else 1)
            complete = [
                it
                for it in list_iterations(root)
                if it < resume_iteration
                and (iteration_dir(root, it) / "metadata.json").is_file()
                and not is_stop_save(root, it)
            ]
            return complete[-keep:], stop_save

        older, self.resumed_stop_save = decided_on_rank0(window)
        keep = self.ring.capacity - (0 if self.resumed_stop_save else 1)
        damaged = {it: verify_checkpoint(iteration_dir(root, it)) for it in older}
        self.damaged = {it: problem for it, problem in damaged.items() if problem is not None}
        older = [it for it in older if it not in self.damaged]
        load_snapshots(self.model, self.ring, root, older, self.config.seq_length, verified=True)
        interval = self.config.checkpoint.save_interval
        if interval is None:
            return older, []
        saves = list(range(interval, resume_iteration, interval))[-keep:]
        return older, sorted(set(saves) - set(older))

    def on_resume(self, progress: Progress) -> None:
        """Add the resumed checkpoint (the live values just loaded) as the newest snapshot,
        unless it is a stop save (off the save interval: an uninterrupted run holds no
        snapshot of it)."""
        if not self.resumed_stop_save:
            self.ring.take(progress.iteration, self.position(progress))

    def due(self, progress: Progress) -> bool:
        """Whether the save at ``progress`` is a merge point: every ``merge.every``-th save
        interval (counted from the start of the run, so a restart changes nothing) and the end
        of training, once the ring (with this save) holds two snapshots."""
        return len(self.ring) + 1 >= 2 and self._scheduled(progress)

    def was_due(self, progress: Progress) -> bool:
        """Whether the save at ``progress``, already in the ring (a resumed one), was a merge
        point (never a stop save)."""
        return not self.resumed_stop_save and len(self.ring) >= 2 and self._scheduled(progress)

    def _scheduled(self, progress: Progress) -> bool:
        c = self.config.checkpoint
        if c.save_interval is not None:
            saves = progress.iteration // c.save_interval
        else:
            saves = self.position(progress) // c.save_interval_tokens
        every = saves % self.config.merge.every == 0
        return every or progress.iteration == self.config.train.train_iters

    def on_save(self, progress: Progress) -> None:
        """Snapshot what was just saved."""
        self.ring.take(progress.iteration, self.position(progress))

    def fence(self) -> None:
        self.ring.fence()

    @contextmanager
    def merged(self, iteration: int) -> Iterator[MergePoint]:
        """Inside the block the model holds the merged values; afterwards, bitwise, the live
        ones and the live extra state. A non-finite merge is reported in the point (the model
        then holds live values)."""
        snapshots = list(self.ring.entries)
        positions = [s.position for s in snapshots]
        weights = self.weighting.resolve(positions)
        point = MergePoint(
            iteration,
            tuple(s.iteration for s in snapshots),
            tuple(positions),
            weights,
            self.weighting.label(),
        )
        self.last_point = point
        with extra_state_kept(self.model):
            found = self.ring.merge_into_live(snapshots, weights.coefficients)
            try:
                if found:
                    self._restore()
                    point = MergePoint(
                        **{**point.__dict__, "nonfinite": self.ring.culprit(snapshots)}
                    )
                    self.last_point = point
                yield point
            finally:
                self._restore()

    def _restore(self) -> None:
        """The live values back from the newest snapshot (they are what was just saved)."""
        self.ring.restore_live(self.ring.entries[-1])
