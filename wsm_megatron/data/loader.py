"""Microbatches as the model gets them: read on tensor-parallel rank 0, broadcast to the others.

As in Megatron-LM's ``get_batch_on_this_tp_rank``: only TP rank 0 of the first and last pipeline
stages reads the dataset (:func:`reads_data`, also the ``is_built_on_rank`` of
:func:`~wsm_megatron.data.datasets.build_datasets`, so no other rank builds the datasets). It
broadcasts each microbatch over the TP group; the other TP ranks allocate tensors of the known
shape ``[micro_batch_size, seq_length]`` and receive. A stage gets only the keys it uses (first:
tokens and positions; last: labels and loss mask; middle: nothing). Keys of one dtype travel
packed in one tensor, so a microbatch costs at most two broadcasts.

On GPU the host batch is in pinned memory, copied to the device with ``non_blocking=True`` and
broadcast there (NCCL); training batches may be read by ``num_workers`` DataLoader processes
ahead of time. The sample order is :class:`~wsm_megatron.data.datasets.TrainBatches`' in every
case (workers only read the index lists it hands out, in order), so a stream resumed at
``consumed_samples`` is the same bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from wsm_megatron.data.datasets import BATCH_KEYS, Dataset, TrainBatches

Batch = dict[str, torch.Tensor]
Packed = tuple[torch.Tensor, ...]
"""A microbatch packed by dtype: one ``[keys, micro_batch_size, seq_length]`` tensor per dtype."""

BATCH_DTYPES = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "position_ids": torch.int64,
}
"""What megatron-core's ``GPTDataset`` yields for each of :data:`BATCH_KEYS`."""

GPU_NUM_WORKERS = 2
"""Loader workers on GPU when ``data.num_workers`` is unset (Megatron-LM's ``--num-workers``)."""


def stage_keys(first: bool, last: bool) -> tuple[str, ...]:
    """The batch keys a pipeline stage uses, in :data:`BATCH_KEYS` order."""
    wanted = ({"tokens", "position_ids"} if first else set()) | (
        {"labels", "loss_mask"} if last else set()
    )
    return tuple(key for key in BATCH_KEYS if key in wanted)


def reads_data() -> bool:
    """Whether this rank reads the dataset: TP rank 0 of the first or last pipeline stage."""
    from megatron.core import parallel_state as ps

    edge = ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(
        ignore_virtual=True
    )
    return edge and ps.get_tensor_model_parallel_rank() == 0


@dataclass(frozen=True)
class LoaderConfig:
    """How this rank's microbatches are made: shape, the stage's keys, device, host side."""

    micro_batch_size: int
    seq_length: int
    keys: tuple[str, ...]
    device: torch.device
    num_workers: int = 0
    """DataLoader worker processes reading training batches ahead (0: read in this process)."""
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.seq_length < 1:
            raise ValueError(
                f"LoaderConfig: micro_batch_size and seq_length must be >= 1, got "
                f"{self.micro_batch_size} and {self.seq_length}"
            )
        unknown = [key for key in self.keys if key not in BATCH_DTYPES]
        if unknown:
            raise ValueError(f"LoaderConfig.keys: unknown batch keys {unknown}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {self.num_workers}")

    @classmethod
    def for_this_rank(
        cls,
        *,
        micro_batch_size: int,
        seq_length: int,
        device: torch.device,
        num_workers: int | None = None,
    ) -> LoaderConfig:
        """This rank's loader: its pipeline stage's keys; on GPU pinned memory and, unless
        ``num_workers`` says otherwise, :data:`GPU_NUM_WORKERS` workers (none on CPU)."""
        from megatron.core import parallel_state as ps

        gpu = device.type == "cuda"
        return cls(
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            keys=stage_keys(
                ps.is_pipeline_first_stage(ignore_virtual=True),
                ps.is_pipeline_last_stage(ignore_virtual=True),
            ),
            device=device,
            num_workers=(GPU_NUM_WORKERS if gpu else 0) if num_workers is None else num_workers,
            pin_memory=gpu,
        )

    @property
    def groups(self) -> tuple[tuple[torch.dtype, tuple[str, ...]], ...]:
        """The keys packed together: one group per dtype, in first-key order."""
        dtypes = list(dict.fromkeys(BATCH_DTYPES[key] for key in self.keys))
        return tuple(
            (dtype, tuple(k for k in self.keys if BATCH_DTYPES[k] == dtype)) for dtype in dtypes
        )

    def empty(self) -> Packed:
        """Uninitialised packed tensors on the device, to receive a broadcast into."""
        shape = (self.micro_batch_size, self.seq_length)
        return tuple(
            torch.empty((len(keys), *shape), dtype=dtype, device=self.device)
            for dtype, keys in self.groups
        )


def pack(samples: list[Batch], cfg: LoaderConfig) -> Packed:
    """Stack samples into a packed microbatch (a DataLoader ``collate_fn``)."""
    assert len(samples) == cfg.micro_batch_size, (len(samples), cfg.micro_batch_size)
    packed = []
    for dtype, keys in cfg.groups:
        rows = torch.stack([sample[key] for key in keys for sample in samples])
        if rows.dtype != dtype or rows.shape[1:] != (cfg.seq_length,):
            raise ValueError(
                f"dataset samples give {keys} of {rows.dtype} {list(rows.shape[1:])}, expected "
                f"{dtype} [{cfg.seq_length}]"
            )
        packed.append(rows.view(len(keys), cfg.micro_batch_size, cfg.seq_length))
    return tuple(packed)


