"""``logging``: console, wandb, TensorBoard and the metrics file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wsm_megatron.training.config.errors import _positive


@dataclass
class LoggingConfig:
    """Console every ``log_interval`` iterations; wandb (offline by default); TensorBoard."""

    log_interval: int = 10
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "wsm-megatron"
    wandb_name: str | None = None
    wandb_group: str | None = None
    """Groups the training run with its readers' runs (``wsm-watch``); default: ``wandb_name``."""
    wandb_dir: str | None = None
    """Default: the parent of ``checkpoint.save`` (or the current directory)."""
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    """A JSON-lines record of every logged iteration and evaluation."""

    def __post_init__(self) -> None:
        _positive("logging", log_interval=self.log_interval)
