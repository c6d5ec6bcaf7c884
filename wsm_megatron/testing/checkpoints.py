"""Realistic Megatron-LM-style test checkpoints, written by megatron-core itself or by plain DCP.

- :func:`write_megatron_checkpoints` (run it on ``tp * pp * dp`` ranks, e.g. with
  :func:`wsm_megatron.testing.distributed.run_distributed`): a small bf16 GPTModel whose
  layernorms and position embeddings are fp32, saved with ``dist_checkpointing.save`` as
  Megatron-LM's ``generate_state_dict`` builds it (args, iteration, model, optimizer state, RNG
  and rerun-machine objects, content metadata), plus an integer buffer that changes with the
  iteration; the model's own ``_extra_state`` objects carry Transformer Engine payloads
  (:func:`te_extra_state`). Weights follow a seeded random walk, one step per checkpoint.
  The tracker file is written after each save, as Megatron-LM does.
- :func:`write_distributed_optimizer_checkpoints` (on ``tp x dp`` ranks): checkpoints of a real
  training step with megatron-core's ``DistributedOptimizer`` in Megatron-LM's default
  ``dp_reshardable`` format (flat fp32 buffers per bucket, per-group objects).
- :func:`write_dcp_checkpoint`: one process, a plain dict of tensors/objects saved with
  ``torch.distributed.checkpoint`` in Megatron-LM's layout (fast; for failure tests, benchmarks).
- :func:`load_dcp_tensors`: every tensor of a checkpoint as a global tensor, read by DCP itself
  (an independent reference for merge results); :func:`fp64_reference` a merge in fp64 from it.
- :func:`shared_megatron_checkpoints`: write a set once per directory, safe across processes
  (pytest-xdist workers), for a session-scoped fixture; with ``layouts``, groups of iterations
  saved at different TP/PP (a run restarted at another layout).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import pickle
import shutil
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from wsm_megatron.layout import iteration_dir, write_tracker
from wsm_megatron.merge.readback import load_dcp_tensors  # noqa: F401 - re-exported
from wsm_megatron.testing.models import _sharded_objects, _sharded_tensors, tiny_gpt

CONTENT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
TORCH_DIST_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
INT_BUFFER_KEY = "decoder.wsm_test_token_counts"
EXTRA_STATE_KEY = "decoder.layers.self_attention.linear_proj._extra_state"
EMPTY_EXTRA_STATE_KEY = "decoder.layers.self_attention.linear_qkv._extra_state"
WALK_STEP = 0.01


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def megatron_args(**overrides: Any) -> argparse.Namespace:
    """A minimal ``args`` namespace as Megatron-LM saves it in ``common.pt``."""
    args = dict(
        seq_length=16,
        global_batch_size=8,
        micro_batch_size=2,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        bf16=True,
        ckpt_format="torch_dist",
        use_distributed_optimizer=True,
        consumed_train_samples=0,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def te_extra_state(*seed: object, fp8: bool = True, amax_history_len: int = 1024) -> torch.Tensor:
    """A Transformer Engine module's ``get_extra_state()``: ``pickle.dumps`` of its FP8 state in
    a 1-D ``torch.uint8`` tensor (an empty one for a module that never ran in FP8, as in a bf16
    run). The dict is TE 1.x's delayed-scaling state (scales, inverse scales, amax histories,
    the picklable ``fp8_meta`` entries); TE 2.x adds a ``recipe`` object, left out here because
    unpickling it needs TE. Megatron saves the tensor as a ``ShardedObject`` per layer; ``seed``
    makes the values differ by iteration and layer."""
    if not fp8:
        return torch.empty(0, dtype=torch.uint8)
    g = torch.Generator().manual_seed(_seed("te", *seed))
    amax_fwd = torch.rand(amax_history_len, 3, generator=g) * 10
    amax_bwd = torch.rand(amax_history_len, 2, generator=g)
    scale_fwd, scale_bwd = 448.0 / amax_fwd.amax(0), 57344.0 / amax_bwd.amax(0)
    state = {
        "scale_fwd": scale_fwd,
        "scale_inv_fwd": 1.0 / scale_fwd,
        "amax_history_fwd": amax_fwd,
        "scale_bwd": scale_bwd,
        "scale_inv_bwd": 1.0 / scale_bwd,
        "amax_history_bwd": amax_bwd,
        "extra_fp8_variables": {
            "num_gemms": 1,
            "fp8_checkpoint": True,
            "fp8_max_fwd": 448.0,
            "fp8_max_bwd": 57344.0,
            "first_module": False,
        },
    }
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)


def write_megatron_checkpoints(
    root: str | os.PathLike[str],
    iterations: Sequence[int],
    *,
    tp: int = 2,
    pp: int = 2,
    seed: int = 1234,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    vocab_size: int = 128,
    seq_length: int = 16,
    global_batch_size: int = 8,
    with_optimizer: bool = True,
    consumed_samples: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Save a checkpoint at each of ``iterations`` under ``root`` from every rank of a
    ``tp x pp (x dp)`` job; initialises the parallel state if needed. ``consumed_samples``
    (one per iteration) is saved as ``args.consumed_train_samples``, as Megatron-LM counts it
    under a batch-size ramp-up (default: ``iteration x global_batch_size``). Returns this rank's
    ``(tp_rank, pp_rank)`` and the sharded keys it saved."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    from wsm_megatron.runtime import ParallelConfig, init_distributed

    if not parallel_state.model_parallel_is_initialized():
        init_distributed(ParallelConfig(tp, pp))
    assert parallel_state.get_tensor_model_parallel_world_size() == tp
    assert parallel_state.get_pipeline_model_parallel_world_size() == pp
    rank = torch.distributed.get_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    dp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    model = tiny_gpt(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        vocab_size=vocab_size,
        seq_length=seq_length,
        params_dtype=torch.bfloat16,
        seed=seed,
    )
    for name, module in model.named_modules():  # fp32 layernorms and position embeddings
        if "norm" in type(module).__name__.lower() or name.endswith("position_embeddings"):
            module.float()

    walk: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    keys: list[str] = []
    root = Path(root)
    if consumed_samples is None:
        consumed_samples = [it * global_batch_size for it in iterations]
    for it, consumed in zip(iterations, consumed_samples, strict=True):
        model_sd = model.sharded_state_dict()
        with torch.no_grad():
            for sh in _sharded_tensors(model_sd):
                where = (sh.key, tuple(sh.global_offset))
                g = torch.Generator().manual_seed(_seed(seed, *where, it))
                noise = torch.randn(sh.data.shape, generator=g)
                walk[where] = walk.get(where, sh.data.float()) + WALK_STEP * noise
                sh.data.copy_(walk[where])
        counts = torch.arange(8, dtype=torch.int64) + 1000 * tp_rank + it
        for sh in _sharded_objects(model_sd):  # the model's own TE extra-state objects
            if sh.key.endswith("._extra_state"):
                fp8 = sh.key != EMPTY_EXTRA_STATE_KEY
                sh.data = te_extra_state(it, sh.key, sh.global_offset, fp8=fp8)
        state: dict[str, Any] = {
            "args": megatron_args(
                seq_length=seq_length,
                global_batch_size=global_batch_size,
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                num_layers=num_layers,
                hidden_size=hidden_size,
                num_attention_heads=num_attention_heads,
                consumed_train_samples=consumed,
            ),
            "checkpoint_version": 3.0,
            "iteration": it,
            "num_floating_point_operations_so_far": 1.0e12 * it,
            "model": model_sd,
            "rng_state": ShardedObject(
                "rng_state",
                [{"torch_rng_state": torch.get_rng_state(), "iteration": it}],
                (pp, tp),
                (pp_rank, tp_rank),
                replica_id=dp_rank,
            ),
            "rerun_state_machine": {
                "mode": "disabled",
                "sharded": ShardedObject(
                    "rerun_state_machine_state",
                    {"iteration": it},
                    (pp, tp),
                    (pp_rank, tp_rank),
                    replica_id=dp_rank,
                ),
            },
        }
        if pp_rank == 0:
            state["wsm_test"] = ShardedTensor.from_rank_offsets(
                INT_BUFFER_KEY, counts, (0, tp_rank, tp), replica_id=dp_rank
            )
        if with_optimizer:
            optimizer = {}
            for sh in _sharded_tensors(model_sd):
                g = torch.Generator().manual_seed(_seed("adam", seed, sh.key, sh.global_offset, it))
                moment = torch.randn(sh.data.shape, generator=g).abs()
                optimizer[f"{sh.key}@{sh.global_offset}"] = make_sharded_optimizer_tensor(
                    sh, moment, "optimizer.state.exp_avg_sq"
                )
            state["optimizer"] = {
                "state": optimizer,
                "param_groups": [{"lr": 1e-4, "step": it}],
            }
            state["opt_param_scheduler"] = {"num_steps": it * global_batch_size}
        ckpt_dir = iteration_dir(root, it)
        if rank == 0:
            ckpt_dir.mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save(state, str(ckpt_dir), content_metadata=dict(CONTENT_METADATA))
        torch.distributed.barrier()
        if rank == 0:
            write_tracker(root, it)
        keys = sorted({sh.key for sh in _sharded_tensors(state)})
    return {"tp_rank": tp_rank, "pp_rank": pp_rank, "dp": dp, "keys": keys}


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """``Tensor.type()`` answers ``torch.cuda.<X>Tensor`` for CPU tensors inside the block.

    megatron-core's ``DistributedOptimizer`` accepts parameters only by those type names; nothing
    else in it needs a GPU. Test-only: the CPU layer of ``wsm_megatron.runtime`` leaves the
    distributed optimizer to GPU runs, and these fixtures need its real checkpoint format."""
    original = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return original(self, *args, **kwargs)
        return original(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


@contextlib.contextmanager
def torch_adam_step_kept() -> Iterator[None]:
    """Inside, megatron-core's ``DistributedOptimizer`` loads ``fully_reshardable`` state into
    torch's Adam: megatron-core 0.16 copies every per-parameter state key there, torch's Adam
    has a per-parameter ``step`` that the format does not store (TE's FusedAdam, the GPU
    optimizer, keeps it in the param groups), and megatron-core sets that step from the param
    groups itself. Test-only, as :func:`cuda_type_names`."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self: Any, model_param: Any, tensors: dict[str, Any]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                self.optimizer.state[main_param]["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def distributed_optimizer_model(
    *,
    tp: int = 1,
    num_layers: int = 2,
    overlap_grad_reduce: bool = False,
    bucket_size: int | None = None,
    clip_grad: float = 1.0,
) -> tuple[Any, Any, Any]:
    """``(model, ddp, optimizer)``: a small bf16 GPT in ``Float16Module`` and Megatron DDP with
    megatron-core's ``DistributedOptimizer`` (Adam, fp32 main weights, state sharded over the
    data-parallel ranks), as Megatron-LM builds them; initialises the parallel state if needed.
    ``overlap_grad_reduce`` and ``bucket_size`` set DDP's bucket layout (without the overlap:
    one bucket, Megatron-LM's default). Call the optimizer inside :func:`cuda_type_names`."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from wsm_megatron.runtime import ParallelConfig, init_distributed

    if not parallel_state.model_parallel_is_initialized():
        init_distributed(ParallelConfig(tp, 1))
    model = tiny_gpt(num_layers=num_layers, params_dtype=torch.bfloat16, seed=1234)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=True,
        overlap_grad_reduce=overlap_grad_reduce,
        bucket_size=bucket_size,
    )
    ddp = DistributedDataParallel(model.config, ddp_config, Float16Module(model.config, model))
    config = OptimizerConfig(
        optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16, clip_grad=clip_grad
    )
    config.use_distributed_optimizer = True
    with cuda_type_names():
        optimizer = get_megatron_optimizer(config, [ddp])
    return model, ddp, optimizer


def write_distributed_optimizer_checkpoints(
    root: str | os.PathLike[str],
    iterations: Sequence[int],
    *,
    tp: int = 1,
    sharding_type: str = "dp_reshardable",
    num_layers: int = 2,
) -> None:
    """One training step per iteration (seeded random gradients) with
    :func:`distributed_optimizer_model`, and a checkpoint at each of ``iterations``: model and
    optimizer built by megatron-core's own ``sharded_state_dict`` in ``sharding_type``, as
    Megatron-LM's ``save_checkpoint`` does."""
    from megatron.core import dist_checkpointing

    model, ddp, optimizer = distributed_optimizer_model(tp=tp, num_layers=num_layers)
    rank = torch.distributed.get_rank()
    metadata = {**CONTENT_METADATA, "distrib_optim_sharding_type": sharding_type}
    for it in iterations:
        g = torch.Generator().manual_seed(_seed("grad", rank, it))
        for param in ddp.parameters():
            param.main_grad.copy_(torch.randn(param.shape, generator=g))
        with cuda_type_names():
            optimizer.step()
        model_sd = model.sharded_state_dict()  # Megatron-LM saves the unwrapped model
        args = megatron_args(
            tensor_model_parallel_size=tp, num_layers=num_layers, consumed_train_samples=8 * it
        )
        state: dict[str, Any] = {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": it,
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, metadata=metadata),
            "opt_param_scheduler": {"num_steps": 8 * it},
        }
        ckpt_dir = iteration_dir(root, it)
        if rank == 0:
            ckpt_dir.mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save(state, str(ckpt_dir), content_metadata=metadata)
        torch.distributed.barrier()
        if rank == 0:
            write_tracker(root, it)


