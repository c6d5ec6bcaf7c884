"""How a rank's shard values are cut into data-parallel slices: flat buckets, chunks, segments.

The tensors of one dtype that one process group replicates (the DP x CP group for dense
parameters, the expert-data-parallel group for expert parameters) are laid end to end in a
*bucket* of ``numel`` elements. The bucket is cut into chunks of ``chunk x size`` elements, and
rank ``r`` of the group owns elements ``[c·chunk·size + r·chunk, c·chunk·size + (r+1)·chunk)`` of
every chunk ``c``: about ``numel / size`` in all. An all-gather of one chunk's slices
(``all_gather_into_tensor``, rank-major) is that chunk of the bucket, so a merged chunk goes
back into every replica's live tensors without a temporary larger than one gathered chunk.

Everything here is plain index arithmetic on integers; :mod:`wsm_megatron.snapshots.ring`
does the copies.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

GATHER_CHUNK_BYTES = 256 * 2**20
"""Largest gathered chunk (bytes): the temporary a merge needs per dtype on the device."""


@dataclass(frozen=True)
class Segment:
    """``length`` elements of live tensor ``tensor`` from flat offset ``tensor_offset`` that
    sit at ``offset`` of a buffer (a slice or a gathered chunk)."""

    tensor: int
    tensor_offset: int
    offset: int
    length: int


def _segments(
    starts: Sequence[int], tensors: Sequence[int], lo: int, hi: int, base: int
) -> list[Segment]:
    """The live-tensor pieces of bucket range ``[lo, hi)``; ``base``: the buffer offset of
    ``lo``. ``starts``: each tensor's first bucket element, with the bucket's end appended."""
    out = []
    i = bisect.bisect_right(starts, lo) - 1
    while lo < hi:
        end = min(hi, starts[i + 1])
        if end > lo:
            out.append(Segment(tensors[i], lo - starts[i], base, end - lo))
            base += end - lo
            lo = end
        i += 1
    return out


@dataclass(frozen=True)
class Bucket:
    """The tensors ``tensors`` (indices into the live list) of one dtype, sliced over a group
    of ``size`` ranks of which this rank is ``rank``."""

    tensors: tuple[int, ...]
    numels: tuple[int, ...]
    size: int
    rank: int
    chunk: int
    """Elements per rank per chunk."""

    @classmethod
    def build(
        cls,
        tensors: Sequence[int],
        numels: Sequence[int],
        size: int,
        rank: int,
        element_size: int,
        gather_bytes: int = GATHER_CHUNK_BYTES,
    ) -> Bucket:
        assert 0 <= rank < size and len(tensors) == len(numels)
        per_rank = math.ceil(sum(numels) / size)
        chunk = max(1, min(per_rank, gather_bytes // (element_size * size)))
        return cls(tuple(tensors), tuple(numels), size, rank, chunk)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.numel / (self.chunk * self.size)))

    @property
    def slice_numel(self) -> int:
        """Elements this rank keeps per snapshot (its slices of every chunk, padding included)."""
        return self.chunks * self.chunk

    def _starts(self) -> list[int]:
        starts = [0]
        for n in self.numels:
            starts.append(starts[-1] + n)
        return starts

    def owned(self) -> list[Segment]:
        """The live pieces this rank copies into its slice (``offset``: in the slice)."""
        starts, out = self._starts(), []
        step = self.chunk * self.size
        for c in range(self.chunks):
            lo = min(self.numel, c * step + self.rank * self.chunk)
            hi = min(self.numel, lo + self.chunk)
            out += _segments(starts, self.tensors, lo, hi, c * self.chunk)
        return out

    def gathered(self) -> list[list[Segment]]:
        """Per chunk, the live pieces a gathered chunk fills (``offset``: in the chunk)."""
        starts = self._starts()
        step = self.chunk * self.size
        return [
            _segments(starts, self.tensors, c * step, min(self.numel, (c + 1) * step), 0)
            for c in range(self.chunks)
        ]
