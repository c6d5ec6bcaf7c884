"""Argument types shared by the console scripts."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from wsm_megatron.eval.options import EvalOptions

T = TypeVar("T")


def is_main_by_launcher() -> bool:
    """Whether this process is rank 0 as its launcher says (torchrun's ``RANK``, SLURM's
    ``SLURM_PROCID``), before any process group exists: only rank 0 prints an error line."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def comma_separated(convert: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    """An argparse ``type`` for ``a,b,c`` lists (empty items ignored): ``what`` names the items
    in the error, e.g. ``"integers"``."""

    def parse(text: str) -> list[T]:
        try:
            return [convert(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


def number(text: str) -> int | float:
    """An int if the text is one (positions keep exact integers), else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """The run's config, its overrides and one checkpoint (a root or an ``iter_*`` folder)."""
    p.add_argument("--config", required=True, metavar="YAML", help="the run's config")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="DIR", help="root or iter_*")


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive integer or auto, got {text!r}") from None


def _checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` from a parser that raises ``ValueError`` with its own message."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    return convert


def add_lm_eval_arguments(
    p: argparse.ArgumentParser, *, files: bool = True, bootstrap_iters: int = 100000
) -> None:
    """lm-eval's run flags (its names, meanings and defaults), for ``eval_options``; with
    ``files``, its results and samples files too."""
    from wsm_megatron.eval.options import parse_limit, parse_seeds

    g = p.add_argument_group("lm-eval (as lm-eval's own flags)")
    g.add_argument("--include-path", type=Path, metavar="DIR", help="local lm-eval task YAMLs")
    g.add_argument(
        "--batch-size", type=_batch_size, default=1, metavar="N|auto",
        help="rows per micro-batch (1); auto: the largest power of two up to 64 that fits",
    )  # fmt: skip
    g.add_argument("--max-length", type=int, metavar="N", help="tokens (default: seq_length)")
    g.add_argument("--max-gen-toks", type=int, default=256, metavar="N", help="(256)")
    g.add_argument(
        "--limit", type=_checked(parse_limit), metavar="N|F",
        help="N documents per task, or below 1 a fraction of them",
    )  # fmt: skip
    g.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples")
    g.add_argument(
        "--seed", type=_checked(parse_seeds), default="0,1234,1234,1234", metavar="S",
        help="Python, NumPy, torch and few-shot seeds: one integer for all, or four (None "
        "leaves one); default 0,1234,1234,1234",
    )  # fmt: skip
    g.add_argument(
        "--gen-kwargs", metavar="K=V,...",
        help="generation settings over every task's: until, max_gen_toks, do_sample, "
        "temperature, top_k, top_p",
    )  # fmt: skip
    g.add_argument(
        "--bootstrap-iters", type=int, default=bootstrap_iters, metavar="N",
        help=f"bootstrap iterations for standard errors ({bootstrap_iters}; 0: none)",
    )  # fmt: skip
    if files:
        g.add_argument("--log-samples", action="store_true", help="per-sample files")
        g.add_argument("--output-path", type=Path, metavar="DIR", help="lm-eval's results files")
    g.add_argument(
        "--prefix-token", type=int, metavar="ID",
        help="token before empty contexts and rolling windows (default BOS, else end of document)",
    )  # fmt: skip
    g.add_argument(
        "--no-kv-cache", dest="kv_cache", action="store_false",
        help="generate by re-scoring whole sequences (the reference the cache is tested against)",
    )  # fmt: skip


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """``EvalOptions`` from ``add_lm_eval_arguments``' flags (``ValueError`` on bad values)."""
    from wsm_megatron.eval.options import EvalOptions, parse_seeds

    seeds = args.seed if isinstance(args.seed, tuple) else parse_seeds(args.seed)
    return EvalOptions(
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_gen_toks=args.max_gen_toks,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        seeds=seeds,
        gen_kwargs=args.gen_kwargs,
        bootstrap_iters=args.bootstrap_iters,
        log_samples=getattr(args, "log_samples", False),
        output_path=getattr(args, "output_path", None),
        include_path=args.include_path,
        prefix_token=args.prefix_token,
        kv_cache=args.kv_cache,
    )
