"""Boxes of a global tensor: intersecting an output piece with an input's stored chunks, and
reading a sub-box of a stored chunk into a piece buffer.

A stored chunk is a contiguous row-major array inside its ``.distcp`` file (see
:func:`wsm_megatron.merge.dcp_format.locate_tensor`). A sub-box that is a contiguous run both in
the stored chunk and in the piece is one ``pread``; any other sub-box (a column slice of a
row-split chunk, or rows landing in a column slice of the piece) is copied by ``torch`` from a
read-only ``mmap`` of the file region, one bounded window at a time, so that a rank touches
only the pages of the elements it merges and never issues one system call per row.
"""

from __future__ import annotations

import bisect
import itertools
import math
import mmap
from collections.abc import Iterator, Sequence

import torch

from wsm_megatron.merge.dcp_format import RawTensor, StorageFiles

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)
MAP_WINDOW_BYTES = 8 * 2**20
"""Largest file region one reader thread maps at a time (fewer, larger maps are faster: 1 MiB
windows copy a column slice at ~1.7 GiB/s, 8 MiB ones at ~5 GiB/s on the 2-core VM)."""


def intersect(a: Box, b: Box) -> Box | None:
    """The common box of ``a`` and ``b`` (same rank), or None if they do not overlap."""
    offsets, sizes = [], []
    for x, n, y, m in zip(a[0], a[1], b[0], b[1], strict=True):
        low, high = max(x, y), min(x + n, y + m)
        if high <= low:
            return None
        offsets.append(low)
        sizes.append(high - low)
    return tuple(offsets), tuple(sizes)


def _strides(sizes: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.prod(sizes[d + 1 :]) for d in range(len(sizes)))


def flat_index(offsets: Sequence[int], sizes: Sequence[int]) -> int:
    """Row-major index of the element at ``offsets`` in an array of shape ``sizes``."""
    return sum(o * s for o, s in zip(offsets, _strides(sizes), strict=True))


def is_run(sub_sizes: Sequence[int], sizes: Sequence[int]) -> bool:
    """Whether any box of shape ``sub_sizes`` in a row-major array of shape ``sizes`` is one
    contiguous run of its elements."""
    outer = next((d for d, n in enumerate(sub_sizes) if n > 1), len(sub_sizes))
    return all(n == m for n, m in zip(sub_sizes[outer + 1 :], sizes[outer + 1 :], strict=True))


class ChunkGrid:
    """The stored chunks of one tensor in one input, indexed for box queries (a Megatron
    checkpoint splits each axis evenly, so its chunks form a grid; others are scanned)."""

    def __init__(self, chunks: Sequence[Box]) -> None:
        self.chunks = list(chunks)
        self._sizes = dict(self.chunks)  # offsets -> sizes
        self._starts: list[list[int]] | None = None  # built on the first inexact query
        self._cells: dict[tuple[int, ...], Box] | None = None

    def _index(self) -> None:
        rank = len(self.chunks[0][0]) if self.chunks else 0
        self._starts = [sorted({c[0][d] for c in self.chunks}) for d in range(rank)]
        cells = {}
        for chunk in self.chunks:
            starts = zip(self._starts, chunk[0], strict=True)
            cells[tuple(bisect.bisect_left(s, o) for s, o in starts)] = chunk
        grid = len(cells) == len(self.chunks) == math.prod(len(s) for s in self._starts)
        self._cells = cells if grid else None

    def overlapping(self, box: Box) -> list[Box]:
        """The chunks that share at least one element with ``box``, in row-major order."""
        if self._sizes.get(box[0]) == box[1]:  # the same layout
            return [box]
        if self._starts is None:
            self._index()
        if self._cells is None:
            return sorted(c for c in self.chunks if intersect(c, box) is not None)
        ranges = []
        for starts, o, n in zip(self._starts, box[0], box[1], strict=True):
            lo = max(0, bisect.bisect_right(starts, o) - 1)
            ranges.append(range(lo, bisect.bisect_left(starts, o + max(n, 1))))
        return [self._cells[cell] for cell in itertools.product(*ranges)]


def read_box(
    files: StorageFiles,
    raw: RawTensor,
    src_offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    buffer: memoryview,
    dst_offsets: tuple[int, ...],
    dst_sizes: tuple[int, ...],
    window: int = MAP_WINDOW_BYTES,
) -> None:
    """Copy the box ``src_offsets``/``sizes`` of the stored chunk ``raw`` into the box
    ``dst_offsets``/``sizes`` of the row-major array of shape ``dst_sizes`` in ``buffer``,
    mapping at most ``window`` bytes of the file at a time."""
    isz = raw.itemsize
    if math.prod(sizes) == 0:
        return
    if is_run(sizes, raw.size) and is_run(sizes, dst_sizes):
        start = flat_index(dst_offsets, dst_sizes) * isz
        offset = raw.data_offset + flat_index(src_offsets, raw.size) * isz
        files.read_into(raw.path, offset, buffer[start : start + math.prod(sizes) * isz])
        return
    dst = torch.frombuffer(buffer, dtype=raw.dtype, count=math.prod(dst_sizes)).view(dst_sizes)
    rel = tuple(d - s for d, s in zip(dst_offsets, src_offsets, strict=True))
    for offsets, box in _windows(src_offsets, sizes, raw.size, max(1, window // isz)):
        where = zip(offsets, rel, box, strict=True)
        target = dst[tuple(slice(o + r, o + r + n) for o, r, n in where)]
        _copy_mapped(files, raw, offsets, box, target)


def _windows(
    offsets: tuple[int, ...], sizes: tuple[int, ...], shape: tuple[int, ...], limit: int
) -> Iterator[Box]:
    """Cut a box of an array of ``shape`` into boxes whose row-major span is at most ``limit``
    elements (or one element row of the innermost dimension, cut to ``limit``)."""
    outer = next((d for d, n in enumerate(sizes) if n > 1), len(sizes) - 1)
    stride = _strides(shape)[outer]
    if stride > limit and outer < len(sizes) - 1:  # one row is too wide: split each row
        for r in range(sizes[outer]):
            row_offsets = (*offsets[:outer], offsets[outer] + r, *offsets[outer + 1 :])
            row_sizes = (*sizes[:outer], 1, *sizes[outer + 1 :])
            yield from _windows(row_offsets, row_sizes, shape, limit)
        return
    rows = max(1, limit // max(stride, 1))
    for r in range(0, sizes[outer], rows):
        n = min(rows, sizes[outer] - r)
        yield (
            (*offsets[:outer], offsets[outer] + r, *offsets[outer + 1 :]),
            (*sizes[:outer], n, *sizes[outer + 1 :]),
        )


def _copy_mapped(
    files: StorageFiles,
    raw: RawTensor,
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    target: torch.Tensor,
) -> None:
    """``target.copy_`` of the box of ``raw`` through a read-only map of the bytes it spans."""
    isz = raw.itemsize
    first = flat_index(offsets, raw.size)
    last = flat_index(tuple(o + n - 1 for o, n in zip(offsets, sizes, strict=True)), raw.size)
    start = raw.data_offset + first * isz
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    length = start - aligned + (last - first + 1) * isz
    with files.map(raw.path, aligned, length) as region:
        flat = torch.frombuffer(region, dtype=torch.uint8, offset=start - aligned)
        src = flat.view(raw.dtype).as_strided(sizes, _strides(raw.size))
        target.copy_(src)
        del flat, src  # release the buffer export before the map closes
