"""Rows of tokens scored in batches through megatron-core's forward-backward schedule, under TP/PP.

Each row is one sequence with its targets; the answer per row is the log-likelihood of its last
``scored`` targets, whether greedy decoding gives all of them, and the argmax after its last
token. The last pipeline stage computes these from the vocabulary-parallel logits without
gathering them (a log-sum-exp over the TP group, as megatron-core's cross entropy; the argmax
as the first maximum over the shards), so the cost per token is a few numbers, not a
vocabulary. Results reach every rank of the replica (a broadcast over the pipeline) and, with
:func:`score_rows`, every replica (one all-reduce over data parallelism).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from wsm_megatron.eval.batching import DUMMY, Call, Packing, plan_calls
from wsm_megatron.runtime import cpu_compat

FIELDS = 3
"""Numbers per row: log-likelihood, greedy (1.0/0.0), argmax after the last token."""


@dataclass(frozen=True)
class Row:
    """``tokens`` in, ``targets`` (as many) out; the last ``scored`` targets are scored."""

    tokens: tuple[int, ...]
    targets: tuple[int, ...]
    scored: int

    def __post_init__(self) -> None:
        assert len(self.tokens) == len(self.targets) and 0 <= self.scored <= len(self.targets)


@dataclass(frozen=True)
class RowScore:
    logprob: float
    greedy: bool
    next_token: int


def device() -> torch.device:
    return torch.device("cpu") if cpu_compat.is_active() else torch.device("cuda")


def _microbatch(rows: Sequence[Row], indices: Sequence[int], length: int) -> dict[str, Any]:
    """Right-padded tensors of one micro-batch (padding rows are token 0, nothing scored)."""
    b = len(indices)
    tokens = torch.zeros(b, length, dtype=torch.long)
    targets = torch.zeros(b, length, dtype=torch.long)
    scored = torch.zeros(b, length, dtype=torch.bool)
    last = torch.zeros(b, dtype=torch.long)
    for j, i in enumerate(indices):
        if i == DUMMY:
            continue
        row, n = rows[i], len(rows[i].tokens)
        tokens[j, :n] = torch.tensor(row.tokens)
        targets[j, :n] = torch.tensor(row.targets)
        scored[j, n - row.scored : n] = True
        last[j] = n - 1
    dev = device()
    return {
        "tokens": tokens.to(dev),
        "position_ids": torch.arange(length, device=dev).unsqueeze(0).expand(b, -1),
        "targets": targets.to(dev),
        "scored": scored.to(dev),
        "last": last.to(dev),
    }


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The global argmax of vocabulary-parallel ``logits`` (the first maximum, as
    ``torch.argmax`` on the gathered logits), gathering two numbers per position."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    value, index = logits.max(dim=-1)
    if size == 1:
        return index
    index = index + parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    pair = torch.stack([value.double(), index.double()])
    parts = [torch.empty_like(pair) for _ in range(size)]
    dist.all_gather(parts, pair, group=group)
    values, indices = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    best = values.argmax(dim=0, keepdim=True)  # ties: the lowest TP rank, the lowest index
    return indices.gather(0, best)[0].long()


def _mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 logits with the embedding's padding rows (ids >= ``vocab_size``) at -inf."""
    logits = logits.float()
    start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    if start + logits.shape[-1] <= vocab_size:  # no padding in this shard (decided on the host)
        return logits
    padded = torch.arange(start, start + logits.shape[-1], device=logits.device) >= vocab_size
    return logits.masked_fill(padded, float("-inf"))


def row_scores(logits: torch.Tensor, mb: dict[str, Any], vocab_size: int) -> torch.Tensor:
    """``[b, FIELDS]`` float64 from a micro-batch's vocabulary-parallel logits ``[b, s, v/tp]``."""
    logits = _mask_padded_vocab(logits, vocab_size)
    argmax = vocab_parallel_argmax(logits)
    nll = vocab_parallel_cross_entropy(logits, mb["targets"])  # in place: logits are spent
    scored = mb["scored"]
    logprob = torch.where(scored, -nll.double(), 0.0).sum(dim=1)
    greedy = ((argmax == mb["targets"]) | ~scored).all(dim=1)
    next_token = argmax.gather(1, mb["last"].unsqueeze(1))[:, 0]
    return torch.stack([logprob, greedy.double(), next_token.double()], dim=1)


def _run_call(model: list[torch.nn.Module], call: Call, rows: Sequence[Row], vocab: int) -> list:
    """One schedule call; on the last pipeline stage, each micro-batch's ``[b, FIELDS]``."""
    mbs = [_microbatch(rows, ids, call.length) for ids in call.microbatches]

    def forward_step(data: Iterator[dict[str, Any]], chunk: torch.nn.Module) -> tuple:
        mb = next(data)
        first = parallel_state.is_pipeline_first_stage(
            ignore_virtual=False, vp_stage=getattr(_unwrap(chunk), "vp_stage", None)
        )
        output = chunk(mb["tokens"] if first else None, mb["position_ids"] if first else None, None)
        return output, lambda out, non_loss_data=True: row_scores(out, mb, vocab)

    iterators = [iter(mbs) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model,
        num_microbatches=len(mbs),
        seq_length=call.length,
        micro_batch_size=len(call.microbatches[0]),
        forward_only=True,
        collect_non_loss_data=True,
    )


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def score_calls(
    model: list[torch.nn.Module], rows: Sequence[Row], calls: Sequence[Call], vocab_size: int
) -> torch.Tensor:
    """``[len(rows), FIELDS]`` float64 on every rank of this replica: the rows of ``calls``
    scored, zeros for the rows of other replicas."""
    out = torch.zeros(len(rows), FIELDS, dtype=torch.float64, device=device())
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        for call in calls:
            collected = _run_call(model, call, rows, vocab_size)
            if not last:
                continue
            ids = torch.tensor([i for mb in call.microbatches for i in mb], device=out.device)
            values = torch.cat(list(collected))
            keep = ids != DUMMY
            out[ids[keep]] = values[keep]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(out, src, group=parallel_state.get_pipeline_model_parallel_group())
    return out


def score_rows(
    model: list[torch.nn.Module], rows: Sequence[Row], packing: Packing, vocab_size: int
) -> list[RowScore]:
    """Every row scored, split over the data-parallel replicas; the same list on every rank,
    in the order of ``rows``."""
    dp_rank = parallel_state.get_data_parallel_rank() if packing.dp_size > 1 else 0
    calls = plan_calls([len(r.tokens) for r in rows], packing, dp_rank)
    out = score_calls(model, rows, calls, vocab_size)
    if packing.dp_size > 1:
        dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
    return [RowScore(lp, g == 1.0, int(t)) for lp, g, t in out.tolist()]
