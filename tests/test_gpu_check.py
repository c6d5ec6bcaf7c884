"""tools/gpu_check.sh: its dry run on CPU (the GPU run itself needs a device machine)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.ffn_hidden_size=128",
    "data.seq_length=64",
    "corpus.max_files=30",
    "corpus.vocab_size=512",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "logging.log_interval=1",
]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"/nonexistent:{os.environ['PATH']}", **(env or {})},
    )


def test_dry_run_checks_configs_and_prints_every_step(tmp_path):
    out = tmp_path / "out"
    result = _run("--dry-run", "--out", str(out), "--gpus", "2", "--wheels", str(tmp_path))
    assert result.returncode == 0, result.stderr
    steps = [line.split("]")[0][3:] for line in result.stdout.splitlines() if line[:3] == "+ ["]
    assert steps == [
        "install", "environment", "gpu-tests", "train", "resume", "stop", "recompute", "vpp",
        "summary", "kernels",
    ]  # fmt: skip
    stop = next(line for line in result.stdout.splitlines() if line.startswith("+ [stop]"))
    assert "saved_and_stopped" in stop and "train.exit_duration_in_mins=1" in stop
    train = next(line for line in result.stdout.splitlines() if line.startswith("+ [train]"))
    assert "--nproc-per-node 2" in train and "configs/gpt-125m.yaml" in train
    assert "train.global_batch_size=128" in train and "checkpoint.async_save=true" in train
    resume = next(line for line in result.stdout.splitlines() if line.startswith("+ [resume]"))
    assert "train.train_iters=60" in resume and "train.train_iters=40" in train
    assert "-m gpu" in result.stdout and "bench_kernels.py --device cuda" in result.stdout
    assert "dry run: the configs are valid" in result.stdout
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_refuses_a_bad_override_before_any_step(tmp_path):
    result = _run("--dry-run", "--out", str(tmp_path / "out"), "model.num_layrs=3")
    assert result.returncode == 2
    assert "+ [" not in result.stdout
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("wsm-train: error: model.num_layrs")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iters", "5"], "--iters: 5 is not an even number >= 4"),
        (["--gpus", "0"], "--gpus: 0 is not a positive number"),
        (["--frobnicate"], "unknown flag --frobnicate (see --help)"),
        (["--wheels", "/nonexistent/wheels"], "--wheels: /nonexistent/wheels is not a directory"),
    ],
)
def test_bad_flags_are_one_line(args, message):
    result = _run("--dry-run", *args)
    assert result.returncode == 2
    assert result.stderr.strip() == f"gpu_check.sh: error: {message}"


@pytest.mark.slow
def test_train_resume_and_summary_run_on_cpu(tmp_path):
    """The training, resume and summary steps for real, with a tiny model on CPU (~2 min)."""
    out = tmp_path / "out"
    result = _run("--out", str(out), "--only", "train,resume,summary", "--iters", "4", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resume: ok" in result.stdout and "all checks passed" in result.stdout
    iterations = [
        json.loads(line)["iteration"]
        for line in (out / "gpt125m.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert iterations == [1, 2, 3, 4, 5, 6]
