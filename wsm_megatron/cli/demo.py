"""``wsm-demo``: WSM end to end on a CPU in minutes — train, merge, evaluate, compare, plot.

    wsm-demo --output runs/demo

1. builds the embedded corpus (Python's standard library source; cached),
2. trains ``configs/tiny-cpu.yaml`` with TP=2 over two gloo processes (torchrun) at a constant LR
   after warmup, saving a checkpoint every ``checkpoint.save_interval`` iterations,
3. merges the newest ``merge.quantity`` checkpoints with ``wsm-merge``,
4. evaluates the newest checkpoint and the merged model on the same validation batches,

then prints both losses, draws ``DIR/loss.png`` and writes ``DIR/results.json``. Extra arguments
are config overrides (``train.lr=1e-2``...). Every command it runs is printed first, so each step
can be repeated by hand.
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
    "metrics.jsonl",
    "eval.json",
    "merge-report.json",
    "wandb",
    "results.json",
    "loss.png",
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
        default="~/.cache/wsm-megatron",
        metavar="DIR",
        help="corpus cache (built once)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in DIR")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    return p


def _run(cmd: list[str], env: dict[str, str]) -> None:
    """Run ``cmd``, first printing it as a user would type it (torchrun, wsm-merge)."""
    shown = cmd
    if cmd[1:3] == ["-m", "torch.distributed.run"]:
        shown = ["torchrun", *cmd[3:]]
    elif cmd[1:3] == ["-m", "wsm_megatron.cli.merge"]:
        shown = ["wsm-merge", *cmd[3:]]
    print("+ " + " ".join(shown), flush=True)
    subprocess.run(cmd, check=True, env=env)


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
    """``{"train": [(iteration, loss)...], "valid": [...]}`` from the run's JSON lines."""
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "valid": []}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] in curves:
            curves[record["kind"]].append((record["iteration"], record["loss"]))
    return curves


def plot(
    path: Path,
    curves: dict[str, list[tuple[int, float]]],
    merged_iterations: list[int],
    last_val: float,
    merged_val: float,
) -> None:
    """The loss curve with validation points, the merge window and the merged model's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for kind, style, label in (
        ("train", dict(color="tab:blue", lw=1.2), "train loss (mean per log interval)"),
        ("valid", dict(color="tab:orange", marker="o", ms=4), "validation loss"),
    ):
        if curves[kind]:
            xs, ys = zip(*curves[kind], strict=True)
            ax.plot(xs, ys, label=label, **style)
    newest = merged_iterations[-1]
    ax.axvspan(
        merged_iterations[0], newest, color="tab:green", alpha=0.12, label="merged checkpoints"
    )
    ax.plot([newest], [last_val], "s", color="tab:orange", ms=8)
    ax.plot(
        [newest], [merged_val], "*", color="tab:green", ms=16, label=f"merged: {merged_val:.4f}"
    )
    ax.axhline(merged_val, color="tab:green", ls="--", lw=0.8)
    first = curves["valid"][0][0] if curves["valid"] else 0
    values = [v for i, v in curves["train"] + curves["valid"] if i >= first]
    values += [last_val, merged_val]
    low, high = min(values), max(values)
    margin = 0.08 * (high - low) + 0.02
    ax.set_ylim(low - margin, high + 3 * margin)  # the warmup's initial losses are off the top
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(
        f"WSM at constant LR: newest checkpoint {last_val:.4f} vs merged {merged_val:.4f} "
        f"({len(merged_iterations)} checkpoints)",
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
        f"corpus.cache_dir={Path(args.cache_dir).expanduser()}",
        *args.overrides,
    ]
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    quantity = config.merge_quantity
    if quantity is None or quantity < 2:
        print(f"{PROG}: error: merge.quantity: the demo merges >= 2 checkpoints", file=sys.stderr)
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
    from wsm_megatron.training.config import resolve_corpus

    ckpts, merged = out / "checkpoints", out / "merged"
    quantity = config.merge_quantity
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nproc = (
        config.parallel.tensor_model_parallel_size * config.parallel.pipeline_model_parallel_size
    )
    start = time.perf_counter()
    timings: dict[str, float] = {}

    print(f"[1/4] corpus: Python {sys.version.split()[0]} standard library", flush=True)
    resolve_corpus(config)
    timings["corpus_s"] = time.perf_counter() - start

    t, c = config.train, config.checkpoint
    interval = (
        f"{c.save_interval} iterations"
        if c.save_interval is not None
        else f"{c.save_interval_tokens} tokens"
    )
    print(
        f"[2/4] training {args.config} on {nproc} CPU processes: {t.train_iters} iterations at "
        f"constant LR {t.lr:g} after {t.lr_warmup_iters} warmup, a checkpoint every {interval}",
        flush=True,
    )
    step = time.perf_counter()
    _run(torchrun(nproc, ["--config", args.config, *overrides]), env)
    timings["train_s"] = time.perf_counter() - step

    print(f"[3/4] merging the newest {quantity} checkpoints ({config.merge.schedule})", flush=True)
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
    timings["merge_s"] = time.perf_counter() - step
    merged_iterations = _merged_iterations(json.loads(report_path.read_text()))

    print("[4/4] validation loss of the newest checkpoint and of the merged model", flush=True)
    step = time.perf_counter()
    eval_path = out / "eval.json"
    evaluate_args = ["--evaluate", str(ckpts), str(merged), "--eval-output", str(eval_path)]
    _run(torchrun(nproc, ["--config", args.config, *overrides, *evaluate_args]), env)
    timings["eval_s"] = time.perf_counter() - step
    evaluated = json.loads(eval_path.read_text())
    last, merged_result = evaluated[str(ckpts)], evaluated[str(merged)]

    curves = read_metrics(out / "metrics.jsonl")
    plot(out / "loss.png", curves, merged_iterations, last["val_loss"], merged_result["val_loss"])
    timings["total_s"] = time.perf_counter() - start
    gain = last["val_loss"] - merged_result["val_loss"]
    results = {
        "last_val_loss": last["val_loss"],
        "merged_val_loss": merged_result["val_loss"],
        "merge_gain": gain,
        "last_iteration": last["iteration"],
        "merged_iterations": merged_iterations,
        "merge_schedule": config.merge.schedule,
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
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"\nnewest checkpoint (iteration {last['iteration']}): validation loss "
        f"{last['val_loss']:.4f}\n"
        f"merged {len(merged_iterations)} checkpoints ({merged_iterations[0]}..."
        f"{merged_iterations[-1]}, {config.merge.schedule}): validation loss "
        f"{merged_result['val_loss']:.4f}\n"
        f"merge gain: {gain:+.4f} nats/token ({'better' if gain > 0 else 'not better'})\n"
        f"wrote {out / 'results.json'} and {out / 'loss.png'} in "
        f"{timings['total_s'] / 60:.1f} min",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
