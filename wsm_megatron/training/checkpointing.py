"""Save, resume and load ``torch_dist`` checkpoints in Megatron-LM's layout and key structure.

``ROOT/iter_0000100/`` holds what Megatron-LM's ``save_checkpoint`` writes with
``--ckpt-format torch_dist``: top-level ``args`` (a Namespace with ``seq_length``,
``global_batch_size``, the parallel sizes, ``consumed_train_samples``, ...), ``checkpoint_version``
3.0, ``iteration``, ``model`` (the unwrapped model's sharded state dict), ``optimizer``,
``opt_param_scheduler``, ``rng_state`` (a ShardedObject over the (PP, TP) grid) and
``num_floating_point_operations_so_far``. ``ROOT/latest_checkpointed_iteration.txt`` is updated
only after every rank finished writing. So Megatron-LM (``--load``, ``--no-load-optim``...) and
``wsm-merge`` read these checkpoints, and a merged (model-only) checkpoint loads back here.

Resuming restores the model, optimizer, LR scheduler, RNG states (Python, NumPy, torch, the
model-parallel tracker) and the data position (consumed samples); on CPU a resumed run matches an
uninterrupted one bitwise. Saves are asynchronous on GPU (``checkpoint.async_save``; it works
on CPU too, where the forked writer holds a copy-on-write snapshot of the weights).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import random
import time
from argparse import Namespace
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
    load_sharded_metadata,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from wsm_megatron import integrity
from wsm_megatron.integrity import record_integrity, verify_checkpoint
from wsm_megatron.layout import (
    STOP_SAVE_FILENAME,
    TRACKER_FILENAME,
    is_complete,
    iteration_dir,
    list_iterations,
    parse_iteration_dirname,
    read_tracker,
    write_tracker,
)
from wsm_megatron.runtime import cpu_compat, decided_on_rank0
from wsm_megatron.runtime.distributed import first_on_any_rank
from wsm_megatron.training.config import WSMConfig
from wsm_megatron.training.optimizer import TrainState, params_synced
from wsm_megatron.training.retention import BackgroundPruner
from wsm_megatron.training.schedules import MEGATRON_DECAY_STYLE

CHECKPOINT_VERSION = 3.0


def _async_strategy_kwargs() -> dict[str, str]:
    """``dist_checkpointing.save``'s ``async_strategy`` where it exists (megatron-core >= 0.17).

    Its default there, ``"nvrx"``, needs nvidia-resiliency-ext; without it the built-in
    ``"mcore"`` writer (the only one older versions have) is used.
    """
    if "async_strategy" not in inspect.signature(dist_checkpointing.save).parameters:
        return {}
    nvrx = importlib.util.find_spec("nvidia_resiliency_ext") is not None
    return {"async_strategy": "nvrx" if nvrx else "mcore"}


@dataclass
class Progress:
    """Where training stands; what a checkpoint records besides the weights."""

    iteration: int = 0
    consumed_train_samples: int = 0
    floating_point_operations: float = 0.0


def resolve_checkpoint(path: str | Path) -> tuple[Path, int]:
    """``(iteration directory, iteration)`` for a checkpoint root (tracker) or ``iter_*`` dir."""
    path = Path(path)
    tracker = read_tracker(path)
    if tracker is not None:
        return iteration_dir(path, tracker), tracker
    iteration = parse_iteration_dirname(path.name)
    if iteration is not None and (path / "metadata.json").is_file():
        return path, iteration
    raise ValueError(
        f"{str(path)!r} is neither a checkpoint root with latest_checkpointed_iteration.txt "
        "nor a complete iter_XXXXXXX directory"
    )


def resume_checkpoint(config: WSMConfig) -> tuple[Path, int] | None:
    """``(iteration directory, iteration)`` a run resumes from, or None for a fresh start,
    decided on rank 0 from its view of the file system (:func:`_find_resume_checkpoint`)."""
    return decided_on_rank0(lambda: _find_resume_checkpoint(config))


def choose_resume_checkpoint(config: WSMConfig, say: Any = print) -> tuple[Path, int] | None:
    """:func:`resume_checkpoint`, verified: a damaged checkpoint is named in one line and, with
    ``checkpoint.on_damage: fallback`` (and no ``load_iteration`` asked for), the newest older
    complete checkpoint that verifies is taken instead, the damaged one renamed aside when it
    lies in ``checkpoint.save``."""
    c = config.checkpoint
    found = resume_checkpoint(config)
    while found is not None:
        ckpt_dir, iteration = found
        problem = verify_checkpoint(ckpt_dir)
        if problem is None:
            return found
        line = f"checkpoint: iteration {iteration} is damaged: {problem}"
        if c.on_damage == "stop" or c.load_iteration is not None:
            raise ValueError(f"{line} (checkpoint.on_damage: {c.on_damage})")
        found = decided_on_rank0(partial(_set_aside_and_fall_back, config, iteration))
        where = "nothing older verifies" if found is None else f"iteration {found[1]}"
        say(f"  WARNING: {line}; falling back to {where} (checkpoint.on_damage: fallback)")
        if found is None:
            raise ValueError(f"{line}; no older complete checkpoint under {c.load_dir}")
    return None


def _set_aside_and_fall_back(config: WSMConfig, damaged: int) -> tuple[Path, int] | None:
    """On rank 0: rename a damaged checkpoint of ``checkpoint.save`` out of the ``iter_*``
    namespace (kept, never deleted) and name the next older complete checkpoint."""
    c = config.checkpoint
    root = Path(c.load_dir)
    path = iteration_dir(root, damaged)
    if c.save is not None and root.resolve() == Path(c.save).resolve() and path.is_dir():
        os.replace(path, root / f"{path.name}.damaged-{int(time.time())}")
    older = [it for it in list_iterations(root) if it < damaged and is_complete(root, it)]
    return (iteration_dir(root, older[-1]), older[-1]) if older else None


def recover_roots(config: WSMConfig) -> None:
    """Before resuming, on rank 0: remove what killed writes left in the run's folders (tracker
    temporary files; in ``merge.save_dir`` the temporary folders of unfinished merged saves,
    and a merged model moved aside by an unfinished replacement put back)."""
    from wsm_megatron.merge.writer import recover_output_root

    if dist.get_rank() == 0:
        for root in (config.checkpoint.save, config.merge.save_dir):
            if root is not None and Path(root).is_dir():
                for tmp in Path(root).glob(f".{TRACKER_FILENAME}.*.tmp"):
                    tmp.unlink(missing_ok=True)
        if config.merge.save_dir is not None:
            recover_output_root(Path(config.merge.save_dir))
    dist.barrier()


def _find_resume_checkpoint(config: WSMConfig) -> tuple[Path, int] | None:
    """``checkpoint.load_iteration`` of ``checkpoint.load`` (default ``save``), else the tracker's.

    An explicit ``checkpoint.load`` without a checkpoint is an error (a branch must not silently
    start from scratch), and so is a ``load_iteration`` that is not a complete checkpoint, or
    one older than the newest in ``save`` when ``load`` is ``save`` (training on would overwrite
    the newer checkpoints).
    """
    c = config.checkpoint
    root = c.load_dir
    if root is None:
        return None
    tracker = read_tracker(root)
    if c.load_iteration is not None:
        ckpt_dir = iteration_dir(root, c.load_iteration)
        if not (ckpt_dir / "metadata.json").is_file():
            raise ValueError(
                f"checkpoint.load_iteration: {ckpt_dir} is not a complete checkpoint "
                f"(iterations under {root}: {list_iterations(root)})"
            )
        newer = [it for it in list_iterations(root) if it > c.load_iteration]
        if newer and Path(root).resolve() == Path(c.save or root).resolve():
            raise ValueError(
                f"checkpoint.load_iteration: {c.load_iteration} is older than {newer} in "
                f"checkpoint.save ({root}); save the branch elsewhere (checkpoint.save=DIR "
                f"checkpoint.load={root})"
            )
        return ckpt_dir, c.load_iteration
    if tracker is None and not (Path(root) / "metadata.json").is_file():
        if c.load is not None and c.load != c.save:
            raise ValueError(f"checkpoint.load: no checkpoint found in {root!r}")
        return None
    return resolve_checkpoint(root)


def save_due(config: WSMConfig, progress: Progress, samples_this_iteration: int) -> bool:
    """Whether the iteration just finished ends a save interval (iterations, or tokens: the
    consumed tokens crossed a multiple of ``save_interval_tokens``)."""
    c = config.checkpoint
    if c.save is None:
        return False
    if c.save_interval is not None:
        return progress.iteration % c.save_interval == 0
    if c.save_interval_tokens is not None:
        after = progress.consumed_train_samples * config.seq_length
        before = (progress.consumed_train_samples - samples_this_iteration) * config.seq_length
        return after // c.save_interval_tokens > before // c.save_interval_tokens
    return False


def checkpoint_args(
    config: WSMConfig,
    progress: Progress,
    *,
    vocab_size: int,
    padded_vocab_size: int,
    state: TrainState,
) -> Namespace:
    """The ``args`` Namespace Megatron-LM stores, under Megatron-LM's argument names (the
    optimizer and DDP settings as ``state`` runs them)."""
    m, p, t, c = config.model, config.parallel, config.train, config.checkpoint
    world = dist.get_world_size()
    return Namespace(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        group_query_attention=m.num_query_groups is not None,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.kv_channels or m.hidden_size // m.num_attention_heads,
        seq_length=config.seq_length,
        max_position_embeddings=m.max_position_embeddings or config.seq_length,
        position_embedding_type=m.position_embedding_type,
        add_position_embedding=m.position_embedding_type == "learned_absolute",
        use_rotary_position_embeddings=m.position_embedding_type == "rope",
        rotary_base=m.rotary_base,
        rotary_percent=1.0,
        rotary_interleaved=False,
        normalization=m.normalization,
        apply_layernorm_1p=False,
        apply_query_key_layer_scaling=False,
        squared_relu=False,
        add_qkv_bias=m.add_bias_linear,
        spec=None,
        swiglu=m.swiglu,
        add_bias_linear=m.add_bias_linear,
        qk_layernorm=m.qk_layernorm,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size,
        num_experts=m.num_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_layer_freq=m.moe_layer_freq,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_router_load_balancing_type=m.moe_router_load_balancing_type,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=False,
        moe_router_topk_scaling_factor=None,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_grouped_gemm=m.moe_grouped_gemm,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        world_size=world,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        use_distributed_optimizer=state.distributed_optimizer,
        overlap_grad_reduce=bucket_layout(state) is not None,
        ddp_bucket_size=bucket_layout(state),
        overlap_param_gather=state.overlap_param_gather,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        train_iters=t.train_iters,
        lr=t.lr,
        min_lr=t.min_lr,
        lr_decay_style=MEGATRON_DECAY_STYLE[t.lr_schedule],
        lr_warmup_iters=t.lr_warmup_iters,
        lr_warmup_init=t.lr_warmup_init,
        lr_decay_iters=t.decay_iters,
        lr_wsd_decay_style=t.lr_wsd_decay_style,
        lr_wsd_decay_iters=t.lr_wsd_decay_iters,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16 and not cpu_compat.is_active(),
        fp16=False,
        seed=t.seed,
        save=c.save,
        load=c.load_dir,
        save_interval=c.save_interval,
        ckpt_format="torch_dist",
        use_dist_ckpt=True,
        ckpt_fully_parallel_save=True,
        async_save=bool(c.async_save) if c.async_save is not None else not cpu_compat.is_active(),
        no_save_optim=False,
        no_save_rng=False,
        tokenizer_type=getattr(config.data.tokenizer, "type", "SentencePieceTokenizer"),
        tokenizer_model=config.data.tokenizer_model,
        vocab_file=config.data.vocab_file,
        merge_file=config.data.merge_file,
        iteration=progress.iteration,
        consumed_train_samples=progress.consumed_train_samples,
        skipped_train_samples=0,
        consumed_valid_samples=0,
        wsm_config=config.to_dict(),
    )


def _rng_state() -> ShardedObject:
    """This rank's RNG states as Megatron-LM saves them (one entry; DP replicas agree)."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        [state],
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        ),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _set_rng_state(states: list[dict[str, Any]]) -> None:
    state = states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _forget_completion(ckpt_dir: Path) -> None:
    """Remove the files that mark ``ckpt_dir`` complete (before writing into it again), and
    a stop-save mark of an earlier save of the same iteration."""
    for name in (integrity.INTEGRITY_FILENAME, "metadata.json", ".metadata", STOP_SAVE_FILENAME):
        (ckpt_dir / name).unlink(missing_ok=True)


