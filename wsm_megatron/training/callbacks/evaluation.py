"""Validation in the loop: every ``train.eval_interval`` iterations, at the end, and before a save
that is a merge point (the raw loss beside the merged one); and the iteration's ``valid`` record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from wsm_megatron.training.callbacks.base import Callback, StepInfo
from wsm_megatron.training.checkpointing import Progress
from wsm_megatron.training.loggers import MetricsLogger


class ValidRecord:
    """One iteration's ``valid`` log record: the validation loss and what other parts add (the
    online merge's metrics), logged as one record."""

    def __init__(self, logger: MetricsLogger, tokens_per_iteration: int) -> None:
        self.logger = logger
        self.tokens_per_iteration = tokens_per_iteration
        self.values: dict[str, Any] = {}

    def update(self, values: dict[str, Any]) -> None:
        self.values.update(values)

    def flush(self, iteration: int) -> None:
        """Log the record (if anything is in it) and start the next one."""
        if self.values:
            tokens = iteration * self.tokens_per_iteration
            self.logger.log("valid", iteration, {**self.values, "tokens": tokens})
        self.values = {}


def _never(progress: Progress) -> bool:
    return False


@dataclass
class EvaluationCallback(Callback):
    """Validates the live model (a collective: every rank, the same iterations) and logs the
    iteration's ``valid`` record after everything else has added to it."""

    priority: ClassVar[int] = -100  # last: the record waits for the parts that add to it

    validate: Callable[[], float]
    """One validation pass of the model as it is."""
    record: ValidRecord
    logger: MetricsLogger
    val_losses: dict[int, float]
    eval_interval: int | None
    train_iters: int
    before_save: Callable[[Progress], bool] = _never
    """Whether the save at ``progress`` also wants the raw loss (a merge point)."""
    _validated: int | None = field(default=None, init=False)

    def post_step(self, progress: Progress, info: StepInfo) -> None:
        it = progress.iteration
        if self.eval_interval and (it % self.eval_interval == 0 or it == self.train_iters):
            self._validate(it)
        if not info.saves:
            self.record.flush(it)

    def pre_checkpoint_save(self, progress: Progress) -> None:
        if self._validated != progress.iteration and self.before_save(progress):
            self._validate(progress.iteration)

    def post_checkpoint_saved(self, progress: Progress) -> None:
        self.record.flush(progress.iteration)

    def _validate(self, iteration: int) -> None:
        loss = self.val_losses[iteration] = self.validate()
        self.record.update({"loss": loss})
        self.logger.print(f"  validation loss at iteration {iteration}: {loss:.4f}")
        self._validated = iteration
