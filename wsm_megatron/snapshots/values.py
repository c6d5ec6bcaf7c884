"""The values of a rank's shard that a merge averages, and the extra state it must put back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from wsm_megatron.merge.contents import ContentPolicy
from wsm_megatron.merge.plan import AVERAGE
from wsm_megatron.training.checkpointing import model_sharded_state_dict


@dataclass(frozen=True)
class ShardValue:
    """One tensor of this rank's shard that a checkpoint stores under ``key`` and a merge
    averages; ``tensor`` is the live model tensor (a parameter or a view of one). ``expert``:
    replicated over the expert-data-parallel group (Megatron's ``allreduce=False``
    parameters), not over the data-parallel group."""

    key: str
    tensor: torch.Tensor
    expert: bool = False


def shard_values(model: list[torch.nn.Module]) -> list[ShardValue]:
    """The tensors of this rank's shard that ``wsm-merge`` would average, in a fixed order.

    Read off the model's sharded state dict (what a checkpoint stores), with ``wsm-merge``'s
    content policy: floating tensors of the model are averaged; extra state (objects), integer
    buffers and what the policy copies from the newest checkpoint keep their live values,
    which at a merge point are the newest checkpoint's.
    """
    policy = ContentPolicy()
    params = {p.data_ptr(): p for chunk in model for p in chunk.parameters()}
    values: list[ShardValue] = []
    seen: set[tuple[int, int]] = set()
    for item in nested_values(model_sharded_state_dict(model)):
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            continue
        data = item.data
        if not data.is_floating_point() or policy.tensor_kind(item.key, data.dtype) != AVERAGE:
            continue
        identity = (data.data_ptr(), data.numel())
        if identity in seen:  # one tensor under two keys (e.g. a tied output layer)
            continue
        seen.add(identity)
        param = params.get(data.data_ptr())
        expert = param is not None and not getattr(param, "allreduce", True)
        values.append(ShardValue(item.key, data, expert))
    return values


def _has_extra_state(module: torch.nn.Module) -> bool:
    return type(module).get_extra_state is not torch.nn.Module.get_extra_state


@contextmanager
def extra_state_kept(model: list[torch.nn.Module]) -> Iterator[None]:
    """Put every module's extra state (Transformer Engine's ``_extra_state``: FP8 scales and
    amax history) back as it was on entry: a merged model's forward passes update it, and
    training must go on from the live run's."""
    saved: list[tuple[torch.nn.Module, Any]] = [
        (m, _clone(m.get_extra_state()))
        for chunk in model
        for m in chunk.modules()
        if _has_extra_state(m)
    ]
    try:
        yield
    finally:
        for module, state in saved:
            module.set_extra_state(_clone(state))


def _clone(state: Any) -> Any:
    """A copy that later in-place updates of the module cannot reach."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if hasattr(state, "getvalue"):  # io.BytesIO, as Transformer Engine returns it
        import io

        return io.BytesIO(state.getvalue())
    return state
