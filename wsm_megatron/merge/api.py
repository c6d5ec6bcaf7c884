"""``merge(config)``: the whole merge on one or many ranks.

1. Rank 0 selects the checkpoints, computes the coefficients, opens and checks every input,
   plans the pieces and gives each rank its share (``scatter_object_list`` of metadata only).
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
from wsm_megatron.merge.dcp_format import TensorStorageMetadata
from wsm_megatron.merge.engine import RankMerger, RankOutcome
from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.inputs import CONFIG_FILENAME, InputCheckpoint, check_compatible
from wsm_megatron.merge.plan import (
    AVERAGE,
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
    make_tmp_dir,
    publish,
    recover_output_root,
    remove_tree,
    write_common,
    write_file,
    write_json,
    write_metadata,
)
from wsm_megatron.theory import MergeWeights


class _Comm:
    """Object collectives over a gloo group, or trivial ones for a single process."""

    def __init__(self, group: Any = None) -> None:
        self.group = None
        self.rank, self.world_size = 0, 1
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
            if dist.get_backend(group) != "gloo":
                group = dist.new_group(backend="gloo")
        if group is not None:
            self.group = group
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def scatter(self, objects: list[Any] | None) -> Any:
        if self.group is None:
            return objects[0]
        out = [None]
        src = dist.get_global_rank(self.group, 0)
        dist.scatter_object_list(
            out, objects if self.rank == 0 else None, src=src, group=self.group
        )
        return out[0]

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
    reference: dict[str, Any]  # the layout input's state_dict_metadata
    common_states: dict[int, dict[str, Any]]  # by input index: newest and copy-source inputs
    selections: list[Selected]
    weights: list[MergeWeights]
    job_plans: list[JobPlan]
    rank_plans: list[RankPlan]
    created_roots: list[Path]
    chunks: int
    chunks_streamed: int
    pieces: int
    averaged: set[str]
    layout: int  # the input whose layout the output takes

    def cleanup(self) -> None:
        remove_tree([job.tmp_dir for job in self.job_plans])
        for root in sorted(self.created_roots, key=lambda p: len(p.parts), reverse=True):
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()


def _prepare(config: MergeConfig, world_size: int) -> _Prepared:
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
    for job, sel in zip(jobs, selections, strict=True):
        if job.output_root.exists() and not job.output_root.is_dir():
            raise MergeError(f"output root {job.output_root} exists and is not a directory")
        recover_output_root(job.output_root, sel.iterations[-1])
        target = iteration_dir(job.output_root, sel.iterations[-1])
        if target.exists() and not config.overwrite:
            raise MergeError(f"output {target} exists (pass --overwrite to replace it)")

    union = sorted({it for sel in selections for it in sel.iterations})
    inputs = [InputCheckpoint.open(config.input, it) for it in union]
    position = {it: i for i, it in enumerate(union)}
    layout = _layout_input(config, position)
    reference = inputs[layout].metadata.state_dict_metadata
    check_compatible(
        inputs,
        layout,
        policy.include,
        lambda k: policy.tensor_kind(k, reference[k].properties.dtype) == AVERAGE,
    )
    job_inputs = [tuple(position[it] for it in sel.iterations) for sel in selections]
    copy_from = [_copy_source(inputs, ins[-1], layout, policy.include) for ins in job_inputs]
    newest_inputs = sorted({ins[-1] for ins in job_inputs} | set(copy_from))
    copy_sources = sorted(set(copy_from))
    used_inputs = sorted({i for ins in job_inputs for i in ins})
    # Read now, so that a bad common state fails the merge before any work.
    common_states = {
        i: load_common_state(inputs[i].path, inputs[i].metadata) for i in newest_inputs
    }
    chunk_items, objects = _plan_items(config, policy, inputs, layout, used_inputs, copy_sources)

    # A piece is merged once all its inputs are read: room for them and the next piece's.
    buffers = size_buffers(
        config.memory_budget_bytes,
        slots=max(config.io_threads + 2, 2 * len(used_inputs)),
        acc_dtype=config.accumulate_torch_dtype,
        in_itemsize=max((c.dtype.itemsize for c, _, _ in chunk_items), default=1),
        out_itemsize=max((o.itemsize for _, _, o in chunk_items), default=1),
        largest_chunk=max((c.numel for c, _, _ in chunk_items), default=1),
    )
    units: list[Any] = list(objects)
    streamed = 0
    for chunk, kind, out_dtype in chunk_items:
        pieces = pieces_of(chunk, kind, out_dtype, buffers.capacity)
        streamed += len(pieces) > 1
        units += pieces
    per_rank = assign_ranks(units, world_size)

    created: list[Path] = []
    job_plans: list[JobPlan] = []
    refs = tuple(InputRef(c.iteration, c.path) for c in inputs)
    # Only the layout input's metadata is kept: the plan holds every storage record it needs.
    prepared = _Prepared(
        config,
        policy,
        refs,
        reference,
        common_states,
        selections,
        weights,
        job_plans,
        [],
        created,
        len(chunk_items),
        streamed,
        len(units) - len(objects),
        {c.fqn for c, kind, _ in chunk_items if kind == AVERAGE},
        layout,
    )
    try:
        for j, (job, sel, w, ins) in enumerate(
            zip(jobs, selections, weights, job_inputs, strict=True)
        ):
            if not job.output_root.exists():
                missing = [p for p in (job.output_root, *job.output_root.parents) if not p.exists()]
                job.output_root.mkdir(parents=True)
                created.extend(missing)
            tmp = make_tmp_dir(job.output_root, sel.iterations[-1])
            job_plans.append(JobPlan(job.name, ins, tuple(w.coefficients), tmp, copy_from[j]))
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


def _copy_source(inputs: list[InputCheckpoint], newest: int, layout: int, include: Any) -> int:
    """Copied items (objects, integer tensors) of a job come from its newest input if that
    has the output layout, else from the layout input: per-shard objects must match it."""
    if newest == layout:
        return newest
    same = _layout_signature(inputs[newest], include) == _layout_signature(inputs[layout], include)
    return newest if same else layout


def _layout_signature(ckpt: InputCheckpoint, include: Any) -> set[tuple]:
    """The stored objects and the tensor chunks of an input: equal for equal layouts."""
    out = set()
    for key, md in ckpt.metadata.state_dict_metadata.items():
        if not include(key):
            continue
        if isinstance(md, TensorStorageMetadata):
            out.update((key, tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)
        else:
            out.add((key,))
    return out


class _SegmentFinder:
    """The stored chunks of one tensor of one input that overlap an output chunk; at the output
    layout (the same chunk list) each is the output chunk itself, found without an index."""

    def __init__(self, ckpt: InputCheckpoint, fqn: str, layout_chunks: list[Any]) -> None:
        self.ckpt, self.fqn = ckpt, fqn
        stored = ckpt.metadata.state_dict_metadata[fqn].chunks
        self.grid = None
        if stored != layout_chunks:
            self.grid = ChunkGrid([(tuple(c.offsets), tuple(c.sizes)) for c in stored])

    def __call__(self, box: tuple) -> tuple[Segment, ...]:
        if self.grid is None:
            return (Segment(*box, self.ckpt.storage(self.fqn, box[0])),)
        where = f"checkpoint {self.ckpt.path}, tensor {self.fqn!r}"
        return overlapping_segments(self.grid, partial(self.ckpt.storage, self.fqn), box, where)


def _plan_items(
    config: MergeConfig,
    policy: ContentPolicy,
    inputs: list[InputCheckpoint],
    layout: int,
    used_inputs: list[int],
    copy_sources: list[int],
) -> tuple[list[tuple[ChunkRef, str, torch.dtype]], list[BytesItem]]:
    """The output chunks (the layout input's) with, per input they are read from, the
    overlapping stored chunks; and the objects, copied from ``copy_sources``."""
    reference = inputs[layout].metadata.state_dict_metadata
    chunk_items: list[tuple[ChunkRef, str, torch.dtype]] = []
    objects: list[BytesItem] = []
    for fqn in sorted(k for k in reference if policy.include(k)):
        md = reference[fqn]
        if not isinstance(md, TensorStorageMetadata):
            policy.check_object(fqn)
            objects.append(BytesItem(fqn, tuple((i, inputs[i].storage(fqn)) for i in copy_sources)))
            continue
        dtype = md.properties.dtype
        kind = policy.tensor_kind(fqn, dtype)
        out_dtype = config.output_torch_dtype if kind == AVERAGE and config.output_dtype else dtype
        sources = used_inputs if kind == AVERAGE else copy_sources
        locate = [_SegmentFinder(inputs[i], fqn, md.chunks) for i in sources]
        for chunk in sorted(md.chunks, key=lambda c: tuple(c.offsets)):
            box = (tuple(chunk.offsets), tuple(chunk.sizes))
            segments = tuple((i, find(box)) for i, find in zip(sources, locate, strict=True))
            chunk_items.append((ChunkRef(fqn, *box, dtype, segments), kind, out_dtype))
    return chunk_items, objects


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
    reference = prepared.reference
    expected = sum(len(p.units) for p in prepared.rank_plans)
    for j, job_plan in enumerate(prepared.job_plans):
        records = [rec for outcome in outcomes for rec in outcome.records[j]]
        assert len(records) == expected, (len(records), expected)
        metadata = build_metadata(records, reference)
        averaged = prepared.averaged
        copied = sorted({r.fqn.split("/")[0] for r in records if r.fqn not in averaged})
        dropped = sorted(k for k in reference if not prepared.policy.include(k))
        counts = {
            "averaged_tensors": len(averaged),
            "copied_from_newest": copied,
            "left_out": len(dropped),
        }
        newest = prepared.inputs[job_plan.newest]
        info = _merge_info(prepared, j, counts)
        common = prepared.policy.common_state(
            _with_layout_args(
                prepared.common_states[job_plan.newest],
                prepared.common_states[job_plan.copy_from],
            ),
            provenance(info),
        )
        tmp = job_plan.tmp_dir
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


def merge(config: MergeConfig, *, group: Any = None) -> MergeResult:
    """Run the merge described by ``config`` on every rank of ``group`` (default: the
    initialised default group, else this process alone); returns the same result everywhere.

    Raises :class:`MergeError` on every rank if any rank fails; the output root is then left as
    it was.
    """
    comm = _Comm(group)
    memory = PeakMemory()
    start = time.perf_counter()
    prepared: _Prepared | None = None
    payload: list[Any] | None = None
    local_error: BaseException | None = None
    if comm.rank == 0:
        try:
            prepared = _prepare(config, comm.world_size)
            payload = [("ok", plan) for plan in prepared.rank_plans]
        except (MergeError, OSError) as err:
            payload = [("error", _message(err))] * comm.world_size
        except Exception as err:  # a bug: stop the other ranks, then raise it here
            payload, local_error = (
                [("error", f"rank 0: {type(err).__name__}: {err}")] * comm.world_size,
                err,
            )
    try:
        status, plan = comm.scatter(payload)
        if local_error is not None:
            raise local_error
        if status == "error":
            raise MergeError(plan)
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
                final = _conclude(prepared, gathered, start)
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
        raise


def _message(err: BaseException) -> str:
    return str(err) if isinstance(err, MergeError) else f"{type(err).__name__}: {err}"


def _conclude(prepared: _Prepared, gathered: list[Any], start: float) -> tuple[str, Any]:
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
    buffers = prepared.rank_plans[0].buffers
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
