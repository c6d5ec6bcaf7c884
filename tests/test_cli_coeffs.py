"""wsm-coeffs: table, --json, --plot, and exit code 2 with one stderr line on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsm_megatron.cli.coeffs import main

REPO = Path(__file__).resolve().parents[1]


def run_json(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_table(capsys):
    assert main(["--schedule", "minus-sqrt", "--num-checkpoints", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "emulated LR" in lines[2] and "coefficient" in lines[2]
    rows = [line.split() for line in lines[3:7]]
    assert rows[0] == ["0", "0.500000", "—"]  # no update ends at the oldest checkpoint
    assert rows[1] == ["1", "0.207107", "0.500000"]
    assert rows[3] == ["3", "0.133975", "0.133975"]  # newest: c_{n-1} = w_{n-1}
    assert lines[7].split() == ["sum", "1.000000"]


def test_table_with_positions(capsys):
    assert main(["--schedule", "linear", "--positions", "1000,1100,1200,1400"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "position" in lines[2]
    assert lines[6].split() == ["3", "1400", "0.250000", "0.250000"]


def test_json_linear(capsys):
    out = run_json(capsys, "--schedule", "linear", "--num-checkpoints", "10")
    assert out["coefficients"] == pytest.approx([0.1] * 10, abs=1e-15)
    assert out["decay"] == pytest.approx([1 - i / 10 for i in range(1, 10)], abs=1e-15)
    assert out["schedule"] == "linear" and out["positions"] is None


def test_json_positions_imply_count(capsys):
    out = run_json(capsys, "--schedule", "1-sqrt", "--positions", "0,100,200,400")
    assert out["num_checkpoints"] == 4 and out["positions"] == [0, 100, 200, 400]
    assert out["schedule"] == "minus-sqrt"
    assert out["coefficients"][0] == pytest.approx(3**0.5 / 4)


@pytest.mark.parametrize(
    "args",
    [
        ["--decay", "0.75,0.5,0.25"],
        ["--weights", "0.25,0.25,0.25,0.25"],
        ["--schedule", "linear", "--num-checkpoints", "4"],
        ["--schedule", "linear", "--num-checkpoints", "4", "--positions", "0,5,10,15"],
    ],
)
def test_json_equivalent_inputs(capsys, args):
    out = run_json(capsys, *args)
    assert out["coefficients"] == [0.25] * 4 and out["decay"] == [0.75, 0.5, 0.25]


def test_json_ema_and_floor(capsys):
    out = run_json(capsys, "--schedule", "ema", "--num-checkpoints", "3", "--ema-beta", "0.5")
    assert out["coefficients"] == pytest.approx([0.25, 0.25, 0.5])
    out = run_json(
        capsys, "--schedule", "linear", "--num-checkpoints", "2", "--min-lr-ratio", "0.5"
    )
    assert out["coefficients"] == [0.25, 0.75]


def test_plot(tmp_path, capsys):
    path = tmp_path / "ema.png"
    args = ["--schedule", "ema", "--positions", "0,10,20,40,50", "--plot", str(path)]
    assert main(args) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["ema.png"]  # temp file moved into place
    assert f"plot written to {path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--schedule", "step", "--num-checkpoints", "4"], "--schedule"),
        (["--schedule", "linear"], "--num-checkpoints"),
        (["--schedule", "linear", "--num-checkpoints", "1"], "--num-checkpoints"),
        (
            ["--schedule", "linear", "--num-checkpoints", "3", "--positions", "0,1"],
            "--num-checkpoints",
        ),
        (["--schedule", "linear", "--positions", "0,2,1"], "--positions"),
        (["--decay", "0.5", "--positions", "0,1,2"], "--positions"),
        (["--decay", "0.5,0.7"], "--decay"),
        (["--decay", "1.5"], "--decay"),
        (["--decay", "0.5,x"], "--decay"),
        (["--weights=-0.5,1.5"], "--weights"),
        (["--weights", "0.5,0.4"], "--weights"),
        (["--schedule", "ema", "--num-checkpoints", "3", "--ema-beta", "1.5"], "--ema-beta"),
        (["--schedule", "cosine", "--num-checkpoints", "3", "--ema-beta", "0.5"], "--ema-beta"),
        (
            ["--schedule", "linear", "--num-checkpoints", "3", "--min-lr-ratio", "2"],
            "--min-lr-ratio",
        ),
        (["--weights", "0.5,0.5", "--min-lr-ratio", "0.1"], "--min-lr-ratio"),
        (["--weights", "0.5,0.5", "--plot", "/nonexistent-dir/x.png"], "--plot"),
    ],
)
def test_bad_input_exits_2(capsys, args, flag):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("wsm-coeffs: error: ") and flag in last


def _module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "wsm_megatron.cli.coeffs", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def test_module_bad_input_one_line():
    proc = _module("--weights", "0.5,0.4")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    msg = "argument --weights: weights must sum to 1 (tolerance 1e-06), got sum 0.9"
    assert proc.stderr.splitlines() == [f"wsm-coeffs: error: {msg}"]


def test_module_json():
    proc = _module("--schedule", "cosine", "--num-checkpoints", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["coefficients"] == pytest.approx([0.14645, 0.35355, 0.35355, 0.14645], abs=5e-6)
