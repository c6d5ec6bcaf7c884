"""``model``: the GPT architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wsm_megatron.training.config.errors import ConfigError, _positive


@dataclass
class ModelConfig:
    """The GPT architecture (Megatron-LM argument names). ``num_experts`` makes it an MoE."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    kv_channels: int | None = None
    max_position_embeddings: int | None = None
    position_embedding_type: Literal["learned_absolute", "rope"] = "rope"
    rotary_base: int = 10000
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    swiglu: bool = False
    add_bias_linear: bool = True
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_layer_freq: int | list[int] = 1
    """MoE every N-th layer (from layer 0), or a 0/1 pattern over the layers (1: MoE)."""
    moe_aux_loss_coeff: float = 1e-3
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_token_dispatcher_type: Literal["allgather", "alltoall"] = "alltoall"
    moe_grouped_gemm: bool = False
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """``auto``: Transformer Engine when it is importable on a GPU, else the local spec."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation (Megatron-LM's ``--recompute-granularity``): ``selective``
    recomputes the attention core, ``full`` whole layers (with ``recompute_method``)."""
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    bias_activation_fusion: bool = False
    """Megatron's fused kernels (GPU only; Megatron-LM's ``--no-bias-gelu-fusion``... flags)."""
    bias_dropout_fusion: bool = False
    masked_softmax_fusion: bool = False
    apply_rope_fusion: bool = False
    cross_entropy_loss_fusion: bool = False
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 training through Transformer Engine (GPU only)."""

    def __post_init__(self) -> None:
        _positive(
            "model",
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.kv_channels,
            max_position_embeddings=self.max_position_embeddings,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
            num_experts=self.num_experts,
            moe_router_topk=self.moe_router_topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
        )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size: {self.hidden_size} is not divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}); set model.kv_channels"
            )
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_query_groups: {self.num_query_groups} does not divide "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.num_experts is None:
            moe_only = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
            for name in moe_only:
                if getattr(self, name) is not None:
                    raise ConfigError(f"model.{name}: needs model.num_experts (an MoE model)")
        elif self.moe_router_topk > self.num_experts:
            raise ConfigError(
                f"model.moe_router_topk: {self.moe_router_topk} exceeds "
                f"model.num_experts ({self.num_experts})"
            )
        if self.moe_shared_expert_intermediate_size and self.add_bias_linear:
            raise ConfigError(
                "model.moe_shared_expert_intermediate_size: Megatron's shared expert has no "
                "biases; set model.add_bias_linear=false"
            )
        self._check_recompute()
        freq = self.moe_layer_freq
        if isinstance(freq, int) and freq < 1:
            raise ConfigError(f"model.moe_layer_freq: must be >= 1, got {freq}")
        if isinstance(freq, list) and (len(freq) != self.num_layers or set(freq) - {0, 1}):
            raise ConfigError(
                f"model.moe_layer_freq: a pattern needs one 0 (dense) or 1 (MoE) per layer "
                f"({self.num_layers}), got {freq}"
            )

    def _check_recompute(self) -> None:
        full = self.recompute_granularity == "full"
        if full and (self.recompute_method is None or self.recompute_num_layers is None):
            raise ConfigError(
                "model.recompute_granularity: 'full' needs model.recompute_method "
                "(uniform or block) and model.recompute_num_layers"
            )
        if not full and (self.recompute_method or self.recompute_num_layers):
            raise ConfigError(
                "model.recompute_method: applies to recompute_granularity 'full' only"
            )
        if full and not 0 < self.recompute_num_layers <= self.num_layers:
            raise ConfigError(
                f"model.recompute_num_layers: must be in 1..{self.num_layers} (num_layers), "
                f"got {self.recompute_num_layers}"
            )

    @property
    def fused_kernels(self) -> list[str]:
        """The fusion switches that are on."""
        names = (
            "bias_activation_fusion",
            "bias_dropout_fusion",
            "masked_softmax_fusion",
            "apply_rope_fusion",
            "cross_entropy_loss_fusion",
        )
        return [n for n in names if getattr(self, n)]

    @property
    def ffn_size(self) -> int:
        """``ffn_hidden_size``, or Megatron-LM's default for it: ``4h``, and with SwiGLU
        ``int(8h/3/64)*64`` (the gated MLP's two input projections keep its parameters near
        ``4h``'s, rounded down to a multiple of 64)."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return int((4 * self.hidden_size * 2 / 3) / 64) * 64
        return 4 * self.hidden_size

    @property
    def moe_expert_ffn_size(self) -> int:
        """An expert's width: ``moe_ffn_hidden_size``, else :attr:`ffn_size` (Megatron-LM)."""
        return self.moe_ffn_hidden_size or self.ffn_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def moe_layers(self) -> list[bool]:
        """Which layers are MoE layers (Megatron's reading of ``moe_layer_freq``)."""
        if not self.is_moe:
            return [False] * self.num_layers
        if isinstance(self.moe_layer_freq, list):
            return [bool(x) for x in self.moe_layer_freq]
        return [i % self.moe_layer_freq == 0 for i in range(self.num_layers)]