def _content_metadata(
    distributed_optimizer: bool, optimizer_format: str | None, saved: dict | None = None
) -> dict[str, Any]:
    """What Megatron-LM's ``_build_sharded_state_dict_metadata`` passes to sharded_state_dict:
    for a save, ours (``checkpoint.optimizer_format``); for a load, the checkpoint's ``saved``
    content metadata (its optimizer format, as Megatron-LM reads it).

    megatron-core 0.16 has no bucket-independent format that gathers nothing:
    ``fully_sharded_model_space`` is refused by its own validation (``flattened_range``), and
    ``fully_reshardable`` gathers (right for several buckets only with
    :func:`~wsm_megatron.training.optimizer.fix_fully_reshardable_offsets`)."""
    if saved is not None:
        metadata = dict(saved)
    else:
        metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
        if distributed_optimizer:
            metadata["distrib_optim_sharding_type"] = optimizer_format
            if optimizer_format == "fully_reshardable":  # over gloo into host memory
                metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _serializable(metadata: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != "dp_cp_group"}


def model_sharded_state_dict(model: list[torch.nn.Module], metadata: dict | None = None) -> dict:
    """``{"model": ...}`` (or ``model0``, ``model1``... for virtual pipeline chunks)."""
    chunks = unwrap_model(model)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": c.sharded_state_dict(metadata=metadata) for i, c in enumerate(chunks)}


