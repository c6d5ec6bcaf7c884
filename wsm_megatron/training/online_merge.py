"""The online WSM merge: a merged model at every checkpoint save, formed shard by shard in training.

At each checkpoint save, every rank copies the values it just checkpointed (its own TP/PP/EP
shard of the model; data-parallel replicas hold the same bits) into a ring of the merge window's
newest snapshots. At every ``merge.every``-th save, once the ring holds two snapshots or more,
:meth:`OnlineMerge.merged` writes the merged values into the live model — through
:func:`wsm_megatron.merge.combine.combine`, the computation ``wsm-merge`` runs, with the
coefficients ``wsm-merge`` resolves for the same positions, so the bits agree — and puts the
live values back afterwards from the newest snapshot (they are what was just saved). Nothing is
gathered and no rank exchanges model values: only a flag (non-finite values) is reduced.

After a restart, :meth:`OnlineMerge.rebuild` fills the ring from the window's checkpoints on
disk, each rank loading only its shard's weights, so the merges after the restart are bitwise
those of an uninterrupted run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from wsm_megatron.layout import iteration_dir, list_iterations
from wsm_megatron.merge.combine import DEFAULT_ACC_DTYPE, combine
from wsm_megatron.merge.contents import ContentPolicy
from wsm_megatron.merge.plan import AVERAGE
from wsm_megatron.theory import MergeWeights
from wsm_megatron.training.checkpointing import Progress, load_model_only, model_sharded_state_dict
from wsm_megatron.training.config import WSMConfig

GIB = 2**30


@dataclass(frozen=True)
class ShardValue:
    """One tensor of this rank's shard that a checkpoint stores under ``key`` and a merge
    averages; ``tensor`` is the live model tensor (a parameter or a view of one)."""

    key: str
    tensor: torch.Tensor


def shard_values(model: list[torch.nn.Module]) -> list[ShardValue]:
    """The tensors of this rank's shard that ``wsm-merge`` would average, in a fixed order.

    Read off the model's sharded state dict (what a checkpoint stores), with ``wsm-merge``'s
    content policy: floating tensors of the model are averaged; extra state (objects), integer
    buffers and what the policy copies from the newest checkpoint keep their live values,
    which at a merge point are the newest checkpoint's.
    """
    policy = ContentPolicy()
    values: list[ShardValue] = []
    seen: set[tuple[int, int]] = set()
    for item in nested_values(model_sharded_state_dict(model)):
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            continue
        data = item.data
        if not data.is_floating_point() or policy.tensor_kind(item.key, data.dtype) != AVERAGE:
            continue
        identity = (data.data_ptr(), data.numel())
        if identity in seen:  # one tensor under two keys (e.g. a tied output layer)
            continue
        seen.add(identity)
        values.append(ShardValue(item.key, data))
    return values


@dataclass
class Snapshot:
    """The shard values saved at ``iteration`` (``position``: the tokens consumed by then)."""

    iteration: int
    position: int
    tensors: list[torch.Tensor]


class SnapshotRing:
    """The newest ``capacity`` snapshots of a rank's shard values, oldest first.

    Buffers are allocated once and reused. With CUDA tensors the copies run on a side stream
    into pinned host (or device) buffers, so a snapshot does not stall the step;
    :meth:`fence` makes the compute stream wait for them before the live values change, and
    :meth:`ready` waits on the host before the ring is read.
    """

    def __init__(self, live: list[torch.Tensor], capacity: int, device: torch.device) -> None:
        self.live = live
        self.capacity = capacity
        self.device = device
        self.entries: deque[Snapshot] = deque()
        self._cuda = any(t.is_cuda for t in live)
        self._stream = torch.cuda.Stream() if self._cuda else None
        self._event: torch.cuda.Event | None = None

    @property
    def snapshot_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.live)

    def _new_buffers(self) -> list[torch.Tensor]:
        pin = self._cuda and self.device.type == "cpu"
        return [
            torch.empty(t.shape, dtype=t.dtype, device=self.device, pin_memory=pin)
            for t in self.live
        ]

    def take(self, iteration: int, position: int) -> None:
        """Copy the live values into the ring as the snapshot of ``iteration``."""
        self.ready()
        if len(self.entries) == self.capacity:
            buffers = self.entries.popleft().tensors
        else:
            buffers = self._new_buffers()
        if self._stream is None:
            torch._foreach_copy_(buffers, self.live)
        else:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for dst, src in zip(buffers, self.live, strict=True):
                    dst.copy_(src, non_blocking=True)
            self._event = self._stream.record_event()
        self.entries.append(Snapshot(iteration, position, buffers))

    def fence(self) -> None:
        """Make the compute stream wait for pending copies (call before the values change)."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)

    def ready(self) -> None:
        """Wait for pending copies on the host."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def __len__(self) -> int:
        return len(self.entries)


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


def snapshot_device(config: WSMConfig, live: list[torch.Tensor]) -> torch.device:
    """``merge.snapshot_device``: host memory (``cpu``) or the model's device (``gpu``)."""
    if config.merge.snapshot_device == "gpu":
        if not any(t.is_cuda for t in live):
            raise ValueError("merge.snapshot_device: 'gpu' needs a GPU; use 'cpu'")
        return live[0].device
    return torch.device("cpu")


