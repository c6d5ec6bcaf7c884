"""``wsm-export``: a Megatron checkpoint to a Hugging Face transformers model folder.

Examples::

    wsm-export --config configs/dense-1b.yaml --checkpoint runs/dense-1b/merged \\
        --to hf --output exports/dense-1b-merged
    wsm-export --config run.yaml model.num_layers=8 --checkpoint ckpts/iter_0001000 \\
        --to hf --output out --memory-gb 32 --dtype bfloat16

One process, no GPU, at any saved TP/PP/EP layout: the checkpoint is read a layer at a time
within ``--memory-gb``. The output folder appears only when complete (written beside it and
renamed into place); an existing one is refused.
Exit status: 0 on success, 1 when the export is refused on its input (one ``wsm-export:
error:`` line), 2 for invalid flags or configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from wsm_megatron.cli.arguments import add_checkpoint_arguments
from wsm_megatron.cli.train import _quiet_imports, _raised_by_us
from wsm_megatron.export.config import (
    DEFAULT_MEMORY_GB,
    DEFAULT_SHARD_BYTES,
    DTYPES,
    ExportError,
    parse_size,
)

PROG = "wsm-export"


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ExportError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a Megatron checkpoint (trained or merged, saved at any TP/PP/EP "
        "layout) into a Hugging Face transformers model folder (Llama, Mixtral or GPT-NeoX).",
    )
    add_checkpoint_arguments(p)
    p.add_argument("--to", default="hf", choices=["hf"], help="the output format (default hf)")
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="a new folder")
    p.add_argument(
        "--memory-gb",
        type=float,
        default=DEFAULT_MEMORY_GB,
        metavar="GB",
        help=f"tensors held at once, at most (default {DEFAULT_MEMORY_GB:g})",
    )
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default=DEFAULT_SHARD_BYTES,
        metavar="SIZE",
        help="largest safetensors file, e.g. 5GB (default; at most half of --memory-gb)",
    )
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="default: the checkpoint's")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the checkpoint's file sizes and checksums first",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wsm_megatron.training.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    _quiet_imports()
    try:
        from wsm_megatron.export.api import export_checkpoint
        from wsm_megatron.export.config import ExportConfig

        export = ExportConfig(
            checkpoint=args.checkpoint, output=args.output, target=args.to,
            memory_gb=args.memory_gb, max_shard_bytes=args.max_shard_size, dtype=args.dtype,
            verify=not args.no_verify,
        )  # fmt: skip
        result = export_checkpoint(config, export, progress=not args.quiet)
    except (ValueError, OSError) as err:
        if not isinstance(err, (ExportError, OSError)) and not _raised_by_us(err):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(
        f"{PROG}: {result.architecture}, iteration {result.iteration}, "
        f"{result.parameters / 1e6:.2f}M parameters in {len(result.shards)} shard(s) -> "
        f"{result.output} ({result.bytes_read / 2**20:.1f} MiB read, "
        f"{result.bytes_written / 2**20:.1f} MiB written, {result.seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
