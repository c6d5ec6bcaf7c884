"""Reading a checkpoint's tensors and objects back whole, and comparing two checkpoints bit for
bit.

For small models (tests, the demo): every tensor is materialised at its global shape in this
process (DCP reads and reassembles the shards). Not for production-size checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def load_dcp_tensors(
    ckpt_dir: str | os.PathLike[str], keys: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Global tensors of a DCP checkpoint (all, or ``keys``), loaded by DCP in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt_dir))
    metadata = reader.read_metadata().state_dict_metadata
    wanted = keys if keys is not None else sorted(metadata)
    state = {
        key: torch.empty(tuple(metadata[key].size), dtype=metadata[key].properties.dtype)
        for key in wanted
        if isinstance(metadata[key], TensorStorageMetadata)
    }
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def bitwise_differences(
    a_dir: str | os.PathLike[str], b_dir: str | os.PathLike[str]
) -> tuple[int, list[str]]:
    """``(tensors compared, keys whose values or dtypes differ, or that only one holds)``."""
    a, b = load_dcp_tensors(a_dir), load_dcp_tensors(b_dir)
    differ = sorted(
        k
        for k in a.keys() | b.keys()
        if k not in a or k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])
    )
    return len(a.keys() | b.keys()), differ


def stored_objects(ckpt_dir: str | os.PathLike[str]) -> dict[str, bytes]:
    """Raw bytes of every stored object (a Megatron ``ShardedObject``) of a DCP checkpoint."""
    import pickle
    from pathlib import Path

    ckpt_dir = Path(ckpt_dir)
    metadata = pickle.loads((ckpt_dir / ".metadata").read_bytes())
    out = {}
    for index, info in metadata.storage_data.items():
        if index.offset is None:
            with open(ckpt_dir / info.relative_path, "rb") as f:
                f.seek(info.offset)
                out[index.fqn] = f.read(info.length)
    return out
