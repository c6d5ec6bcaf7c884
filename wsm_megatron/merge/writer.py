"""Writing the merged checkpoint: per-rank ``.distcp`` shard files, the global ``.metadata``,
``common.pt``/``metadata.json``/``merge_info.json``, and the atomic publish.

Each rank appends items to its own ``__{rank}_0.distcp`` exactly as DCP does (a tensor piece as
a ``torch.save`` blob, an object as its raw bytes) and returns the small ``(key, box, file,
offset, length)`` records; rank 0 assembles them into ``.metadata``. The output is written into
a hidden temporary directory next to its final place, renamed into place, and only then does
the tracker file move (Megatron-LM's own rule: the tracker names complete checkpoints only).
A lock file in each output root keeps a second merge from touching it meanwhile. A failed
write (full disk, permissions) is one :class:`MergeError` naming the path.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as serialization_config

from wsm_megatron.atomic import fsync_path
from wsm_megatron.layout import (
    TRACKER_FILENAME,
    iteration_dir,
    iteration_dirname,
    read_tracker,
    write_tracker,
)
from wsm_megatron.merge.dcp_format import (
    METADATA_FILENAME,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
    storage_info,
)
from wsm_megatron.merge.errors import MergeError

TMP_PREFIX = ".wsm-merge-tmp-"
OLD_PREFIX = ".wsm-merge-old-"
MERGE_INFO_FILENAME = "merge_info.json"
LOCK_FILENAME = ".wsm-merge.lock"


def nested_errors(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every exception inside it: causes, contexts, arguments, and the per-rank
    failures a DCP ``CheckpointException`` collects (as ``(exception, traceback)``)."""
    stack, seen = [err], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        nested = list(failures.values()) if isinstance(failures, dict) else []
        nested += [e.__cause__, e.__context__, *e.args]
        for n in nested:
            n = n[0] if isinstance(n, tuple) and n else n
            if isinstance(n, BaseException):
                stack.append(n)


def os_error_of(err: BaseException) -> OSError | None:
    """The OS error behind ``err`` (torch wraps e.g. a full disk's ``OSError`` in a
    ``RuntimeError``; DCP collects each rank's failure in a ``CheckpointException``)."""
    return next((e for e in nested_errors(err) if isinstance(e, OSError)), None)


_WRITER_FAILURES = ("file write failed", "unexpected pos", "Worker failure")


def refused_write(ckpt_dir: Path, err: BaseException) -> OSError | None:
    """Why the file system refused a write that torch's writer reported without its errno
    (``PytorchStreamWriter``: "file write failed", "unexpected pos"): a full disk, the
    file-size limit or permissions, as this process sees them now; None for anything else."""
    import errno
    import resource
    import shutil

    messages = [str(e) for e in nested_errors(err)]
    if not any(text in m for m in messages for text in _WRITER_FAILURES):
        return None
    if shutil.disk_usage(ckpt_dir).free < 2**20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return OSError(
            errno.EFBIG, f"File too large (the file-size limit, ulimit -f, is {soft} bytes)"
        )
    if not os.access(ckpt_dir, os.W_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES))
    return None


def write_error(path: Path, err: BaseException) -> MergeError:
    """One line for a failed write of ``path``, naming the OS error behind it."""
    cause = os_error_of(err)
    reason = cause.strerror if cause is not None and cause.strerror else str(err)
    return MergeError(f"cannot write {path}: {reason}")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failure to write ``path`` into :func:`write_error`'s one line."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        raise write_error(path, err) from None


@dataclass(frozen=True)
class WriteRecord:
    """One item a rank wrote: a tensor box (``offsets``/``sizes``/``dtype``) or an object."""

    fqn: str
    offsets: tuple[int, ...] | None
    sizes: tuple[int, ...] | None
    dtype: torch.dtype | None
    relative_path: str
    offset: int
    length: int


