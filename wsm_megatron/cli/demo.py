"""``wsm-demo``: WSM end to end on a CPU in minutes — train, merge, evaluate, compare, plot.

    wsm-demo --output runs/demo

1. builds the embedded corpus (Python's standard library source; cached),
2. trains ``configs/tiny-cpu.yaml`` with TP=2 over two gloo processes (torchrun) at a constant LR
   after warmup, saving a checkpoint every ``checkpoint.save_interval`` iterations; at every
   save the online merge forms the merged model of the newest ``merge.quantity`` checkpoints
   shard by shard and evaluates it beside the raw model on the same validation batches,
3. merges the newest checkpoints offline with ``wsm-merge`` and checks that its output is
   bitwise the last online merge (so its validation loss is the last merged loss),

then prints both losses, draws ``DIR/loss.png`` (the raw and merged validation curves over the
whole run) and writes ``DIR/results.json``. With ``--watch``, ``wsm-watch`` follows the
run from its own process while it trains (a sidecar at TP=1: each new checkpoint alone and its
merges of 2, 4 and ``merge.quantity`` checkpoints, linear and 1-sqrt), in ``DIR/watch/``.
Extra arguments are config overrides (``train.lr=1e-2``...). Every command it runs is printed
first, so each step can be repeated by hand.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "wsm-demo"
CONFIG = Path(str(importlib.resources.files("wsm_megatron.configs") / "tiny-cpu.yaml"))
OUTPUTS = (
    "checkpoints",
    "merged",
    "online-merged",
    "metrics.jsonl",
    "merge-report.json",
    "wandb",
    "results.json",
    "loss.png",
    "watch",
    "watch.log",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a tiny GPT at a constant LR on CPU (TP=2, gloo), merge its last "
        "checkpoints with wsm-merge and compare the validation loss of the newest checkpoint "
        "with that of the merged model.",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="where everything goes")
    p.add_argument("--config", default=str(CONFIG), metavar="YAML", help="default: tiny-cpu")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="corpus cache, built once (default: $XDG_CACHE_HOME/wsm-megatron, else "
        "~/.cache/wsm-megatron)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in DIR")
    p.add_argument(
        "--watch", action="store_true",
        help="also follow the run with wsm-watch as it trains (one more process, TP=1): its "
        "table per checkpoint in DIR/watch.log, its rows and plot in DIR/watch/",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    return p


_TYPED = {
    "torch.distributed.run": "torchrun",
    "wsm_megatron.cli.merge": "wsm-merge",
    "wsm_megatron.cli.watch": "wsm-watch",
}


def _typed(cmd: list[str]) -> str:
    """``cmd`` as a user would type it (``python -m torch.distributed.run`` is ``torchrun``)."""
    if cmd[1:2] == ["-m"] and cmd[2] in _TYPED:
        cmd = [_TYPED[cmd[2]], *cmd[3:]]
    return " ".join(cmd)


def _run(cmd: list[str], env: dict[str, str]) -> None:
    """Run ``cmd``, first printing it as a user would type it (torchrun, wsm-merge)."""
    print(f"+ {_typed(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=env)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in the background, its output in ``log`` (printed as typed, with ``&``)."""
    print(f"+ {_typed(cmd)} > {log} &", flush=True)
    with log.open("w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def watch_command(config_path: str, overrides: list[str], config: Any, out: Path) -> list[str]:
    """``wsm-watch`` beside the demo's training: one process at TP=1, until its last
    iteration; merges of 2, 4 and ``merge.quantity`` checkpoints, linear and 1-sqrt."""
    durations = sorted({n for n in (2, 4, config.merge_quantity) if n <= config.merge_quantity})
    return [
        sys.executable, "-m", "wsm_megatron.cli.watch", "--config", config_path, *overrides,
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
        "--durations", ",".join(map(str, durations)), "--schedules", "linear,minus-sqrt",
        "--until-iteration", str(config.train.train_iters), "--poll-seconds", "5",
        "--output", str(out / "watch"),
    ]  # fmt: skip


def _wait_watch(watcher: subprocess.Popen, out: Path) -> int:
    """Wait for the watcher to score the run's last checkpoints; its last table and summary."""
    status = watcher.wait()
    lines = (out / "watch.log").read_text().splitlines()
    if status != 0:
        print("\n".join(lines[-5:]), file=sys.stderr)
        print(f"{PROG}: error: wsm-watch failed (exit status {status})", file=sys.stderr)
        return status
    start = max(i for i, line in enumerate(lines) if "wsm-watch: iteration" in line)
    print("\n".join(lines[start:]), flush=True)
    return 0


def torchrun(nproc: int, args: list[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m wsm_megatron.cli.train ARGS``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "wsm_megatron.cli.train",
        *args,
    ]


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(iteration, loss)...], "valid": [...], "merged": [...]}`` from the run's
    JSON lines (``merged``: the online merge's validation loss at each merge point)."""
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "valid": [], "merged": []}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] in ("train", "valid") and "loss" in record:
            curves[record["kind"]].append((record["iteration"], record["loss"]))
        if record["kind"] == "valid" and "merged_loss" in record:
            curves["merged"].append((record["iteration"], record["merged_loss"]))
    return curves


