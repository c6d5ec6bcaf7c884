"""The data section of a run: blends, validation data, the annealing mix and T_switch."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

Blend = tuple[list[str], list[float] | None]
"""Megatron-Core's blend: (prefixes, weights or None)."""

_SPLIT_RE = re.compile(r"^\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*$")


def _is_number(value: str | float | int) -> bool:
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def parse_blend(field: str, entries: list[str | float] | str) -> Blend:
    """Parse a Megatron-style blend (``["prefix", ...]`` or ``["0.7", "A", "0.3", "B"]``).

    A list with no number in it is a list of prefixes (weighted by their sizes, as in Megatron);
    otherwise it alternates weight, prefix. ``field`` names the config field in error messages.
    """
    if isinstance(entries, str):
        entries = [entries]
    if not entries:
        raise ValueError(f"data.{field}: the blend is empty")
    if not any(_is_number(e) for e in entries):
        prefixes = [str(e).strip() for e in entries]
        if any(not p for p in prefixes):
            raise ValueError(f"data.{field}: empty dataset prefix in {entries!r}")
        return prefixes, None
    if len(entries) % 2:
        raise ValueError(
            f"data.{field}: a weighted blend alternates weight, prefix; got an odd number "
            f"of entries ({len(entries)}): {entries!r}"
        )
    prefixes: list[str] = []
    weights: list[float] = []
    for i in range(0, len(entries), 2):
        raw_weight, prefix = entries[i], entries[i + 1]
        if not _is_number(raw_weight):
            raise ValueError(
                f"data.{field}: entry {i} should be a weight (a number), got {raw_weight!r}"
            )
        weight = float(raw_weight)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(
                f"data.{field}: weight {raw_weight!r} at entry {i} must be > 0 and finite"
            )
        if _is_number(prefix) or not str(prefix).strip():
            raise ValueError(
                f"data.{field}: entry {i + 1} should be a dataset prefix, got {prefix!r}"
            )
        weights.append(weight)
        prefixes.append(str(prefix).strip())
    return prefixes, weights


TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer")
"""The tokenizer types wsm-megatron builds (Megatron-LM's ``--tokenizer-type`` names)."""


def _config_key(name: str) -> str:
    return f"data.{name}"


@dataclass(frozen=True)
class TokenizerArgs:
    """A tokenizer as Megatron-LM names it: ``--tokenizer-type``, ``--tokenizer-model``,
    ``--vocab-file``, ``--merge-file``; build one with :func:`tokenizer_args` (validated)."""

    type: str
    model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    key: Callable[[str], str] = _config_key
    """How error messages name a field (``tokenizer_model`` -> ``data.tokenizer_model``)."""

    def check_files(self) -> None:
        """Raise ValueError naming the key and path of a missing tokenizer file."""
        files = {"tokenizer_model": self.model, "vocab_file": self.vocab_file}
        files["merge_file"] = self.merge_file
        for name, path in files.items():
            if path is None:
                continue
            if self.type == "HuggingFaceTokenizer" and os.path.isdir(path):
                if not os.path.isfile(os.path.join(path, "tokenizer.json")):
                    raise ValueError(f"{self.key(name)}: directory {path!r} has no tokenizer.json")
            elif not os.path.isfile(path):
                raise ValueError(f"{self.key(name)}: no such file {path!r}")


def tokenizer_args(
    tokenizer_type: str | None,
    tokenizer_model: str | None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    key: Callable[[str], str] = _config_key,
) -> TokenizerArgs | None:
    """Check which files a tokenizer type needs; None when nothing is set (a corpus's, later).

    Without ``tokenizer_type``: ``GPT2BPETokenizer`` when only ``vocab_file`` is set,
    ``HuggingFaceTokenizer`` when ``tokenizer_model`` is a ``.json`` file or a directory, else
    ``SentencePieceTokenizer``. Files are not opened here (:meth:`TokenizerArgs.check_files`).
    """
    if tokenizer_type is None:
        if tokenizer_model is None and vocab_file is None and merge_file is None:
            return None
        if tokenizer_model is None and vocab_file is not None:
            tokenizer_type = "GPT2BPETokenizer"
        elif tokenizer_model is not None and (
            str(tokenizer_model).endswith(".json") or os.path.isdir(tokenizer_model)
        ):
            tokenizer_type = "HuggingFaceTokenizer"
        else:
            tokenizer_type = "SentencePieceTokenizer"
    elif tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"{key('tokenizer_type')}: unknown tokenizer type {tokenizer_type!r} "
            f"(valid: {', '.join(TOKENIZER_TYPES)})"
        )
    given = {"tokenizer_model": tokenizer_model, "vocab_file": vocab_file}
    given["merge_file"] = merge_file
    needed = ("vocab_file", "merge_file") if tokenizer_type == "GPT2BPETokenizer" else None
    needed = needed or ("tokenizer_model",)
    for name, value in given.items():
        if name in needed and value is None:
            raise ValueError(f"{key(name)}: required by tokenizer type {tokenizer_type}")
        if name not in needed and value is not None:
            raise ValueError(
                f"{key(name)}: not used by tokenizer type {tokenizer_type} (it takes "
                f"{' and '.join(key(n) for n in needed)})"
            )
    return TokenizerArgs(
        tokenizer_type,
        None if tokenizer_model is None else str(tokenizer_model),
        None if vocab_file is None else str(vocab_file),
        None if merge_file is None else str(merge_file),
        key,
    )


def parse_split(split: str) -> list[float]:
    """Parse a Megatron split string ``"969,30,1"`` into normalised train/valid/test fractions."""
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(
            f"data.split: expected up to three comma-separated non-negative numbers "
            f"such as '969,30,1', got {split!r}"
        )
    parts = [float(p) for p in split.split(",")]
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    if parts[0] <= 0 or total <= 0:
        raise ValueError(f"data.split: the train part must be > 0, got {split!r}")
    return [p / total for p in parts]


