"""``watch(config, options)``: follow a live run's checkpoint folder and score, for each new
complete checkpoint (oldest first), the checkpoint alone and every wsm-tune candidate whose
window ends at it (the body of ``wsm-watch``; run it in every process of its own launch, at a
layout of its own).

Rank 0 decides everything read from the run's folder (what is new, each checkpoint's
candidates) and gives it to every rank; nothing is written into the run's folders but the
watcher's pin (:class:`WatchPin`: what its window holds and what it has still to read, which
our retention keeps). Each checkpoint's candidates are scored as wsm-tune scores them
(:class:`CandidateRunner`, the same scorer), so a row equals wsm-tune's ``--end-iteration`` at
that checkpoint. Each checkpoint is read from disk once: a sliding window of in-memory
snapshots of this rank's shard (:class:`SlidingWindow`) feeds every candidate.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsm_megatron.layout import is_complete, iteration_dir
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.runtime.distributed import decided_on_rank0, first_on_any_rank
from wsm_megatron.training.checkpointing import model_mismatch, model_shapes
from wsm_megatron.training.config import WSMConfig
from wsm_megatron.tune.api import TuneOptions, _scorer, dist_is_main, save_merge
from wsm_megatron.tune.runner import CandidateRunner, ScoreTable
from wsm_megatron.watch.follow import (
    Plan,
    check_root,
    is_inside,
    pending,
    plan_iteration,
)
from wsm_megatron.watch.pin import WatchPin
from wsm_megatron.watch.report import (
    WATCH_JSONL,
    WATCH_PNG,
    WatchState,
    append_rows,
    keep_rows,
    plot,
    print_table,
    read_rows,
    rows_for,
    wandb_values,
)
from wsm_megatron.watch.window import SlidingWindow

PROG = "wsm-watch"
REMOVED = "removed before it was read (the run's retention)"


@dataclass(frozen=True)
class WatchOptions:
    """``tune``: what to score (wsm-tune's options; its grid's ``end_iteration`` is set per
    checkpoint), where to write (``tune.output``, ``tune.save_best``)."""

    tune: TuneOptions
    poll_seconds: float = 60.0
    until_iteration: int | None = None
    once: bool = False
    load_retries: int = 3
    """A failed load is tried again this many times (after 1, 2, 4... s) while the checkpoint
    stays complete, then skipped."""

    def __post_init__(self) -> None:
        t = self.tune
        if t.grid.end_iteration is not None:
            raise MergeError("wsm-watch sets each window's end itself (no --end-iteration)")
        if t.decay_references:
            raise MergeError("wsm-watch scores merges only (no --decay-reference)")
        if not self.poll_seconds > 0:
            raise MergeError(f"--poll-seconds must be > 0, got {self.poll_seconds}")
        if self.load_retries < 0:
            raise MergeError(f"--load-retries must be >= 0, got {self.load_retries}")
        if self.until_iteration is not None and self.until_iteration < 0:
            raise MergeError(f"--until-iteration must be >= 0, got {self.until_iteration}")
        for flag, path in (("--output", t.output), ("--save-best", t.save_best)):
            if path is not None and is_inside(path, t.checkpoints):
                raise MergeError(
                    f"{flag} {path} lies inside --checkpoints {t.checkpoints}: wsm-watch never "
                    "writes into the run's folders"
                )


def check_config(config: WSMConfig, options: WatchOptions) -> None:
    """Refuse a window longer than the run keeps (its retention: ``merge.quantity`` newest
    checkpoints with ``checkpoint.prune``): it would never be filled."""
    keep = config.merge_quantity
    if keep is None or not config.checkpoint.prune:
        return
    longer = [n for n in options.tune.grid.durations if n > keep]
    if longer:
        raise MergeError(
            f"--durations {longer[0]}: the run keeps only its newest {keep} checkpoints "
            f"(merge.quantity {keep} with checkpoint.prune), so a window of {longer[0]} is "
            "never on disk"
        )


def check_input(options: WatchOptions) -> None:
    """Bad input that fails before any start-up: the folder is no checkpoint root (a missing
    or empty one is waited for, unless ``--once``)."""
    check_root(options.tune.checkpoints, options.once)


def watch(config: WSMConfig, options: WatchOptions) -> WatchState:
    """Follow ``options.tune.checkpoints`` until ``--until-iteration`` is reached (or, with
    ``once``, after what is complete now); returns the state (what is done, the best)."""
    check_config(config, options)
    check_input(options)
    watcher = _Watcher(config, options)
    try:
        watcher.follow()
    finally:
        watcher.close()
    return watcher.state


def _start_state(output: Path, task: str) -> WatchState:
    """The state a killed watcher left, its rows made to match it and its plot redrawn."""
    state = WatchState.load(output)
    keep_rows(output, set(state.scored))
    rows = read_rows(output)
    if rows:
        plot(rows, task, output / WATCH_PNG)
    return state


class _Watcher:
    """One watcher's loop: what it knows of the run, its window of snapshots, its pin."""

    def __init__(self, config: WSMConfig, options: WatchOptions) -> None:
        from wsm_megatron.training.trainer import eval_session

        t = self.tune = options.tune
        self.options = options
        session, model = eval_session(config)
        self.is_main = session.runtime.is_main
        self.state = decided_on_rank0(lambda: _start_state(t.output, t.tasks[0]))
        manager = None
        if t.lm_eval_tasks:
            from wsm_megatron.eval.harness import task_manager

            manager = task_manager(t.lm_eval_tasks, t.lm_eval.include_path)
        self.lower_is_better = {"val": True}
        self.score = _scorer(t, session, model, manager, self.lower_is_better)
        runner = CandidateRunner(session.config, model, t.checkpoints, t.snapshot_memory_gb)
        self.window = SlidingWindow(runner, self.say, max(t.grid.durations, default=1))
        self.known: set[int] = set(self.state.done)
        self.shapes: dict[str, tuple[int, ...]] | None = model_shapes(model)
        self.pin = WatchPin(t.checkpoints, t.output, self.say) if self.is_main else None
        self.logger = _wandb_logger(session.config, t.output, self.is_main)

    def say(self, line: str) -> None:
        if self.is_main:
            print(f"{PROG}: {line}", flush=True)

    def follow(self) -> None:
        t, options, state = self.tune, self.options, self.state
        done = f"; {len(state.scored)} checkpoint(s) already scored" if state.scored else ""
        self.say(f"following {t.checkpoints}{done}")
        waiting = False
        while True:
            todo = decided_on_rank0(
                lambda: pending(t.checkpoints, state.done, options.until_iteration)
            )
            if not todo.complete and not waiting:
                self.say(f"waiting for {t.checkpoints} to hold a complete checkpoint")
            waiting = not todo.complete
            self.known.update(todo.complete)
            if todo.iterations:
                self._check_model(todo.iterations[0])
            for k, it in enumerate(todo.iterations):
                self._pin(todo.iterations[k:])
                self._one(it, behind=len(todo.iterations) - k - 1)
            self._pin(())
            if options.once or todo.finished:
                break
            time.sleep(options.poll_seconds)
        reads = self.window.reads
        self.say(
            f"{len(state.scored)} checkpoint(s) scored, {reads} read from disk; "
            f"{t.output / WATCH_JSONL}"
        )

    def _check_model(self, it: int) -> None:
        """Refuse a config whose model is not the checkpoints' (once, at the first one)."""
        if self.shapes is None:
            return
        ckpt = iteration_dir(self.tune.checkpoints, it)

        def decide() -> None:
            problem = model_mismatch(self.shapes, ckpt)
            if problem is not None:
                raise MergeError(f"--config does not match the model of {ckpt}: {problem}")

        decided_on_rank0(decide)
        self.shapes = None

    def _pin(self, todo: Sequence[int]) -> None:
        """Pin what the window holds (a restart reads it again) and what is still to read."""
        if self.pin is not None:
            self.pin.write([*self.window.iterations, *todo])

    def close(self) -> None:
        if self.pin is not None:
            self.pin.release()
        if self.logger is not None:
            self.logger.close()

    def _one(self, it: int, behind: int) -> None:
        """Score checkpoint ``it`` and its candidates; record them (rank 0). ``behind``: the
        newer complete checkpoints still to score (for the progress line)."""
        t, root = self.tune, self.tune.checkpoints
        start = time.perf_counter()

        def decide() -> Plan | str:
            try:
                unusable = [i for i, why in self.state.skipped.items() if why != REMOVED]
                return plan_iteration(root, t.grid, it, self.known, unusable)
            except MergeError as err:
                return str(err)

        plan = decided_on_rank0(decide)
        if isinstance(plan, str) or plan.removed:
            self._skip(it, f"unreadable: {plan}" if isinstance(plan, str) else REMOVED)
            return
        for line in plan.skipped:
            self.say(line)
        scores = self._scores(plan)
        if scores is None:
            return
        bad = [task for task, v in (scores["newest"] or {}).items() if not math.isfinite(v)]
        if bad:
            self._skip(it, f"non-finite {', '.join(bad)} (NaN/Inf in its values)")
            return
        self._record(plan, scores)
        seconds = time.perf_counter() - start
        eta = f", about {behind * seconds:.0f} s to catch up" if behind else ""
        self.say(
            f"iteration {it}: {len(plan.candidates)} candidate(s) in {seconds:.1f} s "
            f"({len(plan.candidates) / seconds:.2f}/s); {behind} newer checkpoint(s) waiting{eta}"
        )

    def _scores(self, plan: Plan) -> ScoreTable | None:
        """``plan``'s scores from the window; a failed load is retried with back-off while
        the checkpoint stays complete (a network file system), then skipped (None)."""
        newest, merges = plan.candidates[0], list(plan.candidates[1:])
        root, it = self.tune.checkpoints, plan.iteration
        for attempt in range(self.options.load_retries + 1):
            error = scores = None
            try:
                scores = self.window.score(newest, merges, plan.span, self.score)
            except Exception as err:  # noqa: BLE001 - a checkpoint that fails to load is skipped
                error = f"{type(err).__name__}: {err}"
            error = first_on_any_rank(error)  # a failure on some ranks: every rank retries
            if error is None:
                return scores
            self.window.reset()  # it may hold half of a window
            if decided_on_rank0(lambda: not is_complete(root, it)):
                self._skip(it, REMOVED)
                return None
            if attempt < self.options.load_retries:
                delay = 2.0**attempt
                self.say(f"iteration {it}: load failed ({error}); retrying in {delay:g} s")
                time.sleep(delay)
        self._skip(it, f"failed to load ({error})")
        return None

    def _record(self, plan: Plan, scores: ScoreTable) -> None:
        t, state, it = self.tune, self.state, plan.iteration
        rows = rows_for(it, plan.tokens, plan.candidates, scores, self.lower_is_better)
        best = _better_merge(state, plan, scores, t.tasks[0], self.lower_is_better)
        state.scored.append(it)
        if best is not None and t.save_best is not None:
            _save_best(t.checkpoints, t.save_best, best)  # every rank
        if best is not None:
            state.best = best
        if not self.is_main:
            return
        append_rows(t.output, rows)
        state.save(t.output)
        plot(read_rows(t.output), t.tasks[0], t.output / WATCH_PNG)
        print_table(rows, t.tasks, self.lower_is_better)
        sys.stdout.flush()
        if best is not None and t.save_best is not None:
            self.say(f"new best {best['name']} at iteration {it}: wrote {t.save_best}")
        if self.logger is not None:
            self.logger.log("watch", it, wandb_values(rows))

    def _skip(self, it: int, why: str) -> None:
        self.say(f"iteration {it}: {why}; skipped")
        self.state.skipped[it] = why
        if self.is_main:
            self.state.save(self.tune.output)


