"""A ring of the newest snapshots of a rank's shard values, sharded over data parallelism.

Each rank keeps only its slice (:mod:`wsm_megatron.snapshots.slicing`) of every snapshot: about
1/DP of its shard for dense parameters (the DP x CP group) and 1/EDP for expert parameters (the
expert-data-parallel group). A merge combines the slices with :func:`combine` (``wsm-merge``'s
computation; elementwise, so the bits are ``wsm-merge``'s) chunk by chunk, and all-gathers each
merged chunk straight into every replica's live tensors; putting the live values back does the
same from the newest slices. With ``shard=False`` (or DP = 1) the group has one rank: the ring
holds the whole shard and nothing is gathered.

Storage is allocated once, zeroed, one buffer per dtype (pinned by registering it with CUDA
when the ring is in host memory on a GPU machine: no per-tensor power-of-two rounding). On a
GPU, snapshot copies run on a side stream; :meth:`SnapshotRing.fence` makes the compute
stream wait for them before the live values change, :meth:`SnapshotRing.ready` waits on the
host before the ring is read. A host ring is streamed to the GPU chunk by chunk, double
buffered on the side stream, so the merge runs in the Triton kernel while the next chunk copies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wsm_megatron.merge.combine import DEFAULT_ACC_DTYPE, combine
from wsm_megatron.runtime.distributed import first_on_any_rank
from wsm_megatron.snapshots.slicing import GATHER_CHUNK_BYTES, Bucket, Segment
from wsm_megatron.snapshots.values import ShardValue


@dataclass
class Snapshot:
    """This rank's slices of the shard values saved at ``iteration`` (``position``: the tokens
    consumed by then), one 1-D tensor per bucket of the ring."""

    iteration: int
    position: int
    slices: list[torch.Tensor]
    slot: int = 0
    """Which of the ring's preallocated buffers holds it."""


@dataclass
class _RingBucket:
    bucket: Bucket
    dtype: torch.dtype
    group: dist.ProcessGroup | None
    owned: list[Segment]
    gathered: list[list[Segment]]
    out: torch.Tensor
    """One merged chunk (``bucket.chunk`` elements, compute device)."""
    full: torch.Tensor | None
    """One gathered chunk (``chunk x size``), or None when the group has one rank."""


def _groups(shard: bool) -> dict[bool, dist.ProcessGroup | None]:
    """The process group each kind of value is sliced over (by ``expert``)."""
    if not (shard and dist.is_initialized()):
        return {False: None, True: None}
    from megatron.core import parallel_state

    return {
        False: parallel_state.get_data_parallel_group(with_context_parallel=True),
        True: parallel_state.get_expert_data_parallel_group(),
    }


def _size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def plan_buckets(
    values: Sequence[ShardValue], shard: bool, gather_bytes: int = GATHER_CHUNK_BYTES
) -> list[tuple[Bucket, torch.dtype, dist.ProcessGroup | None]]:
    """The ring's buckets: one per (expert or not, dtype), in order of first appearance."""
    groups = _groups(shard)
    order: dict[tuple[bool, torch.dtype], list[int]] = {}
    for i, v in enumerate(values):
        order.setdefault((v.expert, v.tensor.dtype), []).append(i)
    out = []
    for (expert, dtype), members in order.items():
        size, rank = _size_rank(groups[expert])
        numels = [values[i].tensor.numel() for i in members]
        element = torch.empty((), dtype=dtype).element_size()
        out.append(
            (
                Bucket.build(members, numels, size, rank, element, gather_bytes),
                dtype,
                groups[expert],
            )
        )
    return out


def ring_bytes(values: Sequence[ShardValue], capacity: int, shard: bool) -> int:
    """What a ring of ``capacity`` snapshots of ``values`` holds on this rank (bytes)."""
    return capacity * sum(
        b.slice_numel * torch.empty((), dtype=d).element_size()
        for b, d, _ in plan_buckets(values, shard)
    )


