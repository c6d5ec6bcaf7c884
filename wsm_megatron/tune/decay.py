"""``wsm-tune --decay-reference STYLE,...``: real LR decays beside the merges they stand in for.

For each merge duration, a branch of the run is trained from the oldest checkpoint of the
duration's window (interval 1) with a WSD decay over the window's span — the ``D`` iterations
that the merge's emulated schedule covers (:func:`wsm_megatron.theory.decay_times`: from the
oldest checkpoint to one average spacing past the newest) — and scored with the merges' scorer.
The branch is ``wsm-train`` resumed from that checkpoint (``checkpoint.load`` = the run's
checkpoints, ``checkpoint.load_iteration`` = the window's start) with ``train.lr_schedule=wsd``,
``train.train_iters`` = start + D and ``train.lr_wsd_decay_iters`` = D
(:mod:`wsm_megatron.training.schedules`): the model, optimizer state, RNG and data position
(consumed samples) of the checkpoint, so the same data order as the run, and the LR reaching
``train.min_lr`` after the last update. It saves into its own folder under ``--output``
(``OUTPUT/decay/<duration>-<style>/``), never into the run's checkpoints; a finished branch is
reused when ``wsm-tune`` runs again.

Cost: a decay reference is **real training** of D iterations at the run's layout — a window of
10% of a run costs 10% of the run's training, per style and per duration. Proxy runs only.

Data order: Megatron's shuffle depends on the number of epochs the sample count needs, so the
branch reads the run's samples when its ``start + D`` iterations fit the same number of epochs of
the blend as the run's ``train.train_iters`` (always, for a corpus that is not repeated).
"""

from __future__ import annotations

import gc
import json
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsm_megatron.layout import is_complete, iteration_dir, list_iterations
from wsm_megatron.merge.dcp_format import read_metadata
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.selection import Selected, load_common_state
from wsm_megatron.theory import MergeWeightsError, canonical_schedule
from wsm_megatron.training.config import ConfigError, WSMConfig

DECAY_STYLES: dict[str, str] = {
    "linear": "linear",
    "cosine": "cosine",
    "exponential": "exponential",
    "minus-sqrt": "minus_sqrt",
}
"""Canonical schedule name (:mod:`wsm_megatron.theory`, aliases ``1-sqrt``/``minus_sqrt``) ->
megatron-core's ``lr_wsd_decay_style``."""
BRANCH_FILENAME = "wsm_tune_branch.json"
"""In a branch's folder: what it is (source, start, length, style) and, once trained, its
outcome; a folder under ``OUTPUT/decay`` without it is not wsm-tune's and is never removed."""
DECAY_DIR = "decay"


class DecayStopped(MergeError):
    """A branch stopped on a signal or the time budget (its checkpoint saved)."""


def decay_style(name: str) -> str:
    """The canonical name of a ``--decay-reference`` style, or one line naming the valid ones."""
    valid = "linear, cosine, exponential, 1-sqrt (= minus-sqrt, Megatron's minus_sqrt)"
    try:
        key = canonical_schedule(name)
    except MergeWeightsError:
        key = None
    if key not in DECAY_STYLES:
        raise MergeError(f"--decay-reference: unknown decay style {name!r}; valid: {valid}")
    return key


@dataclass(frozen=True)
class DecayReference:
    """One real decay: trained from ``start_iteration`` over ``decay_iters`` iterations."""

    name: str
    """``decay:<duration>:<style>``, e.g. ``decay:4:minus-sqrt`` beside ``4:minus-sqrt``."""
    duration: str
    style: str
    start_iteration: int
    decay_iters: int
    span: int
    """The duration's window span (position units, tokens), as its merges' ``span``."""
    window: tuple[int, ...]
    """The duration's checkpoints at interval 1 (the window the decay stands beside)."""
    folder: Path
    kind: str = "decay"

    @property
    def end_iteration(self) -> int:
        return self.start_iteration + self.decay_iters

    @property
    def megatron_style(self) -> str:
        return DECAY_STYLES[self.style]

    def spec(self, root: Path) -> dict[str, Any]:
        return {
            "source": str(root.resolve()),
            "start_iteration": self.start_iteration,
            "decay_iters": self.decay_iters,
            "end_iteration": self.end_iteration,
            "lr_wsd_decay_style": self.megatron_style,
        }


@dataclass
class DecayRun:
    """What training a branch left: its LR after the last update, per-iteration training
    losses and LRs (those applied), and whether an earlier ``wsm-tune`` had trained it."""

    final_lr: float
    losses: dict[int, float] = field(default_factory=dict)
    lrs: dict[int, float] = field(default_factory=dict)
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "final_lr": self.final_lr,
            "losses": {str(k): v for k, v in self.losses.items()},
            "lrs": {str(k): v for k, v in self.lrs.items()},
            "reused": self.reused,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecayRun:
        return cls(
            float(data["final_lr"]),
            {int(k): float(v) for k, v in data.get("losses", {}).items()},
            {int(k): float(v) for k, v in data.get("lrs", {}).items()},
            reused=True,
        )


