"""``wsm-tune``'s distributed part: every candidate merged in memory, put into the model at the
run's own layout, scored, and the live values restored; nothing is written per candidate.

Each rank works on its own shard only (the tensors a merge averages, :func:`shard_values`).
When the snapshots of every checkpoint the largest window needs fit in
``--snapshot-memory-gb``, each checkpoint is loaded once per data-parallel group into the
sharded snapshot ring (:mod:`wsm_megatron.snapshots`: each rank keeps its 1/DP slice) and every
candidate is combined from the slices (``wsm-merge``'s computation) and gathered into the
model. Otherwise
the candidates run in groups: each group keeps one fp32 accumulator per candidate and reads its
checkpoints once, oldest first, adding each one's share with :func:`accumulate_` (the same bits
as the combined sum, up to the sign of zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from wsm_megatron.kernels import accumulate_
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.snapshots.loading import load_checkpoints, load_snapshots
from wsm_megatron.snapshots.memory import GIB
from wsm_megatron.snapshots.ring import SnapshotRing, ring_bytes
from wsm_megatron.snapshots.values import shard_values
from wsm_megatron.training.config import WSMConfig
from wsm_megatron.tune.candidates import Candidate, window_of

Scores = dict[str, float]
Scorer = Callable[[], Scores]


@dataclass(frozen=True)
class MemoryPlan:
    """How the merges run: all from snapshots (one group), or in groups of accumulators."""

    snapshot_bytes: int
    """One snapshot of the largest rank's shard values (stored dtype)."""
    accumulator_bytes: int
    """One fp32 accumulator of the same values."""
    window: int
    """Checkpoints the candidates need together."""
    budget_gb: float
    groups: tuple[tuple[Candidate, ...], ...]
    snapshots: bool

    def describe(self) -> str:
        need = self.window * self.snapshot_bytes / GIB
        text = (
            f"snapshots: {self.window} checkpoints x {self.snapshot_bytes / GIB:.3g} GiB = "
            f"{need:.3g} GiB per rank (budget --snapshot-memory-gb {self.budget_gb:g})"
        )
        if self.snapshots:
            return text + "; every candidate formed from them"
        size = max(len(g) for g in self.groups)
        return (
            f"{text}: above the budget, so the candidates run in {len(self.groups)} group(s) of "
            f"up to {size}, each with fp32 accumulators of {self.accumulator_bytes / GIB:.3g} "
            f"GiB per candidate ({size * self.accumulator_bytes / GIB:.3g} GiB per rank), "
            "reading each checkpoint once per group"
        )


