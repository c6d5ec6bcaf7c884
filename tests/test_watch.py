"""``wsm-watch`` on CPU over gloo, following the checkpoints of a small real run trained at TP=2.

- At another layout (1 process, TP=1) with ``--once``: every complete checkpoint is scored once,
  oldest first; each row's ``val`` equals ``wsm-tune``'s ``tune.json`` score of the same window
  with ``--end-iteration`` at that checkpoint, **bitwise** (the same layout, the same
  ``CandidateRunner`` and scorer); windows that the run's checkpoints cannot fill yet are
  skipped with a line; ``--save-best`` holds wsm-merge's output of the best merge so far.
- Restart: ``--until-iteration`` mid-run, then ``--once``: every iteration once (no repeat, no
  skip), the same scores; a watcher killed between its rows and its state scores that
  checkpoint again, its rows once.
- Retention and half-written saves: a checkpoint deleted before it is read is one line and
  skipped; a window that lacks a deleted checkpoint is skipped with a line; a folder without
  its metadata or beyond the tracker is never read.
- Bad input is one ``wsm-watch: error:`` line before any start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wsm_megatron.cli.watch import main as watch_main
from wsm_megatron.layout import iteration_dir, read_tracker
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.runs import SMALL_RUN, TINY_CONFIG, built_once, train_summary
from wsm_megatron.training.config import load_config

DURATIONS, SCHEDULES = "2,3", "linear,minus-sqrt"
TP1 = ["parallel.tensor_model_parallel_size=1"]


@pytest.fixture(scope="module")
def run(shared_tmp) -> tuple[list[str], Path]:
    """A trained TP=2 run: checkpoints at iterations 2, 4, 6, 8 (all kept), trained once for
    every xdist worker (tests that change it work on a copy)."""
    root = shared_tmp / "watch-run"
    overrides = [
        *SMALL_RUN,
        "checkpoint.save_interval=2",
        "merge.quantity=4",
        "train.train_iters=8",
        f"corpus.cache_dir={shared_tmp / 'wsm-train-corpus'}",
        f"checkpoint.save={root / 'ckpts'}",
    ]

    def train() -> None:
        run_distributed(train_summary, 2, overrides)

    built_once(root, train)
    return overrides, root / "ckpts"


def _argv(overrides: list[str], ckpts: Path, output: Path, *flags: str) -> list[str]:
    return [
        "--config", str(TINY_CONFIG), *overrides, *TP1, "--checkpoints", str(ckpts),
        "--durations", DURATIONS, "--schedules", SCHEDULES, "--output", str(output),
        "--poll-seconds", "1", *flags,
    ]  # fmt: skip


def _watch(argv: list[str], remove: dict[int, list[int]] | None = None) -> tuple[int, str]:
    """``wsm-watch`` in this process: its exit status and what it printed. With ``remove``,
    retention is simulated: before the plan of iteration K is made, the checkpoints
    ``remove[K]`` are deleted as retention deletes."""
    import contextlib
    import io
    import os

    import wsm_megatron.watch.api as api
    from wsm_megatron.cli.watch import main

    if remove:
        real = api.plan_iteration

        def plan(root, grid, iteration, known, unusable=()):
            for it in remove.get(iteration, []):
                doomed = root / f".deleting-{iteration_dir(root, it).name}"
                os.replace(iteration_dir(root, it), doomed)
                shutil.rmtree(doomed)
            return real(root, grid, iteration, known, unusable)

        api.plan_iteration = plan
    printed = io.StringIO()  # stdout and stderr
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        status = main(argv)
    return status, printed.getvalue()


def _tune(overrides: list[str], ckpts: str, output: str, end: int) -> dict:
    from wsm_megatron.tune.api import TuneOptions, tune
    from wsm_megatron.tune.candidates import TuneGrid

    durations = tuple(int(n) for n in DURATIONS.split(",") if int(n) <= end // 2)
    grid = TuneGrid(durations=durations, schedules=tuple(SCHEDULES.split(",")), end_iteration=end)
    options = TuneOptions(checkpoints=Path(ckpts), grid=grid, output=Path(output))
    tune(load_config(TINY_CONFIG, [*overrides, *TP1]), options)
    return json.loads((Path(output) / "tune.json").read_text())


def _rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "watch.jsonl").read_text().splitlines()]


def _by_key(rows: list[dict]) -> dict[tuple[int, str], dict]:
    keys = [(r["iteration"], r["name"]) for r in rows]
    assert len(keys) == len(set(keys)), keys  # no row twice
    return dict(zip(keys, rows, strict=True))


@pytest.fixture(scope="module")
def watched(run, tmp_path_factory) -> tuple[Path, Path, str]:
    """``wsm-watch --once --save-best`` of the run at TP=1, uninterrupted: output, best, log."""
    overrides, ckpts = run
    base = tmp_path_factory.mktemp("watched")
    out, best = base / "watch", base / "best"
    argv = _argv(overrides, ckpts, out, "--once", "--save-best", str(best))
    status, printed = run_distributed(_watch, 1, argv)[0]
    assert status == 0, printed
    return out, best, printed


def test_once_at_another_layout_equals_wsm_tune_bitwise(run, watched, tmp_path):
    overrides, ckpts = run
    out, best, printed = watched
    rows = _by_key(_rows(out))
    assert sorted({it for it, _ in rows}) == [2, 4, 6, 8]
    assert [r["iteration"] for r in _rows(out)] == sorted(r["iteration"] for r in _rows(out))
    assert {name for it, name in rows if it == 2} == {"newest"}  # no window fits yet
    assert (
        "window 2 ending at iteration 2:" in printed
        and "window 3 ending at iteration 4:" in printed
    )
    assert {name for it, name in rows if it == 8} == {
        "newest", "2:linear", "2:minus-sqrt", "3:linear", "3:minus-sqrt"
    }  # fmt: skip
    assert rows[8, "3:linear"]["window"] == [4, 6, 8]
    assert rows[8, "3:linear"]["tokens"] == 8 * 8 * 32  # iterations x batch x seq_length
    assert "wsm-watch: iteration 8" in printed  # the table's title
    assert "4 checkpoint(s) scored, 4 read from disk" in printed  # each checkpoint read once
    assert "iteration 2: 1 candidate(s) in" in printed
    assert "3 newer checkpoint(s) waiting" in printed
    assert "iteration 8: 5 candidate(s) in" in printed  # progress: rate and what is left
    state = json.loads((out / "watch_state.json").read_text())
    assert state["scored"] == [2, 4, 6, 8] and state["skipped"] == {}
    assert (out / "watch.png").stat().st_size > 10_000

    # wsm-tune --end-iteration E at the same layout: the same scores, bitwise.
    for end in (4, 8):
        report = run_distributed(_tune, 1, overrides, str(ckpts), str(tmp_path / f"t{end}"), end)[0]
        tuned = {c["name"]: c for c in report["candidates"]}
        assert set(tuned) == {name for it, name in rows if it == end}
        for name, c in tuned.items():
            assert rows[end, name]["val"] == c["scores"]["val"], (end, name)
            assert rows[end, name]["window"] == c["iterations"]

    # --save-best: the best merge so far, by val (lower is better), improving only.
    merges = [r for (it, name), r in rows.items() if name != "newest"]
    champion = min(merges, key=lambda r: (r["val"], r["iteration"]))
    assert state["best"]["name"] == champion["name"] and state["best"]["score"] == champion["val"]
    assert read_tracker(best) == champion["iteration"]
    assert iteration_dir(best, champion["iteration"]).is_dir()
    info = json.loads((iteration_dir(best, champion["iteration"]) / "merge_info.json").read_text())
    assert [i["iteration"] for i in info["inputs"]] == champion["window"]
    assert [i["coefficient"] for i in info["inputs"]] == champion["coefficients"]
    from wsm_megatron.training.retention import pin_path
    from wsm_megatron.watch.pin import WatchPin

    assert not pin_path(ckpts, WatchPin(ckpts, out, print).owner).exists()  # released


def test_restart_scores_every_iteration_once_and_retention_is_skipped(run, tmp_path):
    overrides, source = run
    ckpts = tmp_path / "ckpts"
    shutil.copytree(source, ckpts)
    out = tmp_path / "watch"
    status, first = run_distributed(
        _watch, 1, _argv(overrides, ckpts, out, "--until-iteration", "4")
    )[0]
    assert status == 0, first
    assert sorted({r["iteration"] for r in _rows(out)}) == [2, 4]

    # Half-written saves: a folder without DCP's .metadata, one beyond the tracker.
    shutil.copytree(iteration_dir(ckpts, 8), iteration_dir(ckpts, 10))
    (iteration_dir(ckpts, 10) / ".metadata").unlink()
    shutil.copytree(iteration_dir(ckpts, 8), iteration_dir(ckpts, 12))
    # A watcher killed after writing iteration 6's rows but before its state: a torn line too.
    with open(out / "watch.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 6, "name": "newest", "val": 0.0}) + '\n{"iter')

    # Retention deletes iteration 6 before it is read (and so 8's windows lack it).
    argv = _argv(overrides, ckpts, out, "--once")
    status, printed = run_distributed(_watch, 1, argv, {6: [6]})[0]
    assert status == 0, printed
    assert "wsm-watch: following" in printed and "2 checkpoint(s) already scored" in printed
    assert "wsm-watch: iteration 6: removed before it was read (the run's retention)" in printed
    assert "window 2 ending at iteration 8: checkpoint(s) [6] were removed" in printed
    rows = _by_key(_rows(out))  # no row twice
    assert sorted({it for it, _ in rows}) == [2, 4, 8]
    assert {name for it, name in rows if it == 8} == {"newest"}
    state = json.loads((out / "watch_state.json").read_text())
    assert state["scored"] == [2, 4, 8] and set(state["skipped"]) == {"6"}
    assert "iteration 10" not in first + printed and "iteration 12" not in first + printed

    # A third start finds nothing new: no checkpoint is scored again.
    assert run_distributed(_watch, 1, argv)[0][0] == 0
    assert _by_key(_rows(out)) == rows


@pytest.mark.parametrize(
    "flags, status, message",
    [
        (["--durations", "1"], 2, "--durations: a merge needs at least 2 checkpoints, got 1"),
        (["--durations", "5"], 2, "--durations 5: the run keeps only its newest 4 checkpoints"),
        (["--durations", "2", "--tasks", "mmlu"], 2, "--tasks: unknown task 'mmlu'"),
        (["--durations", "2", "--poll-seconds", "0"], 2, "--poll-seconds must be > 0"),
        (["--durations", "2", "--output", "{ckpts}/w"], 2, "--output {ckpts}/w lies inside"),
        (["--durations", "2", "--checkpoints", "{other}"], 1, "--checkpoints {other} is not a"),
        (["--once", "--durations", "2", "--checkpoints", "{empty}"], 1, "--checkpoints {empty}"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(flags, status, message, capsys, tmp_path):
    ckpts, empty, other = tmp_path / "ckpts", tmp_path / "empty", tmp_path / "other"
    for folder in (ckpts, empty, other):
        folder.mkdir()
    (ckpts / "latest_checkpointed_iteration.txt").write_text("2\n")
    (other / "notes.txt").write_text("not a checkpoint\n")
    fill = {"ckpts": ckpts, "empty": empty, "other": other}
    argv = ["--config", str(TINY_CONFIG), "merge.quantity=4", "--checkpoints", str(ckpts)]
    argv += [flag.format(**fill) for flag in flags]
    assert watch_main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith(f"wsm-watch: error: {message.format(**fill)}") and err.count("\n") == 1, (
        err
    )


def _watch_killed(argv: list[str], moment: str, iteration: int) -> tuple[int, str]:
    """``wsm-watch`` SIGKILLed at ``moment`` of its writes for checkpoint ``iteration``:
    ``torn`` (half of its rows appended), ``rows`` (all appended, the state not saved),
    ``state`` (saved, the plot not redrawn), ``best`` (the first new best merge from
    ``iteration`` on written, the older one not pruned yet). Nothing is mocked but the
    moment: the real writers run."""
    import os
    import signal

    import wsm_megatron.training.retention as retention
    import wsm_megatron.watch.api as api

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    append, plot, prune = api.append_rows, api.plot, retention.prune_checkpoints

    def append_then_die(output, rows):
        if rows[0]["iteration"] != iteration:
            return append(output, rows)
        if moment == "torn":
            data = "".join(json.dumps(r) + "\n" for r in rows)
            with open(output / "watch.jsonl", "a") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        append(output, rows)
        die()

    def plot_or_die(rows, task, path):
        if max(r["iteration"] for r in rows) == iteration:
            die()
        plot(rows, task, path)

    def prune_or_die(root, keep_last, keep_every=None):
        if "best" in str(root) and read_tracker(root) >= iteration:
            die()
        return prune(root, keep_last, keep_every)

    if moment in ("torn", "rows"):
        api.append_rows = append_then_die
    elif moment == "state":
        api.plot = plot_or_die
    else:
        retention.prune_checkpoints = prune_or_die
    return _watch(argv)


@pytest.mark.parametrize("moment", ["torn", "rows", "state", "best"])
def test_killed_watcher_restarts_as_if_uninterrupted(run, watched, tmp_path, moment):
    """kill -9 at each step of the watcher's writes, then a restart: the same rows (none lost,
    none twice), state and best merge as the uninterrupted watch."""
    overrides, ckpts = run
    out, best = tmp_path / "watch", tmp_path / "best"
    argv = _argv(overrides, ckpts, out, "--once", "--save-best", str(best))
    with pytest.raises(RuntimeError, match="died without reporting"):
        run_distributed(_watch_killed, 1, argv, moment, 6)
    killed_at = read_tracker(best) if moment == "best" else 6  # the first new best from 6 on
    assert killed_at >= 6
    scored = [it for it in (2, 4, 6, 8) if it < killed_at or (it == 6 and moment == "state")]
    assert json.loads((out / "watch_state.json").read_text())["scored"] == scored
    status, printed = run_distributed(_watch, 1, argv)[0]
    assert status == 0, printed
    reference_out, reference_best, _ = watched
    assert _by_key(_rows(out)) == _by_key(_rows(reference_out))
    state, reference = (
        json.loads((o / "watch_state.json").read_text()) for o in (out, reference_out)
    )
    assert state == reference
    assert read_tracker(best) == read_tracker(reference_best)
    assert sorted(p.name for p in best.iterdir()) == sorted(
        p.name for p in reference_best.iterdir()
    )


def _launch(args: list[str], nproc: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), *args]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def test_watcher_beside_a_live_training_job_scores_each_checkpoint_once(
    shared_tmp, tmp_path
):  # fmt: skip
    """``wsm-watch`` (1 process, TP=1) started before a training job (2 processes, TP=2) has
    saved anything: it waits, follows the run as it saves, reads each checkpoint once and
    scores what wsm-tune scores at the end, bitwise; it leaves nothing in the run's folder."""
    ckpts, out = tmp_path / "ckpts", tmp_path / "watch"
    overrides = [
        *SMALL_RUN,
        "checkpoint.save_interval=2",
        "merge.quantity=6",
        "train.train_iters=12",
        f"corpus.cache_dir={shared_tmp / 'wsm-train-corpus'}",
        f"checkpoint.save={ckpts}",
    ]
    watch_log, train_log = tmp_path / "watch.log", tmp_path / "train.log"
    flags = ["--until-iteration", "12", "--poll-seconds", "0.5"]
    watcher = _launch(
        ["-m", "wsm_megatron.cli.watch", *_argv(overrides, ckpts, out), *flags], 1, watch_log
    )
    trainer = _launch(
        ["-m", "wsm_megatron.cli.train", "--config", str(TINY_CONFIG), *overrides], 2, train_log
    )
    try:
        assert trainer.wait(timeout=240) == 0, train_log.read_text()[-3000:]
        assert watcher.wait(timeout=240) == 0, watch_log.read_text()[-3000:]
    finally:
        for proc in (watcher, trainer):
            proc.kill()
    printed = watch_log.read_text()
    assert "waiting for" in printed  # it was running before the first save
    assert "6 checkpoint(s) scored, 6 read from disk" in printed
    rows = _by_key(_rows(out))
    assert sorted({it for it, _ in rows}) == [2, 4, 6, 8, 10, 12]
    report = run_distributed(_tune, 1, overrides, str(ckpts), str(tmp_path / "tune"), 12)[0]
    for c in report["candidates"]:
        assert rows[12, c["name"]]["val"] == c["scores"]["val"], c["name"]
    left = {p.name for p in ckpts.iterdir()} - {f"iter_{it:07d}" for it in range(2, 13, 2)}
    assert left <= {"latest_checkpointed_iteration.txt", ".wsm-pins"}, left
    assert not any((ckpts / ".wsm-pins").iterdir())  # its pin released


