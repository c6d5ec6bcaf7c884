"""``export_checkpoint``: check everything that can be checked before reading a weight, then
stream the checkpoint, a few layers at a time, into a transformers model folder."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from wsm_megatron.export.config import ExportConfig, ExportError
from wsm_megatron.export.hf import HFMapping, Unit
from wsm_megatron.export.reader import CheckpointReader
from wsm_megatron.export.tokenizer import (
    check_same_encoding,
    hf_tokenizer,
    special_ids,
    write_tokenizer,
)
from wsm_megatron.export.writer import AtomicFolder, SafetensorsWriter, refuse_existing, write_json
from wsm_megatron.training.config import WSMConfig

PROVENANCE_FILENAME = "wsm_export.json"


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote, from what."""

    output: Path
    architecture: str
    iteration: int
    parameters: int
    shards: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float


def _unit_bytes(reader: CheckpointReader, unit: Unit) -> int:
    return sum(reader.nbytes(b) for b in unit.boxes.values())


def _batches(reader: CheckpointReader, units: list[Unit], budget: int) -> Iterator[list[Unit]]:
    """Consecutive units, as many as fit in ``budget`` bytes (at least one)."""
    batch, size = [], 0
    for unit in units:
        n = _unit_bytes(reader, unit)
        if batch and size + n > budget:
            yield batch
            batch, size = [], 0
        batch.append(unit)
        size += n
    if batch:
        yield batch


def _target_dtype(
    export: ExportConfig, reader: CheckpointReader, mapping: HFMapping
) -> torch.dtype:
    dtype = reader.dtype(mapping.key("embedding")) if export.dtype == "auto" else getattr(
        torch, export.dtype
    )  # fmt: skip
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ExportError(f"checkpoint weights are {dtype}: export them with --dtype bfloat16")
    return dtype


def _check_memory(export: ExportConfig, reader: CheckpointReader, units: list[Unit]) -> None:
    """The largest unit (read, then converted) must fit in half the memory budget."""
    unit = max(units, key=lambda u: _unit_bytes(reader, u))
    need = 2 * _unit_bytes(reader, unit)
    if need > export.memory_bytes // 2:
        key = next(iter(unit.boxes.values())).key
        raise ExportError(
            f"--memory-gb {export.memory_gb:g}: too small for {key} ({need / 2**30:.2f} GiB "
            f"read and converted at once); give --memory-gb {2 * need / 2**30:.1f} or more"
        )


def _stream(
    reader: CheckpointReader,
    units: list[Unit],
    writer: SafetensorsWriter,
    dtype: torch.dtype,
    export: ExportConfig,
    progress: bool,
) -> int:
    """Read, convert and write every unit; the parameter count."""
    from tqdm import tqdm

    total = sum(_unit_bytes(reader, u) for u in units)
    params = 0
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="wsm-export", disable=not progress
    ) as bar:
        for batch in _batches(reader, units, export.read_bytes):
            tensors = iter(reader.read([b for u in batch for b in u.boxes.values()]))
            for unit in batch:
                for name, t in unit.convert({n: next(tensors) for n in unit.boxes}):
                    out = torch.empty(t.shape, dtype=dtype)
                    out.copy_(t)
                    writer.add(name, out)
                    params += t.numel()
                bar.update(_unit_bytes(reader, unit))
    return params


def _provenance(
    reader: CheckpointReader, config: WSMConfig, mapping: HFMapping, dtype: torch.dtype
) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("wsm-megatron")
    except PackageNotFoundError:
        ours = None
    common, tok = reader.common_state(), config.data.tokenizer
    return {
        "source_checkpoint": str(reader.ckpt_dir.resolve()),
        "iteration": reader.iteration,
        "architecture": mapping.architecture,
        "dtype": str(dtype).removeprefix("torch."),
        "wsm_merge": common.get("wsm_merge"),
        "model": asdict(config.model),
        "tokenizer": {k: getattr(tok, k) for k in ("type", "model", "vocab_file", "merge_file")},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wsm_megatron_version": ours,
    }


def export_checkpoint(
    config: WSMConfig, export: ExportConfig, *, progress: bool = True
) -> ExportResult:
    """Export ``export.checkpoint`` of the run ``config`` to ``export.output`` (HF format).

    Refused with one :class:`ExportError` line, before anything is written: an existing output,
    a missing checkpoint, a model with no transformers equivalent, a config whose shapes are not
    the checkpoint's, a tokenizer that does not convert exactly, a damaged checkpoint.
    """
    from wsm_megatron.data import build_tokenizer
    from wsm_megatron.training.config import resolve_corpus

    start = time.monotonic()
    refuse_existing(export.output)
    reader = CheckpointReader(export.checkpoint)
    max_positions = config.model.max_position_embeddings or config.seq_length
    mapping = HFMapping(config.model, reader, max_positions)
    mapping.check_shapes()
    config = resolve_corpus(config, progress=False)
    ours = build_tokenizer(config.data)
    theirs, unk = hf_tokenizer(config.data.tokenizer)
    check_same_encoding(ours, theirs, config.data.tokenizer)
    mapping.check_vocab(ours.vocab_size)
    dtype = _target_dtype(export, reader, mapping)
    units = list(mapping.units())
    _check_memory(export, reader, units)
    if export.verify and (problem := reader.verify()) is not None:
        raise ExportError(f"checkpoint {reader.ckpt_dir} is damaged: {problem}")
    folder = AtomicFolder(export.output)
    with folder as tmp:
        writer = SafetensorsWriter(tmp, export.shard_bytes)
        params = _stream(reader, units, writer, dtype, export, progress)
        shards = writer.finish(params)
        bos, eos = special_ids(ours)
        write_json(tmp / "config.json", mapping.config(dtype=dtype, bos=bos, eos=eos))
        write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
        write_tokenizer(tmp, theirs, unk, bos, eos, max_positions)
        write_json(tmp / PROVENANCE_FILENAME, _provenance(reader, config, mapping, dtype))
        written = sum(p.stat().st_size for p in tmp.iterdir())
        folder.publish()
    return ExportResult(
        export.output, mapping.architecture, reader.iteration, params, shards,
        reader.bytes_read, written, time.monotonic() - start,
    )  # fmt: skip


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """An export's ``wsm_export.json``."""
    return json.loads((Path(folder) / PROVENANCE_FILENAME).read_text())
