"""Tokenize text into a Megatron indexed dataset (OUTPUT_PREFIX.bin + OUTPUT_PREFIX.idx).

    python tools/preprocess_data.py --input a.jsonl --json-key text \\
        --tokenizer-model tok/spm.model --output-prefix data/train

A ``.jsonl`` input gives one document per line (``--json-key``); any other file is one document.
Each document gets an EOD token appended unless ``--no-append-eod``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    parser.add_argument("--json-key", default="text", help="field of a .jsonl record to read")
    parser.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the EOD token to every document (default: yes)",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prog = Path(__file__).name
    for path, what in [
        *((p, "input file") for p in args.input),
        (args.tokenizer_model, "tokenizer model"),
    ]:
        if not Path(path).is_file():
            print(f"{prog}: error: {what} {path!r} does not exist", file=sys.stderr)
            return 2
    from wsm_megatron.data import build_tokenizer
    from wsm_megatron.data.preprocess import preprocess

    try:
        prefix = preprocess(
            args.input,
            build_tokenizer(args.tokenizer_model),
            args.output_prefix,
            json_key=args.json_key,
            append_eod=args.append_eod,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
