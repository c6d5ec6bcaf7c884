"""Small real Megatron-Core GPT models for tests: built on whatever parallel state is current."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from wsm_megatron.runtime import cpu_compat


def tiny_gpt(
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    vocab_size: int = 128,
    seq_length: int = 16,
    params_dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> torch.nn.Module:
    """The model chunk of this rank's pipeline stage of a small GPT (local layer spec, no TE).

    With ``seed``, Megatron's model-parallel RNG is seeded first, so the weights are a function of
    the seed and the rank's position in the TP/PP grid.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=cpu_compat.is_active(),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="learned_absolute",
    )
    if not cpu_compat.is_active():
        model = model.cuda()
    return model


def _sharded_objects(tree: Any) -> list[Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if isinstance(tree, ShardedObject):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for v in tree.values() for t in _sharded_objects(v)]
    return []


def _sharded_tensors(tree: Any) -> list[Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(tree, ShardedTensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for v in tree.values() for t in _sharded_tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _sharded_tensors(v)]
    return []


def load_into_tiny_gpt(ckpt_dir: str, tp: int, pp: int) -> tuple[dict, list[tuple]]:
    """Start a ``tp`` x ``pp`` process group and load a checkpoint of ``tiny_gpt(bf16)`` the way
    Megatron-LM loads a merged one (``--no-load-optim --no-load-rng``: the model part); returns
    the loaded common state and this rank's ``(key, global offset, prepend axes, values)``."""
    from megatron.core import dist_checkpointing

    from wsm_megatron.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tp, pp))
    model = tiny_gpt(params_dtype=torch.bfloat16, seed=7)
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() or name.endswith("position_embeddings"):
            module.float()
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)
    model.load_state_dict(state.pop("model"))
    shards = [
        (sh.key, tuple(sh.global_offset), sh.prepend_axis_num, sh.data.detach().clone())
        for sh in _sharded_tensors(model.sharded_state_dict())
    ]
    return state, shards


def assert_shards_match(loaded: list[list[tuple]], tensors: dict[str, torch.Tensor]) -> None:
    """Every rank's loaded shard (from :func:`load_into_tiny_gpt`) equals its box of the global
    ``tensors``, and every floating tensor was loaded somewhere."""
    seen = set()
    for rank_shards in loaded:
        for key, offset, prepend, data in rank_shards:
            shape = (1,) * prepend + tuple(data.shape)
            box = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
            assert torch.equal(data, tensors[key][box].reshape(data.shape)), key
            seen.add(key)
    assert seen == {k for k, x in tensors.items() if x.dtype.is_floating_point}