def test_config_of_another_model_is_one_line(run, tmp_path):
    overrides, ckpts = run
    out = tmp_path / "watch"
    argv = _argv([*overrides, "model.ffn_hidden_size=96"], ckpts, out, "--once")
    status, printed = run_distributed(_watch, 1, argv)[0]
    assert status == 1, printed
    (line,) = [x for x in printed.splitlines() if "error" in x]
    assert line.startswith(f"wsm-watch: error: --config does not match the model of {ckpts}/")
    shapes = "(4, 128, 64) in the checkpoint and (4, 96, 64) in the model"
    assert f"decoder.layers.mlp.linear_fc1.weight is {shapes}" in line
    assert "Traceback" not in printed and not (out / "watch.jsonl").exists()


def test_wandb_run_is_grouped_with_the_training_run(tmp_path):
    """Offline by default, in ``--output``; the training run's project and group (its name
    when it has no group), ``job_type=wsm-watch``; a row per checkpoint at its iteration."""
    from wsm_megatron.watch.api import _wandb_logger
    from wsm_megatron.watch.report import wandb_values

    config = load_config(TINY_CONFIG, ["logging.wandb_name=demo"])
    logger = _wandb_logger(config, tmp_path, is_main=True)
    try:
        run = logger.wandb
        assert (run.group, run.job_type, run.name) == ("demo", "wsm-watch", "demo-watch")
        assert run.project == "wsm-megatron" and run.settings.mode == "offline"
        assert Path(run.settings.sync_dir).is_relative_to(tmp_path)
        rows = [{"iteration": 4, "name": "newest", "tokens": 512, "val": 5.5, "window": [4]}]
        rows += [{"iteration": 4, "name": "2:linear", "tokens": 512, "val": 5.25}]
        assert wandb_values(rows) == {"newest/val": 5.5, "2:linear/val": 5.25, "tokens": 512.0}
        logger.log("watch", 4, wandb_values(rows))
    finally:
        logger.close()
    grouped = load_config(TINY_CONFIG, ["logging.wandb_group=g", "logging.wandb_mode=disabled"])
    assert _wandb_logger(grouped, tmp_path, is_main=True) is None


