"""Benchmark wsm-merge against the I/O floor measured in the same run (run by hand).

Builds N Megatron-layout ``torch_dist`` checkpoints of about S GiB each (bf16 weight matrices
plus an fp32 tensor, saved with ``torch.distributed.checkpoint`` into 4 shard files), then:

1. the I/O floor: read every input shard file once (large sequential reads) and write as many
   bytes as the merged output once (fsync) — what any merge must at least do;
2. ``wsm-merge`` on 1 rank, and under ``torchrun`` on 2, 4, ... ranks (``--ranks``), each a
   fresh process with ``--report``: wall time (process included), merge time, throughput and
   peak RSS per rank above start-up against ``--memory-budget-mb``.

With ``--drop-caches`` (root) the page cache is dropped before each measurement, so every read
comes from the device; otherwise the inputs, just written, are read from the page cache.

With ``--cross-layout`` the checkpoints are saved at different layouts, as a run restarted at
another TP would leave them: each tensor in 4 chunks, split by columns (the newest: the output's
layout), by rows, or as a 2 x 2 grid, cycling from the newest back; the merge then reads every
older input as sub-boxes of its chunks (strided, through mapped windows).

With ``--files-per-input F`` every input is cut into row chunks spread over F shard files (a
1,000-GPU run writes about 2,000 per checkpoint); ``--open-files-limit`` lowers the merge's
descriptor limit (soft and hard), which inputs x files would exceed if every file stayed open.

    python tools/bench_merge.py --workdir /tmp/wsm-bench --gib 1 --checkpoints 4 --drop-caches
    python tools/bench_merge.py --gib 1 --files-per-input 2000 --open-files-limit 256 --ranks 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from wsm_megatron.layout import iteration_dir
from wsm_megatron.testing.checkpoints import TORCH_DIST_CONFIG, megatron_args

ROWS = 8192


SPLITS = ((1, 4), (4, 1), (2, 2))  # (row parts, column parts): columns, rows, a grid


def save_chunked(
    directory: Path, state: dict[str, torch.Tensor], split: tuple[int, int], n_files: int = 4
) -> None:
    """Save 2-D tensors in DCP's format, each cut into ``split`` chunks spread over ``n_files``
    shard files, with the merge's own writer (as the ranks of another layout would save them)."""
    from wsm_megatron.merge.dcp_format import TensorProperties, TensorStorageMetadata
    from wsm_megatron.merge.writer import WriteRecord, build_metadata, write_metadata

    reference, records = {}, []
    for name, t in state.items():
        reference[name] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape, [])
        rows, cols = t.shape[0] // split[0], t.shape[1] // split[1]
        for i in range(split[0]):
            for j in range(split[1]):
                chunk = t[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols].clone()
                file = f"__{len(records) % n_files}_0.distcp"
                with open(directory / file, "ab") as f:  # one open at a time, for any n_files
                    start = f.tell()
                    torch.save(chunk, f)  # as DCP stores a chunk: a torch.save blob
                    length = f.tell() - start
                rec = (name, (i * rows, j * cols), tuple(chunk.shape), t.dtype)
                records.append(WriteRecord(*rec, file, start, length))
    write_metadata(directory, build_metadata(records, reference, None))


def input_split(k: int, checkpoints: int, cross_layout: bool, files: int, tensors: int):
    """How checkpoint ``k`` cuts each tensor: None for DCP's own save (one chunk per tensor)."""
    if cross_layout:
        return SPLITS[(checkpoints - 1 - k) % len(SPLITS)]
    if files:
        rows = 1 << max(0, math.ceil(math.log2(files / tensors)))  # powers of 2 divide ROWS
        return (rows, 1)
    return None


