"""``wsm-tune`` on CPU over gloo, on the checkpoints of a small real run at TP=2.

- Its validation losses are those of ``wsm-merge`` + ``wsm-train --evaluate`` for the same
  candidates, **bitwise**: the merged values come from the same ``combine`` (fp32, oldest first,
  elementwise, so the same bits whatever the sharding), the other tensors are the newest
  checkpoint's in both, and the evaluation runs the same forward passes on the same batches at
  the same layout (deterministic on CPU). ``--save-best`` is ``wsm-merge``'s output.
- With a snapshot budget below the window, the candidates run in groups of accumulators and give
  the same losses (bitwise: a streamed sum from zeros is the combined sum up to the sign of zero).
- Bad flags and unknown tasks or schedules are one line, before any start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wsm_megatron.cli.merge import main as merge_main
from wsm_megatron.cli.tune import main as tune_main
from wsm_megatron.layout import iteration_dir
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.testing.checkpoints import load_dcp_tensors
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.runs import SMALL_RUN, TINY_CONFIG, train_summary
from wsm_megatron.training.config import load_config
from wsm_megatron.tune.candidates import Candidate
from wsm_megatron.tune.runner import plan_memory

DURATIONS, SCHEDULES = (2, 4), ("linear", "minus-sqrt")


@pytest.fixture(scope="module")
def run(shared_tmp, tmp_path_factory) -> tuple[list[str], Path]:
    """A trained TP=2 run: checkpoints at iterations 2, 4, 6, 8, 10."""
    root = tmp_path_factory.mktemp("tune-run")
    overrides = [
        *SMALL_RUN,
        "checkpoint.save_interval=2",
        "merge.quantity=5",
        "train.train_iters=10",
        f"corpus.cache_dir={shared_tmp / 'wsm-train-corpus'}",
        f"checkpoint.save={root / 'ckpts'}",
    ]
    run_distributed(train_summary, 2, overrides)
    return overrides, root / "ckpts"


def _tune(overrides: list[str], argv: list[str]) -> dict:
    from wsm_megatron.tune.api import TuneOptions, tune
    from wsm_megatron.tune.candidates import TuneGrid

    ckpts, output, budget, save_best = argv
    grid = TuneGrid(durations=DURATIONS, schedules=SCHEDULES)
    options = TuneOptions(
        checkpoints=Path(ckpts),
        grid=grid,
        output=Path(output),
        snapshot_memory_gb=budget,
        save_best=Path(save_best) if save_best else None,
    )
    result = tune(load_config(TINY_CONFIG, overrides), options)
    return {"scores": result.scores, "plan": result.plan, "best": result.best}


def _evaluate(overrides: list[str], checkpoints: list[str]) -> dict:
    from wsm_megatron.training.trainer import evaluate_checkpoints

    return evaluate_checkpoints(load_config(TINY_CONFIG, overrides), checkpoints)


def test_tune_equals_wsm_merge_and_evaluate_bitwise_in_memory_and_in_groups(run, tmp_path):
    overrides, ckpts = run
    argv = [str(ckpts), str(tmp_path / "tune"), 64.0, str(tmp_path / "best")]
    ranks = run_distributed(_tune, 2, overrides, argv)
    tuned = ranks[0]
    assert all(r["scores"] == tuned["scores"] for r in ranks)
    assert tuned["plan"].snapshots and tuned["plan"].window == 4

    # The old way: one wsm-merge output per candidate, then wsm-train --evaluate of each.
    paths = {"newest": str(ckpts)}
    for n in DURATIONS:
        for schedule in SCHEDULES:
            out = tmp_path / f"merge-{n}-{schedule}"
            flags = ["--last", str(n), "--schedule", schedule, "--no-progress"]
            assert merge_main(["--input", str(ckpts), "--output", str(out), *flags]) == 0
            paths[f"{n}:{schedule}"] = str(out)
    evaluated = run_distributed(_evaluate, 2, overrides, list(paths.values()))[0]
    expected = {name: {"val": evaluated[path]["val_loss"]} for name, path in paths.items()}
    assert tuned["scores"] == expected  # bitwise equal floats
    assert len({s["val"] for s in expected.values()}) == len(expected)  # they differ

    # tune.json, tune.png and --save-best (wsm-merge's output for the best candidate).
    report = json.loads((tmp_path / "tune" / "tune.json").read_text())
    best = min(list(expected)[1:], key=lambda name: expected[name]["val"])
    assert report["best"] == {
        "name": best,
        "gain": expected["newest"]["val"] - expected[best]["val"],
    }
    rows = {row["name"]: row for row in report["candidates"]}
    assert rows["4:minus-sqrt"]["iterations"] == [4, 6, 8, 10]
    assert rows["4:minus-sqrt"]["span_tokens"] == 4 * 2 * 8 * 32  # 4 saves x 2 its x 8 seqs x 32
    assert pytest.approx(sum(rows["4:minus-sqrt"]["coefficients"])) == 1.0
    assert (tmp_path / "tune" / "tune.png").stat().st_size > 10_000
    assert tuned["best"].name == best
    saved = load_dcp_tensors(iteration_dir(tmp_path / "best", 10))
    reference = load_dcp_tensors(iteration_dir(Path(paths[best]), 10))
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)

    # A budget below the window's 4 snapshots: groups of accumulators, the same losses.
    budget = 2.5 * tuned["plan"].accumulator_bytes / 2**30  # 2 accumulators, not 4 snapshots
    argv = [str(ckpts), str(tmp_path / "grouped"), budget, ""]
    grouped = run_distributed(_tune, 2, overrides, argv)[0]
    assert "run in 2 group(s) of up to 2" in grouped["plan"].describe()
    assert grouped["scores"] == tuned["scores"]


def _candidate(name: str, iterations: tuple[int, ...]) -> Candidate:
    n = len(iterations)
    return Candidate(name, str(n), "linear", iterations, iterations, (1 / n,) * n)


def test_memory_plan_groups_and_refusal():
    merges = [_candidate(f"{n}:{k}", tuple(range(10 - n, 10))) for n in (2, 4, 8) for k in "ab"]
    gib = 2**30
    assert plan_memory(merges, gib, 2 * gib, 8.0).snapshots  # 8 snapshots of 1 GiB fit
    plan = plan_memory(merges, gib, 2 * gib, 7.0)  # 3 accumulators of 2 GiB per group
    assert not plan.snapshots and [len(g) for g in plan.groups] == [3, 3]
    assert [c.name for g in plan.groups for c in g] == [c.name for c in merges]
    with pytest.raises(MergeError, match=r"^--snapshot-memory-gb 1: the window's 8 snapshots"):
        plan_memory(merges, gib, 2 * gib, 1.0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--durations", "1,4"], "--durations: a merge needs at least 2 checkpoints, got 1"),
        (["--durations", "4", "--schedules", "steep"], "--schedule: unknown schedule 'steep'"),
        (["--durations", "4", "--tasks", "mmlu"], "--tasks: unknown task 'mmlu'"),
        ([], "give --durations and/or --durations-tokens"),
        (["--durations", "4", "--snapshot-memory-gb", "0"], "--snapshot-memory-gb must be > 0"),
    ],
)
def test_bad_flags_are_one_line(flags, message, capsys, tmp_path):
    argv = ["--config", str(TINY_CONFIG), "--checkpoints", str(tmp_path), *flags]
    assert tune_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wsm-tune: error: {message}") and err.count("\n") == 1, err


def test_bad_token_flag_and_missing_checkpoints_are_one_line(capsys, tmp_path):
    argv = ["--config", str(TINY_CONFIG), "--checkpoints", str(tmp_path / "none")]
    with pytest.raises(SystemExit):
        tune_main([*argv, "--durations-tokens", "80X"])
    assert "--durations-tokens: expected a token count such as 80B" in capsys.readouterr().err
    assert tune_main([*argv, "--durations", "2"]) == 2
    err = capsys.readouterr().err
    assert err == f"wsm-tune: error: --checkpoints {tmp_path / 'none'} is not a directory\n"