def test_window_above_the_memory_budget_reads_again_and_says_so(run, watched, tmp_path):
    """Snapshots of a window of 3 do not fit: candidates run from accumulators as wsm-tune
    runs them, each window read again (said once); scores equal the snapshots' to fp32."""
    overrides, ckpts = run
    out = tmp_path / "watch"
    argv = _argv(overrides, ckpts, out, "--once", "--snapshot-memory-gb", "0.0015")
    status, printed = run_distributed(_watch, 1, argv)[0]
    assert status == 0, printed
    assert printed.count("above --snapshot-memory-gb 0.0015") == 1
    assert "4 checkpoint(s) scored, 9 read from disk" in printed  # [2], [2,4], [2,4,6], [4,6,8]
    rows, reference = _by_key(_rows(out)), _by_key(_rows(watched[0]))
    assert rows.keys() == reference.keys()
    for key, row in rows.items():
        assert row["val"] == pytest.approx(reference[key]["val"], rel=1e-5), key


def _poison(ckpt: Path) -> None:
    """A NaN in the first element of the final norm's weight, written into its shard file."""
    import struct

    import torch

    from wsm_megatron.merge.dcp_format import StorageFiles, locate_tensor, read_metadata

    key = "decoder.final_layernorm.weight"
    metadata = read_metadata(ckpt)
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data[index]
    raw = locate_tensor(
        StorageFiles(), ckpt / info.relative_path, info, where=key,
        expected_dtype=torch.float32, expected_size=(64,),
    )  # fmt: skip
    with open(raw.path, "r+b") as f:
        f.seek(raw.data_offset)
        f.write(struct.pack("<f", float("nan")))


