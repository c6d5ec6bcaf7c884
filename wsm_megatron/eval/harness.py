"""lm-eval tasks on the model in place, with no download at run time.

The Hugging Face libraries are put offline before lm-eval is imported; a task whose data is not
on this machine fails with one line saying how to point lm-eval at local data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch.distributed as dist

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
LOCAL_DATA = (
    "give lm-eval local data: a task YAML with 'dataset_path: json' and 'dataset_kwargs: "
    "{data_files: {test: /path/data.jsonl}}' in a directory passed with --include-path"
)
_DATA_MODULES = {"datasets", "huggingface_hub", "requests", "urllib3", "fsspec"}


def import_lm_eval() -> None:
    """Import lm-eval offline; one line when the ``[eval]`` extra is missing."""
    os.environ.update(OFFLINE)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(
            "lm-eval tasks need lm-evaluation-harness: pip install 'wsm-megatron[eval]' "
            "(or 'lm-eval>=0.4,<0.5')"
        ) from None


def task_manager(tasks: Sequence[str], include_path: Path | None) -> Any:
    """lm-eval's task index (with ``include_path``), checked to know every task."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    for task in tasks:
        if task not in manager.all_tasks:
            raise ValueError(
                f"unknown lm-eval task {task!r} (lm-eval --tasks list shows the known ones; "
                "local task YAMLs come in with --include-path)"
            )
    return manager


def _data_error(err: BaseException) -> bool:
    """Whether ``err`` comes from fetching a task's data (not from the model)."""
    module = type(err).__module__.split(".")[0]
    return module in _DATA_MODULES or isinstance(err, (ConnectionError, FileNotFoundError))


class TaskResults(NamedTuple):
    """lm-eval's numeric metrics per task (``acc,none``...) and its ``higher_is_better`` per
    task and metric name (``acc``)."""

    metrics: dict[str, dict[str, float]]
    higher_is_better: dict[str, dict[str, bool]]


def run_tasks(
    lm: Any, tasks: Sequence[str], manager: Any, *, limit: int | None = None
) -> TaskResults:
    """Every task's numeric metrics and their directions, on every rank."""
    from lm_eval import simple_evaluate

    try:
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
    except Exception as err:
        if not _data_error(err):
            raise
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"lm-eval tasks {', '.join(tasks)}: the data is not local ({line}); {LOCAL_DATA}"
        ) from None
    results = None
    if out is not None:  # lm-eval reports on LOCAL_RANK 0; global rank 0 tells every rank
        results = TaskResults(
            {
                name: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
                for name, metrics in out["results"].items()
            },
            {name: dict(h) for name, h in out.get("higher_is_better", {}).items()},
        )
    if dist.is_initialized():
        box = [results]
        dist.broadcast_object_list(box, src=0)
        results = box[0]
    return results


RANKING_ORDER = ("acc_norm", "acc", "exact_match", "word_perplexity", "bits_per_byte")
"""Which metric ranks a task when none is asked for: accuracies first, then (perplexity
tasks) word perplexity, then bits per byte."""


def ranking_metric(
    results: TaskResults, task: str, chosen: str | None = None
) -> tuple[str, float, bool]:
    """``(metric, value, lower is better)`` of ``task``: ``chosen`` (``--metric TASK=NAME``),
    else the first of :data:`RANKING_ORDER` it reports; the direction is lm-eval's own."""
    metrics, directions = results.metrics[task], results.higher_is_better.get(task, {})
    names = {key.split(",")[0]: key for key in metrics if not key.split(",")[0].endswith("_stderr")}
    if chosen is not None:
        if chosen not in names:
            raise ValueError(
                f"--metric {task}={chosen}: lm-eval reports {sorted(names)} for {task}"
            )
        name = chosen
    else:
        name = next((n for n in RANKING_ORDER if n in names), None)
        if name is None:
            raise ValueError(
                f"lm-eval task {task}: none of {list(RANKING_ORDER)} among its metrics "
                f"{sorted(names)}; choose one with --metric {task}=NAME"
            )
    if name not in directions:
        raise ValueError(f"lm-eval task {task}: no higher_is_better for its metric {name}")
    return name, metrics[names[name]], not directions[name]


def model_lm(session: Any, model: list[Any]) -> Any:
    """The adapter on an evaluation session's model, with the run's tokenizer and length."""
    from wsm_megatron.data import build_tokenizer
    from wsm_megatron.eval.adapter import MegatronLM

    tokenizer = build_tokenizer(session.config.data)
    return MegatronLM(model, tokenizer, session.config.seq_length)


def evaluate_checkpoint(
    config: Any,
    checkpoint: Path,
    tasks: Sequence[str],
    *,
    include_path: Path | None = None,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """``wsm-eval``: lm-eval ``tasks`` on a checkpoint (merged or not, weights only) at the
    run's layout; rank 0 prints lm-eval's table."""
    from wsm_megatron.training.checkpointing import load_model_only, resolve_checkpoint
    from wsm_megatron.training.trainer import eval_session

    resolve_checkpoint(checkpoint)  # bad input fails before start-up
    manager = task_manager(tasks, include_path)
    session, model = eval_session(config)
    iteration = load_model_only(model, checkpoint)
    results = run_tasks(model_lm(session, model), tasks, manager, limit=limit).metrics
    if session.runtime.is_main:
        print(f"{checkpoint} (iteration {iteration}):")
        for task, metrics in results.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"  {task}: {shown}")
    return results
