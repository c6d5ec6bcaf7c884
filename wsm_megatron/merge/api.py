"""``merge(config)``: the whole merge on one or many ranks.

1. Rank 0 selects the checkpoints, computes the coefficients, locks each output root, opens
   and checks every input one at a time (keeping only what the plan needs: compact storage
   records of the stored chunks that overlap each output chunk, whatever the input's layout),
   plans the pieces and sends each rank its own share (point to point: no rank's plan is
   padded to the largest).
   It creates one hidden temporary directory per output.
2. Every rank streams its share (:class:`wsm_megatron.merge.engine.RankMerger`) into its own
   shard file in each temporary directory.
3. Rank 0 gathers the per-rank records (small), writes ``common.pt``, ``metadata.json``,
   ``merge_info.json`` and finally ``.metadata``, renames each output into place and moves the
   tracker. On any error the temporary directories are removed and every rank raises the same
   :class:`MergeError`.

Without an initialised process group the merge runs in this process alone. Object collectives
use a gloo group (a new one when the default group is NCCL).
"""

from __future__ import annotations

import copy
import pickle
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import wsm_megatron
from wsm_megatron.layout import iteration_dir
from wsm_megatron.merge.boxes import ChunkGrid
from wsm_megatron.merge.config import MergeConfig
from wsm_megatron.merge.contents import ContentPolicy
from wsm_megatron.merge.dcp_format import StorageRecord, TensorStorageMetadata
from wsm_megatron.merge.engine import RankMerger, RankOutcome
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.inputs import (
    CONFIG_FILENAME,
    InputCheckpoint,
    InputLayout,
    check_compatible,
)
from wsm_megatron.merge.plan import (
    AVERAGE,
    Buffers,
    BytesItem,
    ChunkRef,
    InputRef,
    JobPlan,
    RankPlan,
    Segment,
    assign_ranks,
    overlapping_segments,
    pieces_of,
    size_buffers,
)
from wsm_megatron.merge.provenance import input_entries, merge_info, provenance
from wsm_megatron.merge.report import JobReport, MergeResult, PeakMemory, Progress, write_report
from wsm_megatron.merge.selection import Selected, load_common_state, select_checkpoints
from wsm_megatron.merge.writer import (
    MERGE_INFO_FILENAME,
    build_metadata,
    copy_directories,
    lock_output_root,
    make_tmp_dir,
    publish,
    recover_output_root,
    remove_tree,
    unlock_output_root,
    write_common,
    write_file,
    write_json,
    write_metadata,
    writing,
)
from wsm_megatron.theory import MergeWeights

PLAN_BYTES_PER_SOURCE = 256
"""Memory of a plan per (input, stored chunk) segment it reads, kept out of the piece buffers'
budget."""


class Comm:
    """Object collectives over a gloo group, or trivial ones for a single process."""

    def __init__(self, group: Any = None) -> None:
        self.group = None
        self.rank, self.world_size = 0, 1
        if group is None and dist.is_available() and dist.is_initialized():
            from wsm_megatron.runtime.distributed import world_gloo_group

            group = world_gloo_group()  # made once per process (wsm-tune's --save-best too)
        if group is not None:
            self.group = group
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def scatter(self, objects: list[Any] | None) -> Any:
        """Rank r gets ``objects[r]``, sent point to point one rank at a time (torch's
        ``scatter_object_list`` pads every pickle to the largest and holds them all)."""
        if self.group is None:
            return objects[0]
        if self.rank == 0:
            for r in range(1, self.world_size):
                data = pickle.dumps(objects[r], protocol=pickle.HIGHEST_PROTOCOL)
                dst = dist.get_global_rank(self.group, r)
                dist.send(torch.tensor([len(data)], dtype=torch.int64), dst, group=self.group)
                payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                del data
                dist.send(payload, dst, group=self.group)
            return objects[0]
        src = dist.get_global_rank(self.group, 0)
        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, src, group=self.group)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, src, group=self.group)
        return pickle.loads(memoryview(data.numpy()))

    def gather(self, obj: Any) -> list[Any] | None:
        if self.group is None:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        dst = dist.get_global_rank(self.group, 0)
        dist.gather_object(obj, out, dst=dst, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]


