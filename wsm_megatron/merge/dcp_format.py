"""The bytes of a ``torch_dist`` (PyTorch DCP) checkpoint, read without loading tensors.

DCP (and Megatron's ``FileSystemWriterAsync``) append each stored item to a ``__R_I.distcp``
file: a tensor chunk as a complete ``torch.save`` blob, a ``ShardedObject`` as raw bytes, at the
``(relative_path, offset, length)`` recorded in ``.metadata``. A ``torch.save`` blob is an
uncompressed zip: ``<archive>/data.pkl`` describes the tensor (storage key, storage offset, size,
stride, dtype) and ``<archive>/data/<key>`` holds the storage bytes. :func:`locate_tensor` parses
the zip directory and ``data.pkl`` (a restricted unpickler that never reads storage) and returns
where the chunk's raw element bytes start, so that any sub-range can be read with ``pread``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gc
import io
import mmap
import os
import pickle
import resource
import struct
import threading
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from wsm_megatron.merge.errors import MergeError

__all__ = [
    "CURRENT_DCP_VERSION",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "RawTensor",
    "StorageFiles",
    "StorageRecord",
    "TensorProperties",
    "TensorStorageMetadata",
    "locate_tensor",
    "read_metadata",
    "storage_info",
]

METADATA_FILENAME = ".metadata"
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile.structFileHeader
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
_CACHE = 4096  # head and tail of a blob hold the zip directory and data.pkl


def storage_info(relative_path: str, offset: int, length: int) -> _StorageInfo:
    """The ``.metadata`` record of one stored item."""
    return _StorageInfo(relative_path, offset, length)


class StorageRecord(NamedTuple):
    """Where one stored item lies (a compact ``_StorageInfo``: a plan holds millions)."""

    relative_path: str
    offset: int
    length: int


def read_metadata(ckpt_dir: Path) -> Metadata:
    """Unpickle ``ckpt_dir/.metadata`` (DCP's global checkpoint index)."""
    if not (ckpt_dir / METADATA_FILENAME).is_file():
        raise MergeError(
            f"checkpoint {ckpt_dir}: missing {METADATA_FILENAME} (incomplete or unfinished save)"
        )
    enabled = gc.isenabled()
    gc.disable()  # millions of new objects, no cycles: collecting meanwhile doubles the time
    try:
        return FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as err:  # truncated pickle or foreign file: whatever unpickling raises
        raise MergeError(f"checkpoint {ckpt_dir}: cannot read {METADATA_FILENAME}: {err}") from None
    finally:
        if enabled:
            gc.enable()


MAX_OPEN_FILES = 64
"""Descriptors a :class:`StorageFiles` keeps open: reads come in file order, so a few suffice."""


def _open_error(err: OSError) -> str:
    if err.errno != errno.EMFILE:
        return str(err.strerror)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"{err.strerror} (open-file limit: soft {soft}, hard {hard}; the merge keeps up to "
        f"{MAX_OPEN_FILES} shard files open besides its own descriptors: raise it with ulimit -n)"
    )


