"""Tokenizers: SentencePiece (train one deterministically), Hugging Face ``tokenizer.json`` and
GPT-2 BPE, each as a megatron-core tokenizer (what GPTDataset and the trainer expect)."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from megatron.core.tokenizers import MegatronTokenizer, MegatronTokenizerBase
from megatron.core.tokenizers.text.libraries.abstract_tokenizer import (
    MegatronTokenizerTextAbstract,
)
from megatron.core.tokenizers.text.models import GPTTokenizer

from wsm_megatron.data.config import DataConfig, TokenizerArgs, tokenizer_args

Tokenizer = MegatronTokenizerBase
"""megatron-core's tokenizer: ``.vocab_size``, ``.eod``, ``.tokenize(text)``, ``.detokenize``."""

MODEL_TYPES = ("bpe", "unigram")
# Byte pieces (256) + <unk>, <s>, </s> + the newline symbol, before any learnt piece.
_RESERVED_PIECES = 256 + 3 + 1
GPT2_EOD = "<|endoftext|>"
# The end-of-text token of a tokenizer.json without a tokenizer_config.json beside it.
HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class _TokenizersLibrary(MegatronTokenizerTextAbstract):
    """A Hugging Face ``tokenizers.Tokenizer`` as a megatron-core text tokenizer library."""

    def __init__(self, tokenizer: Any, eod: int) -> None:
        self.tokenizer = tokenizer
        self._eod = eod

    def text_to_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def ids_to_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def text_to_tokens(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.tokenizer.token_to_id(t) for t in tokens]

    def ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.id_to_token(i) for i in ids]

    def tokens_to_text(self, tokens: list[str]) -> str:
        return self.ids_to_text(self.tokens_to_ids(tokens))

    def add_special_tokens(self, special_tokens: Any = None) -> None:
        raise NotImplementedError("wsm-megatron does not add tokens to a tokenizer")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos_id(self) -> int:
        return self._eod

    @property
    def pad_id(self) -> int:
        return -1  # none, as the SentencePiece models wsm-megatron trains

    @property
    def bos_id(self) -> None:
        return None

    @property
    def unk_id(self) -> None:
        return None


class TokenizersGPTTokenizer(GPTTokenizer):
    """megatron-core's GPT tokenizer over a ``tokenizers`` library object; ``kwargs`` (file
    paths) go into megatron-core's dataset cache hash, as its own tokenizers' do."""

    def __init__(self, path: str, config: dict, library: _TokenizersLibrary, **kwargs: Any):
        self._library = library
        super().__init__(path, config, **kwargs)

    def _restore_model(self, **kwargs: Any) -> _TokenizersLibrary:
        return self._library


def _hf_eos(tokenizer: Any, path: Path) -> str:
    """The eos token of a tokenizer.json: ``eos_token`` of a tokenizer_config.json beside it,
    else the first of :data:`HF_EOS_CANDIDATES` that is a special token."""
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return eos
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for candidate in HF_EOS_CANDIDATES:
        if candidate in specials:
            return candidate
    raise ValueError(
        f"HuggingFaceTokenizer {str(path)!r}: no eos token (an eos_token in "
        f"tokenizer_config.json, or one of the special tokens {', '.join(HF_EOS_CANDIDATES)})"
    )


def _hf_library(model: str) -> _TokenizersLibrary:
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(model)
    path = path / "tokenizer.json" if path.is_dir() else path
    try:
        tokenizer = HFTokenizer.from_file(str(path))
    except Exception as err:  # the Rust library raises a bare Exception on a bad file
        raise ValueError(
            f"HuggingFaceTokenizer {str(path)!r}: not a tokenizer.json ({err})"
        ) from None
    return _TokenizersLibrary(tokenizer, tokenizer.token_to_id(_hf_eos(tokenizer, path)))


def _gpt2_library(vocab_file: str, merge_file: str) -> _TokenizersLibrary:
    """GPT-2's byte-level BPE from ``vocab.json`` + ``merges.txt``, as Megatron-LM's
    GPT2BPETokenizer: no special tokens in text, EOD ``<|endoftext|>``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    try:
        bpe = models.BPE.from_file(vocab_file, merge_file)
    except Exception as err:
        raise ValueError(
            f"GPT2BPETokenizer: cannot read {vocab_file!r} + {merge_file!r} ({err})"
        ) from None
    tokenizer = HFTokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    eod = tokenizer.token_to_id(GPT2_EOD)
    if eod is None:
        raise ValueError(f"GPT2BPETokenizer: vocab file {vocab_file!r} has no {GPT2_EOD}")
    return _TokenizersLibrary(tokenizer, eod)


def build_tokenizer(
    source: str | os.PathLike[str] | TokenizerArgs | DataConfig | None,
) -> Tokenizer:
    """Load a tokenizer as megatron-core's GPT tokenizer (what GPTDataset expects).

    ``source`` is a data config, :class:`TokenizerArgs`, or a tokenizer model path (its type
    inferred: :func:`~wsm_megatron.data.config.tokenizer_args`). SentencePiece: megatron-core's
    own class; ``.eod`` is ``</s>``, ``.pad`` the model's pad id (-1: none, Megatron's default).
    Hugging Face ``tokenizer.json`` and GPT-2 BPE: the ``tokenizers`` library; ``.eod`` is the eos
    token (:func:`_hf_eos`) or ``<|endoftext|>``.
    """
    if isinstance(source, DataConfig):
        args = source.tokenizer
    elif isinstance(source, TokenizerArgs):
        args = source
    else:
        args = None if source is None else tokenizer_args(None, str(source))
    if args is None:
        raise ValueError("data.tokenizer_model: not set (no tokenizer)")
    args.check_files()
    if args.type == "SentencePieceTokenizer":
        metadata = {"library": "sentencepiece", "model_type": "gpt"}
        return MegatronTokenizer.from_pretrained(
            str(Path(args.model).resolve()), metadata_path=metadata
        )
    if args.type == "HuggingFaceTokenizer":
        path, kwargs = str(Path(args.model).resolve()), {}
        library = _hf_library(path)
    else:
        assert args.type == "GPT2BPETokenizer", args.type
        vocab, merges = (str(Path(f).resolve()) for f in (args.vocab_file, args.merge_file))
        path, kwargs = vocab, {"vocab_file": vocab, "merges_file": merges}
        library = _gpt2_library(vocab, merges)
    config = {"library": "tokenizers", "model_type": "gpt", "tokenizer_type": args.type}
    return TokenizersGPTTokenizer(path, config, library=library, **kwargs)


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