def _decay_iters(window: Selected, duration: str) -> int:
    """The window's span in iterations, ``(i_last - i_first) n / (n - 1)`` (the merge's
    emulated decay ends one average spacing past the newest checkpoint)."""
    its, n = window.iterations, len(window.iterations)
    iters = round((its[-1] - its[0]) * n / (n - 1))
    if iters < 1:
        raise MergeError(f"--decay-reference: the window of duration {duration} spans no iteration")
    return iters


def plan_decays(
    root: Path,
    windows: Sequence[tuple[str, Selected]],
    styles: Sequence[str],
    output: Path,
    config: WSMConfig,
) -> tuple[DecayReference, ...]:
    """One reference per duration x style, checked before any model is built: a run at a
    constant LR (``wsm``), a start checkpoint that is complete and holds optimizer state, an
    ``--output`` apart from the checkpoints, and a branch configuration that validates."""
    if not styles:
        return ()
    if config.train.lr_schedule != "wsm":
        raise MergeError(
            f"--decay-reference: the run's train.lr_schedule is {config.train.lr_schedule!r}; a "
            "decay reference branches from a constant-LR checkpoint (lr_schedule wsm)"
        )
    out, ckpts = output.resolve(), root.resolve()
    if out == ckpts or out.is_relative_to(ckpts) or ckpts.is_relative_to(out):
        raise MergeError(
            f"--decay-reference: --output {output} and --checkpoints {root} overlap; the "
            "branches are trained under --output, apart from the run's checkpoints"
        )
    refs: list[DecayReference] = []
    for duration, window in windows:
        start, span = window.iterations[0], _span(window)
        _check_start(root, start, duration, config)
        iters = _decay_iters(window, duration)
        for style in dict.fromkeys(decay_style(s) for s in styles):
            folder = output / DECAY_DIR / f"{duration}-{style}"
            ref = DecayReference(
                f"decay:{duration}:{style}",
                duration,
                style,
                start,
                iters,
                span,
                window.iterations,
                folder,
            )
            _check_folder(ref)
            try:
                branch_config(config, ref, root)
            except ConfigError as err:
                flag = f"--decay-reference {ref.name}"
                raise MergeError(f"{flag}: the branch's config: {err}") from None
            refs.append(ref)
    return tuple(refs)


def _span(window: Selected) -> int:
    p, n = window.positions, len(window.positions)
    return (p[-1] - p[0]) * n // (n - 1)


def _check_start(root: Path, start: int, duration: str, config: WSMConfig) -> None:
    ckpt_dir = iteration_dir(root, start)
    flag = f"--decay-reference: the window of duration {duration} starts at {ckpt_dir}"
    if not is_complete(root, start):
        raise MergeError(f"{flag}, which is missing or incomplete")
    common = load_common_state(ckpt_dir)
    args = common.get("args")
    keys = read_metadata(ckpt_dir).state_dict_metadata
    has_optimizer = any(k.startswith("optimizer.") for k in keys)
    if (
        "opt_param_scheduler" not in common
        or getattr(args, "no_save_optim", False)
        or not has_optimizer
    ):
        raise MergeError(
            f"{flag}, which has no optimizer state (saved with --no-save-optim, or a merged "
            "checkpoint); a decay branch resumes the optimizer"
        )


def _check_folder(ref: DecayReference) -> None:
    if ref.folder.exists() and not (ref.folder / BRANCH_FILENAME).is_file():
        if ref.folder.is_dir() and not any(ref.folder.iterdir()):
            return
        raise MergeError(
            f"--decay-reference {ref.name}: {ref.folder} exists and is not a wsm-tune branch "
            f"(no {BRANCH_FILENAME}); remove it or choose another --output"
        )


def _value(value: Any) -> str:
    """An override's value that YAML reads back as ``value``."""
    if value is None or isinstance(value, bool):
        text = "null" if value is None else str(value).lower()
    else:
        text = str(value)
    return text if yaml.safe_load(text) == value else json.dumps(value)


