"""wsm-merge in a shared, imperfect world: a second merge into the same output root, write
errors (full disk, file size limits), the output's DCP version stamp, extra directories of the
newest input, and checkpoint formats other than torch_dist."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsm_megatron.cli.merge import main
from wsm_megatron.layout import TRACKER_FILENAME, iteration_dir, read_tracker
from wsm_megatron.merge.dcp_format import read_metadata
from wsm_megatron.merge.writer import LOCK_FILENAME, TMP_PREFIX, write_error
from wsm_megatron.testing.checkpoints import load_dcp_tensors, write_dcp_checkpoint

ITERATIONS = (100, 200, 300)


@pytest.fixture
def inputs(tmp_path) -> Path:
    root = tmp_path / "in"
    for i, it in enumerate(ITERATIONS):
        g = torch.Generator().manual_seed(i)
        tensors = {"decoder.weight": torch.randn(64, 32, generator=g), "counts": torch.arange(4)}
        write_dcp_checkpoint(root, it, tensors, objects={"layer._extra_state": {"it": it}})
    return root


def _run(capsys, inputs: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    argv = ["--input", str(inputs), "--output", str(out), "--last", "3", "--no-progress"]
    code = main([*argv, *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def _one_error(code: int, lines: list[str]) -> str:
    assert code == 1 and len(lines) == 1 and lines[0].startswith("wsm-merge: error: "), lines
    return lines[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- a second merge into the same output root ---------------------------------------------------


def test_second_merge_refuses_a_live_lock_and_keeps_its_temporary_directory(
    inputs, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    # A first merge of the same iteration, still running (this test process stands in for it).
    lock = out / LOCK_FILENAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    live_tmp = out / f"{TMP_PREFIX}iter_0000300-0123456789ab"
    (live_tmp / "part").mkdir(parents=True)
    message = _one_error(*_run(capsys, inputs, out))
    assert "in use by another wsm-merge" in message and f"pid {os.getpid()}" in message
    assert str(lock) in message
    assert (live_tmp / "part").is_dir() and lock.exists()  # nothing of the first one touched


def test_stale_lock_of_a_dead_merge_is_recovered(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_FILENAME
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    (out / f"{TMP_PREFIX}iter_0000300-0123456789ab").mkdir()  # what the killed merge left
    code, lines = _run(capsys, inputs, out)
    assert code == 0, lines
    assert sorted(p.name for p in out.iterdir()) == ["iter_0000300", TRACKER_FILENAME]


def test_lock_of_another_host_is_never_taken_over(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILENAME).write_text(json.dumps({"pid": _dead_pid(), "host": "other-node-7"}))
    message = _one_error(*_run(capsys, inputs, out))
    assert "other-node-7" in message and "remove the lock file" in message


# --- write errors ---------------------------------------------------------------------------------


def test_full_disk_error_is_unwrapped_from_torch():
    """torch.save reports a full disk as a RuntimeError whose context is the OSError."""
    f = open("/dev/full", "wb")  # not a with block: closing it fails too
    with pytest.raises(RuntimeError) as caught:
        torch.save(torch.zeros(100_000), f)
    with contextlib.suppress(OSError):
        f.close()
    error = write_error(Path("/out/__0_0.distcp"), caught.value)
    assert str(error) == "cannot write /out/__0_0.distcp: No space left on device"


_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
from wsm_megatron.cli.merge import main
sys.exit(main(sys.argv[1:]))
"""


def test_write_error_mid_merge_is_one_line_and_leaves_the_output_root_clean(inputs, tmp_path):
    out = tmp_path / "out"
    argv = ["--input", str(inputs), "--output", str(out), "--last", "3", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE, *argv], capture_output=True, text=True, timeout=120
    )
    lines = [x for x in proc.stderr.splitlines() if "Warning" not in x and "warn" not in x]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("wsm-merge: error: cannot write ") and "File too large" in lines[0]
    assert "__0_0.distcp" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()  # created by the merge, removed with everything in it


# --- what the output carries ------------------------------------------------------------------


def test_output_keeps_the_inputs_dcp_version_and_extra_directories(inputs, tmp_path, capsys):
    newest = iteration_dir(inputs, 300)
    path = newest / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.version = "0.9.0"  # as an older torch stamps it; ours writes "1.0.0"
    path.write_bytes(pickle.dumps(metadata))
    (newest / "modelopt_state" / "sub").mkdir(parents=True)
    (newest / "modelopt_state" / "sub" / "state.pt").write_bytes(b"quantizer state")
    out = tmp_path / "out"
    code, lines = _run(capsys, inputs, out)
    assert code == 0, lines
    merged = iteration_dir(out, 300)
    assert read_metadata(merged).version == "0.9.0"
    assert (merged / "modelopt_state" / "sub" / "state.pt").read_bytes() == b"quantizer state"
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["copied_directories"] == ["modelopt_state"] and info["dcp_version"] == "0.9.0"
    assert torch.equal(load_dcp_tensors(merged)["counts"], torch.arange(4))
    assert read_tracker(out) == 300


@pytest.mark.parametrize(
    "backend, named", [("torch_dcp", "torch_dcp"), ("fsdp_dtensor", "fsdp_dtensor")]
)
def test_other_checkpoint_formats_are_refused_by_name(inputs, tmp_path, capsys, backend, named):
    config = iteration_dir(inputs, 200) / "metadata.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sharded_backend": backend}))
    message = _one_error(*_run(capsys, inputs, tmp_path / "out"))
    assert f"--ckpt-format {named}" in message and "torch_dist" in message
    assert str(iteration_dir(inputs, 200)) in message
    assert not (tmp_path / "out").exists()


# --- a merged output merged again ---------------------------------------------------------------


def test_merged_outputs_merge_again(inputs, tmp_path, capsys):
    """wsm-merge's shard files carry no zip CRC-32s (torch.load never checks them); reading a
    merged output as an input must not check them either."""
    merged, out = tmp_path / "merged", tmp_path / "out"
    for iterations in ("100,200", "200,300"):
        argv = ["--input", str(inputs), "--output", str(merged), "--iterations", iterations]
        assert main([*argv, "--weights", "0.5,0.5", "--no-progress"]) == 0
    argv = ["--input", str(merged), "--output", str(out), "--iterations", "200,300"]
    code = main([*argv, "--weights", "0.5,0.5", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    w = {it: load_dcp_tensors(iteration_dir(inputs, it))["decoder.weight"] for it in ITERATIONS}
    again = load_dcp_tensors(iteration_dir(out, 300))
    expected = 0.25 * w[100] + 0.5 * w[200] + 0.25 * w[300]
    torch.testing.assert_close(again["decoder.weight"], expected)
    assert torch.equal(again["counts"], torch.arange(4))
