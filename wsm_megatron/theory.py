"""WSM merge coefficients: Theorem 3.1 of arXiv 2507.17634, in pure Python floats (fp64).

Convention (the paper's Figure 2)
---------------------------------
``n`` checkpoints θ_0..θ_{n-1}, oldest first, saved at equal spacing under a constant LR.
``g_i = θ_{i-1} - θ_i`` is the whole update from checkpoint i-1 to checkpoint i (i = 1..n-1),
learning rate included. A merge ``Σ c_j θ_j`` with ``c_j >= 0`` and ``Σ c_j = 1`` equals::

    θ_0 - Σ_{i=1..n-1} w_i g_i,        w_i = Σ_{j>=i} c_j

so it applies the decay factor ``w_i`` (a fraction of the peak LR) to update ``g_i``: it emulates
an LR decay. Conversely a decay ``1 >= w_1 >= ... >= w_{n-1} >= 0`` is reproduced by::

    c_0 = 1 - w_1,    c_i = w_i - w_{i+1}  (1 <= i <= n-2),    c_{n-1} = w_{n-1}

A schedule ``f`` on [0, 1] (``f(0) = 1`` is the peak LR, ``t = 1`` the end of the emulated decay)
is sampled as ``w_i = f(i/n)``. Every path (schedule, custom decay, EMA, minimum-LR floor,
irregular positions) produces ``w`` first and goes through the one ``w -> c`` map above; raw
weights go through the inverse map ``w_i = Σ_{j>=i} c_j``.

See :func:`decay_times` for irregular checkpoint spacing and :func:`schedule_function` for EMA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

SUM_TOLERANCE = 1e-6
"""Largest accepted ``|Σ c_j - 1|`` for raw weights."""

CONCENTRATION_LIMIT = 1.0 - 1e-6
"""A derived weighting (schedule or decay) that puts at least this share of the mass on one
checkpoint is refused: the "merge" would be that checkpoint alone."""

EMA_WINDOW_DECAY = 0.1
"""Default EMA decay over the whole window, ``β^n = 0.1`` (``β = 0.1^{1/n}``, paper Figure 2)."""


class MergeWeightsError(ValueError):
    """Invalid merge input; ``param`` names the offending argument (e.g. ``"weights"``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _linear(t: float) -> float:
    return 1.0 - t


def _cosine(t: float) -> float:
    return 0.5 * (math.cos(math.pi * t) + 1.0)


def _minus_sqrt(t: float) -> float:
    return 1.0 - math.sqrt(t)


def _exponential(t: float) -> float:
    # Megatron-LM's WSD "exponential" style: 1 at t = 0, 0 at t = 1.
    return (2.0 * math.pow(0.5, t)) - 1.0


def _ema(t: float, window_decay: float = EMA_WINDOW_DECAY) -> float:
    return 1.0 - window_decay ** (1.0 - t)


SCHEDULES: dict[str, Callable[[float], float]] = {
    "linear": _linear,
    "cosine": _cosine,
    "minus-sqrt": _minus_sqrt,
    "exponential": _exponential,
    "ema": _ema,
}
"""Canonical schedule name -> ``f(t)`` on [0, 1] (``ema`` with its default window decay 0.1)."""

ALIASES: dict[str, str] = {"1-sqrt": "minus-sqrt", "minus_sqrt": "minus-sqrt"}
"""Accepted alternative names (the paper's ``1-sqrt``, Megatron's ``minus_sqrt``)."""


def canonical_schedule(name: str) -> str:
    """Canonical name of a schedule (aliases resolved, case-insensitive)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in SCHEDULES:
        valid = ", ".join(SCHEDULES)
        aliases = ", ".join(f"{a} = {c}" for a, c in ALIASES.items())
        raise MergeWeightsError(
            "schedule", f"unknown schedule {name!r}; valid: {valid} (aliases: {aliases})"
        )
    return key


def schedule_function(
    name: str, *, min_lr_ratio: float = 0.0, ema_window_decay: float = EMA_WINDOW_DECAY
) -> Callable[[float], float]:
    """Continuous emulated schedule ``t -> r + (1 - r) f(t)`` on [0, 1] (for plotting).

    EMA: an EMA with factor β per checkpoint (``c_j = (1-β) β^{n-1-j}`` for j >= 1,
    ``c_0 = β^{n-1}``) has ``w_i = 1 - β^{n-i} = f(i/n)`` with ``f(t) = 1 - B^{1-t}``, where
    ``B = β^n`` (``ema_window_decay``) is the EMA's decay over the whole window. So EMA is the
    schedule family ``f_B``; the paper's ``β = 0.1^{1/n}`` is ``B = 0.1``. Note ``f(0) = 1 - B``:
    an EMA never starts at, nor anneals close to, the peak/zero ends.
    """
    key = canonical_schedule(name)
    _check_min_lr_ratio(min_lr_ratio)
    if key == "ema":
        if not 0.0 <= ema_window_decay < 1.0:  # 0: beta**span underflowed, f = 1 on [0, 1)
            raise MergeWeightsError(
                "ema_beta", f"EMA window decay must be in [0, 1), got {ema_window_decay}"
            )

        def f(t: float) -> float:
            return _ema(t, ema_window_decay)
    else:
        f = SCHEDULES[key]
    if min_lr_ratio == 0.0:
        return f
    return lambda t: min_lr_ratio + (1.0 - min_lr_ratio) * f(t)


def _check_count(n: int) -> None:
    if n < 2:
        raise MergeWeightsError("num_checkpoints", f"need at least 2 checkpoints, got {n}")


def _check_min_lr_ratio(r: float) -> None:
    if not 0.0 <= r <= 1.0:
        raise MergeWeightsError("min_lr_ratio", f"min LR ratio must be in [0, 1], got {r}")


def _exact_positions(positions: Sequence[float], n: int) -> list[Fraction]:
    if len(positions) != n:
        raise MergeWeightsError("positions", f"got {len(positions)} positions for {n} checkpoints")
    for p in positions:
        if not math.isfinite(p):
            raise MergeWeightsError("positions", f"positions must be finite, got {p}")
    exact = [Fraction(p) for p in positions]
    for i in range(1, n):
        if exact[i] <= exact[i - 1]:
            raise MergeWeightsError(
                "positions",
                f"positions must be strictly increasing, got {positions[i - 1]} then "
                f"{positions[i]} (checkpoints {i - 1} and {i})",
            )
    return exact


def window_span(n: int, positions: Sequence[float] | None = None) -> float:
    """Length ``T - p_0`` of the emulated window: ``n`` without positions (unit = one spacing),
    else ``(p_{n-1} - p_0) * n / (n - 1)`` in position units (see :func:`decay_times`)."""
    _check_count(n)
    if positions is None:
        return float(n)
    p = _exact_positions(positions, n)
    return float((p[-1] - p[0]) * n / (n - 1))


def decay_times(n: int, positions: Sequence[float] | None = None) -> list[float]:
    """Schedule times ``t_1..t_{n-1}`` at which ``f`` is sampled (``w_i = f(t_i)``).

    Equal spacing: ``t_i = i/n``. Irregular spacing (a restart or a changed save interval leaves
    gaps): ``positions`` p_0 < ... < p_{n-1} are the checkpoints' iterations (or tokens). The
    window runs from ``p_0`` to one average spacing past the newest checkpoint,
    ``T = p_{n-1} + (p_{n-1} - p_0)/(n-1)``, and ``t_i = (p_i - p_0)/(T - p_0)``; for equal
    spacing Δ, ``T = p_0 + nΔ`` and ``t_i = i/n`` exactly (computed in exact rational
    arithmetic and rounded once, so bitwise equal to ``i / n``).

    Why positions matter: update ``g_i`` (from p_{i-1} to p_i) now spans ``p_i - p_{i-1}``
    optimizer steps (or tokens), no longer the same number for every i. The merge scales the
    whole update by one factor, so every step inside (p_{i-1}, p_i] is emulated at LR
    ``w_i * peak``: the emulated schedule is piecewise constant with pieces of unequal width,
    and ``w_i = f(t_i)`` samples ``f`` at the right end of each piece, as Figure 2 does. A long
    gap gets one LR level over its whole length (a coarser emulation there). ``t_{n-1}`` is
    ``(n-1)/n`` whatever the spacing, so the final emulated LR matches equal spacing.
    """
    _check_count(n)
    if positions is None:
        return [i / n for i in range(1, n)]
    p = _exact_positions(positions, n)
    den = (p[-1] - p[0]) * n
    return [float((p[i] - p[0]) * (n - 1) / den) for i in range(1, n)]


def schedule_decay(
    name: str,
    n: int | None = None,
    *,
    min_lr_ratio: float = 0.0,
    positions: Sequence[float] | None = None,
    ema_beta: float | None = None,
) -> list[float]:
    """Emulated decay ``w_1..w_{n-1}`` of a named schedule, ``w_i = r + (1 - r) f(t_i)``.

    ``n`` may be omitted when ``positions`` are given. ``ema_beta`` (``ema`` only) is the EMA
    factor per checkpoint (the paper's Figure 2); with irregular positions it is the factor per
    *average spacing* ``Δ = (p_{n-1} - p_0)/(n-1)``, so the window decay is ``B = β^n`` either
    way and ``w_i = 1 - β^{(T - p_i)/Δ}``: equal spacing gives exactly Figure 2's coefficients,
    and scaling the positions (iterations, samples or tokens) changes nothing. Default:
    ``B = 0.1``. The floor ``r`` applies to the emulated decay of every schedule, EMA included.
    """
    key = canonical_schedule(name)
    if positions is not None:
        if n is not None and n != len(positions):
            raise MergeWeightsError(
                "num_checkpoints",
                f"num_checkpoints={n} disagrees with {len(positions)} positions",
            )
        n = len(positions)
    if n is None:
        raise MergeWeightsError("num_checkpoints", "give the number of checkpoints or positions")
    times = decay_times(n, positions)
    window_decay = EMA_WINDOW_DECAY
    if ema_beta is not None:
        if key != "ema":
            raise MergeWeightsError("ema_beta", f"ema_beta applies to 'ema' only, not {key!r}")
        if not 0.0 < ema_beta < 1.0:
            raise MergeWeightsError("ema_beta", f"EMA beta must be in (0, 1), got {ema_beta}")
        window_decay = ema_beta**n
    f = schedule_function(key, min_lr_ratio=min_lr_ratio, ema_window_decay=window_decay)
    return [f(t) for t in times]


def coefficients_from_decay(decay: Sequence[float]) -> list[float]:
    """Merge coefficients ``c_0..c_{n-1}`` (oldest first) from a decay ``w_1..w_{n-1}``.

    ``decay`` must lie in [0, 1] and be non-increasing; then every ``c`` is >= 0 and they sum
    to 1 up to rounding (telescoping sum).
    """
    w = [float(x) for x in decay]
    _check_decay(w)
    return [1.0 - w[0]] + [w[i] - w[i + 1] for i in range(len(w) - 1)] + [w[-1]]


def _check_decay(w: Sequence[float]) -> None:
    _check_count(len(w) + 1)
    for i, x in enumerate(w, start=1):
        if not 0.0 <= x <= 1.0:
            raise MergeWeightsError("decay", f"decay must lie in [0, 1], got w_{i} = {x}")
    for i in range(1, len(w)):
        if w[i] > w[i - 1]:
            raise MergeWeightsError(
                "decay",
                f"decay must be non-increasing, got w_{i} = {w[i - 1]} < w_{i + 1} = {w[i]}",
            )


def check_spread(coefficients: Sequence[float], param: str) -> None:
    """Refuse a derived weighting that puts >= :data:`CONCENTRATION_LIMIT` of the mass on one
    checkpoint (explicit raw weights are not checked: the user asked for them)."""
    j = max(range(len(coefficients)), key=lambda i: coefficients[i])
    if len(coefficients) > 1 and coefficients[j] >= CONCENTRATION_LIMIT:
        raise MergeWeightsError(
            param,
            f"the weighting puts {coefficients[j]:.7f} of the mass on checkpoint {j} of "
            f"{len(coefficients)}: the merge would be that checkpoint alone (choose a larger "
            "EMA beta or a lower min LR ratio, or give the weights explicitly)",
        )


def decay_from_coefficients(coeffs: Sequence[float]) -> list[float]:
    """Inverse map: the emulated decay ``w_i = Σ_{j>=i} c_j``, i = 1..n-1.

    ``coeffs`` (oldest first) must be >= 0 and sum to 1 within :data:`SUM_TOLERANCE`.
    """
    c = [float(x) for x in coeffs]
    _check_count(len(c))
    for j, x in enumerate(c):
        if not math.isfinite(x):
            raise MergeWeightsError("weights", f"weights must be finite numbers, got c_{j} = {x}")
        if x < 0.0:
            raise MergeWeightsError("weights", f"weights must be non-negative, got c_{j} = {x}")
    total = math.fsum(c)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise MergeWeightsError(
            "weights", f"weights must sum to 1 (tolerance {SUM_TOLERANCE:g}), got sum {total!r}"
        )
    w = [0.0] * (len(c) - 1)
    acc = 0.0
    for i in range(len(c) - 1, 0, -1):
        acc += c[i]
        w[i - 1] = acc
    return w


@dataclass(frozen=True)
class MergeWeights:
    """Merge coefficients (oldest checkpoint first) and the decay ``w_1..w_{n-1}`` they emulate.

    ``decay[i-1]`` is the fraction of peak LR applied to the update ending at checkpoint i.
    """

    coefficients: tuple[float, ...]
    decay: tuple[float, ...]

    @property
    def num_checkpoints(self) -> int:
        return len(self.coefficients)


@dataclass
class MergeWeightsConfig:
    """Validated description of a merge; exactly one of ``schedule``, ``decay``, ``weights``.

    ``positions`` (iterations or tokens, oldest first) are optional; with ``schedule`` they set
    the sampling times (:func:`decay_times`) and ``num_checkpoints`` may be omitted. With
    ``decay`` or ``weights`` they are only checked against the count. ``min_lr_ratio`` applies
    to ``schedule`` and ``decay``; ``ema_beta`` to the ``ema`` schedule only.
    """

    schedule: str | None = None
    num_checkpoints: int | None = None
    decay: Sequence[float] | None = None
    weights: Sequence[float] | None = None
    min_lr_ratio: float = 0.0
    ema_beta: float | None = None
    positions: Sequence[float] | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("schedule", "decay", "weights") if getattr(self, k) is not None]
        if len(given) != 1:
            raise MergeWeightsError(
                "schedule", f"give exactly one of schedule, decay, weights (got {given or 'none'})"
            )
        _check_min_lr_ratio(self.min_lr_ratio)
        if self.schedule is not None:
            self.schedule = canonical_schedule(self.schedule)
        elif self.ema_beta is not None:
            raise MergeWeightsError("ema_beta", "ema_beta applies to the 'ema' schedule only")
        if self.weights is not None and self.min_lr_ratio != 0.0:
            raise MergeWeightsError(
                "min_lr_ratio", "min_lr_ratio applies to a schedule or decay, not to raw weights"
            )
        counts: dict[str, int | None] = {"num_checkpoints": self.num_checkpoints}
        if self.decay is not None:
            self.decay = tuple(float(x) for x in self.decay)
            counts["decay"] = len(self.decay) + 1
        if self.weights is not None:
            self.weights = tuple(float(x) for x in self.weights)
            counts["weights"] = len(self.weights)
        if self.positions is not None:
            self.positions = tuple(self.positions)
            counts["positions"] = len(self.positions)
        counts = {k: v for k, v in counts.items() if v is not None}
        if not counts:
            raise MergeWeightsError(
                "num_checkpoints", "give the number of checkpoints (or their positions)"
            )
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k} -> {v}" for k, v in counts.items())
            param = "num_checkpoints" if self.num_checkpoints is not None else "positions"
            raise MergeWeightsError(param, f"inconsistent checkpoint counts: {detail}")
        self.num_checkpoints = next(iter(counts.values()))
        _check_count(self.num_checkpoints)
        if self.positions is not None:
            _exact_positions(self.positions, self.num_checkpoints)

    def resolve(self) -> MergeWeights:
        """Compute the coefficients and emulated decay."""
        if self.weights is not None:
            decay = decay_from_coefficients(self.weights)
            return MergeWeights(tuple(self.weights), tuple(decay))
        if self.schedule is not None:
            decay = schedule_decay(
                self.schedule,
                self.num_checkpoints,
                min_lr_ratio=self.min_lr_ratio,
                positions=self.positions,
                ema_beta=self.ema_beta,
            )
        else:
            _check_decay(self.decay)  # the given decay, before the floor
            r = self.min_lr_ratio
            decay = [r + (1.0 - r) * w for w in self.decay] if r else list(self.decay)
        coefficients = coefficients_from_decay(decay)
        check_spread(coefficients, "schedule" if self.schedule is not None else "decay")
        return MergeWeights(tuple(coefficients), tuple(decay))

    def continuous_schedule(self) -> Callable[[float], float] | None:
        """The continuous emulated schedule on [0, 1] (``None`` for decay/weights)."""
        if self.schedule is None:
            return None
        window_decay = EMA_WINDOW_DECAY
        if self.ema_beta is not None:
            window_decay = self.ema_beta**self.num_checkpoints
        return schedule_function(
            self.schedule, min_lr_ratio=self.min_lr_ratio, ema_window_decay=window_decay
        )


def merge_weights(
    schedule: str | None = None,
    num_checkpoints: int | None = None,
    *,
    decay: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    min_lr_ratio: float = 0.0,
    ema_beta: float | None = None,
    positions: Sequence[float] | None = None,
) -> MergeWeights:
    """Merge coefficients from exactly one of a schedule, a decay, or raw weights.

    Example: ``merge_weights("minus-sqrt", 4).coefficients`` ->
    ``(0.5, 0.2071..., 0.1589..., 0.1339...)``; ``merge_weights("linear", positions=iters)``
    for checkpoints saved at iterations ``iters`` (see :func:`decay_times`). Raises
    :class:`MergeWeightsError` (a ``ValueError``) on invalid input.
    """
    return MergeWeightsConfig(
        schedule=schedule,
        num_checkpoints=num_checkpoints,
        decay=decay,
        weights=weights,
        min_lr_ratio=min_lr_ratio,
        ema_beta=ema_beta,
        positions=positions,
    ).resolve()
