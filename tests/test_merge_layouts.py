"""wsm-merge across TP/PP layouts: the box geometry and sub-box reads, then real Megatron-Core
checkpoints of one run saved at TP2/PP2, TP1/PP2 and TP2/PP1, merged in one window, checked
against an fp64 reference of the full tensors and loaded back by megatron-core."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import random
from pathlib import Path

import pytest
import torch

from wsm_megatron.cli.merge import main
from wsm_megatron.layout import iteration_dir
from wsm_megatron.merge import MergeConfig, MergeError, merge
from wsm_megatron.merge.boxes import ChunkGrid, intersect, read_box
from wsm_megatron.merge.contents import key_group
from wsm_megatron.merge.dcp_format import StorageFiles, locate_tensor, storage_info
from wsm_megatron.merge.plan import overlapping_segments
from wsm_megatron.merge.readback import stored_objects
from wsm_megatron.testing.checkpoints import (
    EXTRA_STATE_KEY,
    INT_BUFFER_KEY,
    fp64_reference,
    load_dcp_tensors,
    shared_megatron_checkpoints,
    write_dcp_checkpoint,
)
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.models import assert_shards_match, load_into_tiny_gpt
from wsm_megatron.theory import merge_weights

ITERATIONS = (100, 200, 300, 400)
LAYOUTS = ((2, 2), (2, 2), (1, 2), (2, 1))  # (tp, pp) of each iteration


# --- geometry and sub-box reads -------------------------------------------------------------


def _random_box(rng: random.Random, shape: tuple[int, ...]) -> tuple[tuple, tuple]:
    offsets = tuple(rng.randrange(n) for n in shape)
    return offsets, tuple(rng.randint(1, n - o) for o, n in zip(offsets, shape, strict=True))


@pytest.mark.parametrize("window", [2**20, 64])
def test_read_box_equals_torch_slicing(tmp_path, window):
    """Any sub-box of a stored chunk lands at any place of a piece buffer, through one pread
    (a run in both) or mapped windows (here also windows smaller than a row)."""
    rng = random.Random(window)
    files = StorageFiles()
    for case in range(60):
        shape = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 4)))
        dtype = rng.choice([torch.bfloat16, torch.float32, torch.int64])
        stored = (torch.randn(shape) * 100).to(dtype)
        path = tmp_path / f"{case}.distcp"
        with open(path, "wb") as f:
            f.write(b"x" * rng.randint(0, 5000))  # the blob starts anywhere in the file
            start = f.tell()
            torch.save(stored, f)
            length = f.tell() - start
        raw = locate_tensor(
            files,
            path,
            storage_info(path.name, start, length),
            where="test",
            expected_dtype=dtype,
            expected_size=shape,
        )
        src_offsets, sizes = _random_box(rng, shape)
        dst_shape = tuple(s + rng.randint(0, 3) for s in sizes)
        dst_offsets = tuple(rng.randint(0, d - s) for d, s in zip(dst_shape, sizes, strict=True))
        out = torch.zeros(dst_shape, dtype=dtype)
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        read_box(files, raw, src_offsets, sizes, buffer, dst_offsets, dst_shape, window)
        expected = torch.zeros(dst_shape, dtype=dtype)
        src = tuple(slice(o, o + n) for o, n in zip(src_offsets, sizes, strict=True))
        dst = tuple(slice(o, o + n) for o, n in zip(dst_offsets, sizes, strict=True))
        expected[dst] = stored[src]
        assert torch.equal(out, expected), (case, shape, src_offsets, sizes, dst_offsets)
    files.close()


def test_chunk_grid_finds_exactly_the_overlapping_chunks():
    rng = random.Random(3)
    shape = (12, 10, 6)
    splits = [(0, 4, 8), (0, 5), (0, 3)]  # a Megatron-like grid
    grid_chunks = [
        (offsets, tuple(min(b, n) - a for a, b, n in zip(offsets, ends, shape, strict=True)))
        for offsets in itertools.product(*splits)
        for ends in [
            tuple(
                next((s for s in sp if s > o), n)
                for o, sp, n in zip(offsets, splits, shape, strict=True)
            )
        ]
    ]
    irregular = [((0, 0, 0), (12, 10, 2)), ((0, 0, 2), (7, 10, 4)), ((7, 0, 2), (5, 10, 4))]
    for chunks in (grid_chunks, irregular):
        grid = ChunkGrid(chunks)
        for _ in range(200):
            box = _random_box(rng, shape)
            found = grid.overlapping(box)
            assert sorted(found) == sorted(c for c in chunks if intersect(c, box) is not None)
            covered = sum(math.prod(intersect(c, box)[1]) for c in found)
            assert covered == math.prod(box[1])
        assert (grid._cells is None) == (chunks is irregular)


def test_chunks_that_do_not_cover_a_box_are_an_error():
    grid = ChunkGrid([((0, 0), (4, 8)), ((8, 0), (4, 8))])  # rows 4..7 missing
    with pytest.raises(MergeError, match=r"tensor 'w'.*cover 64 of the 96 elements"):
        overlapping_segments(grid, lambda o: None, ((0, 0), (12, 8)), "tensor 'w'")


# --- real megatron-core checkpoints at three layouts ----------------------------------------


@pytest.fixture(scope="session")
def ckpts(shared_tmp) -> Path:
    return shared_megatron_checkpoints(shared_tmp / "wsm-merge-layouts", ITERATIONS, LAYOUTS)


@pytest.fixture(scope="module")
def merged(ckpts, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("merged")
    result = merge(MergeConfig(input=ckpts, output=out, last=4, schedule="minus-sqrt"))
    return iteration_dir(out, 400), result


def _metadata(ckpt_dir: Path):
    return pickle.loads((ckpt_dir / ".metadata").read_bytes()).state_dict_metadata


def _chunks(md, key: str) -> list[tuple]:
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md[key].chunks)


def test_inputs_really_differ_in_layout(ckpts):
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    proj = "decoder.layers.self_attention.linear_proj.weight"  # row-parallel: split on columns
    layouts = {it: _metadata(iteration_dir(ckpts, it)) for it in ITERATIONS}
    for key in (qkv, proj):  # TP changes the chunks (PP does not: layers are stacked)
        assert len({str(_chunks(md, key)) for md in layouts.values()}) == 2
    per_shard = [{k for k in md if k.startswith("rng_state")} for md in layouts.values()]
    assert len({str(sorted(keys)) for keys in per_shard}) == 3  # objects keyed by (PP, TP)
    assert tuple(layouts[400][INT_BUFFER_KEY].size) != tuple(layouts[300][INT_BUFFER_KEY].size)


def test_cross_layout_merge_matches_fp64_reference(ckpts, merged):
    out, result = merged
    coeffs = merge_weights("minus-sqrt", positions=list(ITERATIONS)).coefficients
    tensors = load_dcp_tensors(out)
    ref = fp64_reference(ckpts, ITERATIONS, coeffs)
    scale = fp64_reference(ckpts, ITERATIONS, coeffs, absolute=True)
    newest_dir = iteration_dir(ckpts, 400)
    newest = load_dcp_tensors(newest_dir)
    assert set(tensors) == {k for k in newest if key_group(k) == "model"}
    for key, x in tensors.items():
        if not x.dtype.is_floating_point:  # copied from the newest, in its layout
            assert torch.equal(x, newest[key]), key
            continue
        r = ref[key]
        err = (x.double() - r).abs()
        fp32_error = 4 * 2.0**-24 * scale[key]
        if x.dtype == torch.bfloat16:
            assert bool((err <= r.abs() * 2.0**-8 + fp32_error).all()), key
        else:
            assert bool((err <= fp32_error + 2.0**-24 * r.abs()).all()), key
    # The output takes the newest input's layout: its chunks, objects and saved args.
    md, newest_md = _metadata(out), _metadata(newest_dir)
    for key in tensors:
        assert _chunks(md, key) == _chunks(newest_md, key), key
    objects = stored_objects(out)
    assert objects == {
        k: v for k, v in stored_objects(newest_dir).items() if key_group(k) == "model"
    }
    assert any(k.startswith(EXTRA_STATE_KEY) for k in objects)
    common = torch.load(out / "common.pt", weights_only=False)
    assert (
        common["args"].tensor_model_parallel_size,
        common["args"].pipeline_model_parallel_size,
    ) == (2, 1)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["layout_from"] == 400 and info["objects_from"] == 400
    # Every input is read once, exactly the bytes merged: 4 x the averaged tensors.
    averaged = sum(x.numel() * x.element_size() for x in tensors.values() if x.is_floating_point())
    copied = newest[INT_BUFFER_KEY].numel() * 8
    objects_bytes = sum(len(v) for v in objects.values())
    assert result.bytes_read == 4 * averaged + copied + objects_bytes


def test_fp64_accumulation_is_exact_across_layouts(ckpts, tmp_path):
    """Accumulated in fp64, the only rounding is the final one: equal to the fp64 reference."""
    out = tmp_path / "out"
    config = dict(accumulate_dtype="fp64", output_dtype="fp32", memory_budget_mb=0.05)
    merge(MergeConfig(input=ckpts, output=out, last=4, schedule="linear", **config))
    ref = fp64_reference(ckpts, ITERATIONS, [0.25] * 4)
    for key, x in load_dcp_tensors(iteration_dir(out, 400)).items():
        if key in ref:
            assert torch.equal(x, ref[key].float()), key


def _merge_on_ranks(ckpts: str, out: str, budget_mb: float) -> dict:
    from wsm_megatron.runtime import init_distributed

    init_distributed(megatron=False)
    result = merge(
        MergeConfig(
            input=ckpts, output=out, last=4, schedule="minus-sqrt", memory_budget_mb=budget_mb
        )
    )
    return {"ranks": result.ranks, "pieces": result.pieces}


def test_bitwise_identical_across_ranks_and_budgets(ckpts, merged, tmp_path):
    reference = load_dcp_tensors(merged[0])
    three = run_distributed(_merge_on_ranks, 3, str(ckpts), str(tmp_path / "r3"), 1024.0)
    tiny = run_distributed(_merge_on_ranks, 2, str(ckpts), str(tmp_path / "r2"), 0.02)
    assert three[0]["ranks"] == 3 and tiny[0]["pieces"] > 10 * merged[1].pieces
    for out in (tmp_path / "r3", tmp_path / "r2"):
        tensors = load_dcp_tensors(iteration_dir(out, 400))
        assert tensors.keys() == reference.keys()
        for key in tensors:
            assert torch.equal(tensors[key].view(torch.uint8), reference[key].view(torch.uint8))
        assert stored_objects(iteration_dir(out, 400)) == stored_objects(merged[0])


@pytest.fixture(scope="module")
def layout_300(ckpts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layout300")
    assert (
        main(
            [
                "--input",
                str(ckpts),
                "--output",
                str(out),
                "--last",
                "4",
                "--schedule",
                "minus-sqrt",
                "--layout-from",
                "300",
                "--no-progress",
            ]
        )
        == 0
    )
    return iteration_dir(out, 400)


def test_layout_from_takes_that_inputs_layout(ckpts, merged, layout_300):
    """Same values in TP1/PP2's chunks; objects (per-shard) and the args from that input."""
    tensors, reference = load_dcp_tensors(layout_300), load_dcp_tensors(merged[0])
    md, md_300 = _metadata(layout_300), _metadata(iteration_dir(ckpts, 300))
    for key, x in tensors.items():
        assert _chunks(md, key) == _chunks(md_300, key), key
        if key != INT_BUFFER_KEY:  # its global shape is TP's: copied from iteration 300
            assert torch.equal(x.view(torch.uint8), reference[key].view(torch.uint8)), key
    assert torch.equal(
        tensors[INT_BUFFER_KEY], load_dcp_tensors(iteration_dir(ckpts, 300))[INT_BUFFER_KEY]
    )
    objects_300 = stored_objects(iteration_dir(ckpts, 300))
    assert stored_objects(layout_300) == {
        k: v for k, v in objects_300.items() if key_group(k) == "model"
    }
    common = torch.load(layout_300 / "common.pt", weights_only=False)
    assert common["iteration"] == 400
    assert (
        common["args"].tensor_model_parallel_size,
        common["args"].pipeline_model_parallel_size,
    ) == (1, 2)


