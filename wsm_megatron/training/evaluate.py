"""Validation loss: the same fixed validation batches every time, so evaluations compare.

Every evaluation reads the first ``train.eval_iters`` global batches of the validation set (a
fresh iterator each time), forward only, in eval mode; the result is the loss per token over
those batches and the data-parallel replicas, known on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from wsm_megatron.training.config import WSMConfig
from wsm_megatron.training.steps import Batch, global_token_means, run_microbatches

ValidBatches = Callable[[], Iterator[Batch]]
"""Returns a fresh iterator over this rank's validation microbatches."""


@torch.no_grad()
def evaluate(
    model: list[torch.nn.Module],
    valid_batches: ValidBatches,
    config: WSMConfig,
    num_microbatches: int,
) -> float:
    """The mean validation loss of ``model`` over ``train.eval_iters`` global batches."""
    for chunk in model:
        chunk.eval()
    batches = valid_batches()
    total = None
    try:
        for _ in range(config.train.eval_iters):
            step = run_microbatches(
                model,
                batches,
                num_microbatches=num_microbatches,
                seq_length=config.seq_length,
                micro_batch_size=config.train.micro_batch_size,
                forward_only=True,
            )
            if step is not None:
                total = step if total is None else total + step
    finally:
        for chunk in model:
            chunk.train()
    return global_token_means([total])[0]
