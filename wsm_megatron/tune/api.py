"""``tune(config, options)``: every candidate merge scored in memory at the run's layout (the
body of ``wsm-tune``; run it in every process of a launch, like training)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from wsm_megatron.merge.errors import MergeError
from wsm_megatron.training.config import WSMConfig
from wsm_megatron.tune.candidates import TuneGrid, build_candidates
from wsm_megatron.tune.results import TuneResult, plot, print_table, write_json
from wsm_megatron.tune.runner import CandidateRunner, validation_scorer

TASKS = ("val",)
TUNE_JSON, TUNE_PNG = "tune.json", "tune.png"


@dataclass(frozen=True)
class TuneOptions:
    checkpoints: Path
    grid: TuneGrid
    output: Path
    tasks: tuple[str, ...] = ("val",)
    save_best: Path | None = None
    snapshot_memory_gb: float = 64.0

    def __post_init__(self) -> None:
        if not self.tasks:
            raise MergeError("--tasks: give at least one task")
        for task in self.tasks:
            if task not in TASKS:
                raise MergeError(f"--tasks: unknown task {task!r} (known: {', '.join(TASKS)})")
        if not self.checkpoints.is_dir():
            raise MergeError(f"--checkpoints {self.checkpoints} is not a directory")
        if not self.snapshot_memory_gb > 0:
            raise MergeError(f"--snapshot-memory-gb must be > 0, got {self.snapshot_memory_gb}")


def tune(config: WSMConfig, options: TuneOptions) -> TuneResult:
    """Score the newest checkpoint alone and every merge of ``options.grid``; rank 0 writes
    ``tune.json`` and ``tune.png`` under ``options.output`` and prints the table. With
    ``save_best`` the best merge is written there by ``wsm-merge`` (on the same ranks)."""
    from wsm_megatron.training.trainer import eval_session

    start = time.perf_counter()
    candidates = build_candidates(options.checkpoints, options.grid)  # bad input fails first
    session, model = eval_session(config)
    is_main = session.runtime.is_main
    runner = CandidateRunner(session.config, model, options.checkpoints, options.snapshot_memory_gb)
    plan = runner.plan(candidates[1:])
    if is_main:
        print(f"wsm-tune: {len(candidates) - 1} merges + the newest checkpoint; {plan.describe()}")
    score = validation_scorer(
        model, session.valid_batches(), session.config, session.num_microbatches
    )
    scores = runner.run(candidates[0], plan, score)
    result = TuneResult(tuple(candidates), scores, options.tasks[0], plan)
    if is_main:
        options.output.mkdir(parents=True, exist_ok=True)
        write_json(result, options.output / TUNE_JSON)
        plot(result, options.output / TUNE_PNG)
        print_table(result)
        print(
            f"wrote {options.output / TUNE_JSON} and {options.output / TUNE_PNG} in "
            f"{time.perf_counter() - start:.1f} s"
        )
    if options.save_best is not None and result.best is not None:
        _save(options.checkpoints, options.save_best, result)
    return result


def _save(root: Path, output: Path, result: TuneResult) -> None:
    """The best merge through ``wsm-merge`` (its output format and provenance)."""
    from wsm_megatron.merge import MergeConfig, merge

    best = result.best
    assert best is not None and best.schedule is not None
    config = MergeConfig(
        input=root, output=output, iterations=best.iterations, schedule=best.schedule
    )
    merge(config)
