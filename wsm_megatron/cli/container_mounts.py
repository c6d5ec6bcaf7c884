"""The folders a containerised job step needs, from a run's resolved configuration.

``launch/slurm.sbatch`` runs ``python -m wsm_megatron.cli.container_mounts --config RUN.yaml
[overrides]`` on the submit host (no torch import) when ``CONTAINER`` is set and
``CONTAINER_MOUNTS`` is not: it prints ``create PATH`` for each output folder to make first and
``mount PATH`` for each folder to mount at its own path (the working directory, outputs, data,
tokenizer and caches; nested folders collapsed into the outermost), or one
``slurm.sbatch: error: KEY: PATH ...`` line and status 2 for a missing input.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wsm_megatron.data.config import parse_blend
from wsm_megatron.training.config import WSMConfig, load_config
from wsm_megatron.training.config.corpus import default_cache_dir


@dataclass
class Mounts:
    """What a job step inside a container needs: folders to create, folders to mount."""

    creates: list[Path] = field(default_factory=list)
    needs: list[Path] = field(default_factory=list)

    def output(self, path: str | os.PathLike[str] | None) -> None:
        if path is not None:
            self.creates.append(_absolute(path))
            self.needs.append(_absolute(path))

    def input(self, key: str, path: str | os.PathLike[str], folder: Path | None = None) -> None:
        """``path`` must exist; ``folder`` (default: ``path``) is mounted."""
        where = _absolute(path)
        if not where.exists():
            raise ValueError(f"{key}: {where} does not exist (needed inside the container)")
        self.needs.append(folder or where)

    def outermost(self) -> list[Path]:
        """The folders to mount: deduplicated, each nested one left to its outermost."""
        top: list[Path] = []
        for path in sorted(set(self.needs)):
            if not top or not path.is_relative_to(top[-1]):
                top.append(path)
        for path in top:
            if path == Path(path.anchor) or any(c in str(path) for c in ",:"):
                raise ValueError(f"{path}: cannot be mounted (the root, or a ',' or ':' in it)")
        return top


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def container_mounts(config: WSMConfig) -> Mounts:
    """The working directory and every folder ``config`` reads or writes."""
    c, log, data = config.checkpoint, config.logging, config.data
    mounts = Mounts(needs=[_absolute(os.getcwd())])
    mounts.output(c.save)
    if c.save and log.wandb_mode != "disabled" and not log.wandb_dir:
        mounts.output(_absolute(c.save).parent)  # wandb's default folder
    if c.load is not None and c.load != c.save:
        mounts.input("checkpoint.load", c.load)
    for path in (config.merge.save_dir, log.wandb_dir, log.tensorboard_dir, data.cache_dir):
        mounts.output(path)
    if log.metrics_file:
        mounts.output(_absolute(log.metrics_file).parent)
    if config.corpus.name:  # data and tokenizer are built into the corpus cache
        mounts.output(config.corpus.cache_dir or default_cache_dir())
        return mounts
    for key in ("train_data", "valid_data", "anneal_data"):
        if getattr(data, key) is not None:
            for prefix in parse_blend(key, getattr(data, key))[0]:
                for suffix in (".bin", ".idx"):
                    mounts.input(f"data.{key}", f"{prefix}{suffix}", _absolute(prefix).parent)
    for key in ("tokenizer_model", "vocab_file", "merge_file"):
        if getattr(data, key) is not None:
            mounts.input(f"data.{key}", getattr(data, key), _absolute(getattr(data, key)).parent)
    return mounts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slurm.sbatch", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args, _ = p.parse_known_args(argv)  # wsm-train flags after the overrides are not ours
    try:
        mounts = container_mounts(load_config(args.config, args.overrides))
        top = mounts.outermost()
    except ValueError as err:
        print(f"slurm.sbatch: error: {err}", file=sys.stderr)
        return 2
    for path in mounts.creates:
        print("create", path)
    for path in top:
        print("mount", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
