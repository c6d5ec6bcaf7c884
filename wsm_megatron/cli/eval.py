"""``wsm-eval``: lm-evaluation-harness tasks on any checkpoint, merged or not, at the run's layout.

Examples::

    wsm-eval --config configs/tiny-cpu.yaml parallel.tensor_model_parallel_size=1 \\
        --checkpoint runs/demo/merged --tasks my_task --include-path my_tasks/ \\
        --batch-size 16 --output-path results/ --log-samples
    torchrun --nproc-per-node 2 -m wsm_megatron.cli.eval --config configs/tiny-cpu.yaml \\
        --checkpoint runs/demo/checkpoints --tasks my_task --include-path my_tasks/

Needs the ``[eval]`` extra. Nothing is downloaded: tasks read local data (HF offline mode).
Exit status: 0 on success, 1 when evaluation fails on its input (one ``wsm-eval: error:`` line),
2 for invalid flags or configuration (before any model loads).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from wsm_megatron.atomic import atomic_write_text
from wsm_megatron.cli.arguments import (
    add_checkpoint_arguments,
    add_lm_eval_arguments,
    comma_separated,
    eval_options,
    is_main_by_launcher,
)
from wsm_megatron.cli.train import _quiet_imports, _raised_by_us

PROG = "wsm-eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Score a Megatron checkpoint on lm-evaluation-harness tasks, in place at the "
        "run's TP/PP layout (every model-parallel rank runs the same requests; rank 0 reports).",
    )
    add_checkpoint_arguments(p)
    p.add_argument(
        "--tasks", required=True, type=comma_separated(str.strip, "names"), metavar="T1,T2"
    )
    p.add_argument("--output", type=Path, metavar="JSON", help="write the metrics here")
    add_lm_eval_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_imports()
    from wsm_megatron.eval.harness import check_max_length, evaluate_checkpoint
    from wsm_megatron.runtime import destroy_distributed
    from wsm_megatron.training.config import ConfigError, load_config

    is_main = is_main_by_launcher()
    try:
        config = load_config(args.config, args.overrides)
        options = eval_options(args)
        check_max_length(config, options.max_length)
        if args.output is not None and args.output.is_dir():
            raise ValueError(f"--output {args.output}: is a directory (a JSON file is written)")
    except (ConfigError, ValueError) as err:
        return _error(err, is_main, status=2)
    try:
        results = evaluate_checkpoint(config, args.checkpoint, args.tasks, options)
    except ValueError as err:
        if not _raised_by_us(err):
            raise
        return _error(err, is_main, status=1)
    finally:
        destroy_distributed()
    if args.output and is_main:
        atomic_write_text(args.output, json.dumps(results, indent=1) + "\n")
    return 0


def _error(err: Exception, is_main: bool, status: int) -> int:
    if is_main:
        print(f"{PROG}: error: {err}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