def branch_overrides(
    config: WSMConfig, ref: DecayReference, root: Path, *, resume: bool = False
) -> list[str]:
    """The ``section.key=value`` overrides that make the run's config this branch: the
    ``wsm-train`` run that a reference is. ``resume``: from the branch's own stop save."""
    folder = ref.folder
    items: dict[str, Any] = {
        "train.train_iters": ref.end_iteration,
        "train.lr_schedule": "wsd",
        "train.lr_decay_iters": None,
        "train.lr_wsd_decay_iters": ref.decay_iters,
        "train.lr_wsd_decay_style": ref.megatron_style,
        "train.eval_interval": None,  # wsm-tune scores the end
        "checkpoint.save": str(folder),
        "checkpoint.load": None if resume else str(root),
        "checkpoint.load_iteration": None if resume else ref.start_iteration,
        "checkpoint.save_interval": None,
        "checkpoint.save_interval_tokens": None,
        "checkpoint.keep_every": None,
        "checkpoint.prune": False,
        "checkpoint.no_load_optim": False,
        "checkpoint.no_load_rng": False,
        "checkpoint.finetune": False,
        "merge.online": False,
        "merge.save_dir": None,
        "merge.keep_last": None,
        "merge.keep_every": None,
        "merge.quantity": None,
        "merge.window": None,
        "logging.wandb_dir": str(folder),
    }
    lg = config.logging
    if lg.metrics_file is not None:
        items["logging.metrics_file"] = str(folder / "metrics.jsonl")
    if lg.tensorboard_dir is not None:
        items["logging.tensorboard_dir"] = str(folder / "tensorboard")
    if lg.wandb_name is not None:
        items["logging.wandb_name"] = f"{lg.wandb_name}-{ref.name.replace(':', '-')}"
    return [f"{key}={_value(value)}" for key, value in items.items()]


def branch_config(
    config: WSMConfig, ref: DecayReference, root: Path, *, resume: bool = False
) -> WSMConfig:
    from wsm_megatron.training.config.loading import apply_overrides, config_from_dict

    overrides = branch_overrides(config, ref, root, resume=resume)
    return config_from_dict(apply_overrides(config.to_dict(), overrides))


def _read_branch(ref: DecayReference) -> dict[str, Any] | None:
    try:
        return json.loads((ref.folder / BRANCH_FILENAME).read_text())
    except (OSError, ValueError):
        return None


def _prepare(ref: DecayReference, root: Path) -> tuple[str, dict[str, Any] | None]:
    """On rank 0: ``reuse`` a finished branch of the same spec, ``resume`` its stop save, or
    ``train`` it afresh in a cleared folder (only wsm-tune's own, :func:`_check_folder`)."""
    info = _read_branch(ref)
    if info is not None and info.get("spec") == ref.spec(root):
        if info.get("run") is not None and is_complete(ref.folder, ref.end_iteration):
            return "reuse", info["run"]
        saved = [it for it in list_iterations(ref.folder) if is_complete(ref.folder, it)]
        if saved and ref.start_iteration < saved[-1] < ref.end_iteration:
            return "resume", None
    if ref.folder.exists():
        _check_folder(ref)
        shutil.rmtree(ref.folder)
    ref.folder.mkdir(parents=True)
    text = json.dumps({"spec": ref.spec(root), "run": None}, indent=1) + "\n"
    (ref.folder / BRANCH_FILENAME).write_text(text)
    return "train", None


def train_decays(
    config: WSMConfig, refs: Sequence[DecayReference], root: Path, *, is_main: bool
) -> dict[str, DecayRun]:
    """Train (or reuse) every reference, in every process of the launch; rank 0 records each
    outcome in its folder. A branch stopped by a signal or the time budget saves its
    checkpoint and raises :class:`DecayStopped`: running ``wsm-tune`` again resumes it."""
    import torch
    import torch.distributed as dist

    from wsm_megatron.runtime import decided_on_rank0
    from wsm_megatron.training.trainer import pretrain

    runs: dict[str, DecayRun] = {}
    for ref in refs:
        action, previous = decided_on_rank0(lambda ref=ref: _prepare(ref, root))
        if action == "reuse":
            assert previous is not None
            runs[ref.name] = DecayRun.from_json(previous)
            if is_main:
                print(f"wsm-tune: {ref.name}: reusing the trained branch in {ref.folder}")
            continue
        overrides = branch_overrides(config, ref, root, resume=action == "resume")
        if is_main:
            print(
                f"wsm-tune: {ref.name}: training a {ref.style} decay of {ref.decay_iters} "
                f"iterations from iteration {ref.start_iteration} into {ref.folder} (real "
                f"training; = wsm-train --config RUN.yaml [run overrides] "
                + " ".join(shlex.quote(o) for o in overrides)
                + ")"
            )
        result = pretrain(branch_config(config, ref, root, resume=action == "resume"))
        if result.stopped is not None:
            raise DecayStopped(
                f"--decay-reference {ref.name}: stopped at iteration {result.progress.iteration} "
                f"({result.stopped}) with its checkpoint saved in {ref.folder}; run wsm-tune "
                "again to resume it"
            )
        assert result.state is not None
        run = DecayRun(
            float(result.state.optimizer.param_groups[0]["lr"]),
            dict(result.losses),
            dict(result.lrs),
        )
        runs[ref.name] = run
        del result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if dist.get_rank() == 0:
            text = json.dumps({"spec": ref.spec(root), "run": run.to_json()}, indent=1) + "\n"
            tmp = ref.folder / f".{BRANCH_FILENAME}.tmp"
            tmp.write_text(text)
            tmp.replace(ref.folder / BRANCH_FILENAME)
        dist.barrier()
    return runs
