"""Every training default of ours that differs from Megatron-LM's, with Megatron-LM's value and
why ours differs: the README's table, and what each shipped config states explicitly (tested).

Megatron-LM's values are read from its ``megatron/training/arguments.py`` and the config
dataclasses it builds arguments from (2026).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Difference(NamedTuple):
    megatron_lm: Any
    """Megatron-LM's default (its flag in the README)."""
    flag: str
    why: str


DIFFERENCES: dict[str, Difference] = {
    "train.lr_schedule": Difference(
        "linear", "--lr-decay-style", "WSM: constant after warmup, decay emulated by merging"
    ),
    "train.adam_beta2": Difference(
        0.999, "--adam-beta2", "the paper's and common LLM pre-training AdamW (0.9, 0.95)"
    ),
    "train.weight_decay": Difference(0.01, "--weight-decay", "the paper's AdamW weight decay"),
    "train.bf16": Difference(False, "--bf16", "mixed precision on GPUs (the CPU path is fp32)"),
    "train.eval_iters": Difference(100, "--eval-iters", "cheaper validation per merge point"),
    "train.exit_signals": Difference(
        "off",
        "--exit-signal-handler --exit-signal",
        "SLURM's SIGTERM and --signal=USR1@120 save a checkpoint before the job ends; exit "
        "status 3, not 0, so the launch script knows to requeue",
    ),
    "model.position_embedding_type": Difference(
        "learned_absolute", "--position-embedding-type", "RoPE, as current LLMs"
    ),
    "model.hidden_dropout": Difference(
        0.1, "--hidden-dropout", "no dropout in single-epoch pre-training"
    ),
    "model.attention_dropout": Difference(
        0.1, "--attention-dropout", "no dropout in single-epoch pre-training"
    ),
    "model.moe_aux_loss_coeff": Difference(
        0.0, "--moe-aux-loss-coeff", "load balancing on by default (the paper's MoE uses it)"
    ),
    "model.moe_token_dispatcher_type": Difference(
        "allgather", "--moe-token-dispatcher-type", "all-to-all scales with expert parallelism"
    ),
    "parallel.use_distributed_optimizer": Difference(
        False, "--use-distributed-optimizer", "optimizer state sharded over data parallelism"
    ),
    "parallel.overlap_grad_reduce": Difference(
        False,
        "--overlap-grad-reduce",
        "gradient reduction hidden behind the backward pass; the optimizer state is then keyed "
        "by 40M-parameter buckets, so Megatron-LM resumes it with --overlap-grad-reduce",
    ),
    "parallel.overlap_param_gather": Difference(
        False, "--overlap-param-gather", "parameter all-gather hidden behind the forward pass"
    ),
}

MOE_ONLY = ("model.moe_aux_loss_coeff", "model.moe_token_dispatcher_type")


def stated_keys(moe: bool) -> list[str]:
    """The keys a shipped config states explicitly."""
    return [key for key in DIFFERENCES if moe or key not in MOE_ONLY]