def plot(path: Path, curves: dict[str, list[tuple[int, float]]], window: list[int]) -> None:
    """Training loss, the raw and the merged validation curves, and the last merge window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for kind, style, label in (
        ("train", dict(color="tab:blue", lw=1.0, alpha=0.6), "train loss (mean per log interval)"),
        ("valid", dict(color="tab:orange", marker="o", ms=3), "validation loss, newest checkpoint"),
        ("merged", dict(color="tab:green", marker="*", ms=6), "validation loss, online merge"),
    ):
        if curves[kind]:
            xs, ys = zip(*curves[kind], strict=True)
            ax.plot(xs, ys, label=label, **style)
    ax.axvspan(window[0], window[-1], color="tab:green", alpha=0.12, label="last merge window")
    first = curves["valid"][0][0] if curves["valid"] else 0
    values = [v for kind in curves.values() for i, v in kind if i >= first]
    low, high = min(values), max(values)
    margin = 0.08 * (high - low) + 0.02
    ax.set_ylim(low - margin, high + 3 * margin)  # the warmup's initial losses are off the top
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    if curves["valid"] and curves["merged"]:
        raw, merged = curves["valid"][-1][1], curves["merged"][-1][1]
        ax.set_title(
            f"WSM at constant LR: newest checkpoint {raw:.4f} vs merged {merged:.4f} "
            f"({len(window)} checkpoints)",
            fontsize=10,
        )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _merged_iterations(report: dict[str, Any]) -> list[int]:
    return [int(entry["iteration"]) for entry in report["jobs"][0]["inputs"]]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wsm_megatron.cli.train import _quiet_imports

    _quiet_imports()
    from wsm_megatron.training.config import ConfigError, load_config

    out = Path(args.output).resolve()
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not args.overwrite:
        print(
            f"{PROG}: error: {out} already holds a demo ({', '.join(existing)}); "
            "choose another --output or pass --overwrite",
            file=sys.stderr,
        )
        return 2
    overrides = [
        f"checkpoint.save={out / 'checkpoints'}",
        f"logging.metrics_file={out / 'metrics.jsonl'}",
        f"logging.wandb_dir={out}",
        *([f"corpus.cache_dir={Path(args.cache_dir).expanduser()}"] if args.cache_dir else []),
        "merge.online=true",
        f"merge.save_dir={out / 'online-merged'}",
        *args.overrides,
    ]
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.overwrite:
        import shutil

        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _demo(args, config, out, overrides)
    except subprocess.CalledProcessError as err:
        print(f"{PROG}: error: a step failed (exit status {err.returncode})", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace, config: Any, out: Path, overrides: list[str]) -> int:
    from wsm_megatron.layout import iteration_dir
    from wsm_megatron.merge.readback import bitwise_differences
    from wsm_megatron.training.config import resolve_corpus

    ckpts, merged = out / "checkpoints", out / "merged"
    quantity = config.merge_quantity
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nproc = (
        config.parallel.tensor_model_parallel_size * config.parallel.pipeline_model_parallel_size
    )
    start = time.perf_counter()
    timings: dict[str, float] = {}

    print(f"[1/3] corpus: Python {sys.version.split()[0]} standard library", flush=True)
    resolve_corpus(config)
    timings["corpus_s"] = time.perf_counter() - start

    t, c = config.train, config.checkpoint
    interval = (
        f"{c.save_interval} iterations"
        if c.save_interval is not None
        else f"{c.save_interval_tokens} tokens"
    )
    print(
        f"[2/3] training {args.config} on {nproc} CPU processes: {t.train_iters} iterations at "
        f"constant LR {t.lr:g} after {t.lr_warmup_iters} warmup, a checkpoint every {interval}, "
        f"an online merge of the newest {quantity} at every save",
        flush=True,
    )
    step = time.perf_counter()
    watcher = None
    if args.watch:
        watcher = _start(watch_command(args.config, overrides, config, out), env, out / "watch.log")
    try:
        _run(torchrun(nproc, ["--config", args.config, *overrides]), env)
    except BaseException:
        if watcher is not None:
            watcher.kill()
        raise
    timings["train_s"] = time.perf_counter() - step
    if watcher is not None and _wait_watch(watcher, out) != 0:
        return 1

    print(
        f"[3/3] wsm-merge of the newest {quantity} checkpoints ({config.merge.schedule}), "
        "checked against the last online merge",
        flush=True,
    )
    step = time.perf_counter()
    report_path = out / "merge-report.json"
    _run(
        [
            sys.executable,
            "-m",
            "wsm_megatron.cli.merge",
            "--input",
            str(ckpts),
            "--output",
            str(merged),
            "--last",
            str(quantity),
            "--schedule",
            config.merge.schedule,
            "--report",
            str(report_path),
            "--no-progress",
        ],
        env,
    )
    window = _merged_iterations(json.loads(report_path.read_text()))
    compared, differ = bitwise_differences(
        iteration_dir(merged, window[-1]), iteration_dir(out / "online-merged", window[-1])
    )
    timings["merge_s"] = time.perf_counter() - step
    if differ:
        print(f"{PROG}: error: wsm-merge and the online merge differ in {differ}", file=sys.stderr)
        return 1

    curves = read_metrics(out / "metrics.jsonl")
    plot(out / "loss.png", curves, window)
    timings["total_s"] = time.perf_counter() - start
    (last_it, last_val), (merged_it, merged_val) = curves["valid"][-1], curves["merged"][-1]
    assert last_it == merged_it == window[-1], (last_it, merged_it, window)
    gain = last_val - merged_val
    results = {
        "last_val_loss": last_val,
        "merged_val_loss": merged_val,
        "merge_gain": gain,
        "last_iteration": last_it,
        "merged_iterations": window,
        "merge_schedule": config.merge.schedule,
        "offline_equals_online": {"tensors": compared, "bitwise_equal": True},
        "valid_curve": curves["valid"],
        "merged_curve": curves["merged"],
        "lr": t.lr,
        "lr_schedule": t.lr_schedule,
        "train_iters": t.train_iters,
        "tokens": t.train_iters * config.tokens_per_iteration,
        "validation_tokens": t.eval_iters * config.tokens_per_iteration,
        "checkpoints": str(ckpts),
        "merged": str(merged),
        "plot": str(out / "loss.png"),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    if args.watch:
        watch = {"rows": out / "watch" / "watch.jsonl", "plot": out / "watch" / "watch.png"}
        results["watch"] = {k: str(v) for k, v in watch.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"\nwsm-merge output {iteration_dir(merged, window[-1])} is bitwise the online merge "
        f"at iteration {window[-1]} ({compared} tensors)\n"
        f"newest checkpoint (iteration {last_it}): validation loss {last_val:.4f}\n"
        f"merged {len(window)} checkpoints ({window[0]}...{window[-1]}, "
        f"{config.merge.schedule}): validation loss {merged_val:.4f}\n"
        f"merge gain: {gain:+.4f} nats/token ({'better' if gain > 0 else 'not better'}); "
        f"online merges at {len(curves['merged'])} saves, curves in {out / 'loss.png'}\n"
        f"wrote {out / 'results.json'} in {timings['total_s'] / 60:.1f} min",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
