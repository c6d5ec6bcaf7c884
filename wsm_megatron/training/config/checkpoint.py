"""``checkpoint``: where and how often to save, what to resume, what to keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wsm_megatron.training.config.errors import ConfigError, _positive


@dataclass
class CheckpointConfig:
    """Megatron-LM ``torch_dist`` checkpoints: where, how often, what to resume, what to keep.

    ``load`` defaults to ``save``: a run restarted with the same config resumes. Pruning keeps
    the newest checkpoints that the merge window needs (``merge.quantity``/``merge.window``) and
    every checkpoint whose iteration is a multiple of ``keep_every``; without a merge window
    nothing is pruned.
    """

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    """Save every this many iterations."""
    save_interval_tokens: int | None = None
    """Or: save whenever the consumed tokens cross a multiple of this."""
    async_save: bool | None = None
    """Write in the background (Megatron's async ``torch_dist`` save). ``null``: on GPU only."""
    keep_every: int | None = None
    prune: bool = True
    load_iteration: int | None = None
    """Resume from this iteration of ``load`` instead of the tracker's (Megatron's
    ``--ckpt-step``), e.g. to branch a WSD decay from a WSM checkpoint."""
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    """Load weights only and start at iteration 0 with fresh data position, optimizer and RNG."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """The distributed optimizer's state on disk (GPU). ``dp_reshardable`` (Megatron-LM's
    default): each rank writes its share, keyed by DDP bucket, so it resumes only under the same
    bucket layout (``parallel.overlap_grad_reduce``). ``fully_reshardable``: each parameter's
    state whole, gathered on each data-parallel group's first rank (host memory): resumes under
    any bucket layout, data-parallel size and TP/PP layout, also in Megatron-LM with its
    defaults."""
    on_damage: Literal["fallback", "stop"] = "fallback"
    """A resume checkpoint that fails verification (sizes, checksums): ``fallback`` names it
    and resumes from the newest older one that verifies; ``stop`` refuses to start."""

    def __post_init__(self) -> None:
        _positive(
            "checkpoint",
            save_interval=self.save_interval,
            save_interval_tokens=self.save_interval_tokens,
            keep_every=self.keep_every,
            load_iteration=self.load_iteration,
        )
        if self.save_interval is not None and self.save_interval_tokens is not None:
            raise ConfigError(
                "checkpoint.save_interval_tokens: set either save_interval (iterations) or "
                "save_interval_tokens, not both"
            )
        if self.save is None and (self.save_interval or self.save_interval_tokens):
            raise ConfigError("checkpoint.save: a save interval needs a checkpoint directory")
        if self.load_iteration is not None and self.load_dir is None:
            raise ConfigError("checkpoint.load_iteration: needs checkpoint.load (or save)")

    @property
    def load_dir(self) -> str | None:
        return self.save if self.load is None else self.load


def interval_unset(c: CheckpointConfig) -> bool:
    return c.save_interval is None and c.save_interval_tokens is None
