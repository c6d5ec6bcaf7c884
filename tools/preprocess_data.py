"""Tokenize text into a Megatron indexed dataset (OUTPUT_PREFIX.bin + OUTPUT_PREFIX.idx).

    python tools/preprocess_data.py --input a.jsonl --json-key text \\
        --tokenizer-model tok/spm.model --output-prefix data/train

The tokenizer, as Megatron-LM's flags name it: ``--tokenizer-type`` SentencePieceTokenizer
(``--tokenizer-model x.model``), HuggingFaceTokenizer (``--tokenizer-model`` a tokenizer.json or
its directory) or GPT2BPETokenizer (``--vocab-file vocab.json --merge-file merges.txt``); without
``--tokenizer-type`` it follows from the files given.

A ``.jsonl`` input gives one document per line (``--json-key``); any other file is one document.
Each document gets an EOD token appended unless ``--no-append-eod``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsm_megatron.data.config import TOKENIZER_TYPES, tokenizer_args


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    parser.add_argument(
        "--tokenizer-type", default=None, help=f"one of {', '.join(TOKENIZER_TYPES)}"
    )
    parser.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model, or tokenizer.json / its dir"
    )
    parser.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocab.json")
    parser.add_argument("--merge-file", default=None, help="GPT-2 BPE merges.txt")
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
    for path in args.input:
        if not Path(path).is_file():
            print(f"{prog}: error: input file {path!r} does not exist", file=sys.stderr)
            return 2
    try:
        tokenizer = tokenizer_args(
            args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, _flag
        )
        if tokenizer is None:
            raise ValueError("--tokenizer-model: required (or --vocab-file and --merge-file)")
        tokenizer.check_files()
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    from wsm_megatron.data import build_tokenizer
    from wsm_megatron.data.preprocess import preprocess

    try:
        prefix = preprocess(
            args.input,
            build_tokenizer(tokenizer),
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
