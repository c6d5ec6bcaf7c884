"""SIGTERM as a request to stop, honoured where unwinding is safe.

SLURM and torchrun stop jobs with SIGTERM. Outside threaded sections the handler raises
``SystemExit(143)`` at once, so ``finally`` blocks remove temporary output. Inside a
:func:`deferred` section (a loop that shares queues and locks with worker threads, where an
exception raised at an arbitrary bytecode could leave a lock held and the unwinding hang)
it only records the request; the loop calls :func:`raise_if_requested` between units of work.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_STATUS = 128 + signal.SIGTERM

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