def _load_with_megatron(out: str, tp: int, pp: int) -> list[tuple]:
    return load_into_tiny_gpt(out, tp, pp)[1]


@pytest.mark.parametrize("tp,pp,which", [(1, 1, "newest"), (2, 2, "layout-300")])
def test_megatron_loads_cross_layout_output(ckpts, merged, layout_300, tp, pp, which):
    out = merged[0] if which == "newest" else layout_300
    tensors = load_dcp_tensors(out)
    loaded = run_distributed(_load_with_megatron, tp * pp, str(out), tp, pp)
    assert_shards_match(loaded, tensors)


# --- what cannot be merged across layouts ---------------------------------------------------


def test_different_global_shape_is_refused_in_one_line(tmp_path, capsys):
    """A vocabulary padded for another TP size changes the embedding's global shape."""
    root = tmp_path / "ckpts"
    for it, rows in ((100, 136), (200, 128)):
        write_dcp_checkpoint(root, it, {"embedding.word_embeddings.weight": torch.ones(rows, 8)})
    with pytest.raises(
        MergeError,
        match=r"'embedding.word_embeddings.weight': global shape "
        r"\(136, 8\) at iteration 100 \(.*iter_0000100\) but \(128, 8\) at iteration 200",
    ):
        merge(MergeConfig(input=root, output=tmp_path / "out", last=2))
    assert main(["--input", str(root), "--output", str(tmp_path / "out"), "--last", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "global shape" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_layout_from_must_be_a_merged_checkpoint(ckpts, tmp_path):
    with pytest.raises(MergeError, match=r"--layout-from 250: not one of the merged"):
        merge(MergeConfig(input=ckpts, output=tmp_path / "o", last=4, layout_from=250))


def test_mapping_past_the_end_of_a_file_is_an_error_not_a_crash(tmp_path):
    """A shard file truncated after the inputs were checked: one line, not a SIGBUS."""
    path = tmp_path / "__0_0.distcp"
    path.write_bytes(b"x" * 1000)
    files = StorageFiles()
    with pytest.raises(MergeError, match=r"__0_0.distcp is truncated: expected 4096 bytes"):
        with files.map(path, 0, 4096):
            pass
    with files.map(path, 0, 1000) as region:
        assert region[:3] == b"xxx"
    files.close()


def test_sweep_entry_ending_at_another_layout(ckpts, tmp_path):
    """A sweep shares one output layout (the newest input's); an entry whose newest input was
    saved at another layout takes its stored objects and layout args from the layout input."""
    from wsm_megatron.merge import SweepEntry

    sweep = (
        SweepEntry(name="to300", iterations=(200, 300), schedule="linear"),
        SweepEntry(name="to400", iterations=(300, 400), schedule="linear"),
    )
    merge(MergeConfig(input=ckpts, output=tmp_path, sweep=sweep))
    out = iteration_dir(tmp_path / "to300", 300)
    ref = fp64_reference(ckpts, (200, 300), (0.5, 0.5))
    md_400 = _metadata(iteration_dir(ckpts, 400))
    for key, x in load_dcp_tensors(out).items():
        assert _chunks(_metadata(out), key) == _chunks(md_400, key), key
        if key in ref and x.dtype == torch.float32:  # exact: a mean of two in fp32
            assert torch.equal(x, ref[key].float()), key
    objects_400 = stored_objects(iteration_dir(ckpts, 400))
    assert stored_objects(out) == {k: v for k, v in objects_400.items() if key_group(k) == "model"}
    info = json.loads((out / "merge_info.json").read_text())
    assert info["layout_from"] == 400 and info["objects_from"] == 400
    common = torch.load(out / "common.pt", weights_only=False)
    assert common["iteration"] == 300 and common["args"].pipeline_model_parallel_size == 1