class ShardWriter:
    """Appends items to one rank's ``__{rank}_0.distcp`` (created on the first item)."""

    def __init__(self, directory: Path, rank: int) -> None:
        self.name = f"__{rank}_0.distcp"
        self.path = directory / self.name
        self.records: list[WriteRecord] = []
        self.bytes_written = 0
        self._file: Any = None
        self._object_start = 0

    def _open(self) -> Any:
        if self._file is None:
            with writing(self.path):
                self._file = open(self.path, "wb")
        return self._file

    def write_tensor(self, fqn: str, offsets: tuple[int, ...], tensor: torch.Tensor) -> None:
        """``torch.save`` of ``tensor`` (which must own exactly its storage), as DCP stores it.

        Without the zip CRC-32: ``torch.load`` never checks it (PyTorch builds its zip reader
        without CRC checks), and computing it would cap writing at ~400 MB/s per rank.
        """
        f = self._open()
        start = f.tell()
        save_config = serialization_config.save
        crc = save_config.compute_crc32
        save_config.compute_crc32 = False
        try:
            with writing(self.path):
                torch.save(tensor, f)
        finally:
            save_config.compute_crc32 = crc
        length = f.tell() - start
        self.bytes_written += length
        self.records.append(
            WriteRecord(fqn, offsets, tuple(tensor.shape), tensor.dtype, self.name, start, length)
        )

    def begin_object(self) -> None:
        """Start an object; append its bytes with :meth:`append`, finish with :meth:`end_object`."""
        self._object_start = self._open().tell()

    def append(self, data: memoryview) -> None:
        with writing(self.path):
            self._file.write(data)

    def end_object(self, fqn: str) -> None:
        length = self._file.tell() - self._object_start
        self.bytes_written += length
        self.records.append(
            WriteRecord(fqn, None, None, None, self.name, self._object_start, length)
        )

    def close(self) -> None:
        """Flush and fsync the file (no-op if nothing was written)."""
        if self._file is not None:
            file, self._file = self._file, None
            with writing(self.path):
                try:
                    file.flush()
                    os.fsync(file.fileno())
                finally:
                    file.close()