def test_damaged_and_nan_checkpoints_are_reported_and_skipped(run, tmp_path):
    """A checkpoint whose checksums fail is retried, then skipped with its iteration; one
    without checksums (as Megatron-LM writes) that loads with a NaN is skipped too; windows
    that hold either are skipped with a line, and the watcher goes on."""
    overrides, source = run
    ckpts = tmp_path / "ckpts"
    shutil.copytree(source, ckpts)
    _poison(iteration_dir(ckpts, 4))
    (iteration_dir(ckpts, 6) / "wsm_integrity.json").unlink()
    _poison(iteration_dir(ckpts, 6))
    out = tmp_path / "watch"
    argv = _argv(overrides, ckpts, out, "--once", "--load-retries", "1")
    status, printed = run_distributed(_watch, 1, argv)[0]
    assert status == 0, printed
    assert "iteration 4: load failed (ValueError: checkpoint " in printed
    assert "retrying in 1 s" in printed and "is damaged" in printed
    assert "iteration 4: failed to load (ValueError: checkpoint " in printed
    assert "iteration 6: non-finite val (NaN/Inf in its values); skipped" in printed
    assert "window 2 ending at iteration 6: checkpoint(s) [4] could not be used" in printed
    assert "window 2 ending at iteration 8: checkpoint(s) [6] could not be used" in printed
    assert "Traceback" not in printed
    state = json.loads((out / "watch_state.json").read_text())
    assert state["scored"] == [2, 8] and set(state["skipped"]) == {"4", "6"}
    assert {name for it, name in _by_key(_rows(out))} == {"newest"}


