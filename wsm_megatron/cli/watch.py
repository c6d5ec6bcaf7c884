"""``wsm-watch``: follow a live run's checkpoint folder and score the WSM merges of each new
checkpoint's windows, as wsm-tune scores them.

Examples::

    wsm-watch --config configs/tiny-cpu.yaml parallel.tensor_model_parallel_size=1 \\
        --checkpoints runs/demo/checkpoints --durations 2,4 --schedules linear,minus-sqrt \\
        --output runs/demo/watch
    torchrun --nproc-per-node 2 -m wsm_megatron.cli.watch --config configs/tiny-cpu.yaml \\
        --checkpoints runs/demo/checkpoints --durations 4,8 --until-iteration 2000 \\
        --tasks val,lm-eval:my_task --include-path my_tasks/ --save-best runs/demo/best

A sidecar, launched on its own ranks at a layout of its own (config overrides
``section.key=value``: the run's config with, say, a smaller TP). Polls every
``--poll-seconds``; a checkpoint counts once complete and named by the tracker. Writes
``OUTPUT/watch.jsonl``, ``watch.png`` and ``watch_state.json`` (a restart goes on where it
stopped) and never writes into the run's folders. Exit status: 0 on success, 1 when the input
is refused (one ``wsm-watch: error:`` line), 2 for invalid flags or configuration.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wsm_megatron.cli.arguments import add_lm_eval_arguments, is_main_by_launcher
from wsm_megatron.cli.train import _quiet_imports, _raised_by_us
from wsm_megatron.cli.tune import add_candidate_arguments, tune_options
from wsm_megatron.merge.errors import MergeError

if TYPE_CHECKING:
    from wsm_megatron.training.config import WSMConfig
    from wsm_megatron.watch.api import WatchOptions

PROG = "wsm-watch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Follow a live run's checkpoint folder: for each new complete checkpoint, "
        "score it alone and every candidate WSM merge (duration x schedule) whose window ends "
        "at it, in memory as wsm-tune does. Writes watch.jsonl, watch.png, watch_state.json.",
    )
    p.add_argument("--config", required=True, metavar="YAML", help="the run's config")
    p.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE",
        help="config overrides (the watcher's own layout, e.g. a smaller TP)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoints", metavar="ROOT",
        help="the run's checkpoint root (default: the config's checkpoint.save)",
    )  # fmt: skip
    add_candidate_arguments(p)
    p.add_argument("--output", type=Path, default=Path("watch"), metavar="DIR", help="(./watch)")
    p.add_argument(
        "--poll-seconds", type=float, default=60.0, metavar="S",
        help="seconds between looks at the folder (60)",
    )  # fmt: skip
    p.add_argument(
        "--until-iteration", type=int, metavar="N",
        help="stop once the run's tracker has reached N and every checkpoint up to N is scored",
    )  # fmt: skip
    p.add_argument("--once", action="store_true", help="score what is complete now, then stop")
    p.add_argument(
        "--load-retries", type=int, default=3, metavar="N",
        help="tries again after a failed load (1, 2, 4... s apart) while the checkpoint stays "
        "complete, then skips it (3)",
    )  # fmt: skip
    p.add_argument(
        "--save-best", type=Path, metavar="DIR",
        help="write the best merge so far here (wsm-merge's output), each time it improves",
    )  # fmt: skip
    add_lm_eval_arguments(p, files=False, bootstrap_iters=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_imports()
    from wsm_megatron.training.config import ConfigError, load_config
    from wsm_megatron.watch.api import WatchOptions, check_config

    is_main = is_main_by_launcher()
    try:
        config = load_config(args.config, args.overrides)
        checkpoints = args.checkpoints or config.checkpoint.save
        if checkpoints is None:
            raise ValueError("--checkpoints: not given, and the config has no checkpoint.save")
        options = WatchOptions(
            tune_options(args, Path(checkpoints), None, checkpoints_may_appear=not args.once),
            poll_seconds=args.poll_seconds,
            until_iteration=args.until_iteration,
            once=args.once,
            load_retries=args.load_retries,
        )
        check_config(config, options)
    except (ConfigError, MergeError, ValueError) as err:
        if is_main:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return _run(config, options, is_main)  # the folder is checked first, before any start-up


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (SLURM ending the job step, ``kill``) stops the watcher as Ctrl-C does: its
    pin is released, its files are whole (each is written atomically)."""
    raise KeyboardInterrupt


def _run(config: WSMConfig, options: WatchOptions, is_main: bool) -> int:
    from wsm_megatron.runtime import destroy_distributed
    from wsm_megatron.watch.api import watch

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        watch(config, options)
    except ValueError as err:
        if not _raised_by_us(err):
            raise
        if is_main:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if is_main:
            print(f"{PROG}: stopped; a restart goes on from {options.tune.output}", flush=True)
        return 130
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
