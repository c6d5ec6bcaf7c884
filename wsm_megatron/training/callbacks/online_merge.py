"""The online merge (:class:`~wsm_megatron.training.online_merge.OnlineMerge`) in the loop.

Its ring is rebuilt from disk before the resume checkpoint loads and takes the resumed one after;
snapshot copies in flight are fenced before each optimizer step; each save is snapshotted, and at
a merge point the merged model is evaluated (and saved with ``merge.save_dir``) and the live
values come back bitwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from wsm_megatron.layout import is_complete, read_tracker, write_tracker
from wsm_megatron.runtime import decided_on_rank0
from wsm_megatron.training.callbacks.base import Callback
from wsm_megatron.training.callbacks.evaluation import ValidRecord
from wsm_megatron.training.checkpointing import Checkpointer, Progress
from wsm_megatron.training.config import WSMConfig
from wsm_megatron.training.loggers import MetricsLogger
from wsm_megatron.training.online_merge import MergePoint, OnlineMerge


def _merged_missing(root: Path, iteration: int) -> bool:
    """On rank 0: whether ``root`` lacks the complete merged model of ``iteration``; a
    complete one the tracker does not name yet (killed between the two) is named now."""
    if is_complete(root, iteration):
        tracker = read_tracker(root)
        if tracker is None or tracker < iteration:
            write_tracker(root, iteration)
        return False
    return True


if TYPE_CHECKING:
    from wsm_megatron.training.trainer import TrainResult


@dataclass
class OnlineMergeCallback(Callback):
    """Fills ``result.ring_rebuild``, ``merged_losses`` and ``merge_points``, and adds the merge's
    metrics to the iteration's ``valid`` record."""

    priority: ClassVar[int] = 0  # before the evaluation part logs the record

    online: OnlineMerge
    config: WSMConfig
    validate: Callable[[], float]
    """One validation pass of the model as it is (inside a merge: the merged model)."""
    checkpointer: Checkpointer
    logger: MetricsLogger
    record: ValidRecord
    result: TrainResult

    @classmethod
    def build(
        cls,
        config: WSMConfig,
        model: list[torch.nn.Module],
        *,
        validate: Callable[[], float],
        checkpointer: Checkpointer,
        logger: MetricsLogger,
        record: ValidRecord,
        result: TrainResult,
    ) -> OnlineMergeCallback:
        """The online merge of ``model`` (its ring sized and checked on every rank, a collective),
        described on the console."""
        online = OnlineMerge(config, model)
        logger.print(online.describe())
        return cls(online, config, validate, checkpointer, logger, record, result)

    def due(self, progress: Progress) -> bool:
        """Whether the save at ``progress`` is a merge point (asked before it is snapshotted)."""
        return self.online.due(progress)

    def pre_resume(self, resume_iteration: int) -> None:
        root = self.config.checkpoint.load_dir
        rebuilt, missing = self.result.ring_rebuild = self.online.rebuild(root, resume_iteration)
        held = rebuilt + ([] if self.online.resumed_stop_save else [resume_iteration])
        self.logger.print(f"  online merge: ring rebuilt from {root} (iterations {held})")
        for it, problem in self.online.damaged.items():
            self.logger.print(f"  WARNING: online merge: skipping iteration {it}: {problem}")
        if missing:
            self.logger.print(
                f"  WARNING: online merge: the window's checkpoints {missing} are not under "
                f"{root} (or damaged); merges use the {len(rebuilt) + 1} present until the "
                "window refills"
            )

    def post_checkpoint_loaded(self, progress: Progress) -> None:
        """Take the resumed checkpoint into the ring; if it was a merge point whose merged
        model never got published (the run stopped in between), form and save it now."""
        self.online.on_resume(progress)
        save_dir = self.config.merge.save_dir
        if save_dir is None or not self.online.was_due(progress):
            return
        it = progress.iteration
        if not decided_on_rank0(partial(_merged_missing, Path(save_dir), it)):
            return
        self.logger.print(
            f"  online merge: the merged model of iteration {it} is not in {save_dir} (the run "
            "stopped before it was published); forming it again from the rebuilt ring"
        )
        self._merge(progress)
        self.record.flush(it)

    def pre_optim_step(self) -> None:
        self.online.fence()  # snapshot copies in flight finish before the weights change

    def post_checkpoint_saved(self, progress: Progress) -> None:
        merging = self.due(progress)  # counts the ring without this save's snapshot
        self.online.on_save(progress)
        if merging:
            self._merge(progress)

    def _merge(self, progress: Progress) -> None:
        it = progress.iteration
        metrics = self._merge_point(progress)
        self.record.update(metrics)
        if "merged_loss" in metrics:
            self.result.merged_losses[it] = metrics["merged_loss"]
        self.result.merge_points[it] = self.online.last_point

    def _merge_point(self, progress: Progress) -> dict[str, Any]:
        """Merge the ring into the model, evaluate (and save) the merged model, restore the live
        values; returns what to log beside the raw validation loss."""
        start = time.perf_counter()
        with self.online.merged(progress.iteration) as point:
            metrics: dict[str, Any] = {
                "merge_first": point.iterations[0],
                "merge_last": point.iterations[-1],
                "merge_checkpoints": len(point.iterations),
                "merge_schedule": point.schedule,
            }
            window = (
                f"{len(point.iterations)} checkpoints {point.iterations[0]}.."
                f"{point.iterations[-1]}, {point.schedule}"
            )
            if point.nonfinite is not None:
                self.logger.print(
                    f"  online merge at iteration {progress.iteration} ({window}) skipped: "
                    f"{point.nonfinite}; training continues"
                )
                metrics["merge_nonfinite"] = point.nonfinite
                return metrics
            metrics["merged_loss"] = self.validate()
            if self.config.merge.save_dir is not None:
                info = self._provenance(point)
                self.checkpointer.save_merged(progress, self.config.merge.save_dir, info)
        self.logger.print(
            f"  merged model at iteration {progress.iteration} ({window}): validation loss "
            f"{metrics['merged_loss']:.4f} ({time.perf_counter() - start:.1f} s)"
        )
        return metrics

    def _provenance(self, point: MergePoint) -> dict[str, Any]:
        """The merged checkpoint's ``merge_info.json``, as ``wsm-merge`` writes it."""
        from wsm_megatron.merge.provenance import input_entries, merge_info

        save = self.config.checkpoint.save
        coefficients = point.weights.coefficients
        return merge_info(
            tool="wsm-train online merge",
            input_root=save,
            inputs=input_entries(save, point.iterations, point.positions, coefficients),
            weighting=self.online.weighting,
            weights=point.weights,
            accumulate_dtype="fp32",
            output_dtype=None,
            selection={
                "mode": f"online, the newest {self.online.ring.capacity}",
                "position_unit": "tokens",
                "position_source": "consumed_train_samples x seq_length",
            },
        )
