"""wsm-merge fails closed: one ``wsm-merge: error:`` line naming the checkpoint and tensor, a
non-zero exit, and the output root exactly as it was; also after a kill mid-merge. Plus the
memory budget on checkpoints larger than it."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wsm_megatron.cli.merge import main
from wsm_megatron.layout import TRACKER_FILENAME as TRACKER
from wsm_megatron.layout import iteration_dir, read_tracker
from wsm_megatron.merge import MergeConfig, merge
from wsm_megatron.merge.dcp_format import StorageFiles, locate_tensor, read_metadata
from wsm_megatron.merge.writer import TMP_PREFIX
from wsm_megatron.testing.checkpoints import (
    load_dcp_tensors,
    shared_megatron_checkpoints,
    write_dcp_checkpoint,
)

ITERATIONS = (100, 200, 300, 400, 500)
MERGED = (200, 300, 400, 500)
KEY = "decoder.layers.mlp.linear_fc1.weight"  # bf16, stored in 4 chunks


@pytest.fixture(scope="session")
def ckpts(shared_tmp) -> Path:
    return shared_megatron_checkpoints(shared_tmp / "wsm-merge", ITERATIONS)


@pytest.fixture
def inputs(ckpts, tmp_path) -> Path:
    """A private copy of the last four checkpoints, free to damage."""
    import shutil

    dest = tmp_path / "in"
    dest.mkdir()
    for it in MERGED:
        shutil.copytree(iteration_dir(ckpts, it), iteration_dir(dest, it))
    (dest / "latest_checkpointed_iteration.txt").write_text("500\n")
    return dest


def _snapshot(root: Path) -> dict[str, int]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def _fail(capsys, argv: list[str], code: int = 1) -> str:
    """Run the CLI, expect exit ``code`` and exactly one error line; return it."""
    assert main([*argv, "--no-progress"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wsm-merge: error: "), err
    return err[0]


def _argv(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(inputs), "--output", str(out), "--last", "4", *extra]


def _edit_metadata(ckpt: Path, edit) -> None:
    path = ckpt / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    edit(metadata.state_dict_metadata)
    path.write_bytes(pickle.dumps(metadata))


def _item(ckpt: Path, key: str):
    metadata = read_metadata(ckpt)
    index = next(i for i in metadata.storage_data if i.fqn == key)
    return index, metadata.storage_data[index]


def _damage_missing_config(ckpt: Path) -> tuple[str, ...]:
    (ckpt / "metadata.json").unlink()
    return ("metadata.json",)


def _damage_missing_shard(ckpt: Path) -> tuple[str, ...]:
    _, info = _item(ckpt, KEY)
    (ckpt / info.relative_path).unlink()
    return (info.relative_path, "missing")


def _damage_truncated_shard(ckpt: Path) -> tuple[str, ...]:
    _, info = _item(ckpt, KEY)
    path = ckpt / info.relative_path
    os.truncate(path, path.stat().st_size - 100)
    return (info.relative_path, "truncated")


def _damage_corrupt_blob(ckpt: Path) -> tuple[str, ...]:
    """Same size, broken torch.save blob: found by the merge rank while merging."""
    _, info = _item(ckpt, KEY)
    with open(ckpt / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"XXXX")
    return (KEY, "not a torch.save blob")


def _damage_missing_key(ckpt: Path) -> tuple[str, ...]:
    _edit_metadata(ckpt, lambda md: md.pop(KEY))
    return (KEY, "different key sets")


def _damage_shape(ckpt: Path) -> tuple[str, ...]:
    def edit(md):
        md[KEY].size = torch.Size([4, 256, 32])

    _edit_metadata(ckpt, edit)
    return (KEY, "shape (4, 256, 32)")


def _damage_dtype(ckpt: Path) -> tuple[str, ...]:
    def edit(md):
        md[KEY].properties.dtype = torch.float16

    _edit_metadata(ckpt, edit)
    return (KEY, "dtype torch.float16")


def _damage_nan(ckpt: Path) -> tuple[str, ...]:
    index, info = _item(ckpt, KEY)
    raw = locate_tensor(
        StorageFiles(),
        ckpt / info.relative_path,
        info,
        where=KEY,
        expected_dtype=torch.bfloat16,
        expected_size=(1, 128, 64),
    )
    with open(raw.path, "r+b") as f:
        f.seek(raw.data_offset + 2 * 77)
        f.write(b"\xc0\x7f")  # a bf16 NaN in element 77
    return (KEY, "NaN/Inf")


@pytest.mark.parametrize(
    "damage",
    [
        _damage_missing_config,
        _damage_missing_shard,
        _damage_truncated_shard,
        _damage_corrupt_blob,
        _damage_missing_key,
        _damage_shape,
        _damage_dtype,
        _damage_nan,
    ],
)
def test_damaged_input_fails_closed(inputs, tmp_path, capsys, damage):
    ckpt = iteration_dir(inputs, 300)
    expected = damage(ckpt)
    out = tmp_path / "out"
    message = _fail(capsys, _argv(inputs, out))
    assert str(ckpt) in message, message
    for part in expected:
        assert part in message, message
    assert not out.exists()  # not even the (new) output root is left behind


def test_no_check_finite_opts_out(inputs, tmp_path, capsys):
    _damage_nan(iteration_dir(inputs, 300))
    out = tmp_path / "out"
    assert main(_argv(inputs, out, "--no-check-finite", "--no-progress")) == 0
    merged = load_dcp_tensors(iteration_dir(out, 500), [KEY])[KEY]
    assert int(torch.isnan(merged).sum()) == 1


def test_output_dtype_overflow_fails_closed(tmp_path, capsys):
    """Finite inputs whose merge does not fit --output-dtype: an error, not a file of Inf."""
    root, out = tmp_path / "in", tmp_path / "out"
    for it in (100, 200):
        write_dcp_checkpoint(
            root, it, {"decoder.big": torch.full((3, 5), 7.0e4), "decoder.w": torch.ones(4)}
        )
    capsys.readouterr()
    message = _fail(capsys, ["--input", str(root), "--output", str(out), "--last", "2",
                             "--output-dtype", "fp16"])  # fmt: skip
    assert "tensor 'decoder.big'" in message and "overflow torch.float16" in message, message
    assert not out.exists()


def test_failed_sweep_leaves_output_root_as_it_was(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    sweep = ["--input", str(inputs), "--output", str(out), "--sweep", "2:linear", "3:minus-sqrt"]
    assert main([*sweep, "--end-iteration", "400", "--no-progress"]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    _damage_corrupt_blob(iteration_dir(inputs, 500))  # found mid-merge by the merging rank
    message = _fail(capsys, sweep)
    assert str(iteration_dir(inputs, 500)) in message and KEY in message
    assert _snapshot(out) == before


def test_invalid_weights(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    message = _fail(capsys, _argv(inputs, out, "--weights", "0.5,0.6,0.1,0.1"), code=2)
    assert "--weights" in message and "sum to 1" in message
    message = _fail(capsys, _argv(inputs, out, "--weights", "0.5,0.5"))
    assert "2 weights but 4 checkpoints" in message
    message = _fail(capsys, _argv(inputs, out, "--schedule", "nope"), code=2)
    assert "unknown schedule" in message
    assert not out.exists()


def test_existing_output_needs_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(inputs, out, "--schedule", "linear", "--no-progress")) == 0
    capsys.readouterr()
    before = _snapshot(out)
    message = _fail(capsys, _argv(inputs, out, "--schedule", "minus-sqrt"))
    assert str(iteration_dir(out, 500)) in message and "--overwrite" in message
    assert _snapshot(out) == before
    assert main(_argv(inputs, out, "--schedule", "minus-sqrt", "--overwrite", "--no-progress")) == 0
    info = (iteration_dir(out, 500) / "merge_info.json").read_text()
    assert '"schedule": "minus-sqrt"' in info
    assert sorted(p.name for p in out.iterdir()) == ["iter_0000500", TRACKER]


def test_subprocess_error_is_one_line_without_traceback(inputs, tmp_path):
    _damage_truncated_shard(iteration_dir(inputs, 400))
    proc = subprocess.run(
        [sys.executable, "-m", "wsm_megatron.cli.merge", *_argv(inputs, tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.splitlines() if "Warning" not in x and "warn" not in x]
    assert lines == [lines[0]] and lines[0].startswith("wsm-merge: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "truncated" in lines[0]


# --- Larger synthetic checkpoints (plain DCP): memory budget and kill mid-merge -------------

BIG_MB = 64


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """4 checkpoints of 64 MiB: 4 fp32 tensors of 12 MiB (one stored chunk each, larger than
    the budgets below), a bf16 tensor of 16 MiB and a small int buffer."""
    root = tmp_path_factory.mktemp("big")
    for i, it in enumerate((1000, 2000, 3000, 4000)):
        g = torch.Generator().manual_seed(i)
        tensors = {
            f"decoder.layer{n}.weight": torch.randn(3 * 2**20, generator=g).view(1536, 2048)
            for n in range(4)
        }
        tensors["embedding.weight"] = torch.randn(2**23, generator=g).view(4096, 2048).bfloat16()
        tensors["counts"] = torch.arange(16) + it
        write_dcp_checkpoint(root, it, tensors, objects={"layer0._extra_state": {"it": it}})
    return root


def test_peak_memory_stays_within_budget(big, tmp_path):
    result = merge(
        MergeConfig(
            input=big, output=tmp_path / "out", last=4, schedule="minus-sqrt", memory_budget_mb=24
        )
    )
    assert result.chunks_streamed == 5 and result.bytes_read >= 4 * BIG_MB * 2**20
    assert result.peak_rss_exact and result.peak_rss_mib <= 24, result.peak_rss_mib
    tensors = load_dcp_tensors(iteration_dir(tmp_path / "out", 4000))
    assert torch.equal(tensors["counts"], torch.arange(16) + 4000)


def _tmp_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] if root.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_mid_merge_leaves_output_root_unchanged(big, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--input", str(big), "--output", str(out), "--last", "4", "--no-progress"]
    slow = ["--memory-budget-mb", "0.25", "--io-threads", "1"]  # thousands of tiny pieces
    stderr = (tmp_path / "stderr.txt").open("w+")
    # -X faulthandler: a merge that does not stop is made to print every thread's stack.
    command = [sys.executable, "-X", "faulthandler", "-m", "wsm_megatron.cli.merge"]
    proc = subprocess.Popen([*command, *argv, *slow], stderr=stderr)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        shards = [f for d in _tmp_dirs(out) for f in d.glob("*.distcp")]
        if shards and shards[0].stat().st_size > 2**20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the merge ended before it could be interrupted"
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=60)
        stderr.seek(0)
        pytest.fail(f"the merge did not stop on {sig.name}:\n{stderr.read()}")
    assert proc.returncode != 0
    assert not iteration_dir(out, 4000).exists() and read_tracker(out) is None
    leftovers = _tmp_dirs(out)
    if sig == signal.SIGTERM:
        assert leftovers == []  # unwound and cleaned up
    # A re-run succeeds and removes what a SIGKILL left behind.
    assert main(argv) == 0
    assert _tmp_dirs(out) == [] and read_tracker(out) == 4000
    assert sorted(p.name for p in out.iterdir()) == ["iter_0004000", TRACKER]
