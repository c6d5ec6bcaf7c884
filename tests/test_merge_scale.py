"""wsm-merge at the scale of real runs: a fast start (``--help`` and flag errors import neither
torch nor megatron-core), thousands of shard files under a small open-file limit, rank 0's
memory on huge metadata, and the output root's lock."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from wsm_megatron.layout import iteration_dir
from wsm_megatron.merge import MergeConfig
from wsm_megatron.merge.dcp_format import StorageFiles
from wsm_megatron.testing.checkpoints import load_dcp_tensors
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.synthetic import (
    write_many_files_checkpoint,
    write_metadata_only_checkpoints,
)

_IMPORTS = """
import sys
from wsm_megatron.cli.merge import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "megatron", "numpy") if m in sys.modules)
print("HEAVY", ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize(
    "argv, code, expected",
    [
        (["--help"], 0, "usage: wsm-merge"),
        (["--input", "a", "--output", "b"], 2, "one of --iterations"),  # a MergeError
        (["--input", "a", "--output", "b", "--last", "x"], 2, "invalid int value"),  # argparse
        (["--input", "a", "--output", "b", "--last", "4", "--output-dtype", "fp8"], 2, "choice"),
        (["--input", "a", "--output", "b", "--last", "4", "--memory-budget-mb", "0"], 2, "> 0"),
    ],
)
def test_help_and_flag_errors_import_neither_torch_nor_megatron(argv, code, expected):
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS, *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == code, proc.stderr
    assert expected in proc.stdout + proc.stderr
    assert "HEAVY \n" in proc.stdout, proc.stdout  # nothing heavy was imported


# --- Thousands of shard files under a small open-file limit ---------------------------------

_LIMITED = """
import resource, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
from wsm_megatron.cli.merge import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "files, limit",
    [(600, 128), pytest.param(2000, 256, marks=pytest.mark.slow)],
)
def test_thousands_of_shard_files_under_a_small_open_file_limit(tmp_path, files, limit):
    """4 inputs x ``files`` shard files (one chunk of a row-sharded tensor each), merged by
    the CLI under a hard limit of ``limit`` descriptors, well below the files of one input;
    the result equals DCP's fp64 reference. (2,000 files: ``-m slow``.)"""
    root = tmp_path / "in"
    reference = torch.zeros(files, 8, dtype=torch.float64)
    for i, it in enumerate((10, 20, 30, 40)):
        weight = torch.randn(files, 8, generator=torch.Generator().manual_seed(i))
        write_many_files_checkpoint(root, it, {"decoder.weight": weight}, files=files)
        reference += 0.25 * weight.double()
    assert len(list(iteration_dir(root, 40).glob("*.distcp"))) == files
    out = tmp_path / "out"
    argv = ["--input", str(root), "--output", str(out), "--last", "4", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(limit), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    merged = load_dcp_tensors(iteration_dir(out, 40))["decoder.weight"]
    torch.testing.assert_close(merged.double(), reference, rtol=1e-6, atol=1e-6)


def test_storage_files_keep_a_bounded_number_open(tmp_path):
    paths = []
    for k in range(12):
        paths.append(tmp_path / f"__{k}_0.distcp")
        paths[-1].write_bytes(bytes([k]) * 64)
    files = StorageFiles(max_open=3)

    def read(k: int) -> bytes:
        return files.read(paths[k % 12], k % 7, 5)

    with ThreadPoolExecutor(4) as pool:
        for k, data in enumerate(pool.map(read, range(200))):
            assert data == bytes([k % 12]) * 5
            assert files.open_count <= 3 + 4  # idle ones closed; at most one per reader over
    assert files.open_count <= 3
    files.close()
    assert files.open_count == 0


def test_storage_files_trim_back_to_the_limit_once_busy_readers_finish(tmp_path, monkeypatch):
    """Four reads in flight at once need four descriptors over a limit of 3; when they finish,
    the cache is back at its limit (the over-limit one is closed on release, not left open)."""
    paths = [tmp_path / f"__{k}_0.distcp" for k in range(4)]
    for k, path in enumerate(paths):
        path.write_bytes(bytes([k]) * 16)
    files = StorageFiles(max_open=3)
    all_reading = threading.Barrier(4, timeout=30)
    preadv = os.preadv

    def preadv_when_all_are_reading(fd, buffers, offset):
        all_reading.wait()
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv_when_all_are_reading)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda k: files.read(paths[k], 0, 2), range(4))) == [
            bytes([k]) * 2 for k in range(4)
        ]
    assert files.open_count == 3
    files.close()


_EXHAUSTED = """
import os, resource, sys
from pathlib import Path
from wsm_megatron.merge.dcp_format import MergeError, StorageFiles
paths = sorted(Path(sys.argv[1]).iterdir())
held = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (held + 4, held + 4))
files = StorageFiles()
try:
    for path in paths:
        files.read(path, 0, 1)
except MergeError as err:
    print(err)
"""


