"""``wsm-tune`` on CPU over gloo, on the checkpoints of a small real run at TP=2.

- Its validation losses are those of ``wsm-merge`` + ``wsm-train --evaluate`` for the same
  candidates, **bitwise**: the merged values come from the same ``combine`` (fp32, oldest first,
  elementwise, so the same bits whatever the sharding), the other tensors are the newest
  checkpoint's in both, and the evaluation runs the same forward passes on the same batches at
  the same layout (deterministic on CPU). ``--save-best`` is ``wsm-merge``'s output.
- With a snapshot budget below the window, the candidates run in groups of accumulators and give
  the same losses (bitwise: a streamed sum from zeros is the combined sum up to the sign of zero).
- Bad flags and unknown tasks or schedules are one line, before any start-up.
- ``--intervals``: at interval 2 the merged values put into the model are an fp64 weighted
  average of exactly the every-other checkpoints (counting back from the newest, as
  ``wsm-merge --every``), with the schedule's coefficients for those checkpoints, up to fp32
  rounding; rows carry their interval; a window left with one checkpoint is skipped and
  reported, and a grid of only such windows is refused in one line.
- ``--decay-reference``: the branch is ``wsm-train`` resumed the same way (bitwise the same
  losses, LRs and final weights), reads the run's data (its first two losses, at the peak LR,
  are the run's, bitwise), ends at ``min_lr`` and never writes into the run's checkpoints; its
  row is in ``tune.json``, the table and the plot. A start checkpoint without optimizer state
  or missing is one line before any start-up.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from wsm_megatron.cli.merge import main as merge_main
from wsm_megatron.cli.tune import main as tune_main
from wsm_megatron.layout import iteration_dir, list_iterations
from wsm_megatron.merge.config import Selection
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.selection import select_checkpoints
from wsm_megatron.testing.checkpoints import fp64_reference, load_dcp_tensors
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.runs import SMALL_RUN, TINY_CONFIG, built_once, train_summary
from wsm_megatron.training.config import load_config
from wsm_megatron.tune.candidates import Candidate, TuneGrid, build_grid
from wsm_megatron.tune.results import print_table
from wsm_megatron.tune.runner import plan_memory

DURATIONS, SCHEDULES = (2, 4), ("linear", "minus-sqrt")


@pytest.fixture(scope="module")
def run(shared_tmp) -> tuple[list[str], Path, dict[int, float]]:
    """A trained TP=2 run: checkpoints at iterations 2, 4, 6, 8, 10; its training losses
    (trained once for every xdist worker)."""
    root = shared_tmp / "tune-run"
    overrides = [
        *SMALL_RUN,
        "checkpoint.save_interval=2",
        "merge.quantity=5",
        "train.train_iters=10",
        f"corpus.cache_dir={shared_tmp / 'wsm-train-corpus'}",
        f"checkpoint.save={root / 'ckpts'}",
    ]
    losses = built_once(root, lambda: run_distributed(train_summary, 2, overrides)[0]["losses"])
    return overrides, root / "ckpts", losses


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
    overrides, ckpts, _ = run
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
        (["--durations", "4", "--intervals", "0"], "--intervals: an interval keeps every K-th"),
        (["--durations", "2,3", "--intervals", "3"], "--intervals 3: every window of --durations"),
        (["--durations", "4", "--decay-reference", "ema"], "--decay-reference: unknown decay"),
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


# ----------------------------------------------------------------------------- --intervals

INTERVAL_GRID = {"durations": (2, 4), "intervals": (1, 2, 4), "schedules": SCHEDULES}


def _tune_and_save_merges(overrides: list[str], ckpts: str, output: str) -> object:
    """``tune`` with its scorer wrapped: before each score, the model's weights (what the
    runner put into it) are saved as a checkpoint under ``output/weights/<name>``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    import wsm_megatron.tune.api as api
    from wsm_megatron.training.checkpointing import model_sharded_state_dict

    names = [c.name for c in build_grid(Path(ckpts), TuneGrid(**INTERVAL_GRID)).rows]
    scorer = api._scorer

    def saving_scorer(options, session, model, manager, lower_is_better):
        score = scorer(options, session, model, manager, lower_is_better)

        def wrapped():
            folder = Path(output) / "weights" / names.pop(0).replace(":", "_")
            folder.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save(model_sharded_state_dict(model), str(folder))
            return score()

        return wrapped

    api._scorer = saving_scorer
    options = api.TuneOptions(Path(ckpts), TuneGrid(**INTERVAL_GRID), Path(output))
    return api.tune(load_config(TINY_CONFIG, overrides), options)


