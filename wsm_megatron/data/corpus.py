"""The embedded default corpus: the Python standard library's own source files.

Every Python install carries a few MB of varied, real text: the ``.py`` files of its standard
library (``sysconfig.get_paths()["stdlib"]``). :func:`default_corpus` turns them into a tokenizer
and train/validation datasets with no download, deterministically, and caches the result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

from wsm_megatron.data.preprocess import write_indexed_dataset
from wsm_megatron.data.tokenizer import build_tokenizer, train_tokenizer

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
"""Directory names left out of the corpus: installed packages and the test suites."""

VALID_EVERY = 50
"""One file in this many (at least one) is held out for validation."""

_FORMAT = 2  # bump when the build below changes what lands in the cache


class CorpusFiles(NamedTuple):
    """A tokenizer and the train/validation indexed datasets built from one corpus."""

    tokenizer_model: str
    train_prefix: str
    valid_prefix: str


def stdlib_root() -> Path:
    """This interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The ``.py`` files of this interpreter's standard library, sorted by relative path, leaving
    out :data:`EXCLUDED_DIRS` and ``__pycache__``; with ``max_files``, that many spread evenly
    over the sorted list."""
    if max_files is not None and max_files < 2:
        raise ValueError(
            f"max_files must be >= 2 (one train and one validation file), got {max_files}"
        )
    root = stdlib_root()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and d != "__pycache__"]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / name).as_posix() for name in filenames if name.endswith(".py")]
    found.sort()
    if max_files is not None and max_files < len(found):
        found = [found[i * len(found) // max_files] for i in range(max_files)]
    return [root / rel for rel in found]


def split_train_valid(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Hold out one file in :data:`VALID_EVERY` (at least one; the middle file of each block of
    the list) for validation; returns (train, valid), each in the input order."""
    if len(files) < 2:
        raise ValueError(f"need at least 2 files to hold out a validation file, got {len(files)}")
    n_valid = max(1, len(files) // VALID_EVERY)
    held_out = {(2 * k + 1) * len(files) // (2 * n_valid) for k in range(n_valid)}
    train = [f for i, f in enumerate(files) if i not in held_out]
    valid = [f for i, f in enumerate(files) if i in held_out]
    return train, valid


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _cache_key(files: list[Path], vocab_size: int, max_files: int | None) -> str:
    root = stdlib_root()
    listing = [(f.relative_to(root).as_posix(), f.stat().st_size) for f in files]
    settings = {"format": _FORMAT, "vocab_size": vocab_size, "max_files": max_files}
    digest = hashlib.sha256(json.dumps([settings, listing]).encode()).hexdigest()[:12]
    version = (
        f"{platform.python_implementation().lower()}{'.'.join(map(str, sys.version_info[:3]))}"
    )
    return f"stdlib-{version}-{digest}"


def default_corpus(
    cache_dir: str | os.PathLike[str],
    *,
    vocab_size: int = 8192,
    max_files: int | None = None,
    progress: bool = True,
) -> CorpusFiles:
    """Build (once) and return the default corpus under ``cache_dir``.

    A SentencePiece BPE tokenizer trained on the training files only, and ``train``/``valid``
    indexed datasets (one document per file, EOD appended), validation files held out by
    :func:`split_train_valid`. Cached under ``cache_dir/stdlib-<python version>-<hash of the file
    list and settings>/``; a second call returns at once. Safe to call from several processes at
    once (a file lock serialises the build; the others then find it cached). Single-threaded and
    deterministic: the same interpreter and settings give byte-identical files.
    """
    files = stdlib_files(max_files)
    train_files, valid_files = split_train_valid(files)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / _cache_key(files, vocab_size, max_files)
    result = CorpusFiles(str(final / "tokenizer.model"), str(final / "train"), str(final / "valid"))
    if final.is_dir():
        return result
    with open(cache / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return result
        work = cache / f".{final.name}.tmp{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            start = time.perf_counter()
            if progress:  # SentencePiece reports nothing while it trains (20-30 s on 2 cores)
                print(
                    f"corpus: training a {vocab_size}-piece SentencePiece tokenizer on "
                    f"{len(train_files)} files (once; cached in {cache})...",
                    file=sys.stderr,
                    flush=True,
                )
            model = train_tokenizer(
                map(_read, train_files),
                work / "tokenizer",
                vocab_size,
            )
            tokenizer = build_tokenizer(model)
            trained = time.perf_counter()
            if progress:
                print(f"corpus: tokenizer trained in {trained - start:.1f} s", file=sys.stderr)
            for name, group in (("train", train_files), ("valid", valid_files)):
                write_indexed_dataset(
                    [_read(f) for f in group], tokenizer, work / name, progress=progress
                )
            root = stdlib_root()
            manifest = {
                "source": str(root),
                "python": sys.version,
                "vocab_size": tokenizer.vocab_size,
                "max_files": max_files,
                "train_files": [f.relative_to(root).as_posix() for f in train_files],
                "valid_files": [f.relative_to(root).as_posix() for f in valid_files],
                "tokenizer_seconds": round(trained - start, 2),
                "preprocess_seconds": round(time.perf_counter() - trained, 2),
            }
            (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            # the model was trained under the temporary directory: nothing in it records that path
            os.rename(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return result
