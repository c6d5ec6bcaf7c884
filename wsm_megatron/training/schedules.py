"""LR schedules on Megatron-Core's ``OptimizerParamScheduler``, counted in samples (as Megatron-LM).

- ``wsm``: linear warmup, then constant (Megatron's ``constant`` style) — WSM's schedule;
- ``wsd``: warmup, constant, then a decay over the last ``lr_wsd_decay_iters`` of
  ``lr_decay_iters`` (Megatron's ``WSD`` style with ``lr_wsd_decay_style``);
- ``cosine``/``linear``: warmup, then a decay to ``min_lr`` at ``lr_decay_iters``.

The configuration, not the checkpoint, decides the schedule (Megatron-LM's
``--override-opt-param-scheduler``); a checkpoint only supplies how far along it is. So a run
resumed from a constant-LR WSM checkpoint at iteration T with ``lr_schedule=wsd``,
``train_iters`` = T + D and ``lr_wsd_decay_iters=D`` decays over the D iterations after the
branch point, reaching ``min_lr`` at T + D — the paper's WSD baseline. As in Megatron-LM,
iteration i applies the schedule's value at i - 1 (so the first iteration of a decay runs at
the peak LR).
"""

from __future__ import annotations

from typing import Any

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from wsm_megatron.training.config import TrainConfig

MEGATRON_DECAY_STYLE = {"wsm": "constant", "wsd": "WSD", "cosine": "cosine", "linear": "linear"}
"""Our ``train.lr_schedule`` name -> Megatron's ``lr_decay_style`` (also saved in the args)."""


def build_scheduler(optimizer: Any, train: TrainConfig) -> OptimizerParamScheduler:
    """The scheduler for ``train.lr_schedule``; ``step(global_batch_size)`` once per iteration."""
    gbs = train.global_batch_size
    wsd = train.lr_schedule == "wsd"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=train.lr_warmup_init,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters * gbs,
        lr_decay_steps=train.decay_iters * gbs,
        lr_decay_style=MEGATRON_DECAY_STYLE[train.lr_schedule],
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.train_iters * gbs,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=train.lr_wsd_decay_iters * gbs if wsd else None,
        lr_wsd_decay_style=train.lr_wsd_decay_style if wsd else None,
    )


class _Groups:
    """A stand-in optimizer: just ``param_groups``, for computing a schedule without a model."""

    def __init__(self) -> None:
        self.param_groups: list[dict[str, Any]] = [{}]


def lr_at(train: TrainConfig, iteration: int) -> float:
    """The LR that ``train``'s schedule applies at ``iteration`` (0-based, before its update)."""
    scheduler = build_scheduler(_Groups(), train)
    scheduler.step(iteration * train.global_batch_size)
    return scheduler.optimizer.param_groups[0]["lr"]
