"""The snapshot ring sliced over data parallelism (``wsm_megatron.snapshots``), on CPU over gloo.

- Slicing arithmetic: every element of a bucket is owned by exactly one rank of its group, and
  the gathered chunks cover the bucket once, for sizes and chunkings a cluster would use.
- Real megatron-core models at TP1 x DP2, TP2 x DP2 and an MoE at EP2 x DP2 (dense values sliced
  over 4 ranks, expert values over 2): each rank's ring is 1/DP of the whole shard's (to the
  element), a merge puts bitwise the per-tensor ``combine`` of the whole snapshots (what
  ``wsm-merge`` computes) into every replica, within fp32 rounding of an fp64 reference, and the
  live values come back bitwise, also with many small gathered chunks.
- The extra state of a module (Transformer Engine's ``_extra_state`` payload shape) is put back.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from wsm_megatron.snapshots.plan import stage_count
from wsm_megatron.snapshots.slicing import Bucket
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.runs import SMALL_RUN, TINY_CONFIG, TINY_MOE
from wsm_megatron.training.config import load_config

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MOE = [*TINY_MOE, "parallel.expert_model_parallel_size=2"]

PP2_TIED = [  # tied embeddings across stages, learned positions, LayerNorm with biases
    "parallel.tensor_model_parallel_size=1",
    "parallel.pipeline_model_parallel_size=2",
    "model.position_embedding_type=learned_absolute",
    "model.normalization=LayerNorm",
    "model.qk_layernorm=true",
]


@pytest.mark.parametrize(
    "numels, size, chunk_bytes",
    [([5, 7, 1, 20], 2, 1 << 20), ([5, 7, 1, 20], 3, 8), ([1000, 3, 17], 4, 40), ([3], 8, 4)],
)
def test_slices_own_every_element_once_and_gathered_chunks_cover_the_bucket(
    numels, size, chunk_bytes
):
    total = sum(numels)
    owned = []
    for rank in range(size):
        b = Bucket.build(list(range(len(numels))), numels, size, rank, 4, chunk_bytes)
        assert b.slice_numel == b.chunks * b.chunk >= math.ceil(total / size)
        assert b.slice_numel - math.ceil(total / size) < b.chunk  # padding: under one chunk
        starts = [sum(numels[:i]) for i in range(len(numels))]
        for s in b.owned():
            assert 0 <= s.offset and s.offset + s.length <= b.slice_numel
            owned += range(
                starts[s.tensor] + s.tensor_offset, starts[s.tensor] + s.tensor_offset + s.length
            )
        covered = []
        for c, segments in enumerate(b.gathered()):
            for s in segments:
                assert s.offset + s.length <= b.chunk * b.size
                first = starts[s.tensor] + s.tensor_offset
                assert first == c * b.chunk * b.size + s.offset  # rank-major gathered layout
                covered += range(first, first + s.length)
        assert covered == list(range(total))
    assert sorted(owned) == list(range(total))


def _ring_check(overrides: list[str], gather_bytes: int) -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from wsm_megatron.merge.combine import combine
    from wsm_megatron.runtime import ParallelConfig, init_distributed
    from wsm_megatron.snapshots.ring import SnapshotRing
    from wsm_megatron.snapshots.values import shard_values
    from wsm_megatron.training.config import load_config
    from wsm_megatron.training.model import build_model

    config = load_config(TINY_CONFIG, [*SMALL_RUN, "checkpoint.save=unused", *overrides])
    p = config.parallel
    init_distributed(
        ParallelConfig(
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
        )
    )
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    model = list(build_model(config, 512).chunks)
    values = shard_values(model)
    live = [v.tensor for v in values]
    ring = SnapshotRing(values, 3, torch.device("cpu"), gather_bytes=gather_bytes)
    whole = SnapshotRing(values, 3, torch.device("cpu"), shard=False)
    full = []
    with torch.no_grad():
        for k, it in enumerate((2, 4, 6)):
            for t in live:  # the same change on every replica: replicas stay identical
                t.mul_(1 + 0.1 * k).add_(0.01 * (k + 1))
            ring.take(it, 100 * it)
            full.append([t.clone() for t in live])
    coefficients = (0.2, 0.3, 0.5)
    reference = [torch.empty_like(t) for t in live]
    combine(reference, full, coefficients)  # whole tensors, as wsm-merge computes them
    nonfinite = ring.merge_into_live(list(ring.entries), coefficients)
    merged = [t.clone() for t in live]
    fp64 = [
        sum(c * s[i].double() for c, s in zip(coefficients, full, strict=True))
        for i in range(len(live))
    ]
    ring.restore_live(ring.entries[-1])
    return {
        "grid": (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_expert_model_parallel_rank(),
        ),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        "sizes": sorted({(rb.bucket.size, rb.bucket.numel) for rb in ring.buckets}),
        "chunks": max(rb.bucket.chunks for rb in ring.buckets),
        "expert_values": sum(v.expert for v in values),
        "numel": {
            kind: sum(v.tensor.numel() for v in values if v.expert == (kind == "expert"))
            for kind in ("dense", "expert")
        },
        "ring": ring.nbytes,
        "whole": whole.nbytes,
        "expected": 3
        * sum(
            math.ceil(rb.bucket.numel / rb.bucket.size) * rb.out.element_size()
            for rb in ring.buckets
        ),
        "one_chunk_each": 3 * sum(rb.bucket.chunk * rb.out.element_size() for rb in ring.buckets),
        "nonfinite": nonfinite,
        "bitwise": all(torch.equal(a, b) for a, b in zip(merged, reference, strict=True)),
        "fp64_error": max(
            float(((m.double() - r).abs() / (r.abs() + 1e-3)).max())
            for m, r in zip(merged, fp64, strict=True)
        ),
        "restored": all(torch.equal(a, b) for a, b in zip(live, full[-1], strict=True)),
        "checksum": [float(m.double().sum()) for m in merged],
    }


@pytest.mark.parametrize(
    "world, overrides, gather_bytes",
    [
        (2, ["parallel.tensor_model_parallel_size=1"], 1 << 28),
        (2, ["parallel.tensor_model_parallel_size=1"], 4096),  # many chunks per bucket
        (4, ["parallel.tensor_model_parallel_size=2"], 1 << 28),
        (4, MOE, 2048),
        (2, PP2_TIED, 1 << 28),  # DP = 1: the whole shard, nothing gathered
    ],
    ids=["tp1-dp2", "tp1-dp2-small-chunks", "tp2-dp2", "moe-ep2-dp2", "pp2-dp1"],
)
def test_sharded_ring_holds_a_dp_slice_and_merges_bitwise_into_every_replica(
    world, overrides, gather_bytes
):
    results = run_distributed(_ring_check, world, overrides, gather_bytes)
    for r in results:
        # 1/DP of each bucket, to the element; with many chunks, padding under one chunk
        assert 0 <= r["ring"] - r["expected"] < (r["one_chunk_each"] if r["chunks"] > 1 else 1)
        if len(r["sizes"]) == 1 and r["chunks"] == 1:  # one group: the ring x DP is the whole
            ((size, _),) = r["sizes"]
            assert r["whole"] <= r["ring"] * size < r["whole"] + 3 * 4 * size
        assert not r["nonfinite"] and r["bitwise"] and r["restored"]
        assert r["fp64_error"] < 1e-6
    if gather_bytes == 4096:
        assert results[0]["chunks"] > 4
    if overrides is MOE:  # dense values over DP x CP = 4 ranks, expert values over EDP = 2
        assert results[0]["expert_values"] > 0 and {s for s, _ in results[0]["sizes"]} == {2, 4}
        assert results[0]["ring"] < results[0]["whole"] / 2
    # The planner (no model built) counts what the real megatron-core model holds.
    config = load_config(TINY_CONFIG, [*SMALL_RUN, *overrides])
    for r in results:
        planned = stage_count(config, r["grid"][1], 512)
        assert r["numel"] == {"dense": planned.dense, "expert": planned.expert}
    by_grid: dict[tuple, list] = {}
    for r in results:  # replicas of one shard hold the same merged values
        by_grid.setdefault(r["grid"], []).append(r["checksum"])
    assert all(all(c == cs[0] for c in cs) for cs in by_grid.values())
    assert all(len(cs) > 1 for cs in by_grid.values()) == (results[0]["dp"] > 1)


def test_staged_chunks_double_buffered_give_the_same_bits():
    from wsm_megatron.merge.combine import combine
    from wsm_megatron.snapshots.ring import SnapshotRing
    from wsm_megatron.snapshots.values import ShardValue

    g = torch.Generator().manual_seed(0)
    values = [
        ShardValue(f"t{i}", torch.randn(n, generator=g, dtype=dtype))
        for i, (n, dtype) in enumerate(
            [(37, torch.float32), (5, torch.bfloat16), (90, torch.float32)]
        )
    ]
    live = [v.tensor for v in values]
    rings = [
        SnapshotRing(values, 3, torch.device("cpu"), gather_bytes=32, stage=s)
        for s in (False, True)
    ]
    full = []
    with torch.no_grad():
        for k in range(3):
            for t in live:
                t.mul_(1.5).add_(k)
            for ring in rings:
                ring.take(k, k)
            full.append([t.clone() for t in live])
    reference = [torch.empty_like(t) for t in live]
    combine(reference, full, (0.5, 0.25, 0.25))
    assert rings[1].buckets[0].bucket.chunks > 2  # several chunks through both staging buffers
    for ring in rings:
        assert not ring.merge_into_live(list(ring.entries), (0.5, 0.25, 0.25))
        assert all(torch.equal(a, b) for a, b in zip(live, reference, strict=True))
        ring.restore_live(ring.entries[-1])
        assert all(torch.equal(a, b) for a, b in zip(live, full[-1], strict=True))
    with pytest.raises(ValueError, match="merge.shard_ring: 'strided' is not contiguous"):
        SnapshotRing([ShardValue("strided", torch.zeros(4, 4).t())], 2, torch.device("cpu"))


class _FP8Like(torch.nn.Module):
    """A module carrying Transformer Engine's ``_extra_state`` payload: a BytesIO of a pickled
    dict of FP8 scales and amax history, updated by every forward pass (as TE's FP8 recipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))
        self.meta = {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(16, 3)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.meta["amax_history_fwd"][0] = x.abs().max()
        self.meta["scale_fwd"] *= 0.5
        return x * self.weight

    def get_extra_state(self) -> io.BytesIO:
        buffer = io.BytesIO()
        torch.save(self.meta, buffer)
        return buffer

    def set_extra_state(self, state: io.BytesIO) -> None:
        state.seek(0)
        self.meta = torch.load(state)


def test_extra_state_changed_by_a_merged_evaluation_is_put_back():
    from wsm_megatron.snapshots.values import extra_state_kept

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _FP8Like())
    model[1](torch.full((4,), 3.0))
    before = {k: v.clone() for k, v in model[1].meta.items()}
    with extra_state_kept([model]):
        model[1](torch.full((4,), 9.0))  # the merged model's evaluation
        assert model[1].meta["scale_fwd"][0] == 0.25
    assert all(torch.equal(model[1].meta[k], before[k]) for k in before)


def test_plan_memory_prints_the_ring_per_gpu_and_per_node_without_a_launch(capsys):
    from wsm_megatron.cli.train import main
    from wsm_megatron.snapshots.plan import plan_ring

    config = REPO_CONFIGS / "moe-small.yaml"
    argv = ["--config", str(config), "--plan-memory", "--world-size", "64"]
    assert main([*argv, "--vocab-size", "32000"]) == 0
    out = capsys.readouterr().out
    plan = plan_ring(load_config(config), 64, 32000)
    assert plan.dp == 64 and plan.edp == 8  # EP 8 of 64 GPUs: experts sliced over 8
    assert f"= {plan.rank_bytes(0) / 2**30:.3g} GiB per rank" in out
    assert f"{plan.node_bytes() / 2**30:.3g} GiB per 8-GPU node" in out
    assert plan.node_bytes() == 8 * plan.rank_bytes(0)
    unsliced = plan_ring(load_config(config, ["merge.shard_ring=false"]), 64, 32000)
    assert plan.rank_bytes(0) * 8 < unsliced.rank_bytes(0)
    assert main(argv) == 2  # no corpus in the config: the vocabulary must be given
    assert (
        capsys.readouterr().err == "wsm-train: error: --plan-memory: give --vocab-size "
        "(the config names no corpus)\n"
    )
    assert main([*argv[:-1], "63", "--vocab-size", "32000"]) == 2
    assert capsys.readouterr().err.startswith("wsm-train: error: --world-size: 63 is not a")
