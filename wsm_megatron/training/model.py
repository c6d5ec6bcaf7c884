"""Build this rank's GPTModel chunks from a :class:`ModelConfig` on the current parallel state.

One chunk per rank, or ``parallel.virtual_pipeline_model_parallel_size`` chunks with the
interleaved pipeline (chunk ``i`` holds virtual stage ``i``: Megatron's ``vp_stage``).

Layer spec: Transformer Engine's when it is importable and a GPU is present (or when asked for),
Megatron-Core's local spec otherwise (always on CPU). Dense and MoE models (MoE layers every
``moe_layer_freq`` layers, shared expert optional) go through Megatron's own block-spec helper.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import param_is_not_shared

from wsm_megatron.runtime import cpu_compat
from wsm_megatron.training.config import ModelConfig, WSMConfig, context_parallel_needs_te


def padded_vocab_size(vocab_size: int, config: WSMConfig) -> int:
    """Megatron-LM's padding: a multiple of ``make_vocab_size_divisible_by`` x TP size."""
    return config.padded_vocab_size(vocab_size)


def use_transformer_engine(config: WSMConfig) -> bool:
    """Whether the Transformer Engine layer spec is used (never on CPU)."""
    impl = config.model.transformer_impl
    have_te = importlib.util.find_spec("transformer_engine") is not None
    if impl == "transformer_engine":
        if cpu_compat.is_active() or not have_te:
            raise ValueError(
                "model.transformer_impl: 'transformer_engine' needs a GPU and the "
                "transformer_engine package; use 'auto' or 'local'"
            )
        return True
    return impl == "auto" and have_te and not cpu_compat.is_active()


def check_gpu_features(config: WSMConfig, transformer_engine: bool) -> None:
    """Fused kernels need a GPU; FP8, context parallelism and TP communication overlap
    Transformer Engine layers: one clear error otherwise."""
    m, p = config.model, config.parallel
    if p.context_parallel_size > 1 and not transformer_engine:
        raise ValueError(context_parallel_needs_te())
    if p.tp_comm_overlap and cpu_compat.is_active():
        raise ValueError("parallel.tp_comm_overlap: needs a GPU (Transformer Engine userbuffers)")
    if p.tp_comm_overlap and not transformer_engine:
        raise ValueError(
            "parallel.tp_comm_overlap: needs Transformer Engine layers "
            "(model.transformer_impl transformer_engine or auto with transformer_engine installed)"
        )
    if p.sequence_parallel and not transformer_engine and not _local_norm_splits_sequence(m):
        raise ValueError(
            "parallel.sequence_parallel: the local layer spec normalises with torch's "
            f"{m.normalization} here (apex's FusedLayerNorm: LayerNorm only, when installed), "
            "which megatron-core does not run with sequence parallelism; use Transformer "
            "Engine layers (a GPU) or parallel.sequence_parallel=false"
        )
    if m.fused_kernels and cpu_compat.is_active():
        raise ValueError(f"model.{m.fused_kernels[0]}: Megatron's fused kernels need a GPU")
    if m.fp8 is not None and not transformer_engine:
        raise ValueError(
            "model.fp8: FP8 training needs Transformer Engine layers on a GPU "
            "(model.transformer_impl=transformer_engine or auto with transformer_engine installed)"
        )


def _local_norm_splits_sequence(m: ModelConfig) -> bool:
    """Whether the local spec's norm supports sequence parallelism: only apex's LayerNorm."""
    return m.normalization == "LayerNorm" and importlib.util.find_spec("apex") is not None


def mixed_precision(config: WSMConfig) -> bool:
    """bf16 training: asked for and on a GPU (the CPU path is fp32)."""
    return config.train.bf16 and not cpu_compat.is_active()


def transformer_config(config: WSMConfig) -> TransformerConfig:
    """Megatron-Core's TransformerConfig for ``config`` on the current parallel state."""
    m, p = config.model, config.parallel
    bf16 = mixed_precision(config)
    dtype = torch.bfloat16 if bf16 else torch.float32
    moe = {}
    if m.is_moe:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_expert_ffn_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_layer_freq=m.moe_layer_freq,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_router_score_function=m.moe_router_score_function,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_grouped_gemm=m.moe_grouped_gemm,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=m.add_bias_linear,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        tp_comm_overlap=p.tp_comm_overlap,
        expert_model_parallel_size=p.expert_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        use_cpu_initialization=cpu_compat.is_active(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        bias_activation_fusion=m.bias_activation_fusion,
        bias_dropout_fusion=m.bias_dropout_fusion,
        masked_softmax_fusion=m.masked_softmax_fusion,
        apply_rope_fusion=m.apply_rope_fusion,
        cross_entropy_loss_fusion=m.cross_entropy_loss_fusion,
        fp8=m.fp8,
        calculate_per_token_loss=True,  # Megatron-LM: normalise by the global token count
        **moe,
    )