@dataclass
class _Prepared:
    """Rank 0's view of the merge: everything needed to finish and publish it."""

    config: MergeConfig
    policy: ContentPolicy
    inputs: tuple[InputRef, ...]
    shapes: dict[str, TensorStorageMetadata]  # the layout input's (chunk lists left out)
    common_states: dict[int, dict[str, Any]]  # by input index: newest and copy-source inputs
    versions: dict[int, str | None]  # DCP version of each job's newest input's .metadata
    selections: list[Selected]
    weights: list[MergeWeights]
    job_plans: list[JobPlan]
    rank_plans: list[RankPlan]  # emptied once sent
    buffers: Buffers
    units: int
    created_roots: list[Path]
    chunks: int
    chunks_streamed: int
    pieces: int
    averaged: set[str]
    left_out: int
    locks: list[Path]
    layout: int  # the input whose layout the output takes

    def cleanup(self) -> None:
        """After a failure: remove the temporary outputs, release the output roots."""
        remove_tree([job.tmp_dir for job in self.job_plans])
        _release(self.locks, self.created_roots)

    def release(self) -> None:
        """After success: release the output roots."""
        _release(self.locks, [])


def _release(locks: list[Path], created: list[Path]) -> None:
    """Unlock the output roots and remove those this merge created if they are empty."""
    for lock in locks:
        unlock_output_root(lock)
    for root in sorted(created, key=lambda p: len(p.parts), reverse=True):
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def _claim_outputs(
    config: MergeConfig, selections: list[Selected]
) -> tuple[list[Path], list[Path]]:
    """Create and lock every output root, undo what a killed merge left there, refuse an
    existing output (without ``--overwrite``); returns the roots created and the locks."""
    created: list[Path] = []
    locks: list[Path] = []
    try:
        for job, sel in zip(config.jobs(), selections, strict=True):
            root = job.output_root
            if root.exists() and not root.is_dir():
                raise MergeError(f"output root {root} exists and is not a directory")
            if not root.exists():
                missing = [p for p in (root, *root.parents) if not p.exists()]
                with writing(root):
                    root.mkdir(parents=True)
                created.extend(missing)
            locks.append(lock_output_root(root))
            recover_output_root(root, sel.iterations[-1])
            target = iteration_dir(root, sel.iterations[-1])
            if target.exists() and not config.overwrite:
                raise MergeError(f"output {target} exists (pass --overwrite to replace it)")
    except BaseException:
        _release(locks, created)
        raise
    return created, locks


@dataclass
class _Catalog:
    """What the plan needs from the inputs, read one input at a time."""

    chunks: list[tuple[ChunkRef, str, torch.dtype]]  # (chunk, kind, output dtype)
    objects: list[BytesItem]
    shapes: dict[str, TensorStorageMetadata]
    common_states: dict[int, dict[str, Any]]
    versions: dict[int, str | None]
    copy_from: list[int]  # per job: the input its copied items come from
    left_out: int


@dataclass
class _OutputTensor:
    """One tensor of the output: its chunks (the layout input's) and how it is merged."""

    dtype: torch.dtype
    kind: str
    out_dtype: torch.dtype
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]


def _skeleton(
    config: MergeConfig, policy: ContentPolicy, ref: InputLayout
) -> tuple[dict[str, _OutputTensor], list[str]]:
    """The output tensors and object keys of the merge, from the layout input."""
    tensors: dict[str, _OutputTensor] = {}
    objects: list[str] = []
    for fqn in sorted(ref.entries):
        md = ref.entries[fqn]
        if not isinstance(md, TensorStorageMetadata):
            policy.check_object(fqn)
            objects.append(fqn)
            continue
        dtype = md.properties.dtype
        kind = policy.tensor_kind(fqn, dtype)
        out_dtype = config.output_torch_dtype if kind == AVERAGE and config.output_dtype else dtype
        boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)
        tensors[fqn] = _OutputTensor(dtype, kind, out_dtype, boxes)
    return tensors, objects