def model_shapes(model: list[torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor the model loads, by checkpoint key."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sharded = model_sharded_state_dict(model)
    return {
        sh.key: tuple(sh.global_shape)
        for sh in nested_values(sharded)
        if isinstance(sh, ShardedTensor)
    }


def model_mismatch(shapes: dict[str, tuple[int, ...]], ckpt_dir: str | Path) -> str | None:
    """The first of ``shapes`` (:func:`model_shapes`) that the checkpoint lacks or holds at
    another shape, in words; None when the checkpoint fits the model."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    for key, shape in shapes.items():
        md = saved.get(key)
        if md is None:
            return f"the model's {key} is not in the checkpoint"
        if tuple(getattr(md, "size", ())) != shape:
            return f"{key} is {tuple(md.size)} in the checkpoint and {shape} in the model"
    return None


LR_BOUNDS = ("max_lr", "min_lr")
"""The param-group keys megatron-core's scheduler reads its LR range from."""


def load_optimizer_keeping_lr_bounds(optimizer: Any, state: dict[str, Any]) -> None:
    """Load the optimizer's state but keep its param groups' LR range as the configuration
    built it: megatron-core's ``load_state_dict`` restores the saved groups' ``max_lr`` and
    ``min_lr``, and its scheduler prefers those to its own, so a branch from a checkpoint
    with another ``train.lr`` or ``train.min_lr`` (a decay to a new floor) would silently
    follow the old range. The configuration decides the schedule (see ``schedules``)."""
    bounds = [{k: g[k] for k in LR_BOUNDS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    groups = optimizer.param_groups
    assert len(groups) == len(bounds), "the checkpoint's param groups differ from the model's"
    for group, kept in zip(groups, bounds, strict=True):
        group.update(kept)


def _load_model_state(model: list[torch.nn.Module], loaded: dict[str, Any]) -> None:
    chunks = unwrap_model(model)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])


def fully_parallel_load_strategy(ckpt_dir: str | Path) -> Any:
    """Megatron's fully parallel load over the DP x CP group (``--ckpt-fully-parallel-load``):
    each replica reads a share of the shards and they exchange them, so a checkpoint's bytes
    are read once per data-parallel group, not once per replica. None without replicas."""
    if not dist.is_initialized():
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) == 1:
        return None
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(ckpt_dir)), group)