def _evaluate(overrides: list[str], checkpoints: list[str]) -> dict:
    from wsm_megatron.training.trainer import evaluate_checkpoints

    return evaluate_checkpoints(load_config(TINY_CONFIG, overrides), checkpoints)


def test_rows_equal_wsm_merge_and_evaluate_bitwise_here_and_to_fp32_at_the_runs_layout(
    run, watched, tmp_path
):  # fmt: skip
    """A row of the watcher (TP=1) is ``wsm-merge`` of its window + ``wsm-train --evaluate``:
    bitwise at its own layout, to fp32 rounding at the run's (TP=2)."""
    from wsm_megatron.cli.merge import main as merge_main

    overrides, ckpts = run
    rows = _by_key(_rows(watched[0]))
    paths = {}
    for it, name in [(6, "2:minus-sqrt"), (8, "3:linear")]:
        row, out = rows[it, name], tmp_path / f"merge-{it}-{name.replace(':', '-')}"
        window = ",".join(map(str, row["window"]))
        flags = ["--iterations", window, "--schedule", row["schedule"], "--no-progress"]
        assert merge_main(["--input", str(ckpts), "--output", str(out), *flags]) == 0
        paths[it, name] = str(out)
    here = run_distributed(_evaluate, 1, [*overrides, *TP1], list(paths.values()))[0]
    there = run_distributed(_evaluate, 2, overrides, list(paths.values()))[0]
    for key, path in paths.items():
        assert rows[key]["val"] == here[path]["val_loss"], key
        assert rows[key]["val"] == pytest.approx(there[path]["val_loss"], rel=1e-5), key


