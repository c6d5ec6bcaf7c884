"""Reading a Megatron ``torch_dist`` checkpoint box by box: one layer (or one expert of a
layer) of a stacked tensor at its global shape, whatever TP/PP/EP layout saved it.

Megatron stacks a block's layers along a prepended axis (``decoder.layers.X.weight`` has shape
``(num_layers, ...)``, experts a second one) and saves each rank's shard as its own chunk; DCP
reassembles a box from the chunks that overlap it, reading only those (as
:func:`wsm_megatron.merge.readback.load_dcp_tensors` does for whole tensors), in this process
without a process group.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from wsm_megatron.export.config import ExportError
from wsm_megatron.integrity import check_files, files_to_check
from wsm_megatron.merge.contents import MODEL, is_extra_state, key_group
from wsm_megatron.training.checkpointing import resolve_checkpoint


@dataclass(frozen=True)
class Box:
    """``key[index]``: the sub-tensor at leading indices ``index`` (``()``: all of it)."""

    key: str
    index: tuple[int, ...] = ()


class _BoxPlanner(LoadPlanner):
    """DCP's load planner for boxes: read items for each box, copied into its tensor."""

    def __init__(self, boxes: Sequence[Box], out: list[torch.Tensor]) -> None:
        self.boxes, self.out = boxes, out

    def set_up_planner(self, state_dict: Any, metadata: Metadata | None = None, *a: Any) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for i, (box, tensor) in enumerate(zip(self.boxes, self.out, strict=True)):
            md = self.metadata.state_dict_metadata[box.key]
            offsets = torch.Size([*box.index, *[0] * tensor.dim()])
            sizes = torch.Size([*[1] * len(box.index), *tensor.shape])
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=sizes)
            for item in create_read_items_for_chunk_list(box.key, md, [chunk]):
                dest = MetadataIndex(str(i), item.dest_index.offset, item.dest_index.index)
                items.append(ReadItem(item.type, dest, item.dest_offsets, item.storage_index,
                                      item.storage_offsets, item.lengths))  # fmt: skip
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise AssertionError(f"not a tensor: {read_item.storage_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        tensor = self.out[int(read_item.dest_index.fqn)]
        lead = len(self.boxes[int(read_item.dest_index.fqn)].index)
        view = tensor.view(*[1] * lead, *tensor.shape)
        for dim, (start, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class CheckpointReader:
    """A checkpoint's model tensors: names, shapes, dtypes, and boxes of them read on demand."""

    def __init__(self, path: str | Path) -> None:
        try:
            self.ckpt_dir, self.iteration = resolve_checkpoint(path)
        except ValueError as err:
            raise ExportError(f"--checkpoint: {err}") from None
        self._storage = dcp.FileSystemReader(str(self.ckpt_dir))
        metadata = self._storage.read_metadata().state_dict_metadata
        self.tensors: dict[str, TensorStorageMetadata] = {
            key: md
            for key, md in metadata.items()
            if isinstance(md, TensorStorageMetadata)
            and key_group(key) == MODEL
            and not is_extra_state(key)
        }
        self.bytes_read = 0

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def box_shape(self, box: Box) -> tuple[int, ...]:
        return self.shape(box.key)[len(box.index) :]

    def nbytes(self, box: Box) -> int:
        return math.prod(self.box_shape(box)) * self.dtype(box.key).itemsize

    def verify(self) -> str | None:
        """The first problem of the checkpoint's files (sizes, and checksums where a
        ``wsm_integrity.json`` records them), or None."""
        try:
            names, record = files_to_check(self.ckpt_dir)
        except ValueError as err:
            return str(err)
        return check_files(self.ckpt_dir, names, record)

    def common_state(self) -> dict[str, Any]:
        """``common.pt`` (the saved args, a merge's provenance), or {} without one."""
        path = self.ckpt_dir / "common.pt"
        return torch.load(path, weights_only=False) if path.is_file() else {}

    def read(self, boxes: Sequence[Box]) -> list[torch.Tensor]:
        """The boxes' tensors, in their stored dtype, read in one DCP load."""
        out = [torch.empty(self.box_shape(b), dtype=self.dtype(b.key)) for b in boxes]
        if boxes:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.simplefilter("ignore", UserWarning)
                planner = _BoxPlanner(boxes, out)
                dcp.load({}, storage_reader=self._storage, planner=planner, no_dist=True)
        self.bytes_read += sum(t.nbytes for t in out)
        return out
