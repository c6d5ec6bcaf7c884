"""Megatron-Core GPT datasets for a :class:`DataConfig`, and Megatron-order batch iterators.

The datasets are megatron-core's ``GPTDataset``/``BlendedDataset`` built by
``BlendedMegatronDatasetBuilder``, so any Megatron indexed-dataset prefix and weighted blend works
and the index caches are Megatron's own. The iterators reproduce Megatron-LM's
``MegatronPretrainingSampler`` order: global batch ``[c, c + gbs)`` of the sample stream, each
step of ``micro_batch_size * dp_size`` consecutive samples dealt out to the data-parallel ranks.
With T_switch at global sample S, sample ``s >= S`` is sample ``s - S`` of the annealing dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from wsm_megatron.data.config import DataConfig
from wsm_megatron.data.tokenizer import Tokenizer

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""Microbatch keys; values are ``[micro_batch_size, seq_length]``, int64 (loss_mask: float32)."""

Dataset = torch.utils.data.Dataset


class DataSplits(NamedTuple):
    """The datasets of a run; ``valid``/``anneal`` are None when not configured or not needed,
    and all three are None on ranks where ``is_built_on_rank`` is False."""

    train: Dataset | None
    valid: Dataset | None
    anneal: Dataset | None


@contextlib.contextmanager
def _process_group_for_build() -> Iterator[None]:
    """A one-rank gloo group while building, when none exists.

    megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` on a cache
    miss with ``path_to_cache`` set, which fails without a process group.
    """
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


INDEX_LOCK_NAME = ".wsm-index.lock"


