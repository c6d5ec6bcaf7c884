"""Fast writers of real ``torch_dist`` checkpoints at the scale of large runs, for tests.

DCP stores each tensor chunk as a complete ``torch.save`` blob in a ``.distcp`` file and indexes
them in a pickled :class:`~torch.distributed.checkpoint.metadata.Metadata`; these writers
produce exactly that, with Megatron-LM's ``metadata.json`` and ``common.pt``, but without DCP's
planning (which takes minutes for thousands of files):

- :func:`write_many_files_checkpoint`: every chunk in a file of its own (``__K_0.distcp``), as
  Megatron's fully parallel save spreads a model over thousands of files; loadable by DCP.
- :func:`write_metadata_only_checkpoints`: a ``.metadata`` of hundreds of thousands of chunks
  (model and optimizer) over sparse shard files of the right length, for planning tests that
  never read the tensor bytes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from wsm_megatron.layout import iteration_dir, write_tracker
from wsm_megatron.testing.checkpoints import TORCH_DIST_CONFIG, megatron_args


def _finish(ckpt_dir: Path, root: Path, iteration: int, metadata: bytes) -> Path:
    (ckpt_dir / ".metadata").write_bytes(metadata)
    torch.save(
        {"args": megatron_args(), "checkpoint_version": 3.0, "iteration": iteration},
        ckpt_dir / "common.pt",
    )
    (ckpt_dir / "metadata.json").write_text(json.dumps(TORCH_DIST_CONFIG))
    write_tracker(root, iteration)
    return ckpt_dir


def _tensor_md(dtype: torch.dtype, size: tuple[int, ...], chunks: list[ChunkStorageMetadata]):
    return TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(size), chunks)


def write_many_files_checkpoint(
    root: Path, iteration: int, tensors: dict[str, torch.Tensor], files: int
) -> Path:
    """Save each tensor (2-D) cut into ``files`` row blocks, block ``k`` of every tensor in
    ``__K_0.distcp``."""
    ckpt_dir = iteration_dir(root, iteration)
    ckpt_dir.mkdir(parents=True)
    state: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    blocks = {key: torch.tensor_split(t, files) for key, t in tensors.items()}
    for key, t in tensors.items():
        starts = [0]
        for b in blocks[key][:-1]:
            starts.append(starts[-1] + b.shape[0])
        chunks = [
            ChunkStorageMetadata(torch.Size([s, 0]), b.shape)
            for s, b in zip(starts, blocks[key], strict=True)
        ]
        state[key] = _tensor_md(t.dtype, tuple(t.shape), chunks)
    for k in range(files):
        name = f"__{k}_0.distcp"
        with open(ckpt_dir / name, "wb") as f:
            for key in tensors:
                chunk = state[key].chunks[k]
                blob = io.BytesIO()
                torch.save(blocks[key][k].clone(), blob)
                storage[MetadataIndex(key, chunk.offsets)] = _StorageInfo(
                    name, f.tell(), blob.tell()
                )
                f.write(blob.getbuffer())
    return _finish(ckpt_dir, root, iteration, pickle.dumps(Metadata(state, storage_data=storage)))


def write_metadata_only_checkpoints(
    root: Path,
    iterations: Sequence[int],
    *,
    model_chunks: int,
    optimizer_chunks: int,
    files: int,
    chunk_shape: tuple[int, int] = (4, 256),
) -> None:
    """Checkpoints at ``iterations`` of one layout: ``model_chunks`` bf16 model chunks and
    ``optimizer_chunks`` fp32 optimizer chunks (``optimizer.state.exp_avg.*``) over 64 keys of
    each kind, interleaved over ``files`` sparse shard files (holes where the blobs would be:
    a plan can be made, nothing can be merged)."""
    state: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    names = [f"__{f}_0.distcp" for f in range(files)]
    ends = [0] * files
    rows, cols = chunk_shape
    n = 0
    for prefix, dtype, count in (
        ("decoder.layers.{}.weight", torch.bfloat16, model_chunks),
        ("optimizer.state.exp_avg.decoder.layers.{}.weight", torch.float32, optimizer_chunks),
    ):
        per_key = -(-count // 64)
        for k in range(64):
            total = min(per_key, count - k * per_key)
            if total <= 0:
                break
            key = prefix.format(k)
            chunks = [
                ChunkStorageMetadata(torch.Size([c * rows, 0]), torch.Size([rows, cols]))
                for c in range(total)
            ]
            state[key] = _tensor_md(dtype, (total * rows, cols), chunks)
            length = rows * cols * dtype.itemsize + 1024  # the blob's zip framing
            for chunk in chunks:
                f = n % files
                storage[MetadataIndex(key, chunk.offsets)] = _StorageInfo(names[f], ends[f], length)
                ends[f] += length
                n += 1
    metadata = pickle.dumps(Metadata(state, storage_data=storage))
    del state, storage
    for iteration in iterations:
        ckpt_dir = iteration_dir(root, iteration)
        ckpt_dir.mkdir(parents=True)
        for name, end in zip(names, ends, strict=True):
            with open(ckpt_dir / name, "wb") as out:
                os.truncate(out.fileno(), end)
        _finish(ckpt_dir, root, iteration, metadata)
