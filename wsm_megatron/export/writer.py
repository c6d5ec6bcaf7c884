"""Writing the model folder atomically: everything goes into a hidden sibling folder, each file
fsynced, and the folder is renamed into place last, so an interrupted export (even ``kill -9``)
leaves no output folder; the next export removes what a dead one left behind.

Weights go into safetensors shards of at most ``shard_bytes``: ``model.safetensors`` when one
is enough, else ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from wsm_megatron.atomic import fsync_path
from wsm_megatron.export.config import ExportError

TMP_MARK = ".wsm-export-tmp-"
INDEX_FILENAME = "model.safetensors.index.json"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_json(path: Path, data: Any) -> None:
    """A small JSON file, fsynced."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def refuse_existing(output: Path) -> None:
    """ExportError when ``output`` exists (an export never replaces anything)."""
    if output.exists() or output.is_symlink():
        raise ExportError(f"--output: {output} already exists (remove it or choose another)")


def remove_dead_tmp_dirs(output: Path) -> None:
    """Remove the temporary folders that killed exports into ``output`` left behind."""
    prefix = f".{output.name}{TMP_MARK}"
    if not output.parent.is_dir():
        return
    for entry in output.parent.iterdir():
        pid = entry.name[len(prefix) :]
        if entry.name.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


class AtomicFolder:
    """``with AtomicFolder(output) as tmp:`` write into ``tmp``; :meth:`publish` renames it to
    ``output``; leaving the block without publishing removes ``tmp``."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.tmp = output.parent / f".{output.name}{TMP_MARK}{os.getpid()}"

    def __enter__(self) -> Path:
        refuse_existing(self.output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_tmp_dirs(self.output)
        self.tmp.mkdir()
        return self.tmp

    def publish(self) -> None:
        for path in self.tmp.iterdir():
            fsync_path(path)
        fsync_path(self.tmp)
        refuse_existing(self.output)  # someone made it meanwhile
        os.rename(self.tmp, self.output)
        fsync_path(self.output.parent)

    def __exit__(self, *exc: Any) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


class SafetensorsWriter:
    """Tensors in order into shards of at most ``shard_bytes`` (a larger tensor gets a shard
    of its own), each written as soon as it is full; :meth:`finish` names them and writes the
    index."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.bytes_written = 0
        self.tensor_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in s for s in self.shards):
            raise AssertionError(f"tensor {name} written twice")
        if self.pending and self.pending_bytes + tensor.nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes

    def _shard_path(self, i: int) -> Path:
        return self.folder / f"model-{i + 1:05d}.safetensors.partial"

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self._shard_path(len(self.shards))
        save_file(self.pending, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_UMASK)  # safetensors creates it 0600
        fsync_path(path)
        self.bytes_written += path.stat().st_size
        self.tensor_bytes += self.pending_bytes
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, total_params: int) -> list[str]:
        """Write the last shard, give the shards their final names, write the index."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for i, name in enumerate(names):
            os.rename(self._shard_path(i), self.folder / name)
        if n > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self.shards) for t in shard}
            index = {
                "metadata": {"total_size": self.tensor_bytes, "total_parameters": total_params},
                "weight_map": dict(sorted(weight_map.items())),
            }
            write_json(self.folder / INDEX_FILENAME, index)
        return names
