"""Where metrics go: the console line, a JSON-lines file, wandb (offline by default), TensorBoard.

Only the main rank (rank 0) logs; the values it logs are already reduced over the ranks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from wsm_megatron.training.config import WSMConfig


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def console_line(iteration: int, total: int, metrics: dict[str, float], eta_s: float) -> str:
    """One Megatron-style progress line with rate and ETA."""
    parts = [
        f"iter {iteration:>{len(str(total))}}/{total}",
        f"loss {metrics['loss']:.4f}",
        f"lr {metrics['lr']:.3e}",
        f"grad norm {metrics['grad_norm']:.3f}",
        f"{metrics['iter_per_s']:.2f} it/s",
        f"{metrics['tokens_per_s']:,.0f} tok/s",
        f"{metrics['tflops_per_gpu']:.3g} TFLOP/s/GPU",
    ]
    memory = metrics.get("mem_max_allocated_gb", metrics.get("mem_rss_gb"))
    if memory is not None:
        parts.append(f"mem {memory:.2f} GB")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class MetricsLogger:
    """Console + JSON lines + wandb + TensorBoard on the main rank; a no-op elsewhere."""

    def __init__(
        self,
        config: WSMConfig,
        *,
        is_main: bool,
        job_type: str = "train",
        default_dir: str | Path | None = None,
    ) -> None:
        """``default_dir``: where wandb writes unless ``logging.wandb_dir`` says (default: the
        parent of ``checkpoint.save``, else the current directory)."""
        self.is_main = is_main
        self.wandb: Any = None
        self.tensorboard: Any = None
        self.jsonl = None
        log = config.logging
        if not is_main:
            return
        if log.metrics_file:
            Path(log.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(log.metrics_file, "a")  # noqa: SIM115 - closed in close()
        if log.wandb_mode != "disabled":
            import wandb

            if default_dir is None:
                save = config.checkpoint.save
                default_dir = Path(save).parent if save else Path(".")
            wandb_dir = Path(log.wandb_dir or default_dir)
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(
                project=log.wandb_project,
                name=log.wandb_name,
                group=log.wandb_group or log.wandb_name,
                dir=str(wandb_dir),
                mode=log.wandb_mode,
                job_type=job_type,
                config=config.to_dict(),
                settings=wandb.Settings(silent=True),  # its banners and summaries: one line here
            )
            where = self.wandb.settings.sync_dir
            hint = f" (upload: wandb sync {where})" if log.wandb_mode == "offline" else ""
            name = self.wandb.name or self.wandb.id
            print(f"wandb: {log.wandb_mode} run {name} in {where}{hint}", flush=True)
        if log.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "logging.tensorboard_dir: TensorBoard is not installed "
                    "(pip install 'wsm-megatron[tensorboard]')"
                ) from None
            self.tensorboard = SummaryWriter(log.tensorboard_dir)

    def print(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def log(self, kind: str, iteration: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` of ``kind`` (``train``, ``valid``...) at ``iteration``."""
        if not self.is_main:
            return
        if self.jsonl is not None:
            record = {"kind": kind, "iteration": iteration, "time": time.time(), **metrics}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        scalars = {
            f"{kind}/{k}": v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, iteration)

    def summary(self, values: dict[str, Any]) -> None:
        """Set run-level values (wandb's summary row)."""
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
