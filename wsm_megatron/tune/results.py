"""``wsm-tune``'s results: ``tune.json`` (every candidate's coefficients, positions and scores),
a console table (rich) and ``tune.png`` (score against merge duration, one line per schedule,
the newest checkpoint as a reference line). Written on rank 0, each file atomically."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsm_megatron.merge.config import format_token_count
from wsm_megatron.tune.candidates import Candidate
from wsm_megatron.tune.runner import MemoryPlan, ScoreTable


@dataclass(frozen=True)
class TuneResult:
    candidates: tuple[Candidate, ...]
    """The newest checkpoint alone first, then the merges."""
    scores: ScoreTable
    task: str
    """The score that ranks the candidates (the first of ``--tasks``)."""
    plan: MemoryPlan
    lower_is_better: dict[str, bool]
    """Per score: whether lower is better (validation loss, perplexities: lm-eval's say)."""

    @property
    def newest(self) -> Candidate:
        return self.candidates[0]

    def score(self, c: Candidate) -> float | None:
        scores = self.scores[c.name]
        return None if scores is None else scores[self.task]

    def gain(self, c: Candidate) -> float | None:
        """How much better than the newest checkpoint alone (positive: better)."""
        mine, base = self.score(c), self.score(self.newest)
        if mine is None or base is None:
            return None
        return base - mine if self.lower_is_better[self.task] else mine - base

    @property
    def best(self) -> Candidate | None:
        """The merge with the largest gain (None when none has a finite score)."""
        scored = [c for c in self.candidates[1:] if self.gain(c) is not None]
        return max(scored, key=lambda c: self.gain(c), default=None)

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "task": self.task,
            "lower_is_better": self.lower_is_better,
            "memory": {
                "snapshot_bytes_per_rank": self.plan.snapshot_bytes,
                "window": self.plan.window,
                "groups": len(self.plan.groups),
                "in_memory": self.plan.snapshots,
                "summary": self.plan.describe(),
            },
            "candidates": [
                {
                    "name": c.name,
                    "duration": c.duration,
                    "schedule": c.schedule,
                    "span_tokens": c.span,
                    "iterations": list(c.iterations),
                    "positions": list(c.positions),
                    "coefficients": list(c.coefficients),
                    "scores": self.scores[c.name],
                    "gain": self.gain(c),
                }
                for c in self.candidates
            ],
            "best": None if best is None else {"name": best.name, "gain": self.gain(best)},
        }


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(result: TuneResult, path: Path) -> None:
    text = json.dumps(result.to_json(), indent=1) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def print_table(result: TuneResult) -> None:
    """The candidates, their windows and scores; the best in bold, with its gain."""
    from rich.console import Console
    from rich.table import Table

    tasks = list(next(s for s in result.scores.values() if s is not None))
    table = Table(title=f"wsm-tune: {len(result.candidates) - 1} merges + the newest checkpoint")
    for column in ("candidate", "checkpoints", "span (tokens)", *tasks, f"gain ({result.task})"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    best = result.best
    for c in result.candidates:
        scores = result.scores[c.name]
        its = f"{c.iterations[0]}..{c.iterations[-1]} ({len(c.iterations)})"
        values = ["NaN/Inf"] * len(tasks) if scores is None else [f"{scores[t]:.4f}" for t in tasks]
        gain = result.gain(c)
        cells = [c.name, its, format_token_count(c.span) if c.span else "-", *values]
        cells.append("-" if gain is None or c is result.newest else f"{gain:+.4f}")
        table.add_row(*cells, style="bold" if c is best else None)
    console = Console()
    console.print(table)
    if best is None:
        console.print("no merge gave finite scores")
    else:
        better = "better" if result.gain(best) > 0 else "not better"
        console.print(
            f"best: {best.name} ({best.iterations[0]}..{best.iterations[-1]}), {result.task} "
            f"{result.score(best):.4f} against {result.score(result.newest):.4f} for the newest "
            f"checkpoint alone: {result.gain(best):+.4f} ({better})"
        )


def plot(result: TuneResult, path: Path) -> None:
    """Score against merge duration (tokens), one line per schedule; the newest as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    schedules = dict.fromkeys(c.schedule for c in result.candidates[1:])
    for schedule in schedules:
        points = sorted(
            (c.span, result.score(c))
            for c in result.candidates[1:]
            if c.schedule == schedule and result.score(c) is not None
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=schedule)
    base = result.score(result.newest)
    if base is not None:
        ax.axhline(base, color="gray", linestyle="--", label="newest checkpoint alone")
    best = result.best
    if best is not None:
        ax.plot([best.span], [result.score(best)], "k*", markersize=14, label=f"best: {best.name}")
    ax.set_xlabel("merge duration (tokens)")
    direction = "lower" if result.lower_is_better[result.task] else "higher"
    ax.set_ylabel(f"{result.task} ({direction} is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
