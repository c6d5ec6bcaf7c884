"""Signals as requests to stop: unwound where that is safe, or saved for at a step boundary.

SLURM and torchrun stop jobs with SIGTERM. Outside threaded sections the handler raises
``SystemExit(143)`` at once, so ``finally`` blocks remove temporary output. Inside a
:func:`deferred` section (a loop that shares queues and locks with worker threads, where an
exception raised at an arbitrary bytecode could leave a lock held and the unwinding hang)
it only records the request; the loop calls :func:`raise_if_requested` between units of work.

Training instead saves before it stops (:class:`StopRequests`, Megatron-LM's
``--exit-signal-handler`` and ``--exit-duration-in-mins``): a signal or the wall-clock budget is
agreed over all ranks at a step boundary, the run writes a checkpoint of the iteration it is at
and exits with :data:`SAVED_STATUS`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

EXIT_STATUS = 128 + signal.SIGTERM
SAVED_STATUS = 3
"""Exit status of a run that saved a checkpoint and stopped on a signal or its time budget (the
SLURM example requeues the job on it; ``launch/slurm.sbatch`` uses the same number)."""

_requested = threading.Event()
_deferring = False


def _on_sigterm(signum: int, frame: object) -> None:
    _requested.set()
    if not _deferring:
        raise SystemExit(EXIT_STATUS)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while active (a no-op off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested.clear()


@contextmanager
def deferred() -> Iterator[None]:
    """Within, SIGTERM only records the request (see :func:`raise_if_requested`); on leaving
    without another exception in flight, a recorded request raises."""
    global _deferring
    outer, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = outer
    raise_if_requested()


def raise_if_requested() -> None:
    """Raise ``SystemExit(143)`` if SIGTERM arrived (under :func:`stop_on_sigterm`)."""
    if _requested.is_set():
        raise SystemExit(EXIT_STATUS)


_OUT_OF_TIME = 1000  # above every signal number: a budget stop wins the agreement's MAX


class StopRequests:
    """The signals and wall-clock budget that ask a training run to save and stop.

    While active (a ``with`` block on the main thread), a listed signal is only recorded, with
    one line; a second one stops the process at once (status 128 + signal) without a
    checkpoint, its folder left incomplete and so never resumed from. :meth:`poll`, called by
    every rank at every step boundary, says when all of them agree to stop: each boundary
    starts a small all-reduce (MAX, on a gloo group of its own, so no GPU waits) that the next
    boundary reads. A request is acted on one iteration after the boundary that first sees it;
    the first poll blocks, so a request made before the first step stops before it.
    """

    def __init__(
        self,
        signals: Sequence[str],
        duration_minutes: float | None,
        *,
        is_main: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.duration_minutes = duration_minutes
        self.is_main = is_main
        self.clock = clock
        self.started = clock()
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._group: dist.ProcessGroup | None = None
        self._pending: tuple[torch.Tensor, dist.Work] | None = None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, error: type[BaseException] | None, *rest: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._pending is not None and error is None:
            self._pending[1].wait()  # every rank has one in flight: none left behind
        self._pending = None  # (after an error the other ranks may never answer)

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            self._say(f"{name} again: stopping now, without a checkpoint of this iteration")
            raise SystemExit(128 + signum)
        self.received = signal.Signals(signum)
        self._say(f"{name} received: saving a checkpoint at a step boundary, then stopping")

    def _say(self, line: str) -> None:
        """One line on rank 0's stderr, written unbuffered (a handler may interrupt a print)."""
        if self.is_main():
            os.write(sys.stderr.fileno(), f"  {line}\n".encode())

    def _local_code(self) -> int:
        if self.duration_minutes is not None:
            if (self.clock() - self.started) / 60.0 > self.duration_minutes:
                return _OUT_OF_TIME
        return int(self.received or 0)

    def poll(self) -> str | None:
        """At a step boundary, on every rank: why all ranks stop now (a signal's name or
        ``train.exit_duration_in_mins``), or None to go on."""
        if not dist.is_initialized():
            return self._reason(self._local_code())
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        code = torch.tensor([self._local_code()], dtype=torch.int64)
        if self._pending is None:  # the first boundary: agree now
            dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self._group)
            agreed = int(code.item())
        else:
            previous, work = self._pending
            work.wait()
            agreed = int(previous.item())
        if agreed:
            self._pending = None
            return self._reason(agreed)
        code = torch.tensor([self._local_code()], dtype=torch.int64)
        work = dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (code, work)
        return None

    @staticmethod
    def _reason(code: int) -> str | None:
        if code == 0:
            return None
        if code == _OUT_OF_TIME:
            return "train.exit_duration_in_mins"
        return signal.Signals(code).name
