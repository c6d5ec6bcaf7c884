#!/usr/bin/env python
"""Benchmark the fused weighted sum against unfused baselines (effective bandwidth).

For each size S (bytes of one input) and each k, k inputs of ``--dtype`` are averaged into an
output of the same dtype. Effective bandwidth is ``(k + 1) * S / time`` (each input read once,
the output written once) for:

* ``fused``   : ``wsm_megatron.kernels.weighted_sum_multi`` (``--backend``; auto = Triton on
  CUDA, torch foreach on CPU);
* ``add_``    : fp32 ``acc.zero_(); acc.add_(x_j, alpha=w_j) ...; out.copy_(acc)`` per tensor;
* ``foreach`` : the same with ``torch._foreach_zero_ / _foreach_add_ / _foreach_copy_``;
* ``copy``    : a device-to-device copy of one input, ``2 * S / time``: the ceiling.

Sizes that do not fit in free memory are skipped. Example::

    python tools/bench_kernels.py --device cuda --dtype bf16 --plot bench.png
    python tools/bench_kernels.py --device cpu --sizes 1MiB 16MiB --ks 2 4 --reps 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsm_megatron import kernels  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3,
         "MB": 10**6, "GB": 10**9}  # fmt: skip
METHODS = ("fused", "add_", "foreach", "copy")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 4096, 1MiB, 4GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def human(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g}{unit}"
    return f"{nbytes}B"


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def split_sizes(numel: int, tensors: int) -> list[int]:
    """Split ``numel`` elements into ``tensors`` parts of uneven sizes (weights 1..7)."""
    parts = [1 + t % 7 for t in range(tensors)]
    sizes = [numel * p // sum(parts) for p in parts]
    sizes[-1] += numel - sum(sizes)
    return sizes


def timer(device: torch.device, fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_size(args, device, size: int) -> list[dict]:
    dtype = DTYPES[args.dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    numel = size // esize
    acc_bytes = numel * 4
    budget = free_bytes(device) * 0.9
    ks = [k for k in args.ks if (k + 1) * size + acc_bytes <= budget]
    for k in sorted(set(args.ks) - set(ks)):
        print(f"skip size={human(size)} k={k}: needs {human((k + 1) * size + acc_bytes)}")
    if not ks or numel == 0:
        return []
    shapes = split_sizes(numel, args.tensors)
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = [
        [torch.empty(n, dtype=dtype, device=device).normal_(generator=gen) for n in shapes]
        for _ in range(max(ks))
    ]
    outs = [torch.empty(n, dtype=dtype, device=device) for n in shapes]
    acc = [torch.empty(n, dtype=torch.float32, device=device) for n in shapes]
    rows = []
    for k in ks:
        xs, ws = inputs[:k], [1.0 / k] * k

        def fused(xs=xs, ws=ws):
            kernels.weighted_sum_multi(outs, xs, ws, backend=args.backend)

        def add_chain(xs=xs, ws=ws):
            for t, a in enumerate(acc):
                a.zero_()
                for x, w in zip(xs, ws, strict=True):
                    a.add_(x[t], alpha=w)
                outs[t].copy_(a)

        def foreach(xs=xs, ws=ws):
            torch._foreach_zero_(acc)
            for x, w in zip(xs, ws, strict=True):
                torch._foreach_add_(acc, x, alpha=w)
            torch._foreach_copy_(outs, acc)

        def copy(xs=xs):
            torch._foreach_copy_(outs, xs[0])

        row = {"size": size, "k": k}
        for name, fn, nbytes in (
            ("fused", fused, (k + 1) * size),
            ("add_", add_chain, (k + 1) * size),
            ("foreach", foreach, (k + 1) * size),
            ("copy", copy, 2 * size),
        ):
            row[name] = nbytes / timer(device, fn, args.reps, args.warmup) / 1e9
        rows.append(row)
        print_row(row)
    return rows


HEADER = f"{'size':>9} {'k':>3} " + " ".join(f"{m + ' GB/s':>13}" for m in METHODS) + "  fused/copy"


def print_row(row: dict) -> None:
    cells = " ".join(f"{row[m]:13.1f}" for m in METHODS)
    print(f"{human(row['size']):>9} {row['k']:>3} {cells}  {row['fused'] / row['copy']:9.0%}")


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(1, len(ks), figsize=(4.5 * len(ks), 3.8), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks, strict=True):
        sub = [r for r in rows if r["k"] == k]
        sizes = [r["size"] for r in sub]
        for m in METHODS:
            style = "--" if m == "copy" else "-o"
            ax.plot(sizes, [r[m] for r in sub], style, label=m, markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [human(s) for s in sizes], rotation=45, fontsize=7)
        ax.set_title(f"k = {k}")
        ax.set_xlabel("bytes per input")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("effective GB/s")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def main(argv: list[str] | None = None) -> int:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=default_device, help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--sizes", type=parse_size, nargs="+",
                   default=[parse_size(f"{1 << i}MiB") for i in range(0, 13, 2)],
                   help="bytes per input: 1MiB 16MiB 4GiB ... (default 1MiB..4GiB)")  # fmt: skip
    p.add_argument("--tensors", type=int, default=1, help="tensors per input (uneven sizes)")
    p.add_argument("--backend", default="auto", choices=kernels.BACKENDS,
                   help="fused backend; triton on CPU needs TRITON_INTERPRET=1 (slow)")  # fmt: skip
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU: torch.set_num_threads (default: torch's)")
    p.add_argument("--plot", metavar="FILE.png", help="save a plot (matplotlib, Agg)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available; use --device cpu")
    if args.tensors < 1 or min(args.ks) < 1:
        p.error("--tensors and --ks must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    fused_backend = kernels.resolve_backend(args.backend, device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU x{torch.get_num_threads()} threads")  # fmt: skip
    title = (f"{name}: {args.dtype}, {args.tensors} tensor(s)/input, fused = {fused_backend}, "
             f"torch {torch.__version__}")  # fmt: skip
    print(title)
    print(HEADER)
    rows = []
    for size in args.sizes:
        rows += bench_size(args, device, size)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.plot and rows:
        plot(rows, args.plot, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
