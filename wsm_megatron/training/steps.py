"""One microbatch through the model: what Megatron's pipeline schedules call ``forward_step_func``.

The first pipeline stage needs the tokens and positions, the last the labels and loss mask; a
middle stage reads nothing (its input arrives from the previous stage). With the interleaved
pipeline the stage is the model chunk's virtual stage (its ``vp_stage``), and with context
parallelism each rank keeps its share of the sequence (Megatron's load-balanced split); the
token counts then add up over the context-parallel ranks as over data-parallel ones.

As in Megatron-LM, the loss is normalised by the global number of tokens: each microbatch
returns the sum of its token losses under the loss mask and its token count, the schedule adds
them up, and
``finalize_model_grads`` divides the gradients by the token count of the whole global batch
(all microbatches and data-parallel ranks; ``calculate_per_token_loss`` in the model config).
The reported loss is the same ratio: the mean loss per token of the global batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank

from wsm_megatron.runtime import cpu_compat

Batch = dict[str, torch.Tensor]


def masked_token_loss(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The microbatch's summed token loss, its token count, and what the schedule reports
    (``lm loss``: ``[loss sum, tokens]``, Megatron-LM's format)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach().clone(), tokens.detach().float()])
    return loss, tokens, {"lm loss": report}


def this_cp_rank_share(batch: Batch) -> Batch:
    """This context-parallel rank's share of the sequence (Megatron's load-balanced split:
    chunks ``r`` and ``2 CP - 1 - r`` of ``2 CP``); the batch itself without CP."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False)  # megatron-core >= 0.17
    return get_batch_on_this_cp_rank(dict(batch))


def forward_step(
    data_iterator: Iterator[Batch] | None, model: torch.nn.Module
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple]]:
    """Megatron ``forward_step_func`` for GPT pretraining on the data package's microbatches."""
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    batch: Batch = {}
    if first or last:
        batch = next(data_iterator)
        if not cpu_compat.is_active():
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        batch = this_cp_rank_share(batch)
    output = model(
        batch["tokens"] if first else None,
        batch["position_ids"] if first else None,
        None,
        labels=batch["labels"] if last else None,
    )
    return output, partial(masked_token_loss, batch["loss_mask"] if last else None)


def run_microbatches(
    model: list[torch.nn.Module],
    data_iterator: Iterator[Batch] | None,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> torch.Tensor | None:
    """Forward (and backward) one global batch; ``[loss sum, tokens]`` over this rank's
    microbatches on the last stage (on the device: no host sync), else None.

    With several model chunks (the interleaved pipeline) each gets ``data_iterator``: on a rank
    only the chunk of the first or of the last stage reads it, never both."""
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator if len(model) == 1 else [data_iterator] * len(model),
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.stack([r["lm loss"] for r in reports]).sum(0)


def global_token_means(totals: list[torch.Tensor | None]) -> list[float]:
    """The loss per token of each entry of ``totals`` (``[loss sum, tokens]`` or None) over the
    ranks that hold one (last stage, TP rank 0), on all ranks: one all-reduce for all of them.
    With data parallelism, over every replica's tokens."""
    holds = parallel_state.get_tensor_model_parallel_rank() == 0
    device = "cpu" if cpu_compat.is_active() else torch.cuda.current_device()
    pairs = torch.zeros((len(totals), 2), dtype=torch.float64, device=device)
    for i, total in enumerate(totals):
        if total is not None and holds:
            pairs[i] = total.to(device=device, dtype=torch.float64)
    dist.all_reduce(pairs)
    return (pairs[:, 0] / pairs[:, 1]).tolist()
