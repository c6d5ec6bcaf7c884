"""Work units of a merge: output chunks cut into pieces that fit the memory budget, and a
byte-balanced assignment of the units to merge ranks.

The output takes the chunks of one input (the layout input). Each output chunk records, per
input it is read from, the stored chunks of that input that overlap it (:class:`Segment`;
exactly one, the same box, when the input has the output's layout). :func:`split_chunk` cuts an
output chunk into boxes whose elements are contiguous runs (rows along the outermost dimension
that keeps a box under the piece capacity); a piece then reads, from every input, its
intersection with each overlapping stored chunk. The pieces depend on the budget only, never on
the number of ranks; ranks receive contiguous runs of the unit list (ordered by position in the
newest input's files) carrying equal shares of bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from wsm_megatron.kernels import SUPPORTED_DTYPES
from wsm_megatron.merge.boxes import ChunkGrid, intersect
from wsm_megatron.merge.errors import MergeError

AVERAGE, COPY = "average", "copy"
_RESERVE_BYTES = 32 * 2**20
"""Part of the budget kept for everything but the piece buffers (plan, Python objects, the
file windows reader threads map for sub-box reads: at most one slot or 8 MiB each)."""


@dataclass(frozen=True)
class Segment:
    """A stored chunk of an input that overlaps an output chunk: its global box and where the
    input stores it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    info: object  # _StorageInfo


@dataclass(frozen=True)
class ChunkRef:
    """One output chunk of a tensor and, per input it is read from, the overlapping stored
    chunks of that input."""

    fqn: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[tuple[int, tuple[Segment, ...]], ...]  # (input index, segments)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class Piece:
    """A box of a chunk that is a contiguous run of its elements (``start`` .. + ``numel``)."""

    chunk: ChunkRef
    kind: str  # AVERAGE or COPY
    out_dtype: torch.dtype
    offsets: tuple[int, ...]  # global offsets of the box
    sizes: tuple[int, ...]
    start: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class BytesItem:
    """A stored object (a Megatron ``ShardedObject``), copied byte for byte."""

    fqn: str
    sources: tuple[tuple[int, object], ...]  # (input index, _StorageInfo)


Unit = Piece | BytesItem


MAX_GROUP = 32
"""Most pieces merged by one kernel call (small chunks: per-call costs would dominate)."""
OUT_ALIGN = 64
"""Byte alignment of each piece's output within a group's output buffer."""


@dataclass(frozen=True)
class Buffers:
    """Per-rank buffer sizes: ``capacity`` elements per piece; up to ``group`` pieces merged by
    one kernel call; ``slots`` read buffers of a piece each (every input of the group being
    merged, and of the next one, read ahead); ``out_buffers`` output buffers of a group each
    (one being written while the next is filled)."""

    capacity: int
    slots: int
    in_itemsize: int
    out_itemsize: int
    acc_itemsize: int
    out_buffers: int = 2
    group: int = 1

    @property
    def slot_bytes(self) -> int:
        return self.capacity * self.in_itemsize

    @property
    def out_bytes(self) -> int:
        return self.group * (self.capacity * self.out_itemsize + OUT_ALIGN)

    @property
    def total_bytes(self) -> int:
        """Bytes of all buffers, the kernel's scratch included."""
        per_piece = 2 * self.acc_itemsize + self.out_buffers * self.out_itemsize
        outs_align = self.out_buffers * self.group * OUT_ALIGN
        return self.capacity * (self.group * per_piece + self.slots * self.in_itemsize) + outs_align


