"""``wsm-tune``'s results: ``tune.json`` (every candidate's coefficients, positions, interval
and scores; the decay references beside them), a console table (rich) and ``tune.png`` (score
against merge duration, one line per schedule and interval, the newest checkpoint as a reference
line, each real decay a hollow diamond at its window's span). Written on rank 0, each file
atomically.

Rows have a ``kind``: ``newest`` (the newest checkpoint alone), ``merge``, ``decay`` (a real
decay, :mod:`wsm_megatron.tune.decay`). ``best`` is the best merge; a merge's ``vs_decay`` says
how much better it scores than the real decay it stands in for (same duration, the decay of its
own schedule's shape when there is one, else the first).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsm_megatron.layout import iteration_dir
from wsm_megatron.merge.config import format_token_count
from wsm_megatron.tune.candidates import Candidate, Skipped
from wsm_megatron.tune.decay import DecayReference, DecayRun
from wsm_megatron.tune.runner import MemoryPlan, ScoreTable


@dataclass(frozen=True)
class DecayRow:
    """A real decay's row: what it is and what training it left."""

    reference: DecayReference
    run: DecayRun

    @property
    def name(self) -> str:
        return self.reference.name

    @property
    def span(self) -> int:
        return self.reference.span


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
    decays: tuple[DecayRow, ...] = ()
    """The real decays (``--decay-reference``), scored by the same scorer."""
    skipped: tuple[Skipped, ...] = ()
    """Durations x intervals that leave one checkpoint: reported, not scored."""

    @property
    def newest(self) -> Candidate:
        return self.candidates[0]

    def score(self, c: Candidate | DecayRow) -> float | None:
        scores = self.scores[c.name]
        return None if scores is None else scores[self.task]

    def _better(self, mine: float | None, base: float | None) -> float | None:
        if mine is None or base is None:
            return None
        return base - mine if self.lower_is_better[self.task] else mine - base

    def gain(self, c: Candidate | DecayRow) -> float | None:
        """How much better than the newest checkpoint alone (positive: better)."""
        return self._better(self.score(c), self.score(self.newest))

    def decay_for(self, c: Candidate) -> DecayRow | None:
        """The real decay a merge stands in for: its duration's, of its schedule's shape when
        one was trained, else the first of its duration (None without one)."""
        same = [d for d in self.decays if d.reference.duration == c.duration]
        shaped = [d for d in same if d.reference.style == c.schedule]
        return (shaped or same or [None])[0]

    def vs_decay(self, c: Candidate) -> float | None:
        """How much better the merge scores than :meth:`decay_for` (positive: better)."""
        decay = self.decay_for(c) if c.kind == "merge" else None
        return None if decay is None else self._better(self.score(c), self.score(decay))

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
                    "kind": c.kind,
                    "duration": c.duration,
                    "interval": c.interval,
                    "schedule": c.schedule,
                    "span_tokens": c.span,
                    "iterations": list(c.iterations),
                    "positions": list(c.positions),
                    "coefficients": list(c.coefficients),
                    "scores": self.scores[c.name],
                    "gain": self.gain(c),
                    **self._decay_keys(c),
                }
                for c in self.candidates
            ],
            "decays": [self._decay_json(d) for d in self.decays],
            "skipped": [
                {"duration": s.duration, "interval": s.interval, "reason": s.describe()}
                for s in self.skipped
            ],
            "best": None if best is None else {"name": best.name, "gain": self.gain(best)},
        }

    def _decay_keys(self, c: Candidate) -> dict[str, Any]:
        decay = self.decay_for(c) if c.kind == "merge" else None
        if decay is None:
            return {}
        return {"decay_reference": decay.name, "vs_decay": self.vs_decay(c)}

    def _decay_json(self, d: DecayRow) -> dict[str, Any]:
        ref = d.reference
        return {
            "name": ref.name,
            "kind": ref.kind,
            "duration": ref.duration,
            "style": ref.style,
            "lr_wsd_decay_style": ref.megatron_style,
            "start_iteration": ref.start_iteration,
            "decay_iters": ref.decay_iters,
            "end_iteration": ref.end_iteration,
            "window": list(ref.window),
            "span_tokens": ref.span,
            "checkpoint": str(iteration_dir(ref.folder, ref.end_iteration)),
            "final_lr": d.run.final_lr,
            "reused": d.run.reused,
            "train_loss_last": d.run.losses[max(d.run.losses)] if d.run.losses else None,
            "scores": self.scores[ref.name],
            "gain": self.gain(d),
        }


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(result: TuneResult, path: Path) -> None:
    text = json.dumps(result.to_json(), indent=1) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def print_table(result: TuneResult) -> None:
    """The candidates, their windows, intervals and scores; the best in bold, with its gain;
    the real decays below the merges, and each merge's margin over its decay."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    tasks = list(next(s for s in result.scores.values() if s is not None))
    merges = len(result.candidates) - 1
    title = f"wsm-tune: {merges} merges + the newest checkpoint"
    if result.decays:
        title += f" + {len(result.decays)} real decay(s)"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    columns = ["candidate", "checkpoints", "interval", "span (tokens)", *tasks]
    columns.append(f"gain ({result.task})")
    if result.decays:
        columns.append("vs decay")
    for column in columns:
        first = column == "candidate"
        table.add_column(column, justify="left" if first else "right", no_wrap=first)
    best = result.best

    def values(name: str) -> list[str]:
        scores = result.scores[name]
        return ["NaN/Inf"] * len(tasks) if scores is None else [f"{scores[t]:.4f}" for t in tasks]

    def signed(value: float | None) -> str:
        return "-" if value is None else f"{value:+.4f}"

    for c in result.candidates:
        its = f"{c.iterations[0]}..{c.iterations[-1]} ({len(c.iterations)})"
        interval = "-" if c is result.newest else str(c.interval)
        cells = [c.name, its, interval, format_token_count(c.span) if c.span else "-"]
        cells += [*values(c.name), "-" if c is result.newest else signed(result.gain(c))]
        if result.decays:
            cells.append(signed(result.vs_decay(c)))
        table.add_row(*cells, style="bold" if c is best else None)
    for d in result.decays:
        ref = d.reference
        its = f"{ref.start_iteration}->{ref.end_iteration} ({ref.decay_iters} it)"
        cells = [ref.name, its, "-", format_token_count(ref.span), *values(ref.name)]
        cells.append(signed(result.gain(d)))
        table.add_row(*cells, "-", style="italic")
    console = Console()
    console.print(table)
    for skipped in result.skipped:
        console.print(f"skipped: {skipped.describe()}")
    if best is None:
        console.print("no merge gave finite scores")
    else:
        better = "better" if result.gain(best) > 0 else "not better"
        console.print(
            f"best: {best.name} ({best.iterations[0]}..{best.iterations[-1]}), {result.task} "
            f"{result.score(best):.4f} against {result.score(result.newest):.4f} for the newest "
            f"checkpoint alone: {result.gain(best):+.4f} ({better})"
        )
        decay = result.decay_for(best)
        margin = result.vs_decay(best)
        if decay is not None and margin is not None:
            console.print(
                f"  against the real decay {decay.name}: {result.score(decay):.4f}, "
                f"{margin:+.4f} ({'better' if margin > 0 else 'not better'} than the decay)"
            )


def plot(result: TuneResult, path: Path) -> None:
    """Score against merge duration (tokens), one line per schedule (colour) and interval
    (marker and line style); the newest as a dashed line; each real decay a hollow
    diamond at its window's span, in the colour of the merge schedule of its shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    merges = result.candidates[1:]
    lines = dict.fromkeys((c.schedule, c.interval) for c in merges)
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "v", "P", "X"]
    intervals = sorted({k for _, k in lines})
    colors: dict[str | None, Any] = {}
    for schedule, interval in lines:
        points = sorted(
            (c.span, result.score(c))
            for c in merges
            if (c.schedule, c.interval) == (schedule, interval) and result.score(c) is not None
        )
        if not points:
            continue
        label = schedule if interval == 1 else f"{schedule}, every {interval}"
        k = intervals.index(interval)
        (line,) = ax.plot(
            *zip(*points, strict=True), marker=markers[k % len(markers)], markersize=7,
            linestyle=styles[k % len(styles)], label=label, color=colors.get(schedule),
        )  # fmt: skip
        colors.setdefault(schedule, line.get_color())
    base = result.score(result.newest)
    if base is not None:
        ax.axhline(base, color="gray", linestyle="--", label="newest checkpoint alone")
    for style in dict.fromkeys(d.reference.style for d in result.decays):
        points = [
            (d.span, result.score(d))
            for d in result.decays
            if d.reference.style == style and result.score(d) is not None
        ]
        if not points:
            continue
        ax.plot(
            *zip(*points, strict=True), "D", markersize=9, markerfacecolor="none",
            markeredgewidth=1.8, color=colors.get(style, "black"), label=f"real {style} decay",
        )  # fmt: skip
    best = result.best
    if best is not None:
        ax.plot([best.span], [result.score(best)], "k*", markersize=14, label=f"best: {best.name}")
    ax.set_xlabel("merge duration (tokens)")
    direction = "lower" if result.lower_is_better[result.task] else "higher"
    ax.set_ylabel(f"{result.task} ({direction} is better)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