class StorageFiles:
    """Thread-safe ``pread`` access to ``.distcp`` files through a bounded cache of descriptors
    (least recently used closed first; one in use by a read is never closed)."""

    def __init__(self, max_open: int = MAX_OPEN_FILES) -> None:
        assert max_open >= 1
        self.max_open = max_open
        self._fds: collections.OrderedDict[Path, int] = collections.OrderedDict()
        self._users: collections.Counter[Path] = collections.Counter()
        self._lock = threading.Lock()

    @property
    def open_count(self) -> int:
        return len(self._fds)

    def _acquire(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                if len(self._fds) >= self.max_open:
                    self._close_idle(keep=self.max_open - 1)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as err:
                    raise MergeError(f"cannot open {path}: {_open_error(err)}") from None
                self._fds[path] = fd
            self._fds.move_to_end(path)
            self._users[path] += 1
            return fd

    def _release(self, path: Path) -> None:
        with self._lock:
            self._users[path] -= 1
            if not self._users[path]:
                del self._users[path]
                if len(self._fds) > self.max_open:  # opened over the limit while all were busy
                    self._close_idle(keep=self.max_open)

    def _close_idle(self, keep: int) -> None:
        """Close idle descriptors, oldest first, until at most ``keep`` stay open (lock held)."""
        for path in list(self._fds):
            if len(self._fds) <= keep:
                return
            if path not in self._users:
                os.close(self._fds.pop(path))

    def read_into(self, path: Path, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes of ``path`` at ``offset``; a short file is an error."""
        fd = self._acquire(path)
        try:
            done, size = 0, len(buffer)
            while done < size:
                n = os.preadv(fd, [buffer[done:]], offset + done)
                if n == 0:
                    raise MergeError(
                        f"{path} is truncated: expected {size} bytes at offset {offset}, "
                        f"the file ends after {done}"
                    )
                done += n
        finally:
            self._release(path)

    def read(self, path: Path, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        self.read_into(path, offset, memoryview(buffer))
        return bytes(buffer)

    @contextlib.contextmanager
    def map(self, path: Path, offset: int, length: int) -> Iterator[mmap.mmap]:
        """A private map of ``length`` bytes of ``path`` at ``offset`` (a multiple of
        ``mmap.ALLOCATIONGRANULARITY``); a file shorter than that is an error, not a SIGBUS."""
        fd = self._acquire(path)  # not closed by the cache until mapped (then it may be)
        try:
            size = os.fstat(fd).st_size
            if offset + length > size:
                raise MergeError(
                    f"{path} is truncated: expected {length} bytes at offset {offset}, "
                    f"the file has {size}"
                )
            region = mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=offset)
        finally:
            self._release(path)
        try:
            yield region
        finally:
            region.close()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class _BlobView(io.RawIOBase):
    """A read-only file view of ``[start, start + length)`` of a file, for :mod:`zipfile`;
    the first and last few KiB are read once and served from memory."""

    def __init__(self, files: StorageFiles, path: Path, start: int, length: int) -> None:
        super().__init__()
        self._files, self._path, self._start, self._length = files, path, start, length
        self._pos = 0
        self._head: bytes | None = None
        self._tail: bytes | None = None

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def length(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = base + pos
        if self._pos < 0:
            raise OSError("seek before the start of the blob")
        return self._pos

    def _span(self, pos: int, size: int) -> bytes:
        head = min(_CACHE, self._length)
        if pos + size <= head:
            if self._head is None:
                self._head = self._files.read(self._path, self._start, head)
            return self._head[pos : pos + size]
        tail_start = max(0, self._length - _CACHE)
        if pos >= tail_start:
            if self._tail is None:
                self._tail = self._files.read(
                    self._path, self._start + tail_start, self._length - tail_start
                )
            return self._tail[pos - tail_start : pos - tail_start + size]
        return self._files.read(self._path, self._start + pos, size)

    def read(self, size: int = -1) -> bytes:
        remaining = max(0, self._length - self._pos)
        size = remaining if size is None or size < 0 else min(size, remaining)
        data = self._span(self._pos, size) if size else b""
        self._pos += len(data)
        return data


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRecord:
    storage: _StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, *rest: Any):
    return _TensorRecord(storage, int(storage_offset), tuple(size), tuple(stride))


class _TensorHeaderUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` of a single tensor; records storage references, loads no data."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            with warnings.catch_warnings():  # legacy TypedStorage classes warn on access
                warnings.simplefilter("ignore")
                dtype = getattr(getattr(torch, name, None), "dtype", None)
            if isinstance(dtype, torch.dtype):
                return _StorageType(dtype)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a tensor blob")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


@dataclass(frozen=True)
class RawTensor:
    """Where the contiguous element bytes of one stored chunk lie."""

    path: Path
    data_offset: int  # absolute file offset of element 0 of the chunk
    dtype: torch.dtype
    size: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _is_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = _contiguous_strides(size)
    return all(n == 1 or a == b for n, a, b in zip(size, stride, expected, strict=True))


def _read_member(view: _BlobView, archive: zipfile.ZipFile, name: str, *, where: str) -> bytes:
    """A small stored (uncompressed) member of a ``torch.save`` blob, read from its local header
    without the CRC-32 check: wsm-merge's own writer, like ``torch.save``'s streaming writer,
    may leave CRCs unset, and the element data is never checked either. (The members read here
    lie in the blob's first KiB, which the view reads once.)"""
    member = archive.getinfo(name)
    if member.compress_type != zipfile.ZIP_STORED:
        raise MergeError(f"{where}: compressed member {name!r} in {view.name} is not supported")
    view.seek(member.header_offset)
    fields = _ZIP_LOCAL_HEADER.unpack(view.read(_ZIP_LOCAL_HEADER.size))
    if fields[0] != _ZIP_LOCAL_MAGIC:
        raise MergeError(f"{where}: corrupt zip local header in {view.name}")
    data_start = member.header_offset + _ZIP_LOCAL_HEADER.size + fields[10] + fields[11]
    if data_start + member.file_size > view.length:
        raise MergeError(f"{where}: member {name!r} extends past the stored item in {view.name}")
    view.seek(data_start)
    return view.read(member.file_size)


def locate_tensor(
    files: StorageFiles,
    path: Path,
    info: StorageRecord | _StorageInfo,
    *,
    where: str,
    expected_dtype: torch.dtype,
    expected_size: tuple[int, ...],
) -> RawTensor:
    """Find the element bytes of the tensor chunk stored at ``info`` in ``path``.

    ``where`` names the checkpoint, tensor and chunk in errors. Checks that the blob is an
    uncompressed ``torch.save`` of a contiguous tensor of the expected dtype and size.
    """
    try:
        view = _BlobView(files, path, info.offset, info.length)
        if view.read(4) != _ZIP_LOCAL_MAGIC:
            raise MergeError(
                f"{where}: the item at offset {info.offset} of {path.name} is not a torch.save "
                "blob (only torch_dist checkpoints written with torch.save items are supported)"
            )
        view.seek(0)
        with zipfile.ZipFile(view) as archive:
            names = archive.namelist()
            pkl_name = next((n for n in names if n.endswith("data.pkl")), None)
            if pkl_name is None:
                raise MergeError(f"{where}: torch.save blob without data.pkl in {path.name}")
            prefix = pkl_name[: -len("data.pkl")]
            member = partial(_read_member, view, archive, where=where)
            if f"{prefix}byteorder" in names and member(f"{prefix}byteorder") != b"little":
                raise MergeError(f"{where}: big-endian checkpoint data is not supported")
            record = _TensorHeaderUnpickler(io.BytesIO(member(pkl_name))).load()
            if not isinstance(record, _TensorRecord):
                raise MergeError(f"{where}: the stored item is not a single tensor")
            data_info = archive.getinfo(f"{prefix}data/{record.storage.key}")
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, struct.error) as err:
        raise MergeError(f"{where}: corrupt tensor blob in {path.name}: {err}") from None

    storage = record.storage
    if storage.dtype != expected_dtype:
        raise MergeError(f"{where}: stored dtype {storage.dtype}, metadata says {expected_dtype}")
    if record.size != tuple(expected_size):
        raise MergeError(f"{where}: stored shape {record.size}, metadata says {expected_size}")
    if not _is_contiguous(record.size, record.stride):
        raise MergeError(
            f"{where}: stored with non-contiguous strides {record.stride}; cannot stream it"
        )
    numel = 1
    for s in record.size:
        numel *= s
    if data_info.compress_type != zipfile.ZIP_STORED:
        raise MergeError(f"{where}: compressed tensor storage is not supported")
    if data_info.file_size != storage.numel * storage.dtype.itemsize:
        raise MergeError(f"{where}: storage record size does not match its element count")
    if record.storage_offset + numel > storage.numel:
        raise MergeError(f"{where}: tensor extends past its storage")
    header = files.read(path, info.offset + data_info.header_offset, _ZIP_LOCAL_HEADER.size)
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    if fields[0] != _ZIP_LOCAL_MAGIC:
        raise MergeError(f"{where}: corrupt zip local header in {path.name}")
    data_start = data_info.header_offset + _ZIP_LOCAL_HEADER.size + fields[10] + fields[11]
    end = data_start + data_info.file_size
    if end > info.length:
        raise MergeError(f"{where}: tensor data extends past the stored item in {path.name}")
    return RawTensor(
        path,
        info.offset + data_start + record.storage_offset * storage.dtype.itemsize,
        storage.dtype,
        record.size,
    )