def build_inputs(
    root: Path, checkpoints: int, gib: float, interval: int, cross_layout: bool, files: int
) -> int:
    """Write the inputs; returns the bytes of one checkpoint's tensors."""
    import torch.distributed.checkpoint as dcp

    from wsm_megatron.layout import write_tracker

    cols = 4096
    tensor_bytes = ROWS * cols * 2
    n_bf16 = max(1, round(gib * 2**30 / tensor_bytes) - 1)
    g = torch.Generator().manual_seed(0)
    base = {
        f"decoder.layers.{i}.weight": torch.randn(ROWS, cols, generator=g).bfloat16()
        for i in range(n_bf16)
    }
    base["decoder.final_norm.weight"] = torch.randn(ROWS // 2, cols, generator=g)  # fp32
    total = sum(t.numel() * t.element_size() for t in base.values())
    for k in range(checkpoints):
        it = (k + 1) * interval
        state = {name: t + 1e-3 * (k + 1) for name, t in base.items()}
        d = iteration_dir(root, it)
        d.mkdir(parents=True)
        split = input_split(k, checkpoints, cross_layout, files, len(state))
        if split:
            save_chunked(d, state, split, files or 4)
        else:
            writer = dcp.FileSystemWriter(str(d), thread_count=4)
            dcp.save(state, storage_writer=writer, no_dist=True)
        torch.save(
            {"args": megatron_args(), "iteration": it, "checkpoint_version": 3.0}, d / "common.pt"
        )
        (d / "metadata.json").write_text(json.dumps(TORCH_DIST_CONFIG))
        write_tracker(root, it)
        del state
        print(f"  wrote {d} ({total / 2**30:.2f} GiB)", flush=True)
    return total


def drop_caches(enabled: bool) -> None:
    if enabled:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def io_floor(root: Path, out_bytes: int, scratch: Path) -> dict[str, float]:
    """Read every shard file once, then write ``out_bytes`` and fsync."""
    buf = bytearray(64 * 2**20)
    mv = memoryview(buf)
    read = 0
    start = time.perf_counter()
    for f in sorted(root.glob("iter_*/*.distcp")):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(mv):
                read += n
    t_read = time.perf_counter() - start
    start = time.perf_counter()
    with open(scratch, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(mv[: min(left, len(mv))])
        os.fsync(fh.fileno())
    t_write = time.perf_counter() - start
    scratch.unlink()
    return {"bytes_read": read, "read_s": t_read, "write_s": t_write, "seconds": t_read + t_write}


def run_merge(
    root: Path, out: Path, ranks: int, budget: float, report: Path, open_files: int | None
) -> dict:
    last = str(len(list(root.glob("iter_*"))))
    argv = [
        "--input",
        str(root),
        "--output",
        str(out),
        "--last",
        last,
        "--schedule",
        "minus-sqrt",
        "--memory-budget-mb",
        str(budget),
        "--report",
        str(report),
        "--no-progress",
    ]
    if ranks == 1:
        cmd = [sys.executable, "-m", "wsm_megatron.cli.merge", *argv]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "-m",
            "wsm_megatron.cli.merge",
            *argv,
        ]
    start = time.perf_counter()

    def limit_open_files() -> None:
        if open_files:  # the hard limit too: the merge raises its soft limit to the hard one
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, preexec_fn=limit_open_files)
    wall = time.perf_counter() - start
    data = json.loads(report.read_text())
    data["wall_s"] = wall
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/wsm-bench"))
    p.add_argument("--checkpoints", type=int, default=4)
    p.add_argument("--gib", type=float, default=1.0, help="size of one checkpoint")
    p.add_argument("--memory-budget-mb", type=float, default=512.0)
    p.add_argument("--ranks", default="1,2", help="merge ranks to measure, comma-separated")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache (root)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument(
        "--cross-layout", action="store_true", help="inputs saved with different chunkings"
    )
    layout.add_argument(
        "--files-per-input",
        type=int,
        default=0,
        metavar="F",
        help="cut every tensor into row chunks spread over F shard files per input\n"
        "(a 1,000-GPU run writes ~2,000); default: DCP's own save into 4",
    )
    p.add_argument(
        "--open-files-limit",
        type=int,
        metavar="N",
        help="RLIMIT_NOFILE (soft and hard) of the merge processes (default: unchanged)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    root = work / "ckpts"
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "torch": torch.__version__,
        },
        "checkpoints": args.checkpoints,
        "memory_budget_mb": args.memory_budget_mb,
        "page_cache": "dropped before each measurement" if args.drop_caches else "warm",
        "cross_layout": args.cross_layout,
        "files_per_input": args.files_per_input or 4,
        "open_files_limit": args.open_files_limit or resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    try:
        print(f"building {args.checkpoints} checkpoints of ~{args.gib} GiB in {root}", flush=True)
        size = build_inputs(
            root, args.checkpoints, args.gib, 1000, args.cross_layout, args.files_per_input
        )
        results["checkpoint_bytes"] = size
        drop_caches(args.drop_caches)
        results["io_floor"] = floor = io_floor(root, size, work / "floor.bin")
        print(
            f"I/O floor: {floor['seconds']:.2f} s (read {floor['read_s']:.2f} s, "
            f"write {floor['write_s']:.2f} s)",
            flush=True,
        )
        results["merges"] = []
        for ranks in (int(r) for r in args.ranks.split(",")):
            drop_caches(args.drop_caches)
            out = work / f"out{ranks}"
            report = work / f"report{ranks}.json"
            data = run_merge(root, out, ranks, args.memory_budget_mb, report, args.open_files_limit)
            shutil.rmtree(out)
            row = {
                "ranks": ranks,
                "wall_s": round(data["wall_s"], 2),
                "merge_s": round(data["seconds"], 2),
                "vs_floor": round(data["seconds"] / floor["seconds"], 2),
                "read_mib_s": round(data["read_throughput_mib_s"]),
                "read_gib_per_rank": [round(b / 2**30, 2) for b in data["bytes_read_per_rank"]],
                "peak_rss_mib_per_rank": [round(x) for x in data["peak_rss_mib_per_rank"]],
                "buffer_mib": round(data["buffer_mib"]),
                "pieces": data["pieces"],
                "chunks_streamed": data["chunks_streamed"],
            }
            results["merges"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