def _segments(
    ckpt: InputCheckpoint,
    ref: InputLayout,
    tensors: dict[str, _OutputTensor],
    averaged: bool,
    names: dict[str, str],
) -> list[tuple[Segment, ...]]:
    """Per output chunk of the averaged (or else the copied) tensors, in skeleton order, the
    stored chunks of ``ckpt`` that overlap it, as compact records; at the output layout (the
    same chunk list) each is the output chunk itself, found without an index."""
    md = ckpt.metadata.state_dict_metadata
    out: list[tuple[Segment, ...]] = []
    for fqn, tensor in tensors.items():
        if (tensor.kind == AVERAGE) != averaged:
            continue
        stored = md[fqn].chunks
        record = partial(ckpt.record, fqn, names=names)
        if stored == ref.entries[fqn].chunks:
            out += [(Segment(*box, record(box[0])),) for box in tensor.boxes]
            continue
        grid = ChunkGrid([(tuple(c.offsets), tuple(c.sizes)) for c in stored])
        where = f"checkpoint {ckpt.path}, tensor {fqn!r}"
        out += [overlapping_segments(grid, record, box, where) for box in tensor.boxes]
    return out


def _read_inputs(
    config: MergeConfig,
    policy: ContentPolicy,
    iterations: list[int],
    job_inputs: list[tuple[int, ...]],
    layout: int,
) -> _Catalog:
    """Open and check every input one at a time (the layout input first, then newest first);
    keep only the storage records of the stored chunks and objects merged (never a whole
    ``.metadata`` beyond the one being read and the layout input's included entries).

    Averaged tensors are read from every input, whatever its layout; copied items (objects,
    integer tensors) of a job come from its newest input if that has the output layout, else
    from the layout input: per-shard objects must match the output's layout."""
    newest = {ins[-1] for ins in job_inputs}
    used = sorted({i for ins in job_inputs for i in ins})
    ckpt: InputCheckpoint | None = InputCheckpoint.open(config.input, iterations[layout])
    ref = ckpt.layout(policy.include)
    left_out = len(ckpt.metadata.state_dict_metadata) - len(ref.entries)
    tensors, object_keys = _skeleton(config, policy, ref)
    averaged_keys = {fqn for fqn, t in tensors.items() if t.kind == AVERAGE}
    names: dict[str, str] = {}
    averaged: dict[int, list[tuple[Segment, ...]]] = {}
    copied: dict[int, list[tuple[Segment, ...]]] = {}
    object_records: dict[int, list[StorageRecord]] = {}
    common_states: dict[int, dict[str, Any]] = {}
    versions: dict[int, str | None] = {}
    same_layout = {layout: True}
    for i in [layout] + [i for i in range(len(iterations) - 1, -1, -1) if i != layout]:
        if i != layout:
            ckpt = InputCheckpoint.open(config.input, iterations[i])
            here = ckpt.layout(policy.include)
            check_compatible(here, ref, averaged_keys.__contains__)
            same_layout[i] = i in newest and here.same_layout(ref)
            del here
        if i in newest or same_layout[i]:  # read now: a bad common state fails before any work
            common_states[i] = load_common_state(ckpt.path, ckpt.metadata)
        if same_layout[i]:  # a possible copy source: the layout input or a newest one like it
            object_records[i] = [ckpt.record(fqn, None, names) for fqn in object_keys]
            copied[i] = _segments(ckpt, ref, tensors, False, names)
        if i in newest:
            versions[i] = ckpt.metadata.version
        if i in used:
            averaged[i] = _segments(ckpt, ref, tensors, True, names)
        ckpt = None  # free this input's metadata before reading the next

    copy_from = [ins[-1] if same_layout[ins[-1]] else layout for ins in job_inputs]
    copy_sources = sorted(set(copy_from))
    for i in set(copied) - set(copy_sources):  # the layout input, not needed after all
        del copied[i], object_records[i]
        if i not in newest:
            del common_states[i]
    chunks: list[tuple[ChunkRef, str, torch.dtype]] = []
    counters = {True: 0, False: 0}
    for fqn, t in tensors.items():
        is_averaged = t.kind == AVERAGE
        table, sources = (averaged, used) if is_averaged else (copied, copy_sources)
        for box in t.boxes:
            k = counters[is_averaged]
            counters[is_averaged] += 1
            segments = tuple((i, table[i][k]) for i in sources)
            chunks.append((ChunkRef(fqn, *box, t.dtype, segments), t.kind, t.out_dtype))
    del averaged, copied
    objects = [
        BytesItem(fqn, tuple((i, object_records[i][k]) for i in copy_sources))
        for k, fqn in enumerate(object_keys)
    ]
    shapes = {
        fqn: TensorStorageMetadata(md.properties, md.size, [])
        for fqn, md in ref.entries.items()
        if isinstance(md, TensorStorageMetadata)
    }
    return _Catalog(chunks, objects, shapes, common_states, versions, copy_from, left_out)


