"""Which checkpoints a merge uses and where they sit in the run: windows that the checkpoints on
disk cannot fill, an end that is not a checkpoint, and positions from each checkpoint's own
consumed samples (a batch-size ramp-up run, saved by megatron-core)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from wsm_megatron.cli.merge import main
from wsm_megatron.layout import STOP_SAVE_FILENAME, iteration_dir, write_tracker
from wsm_megatron.merge import MergeConfig, MergeError, merge
from wsm_megatron.merge.config import Selection
from wsm_megatron.merge.selection import RunPoint, run_positions, select_checkpoints
from wsm_megatron.testing.checkpoints import (
    fp64_reference,
    load_dcp_tensors,
    megatron_args,
    write_megatron_checkpoints,
)
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.theory import merge_weights


def _root(tmp_path: Path, iterations, consumed=None, **args) -> Path:
    """Iteration directories with a common.pt each (Megatron's saved args); tracker at the last."""
    root = tmp_path / "ckpts"
    for k, it in enumerate(iterations):
        d = iteration_dir(root, it)
        d.mkdir(parents=True)
        samples = consumed[k] if consumed is not None else 0
        state = {"args": megatron_args(consumed_train_samples=samples, **args), "iteration": it}
        torch.save(state, d / "common.pt")
    write_tracker(root, iterations[-1])
    return root


# --- windows the disk cannot fill, ends that are not checkpoints -------------------------------


def test_pruned_window_refused_then_allowed_and_reported(tmp_path):
    # Saves every 25; everything before 475 was pruned: a 300-iteration window ending at 600
    # would merge only the 125 iterations left.
    root = _root(tmp_path, range(475, 625, 25), seq_length=10, global_batch_size=4)
    with pytest.raises(MergeError) as err:
        select_checkpoints(root, Selection(window_iters=300))
    message = str(err.value)
    assert "--window-iters 300 ending at 600" in message and "iteration 300" in message
    assert "oldest checkpoint" in message and "iteration 475" in message
    assert "--allow-partial-window" in message
    sel = select_checkpoints(root, Selection(window_iters=300, allow_partial_window=True))
    assert sel.iterations == (475, 500, 525, 550, 575, 600)
    assert "iteration 475" in sel.partial_window
    # A window the disk fills: a checkpoint at or before its start exists.
    assert select_checkpoints(root, Selection(window_iters=100)).partial_window is None
    # Token windows: 40 tokens per iteration here, 300 iterations = 12,000 tokens.
    with pytest.raises(MergeError, match="--window-tokens 12000 ending at iteration 600.*token"):
        select_checkpoints(root, Selection(window_tokens=12_000))
    sel = select_checkpoints(root, Selection(window_tokens=12_000, allow_partial_window=True))
    assert sel.iterations[0] == 475 and sel.partial_window


def test_end_that_is_not_a_checkpoint_refused(tmp_path):
    root = _root(tmp_path, (100, 150, 210, 300))
    with pytest.raises(
        MergeError, match=r"--end-iteration 250, which is not a checkpoint.*210, 300"
    ):
        select_checkpoints(root, Selection(last=3, end_iteration=250))
    assert select_checkpoints(root, Selection(last=3, end_iteration=210)).iterations == (
        100,
        150,
        210,
    )
    write_tracker(root, 400)
    with pytest.raises(MergeError, match="the tracker .* names iteration 400, which is not a"):
        select_checkpoints(root, Selection(last=2))


def test_stop_saves_are_no_window_members(tmp_path):
    # A run stopped on a signal at 437 (saves every 25): its stop save is the tracker's.
    root = _root(tmp_path, (350, 375, 400, 425, 437))
    (iteration_dir(root, 437) / STOP_SAVE_FILENAME).write_text('{"iteration": 437}')
    assert select_checkpoints(root, Selection(last=3)).iterations == (375, 400, 425)
    named = select_checkpoints(root, Selection(iterations=(425, 437)))  # asked for: merged
    assert named.iterations == (425, 437)


def test_partial_window_flag_needs_a_window():
    with pytest.raises(MergeError, match="--allow-partial-window applies to"):
        MergeConfig(input="a", output="b", last=2, allow_partial_window=True)


def test_cli_partial_window_is_one_line(tmp_path, capsys):
    root = _root(tmp_path, (500, 600))
    assert (
        main(["--input", str(root), "--output", str(tmp_path / "o"), "--window-iters", "300"]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wsm-merge: error: --window-iters 300")


# --- positions ----------------------------------------------------------------------------------


def test_position_rules():
    ramp = [RunPoint(100, 400, 16, 8), RunPoint(200, 1200, 16, 8), RunPoint(300, 2000, 16, 8)]
    assert run_positions(ramp) == (
        (6400, 19200, 32000),
        "tokens",
        "consumed_train_samples x seq_length",
    )
    assert run_positions(ramp, 10) == (
        (1000, 2000, 3000),
        "tokens",
        "iteration x --tokens-per-iter",
    )
    no_seq = [RunPoint(p.iteration, p.consumed_samples, None, None) for p in ramp]
    assert run_positions(no_seq)[:2] == ((400, 1200, 2000), "samples")
    one_missing = [RunPoint(100, None, 16, 8), *ramp[1:]]
    assert run_positions(one_missing)[:2] == ((12800, 25600, 38400), "tokens")
    bare = [RunPoint(it, None, None, None) for it in (100, 200, 300)]
    assert run_positions(bare)[:2] == ((100, 200, 300), "iterations")


def test_positions_that_do_not_increase_refused(tmp_path):
    root = _root(tmp_path, (100, 200, 300), consumed=(800, 1600, 1600))
    with pytest.raises(MergeError, match=r"iter_0000300.*do not increase \(25600 then 25600"):
        select_checkpoints(root, Selection(last=3))


def _ramp_up_run(root: Path) -> None:
    # A global batch ramping up 2 -> 4 -> 8 -> 16: consumed samples are not
    # proportional to the iteration (Megatron-LM counts them in args.consumed_train_samples).
    write_megatron_checkpoints(
        root,
        (100, 200, 300, 400),
        tp=1,
        pp=1,
        num_layers=2,
        consumed_samples=(200, 600, 1400, 3000),
    )


def test_batch_ramp_up_positions_shape_the_weights(tmp_path):
    root = tmp_path / "ramp"
    run_distributed(_ramp_up_run, 1, root)
    shutil.rmtree(iteration_dir(root, 100))  # a window that starts at 200: 200, 300, 400
    out = tmp_path / "out"
    report = tmp_path / "r.json"
    result = merge(MergeConfig(input=root, output=out, last=3, schedule="linear", report=report))
    job = result.jobs[0]
    tokens = [600 * 16, 1400 * 16, 3000 * 16]  # consumed samples x seq_length
    assert [x["position"] for x in job.inputs] == tokens and job.position_unit == "tokens"
    coeffs = merge_weights("linear", positions=tokens).coefficients
    assert job.coefficients == list(coeffs)
    assert coeffs != merge_weights("linear", 3).coefficients  # iterations would be equal spacing
    info = json.loads((iteration_dir(out, 400) / "merge_info.json").read_text())
    assert [x["position"] for x in info["inputs"]] == tokens
    assert info["selection"]["position_source"] == "consumed_train_samples x seq_length"
    assert json.loads(report.read_text())["jobs"][0]["inputs"][0]["position"] == tokens[0]
    merged = load_dcp_tensors(iteration_dir(out, 400))
    ref = fp64_reference(root, (200, 300, 400), coeffs)
    key = "decoder.layers.mlp.linear_fc1.weight"
    assert torch.allclose(merged[key].double(), ref[key], atol=1e-2, rtol=1e-2)
    assert (merged[key] == ref[key].to(torch.bfloat16)).float().mean() > 0.99
    # A token window uses the same positions: 30,000 tokens back from 48,000 reaches 18,000
    # (iteration 200 is at or before the start, so the window is full) and picks 300, 400.
    result = merge(MergeConfig(input=root, output=tmp_path / "o2", window_tokens=30_000))
    assert [x["iteration"] for x in result.jobs[0].inputs] == [300, 400]


# --- one weighting rule for wsm-coeffs and wsm-merge -------------------------------------------


def test_ema_beta_means_the_same_in_wsm_coeffs_and_wsm_merge(tmp_path, capsys):
    from wsm_megatron.cli.coeffs import main as coeffs_main
    from wsm_megatron.testing.checkpoints import write_dcp_checkpoint

    root = tmp_path / "in"
    iterations = (10_000, 20_000, 30_000, 50_000)  # the save at 40,000 is missing
    for it in iterations:
        write_dcp_checkpoint(root, it, {"decoder.w": torch.full((3,), float(it))})
    capsys.readouterr()
    argv = ["--schedule", "ema", "--ema-beta", "0.5"]
    positions = ",".join(str(it * 16 * 8) for it in iterations)  # seq_length x batch
    assert coeffs_main([*argv, "--positions", positions, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["coefficients"]
    out = tmp_path / "out"
    assert main([*argv, "--input", str(root), "--output", str(out), "--last", "4"]) == 0
    info = json.loads((iteration_dir(out, 50_000) / "merge_info.json").read_text())
    assert [x["coefficient"] for x in info["inputs"]] == expected
    assert min(expected) > 0.05  # no longer 0, 0, 0, 1
    # Equal spacing: Figure 2's per-checkpoint EMA, 0.25, 0.25, 0.5.
    assert main([*argv, "--input", str(root), "--output", str(tmp_path / "o3"), "--last", "3",
                 "--end-iteration", "30000"]) == 0  # fmt: skip
    info = json.loads((iteration_dir(tmp_path / "o3", 30_000) / "merge_info.json").read_text())
    assert [x["coefficient"] for x in info["inputs"]] == pytest.approx([0.25, 0.25, 0.5])


def test_weighting_on_one_checkpoint_is_one_line(tmp_path, capsys):
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--last", "3"]
    assert main([*argv, "--min-lr-ratio", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "of the mass on checkpoint" in err[0], err
