"""Save before stopping: signals (``train.exit_signals``) and the wall-clock budget
(``train.exit_duration_in_mins``), on 2 gloo processes with real signals.

- SIGUSR1 on one rank mid-run: every rank stops at the same boundary, with a complete stop save
  of that iteration; the resumed run continues bitwise as the uninterrupted one (losses,
  weights, merged losses), and retention deletes the stop save once a newer save is complete.
- A signal during a save, and a second signal during a save: no half checkpoint, the resume
  point is a complete checkpoint, one line each.
- A stop before the first step saves nothing; the budget stops a run the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from wsm_megatron.layout import (
    STOP_SAVE_FILENAME,
    is_complete,
    is_stop_save,
    iteration_dir,
    list_iterations,
    read_tracker,
)
from wsm_megatron.runtime.termination import StopRequests
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.faults import train_signalled
from wsm_megatron.testing.runs import SMALL_RUN, train_summary
from wsm_megatron.training.retention import checkpoints_to_prune

DP2 = [
    *SMALL_RUN,
    "parallel.tensor_model_parallel_size=1",  # 2 processes: DP = 2
    "checkpoint.save_interval=4",
    "merge.online=true",
    "merge.quantity=3",
    "merge.schedule=minus-sqrt",
]


def _overrides(corpus_dir: str, root: Path, iters: int = 12) -> list[str]:
    return [
        *DP2,
        f"corpus.cache_dir={corpus_dir}",
        f"checkpoint.save={root}",
        f"train.train_iters={iters}",
    ]


def _logged(log: Path, fn: object, *args: object) -> dict:
    """``fn(*args)`` with this rank's stdout and stderr in ``log.<rank>``; a ``SystemExit``
    (a second signal) is returned as its code."""
    import os

    with open(f"{log}.{os.environ['RANK']}", "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            return fn(*args)
        except SystemExit as stop:
            return {"exit": stop.code}


def _log(log: Path) -> str:
    return log.with_name(log.name + ".0").read_text()


def test_signal_mid_run_saves_and_the_resume_continues_bitwise(corpus_dir, tmp_path):
    straight = run_distributed(train_summary, 2, _overrides(corpus_dir, tmp_path / "straight"))
    assert straight[0]["stopped"] is None and list(straight[0]["merged_losses"]) == [8, 12]

    root = tmp_path / "split"
    overrides = _overrides(corpus_dir, root)
    # SIGUSR1 reaches rank 1 alone after step 6; the boundary after step 7 agrees on it.
    log = tmp_path / "log"
    stopped = run_distributed(_logged, 2, log, train_signalled, overrides, 6, "SIGUSR1", [1], False)
    assert [r["stopped"] for r in stopped] == ["SIGUSR1", "SIGUSR1"]
    assert [r["iteration"] for r in stopped] == [7, 7]
    assert read_tracker(root) == 7 and is_complete(root, 7) and is_stop_save(root, 7)
    mark = json.loads((iteration_dir(root, 7) / STOP_SAVE_FILENAME).read_text())
    assert mark == {"iteration": 7, "reason": "SIGUSR1"}
    assert "stopping at iteration 7 (SIGUSR1): saved checkpoint iteration 7" in _log(log)

    resumed = run_distributed(train_summary, 2, overrides)
    for a, b in zip(straight, resumed, strict=True):
        assert b["resumed_from"] == 7 and b["stopped"] is None
        assert {it: a["losses"][it] for it in range(8, 13)} == b["losses"]  # bitwise floats
        assert b["merged_losses"] == a["merged_losses"]
        assert b["windows"] == a["windows"] == {8: (4, 8), 12: (4, 8, 12)}
        assert all(np.array_equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert b["ring_rebuild"] == ([4], [])  # the stop save is no window member
    assert list_iterations(root) == [4, 8, 12]  # superseded by iteration 8: deleted


def test_signals_during_a_save_leave_no_half_checkpoint(corpus_dir, tmp_path):
    root, log = tmp_path / "ckpts", tmp_path / "log"
    overrides = _overrides(corpus_dir, root, iters=8)
    # One SIGTERM while iteration 4 is written: the save completes, the run stops after 5.
    args = (overrides, 4, "SIGTERM", [0, 1], True)
    once = run_distributed(_logged, 2, log, train_signalled, *args)
    assert [r["iteration"] for r in once] == [5, 5] and once[0]["stopped"] == "SIGTERM"
    assert read_tracker(root) == 5 and is_complete(root, 4) and is_stop_save(root, 5)
    assert _log(log).count("SIGTERM received") == 1  # rank 0 says it, once

    # Two while the resumed run writes iteration 8 (its end): it stops at once, mid-save.
    args = (overrides, 8, "SIGTERM", [0, 0, 1, 1], True)
    twice = run_distributed(_logged, 2, log, train_signalled, *args)
    assert [r["exit"] for r in twice] == [143, 143]
    assert "SIGTERM again: stopping now" in _log(log)
    assert read_tracker(root) == 5 and not is_complete(root, 8)
    done = run_distributed(train_summary, 2, overrides)
    assert done[0]["resumed_from"] == 5 and done[0]["iteration"] == 8
    assert read_tracker(root) == 8 and is_complete(root, 8) and not is_stop_save(root, 8)


def test_a_stop_before_the_first_step_and_the_time_budget(corpus_dir, tmp_path):
    root, log = tmp_path / "ckpts", tmp_path / "log"
    run_distributed(train_summary, 2, _overrides(corpus_dir, root, iters=4))
    # A budget already spent at the first boundary: nothing new to save, one line.
    late = _overrides(corpus_dir, root, iters=8) + ["train.exit_duration_in_mins=1e-6"]
    result = run_distributed(_logged, 2, log, train_summary, late)
    assert [r["stopped"] for r in result] == ["train.exit_duration_in_mins"] * 2
    assert [r["iteration"] for r in result] == [4, 4] and result[0]["losses"] == {}
    line = "stopping at iteration 4 (train.exit_duration_in_mins) before its first step"
    assert line in _log(log)
    assert list_iterations(root) == [4] and read_tracker(root) == 4


def _poll_on_two_ranks(signal_on: int) -> list[str | None]:
    """Poll three boundaries with a request made on rank ``signal_on`` after the first."""
    from wsm_megatron.runtime import init_distributed

    init_distributed(megatron=False)
    stop = StopRequests([], None, is_main=lambda: False)
    seen = [stop.poll()]
    if dist.get_rank() == signal_on:
        stop.received = 10  # as the handler records it (SIGUSR1)
    seen += [stop.poll(), stop.poll()]
    stop.__exit__(None)
    return seen


def test_stop_requests_agree_one_boundary_later_and_the_budget_counts():
    # The request seen at boundary 2 on one rank is acted on by both at boundary 3.
    assert run_distributed(_poll_on_two_ranks, 2, 1) == [[None, None, "SIGUSR1"]] * 2
    now = [0.0]
    stop = StopRequests([], 2.0, is_main=lambda: False, clock=lambda: now[0])
    assert stop.poll() is None
    now[0] = 121.0
    assert stop.poll() == "train.exit_duration_in_mins"


@pytest.mark.parametrize(
    ("stops", "expected"),
    [(set(), [4]), ({7}, [4, 7]), ({12}, [])],
)
def test_retention_never_counts_a_stop_save(stops, expected):
    # The tracker's stop save stays (the resume point), an older one goes; neither counts
    # towards keep_last, so the window's scheduled saves stay.
    iterations = [4, 7, 8, 12] if 7 in stops else [4, 8, 12]
    assert checkpoints_to_prune(iterations, 12, 2, None, None, stops) == expected