def _prepare(config: MergeConfig, world_size: int) -> _Prepared:
    """Rank 0: select and weigh the checkpoints, claim the output roots, plan the merge."""
    policy = ContentPolicy(
        config.keep_optimizer, config.keep_rng, config.copy_from_newest, config.average
    )
    jobs = config.jobs()
    selections = [select_checkpoints(config.input, job.selection) for job in jobs]
    weights = [
        job.weighting.resolve(sel.positions) for job, sel in zip(jobs, selections, strict=True)
    ]
    if config.report is not None and not config.report.parent.is_dir():
        raise MergeError(f"--report: directory {config.report.parent} does not exist")
    union = sorted({it for sel in selections for it in sel.iterations})
    position = {it: i for i, it in enumerate(union)}
    layout = _layout_input(config, position)
    job_inputs = [tuple(position[it] for it in sel.iterations) for sel in selections]
    created, locks = _claim_outputs(config, selections)
    try:
        return _plan(
            config, world_size, policy, selections, weights, job_inputs, layout, created, locks
        )
    except BaseException:
        _release(locks, created)
        raise


def _layout_input(config: MergeConfig, position: dict[int, int]) -> int:
    """Index of the input whose layout the output takes: ``--layout-from`` or the newest."""
    if config.layout_from is None:
        return len(position) - 1
    if config.layout_from not in position:
        raise MergeError(
            f"--layout-from {config.layout_from}: not one of the merged checkpoints "
            f"({', '.join(map(str, position))})"
        )
    return position[config.layout_from]


def _plan(
    config: MergeConfig,
    world_size: int,
    policy: ContentPolicy,
    selections: list[Selected],
    weights: list[MergeWeights],
    job_inputs: list[tuple[int, ...]],
    layout: int,
    created: list[Path],
    locks: list[Path],
) -> _Prepared:
    """Read the inputs, cut the pieces, assign them to ranks, create the temporary outputs."""
    jobs = config.jobs()
    union = sorted({it for sel in selections for it in sel.iterations})
    catalog = _read_inputs(config, policy, union, job_inputs, layout)
    chunk_items = catalog.chunks
    sources = sum(len(segments) for c, _, _ in chunk_items for _, segments in c.sources)

    # A piece is merged once all its inputs are read: room for them and the next piece's.
    # The plan itself stays in memory too (rank 0 holds every rank's until it is sent).
    buffers = size_buffers(
        # (at most half the budget: a tiny budget must not leave one-element pieces)
        max(
            config.memory_budget_bytes // 2,
            config.memory_budget_bytes - PLAN_BYTES_PER_SOURCE * sources,
        ),
        slots=max(config.io_threads + 2, 2 * len(union)),
        acc_dtype=config.accumulate_torch_dtype,
        in_itemsize=max((c.dtype.itemsize for c, _, _ in chunk_items), default=1),
        out_itemsize=max((o.itemsize for _, _, o in chunk_items), default=1),
        largest_chunk=max((c.numel for c, _, _ in chunk_items), default=1),
    )
    units: list[Any] = list(catalog.objects)
    streamed = 0
    for chunk, kind, out_dtype in chunk_items:
        pieces = pieces_of(chunk, kind, out_dtype, buffers.capacity)
        streamed += len(pieces) > 1
        units += pieces
    per_rank = assign_ranks(units, world_size)

    job_plans: list[JobPlan] = []
    refs = tuple(InputRef(it, iteration_dir(config.input, it)) for it in union)
    prepared = _Prepared(
        config,
        policy,
        refs,
        catalog.shapes,
        catalog.common_states,
        catalog.versions,
        selections,
        weights,
        job_plans,
        [],
        buffers,
        len(units),
        created,
        len(chunk_items),
        streamed,
        len(units) - len(catalog.objects),
        {c.fqn for c, kind, _ in chunk_items if kind == AVERAGE},
        catalog.left_out,
        locks,
        layout,
    )
    try:
        for j, (job, sel, w, ins) in enumerate(
            zip(jobs, selections, weights, job_inputs, strict=True)
        ):
            tmp = make_tmp_dir(job.output_root, sel.iterations[-1])
            job_plans.append(
                JobPlan(job.name, ins, tuple(w.coefficients), tmp, catalog.copy_from[j])
            )
    except BaseException:
        prepared.cleanup()
        raise
    prepared.rank_plans = [
        RankPlan(
            r,
            world_size,
            refs,
            tuple(job_plans),
            tuple(per_rank[r]),
            buffers,
            config.accumulate_torch_dtype,
            config.check_finite,
            config.io_threads,
            config.threads,
        )
        for r in range(world_size)
    ]
    return prepared