def write_dcp_checkpoint(
    root: str | os.PathLike[str],
    iteration: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    objects: Mapping[str, Any] | None = None,
    args: argparse.Namespace | None = None,
    tracker: bool = True,
    embedded_common: bool = False,
) -> Path:
    """Save ``tensors`` (one chunk each) and ``objects`` with plain DCP from this process, in
    Megatron-LM's layout: ``root/iter_XXXXXXX/`` with ``.metadata``, ``__0_0.distcp``,
    ``common.pt`` and ``metadata.json``; then the tracker file (``tracker=True``). With
    ``embedded_common`` the common state is stored as megatron-core >= 0.17 stores it, as the
    item ``common_state/shard_0_1`` holding ``[state]``, and there is no ``common.pt``."""
    import torch.distributed.checkpoint as dcp

    from wsm_megatron.merge.selection import EMBEDDED_COMMON_KEY

    ckpt_dir = iteration_dir(root, iteration)
    ckpt_dir.mkdir(parents=True)
    common = {
        "args": args if args is not None else megatron_args(),
        "checkpoint_version": 3.0,
        "iteration": iteration,
    }
    state = {**tensors, **(objects or {})}
    if embedded_common:
        state[EMBEDDED_COMMON_KEY] = [common]
    # Not flattened: a list stays one stored object, as megatron-core's ShardedObjects do.
    dcp.save(
        state,
        storage_writer=dcp.FileSystemWriter(str(ckpt_dir)),
        planner=dcp.DefaultSavePlanner(flatten_state_dict=False),
        no_dist=True,
    )
    if not embedded_common:
        torch.save(common, ckpt_dir / "common.pt")
    (ckpt_dir / "metadata.json").write_text(json.dumps(TORCH_DIST_CONFIG))
    if tracker:
        write_tracker(root, iteration)
    return ckpt_dir