def load_checkpoints(
    model: list[torch.nn.Module], root: str | Path, iterations: Sequence[int], seq_length: int
) -> Iterator[tuple[int, int]]:
    """Load the checkpoints ``root/iter_*`` of ``iterations`` into the model in turn (weights
    only, this rank's shard), yielding each one's iteration and position once it is in: the
    tokens it had consumed (``consumed_train_samples x seq_length``). The one loading path of
    the ring rebuild and of ``wsm-tune``."""
    for it in iterations:
        ckpt = iteration_dir(root, it)
        load_model_only(model, ckpt)
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
        yield it, int(getattr(common["args"], "consumed_train_samples", 0)) * seq_length


def load_snapshots(
    model: list[torch.nn.Module],
    ring: SnapshotRing,
    root: str | Path,
    iterations: Sequence[int],
    seq_length: int,
) -> None:
    """Take the checkpoints of ``iterations`` (oldest first) into ``ring``; the model ends
    with the last one's values."""
    for it, position in load_checkpoints(model, root, iterations, seq_length):
        ring.take(it, position)


@torch.no_grad()
def merge_into(
    live: list[torch.Tensor],
    checkpoints: Sequence[Sequence[torch.Tensor]],
    coefficients: Sequence[float],
    device: torch.device,
) -> bool:
    """Write ``sum_j c_j checkpoints[j]`` into the live tensors with :func:`combine` (the
    computation of ``wsm-merge``; ``checkpoints`` oldest first, on ``device``); returns whether
    any merged value is non-finite on any rank (the one value exchanged)."""
    found = torch.zeros(1, dtype=torch.int32, device=device)
    kwargs = {"acc_dtype": DEFAULT_ACC_DTYPE, "found_nonfinite": found}
    if all(t.device == device for t in live):
        combine(live, checkpoints, coefficients, **kwargs)
    else:  # snapshots in host memory: merge there tensor by tensor, then copy in
        for t, target in enumerate(live):
            out = torch.empty(target.shape, dtype=target.dtype, device=device)
            combine([out], [[c[t]] for c in checkpoints], coefficients, **kwargs)
            target.copy_(out)
    if dist.is_initialized():
        found = found.to(live[0].device if live else device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found.item())


