"""Megatron GPT -> transformers architectures: which one a model config maps to (or one line on
what does not map), its ``config.json``, and its tensors, a layer at a time.

- ``LlamaForCausalLM``: RoPE, RMSNorm, SwiGLU, no biases (GQA via ``num_query_groups``).
- ``MixtralForCausalLM``: the same attention, every layer an MoE of SwiGLU experts with a
  softmax router: Megatron's top-k of the logits, then softmax over them, is Mixtral's softmax,
  top-k and renormalisation.
- ``GPTNeoXForCausalLM``: RoPE (all of each head), LayerNorm, GeLU, biases, sequential
  residuals, multi-head attention only.

Megatron's ``linear_qkv`` rows come per query group: the group's query heads, then its key and
its value head; ``linear_fc1`` of a gated MLP is ``[gate; up]``. Saved checkpoints hold them
whole (TP-independent), so the split is the same for every layout. Weight names are the ones
transformers has always read (``embed_out``, ``block_sparse_moe.experts.N.w1``); transformers 5
renames them on load. Megatron's RoPE (``rotary_interleaved`` false) is rotate-half, as
transformers', and its norms' epsilon is TransformerConfig's default, 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer import TransformerConfig

from wsm_megatron.export.config import ExportError
from wsm_megatron.export.reader import Box, CheckpointReader
from wsm_megatron.training.config import ModelConfig

LLAMA, MIXTRAL, NEOX = "LlamaForCausalLM", "MixtralForCausalLM", "GPTNeoXForCausalLM"
LAYERNORM_EPS = TransformerConfig.__dataclass_fields__["layernorm_epsilon"].default
L = "decoder.layers."
KEYS: dict[str, tuple[str, ...]] = {  # a logical tensor: its checkpoint keys (local / TE specs)
    "in_norm.weight": (
        L + "self_attention.linear_qkv.layer_norm_weight",
        L + "input_layernorm.weight",
    ),
    "in_norm.bias": (L + "self_attention.linear_qkv.layer_norm_bias", L + "input_layernorm.bias"),
    "qkv.weight": (L + "self_attention.linear_qkv.weight",),
    "qkv.bias": (L + "self_attention.linear_qkv.bias",),
    "proj.weight": (L + "self_attention.linear_proj.weight",),
    "proj.bias": (L + "self_attention.linear_proj.bias",),
    "mlp_norm.weight": (L + "mlp.linear_fc1.layer_norm_weight", L + "pre_mlp_layernorm.weight"),
    "mlp_norm.bias": (L + "mlp.linear_fc1.layer_norm_bias", L + "pre_mlp_layernorm.bias"),
    "fc1.weight": (L + "mlp.linear_fc1.weight",),
    "fc1.bias": (L + "mlp.linear_fc1.bias",),
    "fc2.weight": (L + "mlp.linear_fc2.weight",),
    "fc2.bias": (L + "mlp.linear_fc2.bias",),
    "router.weight": (L + "mlp.router.weight",),
    "expert_fc1.weight": (L + "mlp.experts.experts.linear_fc1.weight",),
    "expert_fc2.weight": (L + "mlp.experts.experts.linear_fc2.weight",),
    "embedding": ("embedding.word_embeddings.weight",),
    "final_norm.weight": ("decoder.final_layernorm.weight",),
    "final_norm.bias": ("decoder.final_layernorm.bias",),
    "output": ("output_layer.weight",),
}
Tensors = dict[str, torch.Tensor]


def _mixtral_problems(m: ModelConfig) -> list[str]:
    return [
        *(["model.moe_shared_expert_intermediate_size (shared experts)"]
          if m.moe_shared_expert_intermediate_size else []),
        *(["model.moe_router_score_function sigmoid"]
          if m.moe_router_score_function != "softmax" else []),
        *([f"model.moe_layer_freq {m.moe_layer_freq} (dense layers)"]
          if not all(m.moe_layers) else []),
        *(["model.add_bias_linear true"] if m.add_bias_linear else []),
        *(["model.swiglu false"] if not m.swiglu else []),
        *(["model.normalization LayerNorm"] if m.normalization != "RMSNorm" else []),
    ]  # fmt: skip


def architecture(m: ModelConfig) -> str:
    """The transformers architecture ``m`` maps to exactly; ExportError (one line) if none."""
    common = [
        *([f"model.position_embedding_type {m.position_embedding_type}"]
          if m.position_embedding_type != "rope" else []),
        *(["model.qk_layernorm true"] if m.qk_layernorm else []),
    ]  # fmt: skip
    if m.is_moe:
        arch, problems = MIXTRAL, common + _mixtral_problems(m)
    elif m.normalization == "RMSNorm":
        arch, problems = (
            LLAMA,
            common
            + (
                (["model.add_bias_linear true"] if m.add_bias_linear else [])
                + (["a plain GeLU MLP (model.swiglu false)"] if not m.swiglu else [])
            ),
        )
    else:
        groups = m.num_query_groups or m.num_attention_heads
        arch, problems = NEOX, common + (
            (["model.swiglu true"] if m.swiglu else [])
            + (["model.add_bias_linear false"] if not m.add_bias_linear else [])
            + ([f"model.num_query_groups {groups} (GQA)"] if groups != m.num_attention_heads
               else [])
            + (["model.kv_channels != hidden_size / num_attention_heads"]
               if m.kv_channels and m.kv_channels * m.num_attention_heads != m.hidden_size
               else [])
        )  # fmt: skip
    if problems:
        raise ExportError(
            f"model: does not map to a transformers architecture: {m.normalization} "
            f"{'MoE' if m.is_moe else 'dense'} model, nearest {arch}, which has no "
            f"equivalent of: {', '.join(problems)}"
        )
    return arch


@dataclass(frozen=True)
class Unit:
    """Checkpoint boxes read together (named), and the transformers tensors made of them."""

    boxes: dict[str, Box]
    convert: Callable[[Tensors], list[tuple[str, torch.Tensor]]]


class HFMapping:
    """One model config, checked against one checkpoint, as a transformers model."""

    def __init__(self, m: ModelConfig, reader: CheckpointReader, max_positions: int) -> None:
        self.m, self.reader, self.max_positions = m, reader, max_positions
        self.architecture = architecture(m)
        self.heads = m.num_attention_heads
        self.groups = m.num_query_groups or m.num_attention_heads
        self.head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        self.vocab_rows = reader.shape(self.key("embedding"))[0] if self._has("embedding") else 0

    # --- checkpoint keys and shapes -----------------------------------------------------------

    def _has(self, name: str) -> bool:
        return any(k in self.reader.tensors for k in KEYS[name])

    def key(self, name: str) -> str:
        return next((k for k in KEYS[name] if k in self.reader.tensors), KEYS[name][0])

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Logical tensor -> the shape the config implies for it in the checkpoint."""
        m, n, h, d, lay = self.m, self.heads, self.m.hidden_size, self.head_dim, self.m.num_layers
        qkv = (n + 2 * self.groups) * d
        shapes = {
            "embedding": (self.vocab_rows, h),
            "final_norm.weight": (h,),
            "in_norm.weight": (lay, h),
            "mlp_norm.weight": (lay, h),
            "qkv.weight": (lay, qkv, h),
            "proj.weight": (lay, h, n * d),
        }
        if m.is_moe:
            e, f = m.num_experts, m.moe_expert_ffn_size
            shapes |= {"router.weight": (lay, e, h), "expert_fc1.weight": (lay, e, 2 * f, h),
                       "expert_fc2.weight": (lay, e, h, f)}  # fmt: skip
        else:
            f = m.ffn_size
            shapes |= {
                "fc1.weight": (lay, f * (2 if m.swiglu else 1), h),
                "fc2.weight": (lay, h, f),
            }
        if m.add_bias_linear:
            shapes |= {"qkv.bias": (lay, qkv), "proj.bias": (lay, h), "fc1.bias": (lay, f),
                       "fc2.bias": (lay, h)}  # fmt: skip
        if m.normalization == "LayerNorm":
            shapes |= {"in_norm.bias": (lay, h), "mlp_norm.bias": (lay, h),
                       "final_norm.bias": (h,)}  # fmt: skip
        if m.untie_embeddings_and_output_weights:
            shapes["output"] = (self.vocab_rows, h)
        return shapes

    def check_shapes(self) -> None:
        """ExportError (one line) at the first tensor the checkpoint lacks, holds at another
        shape than the config implies, or holds beyond what the config describes."""
        expected = self.expected_shapes()
        for name, shape in expected.items():
            key = self.key(name)
            if not self._has(name):
                raise ExportError(
                    f"checkpoint {self.reader.ckpt_dir} has no tensor {key!r}, which the "
                    f"config's model ({self.architecture}) needs: is it this run's config?"
                )
            if self.reader.shape(key) != shape:
                raise ExportError(
                    f"checkpoint tensor {key!r} has shape {list(self.reader.shape(key))}, the "
                    f"config's model section implies {list(shape)}: is it this run's config?"
                )
        used = {self.key(name) for name in expected}
        extra = sorted(set(self.reader.tensors) - used)
        if extra:
            raise ExportError(
                f"checkpoint tensor {extra[0]!r} is not part of the model the config describes "
                f"({len(extra)} such tensors): is it this run's config?"
            )

    def check_vocab(self, vocab_size: int) -> None:
        """ExportError when the embedding has fewer rows than the tokenizer has tokens."""
        if self.vocab_rows < vocab_size:
            raise ExportError(
                f"checkpoint's embedding has {self.vocab_rows} rows, fewer than the tokenizer's "
                f"{vocab_size} tokens: is it this run's tokenizer?"
            )

    # --- units ---------------------------------------------------------------------------------

    def _boxes(self, names: list[str], index: tuple[int, ...] = ()) -> dict[str, Box]:
        expected = self.expected_shapes()
        return {n: Box(self.key(n), index) for n in names if n in expected}

    def units(self) -> Iterator[Unit]:
        """Everything to write, in order: embedding, each layer, final norm, output layer."""
        prefix, emb, norm, out = self._outer_names()
        yield Unit(self._boxes(["embedding"]), lambda t: [(emb, t["embedding"])])
        for i in range(self.m.num_layers):
            yield from self._layer_units(i)
        names = ["final_norm.weight", "final_norm.bias"]
        yield Unit(
            self._boxes(names),
            lambda t: [(f"{norm}.{n.split('.')[1]}", t[n]) for n in names if n in t],
        )
        if self.m.untie_embeddings_and_output_weights:
            yield Unit(self._boxes(["output"]), lambda t: [(out, t["output"])])

    def _outer_names(self) -> tuple[str, str, str, str]:
        if self.architecture == NEOX:
            return "gpt_neox.layers", "gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm", \
                "embed_out.weight"  # fmt: skip
        return "model.layers", "model.embed_tokens.weight", "model.norm", "lm_head.weight"

    def _layer_units(self, i: int) -> Iterator[Unit]:
        p = f"{self._outer_names()[0]}.{i}"
        attn = ["in_norm.weight", "in_norm.bias", "qkv.weight", "qkv.bias", "proj.weight",
                "proj.bias"]  # fmt: skip
        if self.architecture == NEOX:
            yield Unit(self._boxes(attn, (i,)), lambda t: self._neox_attention(p, t))
            mlp = ["mlp_norm.weight", "mlp_norm.bias", "fc1.weight", "fc1.bias", "fc2.weight",
                   "fc2.bias"]  # fmt: skip
            yield Unit(self._boxes(mlp, (i,)), lambda t: self._neox_mlp(p, t))
            return
        yield Unit(self._boxes(attn, (i,)), lambda t: self._llama_attention(p, t))
        if self.architecture == LLAMA:
            mlp = ["mlp_norm.weight", "fc1.weight", "fc2.weight"]
            yield Unit(self._boxes(mlp, (i,)), lambda t: self._llama_mlp(p, t))
            return
        moe = f"{p}.block_sparse_moe"
        yield Unit(
            self._boxes(["mlp_norm.weight", "router.weight"], (i,)),
            lambda t: [(f"{p}.post_attention_layernorm.weight", t["mlp_norm.weight"]),
                       (f"{moe}.gate.weight", t["router.weight"])],
        )  # fmt: skip
        for e in range(self.m.num_experts):
            yield Unit(
                self._boxes(["expert_fc1.weight", "expert_fc2.weight"], (i, e)),
                lambda t, e=e: self._mixtral_expert(f"{moe}.experts.{e}", t),
            )

    # --- conversions ---------------------------------------------------------------------------

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Megatron's per-group ``[q heads; k; v]`` rows -> q, k, v (weights or biases)."""
        per_group = self.heads // self.groups
        grouped = qkv.reshape(self.groups, per_group + 2, self.head_dim, *qkv.shape[1:])
        q = grouped[:, :per_group].reshape(-1, *qkv.shape[1:])
        k = grouped[:, per_group].reshape(-1, *qkv.shape[1:])
        v = grouped[:, per_group + 1].reshape(-1, *qkv.shape[1:])
        return q, k, v

    def _llama_attention(self, p: str, t: Tensors) -> list[tuple[str, torch.Tensor]]:
        q, k, v = self._split_qkv(t["qkv.weight"])
        a = f"{p}.self_attn"
        return [(f"{p}.input_layernorm.weight", t["in_norm.weight"]), (f"{a}.q_proj.weight", q),
                (f"{a}.k_proj.weight", k), (f"{a}.v_proj.weight", v),
                (f"{a}.o_proj.weight", t["proj.weight"])]  # fmt: skip

    def _llama_mlp(self, p: str, t: Tensors) -> list[tuple[str, torch.Tensor]]:
        gate, up = t["fc1.weight"].chunk(2, dim=0)
        return [(f"{p}.post_attention_layernorm.weight", t["mlp_norm.weight"]),
                (f"{p}.mlp.gate_proj.weight", gate), (f"{p}.mlp.up_proj.weight", up),
                (f"{p}.mlp.down_proj.weight", t["fc2.weight"])]  # fmt: skip

    @staticmethod
    def _mixtral_expert(p: str, t: Tensors) -> list[tuple[str, torch.Tensor]]:
        gate, up = t["expert_fc1.weight"].chunk(2, dim=0)
        return [(f"{p}.w1.weight", gate), (f"{p}.w2.weight", t["expert_fc2.weight"]),
                (f"{p}.w3.weight", up)]  # fmt: skip

    @staticmethod
    def _neox_attention(p: str, t: Tensors) -> list[tuple[str, torch.Tensor]]:
        # multi-head attention: Megatron's groups are heads, [q; k; v] per head as in NeoX
        return (
            [(f"{p}.input_layernorm.{w}", t[f"in_norm.{w}"]) for w in ("weight", "bias")]
            + [(f"{p}.attention.query_key_value.{w}", t[f"qkv.{w}"]) for w in ("weight", "bias")]
            + [(f"{p}.attention.dense.{w}", t[f"proj.{w}"]) for w in ("weight", "bias")]
        )

    @staticmethod
    def _neox_mlp(p: str, t: Tensors) -> list[tuple[str, torch.Tensor]]:
        pairs = [("post_attention_layernorm", "mlp_norm"), ("mlp.dense_h_to_4h", "fc1"),
                 ("mlp.dense_4h_to_h", "fc2")]  # fmt: skip
        return [
            (f"{p}.{hf}.{w}", t[f"{ours}.{w}"]) for hf, ours in pairs for w in ("weight", "bias")
        ]

    # --- config.json ---------------------------------------------------------------------------

    def config(self, *, dtype: torch.dtype, bos: int, eos: int) -> dict[str, Any]:
        """``config.json``, with the keys transformers 4 and 5 both read (``rope_theta`` and
        ``rope_parameters``)."""
        m, dtype_name = self.m, str(dtype).removeprefix("torch.")
        rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
        config: dict[str, Any] = {
            "architectures": [self.architecture],
            "vocab_size": self.vocab_rows,
            "hidden_size": m.hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": self.heads,
            "max_position_embeddings": self.max_positions,
            "initializer_range": m.init_method_std,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
            "use_cache": True,
            "attention_dropout": 0.0,
        }
        if self.architecture == NEOX:
            act = "gelu_new" if m.bias_activation_fusion else "gelu"  # Megatron's fused: tanh
            return config | {
                "model_type": "gpt_neox", "intermediate_size": m.ffn_size, "hidden_act": act,
                "layer_norm_eps": LAYERNORM_EPS, "rotary_pct": 1.0,
                "rotary_emb_base": m.rotary_base, "rope_theta": float(m.rotary_base),
                "rope_parameters": rope | {"partial_rotary_factor": 1.0},
                "use_parallel_residual": False, "attention_bias": True, "hidden_dropout": 0.0,
            }  # fmt: skip
        config |= {
            "num_key_value_heads": self.groups, "head_dim": self.head_dim, "hidden_act": "silu",
            "rms_norm_eps": LAYERNORM_EPS, "rope_theta": float(m.rotary_base),
            "rope_parameters": rope, "rope_scaling": None,
        }  # fmt: skip
        if self.architecture == LLAMA:
            return config | {
                "model_type": "llama", "intermediate_size": m.ffn_size, "attention_bias": False,
                "mlp_bias": False, "pretraining_tp": 1,
            }  # fmt: skip
        return config | {
            "model_type": "mixtral", "intermediate_size": m.moe_expert_ffn_size,
            "num_local_experts": m.num_experts, "num_experts_per_tok": m.moe_router_topk,
            "router_aux_loss_coef": m.moe_aux_loss_coeff, "output_router_logits": False,
            "router_jitter_noise": 0.0, "sliding_window": None,
        }  # fmt: skip
