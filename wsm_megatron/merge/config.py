"""Typed, validated description of a merge (or of a sweep of merges).

:class:`MergeConfig` mirrors the ``wsm-merge`` flags one to one and validates everything that
can be checked without reading a checkpoint when it is constructed. A sweep is a tuple of
:class:`SweepEntry` that override the base selection/weighting; :meth:`MergeConfig.jobs`
resolves base and overrides into one :class:`MergeJob` per output.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsm_megatron.merge.errors import MergeError
from wsm_megatron.theory import MergeWeights, MergeWeightsConfig, MergeWeightsError, merge_weights

if TYPE_CHECKING:
    import torch

# torch dtypes by name: flags are checked without importing torch (``wsm-merge --help`` is fast).
ACCUMULATE_DTYPES: dict[str, str] = {"fp32": "float32", "fp64": "float64"}
OUTPUT_DTYPES: dict[str, str] = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp64": "float64",
}
DEFAULT_SCHEDULE = "linear"
"""A plain mean of the checkpoints (a linear decay), the paper's default merge."""
DEFAULT_MEMORY_BUDGET_MB = 1024.0

SELECTION_MODES = ("iterations", "last", "window_iters", "window_tokens")
_FLAG = {
    "iterations": "--iterations",
    "last": "--last",
    "window_iters": "--window-iters",
    "window_tokens": "--window-tokens",
    "end_iteration": "--end-iteration",
    "every": "--every",
    "tokens_per_iter": "--tokens-per-iter",
    "schedule": "--schedule",
    "weights": "--weights",
    "decay": "--weights",
    "num_checkpoints": "--weights",
    "positions": "--iterations",
    "min_lr_ratio": "--min-lr-ratio",
    "ema_beta": "--ema-beta",
    "allow_partial_window": "--allow-partial-window",
}
_TOKEN_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def _positive_int(value: Any, flag: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MergeError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_token_count(text: str) -> int:
    """``"80B"`` -> 80_000_000_000; suffixes K, M, B (= G), T; plain integers and ``1e9``."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([KMBGT]?)\s*", text)
    if not m:
        raise MergeError(f"expected a token count such as 80B, 5e9 or 1000000, got {text!r}")
    value = float(m.group(1)) * _TOKEN_SUFFIX[m.group(2)]
    if not value.is_integer() or value < 1:
        raise MergeError(f"token count must be a positive integer, got {text!r}")
    return int(value)


def format_token_count(tokens: int) -> str:
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if tokens % scale == 0:
            return f"{tokens // scale}{suffix}"
    return str(tokens)


@dataclass(frozen=True)
class Selection:
    """Which checkpoints: exactly one of ``iterations``, ``last``, ``window_iters``,
    ``window_tokens``; the window ends at ``end_iteration`` (default: the tracker's iteration)
    and ``every`` keeps every k-th checkpoint counting back from the newest. A window that the
    checkpoints on disk cannot fill is refused unless ``allow_partial_window``."""

    iterations: tuple[int, ...] | None = None
    last: int | None = None
    window_iters: int | None = None
    window_tokens: int | None = None
    end_iteration: int | None = None
    every: int = 1
    tokens_per_iter: int | None = None
    allow_partial_window: bool = False

    def __post_init__(self) -> None:
        modes = [m for m in SELECTION_MODES if getattr(self, m) is not None]
        if len(modes) != 1:
            flags = ", ".join(_FLAG[m] for m in SELECTION_MODES)
            got = ", ".join(_FLAG[m] for m in modes) or "none"
            raise MergeError(f"give exactly one of {flags} (got {got})")
        if self.iterations is not None:
            its = tuple(self.iterations)
            for it in its:
                _positive_int(it, "--iterations", minimum=0)
            if len(set(its)) != len(its):
                raise MergeError(f"--iterations contains duplicates: {list(its)}")
            object.__setattr__(self, "iterations", tuple(sorted(its)))
            if self.end_iteration is not None:
                raise MergeError("--end-iteration does not apply to --iterations")
            if self.every != 1:
                raise MergeError("--every does not apply to --iterations")
        for name in ("last", "window_iters", "window_tokens", "tokens_per_iter"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), _FLAG[name])
        if self.end_iteration is not None:
            _positive_int(self.end_iteration, "--end-iteration", minimum=0)
        _positive_int(self.every, "--every")
        if self.tokens_per_iter is not None and self.window_tokens is None:
            raise MergeError("--tokens-per-iter applies to --window-tokens only")

    def label(self) -> str:
        """Short name used for sweep outputs: ``last4``, ``400it``, ``80Btok``, ``it100-400``."""
        if self.iterations is not None:
            text = f"it{self.iterations[0]}-{self.iterations[-1]}"
        elif self.last is not None:
            text = f"last{self.last}"
        elif self.window_iters is not None:
            text = f"{self.window_iters}it"
        else:
            text = f"{format_token_count(self.window_tokens)}tok"
        return text + (f"-every{self.every}" if self.every != 1 else "")


def _weights_error(err: MergeWeightsError) -> MergeError:
    return MergeError(f"{_FLAG.get(err.param, err.param)}: {err}")


@dataclass(frozen=True)
class Weighting:
    """How to weight them: a ``schedule`` of the theory module (default ``linear``, the mean)
    with ``min_lr_ratio``/``ema_beta``, or raw ``weights`` (oldest first, sum 1)."""

    schedule: str | None = None
    weights: tuple[float, ...] | None = None
    min_lr_ratio: float = 0.0
    ema_beta: float | None = None

    def __post_init__(self) -> None:
        if self.schedule is not None and self.weights is not None:
            raise MergeError("give either --schedule or --weights, not both")
        if self.schedule is None and self.weights is None:
            object.__setattr__(self, "schedule", DEFAULT_SCHEDULE)
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        try:  # everything the theory module can check before the count is known
            checked = MergeWeightsConfig(
                schedule=self.schedule,
                weights=self.weights,
                num_checkpoints=None if self.weights is not None else 2,
                min_lr_ratio=self.min_lr_ratio,
                ema_beta=self.ema_beta,
            )
            checked.resolve()
        except MergeWeightsError as err:
            raise _weights_error(err) from None
        if self.schedule is not None:
            object.__setattr__(self, "schedule", checked.schedule)

    def resolve(self, positions: Sequence[int]) -> MergeWeights:
        """Coefficients for checkpoints at ``positions`` (oldest first): iterations, consumed
        samples or tokens; scaling all positions by one factor leaves them unchanged."""
        if self.weights is not None and len(self.weights) != len(positions):
            raise MergeError(
                f"--weights gives {len(self.weights)} weights but {len(positions)} checkpoints "
                f"were selected (iterations {list(positions)})"
            )
        try:
            return merge_weights(
                self.schedule,
                weights=self.weights,
                min_lr_ratio=self.min_lr_ratio,
                ema_beta=self.ema_beta,
                positions=list(positions),
            )
        except MergeWeightsError as err:
            raise _weights_error(err) from None

    def label(self) -> str:
        text = self.schedule if self.schedule is not None else "weights"
        if self.min_lr_ratio:
            text += f"-min{self.min_lr_ratio:g}"
        if self.ema_beta is not None:
            text += f"-beta{self.ema_beta:g}"
        return text


@dataclass(frozen=True)
class SweepEntry:
    """One output of a sweep: overrides of the base selection and weighting, and a name
    (the sub-directory of the output root; derived from the window and schedule if omitted)."""

    name: str | None = None
    iterations: tuple[int, ...] | None = None
    last: int | None = None
    window_iters: int | None = None
    window_tokens: int | None = None
    end_iteration: int | None = None
    every: int | None = None
    tokens_per_iter: int | None = None
    schedule: str | None = None
    weights: tuple[float, ...] | None = None
    min_lr_ratio: float | None = None
    ema_beta: float | None = None

    @classmethod
    def from_spec(cls, spec: str) -> SweepEntry:
        """Parse ``WINDOW:SCHEDULE[:NAME]``; WINDOW is ``N`` (the last N checkpoints), ``Nit``
        (a window of N iterations) or ``Ntok`` (N tokens, suffixes K/M/B/T: ``80Btok``)."""
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise MergeError(
                f"--sweep: expected WINDOW:SCHEDULE[:NAME] such as 4:minus-sqrt, 400it:linear "
                f"or 80Btok:cosine, got {spec!r}"
            )
        window, schedule = parts[0].strip(), parts[1].strip()
        name = parts[2].strip() if len(parts) == 3 else None
        if re.fullmatch(r"\d+", window):
            return cls(name=name, last=int(window), schedule=schedule)
        if re.fullmatch(r"\d+it", window):
            return cls(name=name, window_iters=int(window[:-2]), schedule=schedule)
        if window.endswith("tok"):
            return cls(name=name, window_tokens=parse_token_count(window[:-3]), schedule=schedule)
        raise MergeError(f"--sweep: bad window {window!r} in {spec!r} (use N, Nit or Ntok)")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> SweepEntry:
        """An entry of a sweep YAML file (keys as the flags, ``-`` or ``_``)."""
        if not isinstance(data, Mapping):
            raise MergeError(f"{where}: expected a mapping, got {data!r}")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise MergeError(f"{where}: unknown key {key!r}; valid: {', '.join(sorted(known))}")
            if name == "window_tokens" and isinstance(value, str):
                value = parse_token_count(value[:-3] if value.endswith("tok") else value)
            elif name == "window_tokens" and isinstance(value, float) and value.is_integer():
                value = int(value)
            if name in ("iterations", "weights") and value is not None:
                if not isinstance(value, list):
                    raise MergeError(f"{where}: {key} must be a list, got {value!r}")
                value = tuple(value)
            values[name] = value
        return cls(**values)


def load_sweep_file(path: str | Path) -> tuple[SweepEntry, ...]:
    """Read a YAML list of sweep entries (or a mapping with a ``sweep:`` list)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise MergeError(f"--sweep: cannot read {path}: {err}") from None
    if isinstance(data, Mapping) and "sweep" in data:
        data = data["sweep"]
    if not isinstance(data, list) or not data:
        raise MergeError(f"--sweep: {path} must hold a non-empty list of entries")
    return tuple(SweepEntry.from_mapping(d, f"{path} entry {i}") for i, d in enumerate(data))


@dataclass(frozen=True)
class MergeJob:
    """One output: its checkpoint selection, weighting and output root."""

    name: str | None
    selection: Selection
    weighting: Weighting
    output_root: Path


@dataclass
class MergeConfig:
    """A merge of Megatron ``torch_dist`` checkpoints from ``input`` (a checkpoint root with
    ``iter_*`` directories) into ``output`` (a root that receives ``iter_<newest>/`` and the
    tracker file; with ``sweep``, one such root per entry under ``output/<name>/``)."""

    input: Path
    output: Path
    # Which checkpoints (see Selection).
    iterations: Sequence[int] | None = None
    last: int | None = None
    window_iters: int | None = None
    window_tokens: int | None = None
    end_iteration: int | None = None
    every: int = 1
    tokens_per_iter: int | None = None
    # Weights (see Weighting).
    schedule: str | None = None
    weights: Sequence[float] | None = None
    min_lr_ratio: float = 0.0
    ema_beta: float | None = None
    # Several outputs in one pass over the inputs.
    sweep: Sequence[SweepEntry] = ()
    # Numerics and contents.
    accumulate_dtype: str = "fp32"
    output_dtype: str | None = None
    check_finite: bool = True
    keep_optimizer: bool = False
    keep_rng: bool = False
    copy_from_newest: Sequence[str] = ()
    average: Sequence[str] = ()
    allow_partial_window: bool = False
    # The input whose TP/PP/EP layout (chunks and per-shard objects) the output takes.
    layout_from: int | None = None
    # Resources, output handling, reporting.
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    io_threads: int = 2
    threads: int = 1
    overwrite: bool = False
    report: Path | None = None
    progress: bool = False
    _jobs: tuple[MergeJob, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.input = Path(self.input)
        self.output = Path(self.output)
        self.report = Path(self.report) if self.report is not None else None
        if self.iterations is not None:
            self.iterations = tuple(self.iterations)
        if self.weights is not None:
            self.weights = tuple(self.weights)
        self.sweep = tuple(self.sweep)
        self.copy_from_newest = tuple(self.copy_from_newest)
        self.average = tuple(self.average)
        if self.accumulate_dtype not in ACCUMULATE_DTYPES:
            raise MergeError(
                f"--accumulate-dtype must be one of {', '.join(ACCUMULATE_DTYPES)}, "
                f"got {self.accumulate_dtype!r}"
            )
        if self.output_dtype is not None and self.output_dtype not in OUTPUT_DTYPES:
            raise MergeError(
                f"--output-dtype must be one of {', '.join(OUTPUT_DTYPES)}, "
                f"got {self.output_dtype!r}"
            )
        if not (isinstance(self.memory_budget_mb, (int, float)) and self.memory_budget_mb > 0):
            raise MergeError(f"--memory-budget-mb must be > 0, got {self.memory_budget_mb!r}")
        if not math.isfinite(self.memory_budget_mb):
            raise MergeError(f"--memory-budget-mb must be finite, got {self.memory_budget_mb!r}")
        _positive_int(self.io_threads, "--io-threads")
        _positive_int(self.threads, "--threads")
        if self.layout_from is not None:
            _positive_int(self.layout_from, "--layout-from", minimum=0)
        if self.input.resolve() == self.output.resolve():
            raise MergeError(
                f"--output must differ from --input ({self.input}): the merge never writes into "
                "the training run's checkpoint root"
            )
        self._jobs = self._resolve_jobs()
        windows = [j for j in self._jobs if j.selection.window_iters or j.selection.window_tokens]
        if self.allow_partial_window and not windows:
            raise MergeError("--allow-partial-window applies to --window-iters/--window-tokens")

    @property
    def accumulate_torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, ACCUMULATE_DTYPES[self.accumulate_dtype])

    @property
    def output_torch_dtype(self) -> torch.dtype | None:
        import torch

        return (
            None if self.output_dtype is None else getattr(torch, OUTPUT_DTYPES[self.output_dtype])
        )

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 2**20)

    def jobs(self) -> tuple[MergeJob, ...]:
        """One job per output: the base selection/weighting, or one per sweep entry."""
        return self._jobs

    def _base_selection(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in (
                *SELECTION_MODES,
                "end_iteration",
                "every",
                "tokens_per_iter",
                "allow_partial_window",
            )
        }

    def _base_weighting(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in ("schedule", "weights", "min_lr_ratio", "ema_beta")}

    def _resolve_jobs(self) -> tuple[MergeJob, ...]:
        base_sel, base_w = self._base_selection(), self._base_weighting()
        if not self.sweep:
            return (MergeJob(None, Selection(**base_sel), Weighting(**base_w), self.output),)
        jobs = []
        for i, entry in enumerate(self.sweep):
            sel = dict(base_sel)
            if any(getattr(entry, m) is not None for m in SELECTION_MODES):
                sel.update({m: getattr(entry, m) for m in SELECTION_MODES})
            for name in ("end_iteration", "every", "tokens_per_iter"):
                if getattr(entry, name) is not None:
                    sel[name] = getattr(entry, name)
            w = dict(base_w)
            if entry.schedule is not None or entry.weights is not None:
                w.update(schedule=entry.schedule, weights=entry.weights)
                if entry.schedule is None or entry.schedule.lower() != "ema":
                    w["ema_beta"] = None
                if entry.weights is not None:
                    w["min_lr_ratio"] = 0.0
            for name in ("min_lr_ratio", "ema_beta"):
                if getattr(entry, name) is not None:
                    w[name] = getattr(entry, name)
            try:
                selection, weighting = Selection(**sel), Weighting(**w)
            except MergeError as err:
                raise MergeError(f"sweep entry {i} ({entry.name or 'unnamed'}): {err}") from None
            name = entry.name or f"{selection.label()}-{weighting.label()}"
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name):
                raise MergeError(f"sweep entry {i}: invalid output name {name!r}")
            jobs.append(MergeJob(name, selection, weighting, self.output / name))
        names = [j.name for j in jobs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise MergeError(f"sweep entries share output names {dupes}; give each a distinct name")
        return tuple(jobs)
