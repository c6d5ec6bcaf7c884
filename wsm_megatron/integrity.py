"""Verified checkpoints: a size and an xxHash (XXH3-64) of every file, and checking them.

A save writes ``iter_N/wsm_integrity.json`` last, after every file of the checkpoint is in place
and before the tracker moves: ``{"algorithm": "xxh3_64", "files": {name: {"size", "xxh3_64"}}}``.
Each rank hashes the shard files it wrote itself (``__<rank>_*.distcp``; rank 0 also the
common files), so no rank reads the whole checkpoint. A checkpoint without the record
(Megatron-LM's own) is checked against DCP's ``.metadata``: every file it names exists and holds
every byte range it records.

:func:`record_integrity` and :func:`verify_checkpoint` are the collective forms (every rank its
share). The problems are one line each, naming the file: ``iter_0000020/__1_0.distcp: checksum
mismatch`` and so on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
import xxhash

from wsm_megatron.atomic import atomic_write_text
from wsm_megatron.runtime.distributed import decided_on_rank0, first_on_any_rank

INTEGRITY_FILENAME = "wsm_integrity.json"
ALGORITHM = "xxh3_64"
_BLOCK = 8 * 2**20


def digest_file(path: Path) -> dict[str, int | str]:
    """``{"size": bytes, "xxh3_64": hex}`` of ``path``, read in 8 MiB blocks."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_BLOCK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            h.update(view[:n])
            size += n
    return {"size": size, ALGORITHM: h.hexdigest()}


def own_files(ckpt_dir: Path, rank: int) -> list[str]:
    """The files of ``ckpt_dir`` that ``rank`` hashes: the shard files it wrote, and on rank 0
    every other file at the top (``.metadata``, ``common.pt``, ``metadata.json``, ...)."""
    mine = []
    for entry in sorted(os.scandir(ckpt_dir), key=lambda e: e.name):
        if not entry.is_file() or entry.name == INTEGRITY_FILENAME:
            continue
        if entry.name.endswith(".distcp"):
            if entry.name.startswith(f"__{rank}_"):
                mine.append(entry.name)
        elif rank == 0:
            mine.append(entry.name)
    return mine


def write_record(ckpt_dir: Path, files: dict[str, dict]) -> None:
    """Write the record atomically (temporary file, fsync, rename, fsync of the folder)."""
    data = {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}
    atomic_write_text(ckpt_dir / INTEGRITY_FILENAME, json.dumps(data, indent=1))


def read_record(ckpt_dir: Path) -> dict[str, dict] | None:
    """The recorded files, or None when the checkpoint has no record (Megatron-LM's)."""
    path = ckpt_dir / INTEGRITY_FILENAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return dict(data["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{_name(path)}: unreadable integrity record ({err})") from None


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def expected_sizes(ckpt_dir: Path) -> dict[str, int]:
    """Without a record: each file DCP's ``.metadata`` names, and the bytes it must hold."""
    from wsm_megatron.merge.dcp_format import read_metadata

    metadata = read_metadata(ckpt_dir)
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    return need


def check_files(ckpt_dir: Path, names: Sequence[str], record: dict[str, dict] | None) -> str | None:
    """The first problem among ``names`` of ``ckpt_dir``, or None: a missing file, a size
    other than the record's (or short of ``.metadata``'s ranges), a checksum mismatch."""
    sizes = expected_sizes(ckpt_dir) if record is None else None
    for name in names:
        path = ckpt_dir / name
        if not path.is_file():
            return f"{_name(path)}: missing"
        size = path.stat().st_size
        if record is None:
            if size < sizes[name]:
                return f"{_name(path)}: truncated ({size} bytes, .metadata needs {sizes[name]})"
            continue
        want = record[name]
        if size != want["size"]:
            return f"{_name(path)}: {size} bytes, the save wrote {want['size']}"
        if digest_file(path)[ALGORITHM] != want[ALGORITHM]:
            return f"{_name(path)}: checksum mismatch (the file changed after it was saved)"
    return None


def files_to_check(ckpt_dir: Path) -> tuple[list[str], dict[str, dict] | None]:
    """The names a verification covers, and the record (None: sizes from ``.metadata``)."""
    record = read_record(ckpt_dir)
    if record is not None:
        return sorted(record), record
    return sorted(expected_sizes(ckpt_dir)), None


def record_integrity(ckpt_dir: Path) -> None:
    """Every rank hashes the files it wrote; rank 0 writes the record (a collective)."""
    rank = dist.get_rank()
    mine = {name: digest_file(ckpt_dir / name) for name in own_files(ckpt_dir, rank)}
    found: list[dict] | None = [{}] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, found, dst=0)
    if rank == 0:
        files: dict[str, dict] = {}
        for part in found:
            files.update(part)
        write_record(ckpt_dir, files)


def verify_checkpoint(ckpt_dir: Path) -> str | None:
    """The first problem of ``ckpt_dir`` (one line naming the file), or None; every rank
    checks a share of its files (a collective, the same answer on every rank)."""

    def plan() -> tuple[list[str], dict | None] | str:
        try:
            return files_to_check(ckpt_dir)
        except ValueError as err:
            return str(err)

    planned = decided_on_rank0(plan)
    if isinstance(planned, str):
        return planned
    names, record = planned
    rank, world = dist.get_rank(), dist.get_world_size()
    return first_on_any_rank(check_files(ckpt_dir, names[rank::world], record))
