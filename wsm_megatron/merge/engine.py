"""The streaming merge on one rank: read pieces, accumulate, cast, write.

Reads run ahead on ``io_threads`` threads into a fixed set of preallocated slots, in exactly
the order the main thread consumes them; writes run behind on one thread. So reading,
accumulating and writing overlap. The main thread waits for all inputs of a piece (or of a
group of small pieces that share inputs: one kernel call for many chunks), then
computes each output with one fused :func:`~wsm_megatron.merge.combine.combine` over that job's
inputs: ``acc = c_0 x_0``, then ``acc += c_j x_j`` oldest to newest in fp32 (or fp64), each
product and sum rounded once, cast to the output dtype, in cache-sized blocks (each input read
once, the output written once), with NaN/Inf flagged in the same pass. Every operation is
elementwise, so the result is bitwise the same whatever the piece boundaries and the number of
ranks.

All buffers are allocated once, sized by :func:`wsm_megatron.merge.plan.size_buffers`.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from wsm_megatron.merge.boxes import MAP_WINDOW_BYTES, intersect, read_box
from wsm_megatron.merge.combine import combine
from wsm_megatron.merge.dcp_format import RawTensor, StorageFiles, locate_tensor
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.plan import (
    AVERAGE,
    OUT_ALIGN,
    BytesItem,
    Piece,
    RankPlan,
    Segment,
    Unit,
)
from wsm_megatron.merge.writer import ShardWriter, WriteRecord
from wsm_megatron.runtime import termination


@dataclass(frozen=True)
class _Read:
    """One read: ``size`` bytes of input ``source`` for a unit (a piece, or a segment of an
    object starting at ``offset`` within it)."""

    unit: Unit
    source: int  # position in the unit's sources
    offset: int
    size: int


@dataclass
class RankOutcome:
    """What one rank wrote (per job) and how much it read and wrote."""

    records: list[list[WriteRecord]] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    pieces: int = 0


def _reads(unit: Unit, slot_bytes: int) -> list[_Read]:
    if isinstance(unit, Piece):
        size = unit.numel * unit.chunk.dtype.itemsize
        return [_Read(unit, s, 0, size) for s in range(len(unit.chunk.sources))]
    reads = []
    for s, (_, info) in enumerate(unit.sources):
        starts = range(0, info.length, slot_bytes) if info.length else [0]
        reads += [_Read(unit, s, a, min(slot_bytes, info.length - a)) for a in starts]
    return reads


class _Prefetcher:
    """Runs ``read(request, slot)`` ahead of the consumer, one free slot per request in flight;
    yields ``(request, slot)`` in request order and re-raises a failed read's error."""

    def __init__(
        self, requests: list[_Read], slots: int, threads: int, read: Callable[[_Read, int], None]
    ) -> None:
        self._requests = requests
        self._read = read
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        self._ready: queue.Queue[tuple[_Read, int, Future[None]]] = queue.Queue()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="wsm-merge-read")
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True)
        self._dispatcher.start()

    def _dispatch(self) -> None:
        for request in self._requests:
            while True:
                if self._stop.is_set():
                    return
                try:
                    slot = self._free.get(timeout=0.05)
                    break
                except queue.Empty:
                    continue
            self._ready.put((request, slot, self._pool.submit(self._read, request, slot)))

    def __iter__(self) -> Iterator[tuple[_Read, int]]:
        for _ in range(len(self._requests)):
            request, slot, future = self._ready.get()
            future.result()
            yield request, slot

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def close(self) -> None:
        self._stop.set()
        self._dispatcher.join()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _WriteBehind:
    """Runs write tasks on one background thread, in submission order, so that writing the
    output overlaps reading and accumulating. Each task comes with a ``release`` callback
    (returning its buffer) that runs even after an earlier task failed."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[tuple[Callable[[], None], Callable[[], None]] | None]
        self._tasks = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="wsm-merge-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            write, release = task
            try:
                if self._error is None:
                    write()
            except BaseException as err:  # handed to the main thread
                self._error = err
            finally:
                release()

    def submit(self, write: Callable[[], None], release: Callable[[], None] = lambda: None):
        if self._error is not None:
            raise self._error
        self._tasks.put((write, release))

    def close(self, *, check: bool = True) -> None:
        """Wait for every task; re-raise the first failure (``check``)."""
        if self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()
        if check and self._error is not None:
            raise self._error


def _batches(units: list[Unit], group: int) -> Iterator[list[Unit]]:
    """Consecutive units processed together: runs of up to ``group`` averaged pieces with the
    same inputs (one kernel call; dtypes may differ); any other unit alone."""
    batch: list[Unit] = []
    key = None
    for unit in units:
        is_average = isinstance(unit, Piece) and unit.kind == AVERAGE
        unit_key = tuple(i for i, _ in unit.chunk.sources) if is_average else None
        if batch and (unit_key is None or unit_key != key or len(batch) == group):
            yield batch
            batch = []
        batch.append(unit)
        key = unit_key
    if batch:
        yield batch


class RankMerger:
    """Executes one rank's share of a merge (see the module docstring)."""

    def __init__(self, plan: RankPlan, progress: Callable[[int], None] | None = None) -> None:
        self.plan = plan
        self.progress = progress
        buffers = plan.buffers
        has_average = any(isinstance(u, Piece) and u.kind == AVERAGE for u in plan.units)
        # A group holds a slot per input of each piece until all are read: fewer would deadlock.
        assert all(
            len(u.chunk.sources) * buffers.group <= buffers.slots
            for u in plan.units
            if isinstance(u, Piece)
        ), "fewer read slots than inputs of a group of pieces"
        self._outs = [
            torch.empty(buffers.out_bytes if has_average else 0, dtype=torch.uint8)
            for _ in range(buffers.out_buffers)
        ]
        self._out_mvs = [memoryview(b.numpy()) for b in self._outs]
        self._free_outs: queue.Queue[int] = queue.Queue()
        for b in range(len(self._outs)):
            self._free_outs.put(b)
        self._slots = [
            torch.empty(buffers.slot_bytes, dtype=torch.uint8) for _ in range(buffers.slots)
        ]
        self._slot_mvs = [memoryview(s.numpy()) for s in self._slots]
        self._files = StorageFiles()
        # Sub-box reads map at most one read slot's size of a file per reader thread.
        self._map_window = min(MAP_WINDOW_BYTES, buffers.slot_bytes)
        self._locations: OrderedDict[tuple[int, str, tuple[int, ...]], RawTensor] = OrderedDict()
        self._lock = threading.Lock()
        self._writers = [ShardWriter(job.tmp_dir, plan.rank) for job in plan.jobs]
        # For each input, the jobs whose copied items come from it.
        self._copies_of = {
            i: [j for j, job in enumerate(plan.jobs) if job.copy_from == i]
            for i in range(len(plan.inputs))
        }
        self._found = torch.zeros(1, dtype=torch.int32)  # the kernels' non-finite flag
        self._prefetch: _Prefetcher | None = None
        self._write_behind: _WriteBehind | None = None

    def _where(self, input_index: int, unit: Unit, segment: Segment | None = None) -> str:
        path = self.plan.inputs[input_index].path
        if isinstance(unit, BytesItem):
            return f"checkpoint {path}, object {unit.fqn!r}"
        offsets = unit.chunk.offsets if segment is None else segment.offsets
        return f"checkpoint {path}, tensor {unit.chunk.fqn!r} (chunk at {offsets})"

    def _locate(self, input_index: int, piece: Piece, segment: Segment) -> RawTensor:
        key = (input_index, piece.chunk.fqn, segment.offsets)
        with self._lock:
            raw = self._locations.get(key)
        if raw is None:
            info = segment.info
            raw = locate_tensor(
                self._files,
                self.plan.inputs[input_index].path / info.relative_path,
                info,
                where=self._where(input_index, piece, segment),
                expected_dtype=piece.chunk.dtype,
                expected_size=segment.sizes,
            )
            with self._lock:
                self._locations[key] = raw
                while len(self._locations) > 4096:
                    self._locations.popitem(last=False)
        return raw

    def _read(self, request: _Read, slot: int) -> None:
        unit = request.unit
        buffer = self._slot_mvs[slot][: request.size]
        if isinstance(unit, Piece):
            self._read_piece(unit, request.source, buffer)
            return
        input_index, info = unit.sources[request.source]
        path = self.plan.inputs[input_index].path / info.relative_path
        try:
            self._files.read_into(path, info.offset + request.offset, buffer)
        except MergeError as err:
            raise MergeError(f"{self._where(input_index, unit)}: {err}") from None

    def _read_piece(self, piece: Piece, source: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the piece's box of one input: its intersection with each
        overlapping stored chunk of that input (one, the whole box, at the output layout)."""
        input_index, segments = piece.chunk.sources[source]
        box = (piece.offsets, piece.sizes)
        for segment in segments:
            common = intersect(box, (segment.offsets, segment.sizes))
            if common is None:
                continue
            raw = self._locate(input_index, piece, segment)
            offsets, sizes = common
            try:
                read_box(
                    self._files,
                    raw,
                    tuple(o - s for o, s in zip(offsets, segment.offsets, strict=True)),
                    sizes,
                    buffer,
                    tuple(o - p for o, p in zip(offsets, piece.offsets, strict=True)),
                    piece.sizes,
                    self._map_window,
                )
            except MergeError as err:
                raise MergeError(f"{self._where(input_index, piece, segment)}: {err}") from None

    def _tensor(self, mv: memoryview, dtype: torch.dtype, piece: Piece) -> torch.Tensor:
        """A tensor owning exactly ``mv``'s bytes (``torch.save`` then writes only those)."""
        if piece.numel == 0:
            return torch.empty(piece.sizes, dtype=dtype)
        return torch.frombuffer(mv, dtype=dtype).view(piece.sizes)

    def _check_finite(self, x: torch.Tensor, input_index: int, piece: Piece) -> None:
        """NaN/Inf in ``x`` is an error (min and max propagate NaN and show +-Inf: one fast,
        exact pass over the input, which also names the checkpoint at fault)."""
        if x.numel() == 0:
            return
        low, high = torch.aminmax(x)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            raise MergeError(
                f"{self._where(input_index, piece)}: the input holds NaN/Inf values "
                "(pass --no-check-finite to merge anyway)"
            )

    def run(self) -> RankOutcome:
        """Merge this rank's units; SIGTERM stops it between units (worker threads share
        queues with this loop, so nothing is raised inside it at an arbitrary point)."""
        with termination.deferred():
            return self._run()

    def _run(self) -> RankOutcome:
        plan = self.plan
        requests = [r for unit in plan.units for r in _reads(unit, plan.buffers.slot_bytes)]
        self._prefetch = _Prefetcher(requests, len(self._slots), plan.io_threads, self._read)
        self._write_behind = _WriteBehind()
        outcome = RankOutcome()
        stream = iter(self._prefetch)
        threads = torch.get_num_threads()
        torch.set_num_threads(plan.threads)
        try:
            for batch in _batches(plan.units, plan.buffers.group):
                termination.raise_if_requested()
                if isinstance(batch[0], Piece):
                    self._merge_pieces(batch, stream)
                    outcome.pieces += len(batch)
                else:
                    self._copy_object(batch[0], stream)
            self._write_behind.close()
            for writer in self._writers:
                writer.close()
        finally:
            torch.set_num_threads(threads)
            self._prefetch.close()
            self._write_behind.close(check=False)
            self._files.close()
        outcome.records = [w.records for w in self._writers]
        outcome.bytes_read = sum(r.size for r in requests)
        outcome.bytes_written = sum(w.bytes_written for w in self._writers)
        return outcome

    def _next(self, stream: Iterator[tuple[_Read, int]], unit: Unit) -> tuple[_Read, int]:
        request, slot = next(stream)
        assert request.unit is unit
        if self.progress is not None:
            self.progress(request.size)
        return request, slot

    def _merge_pieces(self, pieces: list[Piece], stream: Iterator[tuple[_Read, int]]) -> None:
        """Merge averaged pieces that share their inputs with one kernel call per job (or copy
        one copied piece)."""
        if pieces[0].kind != AVERAGE:
            self._copy_piece(pieces[0], stream)
            return
        inputs: dict[int, list[torch.Tensor]] = {i: [] for i, _ in pieces[0].chunk.sources}
        slots = []
        for piece in pieces:
            dtype = piece.chunk.dtype
            for input_index, _ in piece.chunk.sources:
                _, slot = self._next(stream, piece)
                data = self._slots[slot][: piece.numel * dtype.itemsize]
                inputs[input_index].append(data.view(dtype))
                slots.append(slot)
        # NaN/Inf in an input makes its outputs non-finite whatever its weight (0 * inf = nan):
        # the kernel flags non-finite outputs block by block while they are in cache, and only
        # then are the pieces searched, to name the checkpoint at fault.
        found = self._found if self.plan.check_finite else None
        for j, job in enumerate(self.plan.jobs):
            b = self._free_outs.get()
            outs = self._out_tensors(b, pieces)
            combine(
                [out.view(-1) for out in outs],
                [inputs[i] for i in job.inputs],  # oldest to newest
                job.coefficients,
                acc_dtype=self.plan.acc_dtype,
                found_nonfinite=found,
            )
            if found is not None and bool(found):  # nothing non-finite is written
                self._raise_nonfinite(pieces, outs, inputs, job.inputs)
            for k, (piece, out) in enumerate(zip(pieces, outs, strict=True)):
                release = partial(self._free_outs.put, b) if k == len(pieces) - 1 else None
                self._write(self._writers[j], piece.chunk.fqn, piece.offsets, out, release)
        for slot in slots:
            self._prefetch.release(slot)

    def _out_tensors(self, buffer: int, pieces: list[Piece]) -> list[torch.Tensor]:
        """The pieces' outputs, one after another in an output buffer (each aligned)."""
        outs, start = [], 0
        for piece in pieces:
            end = start + piece.numel * piece.out_dtype.itemsize
            outs.append(self._tensor(self._out_mvs[buffer][start:end], piece.out_dtype, piece))
            start = -(-end // OUT_ALIGN) * OUT_ALIGN
        return outs

    def _raise_nonfinite(
        self,
        pieces: list[Piece],
        outs: list[torch.Tensor],
        inputs: dict[int, list[torch.Tensor]],
        job_inputs: tuple[int, ...],
    ) -> None:
        """Name the first piece whose merged values are not finite: the checkpoint with NaN/Inf,
        else the output dtype's overflow."""
        for p, (piece, out) in enumerate(zip(pieces, outs, strict=True)):
            if bool(torch.isfinite(out).all()):
                continue
            for i in job_inputs:
                self._check_finite(inputs[i][p], i, piece)
            raise MergeError(
                f"tensor {piece.chunk.fqn!r} (chunk at {piece.chunk.offsets}): the merged "
                f"values overflow {piece.out_dtype} (choose another --output-dtype)"
            )
        raise AssertionError("the kernel flagged a non-finite value that no output holds")

    def _copy_piece(self, piece: Piece, stream: Iterator[tuple[_Read, int]]) -> None:
        """A copied piece is written from its read buffer to every job that copies it."""
        dtype = piece.chunk.dtype
        check = self.plan.check_finite and dtype.is_floating_point
        for input_index, _ in piece.chunk.sources:
            _, slot = self._next(stream, piece)
            x = self._tensor(self._slot_mvs[slot][: piece.numel * dtype.itemsize], dtype, piece)
            if check:
                self._check_finite(x, input_index, piece)
            jobs = self._copies_of[input_index]
            for k, j in enumerate(jobs):
                release = partial(self._prefetch.release, slot) if k == len(jobs) - 1 else None
                self._write(self._writers[j], piece.chunk.fqn, piece.offsets, x, release)

    def _write(
        self,
        writer: ShardWriter,
        fqn: str,
        offsets: tuple[int, ...],
        tensor: torch.Tensor,
        release: Callable[[], None] | None,
    ) -> None:
        self._write_behind.submit(
            partial(writer.write_tensor, fqn, offsets, tensor), release or (lambda: None)
        )

    def _copy_object(self, item: BytesItem, stream: Iterator[tuple[_Read, int]]) -> None:
        for input_index, info in item.sources:
            writers = [self._writers[j] for j in self._copies_of[input_index]]
            for writer in writers:
                self._write_behind.submit(writer.begin_object)
            for _ in range(len(range(0, info.length, self.plan.buffers.slot_bytes)) or 1):
                request, slot = self._next(stream, item)
                data = self._slot_mvs[slot][: request.size]
                for k, writer in enumerate(writers):
                    last = k == len(writers) - 1
                    self._write_behind.submit(
                        partial(writer.append, data),
                        partial(self._prefetch.release, slot) if last else (lambda: None),
                    )
            for writer in writers:
                self._write_behind.submit(partial(writer.end_object, item.fqn))
