"""Unit tests of wsm-merge's parts: configuration, checkpoint selection, piece planning, the raw
DCP reader, key classification and the publish/recovery rules (fast, single process)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from wsm_megatron.layout import iteration_dir, read_tracker, write_tracker
from wsm_megatron.merge import MergeConfig, MergeError, SweepEntry
from wsm_megatron.merge.config import Selection, Weighting, load_sweep_file, parse_token_count
from wsm_megatron.merge.contents import AVERAGE, COPY, ContentPolicy, is_extra_state, key_group
from wsm_megatron.merge.dcp_format import StorageFiles, locate_tensor, read_metadata, storage_info
from wsm_megatron.merge.plan import (
    MAX_GROUP,
    BytesItem,
    ChunkRef,
    Piece,
    Segment,
    assign_ranks,
    size_buffers,
    split_chunk,
    unit_cost,
)
from wsm_megatron.merge.selection import select_checkpoints
from wsm_megatron.merge.writer import (
    OLD_PREFIX,
    TMP_PREFIX,
    make_tmp_dir,
    publish,
    recover_output_root,
)
from wsm_megatron.testing.checkpoints import (
    load_dcp_tensors,
    megatron_args,
    write_dcp_checkpoint,
)

# --- configuration ----------------------------------------------------------------------------


def _cfg(tmp_path: Path, **kwargs) -> MergeConfig:
    return MergeConfig(input=tmp_path / "in", output=tmp_path / "out", **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of --iterations, --last"),
        ({"last": 4, "window_iters": 400}, "exactly one of"),
        ({"last": 0}, "--last must be an integer >= 1"),
        ({"iterations": (100, 100)}, "duplicates"),
        ({"iterations": (100, 200), "end_iteration": 300}, "--end-iteration does not apply"),
        ({"last": 4, "tokens_per_iter": 10}, "--tokens-per-iter applies to --window-tokens"),
        ({"last": 4, "every": 0}, "--every must be"),
        ({"last": 4, "schedule": "linear", "weights": (0.5, 0.5)}, "either --schedule or"),
        ({"last": 4, "schedule": "cosine", "ema_beta": 0.5}, "--ema-beta"),
        ({"last": 4, "min_lr_ratio": 1.5}, "--min-lr-ratio"),
        ({"last": 4, "weights": (0.7, 0.7)}, "--weights: weights must sum to 1"),
        ({"last": 4, "accumulate_dtype": "bf16"}, "--accumulate-dtype"),
        ({"last": 4, "output_dtype": "int8"}, "--output-dtype"),
        ({"last": 4, "memory_budget_mb": 0}, "--memory-budget-mb"),
        ({"last": 4, "threads": 0}, "--threads"),
    ],
)
def test_config_rejects_invalid_options(tmp_path, kwargs, match):
    with pytest.raises(MergeError, match=match):
        _cfg(tmp_path, **kwargs)


def test_config_defaults_and_output_must_differ(tmp_path):
    cfg = _cfg(tmp_path, last=4)
    (job,) = cfg.jobs()
    assert job.weighting.schedule == "linear" and job.output_root == tmp_path / "out"
    assert _cfg(tmp_path, last=2, schedule="1-sqrt").jobs()[0].weighting.schedule == "minus-sqrt"
    with pytest.raises(MergeError, match="must differ from --input"):
        MergeConfig(input=tmp_path, output=tmp_path / ".", last=2)


def test_sweep_specs_and_yaml(tmp_path):
    assert SweepEntry.from_spec("4:minus-sqrt") == SweepEntry(last=4, schedule="minus-sqrt")
    assert SweepEntry.from_spec("400it:linear:a") == SweepEntry(
        name="a", window_iters=400, schedule="linear"
    )
    assert SweepEntry.from_spec("80Btok:cosine").window_tokens == 80 * 10**9
    assert parse_token_count("1.5M") == 1_500_000 and parse_token_count("5e9") == 5 * 10**9
    for bad in ("4", "x:linear", "4:", "4it:linear:a:b"):
        with pytest.raises(MergeError, match="--sweep"):
            SweepEntry.from_spec(bad)
    cfg = _cfg(
        tmp_path,
        every=2,
        min_lr_ratio=0.1,
        sweep=[SweepEntry.from_spec("4:linear"), SweepEntry(window_tokens=10**6)],
    )
    names = [j.name for j in cfg.jobs()]
    assert names == ["last4-every2-linear-min0.1", "1Mtok-every2-linear-min0.1"]
    assert cfg.jobs()[1].output_root == tmp_path / "out" / names[1]
    with pytest.raises(MergeError, match="share output names"):
        _cfg(tmp_path, sweep=[SweepEntry(last=4), SweepEntry(last=4)])
    with pytest.raises(MergeError, match="sweep entry 1"):
        _cfg(tmp_path, sweep=[SweepEntry(last=4), SweepEntry(schedule="linear")])

    path = tmp_path / "sweep.yaml"
    path.write_text(
        "sweep:\n"
        "  - {last: 4, schedule: minus-sqrt}\n"
        "  - {window-tokens: 80Btok, schedule: ema, ema-beta: 0.9, name: ema80}\n"
        "  - {iterations: [100, 300], weights: [0.25, 0.75]}\n"
    )
    entries = load_sweep_file(path)
    assert entries[1] == SweepEntry(
        name="ema80", window_tokens=80 * 10**9, schedule="ema", ema_beta=0.9
    )
    jobs = _cfg(tmp_path, sweep=entries).jobs()
    assert [j.name for j in jobs] == ["last4-minus-sqrt", "ema80", "it100-300-weights"]
    path.write_text("- {last: 4, bogus: 1}\n")
    with pytest.raises(MergeError, match="unknown key 'bogus'"):
        load_sweep_file(path)


def test_weighting_resolves_irregular_positions():
    w = Weighting(schedule="linear").resolve([100, 200, 400])
    assert len(w.coefficients) == 3 and math.isclose(sum(w.coefficients), 1.0)
    assert w.coefficients != Weighting(schedule="linear").resolve([100, 200, 300]).coefficients
    with pytest.raises(MergeError, match="2 weights but 3 checkpoints"):
        Weighting(weights=(0.5, 0.5)).resolve([1, 2, 3])


# --- selection ----------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path) -> Path:
    """Iteration directories 100..800 (step 100) with a common.pt; tracker at 700."""
    root = tmp_path / "ckpts"
    for it in range(100, 900, 100):
        d = iteration_dir(root, it)
        d.mkdir(parents=True)
        torch.save({"args": megatron_args(seq_length=1000, global_batch_size=10)}, d / "common.pt")
    write_tracker(root, 700)
    return root


@pytest.mark.parametrize(
    "selection, expected",
    [
        (Selection(last=3), (500, 600, 700)),  # the tracker, not the newest directory
        (Selection(last=3, end_iteration=800), (600, 700, 800)),
        (Selection(last=3, every=2), (300, 500, 700)),
        (Selection(window_iters=300), (500, 600, 700)),
        (Selection(window_iters=250), (500, 600, 700)),
        (Selection(window_tokens=3_000_000), (500, 600, 700)),  # 10k tokens per iteration
        (Selection(window_tokens=3_000_000, tokens_per_iter=5_000), (200, 300, 400, 500, 600, 700)),
        (Selection(window_iters=400, every=2), (500, 700)),
        (Selection(iterations=(800, 100)), (100, 800)),
    ],
)
def test_selection(root, selection, expected):
    assert select_checkpoints(root, selection).iterations == expected


def test_selection_errors(root, tmp_path):
    with pytest.raises(MergeError, match="only 7 checkpoints"):
        select_checkpoints(root, Selection(last=8))
    with pytest.raises(MergeError, match="a merge needs at least 2"):
        select_checkpoints(root, Selection(window_iters=100))
    with pytest.raises(MergeError, match="iter_0000150 does not exist"):
        select_checkpoints(root, Selection(iterations=(100, 150)))
    with pytest.raises(MergeError, match="no iter_"):
        select_checkpoints(tmp_path, Selection(last=2))
    (iteration_dir(root, 700) / "common.pt").write_bytes(b"junk")
    with pytest.raises(MergeError, match="cannot read common.pt"):
        select_checkpoints(root, Selection(window_tokens=10**6))


def test_common_state_embedded_as_newer_megatron_core_saves_it(tmp_path):
    """megatron-core >= 0.17 keeps the common state inside the checkpoint, with no common.pt:
    the merge reads it there (args give the tokens per iteration) and writes a common.pt that
    megatron-core's own reader loads, without a stale embedded copy."""
    from megatron.core import dist_checkpointing

    from wsm_megatron.merge import merge
    from wsm_megatron.merge.selection import EMBEDDED_COMMON_KEY

    root, out = tmp_path / "in", tmp_path / "out"
    args = megatron_args(seq_length=10, global_batch_size=5)
    for it in (100, 200, 300):
        tensors = {"decoder.w": torch.full((4,), float(it))}
        write_dcp_checkpoint(root, it, tensors, args=args, embedded_common=True)
        assert not (iteration_dir(root, it) / "common.pt").exists()
    result = merge(MergeConfig(input=root, output=out, window_tokens=200 * 50, schedule="linear"))
    assert [x["iteration"] for x in result.jobs[0].inputs] == [200, 300]  # 50 tokens/iteration
    merged = iteration_dir(out, 300)
    assert EMBEDDED_COMMON_KEY not in read_metadata(merged).state_dict_metadata
    common = dist_checkpointing.load_common_state_dict(str(merged))
    assert common["iteration"] == 300 and common["args"].seq_length == 10
    assert common["wsm_merge"]["inputs"][0]["iteration"] == 200
    assert torch.equal(load_dcp_tensors(merged)["decoder.w"], torch.full((4,), 250.0))

    bare = write_dcp_checkpoint(root, 400, {"decoder.w": torch.zeros(4)})
    (bare / "common.pt").unlink()
    with pytest.raises(MergeError, match="iter_0000400: missing common.pt"):
        merge(MergeConfig(input=root, output=tmp_path / "out2", last=2))