class SnapshotRing:
    """The newest ``capacity`` snapshots of this rank's slices of ``values``, oldest first."""

    def __init__(
        self,
        values: Sequence[ShardValue],
        capacity: int,
        device: torch.device,
        *,
        shard: bool = True,
        gather_bytes: int = GATHER_CHUNK_BYTES,
        stage: bool | None = None,
    ) -> None:
        """``stage``: copy each chunk to the compute device before combining it (default:
        when the ring is not on the compute device; forced on CPU only to test the path)."""
        self.values = list(values)
        self.live = [v.tensor for v in self.values]
        for v in self.values:
            if not v.tensor.is_contiguous():
                raise ValueError(
                    f"merge.shard_ring: {v.key!r} is not contiguous in memory, so the ring "
                    "cannot cut it into slices; please report the model layout"
                )
        self._flat = [t.view(-1) for t in self.live]
        self.capacity = capacity
        self.device = device
        self.compute = self.live[0].device if self.live else torch.device("cpu")
        self._cuda = self.compute.type == "cuda"
        self._stream = torch.cuda.Stream() if self._cuda else None
        self._event: torch.cuda.Event | None = None
        self.buckets = [
            self._bucket(b, dtype, group)
            for b, dtype, group in plan_buckets(values, shard, gather_bytes)
        ]
        self._slots = self._allocate()
        self._free = list(range(capacity))
        self.entries: deque[Snapshot] = deque()
        self._staged = self.device != self.compute if stage is None else stage
        self._staging = self._allocate_staging() if self._staged else None

    # ------------------------------------------------------------------ set-up
    def _bucket(self, b: Bucket, dtype: torch.dtype, group: dist.ProcessGroup | None):
        kw = {"dtype": dtype, "device": self.compute}
        full = torch.empty(b.chunk * b.size, **kw) if b.size > 1 else None
        return _RingBucket(
            b, dtype, group, b.owned(), b.gathered(), torch.empty(b.chunk, **kw), full
        )

    def _allocate(self) -> list[list[torch.Tensor]]:
        """One zeroed buffer per dtype for every slot (padding stays zero: finite), cut into
        per-slot, per-bucket views."""
        per_dtype: dict[torch.dtype, int] = {}
        for rb in self.buckets:
            per_dtype[rb.dtype] = per_dtype.get(rb.dtype, 0) + rb.bucket.slice_numel
        storage = {
            d: _host_or_device(self.capacity * n, d, self.device, self._cuda)
            for d, n in per_dtype.items()
        }
        self.storage = storage
        slots = []
        for s in range(self.capacity):
            used = {d: s * n for d, n in per_dtype.items()}
            views = []
            for rb in self.buckets:
                start = used[rb.dtype]
                views.append(storage[rb.dtype][start : start + rb.bucket.slice_numel])
                used[rb.dtype] = start + rb.bucket.slice_numel
            slots.append(views)
        return slots

    def _allocate_staging(self) -> list[list[list[torch.Tensor]]]:
        """Two sets of per-snapshot, per-bucket chunk buffers on the compute device."""
        return [
            [
                [
                    torch.empty(rb.bucket.chunk, dtype=rb.dtype, device=self.compute)
                    for rb in self.buckets
                ]
                for _ in range(self.capacity)
            ]
            for _ in range(2)
        ]

    @property
    def nbytes(self) -> int:
        """The ring's storage on this rank."""
        return sum(t.numel() * t.element_size() for t in self.storage.values())

    @property
    def snapshot_bytes(self) -> int:
        return self.nbytes // self.capacity

    @property
    def device_bytes(self) -> int:
        """Working buffers on the compute device (merged and gathered chunks, staging)."""
        tensors = [rb.out for rb in self.buckets] + [
            rb.full for rb in self.buckets if rb.full is not None
        ]
        if self._staging is not None:
            tensors += [t for s in self._staging for per in s for t in per]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __len__(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------------ snapshots
    @torch.no_grad()
    def take(self, iteration: int, position: int) -> None:
        """Copy this rank's slices of the live values in as the snapshot of ``iteration``."""
        self.ready()
        if len(self.entries) == self.capacity:
            self._free.append(self.entries.popleft().slot)
        slot = self._free.pop(0)
        slices = self._slots[slot]
        pairs = [
            (
                slices[b][s.offset : s.offset + s.length],
                self._flat[s.tensor][s.tensor_offset : s.tensor_offset + s.length],
            )
            for b, rb in enumerate(self.buckets)
            for s in rb.owned
        ]
        if self._stream is None:
            if pairs:
                torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
        else:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
            self._event = self._stream.record_event()
        self.entries.append(Snapshot(iteration, position, slices, slot))

    @torch.no_grad()
    def adopt(self, other: SnapshotRing) -> None:
        """Copy ``other``'s snapshots in, oldest first: a ring of the same values and slicing
        (a smaller one that a window outgrew), so that nothing is read from disk again."""
        other.ready()
        for snapshot in other.entries:
            if len(self.entries) == self.capacity:
                self._free.append(self.entries.popleft().slot)
            slot = self._free.pop(0)
            slices = self._slots[slot]
            assert [t.numel() for t in slices] == [t.numel() for t in snapshot.slices]
            torch._foreach_copy_(slices, snapshot.slices)
            self.entries.append(Snapshot(snapshot.iteration, snapshot.position, slices, slot))

    def fence(self) -> None:
        """Make the compute stream wait for pending copies (call before the values change)."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)

    def ready(self) -> None:
        """Wait for pending copies on the host (call before the ring is read)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge_into_live(self, snapshots: Sequence[Snapshot], coefficients: Sequence[float]) -> bool:
        """Write ``sum_j c_j snapshots[j]`` (oldest first) into every replica's live values;
        returns whether a merged value is non-finite on any rank (one reduced flag)."""
        self.ready()
        found = torch.zeros(1, dtype=torch.int32, device=self.compute)
        for b, c, inputs in self._chunks(snapshots):
            rb = self.buckets[b]
            combine(
                [rb.out],
                [[x] for x in inputs],
                coefficients,
                acc_dtype=DEFAULT_ACC_DTYPE,
                found_nonfinite=found,
            )
            self._publish(rb, c, rb.out)
        if dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item())

    @torch.no_grad()
    def restore_live(self, snapshot: Snapshot) -> None:
        """Put ``snapshot``'s values into every replica's live values (bitwise)."""
        self.ready()
        for b, c, (values,) in self._chunks([snapshot]):
            self._publish(self.buckets[b], c, values)

    def _publish(self, rb: _RingBucket, c: int, values: torch.Tensor) -> None:
        """Gather chunk ``c``'s slices of ``values`` over the bucket's group into the live
        tensors of every replica."""
        if rb.full is None:
            gathered = values
        else:
            dist.all_gather_into_tensor(rb.full, values, group=rb.group)
            gathered = rb.full
        pairs = [
            (
                self._flat[s.tensor][s.tensor_offset : s.tensor_offset + s.length],
                gathered[s.offset : s.offset + s.length],
            )
            for s in rb.gathered[c]
        ]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])

    def _view(self, snapshot: Snapshot, b: int, c: int) -> torch.Tensor:
        k = self.buckets[b].bucket.chunk
        return snapshot.slices[b][c * k : (c + 1) * k]

    def _chunks(
        self, snapshots: Sequence[Snapshot]
    ) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """``(bucket, chunk, the snapshots' slices of it on the compute device)``, in order;
        a host ring on a GPU is copied in on the side stream one chunk ahead."""
        items = [(b, c) for b, rb in enumerate(self.buckets) for c in range(rb.bucket.chunks)]
        if not self._staged:
            for b, c in items:
                yield b, c, [self._view(s, b, c) for s in snapshots]
            return
        released: list[torch.cuda.Event | None] = [None, None]
        ahead = self._prefetch(snapshots, *items[0], 0, None) if items else None
        for i, (b, c) in enumerate(items):
            tensors, copied = ahead
            if copied is not None:
                torch.cuda.current_stream().wait_event(copied)
            if i + 1 < len(items):
                ahead = self._prefetch(snapshots, *items[i + 1], (i + 1) % 2, released[(i + 1) % 2])
            yield b, c, tensors
            if self._cuda:
                released[i % 2] = torch.cuda.current_stream().record_event()

    def _prefetch(self, snapshots, b, c, which, released):
        assert self._staging is not None
        buffers = [self._staging[which][j][b] for j in range(len(snapshots))]
        if self._stream is None:
            for dst, s in zip(buffers, snapshots, strict=True):
                dst.copy_(self._view(s, b, c))
            return buffers, None
        with torch.cuda.stream(self._stream):
            if released is not None:
                self._stream.wait_event(released)
            for dst, s in zip(buffers, snapshots, strict=True):
                dst.copy_(self._view(s, b, c), non_blocking=True)
            return buffers, self._stream.record_event()

    # ------------------------------------------------------------------ diagnosis
    def culprit(self, snapshots: Sequence[Snapshot]) -> str:
        """Which snapshot holds NaN/Inf, over all ranks (only called when one does)."""
        local = None
        for snapshot in snapshots:
            key = self._nonfinite_key(snapshot)
            if key is not None:
                local = f"iteration {snapshot.iteration}'s checkpoint holds NaN/Inf in {key!r}"
                break
        return first_on_any_rank(local) or "the merged values overflow"

    def _nonfinite_key(self, snapshot: Snapshot) -> str | None:
        for rb, values in zip(self.buckets, snapshot.slices, strict=True):
            for s in rb.owned:
                if not bool(torch.isfinite(values[s.offset : s.offset + s.length]).all()):
                    return self.values[s.tensor].key
        return None


def _host_or_device(
    numel: int, dtype: torch.dtype, device: torch.device, cuda: bool
) -> torch.Tensor:
    """A zeroed buffer; in host memory on a GPU machine, page-locked in place (registered with
    CUDA: exactly its size, where ``pin_memory=True`` rounds up to a power of two)."""
    buffer = torch.zeros(numel, dtype=dtype, device=device)
    if cuda and device.type == "cpu" and numel:
        nbytes = numel * buffer.element_size()
        err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        if int(err) != 0:  # not registrable here (e.g. a container's locked-memory limit)
            buffer = buffer.pin_memory()
    return buffer
