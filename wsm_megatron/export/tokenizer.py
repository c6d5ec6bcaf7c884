"""The run's tokenizer as a transformers ``PreTrainedTokenizerFast`` folder: ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``.

- Hugging Face ``tokenizer.json``: copied; GPT-2 BPE: built as the run builds it;
  SentencePiece (BPE or unigram): converted by transformers' converter, which follows the
  model's own normaliser settings.
- Each is checked to encode a set of probe texts exactly as the run's tokenizer does; one line
  names the first that differs (the export is refused).
- Megatron's GPT datasets separate documents with EOD and never insert BOS: the export adds no
  special tokens on encoding (no post-processor). ``eos_token`` is the EOD token;
  ``bos_token`` the tokenizer's BOS, or EOD when it has none (what ``wsm-eval``'s adapter and
  lm-eval's ``hf`` backend both take as the prefix token of a rolling window).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsm_megatron.data.config import TokenizerArgs
from wsm_megatron.export.config import ExportError
from wsm_megatron.export.writer import write_json

PROBES = (
    "def f(x):\n    return x + 1\n",
    "import os\n\n\nclass A(object):\n\tpass\n",
    "  leading and  double  spaces, trailing   ",
    "numbers 1234567890 3.14159 -42 0x1F",
    "Unicode: héllo wörld, naïve café, 日本語, Ελληνικά, emoji 🙂🚀",
    "MixedCASE snake_case camelCase kebab-case",
    "\n\n\n",
    "",
)


def _from_sentencepiece(path: str) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
        from transformers.convert_slow_tokenizer import SpmConverter
    except ImportError as err:
        raise ExportError(f"tokenizer: converting SentencePiece needs {err.name}") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    kind = proto.trainer_spec.model_type  # 1 unigram, 2 BPE, 3 word, 4 char
    build = getattr(SpmConverter, "build_tokenizer_from_spm_proto", None)
    if kind not in (1, 2) or build is None:
        why = (
            "this transformers has no SpmConverter.build_tokenizer_from_spm_proto"
            if build is None
            else f"SentencePiece model type {kind} (word/char) has no tokenizer.json form"
        )
        raise ExportError(f"tokenizer: cannot export SentencePiece model {path}: {why}")
    pieces = proto.pieces
    vocab = (
        [(p.piece, p.score) for p in pieces]
        if kind == 1
        else {p.piece: i for i, p in enumerate(pieces)}
    )
    return build(proto, vocab), proto.trainer_spec.unk_piece


def hf_tokenizer(args: TokenizerArgs) -> tuple[Any, str | None]:
    """The run's tokenizer as a ``tokenizers.Tokenizer``, and its unknown token (or None)."""
    from tokenizers import Tokenizer

    if args.type == "SentencePieceTokenizer":
        return _from_sentencepiece(args.model)
    if args.type == "HuggingFaceTokenizer":
        path = Path(args.model)
        return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path)), None
    from wsm_megatron.data.tokenizer import _gpt2_library

    return _gpt2_library(args.vocab_file, args.merge_file).tokenizer, None


def check_same_encoding(ours: Any, theirs: Any, args: TokenizerArgs) -> None:
    """ExportError naming the first probe text the exported tokenizer encodes differently."""
    for text in PROBES:
        if ours.tokenize(text) != theirs.encode(text, add_special_tokens=False).ids:
            raise ExportError(
                f"tokenizer: {args.type} {args.model or args.vocab_file} does not convert "
                f"exactly to a tokenizer.json ({text!r} encodes differently); it cannot be exported"
            )


def special_ids(ours: Any) -> tuple[int, int]:
    """``(bos, eos)`` ids of the run's tokenizer: its BOS (else EOD) and EOD."""
    try:
        bos = ours.bos
    except (AttributeError, NotImplementedError):
        bos = None
    return (bos if isinstance(bos, int) and bos >= 0 else ours.eod), ours.eod


def write_tokenizer(
    folder: Path, tokenizer: Any, unk: str | None, bos: int, eos: int, max_length: int
) -> None:
    """The three files of a ``PreTrainedTokenizerFast`` folder, with these BOS/EOS ids."""
    data = json.loads(tokenizer.to_str())
    data["post_processor"] = None  # Megatron adds no BOS/EOS when it encodes
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    special = {"bos_token": tokenizer.id_to_token(bos), "eos_token": tokenizer.id_to_token(eos)}
    special |= {"unk_token": unk} if unk else {}
    write_json(folder / "special_tokens_map.json", special)
    config = special | {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    write_json(folder / "tokenizer_config.json", config)
