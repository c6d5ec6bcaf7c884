"""What an export is asked to do (:class:`ExportConfig`) and how it refuses
(:class:`ExportError`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MEMORY_GB = 16.0
DEFAULT_SHARD_BYTES = 5 * 2**30
DTYPES = ("auto", "float32", "bfloat16", "float16")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGT]?)I?B?\s*$", re.IGNORECASE)


class ExportError(ValueError):
    """An export refused on its input: one line, naming what does not map or what is wrong."""


def parse_size(text: str) -> int:
    """Bytes of ``5GB``, ``200MB``, ``64KB`` or a plain number (powers of 1024)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ExportError(f"not a size: {text!r} (say 5GB, 500MB or 64KB)")
    scale = 1024 ** " KMGT".index((match.group(2) or " ").upper())
    return int(float(match.group(1)) * scale)


@dataclass(frozen=True)
class ExportConfig:
    """One export: ``checkpoint`` (a root with a tracker or an ``iter_*`` folder) to a
    transformers model folder ``output`` (which must not exist yet).

    The process holds at most about ``memory_gb`` of tensors: a quarter of it for what is read
    at once, up to half for the safetensors shard being filled (shards are at most
    ``max_shard_bytes``). ``dtype`` ``auto`` keeps the checkpoint's (its embedding's) dtype.
    """

    checkpoint: Path
    output: Path
    target: Literal["hf"] = "hf"
    memory_gb: float = DEFAULT_MEMORY_GB
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    verify: bool = True

    def __post_init__(self) -> None:
        if self.target != "hf":
            raise ExportError(f"--to: unknown target {self.target!r} (known: hf)")
        if not self.memory_gb > 0:
            raise ExportError(f"--memory-gb: must be > 0, got {self.memory_gb}")
        if self.max_shard_bytes <= 0:
            raise ExportError(f"--max-shard-size: must be > 0, got {self.max_shard_bytes}")
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype: one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 2**30)

    @property
    def read_bytes(self) -> int:
        """How much is read from the checkpoint in one go."""
        return self.memory_bytes // 4

    @property
    def shard_bytes(self) -> int:
        """The largest safetensors shard held before it is written."""
        return min(self.max_shard_bytes, self.memory_bytes // 2)