def _wandb_logger(config: WSMConfig, output: Path, is_main: bool) -> Any:
    """wandb only (no metrics file, no TensorBoard), grouped with the training run
    (``logging.wandb_group``, else its ``wandb_name``), ``job_type=wsm-watch``."""
    from wsm_megatron.training.loggers import MetricsLogger

    log = config.logging
    if log.wandb_mode == "disabled":
        return None
    group = log.wandb_group or log.wandb_name
    name = None if log.wandb_name is None else f"{log.wandb_name}-watch"
    only_wandb = dataclasses.replace(
        log, metrics_file=None, tensorboard_dir=None, wandb_group=group, wandb_name=name
    )
    return MetricsLogger(
        dataclasses.replace(config, logging=only_wandb),
        is_main=is_main,
        job_type=PROG,
        default_dir=output,
    )


def _better_merge(
    state: WatchState, plan: Plan, scores: Any, task: str, lower_is_better: dict[str, bool]
) -> dict[str, Any] | None:
    """This checkpoint's best merge when it beats the best so far (None otherwise)."""
    lower = lower_is_better.get(task, True)
    merges = [
        (scores[c.name][task], c)
        for c in plan.candidates[1:]
        if scores.get(c.name) is not None and scores[c.name].get(task) is not None
    ]
    if not merges:
        return None
    value, c = (min if lower else max)(merges, key=lambda pair: pair[0])
    if state.best is not None:
        old = state.best["score"]
        if (value >= old) if lower else (value <= old):
            return None
    return {
        "iteration": plan.iteration,
        "name": c.name,
        "score": value,
        "iterations": list(c.iterations),
        "schedule": c.schedule,
    }


def _save_best(root: Path, output: Path, best: dict[str, Any]) -> None:
    """The best merge through ``wsm-merge`` (every rank), then only it kept under ``output``."""
    from wsm_megatron.training.retention import prune_checkpoints

    save_merge(root, output, best["iterations"], best["schedule"], overwrite=True)
    if dist_is_main():
        prune_checkpoints(output, keep_last=1)


__all__ = ["PROG", "WatchOptions", "check_config", "check_input", "watch"]