def size_buffers(
    budget_bytes: int,
    *,
    slots: int,
    acc_dtype: torch.dtype,
    in_itemsize: int,
    out_itemsize: int,
    largest_chunk: int,
) -> Buffers:
    """Largest piece (in elements) such that all buffers fit ``budget_bytes``, then as many
    pieces per kernel call (at most :data:`MAX_GROUP`) as the budget still holds.

    Per element of a piece a rank holds ``slots`` prefetched input elements, two output
    elements (write-behind) and at most two ``acc_dtype`` elements of kernel scratch (the
    accumulator and a temporary, both bounded by the piece); a group of ``g`` pieces needs ``g``
    times all of that.
    """
    usable = budget_bytes - min(_RESERVE_BYTES, budget_bytes // 4)
    per_element = 2 * acc_dtype.itemsize + 2 * out_itemsize + slots * in_itemsize
    capacity = max(1, min((usable - 2 * OUT_ALIGN) // per_element, max(1, largest_chunk)))
    group = max(1, min(MAX_GROUP, usable // (capacity * per_element + 2 * OUT_ALIGN)))
    return Buffers(
        capacity, slots * group, in_itemsize, out_itemsize, acc_dtype.itemsize, group=group
    )


def split_chunk(
    sizes: Sequence[int], capacity: int
) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Cut a row-major chunk of shape ``sizes`` into boxes of at most ``capacity`` elements that
    are contiguous runs: ``[(box offsets within the chunk, box sizes, first flat index)]``."""
    sizes = tuple(sizes)
    total = math.prod(sizes)
    if total <= capacity or not sizes:
        return [((0,) * len(sizes), sizes, 0)]
    # The outermost dimension whose inner block (one "row") fits the capacity.
    dim = next(d for d in range(len(sizes)) if math.prod(sizes[d + 1 :]) <= capacity)
    inner = math.prod(sizes[dim + 1 :])
    rows = capacity // inner
    strides = [math.prod(sizes[d + 1 :]) for d in range(len(sizes))]
    boxes = []
    for outer in itertools.product(*(range(s) for s in sizes[:dim])):
        for r0 in range(0, sizes[dim], rows):
            r = min(rows, sizes[dim] - r0)
            offsets = (*outer, r0, *(0,) * (len(sizes) - dim - 1))
            box = (*(1,) * dim, r, *sizes[dim + 1 :])
            boxes.append((offsets, box, sum(o * s for o, s in zip(offsets, strides, strict=True))))
    return boxes


def overlapping_segments(
    grid: ChunkGrid, storage: Callable[[tuple[int, ...]], object], box: tuple, where: str
) -> tuple[Segment, ...]:
    """The stored chunks of ``grid`` overlapping the output chunk ``box``; they must cover it
    exactly once (``storage`` gives a chunk's ``_StorageInfo`` from its offsets)."""
    found = grid.overlapping(box)
    if found == [box]:  # the same chunk
        return (Segment(*box, storage(box[0])),)
    common = [(chunk, intersect(chunk, box)) for chunk in found]
    covered = sum(math.prod(part[1]) for _, part in common if part is not None)
    if covered != math.prod(box[1]):
        raise MergeError(
            f"{where}: the stored chunks cover {covered} of the {math.prod(box[1])} elements of "
            f"the box at {box[0]} of size {box[1]} (corrupt .metadata?)"
        )
    return tuple(Segment(*chunk, storage(chunk[0])) for chunk, part in common if part is not None)


def pieces_of(chunk: ChunkRef, kind: str, out_dtype: torch.dtype, capacity: int) -> list[Piece]:
    return [
        Piece(
            chunk,
            kind,
            out_dtype,
            tuple(a + b for a, b in zip(chunk.offsets, off, strict=True)),
            box,
            start,
        )
        for off, box, start in split_chunk(chunk.sizes, capacity)
    ]


def averageable(dtype: torch.dtype) -> bool:
    """Floating dtypes the accumulation kernels take (fp32, bf16, fp16, fp64)."""
    return dtype in SUPPORTED_DTYPES


def unit_cost(unit: Unit) -> int:
    """Bytes a unit reads plus bytes it writes (per job output), the balancing measure."""
    if isinstance(unit, BytesItem):
        return sum(info.length for _, info in unit.sources) * 2
    n = unit.numel
    reads = len(unit.chunk.sources) * n * unit.chunk.dtype.itemsize
    return reads + n * unit.out_dtype.itemsize


def _position(unit: Unit) -> tuple[str, int, int]:
    """Where the newest needed input stores the unit: file, item offset, element offset."""
    if isinstance(unit, BytesItem):
        info = unit.sources[-1][1]
        return (info.relative_path, info.offset, 0)
    segments = unit.chunk.sources[-1][1]
    if not segments:  # an empty chunk
        return ("", 0, 0)
    return (segments[0].info.relative_path, segments[0].info.offset, unit.start)


def assign_ranks(units: Sequence[Unit], world_size: int) -> list[list[Unit]]:
    """Split the units, ordered by file position, into ``world_size`` contiguous runs of about
    equal cost (bytes read + written); each rank then reads its files mostly sequentially."""
    ordered = sorted(units, key=_position)
    total = sum(unit_cost(u) for u in ordered)
    share = total / world_size if total else 1.0
    per_rank: list[list[Unit]] = [[] for _ in range(world_size)]
    done = 0
    for unit in ordered:
        cost = unit_cost(unit)
        rank = min(world_size - 1, int((done + cost / 2) // share))
        per_rank[rank].append(unit)
        done += cost
    return per_rank


@dataclass(frozen=True)
class InputRef:
    """An input checkpoint as the merge ranks see it."""

    iteration: int
    path: Path


@dataclass(frozen=True)
class JobPlan:
    """One output: its inputs (indices into the plan's inputs, oldest first), coefficients,
    the input its copied items come from and the temporary directory the ranks write into."""

    name: str | None
    inputs: tuple[int, ...]
    coefficients: tuple[float, ...]
    tmp_dir: Path
    copy_from: int

    @property
    def newest(self) -> int:
        return self.inputs[-1]


@dataclass(frozen=True)
class RankPlan:
    """Everything one merge rank needs: inputs, jobs, its units and buffer sizes."""

    rank: int
    world_size: int
    inputs: tuple[InputRef, ...]
    jobs: tuple[JobPlan, ...]
    units: tuple[Unit, ...]
    buffers: Buffers
    acc_dtype: torch.dtype
    check_finite: bool
    io_threads: int
    threads: int

    @property
    def read_bytes(self) -> int:
        total = 0
        for unit in self.units:
            if isinstance(unit, BytesItem):
                total += sum(info.length for _, info in unit.sources)
            else:
                total += len(unit.chunk.sources) * unit.numel * unit.chunk.dtype.itemsize
        return total
