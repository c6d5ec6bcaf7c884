"""The trainer's online merge (``merge.online``) on CPU over gloo.

- At TP=2 x PP=2 (4 processes): merged models are saved in ``wsm-merge``'s format and are
  bitwise ``wsm-merge``'s output for the same checkpoints; a run restarted in the middle of a
  merge window rebuilds its ring from disk and gives bitwise the merged losses (and merged
  models) of the uninterrupted run; retention keeps every checkpoint a rebuild needs.
- At TP=2: training with merged evaluations is bitwise training without them, and the merged
  loss equals ``wsm-train --evaluate`` of the ``wsm-merge`` output.
- One process: a NaN in the window is reported with its iteration and the live values come back
  bitwise; configuration errors are one line naming the ``merge.`` key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wsm_megatron.cli.merge import main as merge_main
from wsm_megatron.layout import iteration_dir, list_iterations, read_tracker
from wsm_megatron.merge.selection import load_common_state
from wsm_megatron.testing.checkpoints import load_dcp_tensors
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.runs import SMALL_RUN, TINY_CONFIG, train_summary
from wsm_megatron.training.config import ConfigError, load_config


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tp2_pp2_online_merge_equals_wsm_merge_and_survives_a_mid_window_restart(
    corpus_dir, tmp_path
):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [
        *SMALL_RUN,
        f"corpus.cache_dir={corpus_dir}",
        "parallel.pipeline_model_parallel_size=2",
        "checkpoint.save_interval=2",
        "merge.online=true",
        "merge.quantity=3",
        "merge.schedule=minus-sqrt",  # unequal coefficients: the order matters
    ]

    def run(root: Path, iters: int) -> list[dict]:
        return run_distributed(
            train_summary,
            4,
            [
                *common,
                f"checkpoint.save={root / 'ckpts'}",
                f"merge.save_dir={root / 'merged'}",
                f"train.train_iters={iters}",
            ],
        )

    a = run(straight, 8)
    merged = a[0]["merged_losses"]
    assert list(merged) == [4, 6, 8] and all(r["merged_losses"] == merged for r in a)
    assert a[0]["windows"] == {4: (2, 4), 6: (2, 4, 6), 8: (4, 6, 8)}
    assert all(np.isfinite(v) and v != a[0]["val_losses"][it] for it, v in merged.items())
    assert list_iterations(straight / "ckpts") == [4, 6, 8]  # retention: the window
    assert list_iterations(straight / "merged") == [4, 6, 8]
    assert read_tracker(straight / "merged") == 8

    # The saved merged model is wsm-merge's output for the same checkpoints, bit for bit.
    offline = tmp_path / "offline"
    argv = ["--input", str(straight / "ckpts"), "--output", str(offline), "--last", "3"]
    assert merge_main([*argv, "--schedule", "minus-sqrt", "--no-progress"]) == 0
    online_dir = iteration_dir(straight / "merged", 8)
    assert _same_tensors(load_dcp_tensors(online_dir), load_dcp_tensors(iteration_dir(offline, 8)))
    info = json.loads((online_dir / "merge_info.json").read_text())
    offline_info = json.loads((iteration_dir(offline, 8) / "merge_info.json").read_text())
    assert [i["iteration"] for i in info["inputs"]] == [4, 6, 8]
    for key in ("inputs", "schedule", "emulated_decay", "accumulate_dtype"):
        assert info[key] == offline_info[key], key
    common_state = load_common_state(online_dir)  # common.pt, or embedded (megatron-core >= 0.17)
    assert common_state["wsm_merge"]["inputs"] == info["inputs"]
    assert "optimizer" not in common_state and common_state["args"].no_save_optim

    # Stopped at 4 (in the window 2..6), resumed in fresh processes: the same merges after it.
    run(split, 4)
    b = run(split, 8)
    assert b[0]["windows"] == {6: (2, 4, 6), 8: (4, 6, 8)}
    assert b[0]["merged_losses"] == {it: merged[it] for it in (6, 8)}  # bitwise equal floats
    by_grid = {r["grid"]: r for r in a}
    for resumed in b:
        assert resumed["coefficients"][8] == by_grid[resumed["grid"]]["coefficients"][8]
    for it in (6, 8):
        assert _same_tensors(
            load_dcp_tensors(iteration_dir(split / "merged", it)),
            load_dcp_tensors(iteration_dir(straight / "merged", it)),
        )


def _evaluate(overrides: list[str], checkpoints: list[str]) -> dict:
    from wsm_megatron.training.trainer import evaluate_checkpoints

    return evaluate_checkpoints(load_config(TINY_CONFIG, overrides), checkpoints)


def test_merged_evaluation_leaves_training_bitwise_unchanged(corpus_dir, tmp_path):
    common = [
        *SMALL_RUN,
        f"corpus.cache_dir={corpus_dir}",
        "checkpoint.save_interval=2",
        "merge.quantity=2",
        "train.train_iters=6",
    ]
    plain = run_distributed(train_summary, 2, [*common, f"checkpoint.save={tmp_path / 'plain'}"])
    online_root, offline = tmp_path / "online", tmp_path / "offline"
    overrides = [*common, "merge.online=true", f"checkpoint.save={online_root}"]
    online = run_distributed(train_summary, 2, overrides)
    for p, o in zip(plain, online, strict=True):
        assert p["losses"] == o["losses"]
        assert p["weights"].keys() == o["weights"].keys()
        assert all(np.array_equal(p["weights"][k], o["weights"][k]) for k in p["weights"])
    assert list(online[0]["merged_losses"]) == [4, 6]

    # The same merged weights, the same validation batches: the same loss, to the bit.
    argv = ["--input", str(online_root), "--output", str(offline), "--last", "2"]
    assert merge_main([*argv, "--no-progress"]) == 0
    evaluated = run_distributed(_evaluate, 2, overrides, [str(offline)])[0][str(offline)]
    assert evaluated == {"iteration": 6, "val_loss": online[0]["merged_losses"][6]}

    # A window checkpoint deleted by hand: the resumed run says so and merges what is there.
    shutil.rmtree(iteration_dir(online_root, 4))
    resumed = run_distributed(train_summary, 2, [*overrides, "train.train_iters=8"])[0]
    assert resumed["ring_rebuild"] == ([], [4])
    assert resumed["windows"] == {8: (6, 8)}


def _nan_in_window(budget_gb: float, node_gb: float | None = None, extra: tuple = ()) -> dict:
    from wsm_megatron.runtime import ParallelConfig, init_distributed
    from wsm_megatron.testing.models import tiny_gpt
    from wsm_megatron.training.checkpointing import Progress
    from wsm_megatron.training.online_merge import OnlineMerge

    init_distributed(ParallelConfig())
    config = load_config(
        TINY_CONFIG,
        [
            "parallel.tensor_model_parallel_size=1",
            "checkpoint.save=unused",
            "merge.online=true",
            "merge.quantity=3",
            f"merge.snapshot_memory_gb={budget_gb}",
            f"merge.node_memory_gb={'null' if node_gb is None else node_gb}",
            *extra,
        ],
    )
    model = [tiny_gpt(seed=1)]
    try:
        online = OnlineMerge(config, model)
    except ValueError as err:
        return {"error": str(err)}
    live = [v.tensor for v in online.values]
    for it in (25, 50, 75):
        with torch.no_grad():
            for t in live:
                t.add_(0.01)
        online.on_save(Progress(it, it * 16))
    before = [t.clone() for t in live]
    (segment,) = [s for s in online.ring.buckets[0].owned if s.tensor == 3]
    online.ring.entries[1].slices[0][segment.offset] = float("nan")  # iteration 50's snapshot
    with online.merged(75) as point:
        inside = [t.clone() for t in live]
    return {
        "nonfinite": point.nonfinite,
        "restored": all(torch.equal(a, b) for a, b in zip(before, live, strict=True)),
        "inside_is_live": all(torch.equal(a, b) for a, b in zip(before, inside, strict=True)),
        "key": online.values[3].key,
    }


def test_nan_in_the_window_is_reported_with_its_iteration_and_live_values_come_back():
    (result,) = run_distributed(_nan_in_window, 1, 64.0)
    assert result["nonfinite"] == (f"iteration 50's checkpoint holds NaN/Inf in {result['key']!r}")
    assert result["restored"] and result["inside_is_live"]
    (refused,) = run_distributed(_nan_in_window, 1, 1e-6)
    assert refused["error"].startswith("merge.snapshot_memory_gb: the online merge's ring of 3")
    (node,) = run_distributed(_nan_in_window, 1, 64.0, 1e-6)
    assert node["error"].startswith("merge.node_memory_gb: the online merge's rings need ")
    assert "of host memory on node " in node["error"] and "(1 ranks)" in node["error"]
    if not torch.cuda.is_available():
        (gpu,) = run_distributed(_nan_in_window, 1, 64.0, None, ("merge.snapshot_device=gpu",))
        assert gpu["error"] == "merge.snapshot_device: 'gpu' needs a GPU; use 'auto' or 'cpu'"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint.save_interval=null"], "merge.online: merges at checkpoint saves"),
        (["merge.quantity=1"], "merge.quantity: the online merge needs a window of at least 2"),
        (["merge.schedule=steep"], "merge.schedule: "),
        (["merge.ema_beta=0.5"], "merge.ema_beta: "),
        (["merge.min_lr_ratio=1.5"], "merge.min_lr_ratio: "),
        (["merge.every=0"], "merge.every: must be > 0"),
        (["merge.online=false", "merge.save_dir=x"], "merge.save_dir: saving merged models"),
        (["merge.snapshot_device=tpu"], "merge.snapshot_device: expected one of"),
        (["checkpoint.save=r/c", "merge.save_dir=r/c"], "merge.save_dir: r/c is checkpoint.save"),
        (["checkpoint.save=r/c", "merge.save_dir=r/c/m"], "merge.save_dir: r/c/m is inside"),
        (["checkpoint.save=r/c", "merge.save_dir=r"], "merge.save_dir: r contains checkpoint"),
        (["checkpoint.load=r/l", "merge.save_dir=r/l"], "merge.save_dir: r/l is checkpoint.load"),
    ],
)
def test_online_merge_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_CONFIG, ["merge.online=true", *overrides])
    assert str(err.value).startswith(message), str(err.value)


DP2 = [
    *SMALL_RUN,
    "parallel.tensor_model_parallel_size=1",  # 2 processes: DP = 2, the ring sliced in halves
    "checkpoint.save_interval=2",
    "merge.quantity=3",
    "merge.schedule=minus-sqrt",
]


def _rebuild(overrides: list[str], root: str, resume: int, skew_listing: bool) -> dict:
    """Build the trainer's model and online merge, rebuild the ring from ``root`` as a resume
    at ``resume`` would, counting the bytes this rank's reader takes from the shard files. With
    ``skew_listing``, rank 1 sees a different listing (as on a lagging network file system)."""
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    from torch.distributed.checkpoint import filesystem

    from wsm_megatron.runtime import ParallelConfig, init_distributed
    from wsm_megatron.training import checkpointing, online_merge
    from wsm_megatron.training.model import build_model

    config = load_config(TINY_CONFIG, overrides)
    init_distributed(ParallelConfig())
    if skew_listing and dist.get_rank() == 1:
        online_merge.list_iterations = lambda root: [2]
        real = checkpointing.read_tracker
        checkpointing.read_tracker = lambda path: 2 if Path(path) == Path(root) else real(path)
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    online = online_merge.OnlineMerge(config, list(build_model(config, 512).chunks))
    read = [0]
    slice_file = filesystem.FileSystemReader._slice_file

    def counted(self, file, sinfo):  # every tensor read goes through here
        read[0] += sinfo.length
        return slice_file(self, file, sinfo)

    filesystem.FileSystemReader._slice_file = counted
    loaded, missing = online.rebuild(root, resume)
    filesystem.FileSystemReader._slice_file = slice_file
    found = checkpointing.resume_checkpoint(config)
    return {
        "loaded": loaded,
        "bytes": read[0],
        "ring": online.ring.nbytes,
        "resume": found[1],
        "slices": [s.slices[0][:64].clone() for s in online.ring.entries],
    }


def test_dp2_sliced_ring_merges_as_wsm_merge_restarts_bitwise_and_reads_once(corpus_dir, tmp_path):
    common = [*DP2, f"corpus.cache_dir={corpus_dir}"]

    def run(root: Path, iters: int, online: bool = True) -> list[dict]:
        args = [f"checkpoint.save={root / 'ckpts'}", f"train.train_iters={iters}"]
        if online:
            args += ["merge.online=true", f"merge.save_dir={root / 'merged'}"]
        return run_distributed(train_summary, 2, [*common, *args])

    plain = run(tmp_path / "plain", 8, online=False)
    a = run(tmp_path / "straight", 8)
    assert [r["grid"] for r in a] == [(0, 0, 0), (0, 0, 1)]
    for p, o in zip(plain, a, strict=True):  # merged evaluations leave training bitwise alone
        assert p["losses"] == o["losses"]
        assert all(np.array_equal(p["weights"][k], o["weights"][k]) for k in p["weights"])
    merged = a[0]["merged_losses"]
    assert list(merged) == [4, 6, 8] and a[1]["merged_losses"] == merged
    offline = tmp_path / "offline"
    argv = ["--input", str(tmp_path / "straight" / "ckpts"), "--output", str(offline)]
    assert merge_main([*argv, "--last", "3", "--schedule", "minus-sqrt", "--no-progress"]) == 0
    assert _same_tensors(
        load_dcp_tensors(iteration_dir(tmp_path / "straight" / "merged", 8)),
        load_dcp_tensors(iteration_dir(offline, 8)),
    )

    # Stopped at 4 in the window, resumed: the same merges, to the bit.
    run(tmp_path / "split", 4)
    b = run(tmp_path / "split", 8)
    assert b[0]["merged_losses"] == {it: merged[it] for it in (6, 8)}
    assert b[0]["ring_rebuild"] == ([2], [])

    # A rebuild reads each checkpoint once per data-parallel group, not once per replica.
    root = str(tmp_path / "straight" / "ckpts")
    overrides = [*common, "merge.online=true", f"checkpoint.save={root}"]
    one = run_distributed(_rebuild, 1, overrides, root, 8, False)
    two = run_distributed(_rebuild, 2, overrides, root, 8, False)
    assert one[0]["loaded"] == two[0]["loaded"] == two[1]["loaded"] == [4, 6]
    assert one[0]["bytes"] > 0 and two[0]["bytes"] + two[1]["bytes"] == one[0]["bytes"]
    assert two[0]["ring"] + two[1]["ring"] <= one[0]["ring"] + 2 * 2 * 4

    # Rank 1 sees a stale listing: the ranks still agree (rank 0 decides) and nothing hangs.
    skewed = run_distributed(_rebuild, 2, overrides, root, 8, True, timeout=120)
    assert [r["loaded"] for r in skewed] == [[4, 6], [4, 6]]
    assert [r["resume"] for r in skewed] == [8, 8]
    assert all(
        torch.equal(x, y) for x, y in zip(skewed[0]["slices"], two[0]["slices"], strict=True)
    )