_LAYOUT_ARGS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers",
)


def _with_layout_args(common: dict[str, Any], layout_common: dict[str, Any]) -> dict[str, Any]:
    """``common`` (the newest input's) with the saved args' parallel layout of the input the
    output's stored objects come from, so that the args describe the output's layout."""
    args, layout_args = common.get("args"), layout_common.get("args")
    if common is layout_common or args is None or layout_args is None:
        return common
    args = copy.copy(args)
    for name in _LAYOUT_ARGS:
        if hasattr(layout_args, name):
            setattr(args, name, getattr(layout_args, name))
    return {**common, "args": args}


def _job_report(prepared: _Prepared, j: int) -> JobReport:
    config, job = prepared.config, prepared.config.jobs()[j]
    sel, w = prepared.selections[j], prepared.weights[j]
    return JobReport(
        name=job.name,
        output=str(iteration_dir(job.output_root, sel.iterations[-1])),
        iteration=sel.iterations[-1],
        inputs=input_entries(config.input, sel.iterations, sel.positions, w.coefficients),
        position_unit=sel.position_unit,
        position_source=sel.position_source,
        partial_window=sel.partial_window,
        coefficients=list(w.coefficients),
        emulated_decay=list(w.decay),
        schedule=job.weighting.schedule,
        min_lr_ratio=job.weighting.min_lr_ratio,
        ema_beta=job.weighting.ema_beta,
    )


def _merge_info(prepared: _Prepared, j: int, counts: dict[str, Any]) -> dict[str, Any]:
    config, job = prepared.config, prepared.config.jobs()[j]
    sel = prepared.selections[j]
    report = _job_report(prepared, j)
    return merge_info(
        tool="wsm-merge",
        input_root=config.input,
        inputs=report.inputs,
        weighting=job.weighting,
        weights=prepared.weights[j],
        accumulate_dtype=config.accumulate_dtype,
        output_dtype=config.output_dtype,
        sweep_name=job.name,
        selection={
            "mode": job.selection.label(),
            "end_iteration": sel.end_iteration,
            "tokens_per_iter": sel.tokens_per_iter,
            "position_unit": sel.position_unit,
            "position_source": sel.position_source,
            "partial_window": sel.partial_window,
        },
        layout_from=prepared.inputs[prepared.layout].iteration,
        objects_from=prepared.inputs[prepared.job_plans[j].copy_from].iteration,
        optimizer_state="averaged" if config.keep_optimizer else "left out",
        rng_state="copied from newest" if config.keep_rng else "left out",
        **counts,
    )


