"""SentencePiece tokenizers: train one (deterministically) and load it as megatron-core's own."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from megatron.core.tokenizers import MegatronTokenizer, MegatronTokenizerBase

Tokenizer = MegatronTokenizerBase
"""megatron-core's tokenizer: ``.vocab_size``, ``.eod``, ``.tokenize(text)``, ``.detokenize``."""

MODEL_TYPES = ("bpe", "unigram")
# Byte pieces (256) + <unk>, <s>, </s> + the newline symbol, before any learnt piece.
_RESERVED_PIECES = 256 + 3 + 1


def build_tokenizer(model_path: str | os.PathLike[str]) -> Tokenizer:
    """Load a SentencePiece ``.model`` as megatron-core's GPT tokenizer (what GPTDataset expects).

    ``.eod`` is the model's ``</s>`` id; ``.pad`` is its pad id (-1: none, Megatron's default).
    """
    path = Path(model_path)
    if not path.is_file():
        raise ValueError(f"tokenizer model {str(path)!r} does not exist")
    metadata = {"library": "sentencepiece", "model_type": "gpt"}
    return MegatronTokenizer.from_pretrained(str(path.resolve()), metadata_path=metadata)


def _lines(documents: Iterable[str]) -> Iterator[str]:
    for document in documents:
        for line in document.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    documents: Iterable[str],
    model_prefix: str | os.PathLike[str],
    vocab_size: int,
    *,
    model_type: str = "bpe",
    max_sentences: int = 200_000,
    seed: int = 1234,
    num_threads: int = 1,
) -> Path:
    """Train a SentencePiece model on ``documents``; write ``MODEL_PREFIX.model`` atomically.

    Made for source code and any text: no normalisation, whitespace kept as is (indentation
    round-trips), ``\\n`` is a piece of its own, digits split, and byte fallback, so every string
    round-trips through tokenize/detokenize. Trains on the non-blank lines, at most
    ``max_sentences`` of them (sampled with ``seed``); the same input, seed and thread count give
    a byte-identical model. ``vocab_size`` is an upper bound: a small corpus may yield fewer pieces.
    Returns the ``.model`` path.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size <= _RESERVED_PIECES:
        raise ValueError(
            f"vocab_size must be > {_RESERVED_PIECES} (256 byte pieces, 3 specials and newline), "
            f"got {vocab_size}"
        )
    if max_sentences < 1 or num_threads < 1:
        raise ValueError(
            f"max_sentences and num_threads must be >= 1, got {max_sentences}, {num_threads}"
        )
    model_path = Path(f"{model_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    sentences = list(_lines(documents))
    if not sentences:
        raise ValueError("train_tokenizer: the input has no non-blank text")
    if len(sentences) > max_sentences:
        # Sample here, in input order: SentencePiece's own sampling and shuffling differ from one
        # process to the next even with a fixed seed, which made tokenizers irreproducible.
        keep = sorted(random.Random(seed).sample(range(len(sentences)), max_sentences))
        sentences = [sentences[i] for i in keep]

    model = io.BytesIO()  # in memory: a file prefix would be recorded in the model
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=16384,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads,
        minloglevel=2,
    )
    tmp = model_path.with_name(f".{model_path.name}.tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, model_path)
    return model_path
