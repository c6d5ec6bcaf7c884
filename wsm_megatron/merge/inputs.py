"""Input checkpoints: open one Megatron ``torch_dist`` iteration directory, check that it is
complete, and check that the inputs of a merge are compatible (layouts may differ).

A merge reads its inputs one at a time and keeps of each only what the plan needs (the
included keys' layout of the layout input, compact storage records of the stored chunks it
reads), so rank 0's memory holds at most one whole ``.metadata`` beyond the reference's layout
at a time."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsm_megatron.layout import iteration_dir
from wsm_megatron.merge.dcp_format import (
    Metadata,
    MetadataIndex,
    StorageRecord,
    TensorStorageMetadata,
    read_metadata,
)
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.selection import COMMON_FILENAME, has_common_state

CONFIG_FILENAME = "metadata.json"
_OTHER_FORMATS = {
    "torch_dcp": "a plain PyTorch DCP checkpoint (Megatron-LM --ckpt-format torch_dcp)",
    "fsdp_dtensor": "an FSDP DTensor checkpoint (Megatron-LM --ckpt-format fsdp_dtensor)",
}


@dataclass
class InputCheckpoint:
    """One complete input checkpoint: its iteration, directory and DCP metadata."""

    iteration: int
    path: Path
    metadata: Metadata
    config: dict[str, Any]

    @classmethod
    def open(cls, root: Path, iteration: int) -> InputCheckpoint:
        """Open and check ``root/iter_XXXXXXX``: ``metadata.json`` (torch_dist), ``.metadata``,
        the common state (``common.pt`` or embedded) and every ``.distcp`` file at least as long
        as the items it holds."""
        path = iteration_dir(root, iteration)
        if not path.is_dir():
            raise MergeError(f"checkpoint {path} does not exist")
        config_path = path / CONFIG_FILENAME
        if not config_path.is_file():
            raise MergeError(
                f"checkpoint {path}: missing {CONFIG_FILENAME} (incomplete save, or not a "
                "Megatron dist checkpoint)"
            )
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise MergeError(f"checkpoint {path}: cannot read {CONFIG_FILENAME}: {err}") from None
        backend = config.get("sharded_backend") if isinstance(config, dict) else None
        if backend != "torch_dist":
            what = _OTHER_FORMATS.get(backend, f"sharded backend {backend!r}")
            raise MergeError(
                f"checkpoint {path}: {what}; wsm-merge reads Megatron-LM torch_dist checkpoints "
                "only (--ckpt-format torch_dist, the default)"
            )
        metadata = read_metadata(path)
        if not has_common_state(path, metadata):
            raise MergeError(f"checkpoint {path}: missing {COMMON_FILENAME} (incomplete save)")
        ckpt = cls(iteration, path, metadata, config)
        ckpt._check_files()
        return ckpt

    def _check_files(self) -> None:
        ends: dict[str, tuple[int, str]] = {}
        for index, info in self.metadata.storage_data.items():
            end = info.offset + info.length
            if end > ends.get(info.relative_path, (-1, ""))[0]:
                ends[info.relative_path] = (end, index.fqn)
        for name, (end, fqn) in sorted(ends.items()):
            file = self.path / name
            if not file.is_file():
                raise MergeError(
                    f"checkpoint {self.path}: shard file {name} is missing (it holds tensor "
                    f"{fqn!r})"
                )
            size = file.stat().st_size
            if size < end:
                raise MergeError(
                    f"checkpoint {self.path}: shard file {name} is truncated ({size} bytes, "
                    f"tensor {fqn!r} ends at byte {end})"
                )

    def layout(self, include: Callable[[str], bool]) -> InputLayout:
        """The included keys' entries of ``.metadata`` (kinds, shapes, dtypes, chunks)."""
        md = self.metadata.state_dict_metadata
        return InputLayout(self.iteration, self.path, {k: v for k, v in md.items() if include(k)})

    def record(
        self, fqn: str, offsets: Sequence[int] | None = None, names: dict[str, str] | None = None
    ) -> StorageRecord:
        """Where a tensor chunk or bytes item is stored; ``names`` shares the file name strings
        between records (and inputs)."""
        info = self.metadata.storage_data[MetadataIndex(fqn, offsets)]
        if getattr(info, "transform_descriptors", None):
            raise MergeError(
                f"checkpoint {self.path}, tensor {fqn!r}: stored with transforms "
                f"{list(info.transform_descriptors)} (compressed or extended DCP storage is not "
                "supported)"
            )
        name = info.relative_path
        if names is not None:
            name = names.setdefault(name, name)
        return StorageRecord(name, info.offset, info.length)


@dataclass(frozen=True)
class InputLayout:
    """The included keys of one input and their ``.metadata`` entries."""

    iteration: int
    path: Path
    entries: dict[str, Any]

    def tensor_keys(self) -> set[str]:
        return {k for k, md in self.entries.items() if isinstance(md, TensorStorageMetadata)}

    def same_layout(self, other: InputLayout) -> bool:
        """The same stored objects and tensor chunks (equal TP/PP/EP layouts)."""
        if self.entries.keys() != other.entries.keys():
            return False
        for key, a in self.entries.items():
            b = other.entries[key]
            if isinstance(a, TensorStorageMetadata) != isinstance(b, TensorStorageMetadata):
                return False
            if isinstance(a, TensorStorageMetadata) and a.chunks != b.chunks:
                if _chunk_boxes(a) != _chunk_boxes(b):
                    return False
        return True


def _chunk_boxes(md: TensorStorageMetadata) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)


def check_compatible(
    layout: InputLayout, ref: InputLayout, averaged: Callable[[str], bool]
) -> None:
    """Inputs saved at any TP/PP/EP layout merge if they have the same included tensor keys and
    each averaged tensor has one global shape and dtype; their chunks may differ. ``ref`` is
    the layout input's. (Stored objects are copied from inputs at the output layout only, so
    their keys, which name shards of a layout, may differ.) Checked one input at a time."""
    md, ref_md = layout.entries, ref.entries
    keys, ref_keys = layout.tensor_keys(), ref.tensor_keys()
    if keys != ref_keys:
        only_here, only_ref = sorted(keys - ref_keys), sorted(ref_keys - keys)
        detail = []
        if only_here:
            detail.append(f"only in {layout.path.name}: {_names(only_here)}")
        if only_ref:
            detail.append(f"only in {ref.path.name}: {_names(only_ref)}")
        raise MergeError(
            f"checkpoints {layout.path} and {ref.path} have different key sets ("
            + "; ".join(detail)
            + ")"
        )
    for key in sorted(k for k in ref_keys if averaged(k)):
        a, b = md[key], ref_md[key]
        if tuple(a.size) != tuple(b.size):
            raise MergeError(
                f"tensor {key!r}: global shape {tuple(a.size)} at iteration "
                f"{layout.iteration} ({layout.path}) but {tuple(b.size)} at iteration "
                f"{ref.iteration} (a vocabulary padded for another TP size?); tensors whose "
                "global shapes differ cannot be merged"
            )
        if a.properties.dtype != b.properties.dtype:
            raise MergeError(
                f"tensor {key!r}: dtype {a.properties.dtype} at iteration {layout.iteration} "
                f"({layout.path}) but {b.properties.dtype} at iteration {ref.iteration}"
            )


def _names(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