def load_model_only(
    model: list[torch.nn.Module], path: str | Path, *, verified: bool = False
) -> int:
    """Load just the weights (``--no-load-optim --no-load-rng``), e.g. a merged checkpoint,
    read once per data-parallel group (:func:`fully_parallel_load_strategy`), after checking
    its files (:func:`verify_checkpoint`; skipped when the caller already did: ``verified``).

    ``path`` is a checkpoint root or an ``iter_*`` directory; returns its iteration.
    """
    ckpt_dir, iteration = resolve_checkpoint(path)
    if not verified:
        problem = verify_checkpoint(ckpt_dir)
        if problem is not None:
            raise ValueError(f"checkpoint {ckpt_dir} is damaged: {problem}")
    sharded = model_sharded_state_dict(model)
    loaded = dist_checkpointing.load(
        sharded,
        str(ckpt_dir),
        fully_parallel_load_strategy(ckpt_dir),
        strict=StrictHandling.ASSUME_OK_UNEXPECTED,
    )
    _load_model_state(model, loaded)
    return iteration


def bucket_layout(state: TrainState) -> int | None:
    """The DDP bucket size the run's distributed optimizer state is keyed by (None: one
    bucket, as without ``overlap_grad_reduce``)."""
    return state.model[0].ddp_config.bucket_size


