"""The candidates ``wsm-tune`` evaluates: every merge duration x interval x schedule, plus the
newest checkpoint alone, chosen and weighted exactly as ``wsm-merge`` chooses and weights them.

An interval ``K`` keeps every K-th checkpoint of a duration's window, counting back from the
newest (``wsm-merge --every K``'s rule): the same span of iterations with fewer checkpoints, the
paper's duration x interval study (80B as 16 x 5B, 8 x 10B, 4 x 20B...). The schedule's
coefficients are those of the checkpoints actually merged (``Weighting.resolve`` on their
positions), so a merge at interval 2 is ``wsm-merge --iterations`` of those checkpoints. A
window that an interval leaves with one checkpoint is no merge: it is skipped and reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wsm_megatron.merge.config import Selection, Weighting, format_token_count
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.selection import Selected, select_checkpoints


@dataclass(frozen=True)
class Candidate:
    """One row of the tune: a merge of ``iterations`` (oldest first) with ``coefficients``,
    or the newest checkpoint alone (``schedule`` None)."""

    name: str
    duration: str
    """As asked: ``N`` checkpoints or a token window such as ``80B``; ``1`` for the newest."""
    schedule: str | None
    iterations: tuple[int, ...]
    positions: tuple[int, ...]
    coefficients: tuple[float, ...]
    interval: int = 1
    """Every ``interval``-th checkpoint of the duration's window, counting back from the newest."""

    @property
    def kind(self) -> str:
        """``"newest"`` (the newest checkpoint alone) or ``"merge"``."""
        return "newest" if self.schedule is None else "merge"

    @property
    def span(self) -> int:
        """The window's length in position units (tokens): from the oldest checkpoint to one
        average spacing past the newest, as the weights see it; 0 for the newest alone."""
        p, n = self.positions, len(self.positions)
        return 0 if n == 1 else (p[-1] - p[0]) * n // (n - 1)


@dataclass(frozen=True)
class Skipped:
    """A duration x interval that is no merge (one checkpoint left), reported, never scored."""

    duration: str
    interval: int
    iterations: tuple[int, ...]
    """The window's checkpoints at interval 1."""

    def describe(self) -> str:
        kept = subsample(self.iterations, self.interval)
        return (
            f"--intervals {self.interval} with duration {self.duration}: the window's "
            f"{len(self.iterations)} checkpoint(s) {list(self.iterations)} leave "
            f"{len(kept)} {list(kept)}, no merge: skipped"
        )


@dataclass(frozen=True)
class TuneGrid:
    """What to try: windows of the newest ``durations`` checkpoints and of ``durations_tokens``
    tokens, each at every interval with every schedule, all ending at ``end_iteration``
    (default: the tracker's)."""

    durations: tuple[int, ...] = ()
    durations_tokens: tuple[int, ...] = ()
    schedules: tuple[str, ...] = ("linear",)
    end_iteration: int | None = None
    intervals: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        if not self.durations and not self.durations_tokens:
            raise MergeError("give --durations and/or --durations-tokens")
        for n in self.durations:
            if n < 2:
                raise MergeError(f"--durations: a merge needs at least 2 checkpoints, got {n}")
        if not self.schedules:
            raise MergeError("--schedules: give at least one schedule")
        for schedule in self.schedules:
            Weighting(schedule=schedule)  # an unknown name fails here, in one line
        if not self.intervals:
            raise MergeError("--intervals: give at least one interval")
        for k in self.intervals:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise MergeError(
                    f"--intervals: an interval keeps every K-th checkpoint, K >= 1; got {k!r}"
                )
        if len(set(self.intervals)) != len(self.intervals):
            raise MergeError(f"--intervals contains duplicates: {list(self.intervals)}")
        if self.durations and not self.durations_tokens:
            # Known before reading a checkpoint: N checkpoints at interval K keep ceil(N / K).
            if not any(-(-n // k) >= 2 for n in self.durations for k in self.intervals):
                raise MergeError(
                    f"--intervals {','.join(map(str, self.intervals))}: every window of "
                    f"--durations {','.join(map(str, self.durations))} keeps one checkpoint "
                    "(N checkpoints at interval K keep ceil(N/K)); no merge to score"
                )

    def windows(self) -> list[tuple[str, Selection]]:
        """Each duration's window at interval 1 (its full span), in the grid's order."""
        end = self.end_iteration
        return [(str(n), Selection(last=n, end_iteration=end)) for n in self.durations] + [
            (format_token_count(t), Selection(window_tokens=t, end_iteration=end))
            for t in self.durations_tokens
        ]


def subsample(items: Sequence[int], interval: int) -> tuple[int, ...]:
    """Every ``interval``-th of ``items`` (oldest first) counting back from the newest, oldest
    first: ``Selection.every``'s rule (``wsm-merge --every``)."""
    return tuple(items[::-1][::interval][::-1])


def candidate_name(duration: str, interval: int, label: str) -> str:
    """``4:linear`` at interval 1 (as before intervals existed), ``8@2:linear`` at interval 2."""
    return f"{duration}:{label}" if interval == 1 else f"{duration}@{interval}:{label}"


@dataclass(frozen=True)
class Candidates:
    """The newest checkpoint alone first, then the merges; the skipped windows; each
    duration's full window (interval 1), which its decay reference spans."""

    rows: tuple[Candidate, ...]
    skipped: tuple[Skipped, ...]
    windows: tuple[tuple[str, Selected], ...]


def build_grid(root: Path, grid: TuneGrid) -> Candidates:
    """Every window x interval x schedule, in the grid's order (windows, then intervals, then
    schedules), after the newest checkpoint alone."""
    rows: list[Candidate] = []
    skipped: list[Skipped] = []
    windows: list[tuple[str, Selected]] = []
    selected: Selected | None = None
    for duration, selection in grid.windows():
        selected = select_checkpoints(root, selection)
        windows.append((duration, selected))
        by_iteration = dict(zip(selected.iterations, selected.positions, strict=True))
        for interval in grid.intervals:
            iterations = subsample(selected.iterations, interval)
            if len(iterations) < 2:
                skipped.append(Skipped(duration, interval, selected.iterations))
                continue
            positions = tuple(by_iteration[it] for it in iterations)
            for schedule in grid.schedules:
                weighting = Weighting(schedule=schedule)
                weights = weighting.resolve(positions)  # those actually merged
                rows.append(
                    Candidate(
                        candidate_name(duration, interval, weighting.label()),
                        duration,
                        weighting.schedule,
                        iterations,
                        positions,
                        weights.coefficients,
                        interval,
                    )
                )
    assert selected is not None  # the grid has a window; every window ends at the newest
    if not rows:
        raise MergeError(
            "--intervals: every window keeps one checkpoint; no merge to score ("
            + "; ".join(s.describe() for s in skipped)
            + ")"
        )
    newest = (selected.iterations[-1],), (selected.positions[-1],)
    head = Candidate("newest", "1", None, *newest, (1.0,))
    return Candidates((head, *rows), tuple(skipped), tuple(windows))


def build_candidates(root: Path, grid: TuneGrid) -> list[Candidate]:
    """The newest checkpoint alone first, then every window x interval x schedule."""
    return list(build_grid(root, grid).rows)


def window_of(candidates: Sequence[Candidate]) -> tuple[int, ...]:
    """Every checkpoint some candidate needs, oldest first."""
    return tuple(sorted({it for c in candidates for it in c.iterations}))