@dataclass(frozen=True)
class BuiltModel:
    """This rank's model chunks (one per virtual pipeline stage) and what they were built from."""

    chunks: list[GPTModel]
    config: TransformerConfig
    vocab_size: int
    """The padded vocabulary size (the embedding's global rows)."""
    transformer_engine: bool

    @property
    def module(self) -> GPTModel:
        """The model of a rank without interleaving (its only chunk)."""
        assert len(self.chunks) == 1, "an interleaved pipeline has several chunks"
        return self.chunks[0]


def _moe_router_without_te() -> None:
    """megatron-core 0.16.1's MoE router reads ``te_general_gemm`` even when Transformer Engine
    is not installed (a NameError); defined as None, the router takes its plain matmul path."""
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def initialize_tp_communicators(config: WSMConfig) -> None:
    """Transformer Engine's userbuffers for ``tp_comm_overlap``, as Megatron-LM sets them up
    (default configuration, the activation shape of one microbatch). GPU only."""
    from transformer_engine.pytorch.module import base as te_base

    p = config.parallel
    shape = [
        config.seq_length * config.train.micro_batch_size // p.context_parallel_size,
        config.model.hidden_size,
    ]
    fp8 = config.model.fp8 is not None
    if hasattr(te_base, "UserBufferQuantizationMode"):  # Transformer Engine >= 2.7
        mode = te_base.UserBufferQuantizationMode
        modes = [mode.FP8 if fp8 else mode.NONE]
        te_base.initialize_ub(
            shape=shape, tp_size=p.tensor_model_parallel_size, quantization_modes=modes
        )
    else:
        te_base.initialize_ub(shape=shape, tp_size=p.tensor_model_parallel_size, use_fp8=fp8)


def _layer_spec(
    config: WSMConfig, tconfig: TransformerConfig, te: bool, vp_stage: int | None
) -> Any:
    """The layer spec, or for an MoE the block spec of the chunk's layers."""
    m = config.model
    if m.is_moe:
        return get_gpt_decoder_block_spec(
            tconfig, use_transformer_engine=te, normalization=m.normalization, vp_stage=vp_stage
        )
    if te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=m.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=m.qk_layernorm, normalization=m.normalization)


def build_model(config: WSMConfig, vocab_size: int) -> BuiltModel:
    """This rank's pipeline stage(s) of the GPT, on the device, before DDP wrapping."""
    te = use_transformer_engine(config)
    check_gpu_features(config, te)
    tconfig = transformer_config(config)
    if config.parallel.tp_comm_overlap:
        initialize_tp_communicators(config)
    m = config.model
    if m.is_moe:
        if cpu_compat.is_active() and m.moe_token_dispatcher_type == "alltoall":
            raise ValueError(
                "model.moe_token_dispatcher_type: 'alltoall' needs CUDA streams; "
                "use 'allgather' on CPU"
            )
        _moe_router_without_te()
    padded = padded_vocab_size(vocab_size, config)
    interleaved = config.parallel.virtual_pipeline_model_parallel_size is not None
    chunks = []
    for i in range(config.parallel.model_chunks):
        vp_stage = i if interleaved else None
        module = GPTModel(
            config=tconfig,
            transformer_layer_spec=_layer_spec(config, tconfig, te, vp_stage),
            vocab_size=padded,
            max_sequence_length=m.max_position_embeddings or config.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(False, vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(False, vp_stage),
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type,
            rotary_base=m.rotary_base,
            vp_stage=vp_stage,
        )
        if not cpu_compat.is_active():
            module = module.cuda(torch.cuda.current_device())
        chunks.append(module)
    return BuiltModel(chunks, tconfig, padded, te)


def count_parameters(module: torch.nn.Module) -> int:
    """This rank's share of the model's parameters: summed over the model-parallel group, each
    parameter counts once (TP-replicated norms on TP rank 0, a tied output layer once)."""
    return sum(
        p.numel()
        for p in module.parameters()
        if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)
    )
