"""Benchmark wsm-train: iterations per second of a config, for one or more source trees.

    python tools/bench_train.py --iters 40 --repeats 2 --tree base=/tmp/wsm-base --tree new=.

Runs ``torchrun -m wsm_megatron.cli.train`` (``--nproc`` processes, default 2) on each tree's
``configs/<config>.yaml`` with ``PYTHONPATH`` set to that tree, ``--iters`` iterations, no
checkpoints, evaluations or online merge; the trees take turns, ``--repeats`` times, so a change
in the machine's load hits them alike. A run's speed is its iterations after the first log
interval over their time (the trainer's ``iter_per_s`` windows, JSON lines); printed per run
with the load average, then the median per tree, the ratio to the first tree, and whether the
trees' logged losses are the same bits.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--config", default="tiny-cpu")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    args = p.parse_args()
    if args.iters < 2 * args.log_interval:
        p.error("--iters must be at least 2 x --log-interval (the first window is warm-up)")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tree: Path, args: argparse.Namespace, workdir: Path) -> tuple[float, list[float]]:
    """One training run: (iterations per second after the first window, logged losses)."""
    metrics = workdir / "metrics.jsonl"
    overrides = [
        f"train.train_iters={args.iters}",
        f"train.lr_warmup_iters={args.iters // 4}",
        "train.eval_interval=null",
        "checkpoint.save=null",
        "checkpoint.save_interval=null",
        "merge.online=false",
        f"logging.log_interval={args.log_interval}",
        f"logging.metrics_file={metrics}",
        "logging.wandb_mode=disabled",
        *args.overrides,
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={args.nproc}",
        f"--master-port={_free_port()}",
        "-m",
        "wsm_megatron.cli.train",
        "--config",
        str(tree / "configs" / f"{args.config}.yaml"),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_train.py: {tree}: wsm-train failed:\n{done.stdout}\n{done.stderr}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    windows = train[1:]  # the first window holds the start-up
    seconds = sum(args.log_interval / r["iter_per_s"] for r in windows)
    return args.log_interval * len(windows) / seconds, [r["loss"] for r in train]


def main() -> int:
    args = _parse()
    trees = dict(item.split("=", 1) for item in args.tree)
    speeds: dict[str, list[float]] = {name: [] for name in trees}
    losses: dict[str, list[float]] = {}
    print(f"{args.config}, {args.nproc} processes, {args.iters} iterations per run", flush=True)
    for repeat in range(args.repeats):
        for name, path in trees.items():
            with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
                before = os.getloadavg()[0]
                speed, loss = _run(Path(path).resolve(), args, Path(tmp))
            speeds[name].append(speed)
            losses.setdefault(name, loss)
            print(
                f"  run {repeat + 1} {name}: {speed:.3f} it/s (load {before:.2f} -> "
                f"{os.getloadavg()[0]:.2f})",
                flush=True,
            )
    first = next(iter(trees))
    base = statistics.median(speeds[first])
    for name in trees:
        median = statistics.median(speeds[name])
        same = "same losses" if losses[name] == losses[first] else "DIFFERENT losses"
        print(f"{name}: median {median:.3f} it/s, {median / base:.3f}x {first} ({same})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
