"""Theorem 3.1 of the WSM paper: merge coefficients <-> emulated LR decay.

Expected values are written from closed forms here, independently of wsm_megatron.theory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsm_megatron.theory import (
    SCHEDULES,
    SUM_TOLERANCE,
    MergeWeights,
    MergeWeightsConfig,
    MergeWeightsError,
    coefficients_from_decay,
    decay_from_coefficients,
    decay_times,
    merge_weights,
    schedule_decay,
    schedule_function,
    window_span,
)

ALL = ["linear", "cosine", "minus-sqrt", "exponential", "ema"]


def coeffs(schedule: str, n: int, **kw) -> list[float]:
    return list(merge_weights(schedule, n, **kw).coefficients)


# --- hand-checkable values -------------------------------------------------------------------


def test_linear_is_plain_mean():
    assert coeffs("linear", 10) == pytest.approx([0.1] * 10, abs=1e-15)
    assert coeffs("linear", 4) == [0.25] * 4  # exact in binary


def test_minus_sqrt_n4():
    assert coeffs("minus-sqrt", 4) == pytest.approx([0.5, 0.20711, 0.15892, 0.13397], abs=5e-6)


def test_cosine_n4():
    assert coeffs("cosine", 4) == pytest.approx([0.14645, 0.35355, 0.35355, 0.14645], abs=5e-6)


def _closed_form(schedule: str, n: int) -> list[float]:
    """c_0..c_{n-1} written out per schedule (paper Figure 2 convention, w_i = f(i/n))."""
    s = math.sqrt
    if schedule == "linear":
        return [1 / n] * n
    if schedule == "cosine":  # f = (1 + cos(pi t)) / 2
        cos = [math.cos(math.pi * j / n) for j in range(n)]
        return (
            [(1 - cos[1]) / 2]
            + [(cos[j] - cos[j + 1]) / 2 for j in range(1, n - 1)]
            + [(1 + cos[n - 1]) / 2]
        )
    if schedule == "minus-sqrt":  # f = 1 - sqrt(t): oldest gets sqrt(1/n)
        return (
            [s(1 / n)] + [s((j + 1) / n) - s(j / n) for j in range(1, n - 1)] + [1 - s((n - 1) / n)]
        )
    if schedule == "exponential":  # f = 2 * 0.5^t - 1
        return (
            [2 - 2 * 0.5 ** (1 / n)]
            + [2 * (0.5 ** (j / n) - 0.5 ** ((j + 1) / n)) for j in range(1, n - 1)]
            + [2 * 0.5 ** ((n - 1) / n) - 1]
        )
    if schedule == "ema":  # c_j = (1 - b) b^(n-1-j), c_0 = b^(n-1), b = 0.1^(1/n)
        b = 0.1 ** (1 / n)
        return [b ** (n - 1)] + [(1 - b) * b ** (n - 1 - j) for j in range(1, n)]
    raise AssertionError(schedule)


@pytest.mark.parametrize("schedule", ALL)
@pytest.mark.parametrize("n", [2, 3, 4, 10, 12])
def test_closed_forms(schedule, n):
    assert coeffs(schedule, n) == pytest.approx(_closed_form(schedule, n), abs=1e-12)


FIGURE2_N10 = {  # three decimals, oldest first
    "linear": [0.1] * 10,
    "cosine": [0.024, 0.071, 0.111, 0.139, 0.155, 0.155, 0.139, 0.111, 0.071, 0.024],
    "minus-sqrt": [0.316, 0.131, 0.101, 0.085, 0.075, 0.067, 0.062, 0.058, 0.054, 0.051],
    "ema": [0.126, 0.033, 0.041, 0.052, 0.065, 0.082, 0.103, 0.130, 0.163, 0.206],
}


@pytest.mark.parametrize("schedule", FIGURE2_N10)
def test_figure2_n10_three_decimals(schedule):
    got = coeffs(schedule, 10)
    assert [round(c, 3) for c in got] == FIGURE2_N10[schedule]
    assert [round(c, 3) for c in _closed_form(schedule, 10)] == FIGURE2_N10[schedule]


def test_figure2_landmarks():
    assert coeffs("minus-sqrt", 10)[0] == pytest.approx(math.sqrt(0.1))  # oldest largest
    ema = coeffs("ema", 10)
    assert ema[0] == pytest.approx(0.1**0.9)
    assert ema[-1] == pytest.approx(1 - 0.1**0.1)  # final emulated LR ~0.2: never anneals
    cos = coeffs("cosine", 10)
    assert cos == pytest.approx(cos[::-1], abs=1e-12)  # symmetric


def test_schedule_functions():
    for name in ["linear", "cosine", "minus-sqrt", "exponential"]:
        f = SCHEDULES[name]
        assert f(0.0) == 1.0 and f(1.0) == pytest.approx(0.0, abs=1e-15)
    assert SCHEDULES["exponential"](0.5) == pytest.approx(2 * math.sqrt(0.5) - 1)
    assert SCHEDULES["ema"](0.0) == pytest.approx(0.9)  # 1 - 0.1^(1-t)
    g = schedule_function("1-sqrt", min_lr_ratio=0.2)
    assert g(0.25) == pytest.approx(0.2 + 0.8 * 0.5)


def test_aliases():
    ref = coeffs("minus-sqrt", 5)
    for alias in ["1-sqrt", "minus_sqrt", "Minus-Sqrt"]:
        assert coeffs(alias, 5) == ref


# --- Theorem 3.1 identity and the inverse map --------------------------------------------------


@pytest.mark.parametrize("schedule", ALL)
def test_merge_equals_decayed_updates(schedule):
    """sum_j c_j theta_j == theta_0 - sum_i w_i g_i for arbitrary updates g (pure algebra)."""
    rng = np.random.default_rng(0)
    for n in range(2, 13):
        mw = merge_weights(schedule, n)
        theta0 = rng.normal(size=7)
        g = rng.normal(size=(n, 7))  # g[i] for i = 1..n-1: update from theta_{i-1} to theta_i
        thetas = [theta0]
        for i in range(1, n):
            thetas.append(thetas[-1] - g[i])
        merged = sum(c * t for c, t in zip(mw.coefficients, thetas, strict=True))
        decayed = theta0 - sum(w * g[i] for i, w in enumerate(mw.decay, start=1))
        np.testing.assert_allclose(merged, decayed, rtol=0, atol=1e-12)


def test_inverse_round_trip():
    rng = np.random.default_rng(1)
    for n in range(2, 13):
        w = sorted(rng.uniform(0, 1, size=n - 1).tolist(), reverse=True)
        c = coefficients_from_decay(w)
        assert min(c) >= 0 and math.fsum(c) == pytest.approx(1.0, abs=1e-15)
        assert decay_from_coefficients(c) == pytest.approx(w, abs=1e-15)
        c2 = rng.dirichlet(np.ones(n)).tolist()
        assert coefficients_from_decay(decay_from_coefficients(c2)) == pytest.approx(c2, abs=1e-15)


def test_weights_path_keeps_coefficients():
    mw = merge_weights(weights=[0.5, 0.25, 0.25])
    assert mw == MergeWeights((0.5, 0.25, 0.25), (0.5, 0.25))
    assert mw.num_checkpoints == 3


def test_decay_path():
    mw = merge_weights(decay=[0.75, 0.5, 0.25])
    assert mw.coefficients == (0.25, 0.25, 0.25, 0.25)
    assert mw.decay == (0.75, 0.5, 0.25)


# --- minimum-LR floor ---------------------------------------------------------------------------


def test_min_lr_floor_linear_by_hand():
    # w_i = 0.1 + 0.9 (1 - i/10): c_0..c_8 = 0.09, c_9 = w_9 = 0.19
    c = coeffs("linear", 10, min_lr_ratio=0.1)
    assert c == pytest.approx([0.09] * 9 + [0.19], abs=1e-15)


@pytest.mark.parametrize("schedule", ALL)
@pytest.mark.parametrize("r", [0.0, 0.05, 0.3, 0.999])
def test_min_lr_floor(schedule, r):
    mw = merge_weights(schedule, 8, min_lr_ratio=r)
    base = schedule_decay(schedule, 8)
    assert mw.decay == pytest.approx([r + (1 - r) * w for w in base], abs=1e-15)
    assert mw.coefficients[-1] >= r
    assert math.fsum(mw.coefficients) == pytest.approx(1.0, abs=1e-14)
    assert min(mw.coefficients) >= 0


def test_min_lr_floor_on_custom_decay():
    mw = merge_weights(decay=[0.5, 0.0], min_lr_ratio=0.5)
    assert mw.decay == (0.75, 0.5)
    assert mw.coefficients == (0.25, 0.25, 0.5)


# --- irregular spacing -----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ALL)
def test_equal_spacing_is_bitwise_the_convention(schedule):
    rng = np.random.default_rng(2)
    for n in range(2, 13):
        p0, step = int(rng.integers(0, 10**6)), int(rng.integers(1, 10**4))
        for positions in (
            [p0 + i * step for i in range(n)],
            [10_200_000_000_000 + i * 25_000_000_000 for i in range(n)],  # tokens
            [float(p0 + i * step) for i in range(n)],
            np.arange(n, dtype=np.int64) * step + p0,  # what a caller may hand over
        ):
            assert decay_times(n, positions) == [i / n for i in range(1, n)]
            assert merge_weights(schedule, positions=positions) == merge_weights(schedule, n)


def test_gap_by_hand():
    # Saves at 1000, 1100, 1200, then 1400 (the one at 1300 is missing). Mean spacing
    # 400/3, so T = 1400 + 400/3 and T - p_0 = 1600/3: t = 3/16, 6/16, 12/16.
    positions = [1000, 1100, 1200, 1400]
    assert decay_times(4, positions) == [3 / 16, 6 / 16, 12 / 16]
    assert window_span(4, positions) == pytest.approx(1600 / 3)
    lin = merge_weights("linear", positions=positions)
    assert lin.decay == (13 / 16, 10 / 16, 4 / 16)
    assert lin.coefficients == (3 / 16, 3 / 16, 6 / 16, 4 / 16)
    r3, r6, r12 = math.sqrt(3) / 4, math.sqrt(6) / 4, math.sqrt(12) / 4
    sq = merge_weights("minus-sqrt", positions=positions)
    assert sq.coefficients == pytest.approx([r3, r6 - r3, r12 - r6, 1 - r12], abs=1e-15)
    # t_{n-1} = (n-1)/n whatever the spacing: same final LR as equal spacing
    assert sq.coefficients[-1] == pytest.approx(coeffs("minus-sqrt", 4)[-1], abs=1e-15)


def test_ema_beta_per_checkpoint_and_per_average_spacing():
    # beta is per checkpoint, as in Figure 2 and wsm-coeffs: the paper's formula ...
    b, n = 0.7, 6
    expect = [b ** (n - 1)] + [(1 - b) * b ** (n - 1 - j) for j in range(1, n)]
    assert coeffs("ema", n, ema_beta=b) == pytest.approx(expect, abs=1e-15)
    assert coeffs("ema", 3, ema_beta=0.5) == pytest.approx([0.25, 0.25, 0.5], abs=1e-15)
    # ... bitwise the same for any equal spacing, in any unit (iterations, samples, tokens).
    for pos in (
        [5, 6, 7, 8, 9, 10],
        [100 * i for i in range(n)],
        [4e12 + 2e9 * i for i in range(n)],
    ):
        assert merge_weights("ema", positions=pos, ema_beta=b) == merge_weights(
            "ema", n, ema_beta=b
        )
    # Irregular: beta per average spacing (4/3 here), w_i = 1 - beta^((T - p_i)/spacing).
    pos, b = [0, 1, 2, 4], 0.5
    w = merge_weights("ema", positions=pos, ema_beta=b).decay
    assert w == pytest.approx([1 - b ** ((16 / 3 - p) * 3 / 4) for p in pos[1:]], abs=1e-15)
    scaled = merge_weights("ema", positions=[1000 * p for p in pos], ema_beta=b)
    assert scaled.coefficients == pytest.approx(
        merge_weights("ema", positions=pos, ema_beta=b).coefficients, abs=1e-15
    )


def test_weighting_on_one_checkpoint_refused():
    # The case: wsm-merge gave 0, 0, 1 for --ema-beta 0.5 at spacing 10,000.
    mw = merge_weights("ema", positions=[0, 10_000, 20_000], ema_beta=0.5)
    assert mw.coefficients == pytest.approx([0.25, 0.25, 0.5])
    for kwargs in (
        {"schedule": "ema", "num_checkpoints": 3, "ema_beta": 1e-7},
        {"schedule": "linear", "num_checkpoints": 4, "min_lr_ratio": 1.0},
        {"decay": [0.0, 0.0]},  # everything on the oldest
    ):
        with pytest.raises(MergeWeightsError, match="of the mass on checkpoint"):
            merge_weights(**kwargs)
    # Explicit raw weights are the user's choice.
    assert merge_weights(weights=[0.0, 0.0, 1.0]).coefficients == (0.0, 0.0, 1.0)


def test_positions_with_decay_or_weights_only_checked():
    assert merge_weights(decay=[0.5], positions=[3, 9]) == merge_weights(decay=[0.5])
    assert merge_weights(weights=[0.5, 0.5], positions=[3, 9]).coefficients == (0.5, 0.5)


def test_config_normalises():
    cfg = MergeWeightsConfig(schedule="1-sqrt", positions=[0, 10, 20])
    assert cfg.schedule == "minus-sqrt" and cfg.num_checkpoints == 3
    assert cfg.resolve() == merge_weights("minus-sqrt", 3)
    assert cfg.continuous_schedule()(0.25) == 0.5
    assert MergeWeightsConfig(weights=[0.5, 0.5]).continuous_schedule() is None


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param", "fragment"),
    [
        ({"weights": [0.5, -0.1, 0.6]}, "weights", "non-negative"),
        ({"weights": [0.5, math.nan, 0.5]}, "weights", "finite numbers, got c_1 = nan"),
        ({"weights": [0.5, 0.4]}, "weights", "sum 0.9"),
        ({"weights": [1.0]}, "num_checkpoints", "at least 2"),
        ({"decay": [0.5, 0.7]}, "decay", "non-increasing"),
        ({"decay": [1.2, 0.5]}, "decay", "[0, 1]"),
        ({"decay": [0.5, -0.1]}, "decay", "[0, 1]"),
        ({"decay": []}, "num_checkpoints", "at least 2"),
        ({"schedule": "linear", "num_checkpoints": 1}, "num_checkpoints", "at least 2"),
        ({"schedule": "linear"}, "num_checkpoints", "number of checkpoints"),
        ({"schedule": "step", "num_checkpoints": 4}, "schedule", "linear, cosine, minus-sqrt"),
        ({"schedule": "linear", "positions": [0, 2, 1]}, "positions", "strictly increasing"),
        ({"schedule": "linear", "positions": [0, 1, 1]}, "positions", "strictly increasing"),
        ({"schedule": "linear", "positions": [0, math.inf]}, "positions", "finite"),
        (
            {"schedule": "linear", "num_checkpoints": 3, "positions": [0, 1]},
            "num_checkpoints",
            "inconsistent",
        ),
        ({"decay": [0.5], "positions": [0, 1, 2]}, "positions", "inconsistent"),
        ({"schedule": "ema", "num_checkpoints": 3, "ema_beta": 1.0}, "ema_beta", "(0, 1)"),
        ({"schedule": "ema", "num_checkpoints": 3, "ema_beta": 0.0}, "ema_beta", "(0, 1)"),
        ({"schedule": "linear", "num_checkpoints": 3, "ema_beta": 0.5}, "ema_beta", "'ema'"),
        ({"decay": [0.5], "ema_beta": 0.5}, "ema_beta", "'ema'"),
        (
            {"schedule": "linear", "num_checkpoints": 3, "min_lr_ratio": 1.5},
            "min_lr_ratio",
            "[0, 1]",
        ),
        (
            {"schedule": "linear", "num_checkpoints": 3, "min_lr_ratio": -0.1},
            "min_lr_ratio",
            "[0, 1]",
        ),
        ({"weights": [0.5, 0.5], "min_lr_ratio": 0.1}, "min_lr_ratio", "raw weights"),
        ({}, "schedule", "exactly one"),
        ({"schedule": "linear", "weights": [0.5, 0.5]}, "schedule", "exactly one"),
    ],
)
def test_validation(kwargs, param, fragment):
    with pytest.raises(ValueError) as info:
        merge_weights(**kwargs)
    assert isinstance(info.value, MergeWeightsError)
    assert info.value.param == param
    assert fragment in str(info.value)


def test_sum_tolerance():
    merge_weights(weights=[0.5, 0.5 + SUM_TOLERANCE / 2])
    with pytest.raises(ValueError, match="sum"):
        merge_weights(weights=[0.5, 0.5 + 2 * SUM_TOLERANCE])