def check_bucket_layout(
    ckpt_dir: Path, common: dict[str, Any], saved_metadata: dict | None, state: TrainState
) -> None:
    """One clear line, before megatron-core's bare assertion, when the checkpoint's
    bucket-keyed (``dp_reshardable``) optimizer state was saved under another bucket layout."""
    if (saved_metadata or {}).get("distrib_optim_sharding_type") != "dp_reshardable":
        return
    args = common.get("args")
    saved_overlap = getattr(args, "overlap_grad_reduce", None)
    if saved_overlap is None:  # not recorded: megatron-core checks the sizes itself
        return
    saved = getattr(args, "ddp_bucket_size", None) if saved_overlap else None
    here = bucket_layout(state)
    if saved == here:
        return

    def describe(size: int | None) -> str:
        return "one bucket" if size is None else f"buckets of {size} parameters"

    raise ValueError(
        f"checkpoint.no_load_optim: the optimizer state of {ckpt_dir} is keyed by DDP bucket "
        f"(dp_reshardable) and was saved with {describe(saved)} "
        f"(overlap_grad_reduce={saved_overlap}); this run has {describe(here)}: set "
        f"parallel.overlap_grad_reduce={saved_overlap} as it was saved, or "
        "checkpoint.no_load_optim=true to start the optimizer afresh (checkpoint."
        "optimizer_format=fully_reshardable saves state that any bucket layout resumes)"
    )