def test_watcher_on_two_ranks_at_dp2_scores_as_one(run, watched, tmp_path):
    """The watcher's own launch on 2 processes (TP=1, DP=2: the ring sliced over DP, every
    decision made on rank 0): the same checkpoints and windows, scores to fp32 rounding (the
    loss is reduced over the replicas), and the same best merge saved."""
    overrides, ckpts = run
    out, best = tmp_path / "watch", tmp_path / "best"
    argv = _argv(overrides, ckpts, out, "--once", "--save-best", str(best))
    (status, printed), (other, quiet) = run_distributed(_watch, 2, argv)
    assert status == other == 0, printed
    assert "wsm-watch" not in quiet  # rank 1 prints no line, no table
    rows, reference = _by_key(_rows(out)), _by_key(_rows(watched[0]))
    assert rows.keys() == reference.keys()
    for key, row in rows.items():
        assert row["window"] == reference[key]["window"]
        assert row["val"] == pytest.approx(reference[key]["val"], rel=1e-5), key
    state = json.loads((out / "watch_state.json").read_text())
    assert (
        state["best"]["name"]
        == json.loads((watched[0] / "watch_state.json").read_text())["best"]["name"]
    )
    assert read_tracker(best) == read_tracker(watched[1])


def _tune_tokens(overrides: list[str], ckpts: str, output: str, end: int) -> dict:
    from wsm_megatron.tune.api import TuneOptions, tune
    from wsm_megatron.tune.candidates import TuneGrid

    grid = TuneGrid(durations_tokens=(1024,), schedules=("linear",), end_iteration=end)
    tune(load_config(TINY_CONFIG, [*overrides, *TP1]), TuneOptions(Path(ckpts), grid, Path(output)))
    return json.loads((Path(output) / "tune.json").read_text())


