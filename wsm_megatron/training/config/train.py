"""``train``: iterations, batch sizes, AdamW, the LR schedule, precision, evaluation."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Literal

from wsm_megatron.training.config.errors import ConfigError, _positive


@dataclass
class TrainConfig:
    """Iterations, batch sizes, AdamW, the LR schedule, precision and evaluation cadence.

    LR schedules (Megatron's ``OptimizerParamScheduler``; all start with a linear warmup):
    ``wsm`` constant after warmup (WSM's default: no decay, merge checkpoints instead);
    ``wsd`` constant, then a decay over the last ``lr_wsd_decay_iters`` of ``lr_decay_iters``
    in ``lr_wsd_decay_style``; ``cosine``/``linear`` decay to ``min_lr`` at ``lr_decay_iters``.
    """

    train_iters: int
    micro_batch_size: int
    global_batch_size: int
    lr: float
    min_lr: float = 0.0
    lr_schedule: Literal["wsm", "wsd", "cosine", "linear"] = "wsm"
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_iters: int | None = None
    """Where cosine/linear/WSD decays end (default: ``train_iters``)."""
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = "minus_sqrt"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = True
    """GPU only: bf16 weights and activations with fp32 main weights; the CPU path runs fp32."""
    seed: int = 1234
    eval_interval: int | None = None
    eval_iters: int = 10
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that ask the run to save a checkpoint of the current iteration and stop
    (Megatron-LM's ``--exit-signal-handler``, on here by default; ``[]``: die as the signal
    says). SLURM sends SIGTERM at the time limit and preemption, ``--signal=USR1@120`` before."""
    exit_duration_in_mins: float | None = None
    """Save and stop once this many minutes have passed since the run started (Megatron-LM's
    ``--exit-duration-in-mins``): set it below the job's time limit by the time a save takes."""

    def __post_init__(self) -> None:
        _positive(
            "train",
            train_iters=self.train_iters,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            lr=self.lr,
            lr_decay_iters=self.lr_decay_iters,
            lr_wsd_decay_iters=self.lr_wsd_decay_iters,
            adam_eps=self.adam_eps,
            eval_interval=self.eval_interval,
            eval_iters=self.eval_iters,
            exit_duration_in_mins=self.exit_duration_in_mins,
        )
        self._check_exit_signals()
        for name in ("min_lr", "lr_warmup_iters", "lr_warmup_init", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        if self.min_lr > self.lr or self.lr_warmup_init > self.lr:
            raise ConfigError(
                f"train.lr: the peak LR {self.lr} is below min_lr ({self.min_lr}) "
                f"or lr_warmup_init ({self.lr_warmup_init})"
            )
        if self.lr_warmup_iters >= self.decay_iters:
            raise ConfigError(
                f"train.lr_warmup_iters: {self.lr_warmup_iters} must be smaller than "
                f"lr_decay_iters ({self.decay_iters}; default train_iters)"
            )
        if self.lr_schedule == "wsd":
            if self.lr_wsd_decay_iters is None:
                raise ConfigError(
                    "train.lr_wsd_decay_iters: the wsd schedule needs its decay length"
                )
            if self.lr_wsd_decay_iters > self.decay_iters - self.lr_warmup_iters:
                raise ConfigError(
                    f"train.lr_wsd_decay_iters: {self.lr_wsd_decay_iters} exceeds the "
                    f"{self.decay_iters - self.lr_warmup_iters} iterations after warmup"
                )
        elif self.lr_wsd_decay_iters is not None:
            raise ConfigError(
                f"train.lr_wsd_decay_iters: only the wsd schedule decays in a final phase "
                f"(lr_schedule is {self.lr_schedule!r})"
            )

    def _check_exit_signals(self) -> None:
        for name in self.exit_signals:
            known = name in signal.Signals.__members__
            if not known or name in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(
                    f"train.exit_signals: {name!r} is not a signal that can be caught "
                    "(e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGINT)"
                )

    @property
    def decay_iters(self) -> int:
        """``lr_decay_iters``, defaulting to ``train_iters``."""
        return self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters
