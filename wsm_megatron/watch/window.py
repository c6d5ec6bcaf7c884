"""The watcher's sliding window: the newest checkpoints it has read, kept as in-memory snapshots
of this rank's shard (one :class:`~wsm_megatron.snapshots.ring.SnapshotRing`, each rank holding
its 1/DP slice), so each checkpoint of a live run is read from disk once and feeds every
candidate of every window it falls in.

A new checkpoint is loaded into the model and taken into the ring (the oldest snapshot leaves).
A window that needs more checkpoints than the ring holds (a token window early in a run) gets
a larger ring, the snapshots held copied over. The ring is filled from disk at start-up, after
a restart or a failed load, and read again only when a window reaches back to a checkpoint
older than those it holds. When the window's snapshots would not fit
``--snapshot-memory-gb``, the candidates run as wsm-tune runs them above its budget (groups of
accumulators, the window read again for each checkpoint), and the watcher says so once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from wsm_megatron.snapshots.loading import load_snapshots
from wsm_megatron.snapshots.memory import GIB
from wsm_megatron.snapshots.ring import SnapshotRing
from wsm_megatron.tune.candidates import Candidate, window_of
from wsm_megatron.tune.runner import CandidateRunner, MemoryPlan, Scorer, ScoreTable


class SlidingWindow:
    """Snapshots of the newest checkpoints read, oldest first, for :meth:`score`."""

    def __init__(
        self, runner: CandidateRunner, say: Callable[[str], None], capacity: int = 1
    ) -> None:
        """``capacity``: the snapshots a window needs at most when known (the largest
        ``--durations``), so that the ring is not rebuilt while the run's first windows grow."""
        self.runner = runner
        self.say = say
        self.capacity = capacity
        self.ring: SnapshotRing | None = None
        self.reads = 0
        """Checkpoints read from disk so far (a checkpoint read twice counts twice)."""
        self._warned = False

    @property
    def iterations(self) -> list[int]:
        """The checkpoints held, oldest first (what a restart would read again)."""
        return [] if self.ring is None else [s.iteration for s in self.ring.entries]

    def reset(self) -> None:
        """Drop every snapshot (after a failed load: the ring may hold half of one)."""
        self.ring = None

    def score(
        self, newest: Candidate, merges: Sequence[Candidate], span: Sequence[int], score: Scorer
    ) -> ScoreTable:
        """The scores of ``newest`` (the newest checkpoint alone) and of ``merges``, which
        all end at it; ``span``: the checkpoints the window holds, oldest first (every
        checkpoint of the merges' windows, those an interval leaves out included, so that the
        next checkpoint's windows find theirs held)."""
        runner, out = self.runner, {}
        plan = runner.plan(merges)
        span = sorted(set(span) | set(window_of([newest, *merges])))
        size = max(len(span), self.capacity)
        if size * plan.snapshot_bytes > plan.budget_gb * GIB:
            self._over_budget(plan, size)
            self.reset()
            self.reads += len(window_of([newest, *merges]))
            return runner.run(newest, plan, score)
        missing = [it for it in span if it not in self.iterations]
        assert missing and missing[-1] == newest.iterations[0]  # a checkpoint is scored once
        if not self._only_newer(missing):
            self._rebuild(span, size)
        else:
            if self.ring is None or self.ring.capacity < len(span):
                self._grow(size)
            self._read(missing)
        runner.score_ring(self.ring, newest, merges, score, out)  # the model holds the newest
        return out

    def _only_newer(self, missing: Sequence[int]) -> bool:
        """Whether the checkpoints it lacks are all newer than those it holds (the window
        slides or grows; otherwise it is read again)."""
        held = self.iterations
        return not held or all(it > held[-1] for it in missing)

    def _grow(self, size: int) -> None:
        """A ring of ``size`` that keeps the snapshots held (copied over, not read again)."""
        grown = self.runner.new_ring(size)
        if self.ring is not None:
            grown.adopt(self.ring)
        self.ring = grown

    def _rebuild(self, span: Sequence[int], size: int) -> None:
        if self.ring is not None:
            self.say(f"re-reading {len(span)} checkpoint(s) into a window of {size}")
        self.ring = self.runner.new_ring(size)
        self._read(span)

    def _read(self, iterations: Sequence[int]) -> None:
        assert self.ring is not None
        runner = self.runner
        load_snapshots(runner.model, self.ring, runner.root, iterations, runner.config.seq_length)
        self.reads += len(iterations)

    def _over_budget(self, plan: MemoryPlan, span: int) -> None:
        if not self._warned:
            need = span * plan.snapshot_bytes / GIB
            self.say(
                f"a window of {span} snapshots needs {need:.3g} GiB per rank, above "
                f"--snapshot-memory-gb {plan.budget_gb:g}: each checkpoint's window is read "
                f"again from disk ({plan.describe()})"
            )
            self._warned = True
