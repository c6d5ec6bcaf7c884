"""``tune(config, options)``: every candidate merge scored in memory at the run's layout (the
body of ``wsm-tune``; run it in every process of a launch, like training).

Costs: the merges cost one read of each checkpoint of the largest window (per data-parallel
group) and one evaluation per candidate. A decay reference (``decay_references``,
:mod:`wsm_megatron.tune.decay`) is real training: D iterations of the run at its layout per
duration and style, D being the duration's window span (a window of 10% of a run: 10% of the
run's training, each) — for proxy runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsm_megatron.eval.options import EvalOptions
from wsm_megatron.layout import iteration_dir
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.runtime import decided_on_rank0
from wsm_megatron.training.config import WSMConfig
from wsm_megatron.training.evaluate import evaluate
from wsm_megatron.tune.candidates import Candidates, TuneGrid, build_grid
from wsm_megatron.tune.decay import DecayReference, decay_style, plan_decays, train_decays
from wsm_megatron.tune.results import DecayRow, TuneResult, plot, print_table, write_json
from wsm_megatron.tune.runner import CandidateRunner, Scorer, Scores

LM_EVAL = "lm-eval:"
"""``lm-eval:TASK``: a task of lm-evaluation-harness, scored by its ranking metric
(:func:`wsm_megatron.eval.harness.ranking_metric`) in lm-eval's direction."""
TUNE_JSON, TUNE_PNG = "tune.json", "tune.png"


