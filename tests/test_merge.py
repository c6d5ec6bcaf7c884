"""wsm-merge on real Megatron-Core checkpoints (TP=2, PP=2, bf16 with fp32 layernorms and
position embeddings): numerics against an fp64 reference, bitwise equality across 1/2/3 merge
ranks and memory budgets, Megatron loading the output at other layouts, sweeps."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from wsm_megatron.cli.merge import main
from wsm_megatron.layout import iteration_dir, read_tracker
from wsm_megatron.merge import MergeConfig, merge
from wsm_megatron.merge.contents import key_group
from wsm_megatron.merge.readback import stored_objects
from wsm_megatron.testing.checkpoints import (
    EMPTY_EXTRA_STATE_KEY,
    EXTRA_STATE_KEY,
    INT_BUFFER_KEY,
    fp64_reference,
    load_dcp_tensors,
    shared_megatron_checkpoints,
    te_extra_state,
)
from wsm_megatron.testing.distributed import rendezvous_port, run_distributed
from wsm_megatron.testing.models import assert_shards_match, load_into_tiny_gpt
from wsm_megatron.theory import merge_weights

ITERATIONS = (100, 200, 300, 400, 500)
MERGED = (200, 300, 400, 500)


@pytest.fixture(scope="session")
def ckpts(shared_tmp) -> Path:
    return shared_megatron_checkpoints(shared_tmp / "wsm-merge", ITERATIONS)


@pytest.fixture(scope="module")
def merged(ckpts, tmp_path_factory) -> tuple[Path, object]:
    """The reference merge: the last 4 checkpoints, minus-sqrt, one process."""
    out = tmp_path_factory.mktemp("merged")
    result = merge(MergeConfig(input=ckpts, output=out, last=4, schedule="minus-sqrt"))
    return iteration_dir(out, 500), result


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key


def test_merge_matches_fp64_reference(ckpts, merged):
    out, result = merged
    coeffs = merge_weights("minus-sqrt", positions=list(MERGED)).coefficients
    assert result.jobs[0].coefficients == list(coeffs)
    assert [x["iteration"] for x in result.jobs[0].inputs] == list(MERGED)
    assert read_tracker(out.parent) == 500
    assert {p.name for p in out.iterdir()} == {
        ".metadata",
        "__0_0.distcp",
        "common.pt",
        "metadata.json",
        "merge_info.json",
    }
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]

    tensors = load_dcp_tensors(out)
    newest = load_dcp_tensors(iteration_dir(ckpts, 500))
    ref = fp64_reference(ckpts, MERGED, coeffs)
    scale = {k: v.abs() for k, v in fp64_reference(ckpts, MERGED, coeffs, absolute=True).items()}
    # Model tensors only: optimizer and RNG/rerun state are left out.
    assert all(key_group(k) == "model" for k in tensors)
    assert set(tensors) == {k for k in newest if key_group(k) == "model"}
    dtypes = {tensors[k].dtype for k in ref if k in tensors}
    assert dtypes == {torch.bfloat16, torch.float32}
    for key, x in tensors.items():
        assert x.dtype == newest[key].dtype, key
        if not x.dtype.is_floating_point:  # copied from the newest checkpoint
            assert torch.equal(x, newest[key]), key
            continue
        r = ref[key]
        err = (x.double() - r).abs()
        fp32_error = 4 * 2.0**-24 * scale[key]  # 4 fp32 roundings of terms up to Σ c|x|
        if x.dtype == torch.bfloat16:  # the fp64 result rounded: within one bf16 ulp
            assert bool((err <= r.abs() * 2.0**-8 + fp32_error).all()), key
            assert (x != r.to(torch.bfloat16)).float().mean() < 0.01, key
        else:
            assert bool((err <= fp32_error + 2.0**-24 * r.abs()).all()), key
    assert torch.equal(tensors[INT_BUFFER_KEY], newest[INT_BUFFER_KEY])

    # Objects (TE _extra_state and the like) are copied byte for byte from the newest input.
    objects, newest_objects = stored_objects(out), stored_objects(iteration_dir(ckpts, 500))
    assert objects == {k: v for k, v in newest_objects.items() if key_group(k) == "model"}
    # Transformer Engine's format: a uint8 tensor of pickled FP8 state (empty without FP8).
    key = f"{EXTRA_STATE_KEY}/shard_3_4"  # the last layer's
    (payload,) = torch.load(io.BytesIO(objects[key]), weights_only=True)  # megatron: [data]
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    state = pickle.loads(payload.numpy().tobytes())
    expected = pickle.loads(te_extra_state(500, EXTRA_STATE_KEY, (3,)).numpy().tobytes())
    assert torch.equal(state["amax_history_fwd"], expected["amax_history_fwd"])
    (empty,) = torch.load(io.BytesIO(objects[f"{EMPTY_EXTRA_STATE_KEY}/shard_0_4"]))
    assert empty.dtype == torch.uint8 and empty.numel() == 0
    assert not any(k.startswith(("rng_state", "rerun_state_machine")) for k in objects)

    common = torch.load(out / "common.pt", weights_only=False)
    assert common["iteration"] == 500 and common["checkpoint_version"] == 3.0
    assert common["args"].no_save_optim and common["args"].no_save_rng
    assert common["args"].tensor_model_parallel_size == 2
    assert "optimizer" not in common and "rerun_state_machine" not in common
    assert common["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
    assert common["wsm_merge"]["inputs"][0]["iteration"] == 200
    assert common["wsm_merge"]["schedule"] == "minus-sqrt"
    info = json.loads((out / "merge_info.json").read_text())
    assert [x["coefficient"] for x in info["inputs"]] == list(coeffs)
    assert info["optimizer_state"] == "left out" and info["tool"] == "wsm-merge"
    assert (out / "metadata.json").read_bytes() == (
        iteration_dir(ckpts, 500) / "metadata.json"
    ).read_bytes()


def test_fp64_accumulation_and_output_dtype(ckpts, tmp_path):
    out = tmp_path / "out"
    merge(
        MergeConfig(
            input=ckpts,
            output=out,
            iterations=MERGED,
            schedule="cosine",
            min_lr_ratio=0.1,
            accumulate_dtype="fp64",
            output_dtype="fp32",
        )
    )
    coeffs = merge_weights("cosine", positions=list(MERGED), min_lr_ratio=0.1).coefficients
    ref = fp64_reference(ckpts, MERGED, coeffs)
    tensors = load_dcp_tensors(iteration_dir(out, 500))
    for key, x in tensors.items():
        if key in ref:  # same operations in the same order in fp64, then one rounding
            assert x.dtype == torch.float32 and torch.equal(x, ref[key].float()), key
        else:
            assert x.dtype == torch.int64, key


@pytest.fixture(scope="module")
def streamed(ckpts, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The same merge on 2 ranks with a 20 KiB budget, below one stored chunk."""
    out = tmp_path_factory.mktemp("streamed")
    results = run_distributed(_merge_on_ranks, 2, str(ckpts), str(out), 0.02)
    return iteration_dir(out, 500), results