@dataclass
class DataConfig:
    """Where the training, validation and annealing data come from.

    ``train_data``/``valid_data``/``anneal_data`` are Megatron blends of indexed-dataset prefixes
    (``PREFIX.bin`` + ``PREFIX.idx``). Without ``valid_data`` the validation set is the ``split``
    share of ``train_data`` (Megatron's ``--split``). With ``anneal_data``, exactly one of
    ``anneal_start_iteration``/``anneal_start_tokens`` (T_switch) says where training switches to
    the annealing blend: ``anneal_start_iteration=k`` trains iterations ``0..k-1`` on
    ``train_data`` and every later one on ``anneal_data``. The tokenizer is Megatron-LM's
    ``tokenizer_type`` with ``tokenizer_model`` (SentencePiece ``.model``; Hugging Face
    ``tokenizer.json`` or its directory) or ``vocab_file`` + ``merge_file`` (GPT-2 BPE).
    ``num_workers`` (Megatron-LM's ``--num-workers``) DataLoader processes read training batches
    ahead; unset: 2 on GPU, 0 on CPU (there the workers would take cores from the training ranks).
    """

    train_data: list[str | float] | str
    seq_length: int
    seed: int = 1234
    valid_data: list[str | float] | str | None = None
    split: str = "969,30,1"
    anneal_data: list[str | float] | str | None = None
    anneal_start_iteration: int | None = None
    anneal_start_tokens: int | None = None
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    mmap_bin_files: bool = True
    cache_dir: str | None = None
    num_workers: int | None = None

    def __post_init__(self) -> None:
        parse_blend("train_data", self.train_data)
        if self.valid_data is not None:
            parse_blend("valid_data", self.valid_data)
        if self.anneal_data is not None:
            parse_blend("anneal_data", self.anneal_data)
        parse_split(self.split)
        tokenizer_args(self.tokenizer_type, self.tokenizer_model, self.vocab_file, self.merge_file)
        if not isinstance(self.seq_length, int) or self.seq_length < 1:
            raise ValueError(f"data.seq_length: must be an integer >= 1, got {self.seq_length!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed: must be an integer in [0, 2**32), got {self.seed!r}")
        if self.num_workers is not None and (
            not isinstance(self.num_workers, int) or self.num_workers < 0
        ):
            raise ValueError(f"data.num_workers: must be an integer >= 0, got {self.num_workers!r}")
        starts = {
            "anneal_start_iteration": self.anneal_start_iteration,
            "anneal_start_tokens": self.anneal_start_tokens,
        }
        given = {name: value for name, value in starts.items() if value is not None}
        if len(given) == 2:
            raise ValueError(
                "data: set at most one of anneal_start_iteration and anneal_start_tokens "
                f"(got {self.anneal_start_iteration} and {self.anneal_start_tokens})"
            )
        for name, value in given.items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"data.{name}: must be an integer >= 0, got {value!r}")
        if self.anneal_data is not None and not given:
            raise ValueError(
                "data.anneal_data: set anneal_start_iteration or anneal_start_tokens "
                "(T_switch) to say when the annealing blend starts"
            )
        if self.anneal_data is None and given:
            name = next(iter(given))
            raise ValueError(f"data.{name}: set anneal_data too (the annealing blend)")

    @property
    def train_blend(self) -> Blend:
        """``train_data`` as Megatron-Core's (prefixes, weights)."""
        return parse_blend("train_data", self.train_data)

    @property
    def valid_blend(self) -> Blend | None:
        """``valid_data`` as Megatron-Core's (prefixes, weights), or None."""
        return None if self.valid_data is None else parse_blend("valid_data", self.valid_data)

    @property
    def anneal_blend(self) -> Blend | None:
        """``anneal_data`` as Megatron-Core's (prefixes, weights), or None."""
        return None if self.anneal_data is None else parse_blend("anneal_data", self.anneal_data)

    @property
    def tokenizer(self) -> TokenizerArgs | None:
        """The tokenizer's type and files (validated; files not opened), or None if unset."""
        return tokenizer_args(
            self.tokenizer_type, self.tokenizer_model, self.vocab_file, self.merge_file
        )

    @property
    def split_fractions(self) -> list[float]:
        """``split`` as normalised train/valid/test fractions."""
        return parse_split(self.split)

    def anneal_start_sample(self, global_batch_size: int) -> int | None:
        """T_switch as a global sample index, rounded up to a whole global batch; None if unset.

        ``anneal_start_tokens`` counts ``seq_length`` tokens per sample.
        """
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if self.anneal_start_iteration is not None:
            return self.anneal_start_iteration * global_batch_size
        if self.anneal_start_tokens is not None:
            tokens_per_batch = global_batch_size * self.seq_length
            return -(-self.anneal_start_tokens // tokens_per_batch) * global_batch_size
        return None

    def check_paths(self) -> None:
        """Raise ValueError naming the field and path of any missing ``.bin``/``.idx`` file."""
        blends = {"train_data": self.train_blend, "valid_data": self.valid_blend}
        blends["anneal_data"] = self.anneal_blend
        for field, blend in blends.items():
            if blend is None:
                continue
            for prefix in blend[0]:
                for suffix in (".bin", ".idx"):
                    if not os.path.isfile(prefix + suffix):
                        raise ValueError(
                            f"data.{field}: dataset prefix {prefix!r} has no "
                            f"{prefix + suffix} (expected PREFIX.bin and PREFIX.idx)"
                        )
        if self.tokenizer is not None:
            self.tokenizer.check_files()