def unpack(packed: Packed, cfg: LoaderConfig) -> Batch:
    """The batch dict of a packed microbatch (views, no copies)."""
    batch = {}
    for tensor, (_, keys) in zip(packed, cfg.groups, strict=True):
        batch.update(zip(keys, tensor.unbind(0), strict=True))
    return {key: batch[key] for key in cfg.keys}


class _Samples(Dataset):
    """Global sample ``s`` of a :class:`TrainBatches` stream, for DataLoader workers."""

    def __init__(self, order: TrainBatches) -> None:
        self.order = order

    def __getitem__(self, sample: int) -> Batch:
        return self.order.read(sample)


class _Order:
    """A DataLoader ``batch_sampler``: the stream's index lists, in order, once."""

    def __init__(self, order: TrainBatches, count: int) -> None:
        self.order, self.count = order, count

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.count):
            yield self.order.next_indices()

    def __len__(self) -> int:
        return self.count


def host_batches(order: TrainBatches, cfg: LoaderConfig, count: int) -> Iterator[Packed]:
    """The next ``count`` packed microbatches of ``order`` on the host (pinned if configured)."""
    if cfg.num_workers == 0:
        for _ in range(count):
            packed = pack([order.read(s) for s in order.next_indices()], cfg)
            yield tuple(t.pin_memory() for t in packed) if cfg.pin_memory else packed
        return
    yield from torch.utils.data.DataLoader(
        _Samples(order),
        batch_sampler=_Order(order, count),
        num_workers=cfg.num_workers,
        collate_fn=partial(pack, cfg=cfg),
        pin_memory=cfg.pin_memory,
    )


class BroadcastBatches(Iterator[Batch]):
    """This rank's microbatches: read here on the TP source rank, received on the others.

    ``source`` (packed host microbatches) and ``length`` (how many it yields) are given on the
    source rank only; construction is collective over the TP group (the length is broadcast).
    """

    def __init__(
        self, cfg: LoaderConfig, source: Iterator[Packed] | None, length: int | None
    ) -> None:
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.source = source
        self._group = ps.get_tensor_model_parallel_group() if cfg.keys else None
        self._src = ps.get_tensor_model_parallel_src_rank()
        self._size = ps.get_tensor_model_parallel_world_size() if cfg.keys else 1
        assert (source is not None) == (length is not None)
        assert (source is not None) == (bool(cfg.keys) and dist.get_rank() == self._src)
        self._left = self._broadcast_length(length)

    def _broadcast_length(self, length: int | None) -> int | None:
        if not self.cfg.keys:
            return None  # a middle stage reads nothing: next() gives {} for ever
        if self._size == 1:
            return length
        value = torch.tensor([-1 if length is None else length], device=self.cfg.device)
        dist.broadcast(value, self._src, group=self._group)
        return int(value.item())

    def __next__(self) -> Batch:
        if self._left is None:
            return {}
        if self._left == 0:
            raise StopIteration
        self._left -= 1
        if self.source is None:
            packed = self.cfg.empty()
        else:
            packed = tuple(t.to(self.cfg.device, non_blocking=True) for t in next(self.source))
        if self._size > 1:
            for tensor in packed:
                dist.broadcast(tensor, self._src, group=self._group)
        return unpack(packed, self.cfg)


def build_train_batches(
    train_ds: Dataset | None,
    anneal_ds: Dataset | None,
    cfg: LoaderConfig,
    *,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
    anneal_start_sample: int | None = None,
) -> BroadcastBatches:
    """This rank's training microbatches from ``consumed_samples`` on (collective over TP);
    the datasets are read only where :func:`reads_data`."""
    if not (cfg.keys and reads_data()):
        return BroadcastBatches(cfg, None, None)
    order = TrainBatches(
        train_ds,
        anneal_ds,
        global_batch_size=global_batch_size,
        micro_batch_size=cfg.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        consumed_samples=consumed_samples,
        anneal_start_sample=anneal_start_sample,
    )
    count = order.remaining_microbatches
    return BroadcastBatches(cfg, host_batches(order, cfg, count), count)


def build_valid_batches(
    valid_ds: Dataset | None,
    cfg: LoaderConfig,
    *,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_batches: int,
) -> BroadcastBatches:
    """The first ``num_batches`` global batches of ``valid_ds`` for this rank, read in this
    process (no workers: a fresh iterator per evaluation); collective over TP."""
    if not (cfg.keys and reads_data()):
        return BroadcastBatches(cfg, None, None)
    if valid_ds is None or len(valid_ds) < num_batches * global_batch_size:
        raise ValueError(
            f"the validation dataset has {0 if valid_ds is None else len(valid_ds)} samples, "
            f"fewer than num_batches ({num_batches}) * global_batch_size ({global_batch_size})"
        )
    order = TrainBatches(
        valid_ds,
        None,
        global_batch_size=global_batch_size,
        micro_batch_size=cfg.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    count = num_batches * order.num_microbatches
    host = host_batches(order, dataclasses.replace(cfg, num_workers=0), count)
    return BroadcastBatches(cfg, host, count)