@dataclass(frozen=True)
class TuneOptions:
    checkpoints: Path
    grid: TuneGrid
    output: Path
    tasks: tuple[str, ...] = ("val",)
    save_best: Path | None = None
    snapshot_memory_gb: float = 64.0
    lm_eval: EvalOptions = EvalOptions(bootstrap_iters=0)
    """How the lm-eval tasks run (lm-eval's flags; no bootstrap by default: a ranking needs
    the metric, not its standard error)."""
    metrics: tuple[tuple[str, str], ...] = ()
    """``(lm-eval task, metric)`` pairs (``--metric TASK=NAME``): the metric that scores it."""
    decay_references: tuple[str, ...] = ()
    """Decay styles (``--decay-reference``): a real WSD decay per duration and style, trained
    from the window's start over its span and scored beside the merges (real training)."""
    checkpoints_may_appear: bool = False
    """``checkpoints`` may not exist yet (wsm-watch, started before the run's first save)."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise MergeError("--tasks: give at least one task")
        for task in self.tasks:
            if task != "val" and not (task.startswith(LM_EVAL) and task != LM_EVAL):
                raise MergeError(f"--tasks: unknown task {task!r} (val or lm-eval:TASK)")
        if not self.checkpoints.is_dir() and (
            self.checkpoints.exists() or not self.checkpoints_may_appear
        ):
            raise MergeError(f"--checkpoints {self.checkpoints} is not a directory")
        for task, _ in self.metrics:
            if task not in self.lm_eval_tasks:
                raise MergeError(f"--metric {task}=...: {task} is not an lm-eval task of --tasks")
        if not self.snapshot_memory_gb > 0:
            raise MergeError(f"--snapshot-memory-gb must be > 0, got {self.snapshot_memory_gb}")
        styles = tuple(dict.fromkeys(decay_style(s) for s in self.decay_references))
        object.__setattr__(self, "decay_references", styles)

    @property
    def lm_eval_tasks(self) -> list[str]:
        return [t[len(LM_EVAL) :] for t in self.tasks if t.startswith(LM_EVAL)]


def tune(config: WSMConfig, options: TuneOptions) -> TuneResult:
    """Score the newest checkpoint alone and every merge of ``options.grid`` (and, with
    ``decay_references``, the real decays trained first); rank 0 writes ``tune.json`` and
    ``tune.png`` under ``options.output`` and prints the table. With ``save_best`` the best
    merge is written there by ``wsm-merge`` (on the same ranks)."""
    from wsm_megatron.training.checkpointing import load_model_only
    from wsm_megatron.training.trainer import eval_session

    start = time.perf_counter()
    grid = build_grid(options.checkpoints, options.grid)  # bad input fails first
    refs = plan_decays(
        options.checkpoints, grid.windows, options.decay_references, options.output, config
    )
    manager = None
    if options.lm_eval_tasks:
        from wsm_megatron.eval.harness import task_manager

        manager = task_manager(options.lm_eval_tasks, options.lm_eval.include_path)
    runs = {}
    if refs:
        from wsm_megatron.runtime import init_distributed

        init_distributed(megatron=False)  # the process group: rank 0 decides for the branches
        # Every rank trains what rank 0 sees: listings of a shared file system can differ.
        refs = decided_on_rank0(lambda: _refs(options, config))
        runs = train_decays(config, refs, options.checkpoints, is_main=dist_is_main())
    session, model = eval_session(config)
    # Every rank merges what rank 0 sees: listings of a shared file system can differ.
    grid = decided_on_rank0(lambda: build_grid(options.checkpoints, options.grid))
    candidates = list(grid.rows)
    is_main = session.runtime.is_main
    runner = CandidateRunner(session.config, model, options.checkpoints, options.snapshot_memory_gb)
    plan = runner.plan(candidates[1:])
    if is_main:
        for skipped in grid.skipped:
            print(f"wsm-tune: WARNING: {skipped.describe()}")
        decays = f" + {len(refs)} decay reference(s)" if refs else ""
        print(
            f"wsm-tune: {len(candidates) - 1} merges + the newest checkpoint{decays}; "
            f"{plan.describe()}"
        )
    lower_is_better = {"val": True}  # the scorer adds lm-eval's directions
    score = _scorer(options, session, model, manager, lower_is_better)
    scores = runner.run(candidates[0], plan, score)
    for ref in refs:  # each decayed model's final weights, through the same scorer
        load_model_only(model, iteration_dir(ref.folder, ref.end_iteration))
        scores[ref.name] = score()
    rows = tuple(DecayRow(ref, runs[ref.name]) for ref in refs)
    result = TuneResult(
        tuple(candidates), scores, options.tasks[0], plan, lower_is_better, rows, grid.skipped
    )
    if is_main:
        options.output.mkdir(parents=True, exist_ok=True)
        write_json(result, options.output / TUNE_JSON)
        plot(result, options.output / TUNE_PNG)
        print_table(result)
        print(
            f"wrote {options.output / TUNE_JSON} and {options.output / TUNE_PNG} in "
            f"{time.perf_counter() - start:.1f} s"
        )
    best = result.best
    if options.save_best is not None and best is not None:
        assert best.schedule is not None  # a merge
        save_merge(options.checkpoints, options.save_best, best.iterations, best.schedule)
    return result


def _refs(options: TuneOptions, config: WSMConfig) -> tuple[DecayReference, ...]:
    grid: Candidates = build_grid(options.checkpoints, options.grid)
    return plan_decays(
        options.checkpoints, grid.windows, options.decay_references, options.output, config
    )


def dist_is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def save_merge(
    root: Path, output: Path, iterations: Sequence[int], schedule: str, *, overwrite: bool = False
) -> None:
    """A candidate merge through ``wsm-merge`` (its output format and provenance), on every
    rank of this launch."""
    from wsm_megatron.merge import MergeConfig, merge

    config = MergeConfig(
        input=root,
        output=output,
        iterations=tuple(iterations),
        schedule=schedule,
        overwrite=overwrite,
    )
    merge(config)


def _scorer(
    options: TuneOptions,
    session: Any,
    model: list[Any],
    manager: Any,
    lower_is_better: dict[str, bool],
) -> Scorer:
    """The scores of the model as it is: ``val`` (the validation loss on the batches of
    training's evaluation) and each ``lm-eval:TASK`` (its ranking metric, whose direction
    lm-eval gives: written into ``lower_is_better``)."""
    lm = None
    if manager is not None:
        from wsm_megatron.eval.harness import model_lm

        lm = model_lm(session, model, options.lm_eval)

    def score() -> Scores:
        out: Scores = {}
        if "val" in options.tasks:
            batches, config = session.valid_batches(), session.config
            out["val"] = evaluate(model, batches, config, session.num_microbatches)
        if lm is not None:
            from wsm_megatron.eval.harness import ranking_metric, run_tasks

            tasks, chosen = options.lm_eval_tasks, dict(options.metrics)
            results = run_tasks(lm, tasks, manager, options.lm_eval)
            for task in tasks:
                _, value, lower = ranking_metric(results, task, chosen.get(task))
                out[LM_EVAL + task] = value
                lower_is_better[LM_EVAL + task] = lower
        return out

    return score