def build_metadata(
    records: Iterable[WriteRecord],
    reference: dict[str, Any],
    version: str | None,
) -> Metadata:
    """DCP ``.metadata`` for the written records; ``reference`` is the newest input's
    ``state_dict_metadata`` (global shapes and tensor properties), ``version`` its DCP version
    stamp (one its readers accept, whatever the running torch writes)."""
    chunks: dict[str, list[ChunkStorageMetadata]] = {}
    dtypes: dict[str, torch.dtype] = {}
    storage: dict[MetadataIndex, Any] = {}
    state: dict[str, Any] = {}
    for rec in records:
        info = storage_info(rec.relative_path, rec.offset, rec.length)
        if rec.offsets is None:
            state[rec.fqn] = BytesStorageMetadata()
            storage[MetadataIndex(rec.fqn)] = info
            continue
        chunks.setdefault(rec.fqn, []).append(
            ChunkStorageMetadata(torch.Size(rec.offsets), torch.Size(rec.sizes))
        )
        assert dtypes.setdefault(rec.fqn, rec.dtype) == rec.dtype, rec.fqn
        storage[MetadataIndex(rec.fqn, rec.offsets)] = info
    for fqn, fqn_chunks in chunks.items():
        ref = reference[fqn]
        props = ref.properties
        fqn_chunks.sort(key=lambda c: tuple(c.offsets))
        state[fqn] = TensorStorageMetadata(
            TensorProperties(
                dtype=dtypes[fqn],
                layout=props.layout,
                requires_grad=props.requires_grad,
                memory_format=props.memory_format,
                pin_memory=props.pin_memory,
            ),
            torch.Size(ref.size),
            fqn_chunks,
        )
    return Metadata(
        state_dict_metadata=dict(sorted(state.items())),
        storage_data=storage,
        version=version,
    )


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync a small file."""
    with writing(path), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_metadata(directory: Path, metadata: Metadata) -> None:
    write_file(directory / METADATA_FILENAME, pickle.dumps(metadata))


def write_common(directory: Path, state: dict[str, Any]) -> None:
    path = directory / "common.pt"
    with writing(path), open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: Any) -> None:
    write_file(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def recover_output_root(root: Path, iteration: int | None = None) -> None:
    """Undo what a killed earlier merge into ``root/iter_<iteration>`` (any iteration when
    None) left behind: remove its temporary directories and put back an old iteration
    directory it had moved aside."""
    if not root.is_dir():
        return
    name = iteration_dirname(iteration) if iteration is not None else "iter_"
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(f"{TMP_PREFIX}{name}"):
            shutil.rmtree(entry)
        elif entry.name.startswith(f"{OLD_PREFIX}{name}"):
            final = root / entry.name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
            if final.exists():
                shutil.rmtree(entry)
            else:
                os.rename(entry, final)


def make_tmp_dir(root: Path, iteration: int) -> Path:
    """A fresh hidden directory in ``root`` to build ``iter_<iteration>`` in."""
    path = root / f"{TMP_PREFIX}{iteration_dirname(iteration)}-{uuid.uuid4().hex[:12]}"
    with writing(path):
        path.mkdir()
    return path


def copy_directories(source: Path, target: Path) -> list[str]:
    """Copy the sub-directories of checkpoint ``source`` (e.g. ``modelopt_state/``) into
    ``target``; returns their names."""
    names = sorted(p.name for p in source.iterdir() if p.is_dir())
    for name in names:
        with writing(target / name):
            shutil.copytree(source / name, target / name)
    return names


def _lock_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _is_dead(owner: dict[str, Any] | None) -> bool:
    """Whether a lock's owner is a process of this host that no longer runs."""
    if owner is None or owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return False


def lock_output_root(root: Path) -> Path:
    """Claim ``root`` for this merge with a lock file holding this process's pid and host; a
    live claim is an error, a dead process's claim on this host is taken over."""
    path = root / LOCK_FILENAME
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            held = _lock_owner(path)
            if not _is_dead(held):
                who = f"pid {held.get('pid')} on {held.get('host')}" if held else "unknown"
                raise MergeError(
                    f"output root {root} is in use by another wsm-merge ({who}; lock file "
                    f"{path}): wait for it to finish, or remove the lock file if it is no "
                    "longer running"
                ) from None
            path.unlink(missing_ok=True)  # left by a killed merge on this host
        except OSError as err:
            raise write_error(path, err) from None
    with writing(path), os.fdopen(fd, "w") as f:
        json.dump(owner, f)
    return path


def unlock_output_root(lock: Path) -> None:
    """Release a claim of :func:`lock_output_root` (if it is still this process's)."""
    owner = _lock_owner(lock)
    if owner is not None and owner.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def publish(tmp_dir: Path, root: Path, iteration: int, *, overwrite: bool) -> Path:
    """Rename ``tmp_dir`` to ``root/iter_<iteration>`` (replacing an existing one only with
    ``overwrite``), then point the tracker at the newest complete iteration."""
    fsync_path(tmp_dir)
    final = iteration_dir(root, iteration)
    old = None
    if final.exists():
        if not overwrite:
            raise MergeError(f"output {final} exists (pass --overwrite to replace it)")
        old = root / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:12]}"
        with writing(old):
            os.rename(final, old)
    with writing(final):
        os.rename(tmp_dir, final)
    fsync_path(root)
    current = read_tracker(root)
    newest = iteration
    if current is not None and current > iteration and iteration_dir(root, current).is_dir():
        newest = current
    with writing(root / TRACKER_FILENAME):
        write_tracker(root, newest)
    if old is not None:
        shutil.rmtree(old)
    return final


def remove_tree(paths: Sequence[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
