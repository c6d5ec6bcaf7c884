"""The candidates ``wsm-tune`` evaluates: every merge duration x schedule, plus the newest
checkpoint alone, chosen and weighted exactly as ``wsm-merge`` chooses and weights them."""

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

    @property
    def span(self) -> int:
        """The window's length in position units (tokens): from the oldest checkpoint to one
        average spacing past the newest, as the weights see it; 0 for the newest alone."""
        p, n = self.positions, len(self.positions)
        return 0 if n == 1 else (p[-1] - p[0]) * n // (n - 1)


@dataclass(frozen=True)
class TuneGrid:
    """What to try: windows of the newest ``durations`` checkpoints and of ``durations_tokens``
    tokens, each with every schedule, all ending at ``end_iteration`` (default: the tracker's)."""

    durations: tuple[int, ...] = ()
    durations_tokens: tuple[int, ...] = ()
    schedules: tuple[str, ...] = ("linear",)
    end_iteration: int | None = None

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

    def windows(self) -> list[tuple[str, Selection]]:
        end = self.end_iteration
        return [(str(n), Selection(last=n, end_iteration=end)) for n in self.durations] + [
            (format_token_count(t), Selection(window_tokens=t, end_iteration=end))
            for t in self.durations_tokens
        ]


def build_candidates(root: Path, grid: TuneGrid) -> list[Candidate]:
    """The newest checkpoint alone first, then every window x schedule, in the grid's order."""
    rows: list[Candidate] = []
    selected: Selected | None = None
    for duration, selection in grid.windows():
        selected = select_checkpoints(root, selection)
        for schedule in grid.schedules:
            weighting = Weighting(schedule=schedule)
            weights = weighting.resolve(selected.positions)
            rows.append(
                Candidate(
                    f"{duration}:{weighting.label()}",
                    duration,
                    weighting.schedule,
                    selected.iterations,
                    selected.positions,
                    weights.coefficients,
                )
            )
    assert selected is not None  # the grid has a window; every window ends at the newest
    newest = (selected.iterations[-1],), (selected.positions[-1],)
    return [Candidate("newest", "1", None, *newest, (1.0,)), *rows]


def window_of(candidates: Sequence[Candidate]) -> tuple[int, ...]:
    """Every checkpoint some candidate needs, oldest first."""
    return tuple(sorted({it for c in candidates for it in c.iterations}))
