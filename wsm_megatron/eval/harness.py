"""lm-eval tasks on the model in place, with no download at run time.

The Hugging Face libraries are put offline before lm-eval is imported; a task whose data is not
on this machine fails with one line saying how to point lm-eval at local data.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch.distributed as dist

from wsm_megatron.eval.options import EvalOptions

DEFAULT_OPTIONS = EvalOptions()

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


def _lm_eval_kwargs(options: EvalOptions) -> dict[str, Any]:
    """``simple_evaluate``'s settings from ``options`` (lm-eval's own meanings)."""
    seeds = dict(zip(SEED_ARGS, options.seeds, strict=True))
    return dict(
        limit=options.limit,
        num_fewshot=options.num_fewshot,
        bootstrap_iters=options.bootstrap_iters,
        gen_kwargs=options.parsed_gen_kwargs() if options.gen_kwargs else None,
        log_samples=options.log_samples,
        **seeds,
    )


SEED_ARGS = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    manager: Any,
    options: EvalOptions = DEFAULT_OPTIONS,
    *,
    model_name: str = "",
) -> TaskResults:
    """Every task's numeric metrics and their directions, on every rank; with
    ``options.output_path``, rank 0 writes lm-eval's results (and samples) files there."""
    from lm_eval import simple_evaluate

    is_main = not dist.is_initialized() or dist.get_rank() == 0
    tracker = _tracker(options, model_name) if is_main else None
    try:
        out = simple_evaluate(
            model=lm,
            model_args=f"pretrained={model_name}" if model_name else None,
            tasks=list(tasks),
            task_manager=manager,
            evaluation_tracker=tracker,
            verbosity="ERROR",
            **_lm_eval_kwargs(options),
        )
    except Exception as err:
        if not _data_error(err):
            raise
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"lm-eval tasks {', '.join(tasks)}: the data is not local ({line}); {LOCAL_DATA}"
        ) from None
    results = None
    if out is not None and is_main:
        if tracker is not None:
            _save_lm_eval_files(tracker, out, options)
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


def _tracker(options: EvalOptions, model_name: str) -> Any:
    """lm-eval's ``EvaluationTracker`` writing into a hidden staging folder of
    ``options.output_path`` (its files move into place once complete)."""
    if options.output_path is None:
        return None
    from lm_eval.loggers import EvaluationTracker

    staging = options.output_path / f".wsm-eval-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    return EvaluationTracker(output_path=str(staging))


def _save_lm_eval_files(tracker: Any, out: dict[str, Any], options: EvalOptions) -> None:
    """lm-eval's ``results_<time>.json`` and ``samples_<task>_<time>.jsonl``, as its CLI writes
    them, each renamed into ``options.output_path`` (under the model's folder) when complete."""
    samples = out.pop("samples", None) if options.log_samples else None
    tracker.save_results_aggregated(results=out, samples=samples)
    if samples:
        for task in out["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    staging = Path(tracker.output_path)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = options.output_path / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)


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


def model_lm(session: Any, model: list[Any], options: EvalOptions = DEFAULT_OPTIONS) -> Any:
    """The adapter on an evaluation session's model: the run's tokenizer, ``options``'
    length and batch size (``auto`` decided here, the same on every rank)."""
    from wsm_megatron.data import build_tokenizer
    from wsm_megatron.eval.adapter import MegatronLM, ModelLayout

    config = session.config
    p = config.parallel
    layout = ModelLayout.current(
        p.sequence_parallel, p.virtual_pipeline_model_parallel_size is not None
    )
    max_length = check_max_length(config, options.max_length)
    batch_size = options.batch_size
    if batch_size == "auto":
        batch_size = auto_batch_size(config, layout, session.built.vocab_size, max_length)
        if session.runtime.is_main:
            print(f"wsm-eval: --batch-size auto: {batch_size} rows per micro-batch")
    lm = MegatronLM(
        model,
        build_tokenizer(config.data),
        max_length,
        layout=layout,
        batch_size=batch_size,
        max_gen_toks=options.max_gen_toks,
        prefix_token=options.prefix_token,
        kv_cache=options.kv_cache,
        seed=options.seeds[2] if options.seeds[2] is not None else 0,
    )
    if session.runtime.is_main:
        kind = "the KV cache" if lm.kv_cache else "re-scoring (no KV cache at this layout)"
        print(
            f"wsm-eval: prefix token {lm.prefix_token}, max length {max_length}, batch size "
            f"{batch_size}, DP {layout.dp_size}; generation by {kind}"
        )
    return lm


def check_max_length(config: Any, max_length: int | None) -> int:
    """``--max-length`` (default: the run's ``seq_length``), at most the model's positions;
    and a layout evaluation runs at (context parallelism would need each sequence split over
    the CP ranks in megatron-core's load-balanced order: not done here)."""
    if config.parallel.context_parallel_size > 1:
        raise ValueError(
            "parallel.context_parallel_size: lm-eval tasks run at context_parallel_size=1 "
            "(a checkpoint loads at any layout: override it for the evaluation)"
        )
    limit = config.model.max_position_embeddings or config.seq_length
    length = max_length or config.seq_length
    if length > limit:
        raise ValueError(
            f"--max-length {length}: the model has {limit} positions "
            "(model.max_position_embeddings, else data.seq_length)"
        )
    return length


def auto_batch_size(config: Any, layout: Any, padded_vocab: int, max_length: int) -> int:
    """``--batch-size auto``: the largest power of two up to 64 rows whose fp32 logits (four
    copies: model output, masked, the cross entropy's) and unfused attention scores fit in
    half the free memory of the rank that has least; the same number on every rank."""
    import psutil
    import torch

    m = config.model
    heads = m.num_attention_heads // layout.tp_size
    per_row = 4 * max_length * (4 * padded_vocab // layout.tp_size + 2 * heads * max_length)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        free = torch.cuda.mem_get_info()[0]
    else:
        free = psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    size = 1
    while size < 64 and 2 * size * per_row <= free // 2:
        size *= 2
    if dist.is_initialized():
        box = torch.tensor([size], dtype=torch.float64, device=_device())
        dist.all_reduce(box, op=dist.ReduceOp.MIN)
        size = int(box.item())
    return size


def _device() -> Any:
    from wsm_megatron.eval.scoring import device

    return device()


def evaluate_checkpoint(
    config: Any,
    checkpoint: Path,
    tasks: Sequence[str],
    options: EvalOptions = DEFAULT_OPTIONS,
) -> dict[str, dict[str, float]]:
    """``wsm-eval``: lm-eval ``tasks`` on a checkpoint (merged or not, weights only) at the
    run's layout; rank 0 prints lm-eval's table."""
    from wsm_megatron.training.checkpointing import load_model_only, resolve_checkpoint
    from wsm_megatron.training.trainer import eval_session

    resolve_checkpoint(checkpoint)  # bad input fails before start-up
    manager = task_manager(tasks, options.include_path)
    check_max_length(config, options.max_length)
    session, model = eval_session(config, validation=False)
    iteration = load_model_only(model, checkpoint)
    lm = model_lm(session, model, options)
    results = run_tasks(lm, tasks, manager, options, model_name=str(checkpoint)).metrics
    if session.runtime.is_main:
        print(f"{checkpoint} (iteration {iteration}):")
        for task, metrics in results.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"  {task}: {shown}")
    return results
