"""``wsm-tune``: choose the merge duration and schedule by scoring every candidate in memory.

Examples::

    wsm-tune --config configs/tiny-cpu.yaml parallel.tensor_model_parallel_size=1 \\
        --checkpoints runs/demo/checkpoints --durations 2,4,6,8 --schedules linear,ema
    torchrun --nproc-per-node 2 -m wsm_megatron.cli.tune --config configs/tiny-cpu.yaml \\
        --checkpoints runs/demo/checkpoints --durations 2,4,8,16 \\
        --schedules linear,minus-sqrt,ema --output runs/demo/tune --save-best runs/demo/best
    wsm-tune ... --tasks val,lm-eval:my_task --include-path my_tasks/
    wsm-tune ... --durations 8,16 --intervals 1,2,4          # duration x interval (the paper's)
    wsm-tune ... --durations 4,8 --decay-reference linear,1-sqrt   # proxy runs: real decays

Launched like training, at the run's TP/PP layout (config overrides ``section.key=value``).
``--decay-reference`` trains: per duration and style, D iterations of the run (the window's
span) from the window's oldest checkpoint, into ``OUTPUT/decay/`` — real training, for proxy
runs. Exit status: 0 on success, 1 when tuning fails on its input (one ``wsm-tune: error:``
line naming the checkpoint, flag or key), 2 for invalid flags or configuration, 3 when a decay
branch was stopped by a signal or the time budget after saving (run again to resume it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsm_megatron.cli.arguments import (
    add_lm_eval_arguments,
    comma_separated,
    eval_options,
    is_main_by_launcher,
)
from wsm_megatron.cli.train import _quiet_imports, _raised_by_us
from wsm_megatron.merge.config import parse_token_count
from wsm_megatron.merge.errors import MergeError

if TYPE_CHECKING:
    from wsm_megatron.training.config import WSMConfig
    from wsm_megatron.tune.api import TuneOptions

PROG = "wsm-tune"

_int_list = comma_separated(int, "integers")
_str_list = comma_separated(str.strip, "names")


def _token_list(text: str) -> list[int]:
    try:
        return [parse_token_count(item) for item in text.split(",") if item.strip()]
    except MergeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _task_metric(text: str) -> tuple[str, str]:
    task, _, name = text.partition("=")
    if not task or not name:
        raise argparse.ArgumentTypeError(f"expected TASK=NAME, got {text!r}")
    return task, name


def add_candidate_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that say which candidates to score and how (wsm-tune, wsm-watch)."""
    p.add_argument(
        "--durations", type=_int_list, default=[], metavar="N1,N2,...",
        help="windows of the newest N checkpoints",
    )  # fmt: skip
    p.add_argument(
        "--durations-tokens", type=_token_list, default=[], metavar="T1,T2,...",
        help="windows of T tokens (suffixes K/M/B/T: 20B,40B)",
    )  # fmt: skip
    p.add_argument(
        "--schedules", type=_str_list, default=["linear"], metavar="S1,S2,...",
        help="merge schedules (as wsm-merge --schedule; default linear)",
    )  # fmt: skip
    p.add_argument(
        "--intervals", type=_int_list, default=[1], metavar="K1,K2,...",
        help="at each duration, merge every K-th checkpoint of its window counting back from "
        "the newest (same span, fewer checkpoints: duration 8 at interval 2 merges 4); the "
        "schedule's weights are those of the checkpoints merged (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--tasks", type=_str_list, default=["val"], metavar="TASK,...",
        help="scores: val (validation loss, the default) and lm-eval:TASK (lm-evaluation-harness, "
        "extra [eval]); the first ranks the candidates",
    )  # fmt: skip
    p.add_argument(
        "--metric", action="append", type=_task_metric, default=[], metavar="TASK=NAME",
        help="the metric that scores lm-eval TASK (default: acc_norm, acc, exact_match, "
        "word_perplexity, bits_per_byte, the first reported; its direction is lm-eval's)",
    )  # fmt: skip
    p.add_argument(
        "--snapshot-memory-gb", type=float, default=64.0, metavar="GB",
        help="snapshot memory per rank (64); above it the candidates run in groups",
    )  # fmt: skip


def tune_options(
    args: argparse.Namespace, checkpoints: Path, end_iteration: int | None, **extra: Any
) -> TuneOptions:
    """:class:`TuneOptions` from :func:`add_candidate_arguments`' flags (and ``--output``,
    ``--save-best``, lm-eval's); ``extra``: further fields."""
    from wsm_megatron.tune.api import TuneOptions
    from wsm_megatron.tune.candidates import TuneGrid

    grid = TuneGrid(
        tuple(args.durations),
        tuple(args.durations_tokens),
        tuple(args.schedules),
        end_iteration,
        tuple(args.intervals),
    )
    return TuneOptions(
        checkpoints=checkpoints,
        grid=grid,
        output=args.output,
        tasks=tuple(args.tasks),
        save_best=args.save_best,
        snapshot_memory_gb=args.snapshot_memory_gb,
        lm_eval=eval_options(args),
        metrics=tuple(args.metric),
        **extra,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Score every candidate WSM merge (merge duration x schedule, and the newest "
        "checkpoint alone) in memory at the run's TP/PP layout: each rank loads its shard of "
        "every checkpoint once, nothing is written per candidate. Writes tune.json and tune.png.",
    )
    p.add_argument("--config", required=True, metavar="YAML", help="the run's config")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--checkpoints", required=True, metavar="ROOT", help="checkpoint root (iter_*)")
    add_candidate_arguments(p)
    p.add_argument(
        "--decay-reference", type=_str_list, default=[], metavar="STYLE,...",
        help="also train a real WSD decay (linear, cosine, exponential, 1-sqrt) per duration "
        "from its window's oldest checkpoint over the window's span, into OUTPUT/decay/, and "
        "score it beside the merges. REAL TRAINING of that many iterations per duration and "
        "style (a window of 10%% of the run costs 10%% of its training): proxy runs only; needs "
        "the optimizer state in the start checkpoint",
    )  # fmt: skip
    p.add_argument(
        "--end-iteration", type=int, metavar="E", help="windows end at E (default: the tracker)"
    )
    p.add_argument("--output", type=Path, default=Path("tune"), metavar="DIR", help="(./tune)")
    p.add_argument("--save-best", type=Path, metavar="DIR", help="write the best merge here")
    add_lm_eval_arguments(p, files=False, bootstrap_iters=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_imports()
    from wsm_megatron.training.config import ConfigError, load_config

    is_main = is_main_by_launcher()
    try:
        config = load_config(args.config, args.overrides)
        options = tune_options(
            args,
            Path(args.checkpoints),
            args.end_iteration,
            decay_references=tuple(args.decay_reference),
        )
    except (ConfigError, MergeError, ValueError) as err:
        if is_main:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return _run(config, options, is_main)


def _run(config: WSMConfig, options: TuneOptions, is_main: bool) -> int:
    from wsm_megatron.runtime import destroy_distributed
    from wsm_megatron.runtime.termination import SAVED_STATUS
    from wsm_megatron.tune.api import tune
    from wsm_megatron.tune.decay import DecayStopped

    try:
        tune(config, options)
    except DecayStopped as err:
        if is_main:
            print(f"{PROG}: {err}", file=sys.stderr)
        return SAVED_STATUS
    except ValueError as err:
        if not _raised_by_us(err):
            raise
        if is_main:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