def test_token_windows_grow_the_window_and_equal_wsm_tune(run, tmp_path):
    """``--durations-tokens``: the window's size is learnt as the run goes (a larger ring, the
    snapshots copied over: each checkpoint still read once); the rows are wsm-tune's,
    bitwise."""
    overrides, ckpts = run
    out = tmp_path / "watch"
    argv = [
        "--config", str(TINY_CONFIG), *overrides, *TP1, "--checkpoints", str(ckpts),
        "--durations-tokens", "1024", "--schedules", "linear", "--output", str(out), "--once",
    ]  # fmt: skip
    status, printed = run_distributed(_watch, 1, argv)[0]
    assert status == 0, printed
    assert "re-reading" not in printed and "4 checkpoint(s) scored, 4 read from disk" in printed
    rows = _by_key(_rows(out))
    report = run_distributed(_tune_tokens, 1, overrides, str(ckpts), str(tmp_path / "t"), 8)[0]
    merges = [c for c in report["candidates"] if c["name"] != "newest"]
    assert merges and all(rows[8, c["name"]]["val"] == c["scores"]["val"] for c in merges)
    assert rows[8, merges[0]["name"]]["window"] == merges[0]["iterations"]


def test_sigterm_stops_the_watcher_and_releases_its_pin(run, tmp_path):
    """While it follows a run its pin holds what its window holds; SIGTERM (SLURM ending the
    step) stops it with status 130, its pin released and its files whole."""
    import signal
    import time

    from wsm_megatron.training.retention import pin_path
    from wsm_megatron.watch.pin import WatchPin

    overrides, ckpts = run
    out = tmp_path / "watch"
    pin = pin_path(ckpts, WatchPin(ckpts, out, print).owner)
    log = tmp_path / "watch.log"
    cmd = [sys.executable, "-m", "wsm_megatron.cli.watch", *_argv(overrides, ckpts, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    watcher = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        state = out / "watch_state.json"
        deadline = time.monotonic() + 120

        def settled() -> bool:  # all scored; the pin: its window of 3, nothing left to read
            if not (state.is_file() and json.loads(state.read_text())["scored"] == [2, 4, 6, 8]):
                return False
            return json.loads(pin.read_text())["iterations"] == [4, 6, 8]

        while not settled():
            assert watcher.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=60) == 130, log.read_text()
    finally:
        watcher.kill()
    assert "wsm-watch: stopped; a restart goes on from" in log.read_text()
    assert not pin.exists()
    assert len(_by_key(_rows(out))) == 1 + 3 + 5 + 5  # 2: newest; 4: +2 merges; 6, 8: +4


def test_a_run_as_megatron_lm_writes_it_is_followed_the_same(run, watched, tmp_path):
    """Megatron-LM writes no ``wsm_integrity.json`` (its files are checked against DCP's byte
    ranges instead): the watcher scores such a run exactly as ours."""
    overrides, source = run
    ckpts = tmp_path / "ckpts"
    shutil.copytree(source, ckpts, ignore=shutil.ignore_patterns("wsm_integrity.json", ".wsm-*"))
    assert not list(ckpts.glob("*/wsm_integrity.json"))
    out = tmp_path / "watch"
    status, printed = run_distributed(_watch, 1, _argv(overrides, ckpts, out, "--once"))[0]
    assert status == 0, printed
    assert _by_key(_rows(out)) == _by_key(_rows(watched[0]))
