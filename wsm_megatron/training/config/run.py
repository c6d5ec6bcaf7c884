"""``WSMConfig``: a whole run, composed of the sections; the cross-section checks are in
:mod:`wsm_megatron.training.config.validation`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from wsm_megatron.data.config import DataConfig
from wsm_megatron.training.config import validation
from wsm_megatron.training.config.checkpoint import CheckpointConfig
from wsm_megatron.training.config.corpus import CorpusConfig
from wsm_megatron.training.config.logging import LoggingConfig
from wsm_megatron.training.config.merge import MergeConfig
from wsm_megatron.training.config.model import ModelConfig
from wsm_megatron.training.config.parallel import ParallelismConfig
from wsm_megatron.training.config.train import TrainConfig


@dataclass
class WSMConfig:
    """A whole run. Sections: model, parallel, train, data, corpus, checkpoint, merge, logging."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    parallel: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        validation.check_parallel_layout(self)
        validation.check_position_embeddings(self)
        validation.check_merge_window(self)
        validation.check_merged_outputs_apart(self)
        validation.check_evaluation(self)

    @property
    def seq_length(self) -> int:
        return self.data.seq_length

    @property
    def tokens_per_iteration(self) -> int:
        return self.train.global_batch_size * self.data.seq_length

    @property
    def merge_quantity(self) -> int | None:
        """How many newest checkpoints the merge window spans (None: no window configured)."""
        if self.merge.quantity is not None:
            return self.merge.quantity
        if self.merge.window is not None:
            c = self.checkpoint
            return self.merge.window // (c.save_interval or c.save_interval_tokens)
        return None

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Megatron-LM's padding: a multiple of ``make_vocab_size_divisible_by`` x TP size."""
        tp = self.parallel.tensor_model_parallel_size
        multiple = self.model.make_vocab_size_divisible_by * tp
        return -(-vocab_size // multiple) * multiple

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
