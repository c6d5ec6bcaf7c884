"""Tokenize text into Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from wsm_megatron.data.config import TokenizerArgs
from wsm_megatron.data.tokenizer import Tokenizer, build_tokenizer


def iter_documents(
    inputs: Sequence[str | os.PathLike[str]], json_key: str = "text"
) -> Iterator[str]:
    """The documents of ``inputs`` in order: a ``.jsonl`` file gives one per line (its
    ``json_key`` field), any other file is one document (UTF-8; invalid bytes become U+FFFD)."""
    for path in map(Path, inputs):
        if not path.is_file():
            raise ValueError(f"input file {str(path)!r} does not exist")
        if path.suffix != ".jsonl":
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                    raise ValueError(f"{path}:{lineno}: no string field {json_key!r}")
                yield record[json_key]


def token_dtype(vocab_size: int) -> type[np.number]:
    """The ``.bin`` token dtype Megatron picks for a vocabulary (uint16 below 65500, else int32)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _tokenize_in_worker(text: str) -> list[int]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.tokenize(text)


def write_indexed_dataset(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    output_prefix: str | os.PathLike[str],
    *,
    append_eod: bool = True,
    workers: int = 1,
    progress: bool = True,
) -> str:
    """Tokenize ``documents`` into ``OUTPUT_PREFIX.bin``/``.idx`` with megatron-core's builder.

    Each document is one sequence, followed by ``tokenizer.eod`` when ``append_eod`` (as
    Megatron-LM's ``preprocess_data.py --append-eod``); empty documents are skipped.
    ``workers > 1`` tokenizes in that many forked processes, results in order. Both files are
    written under temporary names and renamed at the end, ``.idx`` last. Returns the prefix.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    total = len(documents) if isinstance(documents, Sequence) else None
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = os.path.join(os.path.dirname(prefix), f".{os.path.basename(prefix)}.tmp{os.getpid()}")
    dtype = token_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    pool = None
    try:
        if workers == 1:
            token_lists: Iterable[list[int]] = map(tokenizer.tokenize, documents)
        else:
            import multiprocessing as mp

            # fork, as Megatron-LM's preprocess_data.py: workers inherit the loaded tokenizer
            # (a spawned worker would spend seconds importing megatron-core again).
            pool = mp.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(tokenizer,)
            )
            token_lists = pool.imap(_tokenize_in_worker, documents, chunksize=16)
        bar = tqdm(
            token_lists,
            total=total,
            unit="doc",
            desc=f"preprocess {os.path.basename(prefix)}",
            disable=not progress,
            dynamic_ncols=True,
        )
        n_tokens = 0
        for ids in bar:
            if not ids:
                continue
            if append_eod:
                ids = [*ids, tokenizer.eod]
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            n_tokens += len(ids)
            bar.set_postfix(tokens=n_tokens, refresh=False)
        if not builder.sequence_lengths:
            raise ValueError(f"no non-empty document to write to {prefix!r}")
        builder.finalize(f"{tmp}.idx")
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
    finally:
        if pool is not None:
            pool.terminate()
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    return prefix


def preprocess(
    inputs: Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer | TokenizerArgs,
    output_prefix: str | os.PathLike[str],
    *,
    json_key: str = "text",
    append_eod: bool = True,
    workers: int = 1,
    progress: bool = True,
) -> str:
    """Tokenize the documents of ``inputs`` (:func:`iter_documents`) into a Megatron indexed
    dataset at ``output_prefix`` (:func:`write_indexed_dataset`); returns the prefix.
    ``tokenizer`` is a loaded one or the arguments to build one (:func:`build_tokenizer`)."""
    if not inputs:
        raise ValueError("preprocess: no input files")
    for path in map(Path, inputs):
        if not path.is_file():
            raise ValueError(f"input file {str(path)!r} does not exist")
    if isinstance(tokenizer, TokenizerArgs):
        tokenizer = build_tokenizer(tokenizer)
    documents: Iterable[str] = iter_documents(inputs, json_key)
    if not any(Path(p).suffix == ".jsonl" for p in inputs):
        documents = list(documents)  # one per file: known count, for the progress bar
    return write_indexed_dataset(
        documents,
        tokenizer,
        output_prefix,
        append_eod=append_eod,
        workers=workers,
        progress=progress,
    )
