"""``wsm-watch``'s files, all under ``--output`` and written on rank 0: ``watch.jsonl`` (one
row per candidate and checkpoint, a checkpoint's rows appended in one write + fsync),
``watch_state.json`` (what is done, atomic: a restarted watcher neither rescores nor skips),
``watch.png`` (score against tokens or iteration, rewritten atomically) and a rich table per
checkpoint."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsm_megatron.atomic import atomic_write_bytes, atomic_write_text, fsync_path
from wsm_megatron.tune.candidates import Candidate
from wsm_megatron.tune.runner import ScoreTable

WATCH_JSONL, WATCH_PNG, WATCH_STATE = "watch.jsonl", "watch.png", "watch_state.json"


@dataclass
class WatchState:
    """Scored iterations, skipped ones (with why) and the best merge so far."""

    scored: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    """``{"iteration", "name", "score", "iterations", "schedule"}`` of the best merge."""

    @property
    def done(self) -> set[int]:
        return set(self.scored) | set(self.skipped)

    @classmethod
    def load(cls, output: Path) -> WatchState:
        path = output / WATCH_STATE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        skipped = {int(k): v for k, v in data.get("skipped", {}).items()}
        return cls(list(data.get("scored", [])), skipped, data.get("best"))

    def save(self, output: Path) -> None:
        data = {
            "scored": sorted(self.scored),
            "skipped": {str(k): v for k, v in sorted(self.skipped.items())},
            "best": self.best,
        }
        atomic_write_text(output / WATCH_STATE, json.dumps(data, indent=1) + "\n")


def rows_for(
    iteration: int,
    tokens: int | None,
    candidates: tuple[Candidate, ...],
    scores: ScoreTable,
    lower_is_better: dict[str, bool],
) -> list[dict[str, Any]]:
    """One row per scored candidate of a checkpoint (None scores: non-finite merged values),
    each with its tasks' directions (``lower_is_better``)."""
    rows = []
    for c in candidates:
        values = scores.get(c.name)
        rows.append(
            {
                "iteration": iteration,
                "name": c.name,
                "duration": c.duration,
                "interval": c.interval,
                "schedule": c.schedule,
                "window": list(c.iterations),
                "coefficients": list(c.coefficients),
                "tokens": tokens,
                "finite": values is not None,
                "lower_is_better": {t: lower_is_better.get(t, True) for t in values or {}},
                **(values or {}),
            }
        )
    return rows


def append_rows(output: Path, rows: list[dict[str, Any]]) -> None:
    """Append one checkpoint's rows to ``watch.jsonl`` in one write, then fsync."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / WATCH_JSONL
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(output)


def read_rows(output: Path) -> list[dict[str, Any]]:
    """The rows of ``watch.jsonl``; a torn last line (a watcher killed mid-write) is dropped."""
    path = output / WATCH_JSONL
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def keep_rows(output: Path, scored: set[int]) -> None:
    """Rewrite ``watch.jsonl`` (atomically) with only the rows of ``scored`` iterations when it
    holds anything else: a torn last line, or the rows of a checkpoint that a killed watcher
    wrote before recording it in its state (scored again, its rows once)."""
    path = output / WATCH_JSONL
    if not path.is_file():
        return
    text = path.read_text()
    rows = read_rows(output)
    kept = [r for r in rows if r["iteration"] in scored]
    if len(kept) < len(rows) or text.count("\n") != len(rows) or not text.endswith("\n"):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot(rows: list[dict[str, Any]], task: str, path: Path) -> None:
    """Left: ``task`` against tokens (iteration when unknown), the newest checkpoint alone and
    one line per candidate; right: each candidate's gain over the newest checkpoint at the
    same point (positive: the merge is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkey = "tokens" if all(r.get("tokens") is not None for r in rows) else "iteration"
    lines = _lines(rows, task, xkey)
    lower = next(
        (r["lower_is_better"][task] for r in rows if task in r.get("lower_is_better", {})), True
    )
    newest = dict(lines.get("newest", []))
    fig, (ax, gain) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, points in lines.items():
        xs, ys = zip(*points, strict=True)
        style = {"color": "black", "linewidth": 2.0} if name == "newest" else {}
        ax.plot(xs, ys, marker="o", markersize=3, label=name, **style)
        if name != "newest":
            paired = [(x, (newest[x] - y) * (1 if lower else -1)) for x, y in points if x in newest]
            if paired:
                gain.plot(*zip(*paired, strict=True), marker="o", markersize=3, label=name)
    gain.axhline(0.0, color="black", linewidth=2.0, label="newest (left: black)")
    for a, ylabel in ((ax, task), (gain, f"gain in {task} over the newest (+: merge better)")):
        a.set_xlabel(xkey)
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
    ax.set_title(f"{task}: the newest checkpoint and each merge ending at it")
    gain.set_title("each merge against the newest checkpoint")
    if lines:
        gain.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


Points = list[tuple[float, float]]


def _lines(rows: list[dict[str, Any]], task: str, xkey: str) -> dict[str, Points]:
    """``(x, score)`` points per candidate name, sorted by x."""
    lines: dict[str, Points] = {}
    for r in rows:
        if r.get(task) is not None:
            lines.setdefault(r["name"], []).append((r[xkey], r[task]))
    return {name: sorted(points) for name, points in lines.items()}


def print_table(
    rows: list[dict[str, Any]], tasks: tuple[str, ...], lower_is_better: dict[str, bool]
) -> None:
    """One checkpoint's rows: window, scores and gain over the newest checkpoint alone."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    task = tasks[0]
    it, tokens = rows[0]["iteration"], rows[0]["tokens"]
    where = f"iteration {it}" + ("" if tokens is None else f" ({tokens:,} tokens)")
    table = Table(title=f"wsm-watch: {where}", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("candidate", "window", *tasks, f"gain ({task})"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    base = rows[0].get(task)
    sign = 1.0 if lower_is_better.get(task, True) else -1.0
    for r in rows:
        window = r["window"]
        span = f"{window[0]}..{window[-1]} ({len(window)})" if len(window) > 1 else str(window[0])
        values = [("NaN/Inf" if r.get(t) is None else f"{r[t]:.4f}") for t in tasks]
        gain = "-"
        if r["name"] != "newest" and r.get(task) is not None and base is not None:
            gain = f"{sign * (base - r[task]):+.4f}"
        table.add_row(r["name"], span, *values, gain)
    Console().print(table)


def wandb_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """One checkpoint's scores as wandb keys, ``<candidate>/<task>`` (``newest/val``)."""
    skip = {"iteration", "name", "duration", "interval", "schedule", "window", "coefficients"}
    skip |= {"tokens", "finite", "lower_is_better"}
    values = {
        f"{r['name']}/{key}": value
        for r in rows
        for key, value in r.items()
        if key not in skip and isinstance(value, float)
    }
    if rows[0].get("tokens") is not None:
        values["tokens"] = float(rows[0]["tokens"])
    return values
