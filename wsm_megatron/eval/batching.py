"""How evaluation rows become schedule calls: sorted, packed, padded, split over data parallelism.

A *row* is one sequence to score. Rows are sorted longest first (as lm-eval's ``hf`` backend
does), packed ``batch_size`` to a micro-batch, and micro-batches grouped into calls of
megatron-core's forward-backward schedule (several micro-batches per call, so pipeline stages
overlap); every micro-batch of a call has the call's padded length, as the schedule's
point-to-point shapes require. Calls go round-robin to the data-parallel replicas; the calls of
one round share one shape and every replica runs every round (a replica without a call of its
own runs a dummy one), so expert-parallel layers, whose all-gathers span replicas, stay in
lockstep. The plan is a pure function of the lengths: every rank computes the same one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DUMMY = -1
"""A row index that stands for padding (a row of no request, its scores thrown away)."""


@dataclass(frozen=True)
class Packing:
    """How rows are packed: ``batch_size`` rows per micro-batch, ``microbatches`` per call,
    lengths rounded up to ``length_multiple`` (sequence parallelism: the TP size), calls a
    multiple of ``microbatch_multiple`` micro-batches (the interleaved schedule: the PP size)."""

    batch_size: int
    microbatches: int = 1
    length_multiple: int = 1
    microbatch_multiple: int = 1
    dp_size: int = 1

    def __post_init__(self) -> None:
        assert min(self.batch_size, self.microbatches, self.length_multiple) >= 1
        assert self.microbatches % self.microbatch_multiple == 0 and self.dp_size >= 1


@dataclass(frozen=True)
class Call:
    """One schedule call: micro-batches of row indices (:data:`DUMMY` for padding rows), every
    one padded to ``length`` tokens."""

    length: int
    microbatches: tuple[tuple[int, ...], ...]

    @property
    def rows(self) -> list[int]:
        return [i for mb in self.microbatches for i in mb if i != DUMMY]


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Row indices, longest first; equal lengths keep their order."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _calls(lengths: Sequence[int], packing: Packing) -> list[tuple[tuple[int, ...], ...]]:
    """Every call's micro-batches, over all replicas, longest first."""
    order = longest_first(lengths)
    b = packing.batch_size
    microbatches = [tuple(order[i : i + b]) for i in range(0, len(order), b)]
    microbatches[-1:] = [mb + (DUMMY,) * (b - len(mb)) for mb in microbatches[-1:]]
    m = packing.microbatches
    calls = [tuple(microbatches[i : i + m]) for i in range(0, len(microbatches), m)]
    if calls and len(calls[-1]) % packing.microbatch_multiple:
        short = packing.microbatch_multiple - len(calls[-1]) % packing.microbatch_multiple
        calls[-1] += ((DUMMY,) * b,) * short
    return calls


def plan_calls(lengths: Sequence[int], packing: Packing, dp_rank: int) -> list[Call]:
    """The calls replica ``dp_rank`` runs for rows of ``lengths`` tokens; every replica runs as
    many calls, of the same shapes, and each row is in exactly one replica's calls."""
    if not lengths:
        return []
    calls = _calls(lengths, packing)
    dp = packing.dp_size
    planned = []
    for start in range(0, len(calls), dp):
        round_ = calls[start : start + dp]
        longest = max(lengths[i] for mbs in round_ for mb in mbs for i in mb if i != DUMMY)
        length = _round_up(longest, packing.length_multiple)
        size = max(len(mbs) for mbs in round_)
        mine = round_[dp_rank] if dp_rank < len(round_) else ()
        dummy = ((DUMMY,) * packing.batch_size,) * (size - len(mine))
        planned.append(Call(length, tuple(mine) + dummy))
    return planned
