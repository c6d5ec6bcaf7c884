"""Train a SentencePiece tokenizer for wsm-megatron (byte fallback; deterministic).

    python tools/train_tokenizer.py --input a.txt b.jsonl --output-prefix tok/spm --vocab-size 8192

Writes ``OUTPUT_PREFIX.model``. A ``.jsonl`` input gives one document per line (``--json-key``);
any other file is one document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.model")
    parser.add_argument("--vocab-size", type=int, required=True, help="upper bound on pieces")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--json-key", default="text", help="field of a .jsonl record to read")
    parser.add_argument("--max-sentences", type=int, default=200_000, help="lines sampled")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prog = Path(__file__).name
    missing = [p for p in args.input if not Path(p).is_file()]
    if missing:
        print(f"{prog}: error: input file {missing[0]!r} does not exist", file=sys.stderr)
        return 2
    from wsm_megatron.data import iter_documents, train_tokenizer

    try:
        model = train_tokenizer(
            iter_documents(args.input, args.json_key),
            args.output_prefix,
            args.vocab_size,
            model_type=args.model_type,
            max_sentences=args.max_sentences,
            seed=args.seed,
            num_threads=args.threads,
        )
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
