"""Input checkpoints: open one Megatron ``torch_dist`` iteration directory, check that it is
complete, and check that the inputs of a merge are compatible (layouts may differ)."""

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
    TensorStorageMetadata,
    read_metadata,
)
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.selection import COMMON_FILENAME, has_common_state

CONFIG_FILENAME = "metadata.json"


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
            raise MergeError(
                f"checkpoint {path}: sharded backend {backend!r}; only torch_dist is supported"
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

    def keys(self, include: Callable[[str], bool]) -> set[str]:
        return {k for k in self.metadata.state_dict_metadata if include(k)}

    def storage(self, fqn: str, offsets: Sequence[int] | None = None):
        """The ``_StorageInfo`` (file, offset, length) of a tensor chunk or bytes item."""
        return self.metadata.storage_data[MetadataIndex(fqn, offsets)]


def _tensor_keys(ckpt: InputCheckpoint, include: Callable[[str], bool]) -> set[str]:
    md = ckpt.metadata.state_dict_metadata
    return {k for k in ckpt.keys(include) if isinstance(md[k], TensorStorageMetadata)}


def check_compatible(
    inputs: Sequence[InputCheckpoint],
    layout: int,
    include: Callable[[str], bool],
    averaged: Callable[[str], bool],
) -> None:
    """Inputs saved at any TP/PP/EP layout merge if they have the same included tensor keys and
    each averaged tensor has one global shape and dtype; their chunks may differ. ``inputs[layout]``
    is the reference. (Stored objects are copied from inputs at the output layout only, so
    their keys, which name shards of a layout, may differ.)"""
    ref = inputs[layout]
    ref_md = ref.metadata.state_dict_metadata
    ref_keys = _tensor_keys(ref, include)
    for ckpt in inputs:
        md = ckpt.metadata.state_dict_metadata
        keys = _tensor_keys(ckpt, include)
        if keys != ref_keys:
            only_here, only_ref = sorted(keys - ref_keys), sorted(ref_keys - keys)
            detail = []
            if only_here:
                detail.append(f"only in {ckpt.path.name}: {_names(only_here)}")
            if only_ref:
                detail.append(f"only in {ref.path.name}: {_names(only_ref)}")
            raise MergeError(
                f"checkpoints {ckpt.path} and {ref.path} have different key sets ("
                + "; ".join(detail)
                + ")"
            )
        for key in sorted(k for k in ref_keys if averaged(k)):
            a, b = md[key], ref_md[key]
            if tuple(a.size) != tuple(b.size):
                raise MergeError(
                    f"tensor {key!r}: global shape {tuple(a.size)} at iteration "
                    f"{ckpt.iteration} ({ckpt.path}) but {tuple(b.size)} at iteration "
                    f"{ref.iteration} (a vocabulary padded for another TP size?); tensors whose "
                    "global shapes differ cannot be merged"
                )
            if a.properties.dtype != b.properties.dtype:
                raise MergeError(
                    f"tensor {key!r}: dtype {a.properties.dtype} at iteration {ckpt.iteration} "
                    f"({ckpt.path}) but {b.properties.dtype} at iteration {ref.iteration}"
                )


def _names(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
