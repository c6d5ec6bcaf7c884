"""Checkpoints that survive anything: kill -9 at each moment of a save, damaged files, torn
folders — a re-run ends with every checkpoint and every merged model an uninterrupted run has,
bit for bit, or names what it could not use (2 gloo processes, TP1 x DP2, the online merge on).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from wsm_megatron.cli.merge import main as merge_main
from wsm_megatron.layout import iteration_dir, list_iterations, read_tracker
from wsm_megatron.testing.checkpoints import load_dcp_tensors
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.faults import train_killed
from wsm_megatron.testing.runs import SMALL_RUN, train_summary

RUN = [
    *SMALL_RUN,
    "parallel.tensor_model_parallel_size=1",
    "checkpoint.save_interval=2",
    "merge.online=true",
    "merge.quantity=3",
    "merge.schedule=minus-sqrt",
]


def _args(corpus_dir: str, root: Path, iters: int = 8, *extra: str) -> list[str]:
    return [
        *RUN,
        f"corpus.cache_dir={corpus_dir}",
        f"checkpoint.save={root / 'ckpts'}",
        f"merge.save_dir={root / 'merged'}",
        f"train.train_iters={iters}",
        *extra,
    ]


def _tensors(root: Path) -> dict[int, dict]:
    return {it: load_dcp_tensors(iteration_dir(root, it)) for it in list_iterations(root)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip((a[i] for i in sorted(a)), (b[i] for i in sorted(b)), strict=True)
    )


def _leftovers(root: Path) -> list[str]:
    return sorted(
        p.name for sub in ("ckpts", "merged") for p in (root / sub).iterdir() if p.name[0] == "."
    )


@pytest.fixture(scope="module")
def uninterrupted(corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run_distributed(train_summary, 2, _args(corpus_dir, root))
    return root, result, _tensors(root / "ckpts"), _tensors(root / "merged")


@pytest.mark.parametrize(
    "moment, iteration",
    [("shard", 6), ("tracker", 6), ("merged-shard", 6), ("publish", 6), ("merged-shard", 8)],
    ids=["training-shard", "metadata-to-tracker", "merged-save", "tracker-to-publish", "final"],
)
def test_a_rerun_after_kill_9_ends_as_the_uninterrupted_run(
    uninterrupted, corpus_dir, tmp_path, moment, iteration
):
    ref_root, ref, ref_ckpts, ref_merged = uninterrupted
    args = _args(corpus_dir, tmp_path)
    with pytest.raises(RuntimeError):
        run_distributed(train_killed, 2, args, moment, iteration)
    resumed = run_distributed(train_summary, 2, args)
    assert list_iterations(tmp_path / "ckpts") == list_iterations(ref_root / "ckpts")
    assert list_iterations(tmp_path / "merged") == list_iterations(ref_root / "merged")
    assert read_tracker(tmp_path / "ckpts") == read_tracker(tmp_path / "merged") == 8
    assert _same(_tensors(tmp_path / "ckpts"), ref_ckpts)  # weights, optimizer, to the bit
    assert _same(_tensors(tmp_path / "merged"), ref_merged)
    assert _leftovers(tmp_path) == [".wsm-merge.lock"] or _leftovers(tmp_path) == []
    for a, b in zip(resumed, ref, strict=True):
        assert all(np.array_equal(a["weights"][k], b["weights"][k]) for k in b["weights"])
        assert all(b["merged_losses"][it] == v for it, v in a["merged_losses"].items())
    if moment in ("merged-shard", "publish"):  # the lost merge point is formed again
        assert iteration in resumed[0]["merged_losses"]


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_is_named_and_the_run_falls_back(
    uninterrupted, corpus_dir, tmp_path, capsys
):
    _, _, ref_ckpts, _ = uninterrupted
    args = _args(corpus_dir, tmp_path)
    run_distributed(train_summary, 2, args)
    newest = iteration_dir(tmp_path / "ckpts", 8)
    shard = sorted(newest.glob("__1_*.distcp"))[0]
    _flip_a_bit(shard)
    # wsm-merge refuses the damaged input in one line, before writing anything.
    out = tmp_path / "offline"
    argv = ["--input", str(tmp_path / "ckpts"), "--output", str(out), "--last", "3"]
    assert merge_main([*argv, "--no-progress"]) == 1  # a failed merge, as wsm-merge exits
    assert f"input checkpoint damaged: iter_0000008/{shard.name}: checksum mismatch" in (
        capsys.readouterr().err
    )
    assert not out.exists() or not list_iterations(out)
    # Refused in one line with on_damage: stop ...
    with pytest.raises(RuntimeError) as err:
        run_distributed(train_summary, 2, [*args, "checkpoint.on_damage=stop"])
    assert (
        f"ValueError: checkpoint: iteration 8 is damaged: iter_0000008/{shard.name}: checksum "
        "mismatch (the file changed after it was saved) (checkpoint.on_damage: stop)"
    ) in str(err.value)
    # ... and by default the run resumes from 6, keeps the damaged folder aside, and retrains
    # iteration 8 to the same bits.
    resumed = run_distributed(train_summary, 2, args)
    assert resumed[0]["resumed_from"] == 6
    (kept,) = (tmp_path / "ckpts").glob("iter_0000008.damaged-*")  # kept, out of iter_*
    assert (kept / shard.name).is_file()
    assert _same(_tensors(tmp_path / "ckpts"), ref_ckpts)


def test_truncated_files_are_found_with_or_without_the_record(uninterrupted, corpus_dir, tmp_path):
    args = _args(corpus_dir, tmp_path)
    run_distributed(train_summary, 2, args)
    newest = iteration_dir(tmp_path / "ckpts", 8)
    (newest / "wsm_integrity.json").unlink()  # as Megatron-LM writes it: no checksums
    shard = sorted(newest.glob("__0_*.distcp"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(RuntimeError) as err:
        run_distributed(train_summary, 2, [*args, "checkpoint.on_damage=stop"])
    assert f"checkpoint: iteration 8 is damaged: iter_0000008/{shard.name}: truncated (" in str(
        err.value
    )
    common = iteration_dir(tmp_path / "ckpts", 6) / "common.pt"
    os.truncate(common, 10)  # covered by 6's checksums: the fallback goes on to 4
    resumed = run_distributed(train_summary, 2, args)
    assert resumed[0]["resumed_from"] == 4 and resumed[0]["iteration"] == 8


def _train_with_file_size_limit(overrides: list[str], limit: int) -> dict:
    """Train with every file this process writes from the first save on limited to ``limit``
    bytes (``ulimit -f``; the corpus cache and logs before it are not limited)."""
    import resource
    import signal

    from wsm_megatron.training.checkpointing import Checkpointer

    save = Checkpointer.save

    def limited_save(self, progress):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return save(self, progress)

    Checkpointer.save = limited_save
    return train_summary(overrides)


def test_a_write_the_file_system_refuses_is_one_line_naming_the_path(corpus_dir, tmp_path):
    args = _args(corpus_dir, tmp_path, 4)
    with pytest.raises(RuntimeError) as err:
        run_distributed(_train_with_file_size_limit, 2, args, 64 * 1024)
    text = str(err.value)
    line = next(x for x in text.splitlines() if x.startswith("ValueError: checkpoint.save"))
    assert line == (
        f"ValueError: checkpoint.save: cannot write {iteration_dir(tmp_path / 'ckpts', 2)}: "
        "File too large (the file-size limit, ulimit -f, is 65536 bytes); no complete "
        "checkpoint exists yet"
    )


def test_merged_models_keep_their_own_retention(corpus_dir, tmp_path):
    args = _args(corpus_dir, tmp_path, 8, "merge.keep_last=2")
    run_distributed(train_summary, 2, args)
    assert list_iterations(tmp_path / "merged") == [6, 8]
    assert list_iterations(tmp_path / "ckpts") == [4, 6, 8]  # the window, untouched


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_random_kills_in_a_row_still_end_as_the_uninterrupted_run(
    uninterrupted, corpus_dir, tmp_path, seed
):
    import random

    ref_root, _, ref_ckpts, ref_merged = uninterrupted
    args = _args(corpus_dir, tmp_path)
    rng = random.Random(seed)
    for _ in range(3):  # killed again while recovering from the last kill
        moment = rng.choice(["shard", "tracker", "merged-shard", "publish"])
        iteration = rng.choice([4, 6, 8])
        try:
            run_distributed(train_killed, 2, args, moment, iteration)
        except RuntimeError:
            pass
    run_distributed(train_summary, 2, args)
    assert _same(_tensors(tmp_path / "ckpts"), ref_ckpts)
    assert _same(_tensors(tmp_path / "merged"), ref_merged)