def _allocate_optimizer_state(optimizer: Any) -> None:
    """Adam's state allocated before a load fills it: torch's Adam (no TE or apex) creates it
    at the first step, and megatron-core's distributed optimizer cannot describe its state
    without it. megatron-core's own dummy step (zero gradients), as its FSDP path does."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


class Checkpointer:
    """Saves (every interval, asynchronously on GPU), prunes and resumes one training run."""

    def __init__(
        self,
        config: WSMConfig,
        state: TrainState,
        scheduler: OptimizerParamScheduler,
        *,
        vocab_size: int,
        padded_vocab_size: int,
    ) -> None:
        self.config = config
        self.state = state
        self.scheduler = scheduler
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        async_save = config.checkpoint.async_save
        self.async_save = not cpu_compat.is_active() if async_save is None else async_save
        self.queue = AsyncCallsQueue() if self.async_save else None
        self.metadata = _content_metadata(
            state.distributed_optimizer, config.checkpoint.optimizer_format
        )
        self.last_saved: int | None = None
        self._save_strategies: dict[str, Any] = {}
        self.pruner = BackgroundPruner()

    def due(self, progress: Progress, samples_this_iteration: int) -> bool:
        """Whether the iteration just finished crosses a save interval."""
        return save_due(self.config, progress, samples_this_iteration)

    # ------------------------------------------------------------------ state dicts
    def _state_dict(
        self,
        progress: Progress,
        *,
        optimizer: bool,
        rng: bool,
        loading: bool,
        metadata: dict[str, Any] | None = None,
    ) -> dict:
        """The state dict a save writes (or a load fills), sharded with ``metadata``
        (default: this run's)."""
        metadata = self.metadata if metadata is None else metadata
        state_dict: dict[str, Any] = {
            "args": checkpoint_args(
                self.config,
                progress,
                vocab_size=self.vocab_size,
                padded_vocab_size=self.padded_vocab_size,
                state=self.state,
            ),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": progress.iteration,
        }
        state_dict.update(model_sharded_state_dict(self.state.model, metadata))
        if optimizer:
            state_dict["optimizer"] = self.state.optimizer.sharded_state_dict(
                state_dict, is_loading=loading, metadata=metadata
            )
            state_dict["opt_param_scheduler"] = self.scheduler.state_dict()
        if rng:
            state_dict["rng_state"] = _rng_state()
        state_dict["num_floating_point_operations_so_far"] = progress.floating_point_operations
        return state_dict

    # ------------------------------------------------------------------ save
    def save(self, progress: Progress, *, stop_reason: str | None = None) -> None:
        """Write ``iter_XXXXXXX`` for ``progress.iteration``; tracker and pruning follow it.

        With ``stop_reason`` (the run stops: a signal, the time budget) the save is synchronous,
        after every async save in flight has completed, and marked as a stop save
        (:data:`~wsm_megatron.layout.STOP_SAVE_FILENAME`)."""
        root = Path(self.config.checkpoint.save)
        ckpt_dir = iteration_dir(root, progress.iteration)
        if stop_reason is not None:
            self.finalize(blocking=True)
        if dist.get_rank() == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _forget_completion(ckpt_dir)  # a torn re-save must not look complete
            if stop_reason is not None:
                mark = {"iteration": progress.iteration, "reason": stop_reason}
                (ckpt_dir / STOP_SAVE_FILENAME).write_text(json.dumps(mark) + "\n")
        dist.barrier()
        iteration = progress.iteration

        def finalize() -> None:
            record_integrity(ckpt_dir)
            if dist.get_rank() == 0:
                write_tracker(root, iteration)
                self._prune(root)

        with params_synced(self.state):
            state_dict = self._state_dict(progress, optimizer=True, rng=True, loading=False)
            self._write(
                state_dict, ckpt_dir, finalize, "training", blocking=stop_reason is not None
            )
        self.last_saved = iteration

    def save_merged(self, progress: Progress, root: str | Path, info: dict[str, Any]) -> None:
        """Write the model's current (merged) values as a model-only checkpoint
        ``root/iter_<progress.iteration>`` in ``wsm-merge``'s output format: the common state
        with provenance, ``merge_info.json`` (``info``), built in a temporary directory and
        published atomically, tracker last. Asynchronous when saves are."""
        from wsm_megatron.merge.contents import ContentPolicy
        from wsm_megatron.merge.provenance import provenance
        from wsm_megatron.merge.writer import MERGE_INFO_FILENAME, make_tmp_dir, publish, write_json

        root = Path(root)
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            box[0] = make_tmp_dir(root, progress.iteration)
        dist.broadcast_object_list(box, src=0)
        tmp_dir: Path = box[0]
        state_dict = self._state_dict(progress, optimizer=False, rng=False, loading=False)
        common = {k: v for k, v in state_dict.items() if not k.startswith("model")}
        state_dict = {
            **ContentPolicy().common_state(common, provenance(info)),
            **{k: v for k, v in state_dict.items() if k.startswith("model")},
        }

        def finalize() -> None:
            if dist.get_rank() == 0:
                write_json(tmp_dir / MERGE_INFO_FILENAME, info)
            record_integrity(tmp_dir)
            if dist.get_rank() == 0:
                publish(tmp_dir, root, progress.iteration, overwrite=True)
                m = self.config.merge
                if m.keep_last or m.keep_every:  # merged models' own retention
                    self.pruner.submit(root, m.keep_last or 10**9, m.keep_every)

        with params_synced(self.state):
            self._write(state_dict, tmp_dir, finalize, "merged")

    def _write(
        self, state_dict: dict, ckpt_dir: Path, finalize: Any, kind: str, blocking: bool = False
    ) -> None:
        """``dist_checkpointing.save`` into ``ckpt_dir``, then ``finalize`` once every rank
        has written (in the background with async saves, unless ``blocking``)."""
        background = self.async_save and not blocking
        try:
            request = dist_checkpointing.save(
                state_dict,
                str(ckpt_dir),
                self._strategy(kind),
                async_sharded_save=background,
                content_metadata=_serializable(self.metadata),
                **(_async_strategy_kwargs() if background else {}),
            )
        except (Exception, CheckpointException) as err:  # DCP's is a BaseException
            raise self._write_failed(ckpt_dir, err, kind) from None
        if background:
            request.add_finalize_fn(finalize)
            self.queue.schedule_async_request(request)
        else:
            dist.barrier()
            finalize()
            dist.barrier()

    def _write_failed(self, ckpt_dir: Path, err: BaseException, kind: str) -> BaseException:
        """One line for a save that the file system refused (no space, file too large,
        permission), with what is still intact; any other failure keeps its traceback.

        DCP raises a failed write on every rank together, with the cause only where it was
        seen: the ranks agree on it (one small all-gather)."""
        from wsm_megatron.merge.writer import os_error_of, refused_write, write_error

        cause = first_on_any_rank(os_error_of(err) or refused_write(ckpt_dir, err))
        if cause is None:
            return err
        tracker = read_tracker(self.config.checkpoint.save)
        intact = (
            "the training checkpoints are intact"
            if kind == "merged"
            else f"the newest complete checkpoint is iteration {tracker}"
            if tracker is not None
            else "no complete checkpoint exists yet"
        )
        key = "merge.save_dir" if kind == "merged" else "checkpoint.save"
        return ValueError(f"{key}: {write_error(ckpt_dir, cause)}; {intact}")

    def _strategy(self, kind: str) -> Any:
        """The save strategy of ``kind`` (``training`` or ``merged``): one each, because the
        fully parallel wrapper caches the split of the first state dict it saves, and a
        model-only save's split would leave the optimizer state unwritten."""
        if kind not in self._save_strategies:
            strategy = get_default_save_sharded_strategy()
            if parallel_state.get_data_parallel_world_size() > 1:
                strategy = FullyParallelSaveStrategyWrapper(
                    strategy,
                    parallel_state.get_data_parallel_group(with_context_parallel=True),
                    True,
                )
            self._save_strategies[kind] = strategy
        return self._save_strategies[kind]

    def _prune(self, root: Path) -> None:
        """Hand retention's deletions to the background worker (rank 0, after the tracker)."""
        keep = self.config.merge_quantity
        if keep is not None and self.config.checkpoint.prune:
            self.pruner.submit(root, keep, self.config.checkpoint.keep_every)

    def finalize(self, blocking: bool = False) -> None:
        """Complete finished async saves (all of them with ``blocking``, and retention's
        pending deletions)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
            if blocking:
                self.queue.close()
        if blocking:
            self.pruner.drain()

    # ------------------------------------------------------------------ resume
    def load(self, found: tuple[Path, int] | None) -> Progress | None:
        """Resume from ``found`` (:func:`choose_resume_checkpoint`); None: nothing to load."""
        c = self.config.checkpoint
        if found is None:
            return None
        ckpt_dir, _ = found
        common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
        load_optim = not (c.no_load_optim or c.finetune)
        load_rng = not (c.no_load_rng or c.finetune)
        if load_optim and "opt_param_scheduler" not in common:
            raise ValueError(
                f"{ckpt_dir} has no optimizer state (a merged or model-only checkpoint?); "
                "set checkpoint.no_load_optim=true (and no_load_rng=true) to load its weights"
            )
        if load_rng and "rng_state" not in common and not self._has_rng(ckpt_dir):
            raise ValueError(f"{ckpt_dir} has no RNG state; set checkpoint.no_load_rng=true")
        saved = Progress(
            iteration=int(common["iteration"]),
            consumed_train_samples=int(getattr(common["args"], "consumed_train_samples", 0)),
            floating_point_operations=float(
                common.get("num_floating_point_operations_so_far", 0.0)
            ),
        )
        saved_metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
        if load_optim and self.state.distributed_optimizer:
            check_bucket_layout(ckpt_dir, common, saved_metadata, self.state)
            _allocate_optimizer_state(self.state.optimizer)
        metadata = _content_metadata(self.state.distributed_optimizer, None, saved_metadata)
        template = self._state_dict(
            saved, optimizer=load_optim, rng=load_rng, loading=True, metadata=metadata
        )
        loaded = dist_checkpointing.load(
            template,
            str(ckpt_dir),
            fully_parallel_load_strategy(ckpt_dir),  # read once per data-parallel group
            strict=StrictHandling.ASSUME_OK_UNEXPECTED,
        )
        _load_model_state(self.state.model, loaded)
        if load_optim:
            load_optimizer_keeping_lr_bounds(self.state.optimizer, loaded["optimizer"])
            self.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        else:
            self.state.optimizer.reload_model_params()
        if load_rng:
            _set_rng_state(loaded["rng_state"])
        if c.finetune:
            return Progress()
        return saved

    @staticmethod
    def _has_rng(ckpt_dir: Path) -> bool:
        return any(key.startswith("rng_state") for key in load_sharded_metadata(str(ckpt_dir)))