def test_keep_optimizer_and_rng(ckpts, tmp_path):
    out = tmp_path / "out"
    merge(MergeConfig(input=ckpts, output=out, last=2, keep_optimizer=True, keep_rng=True))
    merged_dir = iteration_dir(out, 500)
    tensors = load_dcp_tensors(merged_dir)
    ref = fp64_reference(ckpts, (400, 500), (0.5, 0.5))
    moments = [k for k in tensors if key_group(k) == "optimizer"]
    assert moments and all(tensors[k].dtype == torch.float32 for k in moments)
    for key in moments:  # averaged with the same coefficients
        assert torch.allclose(tensors[key].double(), ref[key], rtol=1e-6, atol=1e-7), key
    objects, newest = stored_objects(merged_dir), stored_objects(iteration_dir(ckpts, 500))
    # RNG and rerun state copied from the newest input; the common state goes to common.pt.
    assert objects == {k: v for k, v in newest.items() if key_group(k) != "common"}
    common = torch.load(merged_dir / "common.pt", weights_only=False)
    assert common["optimizer"]["param_groups"][0]["step"] == 500
    assert "rerun_state_machine" in common and not hasattr(common["args"], "no_save_optim")


def _merge_on_ranks(ckpts: str, out: str, budget_mb: float) -> dict:
    from wsm_megatron.runtime import init_distributed

    init_distributed(megatron=False)
    result = merge(
        MergeConfig(
            input=ckpts, output=out, last=4, schedule="minus-sqrt", memory_budget_mb=budget_mb
        )
    )
    return {
        "ranks": result.ranks,
        "streamed": result.chunks_streamed,
        "pieces": result.pieces,
        "peaks": result.peak_rss_mib_per_rank,
    }


def _cli_on_ranks(argv: list[str]) -> int:
    return main(argv)