@contextlib.contextmanager
def index_cache_lock(directories: list[Path]) -> Iterator[None]:
    """Hold an exclusive lock in each directory that receives index caches (sorted: no two
    holders can wait on each other), so that two jobs on one corpus never write the same cache
    files at once: megatron-core writes them in place, and a second job would read them half
    written. Held by the rank that builds first (rank 0); a directory where no lock file can be
    created (a read-only corpus, whose caches must then exist) is not locked."""
    with contextlib.ExitStack() as stack:
        for directory in sorted(set(directories)):
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(directory / INDEX_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                continue
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield


def _index_cache_dirs(cfg: DataConfig, blends: list[Any]) -> list[Path]:
    """Where megatron-core writes the index caches of ``blends``: ``cfg.cache_dir``, else a
    ``cache`` folder beside each prefix (locked through the prefix's directory)."""
    if cfg.cache_dir is not None:
        return [Path(cfg.cache_dir)]
    return [Path(prefix).parent for blend in blends if blend for prefix in blend[0]]


_SPLIT_NAMES = ("train", "validation", "test")


def _check_documents(field: str, prefixes: list[str], split: str | None, sizes: list[int]) -> None:
    """Fail, naming the prefix, where a split that must supply samples would get no document:
    megatron-core 0.16.1 then loops forever looking for tokens (``_get_num_epochs``)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = (
        convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        if split is not None
        else [(0.0, 1.0), None, None]
    )
    for prefix in prefixes:
        n_docs = len(IndexedDataset(prefix))
        for i, (bookends, size) in enumerate(zip(matrix, sizes, strict=True)):
            if bookends is None or size == 0:
                continue
            begin, end = (int(round(b * n_docs)) for b in bookends)
            if end <= begin:
                share = f"the split {split!r} leaves" if split is not None else "there are"
                raise ValueError(
                    f"data.{field}: {share} no documents of {prefix!r} ({n_docs} in all) "
                    f"for the {_SPLIT_NAMES[i]} set; use more data or give valid_data"
                )


def build_datasets(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    train_samples: int,
    valid_samples: int,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> DataSplits:
    """Build the train, validation and annealing datasets with megatron-core.

    ``train_samples`` is every sample the run trains on (``train_iters * global_batch_size``);
    with T_switch at sample S (:meth:`data.anneal_start_sample`) the train blend supplies
    ``min(S, train_samples)`` of them and the annealing blend the rest. ``valid_samples`` is
    ``eval_iters * global_batch_size``. Without ``cfg.valid_data`` the validation set is the
    ``cfg.split`` share of the train blend (Megatron's ``--split``; the annealing blend is split
    the same way and its held-out share is unused). Index caches go to ``cfg.cache_dir`` (else
    Megatron's default next to each prefix). When torch.distributed is initialised this is
    collective: all ranks call it, rank 0 builds the caches first. By default every rank builds
    (memory-mapped, cheap); ``is_built_on_rank`` may restrict that (True on rank 0 at least).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if global_batch_size < 1 or train_samples < 0 or valid_samples < 0:
        raise ValueError(
            "build_datasets: need global_batch_size >= 1, train_samples >= 0, valid_samples >= 0; "
            f"got {global_batch_size}, {train_samples}, {valid_samples}"
        )
    cfg.check_paths()
    switch = cfg.anneal_start_sample(global_batch_size)
    n_train = train_samples if switch is None else min(switch, train_samples)
    n_anneal = 0 if switch is None else max(0, train_samples - switch)

    def build(blends: list[Any], sizes: list[int]) -> list[Dataset | None]:
        """Build the splits with sizes[i] > 0 (megatron-core loops forever on an empty one)."""
        if not any(sizes):
            return [None, None, None]  # megatron-core would make mock data of a config with none
        if cfg.valid_blend is None:
            kwargs: dict[str, Any] = {"blend": blends[0], "split": cfg.split}
        else:
            used = [blend if n > 0 else None for blend, n in zip(blends, sizes, strict=True)]
            kwargs = {"blend_per_split": used}
        config = GPTDatasetConfig(
            random_seed=cfg.seed,
            sequence_length=cfg.seq_length,
            path_to_cache=cfg.cache_dir,
            mmap_bin_files=cfg.mmap_bin_files,
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            **kwargs,
        )
        if config.split_matrix is not None:
            # Same document ranges as Megatron-LM's --split; unused splits are not built.
            config.split_matrix = [
                bookends if n > 0 else None
                for bookends, n in zip(config.split_matrix, sizes, strict=True)
            ]
        builder = BlendedMegatronDatasetBuilder(
            GPTDataset, sizes, is_built_on_rank or (lambda: True), config
        )
        builds_first = not dist.is_initialized() or dist.get_rank() == 0
        locked = _index_cache_dirs(cfg, blends) if builds_first else []
        with _process_group_for_build(), index_cache_lock(locked):
            return builder.build()

    split = cfg.split if cfg.valid_blend is None else None
    _check_documents("train_data", cfg.train_blend[0], split, [n_train, valid_samples, 0])
    if cfg.valid_blend is not None:
        _check_documents("valid_data", cfg.valid_blend[0], None, [valid_samples, 0, 0])
    train, valid, _ = build([cfg.train_blend, cfg.valid_blend, None], [n_train, valid_samples, 0])
    anneal = None
    if n_anneal > 0:
        assert cfg.anneal_blend is not None
        _check_documents("anneal_data", cfg.anneal_blend[0], split, [n_anneal, 0, 0])
        anneal = build([cfg.anneal_blend, None, None], [n_anneal, 0, 0])[0]
    return DataSplits(train, valid, anneal)


class TrainBatches(Iterator[dict[str, torch.Tensor]]):
    """This data-parallel rank's microbatches, Megatron order, from ``consumed_samples`` on.

    Global sample ``s`` is ``train_ds[s]`` before ``anneal_start_sample`` and
    ``anneal_ds[s - anneal_start_sample]`` from there on (either dataset may be None where it is
    never read, e.g. ``train_ds`` with T_switch at 0). Iteration stops (StopIteration) at the
    first global batch the datasets cannot fill completely.
    """

    def __init__(
        self,
        train_ds: Dataset | None,
        anneal_ds: Dataset | None,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        anneal_start_sample: int | None = None,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got "
                f"micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}"
            )
        if global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                f"micro_batch_size * dp_size ({micro_batch_size} * {dp_size})"
            )
        if consumed_samples < 0 or consumed_samples % global_batch_size:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be a multiple of global_batch_size "
                f"({global_batch_size}) and >= 0"
            )
        if anneal_start_sample is not None and anneal_start_sample < 0:
            raise ValueError(f"anneal_start_sample must be >= 0, got {anneal_start_sample}")
        self.train_ds = train_ds
        self.anneal_ds = anneal_ds
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.anneal_start_sample = anneal_start_sample
        self._batch_start = consumed_samples
        self._micro = 0
        self._end = self._stream_end(consumed_samples)

    @property
    def consumed_samples(self) -> int:
        """Global samples in the global batches completed so far (Megatron's counter)."""
        return self._batch_start

    @property
    def num_microbatches(self) -> int:
        """Microbatches per global batch on each rank: gbs / (mbs * dp_size)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def locate(self, sample: int) -> tuple[Dataset | None, int]:
        """The dataset and index that global sample ``sample`` reads."""
        if self.anneal_start_sample is None or sample < self.anneal_start_sample:
            return self.train_ds, sample
        return self.anneal_ds, sample - self.anneal_start_sample

    def _stream_end(self, start: int) -> int:
        """The first global sample from ``start`` on that no dataset holds."""
        n_train = 0 if self.train_ds is None else len(self.train_ds)
        switch = self.anneal_start_sample
        if switch is None:
            return n_train
        n_anneal = 0 if self.anneal_ds is None else len(self.anneal_ds)
        return min(n_train, switch) if start < switch and n_train < switch else switch + n_anneal

    @property
    def remaining_microbatches(self) -> int:
        """How many more microbatches this iterator yields before StopIteration."""
        if self._batch_start + self.global_batch_size > self._end:
            return 0
        batches = (self._end - self._batch_start) // self.global_batch_size
        return batches * self.num_microbatches - self._micro

    def next_indices(self) -> list[int]:
        """The global samples of this rank's next microbatch (advances like ``next``)."""
        start = self._batch_start
        if start + self.global_batch_size > self._end:
            raise StopIteration
        first = (
            start
            + self._micro * self.micro_batch_size * self.dp_size
            + self.dp_rank * self.micro_batch_size
        )
        self._micro += 1
        if self._micro == self.num_microbatches:
            self._micro = 0
            self._batch_start += self.global_batch_size
        return list(range(first, first + self.micro_batch_size))

    def read(self, sample: int) -> dict[str, torch.Tensor]:
        """Global sample ``sample``."""
        dataset, index = self.locate(sample)
        assert dataset is not None, f"global sample {sample} is in no dataset"
        return dataset[index]

    def __next__(self) -> dict[str, torch.Tensor]:
        samples = [self.read(s) for s in self.next_indices()]
        return {key: torch.stack([sample[key] for sample in samples]) for key in BATCH_KEYS}


build_train_iterator = TrainBatches
"""The training microbatch iterator; resuming at ``consumed_samples`` continues the
uninterrupted stream exactly (an alias of :class:`TrainBatches`)."""


def build_valid_iterator(
    valid_ds: Dataset,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_batches: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """A fresh iterator over the first ``num_batches`` global batches of ``valid_ds`` (this rank's
    microbatches): every evaluation sees the same batches."""
    if num_batches < 0 or len(valid_ds) < num_batches * global_batch_size:
        raise ValueError(
            f"the validation dataset has {len(valid_ds)} samples, fewer than num_batches "
            f"({num_batches}) * global_batch_size ({global_batch_size}); build it with "
            "valid_samples >= num_batches * global_batch_size"
        )
    batches = TrainBatches(
        valid_ds,
        None,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return islice(batches, num_batches * batches.num_microbatches)
