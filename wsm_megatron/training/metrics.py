"""Throughput and memory: model FLOPs per iteration (Megatron-LM's formula), TFLOP/s, memory."""

from __future__ import annotations

import psutil
import torch

from wsm_megatron.runtime import cpu_compat
from wsm_megatron.training.config import WSMConfig


def flops_per_iteration(config: WSMConfig, padded_vocab_size: int) -> float:
    """Model FLOPs of one training iteration (forward + backward), as Megatron-LM counts them.

    ``12 * B * s * L * h^2 * (attention + MLP + logits)`` where the factor 12 is 3 (forward,
    weight-gradient and data-gradient GEMMs) x 2 (two GEMMs per block) x 2 (multiply-add);
    attention includes the ``s/h`` score term; MoE layers count ``topk`` routed experts plus the
    shared expert, on the fraction of layers that are MoE.
    """
    m = config.model
    s, h, layers = config.seq_length, m.hidden_size, m.num_layers
    batch = config.train.global_batch_size
    kv_channels = m.kv_channels or h // m.num_attention_heads
    query_ratio = kv_channels * m.num_attention_heads / h
    groups = m.num_query_groups or m.num_attention_heads
    attention = (1 + groups / m.num_attention_heads + s / h) * query_ratio
    gated = 1.5 if m.swiglu else 1.0
    dense_mlp = m.ffn_size / h * gated
    if m.is_moe:
        moe_fraction = sum(m.moe_layers) / layers
        expert = m.moe_expert_ffn_size / h
        shared = (m.moe_shared_expert_intermediate_size or 0) / h
        moe_mlp = (expert * m.moe_router_topk + shared) * gated
        mlp = moe_fraction * moe_mlp + (1 - moe_fraction) * dense_mlp
    else:
        mlp = dense_mlp
    logits = padded_vocab_size / (2 * layers * h)
    return 12.0 * batch * s * layers * h * h * (attention + mlp + logits)


def memory_gb() -> dict[str, float]:
    """This process's memory: GPU allocated/peak on GPU, resident set size on CPU (GB)."""
    if cpu_compat.is_active():
        return {"mem_rss_gb": psutil.Process().memory_info().rss / 2**30}
    return {
        "mem_allocated_gb": torch.cuda.memory_allocated() / 2**30,
        "mem_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
