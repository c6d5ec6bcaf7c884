"""``corpus``: the embedded corpus in place of ``data.*_data``, built and cached on demand."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from wsm_megatron.training.config.errors import _positive

if TYPE_CHECKING:
    from wsm_megatron.training.config.run import WSMConfig

CORPUS_PENDING = "<built from the corpus section>"
"""What ``data.train_data``/``valid_data`` hold until :func:`resolve_corpus` builds the corpus."""


@dataclass
class CorpusConfig:
    """The embedded corpus (Python's standard library source) in place of ``data.*_data``.

    With ``name: stdlib`` the run builds (once; cached under ``cache_dir``) a SentencePiece
    tokenizer and train/validation datasets from this interpreter's standard library, so a first
    run needs no data at all.
    """

    name: Literal["stdlib"] | None = None
    vocab_size: int = 8192
    max_files: int | None = None
    cache_dir: str | None = None
    """Default: ``$XDG_CACHE_HOME/wsm-megatron`` (``~/.cache/wsm-megatron``)."""

    def __post_init__(self) -> None:
        _positive("corpus", vocab_size=self.vocab_size, max_files=self.max_files)


def default_cache_dir() -> Path:
    """Where built corpora are cached: ``$XDG_CACHE_HOME/wsm-megatron``, else
    ``~/.cache/wsm-megatron``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wsm-megatron"


def resolve_corpus(config: WSMConfig, *, progress: bool = True) -> WSMConfig:
    """``config`` with ``data.*`` pointing at the built corpus (building it once, cached).

    Safe to call on every rank at once (the corpus build is locked); a no-op without a corpus.
    """
    if config.corpus.name is None:
        return config
    from wsm_megatron.data.corpus import default_corpus

    c = config.corpus
    files = default_corpus(
        Path(c.cache_dir).expanduser() if c.cache_dir else default_cache_dir(),
        vocab_size=c.vocab_size,
        max_files=c.max_files,
        progress=progress,
    )
    data = dataclasses.replace(
        config.data,
        train_data=files.train_prefix,
        valid_data=files.valid_prefix,
        tokenizer_model=files.tokenizer_model,
    )
    return dataclasses.replace(config, data=data)
