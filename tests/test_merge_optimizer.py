"""``--keep-optimizer`` on Megatron-LM's distributed-optimizer formats, built by megatron-core's
own ``DistributedOptimizer`` (on CPU, see ``cuda_type_names``): ``dp_reshardable`` (Megatron-LM's
default) is averaged and loads back into a ``DistributedOptimizer``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsm_megatron.cli.merge import main
from wsm_megatron.layout import iteration_dir
from wsm_megatron.merge import MergeConfig, merge
from wsm_megatron.merge.readback import stored_objects
from wsm_megatron.testing.checkpoints import (
    fp64_reference,
    load_dcp_tensors,
    write_dcp_checkpoint,
    write_distributed_optimizer_checkpoints,
)
from wsm_megatron.testing.distributed import run_distributed

ITERATIONS = (100, 200, 300)


@pytest.fixture(scope="module")
def distopt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distopt") / "ckpts"
    run_distributed(write_distributed_optimizer_checkpoints, 2, root, ITERATIONS)
    return root


def test_dp_reshardable_averaged(distopt, tmp_path):
    out = tmp_path / "out"
    result = merge(MergeConfig(input=distopt, output=out, last=3, keep_optimizer=True))
    coeffs = result.jobs[0].coefficients
    merged = load_dcp_tensors(iteration_dir(out, 300))
    flat = [k for k in merged if k.startswith("optimizer.distributed.dp_group_idx_0.gbuf_idx_0")]
    assert {k.rsplit(".", 1)[1] for k in flat} == {"param", "exp_avg", "exp_avg_sq"}
    ref = fp64_reference(distopt, ITERATIONS, coeffs)
    scale = fp64_reference(distopt, ITERATIONS, coeffs, absolute=True)
    for key in flat:
        assert merged[key].dtype == torch.float32
        err = (merged[key].double() - ref[key]).abs()
        assert bool((err <= 2.0**-22 * scale[key] + 2.0**-24 * ref[key].abs()).all()), key
    objects, newest = (
        stored_objects(iteration_dir(out, 300)),
        stored_objects(iteration_dir(distopt, 300)),
    )
    per_group = {k: v for k, v in newest.items() if k.startswith("optimizer.distributed.")}
    assert {k.split("/")[0].rsplit(".", 1)[1] for k in per_group} == {
        "optimizer",
        "per_bucket_numel",
        "per_bucket_numel_unpadded",
    }
    assert {k: objects[k] for k in per_group} == per_group  # copied from the newest


def _load_into_distributed_optimizer(ckpt_dir: str) -> int:
    """Load ``ckpt_dir`` as Megatron-LM does (model and dp_reshardable optimizer state) and
    check every parameter's fp32 main weight and moments against the merged flat buffers."""
    from megatron.core import dist_checkpointing, parallel_state

    from wsm_megatron.testing.checkpoints import (
        CONTENT_METADATA,
        cuda_type_names,
        distributed_optimizer_model,
    )

    model, _, chained = distributed_optimizer_model()
    metadata = {**CONTENT_METADATA, "distrib_optim_sharding_type": "dp_reshardable"}
    optimizer = chained.chained_optimizers[0]
    # Without TE/apex, megatron-core needs the Adam state to exist before loading into it.
    optimizer._init_optimizer_states_with_dummy_values()
    with cuda_type_names():
        model_sd = model.sharded_state_dict()
        opt_sd = chained.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
        state = dist_checkpointing.load({"model": model_sd, "optimizer": opt_sd}, ckpt_dir)
        model.load_state_dict(state["model"])
        chained.load_state_dict(state["optimizer"])
    merged = load_dcp_tensors(ckpt_dir)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    checked = 0
    for gbuf_idx, by_dtype in optimizer.get_parameter_state_dp_reshardable().items():
        if not isinstance(gbuf_idx, int):  # per_bucket_numel and the like
            continue
        for dtype, buckets in by_dtype.items():
            for bucket_idx, params in enumerate(buckets):
                numel = optimizer.buffers[gbuf_idx].buckets[bucket_idx].grad_data.numel()
                base = dp_rank * (numel // dp_size)
                prefix = (
                    f"optimizer.distributed.dp_group_idx_0.gbuf_idx_{gbuf_idx}.dtype_{dtype}"
                    f".bucket_idx_{bucket_idx}"
                )
                for entry in params:
                    lo, hi = base + entry["gbuf_local_start"], base + entry["gbuf_local_end"]
                    for name in ("param", "exp_avg", "exp_avg_sq"):
                        assert torch.equal(entry[name], merged[f"{prefix}.{name}"][lo:hi]), name
                        checked += 1
    return checked


def test_dp_reshardable_merge_loads_into_distributed_optimizer(distopt, tmp_path):
    out = tmp_path / "out"
    merge(MergeConfig(input=distopt, output=out, last=2, keep_optimizer=True))
    checked = run_distributed(_load_into_distributed_optimizer, 2, str(iteration_dir(out, 300)))
    assert all(n > 10 for n in checked), checked


def test_gathered_format_refused_with_the_remedy(tmp_path, capsys):
    """``dp_zero_gather_scatter`` (the whole optimizer state of a group as one object; megatron-
    core 0.16.1 writes it only on GPU, ``.cuda()``): the key as Megatron stores it."""
    root, out = tmp_path / "ckpts", tmp_path / "out"
    for it in (100, 200):
        key = "optimizer.distributed.dp_group_idx_0.param_state/shard_0_1"
        objects = {key: [{"buckets_coalesced": torch.zeros(4)}]}
        write_dcp_checkpoint(root, it, {"decoder.w": torch.full((4,), it / 1.0)}, objects=objects)
    argv = ["--input", str(root), "--output", str(out), "--last", "2", "--no-progress"]
    assert main([*argv, "--keep-optimizer"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dp_zero_gather_scatter" in err[0], err
    assert "--dist-ckpt-optim-fully-reshardable" in err[0]
    assert main(argv) == 0  # the model alone merges


def test_fully_sharded_model_space_averaged(tmp_path):
    """megatron-core 0.16.1 no longer writes ``fully_sharded_model_space`` (its
    ``ShardedTensor`` refuses ``flattened_range``), so the structure older versions (< 0.14)
    wrote is built by hand: per parameter ``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<key>``
    fp32 tensors of shape ``[*fragments, local numel]`` (``sharded_tensor_to_torch_sharded_tensor``
    flattens each model shard into the last axis; ranks own ranges of it), and the
    param groups in the common state."""
    root, out = tmp_path / "ckpts", tmp_path / "out"
    iterations = (100, 200, 300)
    for it in iterations:
        g = torch.Generator().manual_seed(it)
        tensors = {"decoder.layers.mlp.linear_fc1.weight": torch.randn(8, 4).bfloat16()}
        for name in ("fp32_param", "exp_avg", "exp_avg_sq"):
            # TP=2 along axis 0 of an (8, 4) weight: fragments (2, 1), 16 elements each.
            state = torch.randn(2, 1, 16, generator=g)
            tensors[f"optimizer.state.{name}.decoder.layers.mlp.linear_fc1.weight"] = state
        write_dcp_checkpoint(root, it, tensors)
    result = merge(MergeConfig(input=root, output=out, last=3, keep_optimizer=True))
    merged = load_dcp_tensors(iteration_dir(out, 300))
    ref = fp64_reference(root, iterations, result.jobs[0].coefficients)
    for name in ("fp32_param", "exp_avg", "exp_avg_sq"):
        key = f"optimizer.state.{name}.decoder.layers.mlp.linear_fc1.weight"
        assert merged[key].shape == (2, 1, 16)
        assert torch.allclose(merged[key].double(), ref[key], atol=1e-6), key