def test_intervals_merge_every_other_checkpoint_fp64_and_report_skipped_windows(
    run, tmp_path, capsys, monkeypatch
):
    overrides, ckpts, _ = run
    out = tmp_path / "tune"
    result = run_distributed(_tune_and_save_merges, 2, overrides, str(ckpts), str(out))[0]
    names = [c.name for c in result.candidates]
    assert names == [
        "newest",
        *[f"2:{s}" for s in SCHEDULES],
        *[f"4:{s}" for s in SCHEDULES],
        *[f"4@2:{s}" for s in SCHEDULES],
    ]
    # 2 at intervals 2 and 4, 4 at interval 4: one checkpoint left, reported and not scored.
    assert [(s.duration, s.interval) for s in result.skipped] == [("2", 2), ("2", 4), ("4", 4)]
    assert set(result.scores) == set(names)

    report = json.loads((out / "tune.json").read_text())
    rows = {row["name"]: row for row in report["candidates"]}
    assert [row["interval"] for row in report["candidates"]] == [1, 1, 1, 1, 1, 2, 2]
    assert rows["newest"]["kind"] == "newest" and rows["4@2:linear"]["kind"] == "merge"
    assert [(s["duration"], s["interval"]) for s in report["skipped"]] == [
        ("2", 2),
        ("2", 4),
        ("4", 4),
    ]
    assert "leave 1 [10], no merge: skipped" in report["skipped"][0]["reason"]
    # Every other checkpoint of 4, 6, 8, 10 counting back from the newest: wsm-merge --every 2.
    every = select_checkpoints(ckpts, Selection(last=2, every=2)).iterations
    assert rows["4@2:minus-sqrt"]["iterations"] == list(every) == [6, 10]
    assert rows["4@2:minus-sqrt"]["span_tokens"] == rows["4:minus-sqrt"]["span_tokens"]
    # The schedule's coefficients for the 2 checkpoints merged (theory: w_1 = f(1/2)).
    expected = {"linear": [0.5, 0.5], "minus-sqrt": [math.sqrt(0.5), 1 - math.sqrt(0.5)]}
    for schedule, coefficients in expected.items():
        assert rows[f"4@2:{schedule}"]["coefficients"] == pytest.approx(coefficients, abs=1e-15)
        # The values scored: an fp64 average of exactly those checkpoints, up to fp32 rounding.
        merged = load_dcp_tensors(out / "weights" / f"4@2_{schedule}")
        ref = fp64_reference(ckpts, [6, 10], coefficients)
        scale = fp64_reference(ckpts, [6, 10], coefficients, absolute=True)
        compared = [k for k in merged if merged[k].is_floating_point() and k in ref]
        assert len(compared) > 10
        for key in compared:
            bound = 4 * 2**-24 * scale[key] + 1e-30
            assert ((merged[key].double() - ref[key]).abs() <= bound).all(), key
        assert not torch.equal(
            merged[compared[0]], load_dcp_tensors(iteration_dir(ckpts, 10))[compared[0]]
        )
    assert (out / "tune.png").stat().st_size > 10_000

    monkeypatch.setenv("COLUMNS", "200")  # rich: one line per row
    capsys.readouterr()
    print_table(result)
    table = capsys.readouterr().out
    assert "interval" in table and "4@2:minus-sqrt" in table
    assert "skipped: --intervals 4 with duration 4" in table


# ------------------------------------------------------------------------ --decay-reference


def _tune_with_decay(overrides: list[str], ckpts: str, output: str) -> object:
    from wsm_megatron.tune.api import TuneOptions, tune

    grid = TuneGrid(durations=(4,), schedules=("linear",))
    options = TuneOptions(Path(ckpts), grid, Path(output), decay_references=("linear",))
    return tune(load_config(TINY_CONFIG, overrides), options)