def test_bitwise_identical_across_ranks_and_budgets(ckpts, merged, streamed, tmp_path):
    reference = load_dcp_tensors(merged[0])
    three = run_distributed(_merge_on_ranks, 3, str(ckpts), str(tmp_path / "r3"), 1024.0)
    assert [r["ranks"] for r in three] == [3, 3, 3] and len(three[0]["peaks"]) == 3
    assert three[0]["streamed"] == 0
    tiny = streamed[1]
    assert tiny[0]["streamed"] > 10 and tiny[0]["pieces"] > 10 * merged[1].pieces
    for out, ranks in ((iteration_dir(tmp_path / "r3", 500), 3), (streamed[0], 2)):
        assert {p.name for p in out.glob("*.distcp")} == {f"__{r}_0.distcp" for r in range(ranks)}
        _assert_same_tensors(load_dcp_tensors(out), reference)
        assert stored_objects(out) == stored_objects(merged[0])


def test_cli_under_torchrun_environment(ckpts, merged, tmp_path):
    report = tmp_path / "report.json"
    argv = [
        "--input",
        str(ckpts),
        "--output",
        str(tmp_path / "out"),
        "--iterations",
        "200,300,400,500",
        "--schedule",
        "minus-sqrt",
        "--report",
        str(report),
        "--no-progress",
    ]
    assert run_distributed(_cli_on_ranks, 2, argv) == [0, 0]
    data = json.loads(report.read_text())
    assert data["ranks"] == 2 and data["bytes_read"] == merged[1].bytes_read
    assert data["peak_rss_mib"] == max(data["peak_rss_mib_per_rank"])
    _assert_same_tensors(
        load_dcp_tensors(iteration_dir(tmp_path / "out", 500)), load_dcp_tensors(merged[0])
    )


def test_cli_under_srun_environment(ckpts, merged, tmp_path):
    """Two processes launched as ``srun`` would: SLURM variables only, no torchrun ones."""
    import subprocess
    import sys

    port = rendezvous_port()
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    argv = [
        sys.executable,
        "-m",
        "wsm_megatron.cli.merge",
        "--input",
        str(ckpts),
        "--output",
        str(tmp_path / "out"),
        "--last",
        "4",
        "--schedule",
        "minus-sqrt",
        "--no-progress",
    ]
    procs = [
        subprocess.Popen(
            argv,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **base,
                "SLURM_PROCID": str(r),
                "SLURM_NTASKS": "2",
                "SLURM_LOCALID": str(r),
                "SLURM_JOB_NODELIST": "localhost",
                "SLURM_JOB_ID": "7",
                "MASTER_PORT": str(port),
            },
        )
        for r in range(2)
    ]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:  # a rank left running would hold the CPU and the port for the tests after this
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "on 2 rank(s)" in errs[0]
    out = iteration_dir(tmp_path / "out", 500)
    assert {p.name for p in out.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    _assert_same_tensors(load_dcp_tensors(out), load_dcp_tensors(merged[0]))


def _load_with_megatron(out: str, tp: int, pp: int) -> list[tuple]:
    state, shards = load_into_tiny_gpt(out, tp, pp)
    assert state["iteration"] == 500 and state["args"].no_save_optim
    return shards


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 1)])
def test_megatron_loads_output_at_other_layouts(streamed, tp, pp):
    """The streamed output stores each chunk as many sub-chunks: DCP reshards them on load."""
    tensors = load_dcp_tensors(streamed[0])
    loaded = run_distributed(_load_with_megatron, tp * pp, str(streamed[0]), tp, pp)
    assert_shards_match(loaded, tensors)


def test_sweep_reads_each_input_once(ckpts, merged, tmp_path):
    out = tmp_path / "sweep"
    result = merge(MergeConfig(input=ckpts, output=out, sweep=_sweep("3:linear", "4:minus-sqrt")))
    assert [j.name for j in result.jobs] == ["last3-linear", "last4-minus-sqrt"]
    assert result.bytes_read == merged[1].bytes_read  # the union of inputs, read once
    _assert_same_tensors(
        load_dcp_tensors(iteration_dir(out / "last4-minus-sqrt", 500)), load_dcp_tensors(merged[0])
    )
    single = tmp_path / "single"
    merge(MergeConfig(input=ckpts, output=single, last=3, schedule="linear"))
    _assert_same_tensors(
        load_dcp_tensors(iteration_dir(out / "last3-linear", 500)),
        load_dcp_tensors(iteration_dir(single, 500)),
    )
    assert read_tracker(out / "last3-linear") == 500


def _sweep(*specs: str):
    from wsm_megatron.merge import SweepEntry

    return tuple(SweepEntry.from_spec(s) for s in specs)
