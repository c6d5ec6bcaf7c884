"""One microbatch through the model: what Megatron's pipeline schedules call ``forward_step_func``.

The first pipeline stage needs the tokens and positions, the last the labels and loss mask; a
middle stage reads nothing (its input arrives from the previous stage). The loss is the mean
token loss of the microbatch under its loss mask; the schedule averages it over microbatches and
Megatron DDP over data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from wsm_megatron.runtime import cpu_compat

Batch = dict[str, torch.Tensor]


def masked_mean_loss(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The microbatch loss and what the schedule reports (``lm loss``)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask) / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule scales the loss in place


def forward_step(
    data_iterator: Iterator[Batch] | None, model: torch.nn.Module
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple]]:
    """Megatron ``forward_step_func`` for GPT pretraining on the data package's microbatches."""
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    batch: Batch = {}
    if first or last:
        batch = next(data_iterator)
        if not cpu_compat.is_active():
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    output = model(
        batch["tokens"] if first else None,
        batch["position_ids"] if first else None,
        None,
        labels=batch["labels"] if last else None,
    )
    return output, partial(masked_mean_loss, batch["loss_mask"] if last else None)


def run_microbatches(
    model: list[torch.nn.Module],
    data_iterator: Iterator[Batch] | None,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> float | None:
    """Forward (and backward) one global batch; the mean loss on the last stage, else None."""
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return float(torch.stack([r["lm loss"] for r in reports]).mean())


def global_mean(value: float | None) -> float:
    """The mean of ``value`` over the ranks that hold one (last stage, TP rank 0), on all ranks.

    With data parallelism that is the mean over data-parallel replicas (their global batches
    differ); every rank gets it, so any rank can log or return it.
    """
    holds = value is not None and parallel_state.get_tensor_model_parallel_rank() == 0
    device = "cpu" if cpu_compat.is_active() else torch.cuda.current_device()
    pair = torch.tensor(
        [value if holds else 0.0, 1.0 if holds else 0.0], dtype=torch.float64, device=device
    )
    dist.all_reduce(pair)
    return float(pair[0] / pair[1])