def _train_and_evaluate(overrides: list[str], checkpoint: str) -> dict:
    from wsm_megatron.training.trainer import evaluate_checkpoints

    trained = train_summary(overrides)
    trained["val"] = evaluate_checkpoints(load_config(TINY_CONFIG, overrides), [checkpoint])
    return trained


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_decay_reference_is_wsm_train_resumed_from_the_window_start(run, tmp_path):
    overrides, ckpts, run_losses = run
    before = _listing(ckpts)
    out = tmp_path / "tune"
    result = run_distributed(_tune_with_decay, 2, overrides, str(ckpts), str(out))[0]
    assert _listing(ckpts) == before  # nothing written into the run's checkpoints

    # The window 4, 6, 8, 10 spans 8 iterations: a linear decay from 4 to 12.
    (row,) = result.decays
    ref, branch = row.reference, row.run
    assert (ref.name, ref.start_iteration, ref.decay_iters, ref.end_iteration) == (
        "decay:4:linear",
        4,
        8,
        12,
    )
    assert ref.folder == out / "decay" / "4-linear" and list_iterations(ref.folder) == [12]
    assert branch.final_lr == load_config(TINY_CONFIG, overrides).train.min_lr == 0.0  # at the end
    assert list(branch.lrs) == list(range(5, 13)) and branch.lrs[5] == 3e-3  # peak first
    assert branch.lrs[12] == pytest.approx(3e-3 / 8)  # linear: the schedule at 11 of 4..12
    lrs = list(branch.lrs.values())
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    # The run's data order: the first two losses (weights of 4, then one peak-LR update) are
    # the run's own, bitwise; later ones differ (a lower LR).
    assert [branch.losses[i] for i in (5, 6)] == [run_losses[i] for i in (5, 6)]
    assert branch.losses[8] != run_losses[8]

    # The same branch by hand with wsm-train: the same losses, LRs and weights, bitwise, and
    # its validation loss is the decay row's score.
    manual = tmp_path / "manual"
    by_hand = [
        *overrides,
        f"checkpoint.load={ckpts}",
        "checkpoint.load_iteration=4",
        f"checkpoint.save={manual}",
        "checkpoint.save_interval=null",
        "merge.quantity=null",
        "train.train_iters=12",
        "train.lr_schedule=wsd",
        "train.lr_wsd_decay_iters=8",
        "train.lr_wsd_decay_style=linear",
    ]
    trained = run_distributed(_train_and_evaluate, 2, by_hand, str(manual))[0]
    assert trained["resumed_from"] == 4
    assert trained["losses"] == branch.losses and trained["lrs"] == branch.lrs
    mine = load_dcp_tensors(iteration_dir(ref.folder, 12))
    theirs = load_dcp_tensors(iteration_dir(manual, 12))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert result.scores["decay:4:linear"] == {"val": trained["val"][str(manual)]["val_loss"]}

    # tune.json, the table and the plot.
    report = json.loads((out / "tune.json").read_text())
    (decay,) = report["decays"]
    assert decay["kind"] == "decay" and decay["final_lr"] == 0.0
    assert decay["scores"] == result.scores["decay:4:linear"] and decay["window"] == [4, 6, 8, 10]
    merge = {row["name"]: row for row in report["candidates"]}["4:linear"]
    assert merge["decay_reference"] == "decay:4:linear"
    assert merge["vs_decay"] == decay["scores"]["val"] - merge["scores"]["val"]
    assert decay["span_tokens"] == merge["span_tokens"]
    assert (out / "tune.png").stat().st_size > 10_000


def test_decay_reference_start_without_optimizer_state_or_missing_is_one_line(
    run, tmp_path, capsys
):
    import torch.distributed as dist

    overrides, ckpts, _ = run
    copy = tmp_path / "ckpts"
    shutil.copytree(ckpts, copy)
    common = iteration_dir(copy, 4) / "common.pt"
    state = torch.load(common, weights_only=False)
    del state["opt_param_scheduler"]
    state["args"].no_save_optim = True
    torch.save(state, common)
    argv = ["--config", str(TINY_CONFIG), *overrides, "--checkpoints", str(copy)]
    argv += ["--durations", "4", "--decay-reference", "1-sqrt", "--output", str(tmp_path / "t")]
    assert tune_main(argv) == 1
    err = capsys.readouterr().err
    start = iteration_dir(copy, 4)
    assert err == (
        f"wsm-tune: error: --decay-reference: the window of duration 4 starts at {start}, "
        "which has no optimizer state (saved with --no-save-optim, or a merged checkpoint); a "
        "decay branch resumes the optimizer\n"
    )
    (start / "metadata.json").unlink()
    assert tune_main(argv) == 1
    assert capsys.readouterr().err.endswith(f"starts at {start}, which is missing or incomplete\n")
    inside = [*argv[:-1], str(copy / "tune")]
    assert tune_main(inside) == 1
    assert "--output" in capsys.readouterr().err
    assert not dist.is_initialized()  # refused before any start-up