def _finalize(prepared: _Prepared, outcomes: list[RankOutcome]) -> list[Path]:
    """Write the metadata files of every output and publish them; rank 0 only."""
    config = prepared.config
    for j, job_plan in enumerate(prepared.job_plans):
        records = [rec for outcome in outcomes for rec in outcome.records[j]]
        assert len(records) == prepared.units, (len(records), prepared.units)
        version = prepared.versions[job_plan.newest]
        metadata = build_metadata(records, prepared.shapes, version)
        del records
        averaged = prepared.averaged
        copied = sorted(
            {fqn.split("/")[0] for fqn in metadata.state_dict_metadata if fqn not in averaged}
        )
        newest = prepared.inputs[job_plan.newest]
        tmp = job_plan.tmp_dir
        counts = {
            "averaged_tensors": len(averaged),
            "copied_from_newest": copied,
            "left_out": prepared.left_out,
            "copied_directories": copy_directories(newest.path, tmp),
            "dcp_version": version,
        }
        info = _merge_info(prepared, j, counts)
        common = prepared.policy.common_state(
            _with_layout_args(
                prepared.common_states[job_plan.newest],
                prepared.common_states[job_plan.copy_from],
            ),
            provenance(info),
        )
        write_common(tmp, common)
        write_file(tmp / CONFIG_FILENAME, (newest.path / CONFIG_FILENAME).read_bytes())
        write_json(tmp / MERGE_INFO_FILENAME, info)
        write_metadata(tmp, metadata)
    finals = []
    for j, job_plan in enumerate(prepared.job_plans):
        job = config.jobs()[j]
        iteration = prepared.selections[j].iterations[-1]
        finals.append(
            publish(job_plan.tmp_dir, job.output_root, iteration, overwrite=config.overwrite)
        )
    return finals


def plan_and_send(comm: Comm, config: MergeConfig) -> tuple[_Prepared | None, Any, Any]:
    """Rank 0 plans the merge and sends each rank its own plan. Returns rank 0's prepared merge
    (None elsewhere), this rank's ``("ok", plan)`` or ``("error", message)``, and on rank 0 an
    unexpected exception (a bug) to raise once the other ranks are released."""
    prepared: _Prepared | None = None
    payload: list[Any] | None = None
    local_error: BaseException | None = None
    if comm.rank == 0:
        try:
            prepared = _prepare(config, comm.world_size)
            payload = [("ok", plan) for plan in prepared.rank_plans]
            prepared.rank_plans = []  # rank 0 keeps only its own once sent
        except (MergeError, OSError) as err:
            payload = [("error", _message(err))] * comm.world_size
        except Exception as err:  # a bug: stop the other ranks, then raise it here
            payload, local_error = (
                [("error", f"rank 0: {type(err).__name__}: {err}")] * comm.world_size,
                err,
            )
    try:
        return prepared, comm.scatter(payload), local_error
    except BaseException:
        if prepared is not None:
            prepared.cleanup()
        raise


def merge(config: MergeConfig, *, group: Any = None) -> MergeResult:
    """Run the merge described by ``config`` on every rank of ``group`` (default: the
    initialised default group, else this process alone); returns the same result everywhere.

    Raises :class:`MergeError` on every rank if any rank fails; the output root is then left as
    it was.
    """
    comm = Comm(group)
    memory = PeakMemory()
    start = time.perf_counter()
    prepared, (status, plan), local_error = plan_and_send(comm, config)
    planning_peak = memory.peak_above_baseline()
    try:
        if local_error is not None:
            raise local_error
        if status == "error":
            raise MergeError(plan)
        inputs = [c.path for c in prepared.inputs] if comm.rank == 0 else None
        verify_inputs(comm, comm.broadcast(inputs))
        desc = "wsm-merge" + (f" (rank 0 of {comm.world_size})" if comm.world_size > 1 else "")
        progress = Progress(plan.read_bytes, enabled=config.progress and comm.rank == 0, desc=desc)
        try:
            outcome: Any = ("ok", RankMerger(plan, progress.update).run())
        except (MergeError, OSError) as err:
            outcome = ("error", _message(err))
        except Exception as err:  # a bug: report it to the other ranks, then raise it here
            outcome, local_error = ("error", f"rank {comm.rank}: {type(err).__name__}: {err}"), err
        finally:
            progress.close()
        gathered = comm.gather((outcome, memory.peak_above_baseline(), memory.exact))
        final: Any = None
        if comm.rank == 0:
            try:
                final = _conclude(prepared, gathered, start, planning_peak)
            except Exception as err:  # a bug: release the other ranks, then raise it here
                final, local_error = ("error", f"rank 0: {type(err).__name__}: {err}"), err
        final = comm.broadcast(final)
        if local_error is not None:
            raise local_error
        if final[0] == "error":
            raise MergeError(final[1])
        return final[1]
    except BaseException:
        if prepared is not None:
            prepared.cleanup()
            prepared = None
        raise
    finally:
        if prepared is not None:
            prepared.release()