# --- planning -------------------------------------------------------------------------------


def test_split_chunk_tiles_contiguous_runs():
    rng = random.Random(0)
    for _ in range(200):
        shape = tuple(rng.randint(1, 6) for _ in range(rng.randint(0, 4)))
        capacity = rng.randint(1, 50)
        boxes = split_chunk(shape, capacity)
        total = math.prod(shape)
        flat = torch.arange(total).view(shape) if shape else torch.tensor(0)
        covered = []
        for offsets, sizes, start in boxes:
            n = math.prod(sizes)
            assert n <= max(capacity, 1) or total <= capacity
            box = flat[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
            assert box.reshape(-1).tolist() == list(range(start, start + n))  # contiguous run
            covered += box.reshape(-1).tolist()
        assert covered == list(range(total))  # every element once, in order


def _piece(fqn: str, numel: int, offset: int) -> Piece:
    segment = Segment((0,), (numel,), storage_info("__0_0.distcp", offset, 4 * numel))
    chunk = ChunkRef(fqn, (0,), (numel,), torch.float32, ((0, (segment,)),))
    return Piece(chunk, AVERAGE, torch.float32, (0,), (numel,), 0)


def test_assign_ranks_balances_bytes_in_file_order():
    rng = random.Random(1)
    units = [_piece(f"t{i}", rng.randint(1, 1000), i * 10_000) for i in range(300)]
    units.append(BytesItem("obj", ((0, storage_info("__0_0.distcp", 5, 100)),)))
    for world in (1, 2, 3, 7):
        per_rank = assign_ranks(units, world)
        assert sum(len(r) for r in per_rank) == len(units)
        costs = [sum(unit_cost(u) for u in r) for r in per_rank]
        biggest = max(unit_cost(u) for u in units)
        assert max(costs) - min(costs) <= 2 * biggest
        flat = [u for r in per_rank for u in r]  # contiguous runs of the file order
        assert flat == sorted(
            units,
            key=lambda u: (
                u.chunk.sources[-1][1][0].info.offset
                if isinstance(u, Piece)
                else u.sources[-1][1].offset
            ),
        )


def _bf16_buffers(budget: int, slots: int, largest_chunk: int):
    kinds = {"acc_dtype": torch.float32, "in_itemsize": 2, "out_itemsize": 2}
    return size_buffers(budget, slots=slots, largest_chunk=largest_chunk, **kinds)


def test_buffers_fit_the_budget():
    for budget in (2**20, 64 * 2**20, 2**30):
        b = _bf16_buffers(budget, 8, 10**12)
        assert b.total_bytes <= budget - min(32 * 2**20, budget // 4) and b.capacity > 0
    small = size_buffers(
        2**30,
        slots=4,
        acc_dtype=torch.float64,
        in_itemsize=4,
        out_itemsize=4,
        largest_chunk=1000,
    )
    assert small.capacity == 1000  # never more than the largest chunk
    assert small.group == MAX_GROUP and small.slots == 4 * MAX_GROUP  # room left: many per call
    assert small.total_bytes <= 2**30 - 32 * 2**20
    tight = _bf16_buffers(16 * 2**20, 4, 2**20)
    assert (tight.group, tight.slots) == (1, 4) and tight.capacity < 2**20  # budget-bound
    some = _bf16_buffers(64 * 2**20, 4, 2**18)
    assert 1 < some.group < MAX_GROUP and some.total_bytes <= 48 * 2**20


# --- the raw DCP reader -----------------------------------------------------------------------


def test_locate_tensor_reads_what_torch_load_reads(tmp_path):
    tensors = {
        "bf16": torch.randn(33, 7).bfloat16(),
        "fp16": torch.randn(5, 3, 2).half(),
        "fp64": torch.randn(4).double(),
        "int": torch.arange(12, dtype=torch.int32).view(3, 4),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "view": torch.randn(100)[10:30].view(4, 5),  # DCP clones views: exact storage
    }
    ckpt = write_dcp_checkpoint(tmp_path, 1, tensors)
    metadata = read_metadata(ckpt)
    files = StorageFiles()
    reads = []
    read_into = files.read_into
    files.read_into = lambda *args: reads.append(args[0]) or read_into(*args)
    for index, info in metadata.storage_data.items():
        md = metadata.state_dict_metadata[index.fqn]
        reads.clear()
        raw = locate_tensor(
            files,
            ckpt / info.relative_path,
            info,
            where=index.fqn,
            expected_dtype=md.properties.dtype,
            expected_size=tuple(md.size),
        )
        # The blob's first and last KiB hold everything: two reads (round trips on a network
        # file system) per chunk, not one per zip structure.
        assert len(reads) <= 2, (index.fqn, len(reads))
        n = math.prod(raw.size) * raw.itemsize
        data = bytearray(files.read(raw.path, raw.data_offset, n))
        got = torch.frombuffer(data, dtype=raw.dtype).view(raw.size) if n else torch.zeros(raw.size)
        assert torch.equal(got, tensors[index.fqn]), index.fqn
    files.close()


def test_locate_tensor_handles_storage_offsets_and_rejects_strides(tmp_path):
    base = torch.arange(60, dtype=torch.float32)
    path = tmp_path / "blob.distcp"
    with open(path, "wb") as f:
        f.write(b"\0" * 13)  # items start at arbitrary offsets in a .distcp file
        torch.save(base[20:40].view(4, 5), f)  # a view: the whole storage is saved
        mid = f.tell()
        torch.save(base.view(6, 10).t(), f)  # transposed
        end = f.tell()
    files = StorageFiles()
    raw = locate_tensor(
        files,
        path,
        storage_info(path.name, 13, mid - 13),
        where="v",
        expected_dtype=torch.float32,
        expected_size=(4, 5),
    )
    data = bytearray(files.read(path, raw.data_offset, 80))
    assert torch.equal(torch.frombuffer(data, dtype=torch.float32), base[20:40])
    with pytest.raises(MergeError, match="non-contiguous strides"):
        locate_tensor(
            files,
            path,
            storage_info(path.name, mid, end - mid),
            where="t",
            expected_dtype=torch.float32,
            expected_size=(10, 6),
        )
    with pytest.raises(MergeError, match="stored shape"):
        locate_tensor(
            files,
            path,
            storage_info(path.name, 13, mid - 13),
            where="v",
            expected_dtype=torch.float32,
            expected_size=(5, 4),
        )
    with pytest.raises(MergeError, match="not a torch.save blob"):
        locate_tensor(
            files,
            path,
            storage_info(path.name, 0, mid),
            where="x",
            expected_dtype=torch.float32,
            expected_size=(4, 5),
        )


# --- contents -----------------------------------------------------------------------------------


def test_key_classification():
    assert key_group("decoder.layers.self_attention.linear_qkv.weight") == "model"
    assert key_group("optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight") == "optimizer"
    assert key_group("chained_1.optimizer.distributed.dp_group_idx_0") == "optimizer"
    assert key_group("rng_state/shard_0.1_2.2") == "run_state"
    assert key_group("rerun_state_machine_state/shard_0.0_1.1") == "run_state"
    assert is_extra_state("decoder.layers.mlp.linear_fc1._extra_state/shard_0_4")
    policy = ContentPolicy(copy_from_newest=("decoder.layers.1.*",), average=("foo.*",))
    assert policy.tensor_kind("decoder.layers.0.mlp.linear_fc1.weight", torch.bfloat16) == AVERAGE
    assert policy.tensor_kind("decoder.layers.1.mlp.linear_fc1.weight", torch.bfloat16) == COPY
    assert policy.tensor_kind("a.counts", torch.int64) == COPY
    assert policy.tensor_kind("foo.scale", torch.float32) == AVERAGE
    assert policy.tensor_kind("optimizer.state.exp_avg.decoder.w", torch.float32) == AVERAGE
    # A MoE router's expert_bias is load-balancing state, not a trained weight: newest's.
    bias = "decoder.layers.mlp.router.expert_bias"
    assert policy.tensor_kind(bias, torch.float32) == COPY
    assert ContentPolicy(average=("*.expert_bias",)).tensor_kind(bias, torch.float32) == AVERAGE
    with pytest.raises(MergeError, match=r"'bar'.*--average 'bar\.\*'.*--copy-from-newest 'bar"):
        policy.tensor_kind("bar.scale", torch.float32)
    with pytest.raises(MergeError, match="leaving that tensor unmerged"):
        policy.tensor_kind("decoder.fp8.weight", torch.float8_e4m3fn)
    policy.check_object("optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1")  # copied
    with pytest.raises(MergeError, match="--dist-ckpt-optim-fully-reshardable"):
        policy.check_object("optimizer.distributed.dp_group_idx_0.param_state/shard_0_1")
    assert not policy.include("optimizer.state.exp_avg.x") and not policy.include("rng_state")
    common = policy.common_state(
        {
            "args": megatron_args(),
            "iteration": 5,
            "optimizer": {},
            "rng_state": 1,
            "rerun_state_machine": {},
            "opt_param_scheduler": {},
        },
        {"tool": "wsm-merge"},
    )
    assert set(common) == {"args", "iteration", "wsm_merge"}
    assert common["args"].no_save_optim and common["args"].no_save_rng


# --- publish and recovery -----------------------------------------------------------------------


def test_publish_and_recovery(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    tmp = make_tmp_dir(root, 300)
    (tmp / "x").write_text("new")
    write_tracker(root, 500)
    iteration_dir(root, 500).mkdir()
    publish(tmp, root, 300, overwrite=False)
    assert (iteration_dir(root, 300) / "x").read_text() == "new"
    assert read_tracker(root) == 500  # the tracker names the newest complete iteration
    with pytest.raises(MergeError, match="exists"):
        publish(make_tmp_dir(root, 300), root, 300, overwrite=False)
    # A killed run left a temporary directory and an old iteration moved aside.
    iteration_dir(root, 300).rename(root / f"{OLD_PREFIX}iter_0000300-abc")
    recover_output_root(root, 300)
    assert (iteration_dir(root, 300) / "x").read_text() == "new"
    assert not [p for p in root.iterdir() if p.name.startswith((TMP_PREFIX, OLD_PREFIX))]
