"""``wsm-train``: WSM pre-training on Megatron-Core (run it under torchrun or SLURM's srun).

Examples::

    torchrun --nproc-per-node 2 -m wsm_megatron.cli.train --config configs/tiny-cpu.yaml
    torchrun --nproc-per-node 8 -m wsm_megatron.cli.train --config configs/gpt-125m.yaml \\
        data.train_data=[/data/web_text_document] train.lr=6e-4 checkpoint.save=ckpts
    wsm-train --config configs/tiny-cpu.yaml --print-config parallel.tensor_model_parallel_size=1
    torchrun --nproc-per-node 2 -m wsm_megatron.cli.train --config configs/tiny-cpu.yaml \\
        --evaluate runs/demo/checkpoints runs/demo/merged --eval-output eval.json

Overrides are ``section.key=value`` (values parsed as YAML). Re-running the same command resumes
from the newest checkpoint in ``checkpoint.save``. Exit status 2 with one ``wsm-train: error:``
line for an invalid configuration or launch; 3 when a signal (``train.exit_signals``) or the
time budget (``train.exit_duration_in_mins``) stopped the run after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from wsm_megatron.cli.arguments import is_main_by_launcher

PROG = "wsm-train"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Pre-train a GPT with a warmup-stable LR and checkpoints for WSM merging "
        "(arXiv 2507.17634) on Megatron-Core. Launch one process per GPU (or CPU rank) with "
        "torchrun or srun.",
    )
    p.add_argument("--config", required=True, metavar="YAML", help="a config (see configs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="config overrides, e.g. train.lr=3e-3",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="validate the configuration, print it resolved as YAML and exit (no launch needed)",
    )
    p.add_argument(
        "--evaluate",
        nargs="+",
        metavar="CKPT",
        help="instead of training, report the validation loss of these checkpoints (roots or "
        "iter_* directories, weights only: merged checkpoints work)",
    )
    p.add_argument("--eval-output", metavar="JSON", help="with --evaluate: write results here")
    p.add_argument(
        "--plan-memory",
        action="store_true",
        help="print the online merge's ring cost per GPU and per node at --world-size and exit "
        "(no launch, no model built)",
    )
    p.add_argument("--world-size", type=int, metavar="N", help="with --plan-memory: GPUs in all")
    p.add_argument(
        "--gpus-per-node", type=int, default=8, metavar="G", help="with --plan-memory (default 8)"
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        metavar="V",
        help="with --plan-memory: the tokenizer's vocabulary (default: corpus.vocab_size)",
    )
    return p


def _plan_memory(args: argparse.Namespace, config: object) -> str:
    """The ``--plan-memory`` answer, or a ValueError naming the flag."""
    from wsm_megatron.snapshots.plan import plan_ring

    if args.world_size is None or args.world_size < 1:
        raise ValueError("--plan-memory needs --world-size N (N >= 1)")
    if args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node: must be >= 1, got {args.gpus_per_node}")
    vocab = args.vocab_size or (config.corpus.vocab_size if config.corpus.name else None)
    if not vocab:
        raise ValueError("--plan-memory: give --vocab-size (the config names no corpus)")
    plan = plan_ring(config, args.world_size, vocab, args.gpus_per_node)
    return f"{PROG}: {args.world_size} GPUs: {plan.describe()}"


def _quiet_imports() -> None:
    """Silence library notices that are expected and not actionable here.

    Megatron warns at import that Apex/TE are missing (the CPU setup), and about a deprecated
    CUDA-graph default; torch's checkpoint internals about their own deprecations; the rerun
    state machine announces that it is disabled. On CPU the CUDA connection hint is moot too.
    """
    import logging

    import torch

    for message in (
        ".*(Apex|Transformer Engine).*not installed.*",
        "Apex is not installed.*",
        "full scope is deprecated.*",
        ".*deprecating ShardedTensor.*",
        "`load_state_dict` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    logging.getLogger("megatron.core.rerun_state_machine").setLevel(logging.ERROR)


def _raised_by_us(err: BaseException) -> bool:
    """Whether ``err`` was raised by wsm_megatron's own checks (a user error) rather than inside
    torch or Megatron (a bug, which keeps its traceback)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(
        _PACKAGE_DIR
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_output and not args.evaluate:
        parser.error("--eval-output needs --evaluate")
    # The configuration is checked before torch or megatron-core is imported: an error or
    # --print-config answers at once.
    from wsm_megatron.training.config import ConfigError, dump_config, load_config

    is_main = is_main_by_launcher()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        if is_main:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    if args.plan_memory:
        try:
            print(_plan_memory(args, config))
        except ValueError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        return 0

    _quiet_imports()
    from wsm_megatron.runtime import destroy_distributed
    from wsm_megatron.runtime.termination import SAVED_STATUS
    from wsm_megatron.training.trainer import evaluate_checkpoints, pretrain

    try:
        if args.evaluate:
            results = evaluate_checkpoints(config, args.evaluate)
            if args.eval_output and is_main:
                Path(args.eval_output).parent.mkdir(parents=True, exist_ok=True)
                Path(args.eval_output).write_text(json.dumps(results, indent=1) + "\n")
        elif pretrain(config).stopped is not None:  # saved on a signal or the time budget
            return SAVED_STATUS
    except ValueError as err:
        if not _raised_by_us(err):
            raise
        if is_main:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            if "world size" in str(err):
                print(
                    f"{PROG}: launch one process per rank, e.g. torchrun --nproc-per-node N "
                    f"-m wsm_megatron.cli.train ...",
                    file=sys.stderr,
                )
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
