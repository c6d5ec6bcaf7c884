"""wsm-demo's own pieces (the full demo trains for minutes; it is run by hand, see README):
the metrics it plots, the figure, the commands it prints, and its refusals."""

from __future__ import annotations

import json
import sys

from wsm_megatron.cli import demo


def test_metrics_curves_and_plot(tmp_path):
    records = [
        {"kind": "train", "iteration": 25, "loss": 6.0, "lr": 1e-3},
        {"kind": "train", "iteration": 50, "loss": 5.0, "lr": 1e-3},
        {"kind": "valid", "iteration": 25, "merged_loss": 5.9},  # a merge without a raw loss
        {"kind": "valid", "iteration": 50, "loss": 5.2, "merged_loss": 5.1, "merge_first": 25},
        {"kind": "eval", "iteration": 50, "loss": 5.1},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = demo.read_metrics(metrics)
    assert curves == {
        "train": [(25, 6.0), (50, 5.0)],
        "valid": [(50, 5.2)],
        "merged": [(25, 5.9), (50, 5.1)],
    }
    demo.plot(tmp_path / "loss.png", curves, [25, 50])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merged_iterations_come_from_the_merge_report():
    report = {"jobs": [{"inputs": [{"iteration": 500}, {"iteration": 550}, {"iteration": 600}]}]}
    assert demo._merged_iterations(report) == [500, 550, 600]


def test_commands_are_printed_as_a_user_types_them(capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    demo._run(demo.torchrun(2, ["--config", "c.yaml"]), {})
    demo._run([sys.executable, "-m", "wsm_megatron.cli.merge", "--input", "x"], {})
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "+ torchrun --standalone --nproc-per-node 2 -m wsm_megatron.cli.train --config c.yaml",
        "+ wsm-merge --input x",
    ]
    assert ran[0][:3] == [sys.executable, "-m", "torch.distributed.run"]


def test_refuses_to_overwrite_and_reports_config_errors(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert demo.main(["--output", str(tmp_path)]) == 2
    assert "already holds a demo (results.json)" in capsys.readouterr().err
    assert demo.main(["--output", str(tmp_path / "new"), "train.lr=zero"]) == 2
    assert "wsm-demo: error: train.lr: expected a number" in capsys.readouterr().err
    assert demo.main(["--output", str(tmp_path / "new"), "merge.quantity=1"]) == 2
    assert "merge.quantity: the online merge needs a window of at least 2" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "new").exists()


def test_watch_command_is_a_valid_wsm_watch_beside_the_run(tmp_path):
    from wsm_megatron.cli.watch import build_parser
    from wsm_megatron.training.config import load_config

    config = load_config(demo.CONFIG, ["merge.quantity=6"])
    cmd = demo.watch_command(str(demo.CONFIG), ["merge.quantity=6"], config, tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "wsm_megatron.cli.watch"]
    args = build_parser().parse_args(cmd[3:])
    assert args.durations == [2, 4, 6] and args.schedules == ["linear", "minus-sqrt"]
    assert args.until_iteration == config.train.train_iters and args.output == tmp_path / "watch"
    watcher = load_config(args.config, args.overrides)  # its own layout: one process
    assert watcher.parallel.tensor_model_parallel_size == 1
    assert watcher.model == config.model and watcher.data == config.data
