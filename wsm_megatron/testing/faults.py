"""A training run killed (SIGKILL, as a node failure or ``kill -9``) at a chosen moment of its
saves, for the fault-injection tests: ``run_distributed(train_killed, N, overrides, moment, it)``.

Moments (``it``: the iteration whose save is hit):

- ``shard``: rank 1 while writing its shard file of training checkpoint ``it`` (one item in);
- ``tracker``: rank 0 after checkpoint ``it`` is written and verified, before the tracker moves;
- ``merged-shard``: rank 1 while writing its shard of the merged model of ``it``;
- ``publish``: rank 0 after the training tracker names ``it``, before the merged model of ``it``
  is published.

Nothing is mocked: the real writers run, and the process dies in the middle of them.

``run_distributed(train_signalled, N, overrides, it, signal_name, ranks)`` sends a real signal to
the given ranks (themselves) at a chosen iteration, or during the save of one, as SLURM does at
a time limit or a preemption.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from wsm_megatron.layout import iteration_dirname
from wsm_megatron.testing.runs import train_summary

MOMENTS = ("shard", "tracker", "merged-shard", "publish")


def _die(rank_pid: int) -> None:
    """SIGKILL the rank and every process it started (as SLURM kills a job step's cgroup:
    megatron's writer keeps a results-queue manager process that would outlive the rank)."""
    import psutil

    for child in psutil.Process(rank_pid).children(recursive=True):
        if child.pid != os.getpid():
            child.kill()
    os.kill(rank_pid, signal.SIGKILL)  # the rank (when a writer child runs this) ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... and this process


def _install(moment: str, iteration: int) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from wsm_megatron.merge import writer
    from wsm_megatron.merge.writer import TMP_PREFIX
    from wsm_megatron.training import checkpointing

    pid, name = os.getpid(), iteration_dirname(iteration)
    rank = int(os.environ["RANK"])
    if moment in ("shard", "merged-shard") and rank == 1:
        write_item = filesystem_async._write_item
        merged = moment == "merged-shard"

        def write_then_die(transforms: Any, stream: Any, *args: Any, **kwargs: Any) -> Any:
            result = write_item(transforms, stream, *args, **kwargs)
            path = str(getattr(stream, "name", ""))
            if name in path and (TMP_PREFIX in path) == merged:
                stream.flush()
                _die(pid)
            return result

        filesystem_async._write_item = write_then_die
    elif moment == "tracker" and rank == 0:
        write_tracker = checkpointing.write_tracker

        def die_before_tracker(root: Any, it: int) -> None:
            if it == iteration:
                _die(pid)
            write_tracker(root, it)

        checkpointing.write_tracker = die_before_tracker
    elif moment == "publish" and rank == 0:
        publish = writer.publish

        def die_before_publish(tmp_dir: Any, root: Any, it: int, **kwargs: Any) -> Any:
            if it == iteration:
                _die(pid)
            return publish(tmp_dir, root, it, **kwargs)

        writer.publish = die_before_publish
    assert moment in MOMENTS, moment


def train_killed(overrides: list[str], moment: str, iteration: int) -> dict[str, Any]:
    """:func:`train_summary`, killed at ``moment`` of the save of ``iteration``."""
    _install(moment, iteration)
    return train_summary(overrides)


def train_signalled(
    overrides: list[str], iteration: int, signal_name: str, ranks: list[int], during_save: bool
) -> dict[str, Any]:
    """:func:`train_summary`, with ``signal_name`` sent to each of ``ranks`` once, after the
    step of ``iteration`` (or, ``during_save``, while its checkpoint is being written; sent
    twice when the rank is listed twice)."""
    from wsm_megatron.training import checkpointing
    from wsm_megatron.training.callbacks.metrics import MetricsCallback

    times = ranks.count(int(os.environ["RANK"]))
    signum = signal.Signals[signal_name]

    def send() -> None:
        for _ in range(times):
            os.kill(os.getpid(), signum)

    if during_save:
        save_then = checkpointing.dist_checkpointing.save

        def save_signalled(state_dict: Any, ckpt_dir: str, *args: Any, **kwargs: Any) -> Any:
            if ckpt_dir.endswith(iteration_dirname(iteration)):
                send()
            return save_then(state_dict, ckpt_dir, *args, **kwargs)

        checkpointing.dist_checkpointing = _Patched(
            checkpointing.dist_checkpointing, save_signalled
        )
    else:
        post_step = MetricsCallback.post_step

        def post_step_signalled(self: Any, progress: Any, info: Any) -> None:
            post_step(self, progress, info)
            if progress.iteration == iteration:
                send()

        MetricsCallback.post_step = post_step_signalled
    return train_summary(overrides)


class _Patched:
    """A module seen through, with ``save`` replaced."""

    def __init__(self, module: Any, save: Any) -> None:
        self._module, self.save = module, save

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
