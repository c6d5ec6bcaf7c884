"""Peak-memory measurement, the rank-0 progress bar, and the JSON report of a merge."""

from __future__ import annotations

import re
import resource
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsm_megatron.atomic import atomic_write_text

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field_name: str) -> int | None:
    try:
        text = _PROC_STATUS.read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak resident memory of this process above a baseline taken at construction.

    On Linux the kernel's high-water mark (``VmHWM``) is reset at the baseline by writing ``5``
    to ``/proc/self/clear_refs``, so earlier peaks (imports, start-up) do not count. Elsewhere
    ``ru_maxrss`` (lifetime peak) is used and ``exact`` is False.
    """

    def __init__(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")
            self.exact = _status_kib("VmHWM") is not None
        except OSError:
            self.exact = False
        rss = _status_kib("VmRSS")
        self.baseline = rss * 1024 if rss is not None else self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        """Peak RSS in bytes since the baseline (absolute)."""
        hwm = _status_kib("VmHWM") if self.exact else None
        return hwm * 1024 if hwm is not None else self._maxrss()

    def peak_above_baseline(self) -> int:
        return max(0, self.peak() - self.baseline)


class Progress:
    """A tqdm bar of bytes read (rate and ETA), thread-safe; a no-op when disabled."""

    def __init__(self, total: int, *, enabled: bool, desc: str) -> None:
        self._bar = None
        self._lock = threading.Lock()
        if enabled:
            from tqdm import tqdm

            interactive = sys.stderr.isatty()
            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                mininterval=0.5 if interactive else 30.0,
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def update(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class JobReport:
    """One output of the merge."""

    name: str | None
    output: str
    iteration: int
    inputs: list[dict[str, Any]]
    coefficients: list[float]
    emulated_decay: list[float]
    schedule: str | None
    min_lr_ratio: float
    ema_beta: float | None
    position_unit: str  # of each input's "position": "tokens", "samples" or "iterations"
    position_source: str
    partial_window: str | None  # what --allow-partial-window accepted missing


@dataclass
class MergeResult:
    """What a merge did; returned on every rank, written by rank 0 with ``--report``."""

    jobs: list[JobReport]
    inputs: list[dict[str, Any]]
    ranks: int
    seconds: float
    bytes_read: int
    bytes_read_per_rank: list[int]
    bytes_written: int
    read_throughput_mib_s: float
    peak_rss_mib: float
    peak_rss_mib_per_rank: list[float]
    peak_rss_exact: bool
    rank0_planning_peak_rss_mib: float  # rank 0 after reading the inputs and sending the plans
    memory_budget_mib: float
    buffer_mib: float
    piece_capacity_elements: int
    pieces: int
    chunks: int
    chunks_streamed: int
    accumulate_dtype: str
    output_dtype: str | None
    tool_version: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_report(path: Path, result: MergeResult) -> None:
    """Write ``result`` as JSON atomically (temporary file, rename)."""
    import json

    atomic_write_text(path, json.dumps(result.to_json(), indent=2) + "\n")
