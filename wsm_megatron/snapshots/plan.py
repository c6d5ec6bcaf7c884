"""The online merge's ring cost from a config alone (``wsm-train --plan-memory``): no model is
built, no process started, so a 1,000-GPU layout is planned on a laptop.

Counts the values a merge averages (every weight of the GPT) per rank of each pipeline stage,
split into dense values (sliced over the DP x CP group) and expert values (sliced over the
expert-data-parallel group, ``world / (PP x EP x ETP)``, ETP = TP), with Megatron's layer
placement (pipeline stages, virtual chunks) and its GPT layer shapes; tested equal to the
counts of real megatron-core models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wsm_megatron.snapshots.memory import GIB
from wsm_megatron.training.config import WSMConfig


@dataclass(frozen=True)
class ShardCount:
    """Elements of the merged values one rank holds."""

    dense: int
    expert: int


def _norm(config: WSMConfig, width: int) -> int:
    return width * (2 if config.model.normalization == "LayerNorm" else 1)


def _linear(rows: int, cols: int, tp: int, bias: bool, bias_split: bool) -> int:
    """A TP-split linear layer's elements (``bias_split``: column parallel, bias split too)."""
    return rows * cols // tp + ((rows // tp if bias_split else rows) if bias else 0)


def layer_count(config: WSMConfig, moe: bool) -> ShardCount:
    """One transformer layer on one TP rank."""
    m, tp = config.model, config.parallel.tensor_model_parallel_size
    h, bias = m.hidden_size, m.add_bias_linear
    d = m.kv_channels or h // m.num_attention_heads
    q, kv = m.num_attention_heads * d, (m.num_query_groups or m.num_attention_heads) * d
    glu = 2 if m.swiglu else 1
    dense = 2 * _norm(config, h) + _linear(q + 2 * kv, h, tp, bias, True)
    dense += _linear(h, q, tp, bias, False) + (2 * _norm(config, d) if m.qk_layernorm else 0)
    if not moe:
        f = m.ffn_size
        dense += _linear(glu * f, h, tp, bias, True) + _linear(h, f, tp, bias, False)
        return ShardCount(dense, 0)
    dense += m.num_experts * h  # the router
    s = m.moe_shared_expert_intermediate_size
    if s:
        dense += _linear(glu * s, h, tp, bias, True) + _linear(h, s, tp, bias, False)
    fe = m.moe_expert_ffn_size
    per_expert = _linear(glu * fe, h, tp, bias, True) + _linear(h, fe, tp, bias, False)
    return ShardCount(
        dense, per_expert * m.num_experts // config.parallel.expert_model_parallel_size
    )


def stage_layers(config: WSMConfig, stage: int) -> list[int]:
    """The layers a pipeline rank holds (all its virtual chunks)."""
    p = config.parallel
    pp, chunks = p.pipeline_model_parallel_size, p.model_chunks
    per = config.model.num_layers // (pp * chunks)
    return [(k * pp + stage) * per + i for k in range(chunks) for i in range(per)]


def stage_count(config: WSMConfig, stage: int, vocab_size: int) -> ShardCount:
    """Everything one TP rank of pipeline stage ``stage`` holds."""
    m, p = config.model, config.parallel
    tp, pp, h = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, m.hidden_size
    moe_layers = m.moe_layers
    counts = [layer_count(config, moe_layers[i]) for i in stage_layers(config, stage)]
    dense, expert = sum(c.dense for c in counts), sum(c.expert for c in counts)
    vocab = config.padded_vocab_size(vocab_size) * h // tp
    if stage == 0:
        dense += vocab
        if m.position_embedding_type == "learned_absolute":
            dense += (m.max_position_embeddings or config.seq_length) * h
    if stage == pp - 1:
        dense += _norm(config, h)
        if m.untie_embeddings_and_output_weights or pp > 1:
            dense += vocab
    return ShardCount(dense, expert)


@dataclass(frozen=True)
class RingPlan:
    """The ring's cost at a layout: per rank of each stage, and for the fullest node."""

    capacity: int
    element_bytes: int
    world_size: int
    gpus_per_node: int
    dp: int
    edp: int
    per_stage: tuple[ShardCount, ...]
    shard: bool

    def rank_bytes(self, stage: int) -> int:
        c = self.per_stage[stage]
        dp, edp = (self.dp, self.edp) if self.shard else (1, 1)
        return (
            self.capacity
            * self.element_bytes
            * (math.ceil(c.dense / dp) + math.ceil(c.expert / edp))
        )

    def node_bytes(self) -> int:
        """The node holding the most (Megatron's rank order: PP outermost)."""
        per_stage_ranks = self.world_size // len(self.per_stage)
        totals = []
        for first in range(0, self.world_size, self.gpus_per_node):
            ranks = range(first, min(first + self.gpus_per_node, self.world_size))
            totals.append(sum(self.rank_bytes(r // per_stage_ranks) for r in ranks))
        return max(totals)

    def describe(self) -> str:
        unit = lambda n: f"{n / GIB:.3g} GiB"  # noqa: E731
        ranks = [self.rank_bytes(s) for s in range(len(self.per_stage))]
        whole = RingPlan(**{**self.__dict__, "shard": False})
        return (
            f"ring {self.capacity} snapshots x {unit(max(ranks) / self.capacity)} = "
            f"{unit(max(ranks))} per rank (largest stage; smallest {unit(min(ranks))}); "
            f"{unit(self.node_bytes())} per {self.gpus_per_node}-GPU node; "
            f"sliced over DP x CP {self.dp} (experts over {self.edp})"
            + (
                ""
                if not self.shard
                else f"; unsliced it would be {unit(whole.rank_bytes(0))} "
                f"per rank, {unit(whole.node_bytes())} per node"
            )
        )


def plan_ring(
    config: WSMConfig, world_size: int, vocab_size: int, gpus_per_node: int = 8
) -> RingPlan:
    """The ring of ``config``'s merge window at ``world_size`` ranks, in the training dtype
    (bf16 when ``train.bf16``, as on a GPU)."""
    p = config.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    ep = p.expert_model_parallel_size
    model_parallel = tp * pp
    if world_size % (model_parallel * p.context_parallel_size) or world_size % (pp * ep * tp):
        raise ValueError(
            f"--world-size: {world_size} is not a multiple of TP x PP x CP "
            f"({model_parallel * p.context_parallel_size}) and of PP x EP x TP ({pp * ep * tp})"
        )
    capacity = config.merge_quantity
    if capacity is None:
        raise ValueError("merge.quantity: the plan needs a merge window (merge.quantity/window)")
    return RingPlan(
        capacity=capacity,
        element_bytes=2 if config.train.bf16 else 4,
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        dp=world_size // model_parallel,
        edp=world_size // (pp * ep * tp),
        per_stage=tuple(stage_count(config, s, vocab_size) for s in range(pp)),
        shard=config.merge.shard_ring,
    )