def verify_inputs(comm: Comm, paths: list[Path]) -> None:
    """Check every input's files against its integrity record (sizes and checksums; without
    one, sizes against ``.metadata``), each rank a share; a damaged input is one
    :class:`MergeError` naming the file, on every rank, before anything is written."""
    from wsm_megatron import integrity

    plans = None
    if comm.rank == 0:
        try:
            plans = ("ok", [integrity.files_to_check(p) for p in paths])
        except ValueError as err:
            plans = ("error", str(err))
    status, plans = comm.broadcast(plans)
    problem = plans if status == "error" else None
    if problem is None:
        pairs = zip(paths, plans, strict=True)
        work = [(p, name, record) for p, (names, record) in pairs for name in names]
        for path, name, record in work[comm.rank :: comm.world_size]:
            problem = integrity.check_files(path, [name], record)
            if problem is not None:
                break
    found = comm.gather(problem)
    first = None if comm.rank else next((f for f in found if f is not None), None)
    first = comm.broadcast(first)
    if first is not None:
        raise MergeError(f"input checkpoint damaged: {first}; merge the checkpoints that verify")


def _message(err: BaseException) -> str:
    return str(err) if isinstance(err, MergeError) else f"{type(err).__name__}: {err}"


def _conclude(
    prepared: _Prepared, gathered: list[Any], start: float, planning_peak: int
) -> tuple[str, Any]:
    errors = [outcome[1] for outcome, _, _ in gathered if outcome[0] == "error"]
    if errors:
        prepared.cleanup()
        return ("error", errors[0])
    outcomes = [outcome[1] for outcome, _, _ in gathered]
    try:
        _finalize(prepared, outcomes)
    except (MergeError, OSError) as err:
        prepared.cleanup()
        return ("error", _message(err))
    seconds = time.perf_counter() - start
    config = prepared.config
    bytes_read = sum(o.bytes_read for o in outcomes)
    peaks = [peak / 2**20 for _, peak, _ in gathered]
    buffers = prepared.buffers
    result = MergeResult(
        jobs=[_job_report(prepared, j) for j in range(len(prepared.job_plans))],
        inputs=[{"iteration": c.iteration, "path": str(c.path)} for c in prepared.inputs],
        ranks=len(gathered),
        seconds=seconds,
        bytes_read=bytes_read,
        bytes_read_per_rank=[o.bytes_read for o in outcomes],
        bytes_written=sum(o.bytes_written for o in outcomes),
        read_throughput_mib_s=bytes_read / 2**20 / seconds if seconds > 0 else 0.0,
        peak_rss_mib=max(peaks),
        peak_rss_mib_per_rank=peaks,
        peak_rss_exact=all(exact for _, _, exact in gathered),
        rank0_planning_peak_rss_mib=planning_peak / 2**20,
        memory_budget_mib=config.memory_budget_mb,
        buffer_mib=buffers.total_bytes / 2**20,
        piece_capacity_elements=buffers.capacity,
        pieces=prepared.pieces,
        chunks=prepared.chunks,
        chunks_streamed=prepared.chunks_streamed,
        accumulate_dtype=config.accumulate_dtype,
        output_dtype=config.output_dtype,
        tool_version=wsm_megatron.__version__,
    )
    if config.report is not None:
        write_report(config.report, result)
    return ("ok", result)