@torch.no_grad()
def copy_into(live: list[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Put ``values`` (a snapshot, or fp32 accumulators: rounded once) into the live tensors."""
    for target, value in zip(live, values, strict=True):
        target.copy_(value)


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
        live = [v.tensor for v in self.values]
        capacity = config.merge_quantity
        assert capacity is not None and capacity >= 2  # checked with the config
        self.ring = SnapshotRing(live, capacity, snapshot_device(config, live))
        self.weighting = config.merge.weighting()
        self.last_point: MergePoint | None = None
        self._check_memory()

    # ------------------------------------------------------------------ set-up
    def _check_memory(self) -> None:
        """Refuse a ring above ``merge.snapshot_memory_gb`` on any rank (all ranks agree)."""
        need = torch.tensor([self.ring.capacity * self.ring.snapshot_bytes], dtype=torch.float64)
        if dist.is_initialized():
            device = self.ring.live[0].device if self.ring.live else torch.device("cpu")
            need = need.to(device)
            dist.all_reduce(need, op=dist.ReduceOp.MAX)
        self.ring_bytes = int(need.item())
        budget = self.config.merge.snapshot_memory_gb
        if self.ring_bytes > budget * GIB:
            raise ValueError(
                f"merge.snapshot_memory_gb: the online merge's ring of {self.ring.capacity} "
                f"snapshots needs {self.ring_bytes / GIB:.3g} GiB on the largest rank, above "
                f"the {budget:g} GiB allowed (raise it, or merge fewer checkpoints)"
            )

    def describe(self) -> str:
        m = self.config.merge
        per = self.ring_bytes / self.ring.capacity / GIB
        where = "GPU memory" if self.ring.device.type == "cuda" else "host memory"
        if self.ring.device.type == "cpu" and self.ring._cuda:
            where = "pinned host memory"
        return (
            f"  online merge: the newest {self.ring.capacity} checkpoints, {m.schedule}, every "
            f"{m.every} save(s); ring {self.ring.capacity} snapshots x {per:.3g} GiB = "
            f"{self.ring_bytes / GIB:.3g} GiB per rank in {where} "
            f"({len(self.values)} tensors; budget {m.snapshot_memory_gb:g} GiB)"
        )

    def position(self, progress: Progress) -> int:
        """A save's position: the tokens consumed so far, as ``wsm-merge`` reads them from the
        checkpoint (``consumed_train_samples x seq_length``: right under batch-size changes)."""
        return progress.consumed_train_samples * self.config.seq_length

    # ------------------------------------------------------------------ lifecycle
    def rebuild(self, root: str | Path, resume_iteration: int) -> tuple[list[int], list[int]]:
        """Fill the ring with the window's checkpoints before ``resume_iteration`` from disk
        (weights only, this rank's shard); :meth:`on_resume` adds the resumed one. Call before
        loading the resume checkpoint: the model's values are overwritten.

        Returns the iterations loaded and those of the window that are missing on disk (with
        an iteration save interval: the saves an uninterrupted run would hold in its ring).
        """
        older = [
            it
            for it in list_iterations(root)
            if it < resume_iteration and (iteration_dir(root, it) / "metadata.json").is_file()
        ][-(self.ring.capacity - 1) :]
        load_snapshots(self.model, self.ring, root, older, self.config.seq_length)
        interval = self.config.checkpoint.save_interval
        if interval is None:
            return older, []
        saves = list(range(interval, resume_iteration, interval))[-(self.ring.capacity - 1) :]
        return older, sorted(set(saves) - set(older))

    def on_resume(self, progress: Progress) -> None:
        """Add the resumed checkpoint (the live values just loaded) as the newest snapshot."""
        self.ring.take(progress.iteration, self.position(progress))

    def due(self, progress: Progress) -> bool:
        """Whether the save at ``progress`` is a merge point: every ``merge.every``-th save
        interval (counted from the start of the run, so a restart changes nothing) and the end
        of training, once the ring (with this save) holds two snapshots."""
        c = self.config.checkpoint
        if c.save_interval is not None:
            saves = progress.iteration // c.save_interval
        else:
            saves = self.position(progress) // c.save_interval_tokens
        every = saves % self.config.merge.every == 0
        last = progress.iteration == self.config.train.train_iters
        return len(self.ring) + 1 >= 2 and (every or last)

    def on_save(self, progress: Progress) -> None:
        """Snapshot what was just saved."""
        self.ring.take(progress.iteration, self.position(progress))

    def fence(self) -> None:
        self.ring.fence()

    @contextmanager
    def merged(self, iteration: int) -> Iterator[MergePoint]:
        """Inside the block the model holds the merged values; afterwards, bitwise, the live
        ones. A non-finite merge is reported in the point (the model then holds live values)."""
        self.ring.ready()
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
        found = self._combine(snapshots, weights.coefficients)
        try:
            if found:
                self._restore()
                point = MergePoint(**{**point.__dict__, "nonfinite": self._culprit(snapshots)})
                self.last_point = point
            yield point
        finally:
            self._restore()

    # ------------------------------------------------------------------ merging
    def _combine(self, snapshots: list[Snapshot], coefficients: tuple[float, ...]) -> bool:
        checkpoints = [s.tensors for s in snapshots]
        return merge_into(self.ring.live, checkpoints, coefficients, self.ring.device)

    def _restore(self) -> None:
        """The live values back from the newest snapshot (they are what was just saved)."""
        copy_into(self.ring.live, self.ring.entries[-1].tensors)

    def _culprit(self, snapshots: list[Snapshot]) -> str:
        """Which snapshot holds NaN/Inf, over all ranks (only called when one does)."""
        local = ""
        for snapshot in snapshots:
            bad = [
                v.key
                for v, x in zip(self.values, snapshot.tensors, strict=True)
                if not bool(torch.isfinite(x).all())
            ]
            if bad:
                local = f"iteration {snapshot.iteration}'s checkpoint holds NaN/Inf in {bad[0]!r}"
                break
        if not dist.is_initialized():
            return local or "the merged values overflow"
        found: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(found, local)
        return next((f for f in found if f), "the merged values overflow")