def fp64_reference(
    root: str | os.PathLike[str],
    iterations: Sequence[int],
    coefficients: Sequence[float],
    *,
    absolute: bool = False,
) -> dict[str, torch.Tensor]:
    """``Σ_j c_j θ_j`` in fp64 (oldest first) of every floating tensor, read by DCP;
    ``Σ_j c_j |θ_j|`` (the scale of rounding errors) with ``absolute``."""
    ref: dict[str, torch.Tensor] = {}
    for it, c in zip(iterations, coefficients, strict=True):
        for key, x in load_dcp_tensors(iteration_dir(root, it)).items():
            if x.dtype.is_floating_point:
                x = x.double().abs() if absolute else x.double()
                ref[key] = ref.get(key, torch.zeros((), dtype=torch.float64)) + c * x
    return ref


def _write_at_layout(root: str, iterations: list[int], tp: int, pp: int) -> dict[str, Any]:
    return write_megatron_checkpoints(root, iterations, tp=tp, pp=pp)


def shared_megatron_checkpoints(
    directory: str | os.PathLike[str],
    iterations: Sequence[int],
    layouts: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """``directory/ckpts``: :func:`write_megatron_checkpoints` at ``iterations`` on 4 gloo
    ranks, written once; concurrent callers wait on a file lock. ``layouts`` gives each
    iteration's ``(tp, pp)`` (default: TP=2, PP=2 for all); consecutive iterations of one layout
    are saved by one job (data-parallel where ``tp * pp < 4``)."""
    from wsm_megatron.testing.distributed import run_distributed
    from wsm_megatron.testing.runs import built_once

    layouts = list(layouts) if layouts is not None else [(2, 2)] * len(iterations)
    root = Path(directory) / "ckpts"

    def build() -> None:
        shutil.rmtree(root, ignore_errors=True)
        for (tp, pp), group in itertools.groupby(
            zip(layouts, iterations, strict=True), key=lambda x: x[0]
        ):
            run_distributed(_write_at_layout, 4, str(root), [it for _, it in group], tp, pp)

    built_once(Path(directory), build)
    return root