def plan_memory(
    merges: Sequence[Candidate], snapshot_bytes: int, accumulator_bytes: int, budget_gb: float
) -> MemoryPlan:
    """Snapshots when the window fits ``budget_gb``, else the fewest groups of accumulators
    that fit; refused in one line when not even one accumulator does."""
    budget = budget_gb * GIB
    window = len(window_of(merges))
    plan = {"snapshot_bytes": snapshot_bytes, "accumulator_bytes": accumulator_bytes}
    plan.update(window=window, budget_gb=budget_gb)
    if window * snapshot_bytes <= budget:
        return MemoryPlan(**plan, groups=(tuple(merges),), snapshots=True)
    per_group = int(budget // accumulator_bytes) if accumulator_bytes else len(merges)
    if per_group < 1:
        raise MergeError(
            f"--snapshot-memory-gb {budget_gb:g}: the window's {window} snapshots need "
            f"{window * snapshot_bytes / GIB:.3g} GiB per rank and one candidate's fp32 "
            f"accumulators {accumulator_bytes / GIB:.3g} GiB; raise the budget"
        )
    count = math.ceil(len(merges) / per_group)
    size = math.ceil(len(merges) / count)  # balanced groups
    groups = tuple(tuple(merges[i : i + size]) for i in range(0, len(merges), size))
    return MemoryPlan(**plan, groups=groups, snapshots=False)


def _largest(value: int) -> int:
    """The largest value over all ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


ScoreTable = dict[str, Scores | None]
"""Each candidate's scores by name; None: its merged values are non-finite."""


class CandidateRunner:
    """Forms and scores the candidates on this rank's shard of ``model``."""

    def __init__(
        self, config: WSMConfig, model: list[torch.nn.Module], root: Path, budget_gb: float
    ) -> None:
        self.config = config
        self.model = model
        self.root = root
        self.budget_gb = budget_gb
        self.values = shard_values(model)
        self.live = [v.tensor for v in self.values]

    def plan(self, merges: Sequence[Candidate]) -> MemoryPlan:
        numel = sum(t.numel() for t in self.live)
        stored = ring_bytes(self.values, 1, shard=True)  # one snapshot's slice on this rank
        return plan_memory(merges, _largest(stored), _largest(numel * 4), self.budget_gb)

    def run(self, newest: Candidate, plan: MemoryPlan, score: Scorer) -> ScoreTable:
        """The scores of ``newest`` (the newest checkpoint alone) and of every planned merge."""
        out: ScoreTable = {}
        if plan.snapshots:
            self._from_snapshots(newest, plan.groups[0], score, out)
        else:
            for k, group in enumerate(plan.groups):
                self._from_accumulators(newest if k == 0 else None, group, score, out)
        return out

    def _from_snapshots(
        self, newest: Candidate, merges: Sequence[Candidate], score: Scorer, out: ScoreTable
    ) -> None:
        window = window_of([newest, *merges])
        ring = self.new_ring(len(window))
        load_snapshots(self.model, ring, self.root, window, self.config.seq_length)
        self.score_ring(ring, newest, merges, score, out)

    def new_ring(self, capacity: int) -> SnapshotRing:
        """An empty ring of ``capacity`` snapshots of this rank's slices (host memory)."""
        return SnapshotRing(self.values, capacity, torch.device("cpu"), shard=True)

    def score_ring(
        self,
        ring: SnapshotRing,
        newest: Candidate,
        merges: Sequence[Candidate],
        score: Scorer,
        out: ScoreTable,
    ) -> None:
        """Score ``newest`` (the model must hold it) and every merge formed from the snapshots
        in ``ring`` (which holds every checkpoint they need); the model ends with ``newest``."""
        ring.ready()
        by_iteration = {s.iteration: s for s in ring.entries}
        out[newest.name] = score()
        for c in merges:
            inputs = [by_iteration[it] for it in c.iterations]
            bad = ring.merge_into_live(inputs, c.coefficients)
            out[c.name] = None if bad else score()
            ring.restore_live(by_iteration[newest.iterations[-1]])

    @torch.no_grad()
    def _from_accumulators(
        self,
        newest: Candidate | None,
        merges: Sequence[Candidate],
        score: Scorer,
        out: ScoreTable,
    ) -> None:
        cpu = torch.device("cpu")
        accs = {c.name: [torch.zeros(t.shape, device=cpu) for t in self.live] for c in merges}
        flags = {c.name: torch.zeros(1, dtype=torch.int32) for c in merges}
        window = window_of(merges)
        for it, _ in load_checkpoints(self.model, self.root, window, self.config.seq_length):
            host = [t.to(cpu) for t in self.live]
            for c in merges:
                if it in c.iterations:
                    weight = c.coefficients[c.iterations.index(it)]
                    accumulate_(accs[c.name], host, weight, found_nonfinite=flags[c.name])
        if newest is not None:  # the model holds the newest checkpoint, the end of every window
            out[newest.name] = score()
        for c in merges:
            if _largest(int(flags[c.name].item())):
                out[c.name] = None
                continue
            with torch.no_grad():
                for target, value in zip(self.live, accs[c.name], strict=True):
                    target.copy_(value)  # the fp32 accumulator, rounded once
            out[c.name] = score()
