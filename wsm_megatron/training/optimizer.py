"""Megatron DDP and the Megatron optimizer around a model chunk, on GPU and on CPU.

Both paths use Megatron-Core's ``DistributedDataParallel`` (contiguous gradient buffers,
data-parallel reduction in ``finalize_model_grads``) and ``get_megatron_optimizer`` (AdamW, no
weight decay on biases and norms, gradient clipping by the global norm across tensor, pipeline and
data-parallel ranks with replicated parameters counted once). They differ only where the CPU has no
equivalent:

- GPU: bf16 weights with fp32 main weights (``Float16Module``), the distributed optimizer
  (optimizer state sharded over data-parallel ranks), gradient reduction and parameter all-gather
  overlapped with compute (``parallel.*`` settings);
- CPU: fp32 weights and Megatron's ``FP32Optimizer`` (the same AdamW, state replicated on each
  data-parallel rank), no overlap. Megatron's distributed and mixed-precision optimizers check for
  ``torch.cuda`` tensor types and cannot run on CPU; numerically the fp32 CPU path is what
  ``--use-distributed-optimizer`` computes in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from wsm_megatron.runtime import cpu_compat
from wsm_megatron.training.config import WSMConfig
from wsm_megatron.training.model import BuiltModel, mixed_precision


@dataclass(frozen=True)
class TrainState:
    """The wrapped model and its optimizer; ``model`` is the list Megatron's schedules take."""

    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    distributed_optimizer: bool
    overlap_param_gather: bool


def setup_model_and_optimizer(built: BuiltModel, config: WSMConfig) -> TrainState:
    """Wrap each chunk of ``built`` in (Float16Module and) Megatron DDP and create the Megatron
    optimizer over all of them."""
    gpu = not cpu_compat.is_active()
    p, t = config.parallel, config.train
    bf16 = mixed_precision(config)
    distributed = gpu and p.use_distributed_optimizer
    overlap_param_gather = distributed and p.overlap_param_gather
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=gpu and p.overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=distributed,
        check_for_nan_in_grad=True,
    )
    model = []
    for i, chunk in enumerate(built.chunks):
        module: torch.nn.Module = Float16Module(built.config, chunk) if bf16 else chunk
        # Megatron-LM: buckets for the first chunk only (the others overlap with its backward).
        model.append(
            DistributedDataParallel(built.config, ddp_config, module, disable_bucketing=i > 0)
        )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=distributed,
        ),
        model,
    )
    if distributed:
        fix_fully_reshardable_offsets(optimizer)
    tconfig = built.config
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    if ddp_config.overlap_grad_reduce:
        # As Megatron-LM (align_grad_reduce, its default): the schedules start each chunk's
        # gradient reduction themselves, aligned across pipeline stages.
        no_sync = [chunk.no_sync for chunk in model]
        grad_sync = [chunk.start_grad_sync for chunk in model]
        tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        tconfig.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    return TrainState(model, optimizer, distributed, overlap_param_gather)


def fix_fully_reshardable_offsets(optimizer: MegatronOptimizer) -> None:
    """Make megatron-core's ``fully_reshardable`` optimizer format right for several buckets.

    Its save (megatron-core 0.16-0.20) gathers each buffer's state with the padding between
    buckets removed, then slices it at the parameters' offsets in the padded buffer: from the
    second bucket on, every parameter gets another one's state. On each distributed optimizer,
    the gathered state is put back at the padded offsets before the slicing (its load is right
    as it is). Nothing else changes."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        gather = getattr(inner, "get_parameter_state_dp_zero", None)
        if gather is not None and not hasattr(inner, "_wsm_padded_gather"):
            inner._wsm_padded_gather = gather
            inner.get_parameter_state_dp_zero = partial(_padded_dp_zero_state, inner, gather)


def _padded_dp_zero_state(inner: object, gather: Callable[..., dict], **kwargs: object) -> dict:
    state = gather(**kwargs)
    if state is None:
        return state
    for gbuf_idx, by_dtype in state.items():
        if not isinstance(gbuf_idx, int):
            continue  # "buckets_coalesced"
        buffer = inner.buffers[gbuf_idx]
        for dtype, world in by_dtype.items():
            padded = {"numel_unpadded": world["numel_unpadded"]}
            for key in ("param", "exp_avg", "exp_avg_sq"):
                padded[key] = torch.zeros(buffer.numel, dtype=world[key].dtype)
                start = 0
                for bucket in buffer.buckets:
                    end = start + bucket.numel_unpadded
                    at = slice(bucket.offset, bucket.offset + bucket.numel_unpadded)
                    padded[key][at].copy_(world[key][start:end])
                    start = end
                world[key] = None  # one copy at a time
            by_dtype[dtype] = padded
    return state


@contextmanager
def params_synced(state: TrainState) -> Iterator[None]:
    """Parameters gathered and the all-gather pre-hooks off (evaluation, saving) on GPU.

    With the distributed optimizer's overlapped parameter all-gather, the forward pass gathers
    updated parameters lazily; whatever reads the weights outside a training step needs them
    gathered first (as Megatron-LM does around evaluation and checkpointing).
    """
    if not state.overlap_param_gather:
        yield
        return
    for chunk in state.model:
        chunk.disable_forward_pre_hook()
    try:
        yield
    finally:
        for chunk in state.model:
            chunk.enable_forward_pre_hook()