def test_running_out_of_descriptors_names_the_limit_and_the_remedy(tmp_path):
    for k in range(16):
        (tmp_path / f"__{k}_0.distcp").write_bytes(b"x")
    proc = subprocess.run(
        [sys.executable, "-c", _EXHAUSTED, str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert message.startswith(f"cannot open {tmp_path}/__"), message
    assert "Too many open files (open-file limit: soft " in message
    assert message.endswith("raise it with ulimit -n)")


def test_start_up_raises_the_soft_open_file_limit():
    code = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "from wsm_megatron.cli.merge import raise_open_file_limit\n"
        "raise_open_file_limit()\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- Rank 0's memory on huge metadata ---------------------------------------------------------

BUDGET_MB = 1024.0  # the default --memory-budget-mb


def _plan_on_rank(root: str, out: str) -> tuple[int, int, int]:
    """The merge's planning phase on one rank: peak RSS above start-up, units, buffer bytes."""
    from wsm_megatron.merge.api import Comm, plan_and_send
    from wsm_megatron.merge.report import PeakMemory
    from wsm_megatron.runtime import init_distributed

    init_distributed(megatron=False, backend="gloo")
    comm = Comm()
    memory = PeakMemory()
    config = MergeConfig(input=root, output=out, last=8, memory_budget_mb=BUDGET_MB)
    prepared, (status, plan), error = plan_and_send(comm, config)
    assert error is None and status == "ok", plan
    peak = memory.peak_above_baseline()
    if prepared is not None:
        prepared.cleanup()
    return peak, len(plan.units), plan.buffers.total_bytes


@pytest.mark.parametrize(
    "model_chunks, optimizer_chunks, files",
    [
        pytest.param(50_000, 150_000, 2000, marks=pytest.mark.slow, id="200k"),
        pytest.param(5_000, 15_000, 200, id="20k"),
    ],
)
def test_planning_huge_metadata_of_8_inputs_stays_within_the_budget(
    tmp_path, model_chunks, optimizer_chunks, files
):
    """8 inputs whose ``.metadata`` holds 200k chunks each (50k model, 150k optimizer: 28 MB on
    disk, ~214 MiB unpickled) over 2,000 shard files (``slow``: 75-175 s on 2 cores; by default
    a tenth of that runs). Merging 400k (input, chunk) pairs takes minutes on 2 cores, so this
    measures what grows with the metadata, the planning phase (read every input, plan, send
    each rank its plan): every rank's peak RSS, plus the buffers it will allocate, stays within
    the budget, and rank 0 holds at most one input's metadata."""
    root = tmp_path / "in"
    write_metadata_only_checkpoints(
        root,
        range(100, 900, 100),
        model_chunks=model_chunks,
        optimizer_chunks=optimizer_chunks,
        files=files,
    )
    chunks = model_chunks + optimizer_chunks
    assert (iteration_dir(root, 800) / ".metadata").stat().st_size > 25e6 * chunks / 200_000
    results = run_distributed(_plan_on_rank, 2, str(root), str(tmp_path / "out"))
    assert sum(units for _, units, _ in results) == model_chunks
    for rank, (peak, _, buffers) in enumerate(results):
        assert (peak + buffers) / 2**20 <= BUDGET_MB, (rank, peak / 2**20, buffers / 2**20)
    assert not (tmp_path / "out").exists()  # nothing left behind by the planning


# --- Many small chunks: several pieces per kernel call ---------------------------------------


FC1 = "decoder.layers.0.mlp.linear_fc1.weight"
FC2 = "decoder.layers.0.mlp.linear_fc2.weight"


def _small_chunk_inputs(root, poison: tuple[int, int] | None = None) -> dict[int, dict]:
    """3 checkpoints of an fp32 and a bf16 tensor, each in 40 row blocks of its own file;
    ``poison = (checkpoint, row)`` puts a NaN there."""
    written = {}
    for i, it in enumerate((10, 20, 30)):
        g = torch.Generator().manual_seed(i)
        tensors = {FC1: torch.randn(400, 16, generator=g)}
        tensors[FC2] = torch.randn(200, 8, generator=g).bfloat16()
        if poison is not None and poison[0] == i:
            tensors[FC1][poison[1], 3] = float("nan")
        write_many_files_checkpoint(root, it, tensors, files=40)
        written[it] = tensors
    return written


def _counting_combine(monkeypatch) -> list[int]:
    import wsm_megatron.merge.engine as engine

    calls: list[int] = []

    def combine(outputs, *args, **kwargs):
        calls.append(len(outputs))
        return engine_combine(outputs, *args, **kwargs)

    engine_combine = engine.combine
    monkeypatch.setattr(engine, "combine", combine)
    return calls


def test_small_chunks_merge_many_per_kernel_call_with_the_bits_of_one_call_each(
    tmp_path, monkeypatch
):
    from wsm_megatron.cli.merge import main

    written = _small_chunk_inputs(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), "--last", "3", "--no-progress"]
    calls = _counting_combine(monkeypatch)
    assert main([*argv, "--output", str(tmp_path / "grouped")]) == 0
    assert sum(calls) == 80 and max(calls) > 1 and len(calls) < 80, calls
    calls.clear()
    monkeypatch.setattr("wsm_megatron.merge.plan.MAX_GROUP", 1)
    assert main([*argv, "--output", str(tmp_path / "single")]) == 0
    assert calls == [1] * 80
    grouped = load_dcp_tensors(iteration_dir(tmp_path / "grouped", 30))
    single = load_dcp_tensors(iteration_dir(tmp_path / "single", 30))
    for key, bits, tol in ((FC1, torch.int32, 1e-6), (FC2, torch.int16, 1e-2)):
        assert torch.equal(grouped[key].view(bits), single[key].view(bits)), key
        reference = sum(written[it][key].double() for it in written) / 3
        torch.testing.assert_close(grouped[key].double(), reference, rtol=tol, atol=tol)


def test_a_nan_in_a_grouped_piece_names_its_checkpoint_and_chunk(tmp_path, capsys):
    from wsm_megatron.cli.merge import main

    _small_chunk_inputs(tmp_path / "in", poison=(1, 257))  # row 257: block 25 (rows 250-259)
    argv = ["--input", str(tmp_path / "in"), "--last", "3", "--output", str(tmp_path / "out")]
    assert main([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wsm-merge: error: checkpoint "), err
    assert "iter_0000020" in err[0] and f"{FC1!r} (chunk at (250, 0))" in err[0], err
    assert "NaN/Inf" in err[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("iter_*"))
