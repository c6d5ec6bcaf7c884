"""``wsm-merge``: shard-local, streaming WSM merge of Megatron ``torch_dist`` checkpoints.

Examples::

    wsm-merge --input ckpts --output merged --iterations 100,200,300,400 --schedule minus-sqrt
    wsm-merge --input ckpts --output merged --window-tokens 80B --schedule linear
    torchrun --no-python --nproc-per-node 8 wsm-merge --input ckpts --output merged --last 8
    srun --ntasks 16 wsm-merge --input ckpts --output sweep --sweep 4:linear 8:minus-sqrt

Exit status: 0 on success, 1 when the merge fails (one ``wsm-merge: error: ...`` line naming the
checkpoint and tensor; the output root is left as it was), 2 for invalid flags.
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Sequence

from wsm_megatron.cli.arguments import comma_separated
from wsm_megatron.merge.config import (
    ACCUMULATE_DTYPES,
    DEFAULT_MEMORY_BUDGET_MB,
    OUTPUT_DTYPES,
    MergeConfig,
    SweepEntry,
    load_sweep_file,
    parse_token_count,
)
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.theory import ALIASES, SCHEDULES

PROG = "wsm-merge"


_int_list = comma_separated(int, "integers")
_float_list = comma_separated(float, "numbers")


def _tokens(text: str) -> int:
    try:
        return parse_token_count(text[:-3] if text.endswith("tok") else text)
    except MergeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    schedules = ", ".join([*SCHEDULES, *ALIASES])
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Merge the last checkpoints of a constant-LR Megatron run into one model "
        "whose weights emulate an LR decay (WSM, arXiv 2507.17634). Reads Megatron-LM "
        "torch_dist checkpoints shard by shard, never gathering a tensor, and writes a "
        "sharded model-only checkpoint that Megatron loads at any TP/PP.",
    )
    p.add_argument("--input", required=True, metavar="ROOT", help="checkpoint root (iter_*)")
    p.add_argument(
        "--output", required=True, metavar="OUT", help="output root: OUT/iter_<newest>/ + tracker"
    )
    sel = p.add_argument_group("which checkpoints (one of)")
    sel.add_argument("--iterations", type=_int_list, metavar="I1,I2,...")
    sel.add_argument("--last", type=int, metavar="N", help="the newest N checkpoints")
    sel.add_argument("--window-iters", type=int, metavar="W", help="checkpoints in (E-W, E]")
    sel.add_argument(
        "--window-tokens",
        type=_tokens,
        metavar="T",
        help="checkpoints within T tokens before E (suffixes K, M, B, T: 80B)",
    )
    sel.add_argument(
        "--end-iteration", type=int, metavar="E", help="window end (default: the tracker's)"
    )
    sel.add_argument("--every", type=int, default=1, metavar="K", help="keep every K-th")
    sel.add_argument(
        "--tokens-per-iter",
        type=int,
        metavar="N",
        help="token positions = iteration x N (default: each checkpoint's consumed samples "
        "x seq_length from its saved args)",
    )
    sel.add_argument(
        "--allow-partial-window",
        action="store_true",
        help="merge a window that the checkpoints on disk cannot fill (else an error)",
    )
    w = p.add_argument_group("weights")
    w.add_argument(
        "--schedule", metavar="NAME", help=f"emulated decay: {schedules} (default linear)"
    )
    w.add_argument("--weights", type=_float_list, metavar="C0,...", help="raw, oldest first")
    w.add_argument("--min-lr-ratio", type=float, default=0.0, metavar="R")
    w.add_argument(
        "--ema-beta",
        type=float,
        metavar="B",
        help="EMA factor per checkpoint (per average spacing when irregular)",
    )
    p.add_argument(
        "--sweep",
        nargs="+",
        metavar="SPEC",
        help="several outputs in one pass, OUT/<name>/: WINDOW:SCHEDULE[:NAME] items "
        "(WINDOW = N checkpoints, Nit or Ntok) or one YAML file of entries",
    )
    n = p.add_argument_group("numerics and contents")
    n.add_argument("--accumulate-dtype", choices=list(ACCUMULATE_DTYPES), default="fp32")
    n.add_argument(
        "--output-dtype", choices=list(OUTPUT_DTYPES), help="default: each tensor's input dtype"
    )
    n.add_argument("--no-check-finite", action="store_true", help="merge despite NaN/Inf")
    n.add_argument("--keep-optimizer", action="store_true", help="average optimizer tensors too")
    n.add_argument("--keep-rng", action="store_true", help="copy RNG/rerun state from newest")
    n.add_argument(
        "--copy-from-newest",
        action="append",
        default=[],
        metavar="GLOB",
        help="copy matching tensors from the newest checkpoint instead of averaging "
        "(repeatable; wins over --average)",
    )
    n.add_argument(
        "--average",
        action="append",
        default=[],
        metavar="GLOB",
        help="average matching floating tensors outside Megatron's model roots (repeatable)",
    )
    n.add_argument(
        "--layout-from",
        type=int,
        metavar="ITERATION",
        help="the merged checkpoint whose TP/PP/EP layout the output takes (default: newest)",
    )
    r = p.add_argument_group("resources and output")
    r.add_argument(
        "--memory-budget-mb",
        type=float,
        default=DEFAULT_MEMORY_BUDGET_MB,
        metavar="MB",
        help=f"peak memory per rank above start-up (default {DEFAULT_MEMORY_BUDGET_MB:g})",
    )
    r.add_argument("--io-threads", type=int, default=2, metavar="N", help="read threads per rank")
    r.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="compute threads per rank (default 1: scale with more ranks instead)",
    )
    r.add_argument("--overwrite", action="store_true", help="replace an existing output iteration")
    r.add_argument("--report", metavar="FILE.json", help="write a JSON report (rank 0)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _sweep(items: Sequence[str] | None) -> tuple[SweepEntry, ...]:
    if not items:
        return ()
    if len(items) == 1 and items[0].endswith((".yaml", ".yml")):
        return load_sweep_file(items[0])
    return tuple(SweepEntry.from_spec(item) for item in items)


def config_from_args(args: argparse.Namespace) -> MergeConfig:
    return MergeConfig(
        input=args.input,
        output=args.output,
        iterations=args.iterations,
        last=args.last,
        window_iters=args.window_iters,
        window_tokens=args.window_tokens,
        end_iteration=args.end_iteration,
        every=args.every,
        tokens_per_iter=args.tokens_per_iter,
        schedule=args.schedule,
        weights=args.weights,
        min_lr_ratio=args.min_lr_ratio,
        ema_beta=args.ema_beta,
        sweep=_sweep(args.sweep),
        accumulate_dtype=args.accumulate_dtype,
        output_dtype=args.output_dtype,
        check_finite=not args.no_check_finite,
        keep_optimizer=args.keep_optimizer,
        keep_rng=args.keep_rng,
        copy_from_newest=args.copy_from_newest,
        average=args.average,
        allow_partial_window=args.allow_partial_window,
        layout_from=args.layout_from,
        memory_budget_mb=args.memory_budget_mb,
        io_threads=args.io_threads,
        threads=args.threads,
        overwrite=args.overwrite,
        report=args.report,
        progress=not args.no_progress,
    )


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _summary(result) -> str:
    gib = result.bytes_read / 2**30
    lines = []
    for job in result.jobs:
        coeffs = ", ".join(f"{c:.4f}" for c in job.coefficients)
        its = ",".join(str(x["iteration"]) for x in job.inputs)
        pos = ",".join(str(x["position"]) for x in job.inputs)
        lines.append(f"{PROG}: wrote {job.output} from iterations {its} (c = {coeffs})")
        lines.append(f"{PROG}: positions {pos} {job.position_unit} ({job.position_source})")
        if job.partial_window:
            lines.append(f"{PROG}: warning: partial window: {job.partial_window}")
    lines.append(
        f"{PROG}: {result.seconds:.1f} s on {result.ranks} rank(s), read {gib:.2f} GiB at "
        f"{result.read_throughput_mib_s:.0f} MiB/s, peak RSS {result.peak_rss_mib:.0f} MiB/rank "
        f"(budget {result.memory_budget_mib:g})"
    )
    return "\n".join(lines)


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard one: inputs hold thousands of shard files
    (read through a bounded cache) and gloo keeps a socket per peer rank."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (argparse exits with 2 on malformed flags)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except MergeError as err:
        _error(str(err))
        return 2
    raise_open_file_limit()

    import torch.distributed as dist

    from wsm_megatron.merge.api import merge
    from wsm_megatron.runtime import detect_launch_env, init_distributed
    from wsm_megatron.runtime.termination import stop_on_sigterm

    try:
        launch = detect_launch_env()
    except ValueError as err:
        _error(str(err))
        return 2
    started_group = launch.world_size > 1 and not dist.is_initialized()
    if started_group:
        # gloo, whatever the node has: merge ranks do CPU work and only exchange metadata, so
        # their number per node is not tied to the GPUs (and Megatron is never imported).
        init_distributed(megatron=False, backend="gloo", timeout_minutes=120)
    try:
        with stop_on_sigterm():  # unwind on SIGTERM, so the temporary output is removed
            result = merge(config)
    except MergeError as err:
        if launch.rank == 0:
            _error(str(err))
        return 1
    finally:
        if started_group:
            dist.destroy_process_group()
    if launch.rank == 0:
        print(_summary(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
