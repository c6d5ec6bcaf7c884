"""Training metrics every ``logging.log_interval`` iterations and at the end: the console line and
the ``train`` record (console, JSON lines, wandb, TensorBoard)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from wsm_megatron.training.callbacks.base import Callback, StepInfo
from wsm_megatron.training.checkpointing import Progress
from wsm_megatron.training.config import WSMConfig
from wsm_megatron.training.loggers import MetricsLogger, console_line
from wsm_megatron.training.metrics import memory_gb
from wsm_megatron.training.steps import global_token_means


@dataclass
class MetricsCallback(Callback):
    """Reduces the interval's losses once per log interval, as Megatron-LM does (no per-step sync
    or collective), into ``losses``; throughput counts the steps, not what follows them
    (validation, saves, merges)."""

    priority: ClassVar[int] = 100  # first: the line comes before validation and saves

    config: WSMConfig
    logger: MetricsLogger
    losses: dict[int, float]
    """Filled with the training loss of every iteration, at each log."""
    flops: float
    """Floating-point operations per iteration."""
    world_size: int
    _pending: list[torch.Tensor | None] = field(default_factory=list, init=False)
    _window_start: float = field(default=0.0, init=False)
    _window_iters: int = field(default=0, init=False)
    _paused: float | None = field(default=None, init=False)

    def pre_train(self, progress: Progress) -> None:
        self._window_start, self._window_iters = time.perf_counter(), 0

    def post_step(self, progress: Progress, info: StepInfo) -> None:
        if self._paused is not None:  # what followed the last step is not training throughput
            self._window_start += info.started - self._paused
        self._pending.append(info.loss)
        self._window_iters += 1
        it, t = progress.iteration, self.config.train
        if it % self.config.logging.log_interval == 0 or it == t.train_iters:
            self._log(progress, info)
        self._paused = time.perf_counter()

    def _log(self, progress: Progress, info: StepInfo) -> None:
        it, total = progress.iteration, self.config.train.train_iters
        steps = range(it - len(self._pending) + 1, it + 1)
        self.losses.update(zip(steps, global_token_means(self._pending), strict=True))
        self._pending = []
        seconds = (time.perf_counter() - self._window_start) / self._window_iters
        metrics = self._metrics(progress, info, seconds)
        self.logger.print(console_line(it, total, metrics, (total - it) * seconds))
        self.logger.log("train", it, metrics)
        self._window_start, self._window_iters = time.perf_counter(), 0

    def _metrics(self, progress: Progress, info: StepInfo, seconds: float) -> dict[str, Any]:
        """The ``train`` record of the window ending at ``progress`` (``seconds`` per step)."""
        it, c = progress.iteration, self.config
        window = [self.losses[i] for i in range(it - self._window_iters + 1, it + 1)]
        return {
            "loss": sum(window) / len(window),
            "lr": info.lr,
            "grad_norm": float("nan") if info.grad_norm is None else float(info.grad_norm),
            "consumed_samples": progress.consumed_train_samples,
            "tokens": progress.consumed_train_samples * c.seq_length,
            "iter_per_s": 1.0 / seconds,
            "tokens_per_s": c.tokens_per_iteration / seconds,
            "tflops_per_gpu": self.flops / seconds / self.world_size / 1e12,
            "skipped": not info.updated,
            **memory_gb(),
        }
