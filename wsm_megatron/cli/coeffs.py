"""``wsm-coeffs``: print WSM merge coefficients and the LR decay they emulate (Theorem 3.1).

Examples::

    wsm-coeffs --schedule minus-sqrt --num-checkpoints 4
    wsm-coeffs --schedule linear --positions 1000,1100,1200,1400 --json
    wsm-coeffs --weights 0.25,0.25,0.25,0.25 --plot mean.png

Errors (bad flag values) exit with status 2 and one ``wsm-coeffs: error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import NoReturn

from wsm_megatron.cli.arguments import comma_separated, number
from wsm_megatron.theory import (
    ALIASES,
    SCHEDULES,
    MergeWeights,
    MergeWeightsConfig,
    MergeWeightsError,
    window_span,
)

PROG = "wsm-coeffs"

_FLAGS = {
    "schedule": "--schedule",
    "num_checkpoints": "--num-checkpoints",
    "decay": "--decay",
    "weights": "--weights",
    "min_lr_ratio": "--min-lr-ratio",
    "ema_beta": "--ema-beta",
    "positions": "--positions",
}


_number_list = comma_separated(number, "numbers")


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join([*SCHEDULES, *ALIASES])
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="WSM merge coefficients (oldest checkpoint first) and the LR decay they "
        "emulate: merging checkpoints with c_i applies the fraction w_i of the peak LR to the "
        "update ending at checkpoint i (Theorem 3.1 of arXiv 2507.17634).",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--schedule", help=f"emulated decay schedule: {names}")
    src.add_argument(
        "--decay",
        type=_number_list,
        metavar="W1,...",
        help="custom decay factors w_1..w_{n-1} (non-increasing, in [0, 1]); sets n",
    )
    src.add_argument(
        "--weights",
        type=_number_list,
        metavar="C0,...",
        help="raw merge coefficients c_0..c_{n-1}, oldest first (>= 0, sum 1)",
    )
    parser.add_argument(
        "--num-checkpoints",
        type=int,
        metavar="N",
        help="number of checkpoints merged (with --schedule; implied by --positions)",
    )
    parser.add_argument(
        "--min-lr-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="LR floor as a fraction of peak: w = R + (1 - R) f (default 0)",
    )
    parser.add_argument(
        "--ema-beta",
        type=float,
        metavar="B",
        help="EMA factor per checkpoint, per average spacing with irregular --positions "
        "(default: decay 0.1 over the window, i.e. 0.1^(1/n) per checkpoint)",
    )
    parser.add_argument(
        "--positions",
        type=_number_list,
        metavar="P0,...",
        help="checkpoint iterations or tokens, oldest first (irregular spacing allowed)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write a PNG of the emulated and continuous schedule"
    )
    return parser


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def format_table(mw: MergeWeights, positions: Sequence[float] | None, title: str) -> str:
    """Human-readable table: index, position, coefficient, emulated LR (w_i)."""
    n = mw.num_checkpoints
    pos = [str(p) for p in positions] if positions is not None else None
    pos_w = max(8, *(len(p) for p in pos)) if pos is not None else 0
    lr = ["—"] + [f"{w:.6f}" for w in mw.decay]
    lines = [
        f"# {title}, {n} checkpoints, oldest first",
        "# emulated LR = w_i, fraction of peak LR on the update from checkpoint i-1 to i",
        "    i" + (f"  {'position':>{pos_w}}" if pos else "") + "  coefficient  emulated LR",
    ]
    for i in range(n):
        row = f"{i:>5}" + (f"  {pos[i]:>{pos_w}}" if pos else "")
        lines.append(row + f"  {mw.coefficients[i]:>11.6f}  {lr[i]:>11}")
    total = sum(mw.coefficients)
    lines.append("  sum" + (" " * (pos_w + 2) if pos else "") + f"  {total:>11.6f}")
    return "\n".join(lines)


def write_plot(path: str, cfg: MergeWeightsConfig, mw: MergeWeights, title: str) -> None:
    """Step plot of the emulated LR next to the continuous f(t) and the coefficients; the PNG
    is written to a temp file in the same directory, then moved into place (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = mw.num_checkpoints
    if cfg.positions is not None:
        x = [float(p) for p in cfg.positions]
        xlabel = "position (iterations or tokens)"
    else:
        x = [float(i) for i in range(n)]
        xlabel = "checkpoint index (units of the save interval)"
    span = window_span(n, cfg.positions)

    fig, (ax_lr, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    ax_lr.stairs(mw.decay, x, baseline=None, lw=2, label="emulated LR (merge), piecewise const.")
    f = cfg.continuous_schedule()
    if f is not None:
        ts = [k / 400 for k in range(401)]
        ax_lr.plot([x[0] + t * span for t in ts], [f(t) for t in ts], "--", label="f(t)")
    for xi in x:
        ax_lr.axvline(xi, color="0.85", lw=0.8, zorder=0)
    ax_lr.set(xlabel=xlabel, ylabel="fraction of peak LR", ylim=(0, 1.05), title=title)
    ax_lr.legend(loc="best", fontsize=8)
    ax_c.bar(range(n), mw.coefficients)
    ax_c.set_xticks(range(n))
    ax_c.set(xlabel="checkpoint (0 = oldest)", ylabel="merge coefficient c_i", title="weights")
    fig.tight_layout()

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".wsm-coeffs-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0, or raises ``SystemExit(2)`` on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        _fail(f"argument --plot: directory of {args.plot!r} does not exist")
    try:
        cfg = MergeWeightsConfig(
            schedule=args.schedule,
            num_checkpoints=args.num_checkpoints,
            decay=args.decay,
            weights=args.weights,
            min_lr_ratio=args.min_lr_ratio,
            ema_beta=args.ema_beta,
            positions=args.positions,
        )
        mw = cfg.resolve()
    except MergeWeightsError as e:
        _fail(f"argument {_FLAGS[e.param]}: {e}")
    except ValueError as e:
        _fail(str(e))

    if cfg.schedule is not None:
        title = f"schedule {cfg.schedule}"
    else:
        title = "custom decay" if cfg.decay is not None else "raw weights"
    if args.min_lr_ratio:
        title += f", min LR ratio {args.min_lr_ratio:g}"
    if args.json:
        out = {
            "coefficients": list(mw.coefficients),
            "decay": list(mw.decay),
            "schedule": cfg.schedule,
            "num_checkpoints": mw.num_checkpoints,
            "positions": list(cfg.positions) if cfg.positions is not None else None,
        }
        print(json.dumps(out))
    else:
        print(format_table(mw, cfg.positions, f"WSM merge: {title}"))
    if args.plot is not None:
        write_plot(args.plot, cfg, mw, title)
        if not args.json:
            print(f"# plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
