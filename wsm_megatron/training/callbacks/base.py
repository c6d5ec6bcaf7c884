"""The training loop's lifecycle hooks (OLMo-core's shape): :class:`Callback` and its container.

A run calls, in this order: :meth:`~Callback.pre_resume` and
:meth:`~Callback.post_checkpoint_loaded` (only when resuming), :meth:`~Callback.pre_train`;
each iteration :meth:`~Callback.pre_optim_step`, :meth:`~Callback.post_step` and, when the
iteration saves, :meth:`~Callback.pre_checkpoint_save` / :meth:`~Callback.post_checkpoint_saved`;
then :meth:`~Callback.post_train`, and :meth:`~Callback.close` always (also on error).

Distributed: every rank runs every hook in the same order, so a hook's collectives (a validation
pass, a merge) line up over the ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from wsm_megatron.training.checkpointing import Progress


@dataclass
class StepInfo:
    """What one training step leaves for the callbacks."""

    loss: torch.Tensor | None
    """``[loss sum, tokens]`` of this rank's microbatches, on the device (last stage), or None."""
    lr: float
    """The LR the step applied."""
    grad_norm: float | None
    updated: bool
    """False: the optimizer skipped the step (non-finite gradients)."""
    started: float
    """``time.perf_counter()`` when the step began."""
    saves: bool = False
    """Whether a checkpoint save follows this iteration's :meth:`Callback.post_step`."""


class Callback:
    """A part of the training loop; every hook is a no-op unless overridden."""

    priority: ClassVar[int] = 0
    """Callbacks run highest priority first (equal: in the order given)."""

    def pre_resume(self, resume_iteration: int) -> None:
        """Before the checkpoint of ``resume_iteration`` is loaded (the model is overwritten)."""

    def post_checkpoint_loaded(self, progress: Progress) -> None:
        """After resuming at ``progress``."""

    def pre_train(self, progress: Progress) -> None:
        """Before the first iteration of this process."""

    def pre_optim_step(self) -> None:
        """After forward and backward, before ``optimizer.step()`` changes the weights."""

    def post_step(self, progress: Progress, info: StepInfo) -> None:
        """After each iteration's step and bookkeeping (``progress`` counts it)."""

    def pre_checkpoint_save(self, progress: Progress) -> None:
        """Before the checkpoint of ``progress`` is saved."""

    def post_checkpoint_saved(self, progress: Progress) -> None:
        """After the checkpoint of ``progress`` is saved (an async save may still be writing)."""

    def post_train(self, progress: Progress) -> None:
        """After the last iteration, once every save has completed."""

    def close(self) -> None:
        """At the end of the run, also on error."""


class Callbacks(Callback):
    """The callbacks of one run: each hook called on all of them, highest priority first."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = sorted(callbacks, key=lambda c: c.priority, reverse=True)  # stable

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def pre_resume(self, resume_iteration: int) -> None:
        self._call("pre_resume", resume_iteration)

    def post_checkpoint_loaded(self, progress: Progress) -> None:
        self._call("post_checkpoint_loaded", progress)

    def pre_train(self, progress: Progress) -> None:
        self._call("pre_train", progress)

    def pre_optim_step(self) -> None:
        self._call("pre_optim_step")

    def post_step(self, progress: Progress, info: StepInfo) -> None:
        self._call("post_step", progress, info)

    def pre_checkpoint_save(self, progress: Progress) -> None:
        self._call("pre_checkpoint_save", progress)

    def post_checkpoint_saved(self, progress: Progress) -> None:
        self._call("post_checkpoint_saved", progress)

    def post_train(self, progress: Progress) -> None:
        self._call("post_train", progress)

    def close(self) -> None:
        """Every callback's ``close``, even when one raises (the first error is raised last)."""
        error: Exception | None = None
        for callback in self.callbacks:
            try:
                callback.close()
            except Exception as e:  # the others still close
                error = error or e
        if error is not None:
            raise error
