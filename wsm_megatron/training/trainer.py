"""The WSM pre-training loop on Megatron-Core, and evaluation of saved or merged checkpoints.

:func:`pretrain` runs inside a launched process (torchrun, SLURM's srun, or a test's
``run_distributed``): it starts the distributed runtime, builds data, model, optimizer and LR
schedule, resumes from the newest checkpoint if there is one, trains with Megatron's pipeline
schedules, logs, evaluates, checkpoints on the configured interval and prunes what the merge
window no longer needs. :func:`evaluate_checkpoints` loads checkpoints weights-only (a merged
checkpoint has nothing else) at the training layout and reports their validation loss.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import Float16Module

from wsm_megatron.data import build_datasets, build_tokenizer
from wsm_megatron.data.datasets import DataSplits
from wsm_megatron.data.loader import (
    LoaderConfig,
    build_train_batches,
    build_valid_batches,
    reads_data,
)
from wsm_megatron.runtime import ParallelConfig, Runtime, init_distributed
from wsm_megatron.training.checkpointing import (
    Checkpointer,
    Progress,
    load_model_only,
    resolve_checkpoint,
    resume_checkpoint,
)
from wsm_megatron.training.config import WSMConfig, resolve_corpus
from wsm_megatron.training.evaluate import ValidBatches, evaluate
from wsm_megatron.training.loggers import MetricsLogger, console_line
from wsm_megatron.training.metrics import flops_per_iteration, memory_gb
from wsm_megatron.training.model import BuiltModel, build_model, count_parameters, mixed_precision
from wsm_megatron.training.online_merge import MergePoint, OnlineMerge
from wsm_megatron.training.optimizer import TrainState, params_synced, setup_model_and_optimizer
from wsm_megatron.training.schedules import build_scheduler
from wsm_megatron.training.steps import Batch, global_token_means, run_microbatches


@dataclass
class TrainResult:
    """What a finished :func:`pretrain` leaves (the same on every rank, except ``state``)."""

    progress: Progress
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of every iteration this process ran."""
    val_losses: dict[int, float] = field(default_factory=dict)
    merged_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss of the online merge's merged model at each merge point."""
    merge_points: dict[int, MergePoint] = field(default_factory=dict)
    ring_rebuild: tuple[list[int], list[int]] | None = None
    """On resume with the online merge: the iterations loaded into the ring, and the missing."""
    lrs: dict[int, float] = field(default_factory=dict)
    """The LR each iteration applied."""
    resumed_from: int | None = None
    state: TrainState | None = None


@dataclass
class _Session:
    config: WSMConfig
    runtime: Runtime
    built: BuiltModel
    vocab_size: int
    data: DataSplits
    num_microbatches: int
    dp_rank: int
    dp_size: int

    def loader(self) -> LoaderConfig:
        """This rank's microbatch loader (read on TP rank 0, broadcast over TP)."""
        return LoaderConfig.for_this_rank(
            micro_batch_size=self.config.train.micro_batch_size,
            seq_length=self.config.seq_length,
            device=self.runtime.device,
            num_workers=self.config.data.num_workers,
        )

    def valid_batches(self) -> ValidBatches:
        t = self.config.train

        def fresh() -> Iterator[Batch]:
            return build_valid_batches(
                self.data.valid,
                self.loader(),
                global_batch_size=t.global_batch_size,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
                num_batches=t.eval_iters,
            )

        return fresh


def _set_random_seed(seed: int) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage; TP ranks fork the tracker's states."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def microbatches_per_rank(config: WSMConfig, dp: int) -> int:
    """Microbatches per rank and global batch; what the schedules accept, or one clear error."""
    p, t = config.parallel, config.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp})"
        )
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    pp = p.pipeline_model_parallel_size
    if p.virtual_pipeline_model_parallel_size is not None and num_microbatches % pp:
        # megatron-core's interleaved schedule runs microbatches in groups of the PP size.
        raise ValueError(
            f"parallel.virtual_pipeline_model_parallel_size: the interleaved schedule needs "
            f"a multiple of pipeline_model_parallel_size ({pp}) microbatches per rank, got "
            f"{num_microbatches} (train.global_batch_size {t.global_batch_size} / "
            f"(micro_batch_size {t.micro_batch_size} x data-parallel size {dp}))"
        )
    return num_microbatches


def _start(config: WSMConfig, *, need_train: bool) -> _Session:
    p, t = config.parallel, config.train
    runtime = init_distributed(
        ParallelConfig(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
        )
    )
    dp = runtime.data_parallel_size
    num_microbatches = microbatches_per_rank(config, dp)
    _set_random_seed(t.seed)
    config = resolve_corpus(config, progress=runtime.is_main)
    tokenizer = build_tokenizer(config.data)
    built = build_model(config, tokenizer.vocab_size)
    data = build_datasets(
        config.data,
        tokenizer,
        global_batch_size=t.global_batch_size,
        train_samples=(t.train_iters if need_train else 1) * t.global_batch_size,
        valid_samples=t.eval_iters * t.global_batch_size,
        is_built_on_rank=reads_data,
    )
    return _Session(
        config=config,
        runtime=runtime,
        built=built,
        vocab_size=tokenizer.vocab_size,
        data=data,
        num_microbatches=num_microbatches,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
    )


def _describe(session: _Session, state: TrainState) -> str:
    c, rt, b = session.config, session.runtime, session.built
    count = sum(count_parameters(chunk) for chunk in b.chunks)
    params = torch.tensor([count], dtype=torch.float64, device=rt.device)
    torch.distributed.all_reduce(params, group=parallel_state.get_model_parallel_group())
    spec = "Transformer Engine" if b.transformer_engine else "local"
    precision = "bf16" if mixed_precision(c) else "fp32"
    optimizer = "distributed optimizer" if state.distributed_optimizer else "FP32Optimizer"
    p = c.parallel
    pipeline = f"PP {p.pipeline_model_parallel_size}"
    if p.virtual_pipeline_model_parallel_size is not None:
        pipeline += f" (interleaved, {p.virtual_pipeline_model_parallel_size} chunks per rank)"
    if p.context_parallel_size > 1:
        pipeline += f" x CP {p.context_parallel_size}"
    return (
        f"WSM pre-training: {c.model.num_layers} layers, hidden {c.model.hidden_size}, "
        f"{'MoE ' + str(c.model.num_experts) + ' experts, ' if c.model.is_moe else ''}"
        f"{params.item() / 1e6:.2f}M parameters (model-parallel total), vocab "
        f"{session.vocab_size} (padded {b.vocab_size}), seq {c.seq_length}\n"
        f"  {rt.world_size} ranks on {rt.device.type} ({rt.backend}): TP "
        f"{p.tensor_model_parallel_size} x {pipeline} x DP {session.dp_size}; {spec} layers, "
        f"{precision}, Megatron DDP + {optimizer}\n"
        f"  {c.train.train_iters} iterations x {c.train.global_batch_size} sequences "
        f"({session.num_microbatches} microbatch(es) of {c.train.micro_batch_size} per rank), "
        f"LR schedule {c.train.lr_schedule} (peak {c.train.lr:g}, warmup "
        f"{c.train.lr_warmup_iters})"
    )


def pretrain(config: WSMConfig) -> TrainResult:
    """Train (or resume training) as ``config`` says; returns the progress and losses."""
    session = _start(config, need_train=True)
    config, t = session.config, session.config.train
    state = setup_model_and_optimizer(session.built, config)
    scheduler = build_scheduler(state.optimizer, t)
    checkpointer = Checkpointer(
        config,
        state,
        scheduler,
        vocab_size=session.vocab_size,
        padded_vocab_size=session.built.vocab_size,
    )
    logger = MetricsLogger(config, is_main=session.runtime.is_main)
    logger.print(_describe(session, state))
    online = OnlineMerge(config, state.model) if config.merge.online else None
    if online is not None:
        logger.print(online.describe())
    result = TrainResult(progress=Progress(), state=state)
    progress = result.progress = _resume(config, checkpointer, online, logger, result)
    if progress.iteration:
        result.resumed_from = progress.iteration
    train_batches = build_train_batches(
        session.data.train,
        session.data.anneal,
        session.loader(),
        global_batch_size=t.global_batch_size,
        dp_rank=session.dp_rank,
        dp_size=session.dp_size,
        consumed_samples=progress.consumed_train_samples,
        anneal_start_sample=config.data.anneal_start_sample(t.global_batch_size),
    )
    flops = flops_per_iteration(config, session.built.vocab_size)
    world = session.runtime.world_size
    window_start, window_iters = time.perf_counter(), 0
    pending: list[torch.Tensor | None] = []  # this log interval's [loss sum, tokens], on device
    while progress.iteration < t.train_iters:
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        lr = state.optimizer.param_groups[0]["lr"]
        loss = run_microbatches(
            state.model,
            train_batches,
            num_microbatches=session.num_microbatches,
            seq_length=config.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        if online is not None:
            online.fence()  # snapshot copies in flight finish before the weights change
        updated, grad_norm, _ = state.optimizer.step()
        if updated:
            scheduler.step(increment=t.global_batch_size)
        progress.iteration += 1
        progress.consumed_train_samples += t.global_batch_size
        progress.floating_point_operations += flops
        it = progress.iteration
        pending.append(loss)
        result.lrs[it] = lr
        window_iters += 1
        checkpointer.finalize(blocking=False)

        if it % config.logging.log_interval == 0 or it == t.train_iters:
            # Reduced once per log interval, as Megatron-LM does: no per-step sync or collective.
            steps = range(it - len(pending) + 1, it + 1)
            result.losses.update(zip(steps, global_token_means(pending), strict=True))
            pending = []
            elapsed = time.perf_counter() - window_start
            seconds = elapsed / window_iters
            window = [result.losses[i] for i in range(it - window_iters + 1, it + 1)]
            metrics = {
                "loss": sum(window) / len(window),
                "lr": lr,
                "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "consumed_samples": progress.consumed_train_samples,
                "tokens": progress.consumed_train_samples * config.seq_length,
                "iter_per_s": 1.0 / seconds,
                "tokens_per_s": config.tokens_per_iteration / seconds,
                "tflops_per_gpu": flops / seconds / world / 1e12,
                "skipped": not updated,
                **memory_gb(),
            }
            logger.print(console_line(it, t.train_iters, metrics, (t.train_iters - it) * seconds))
            logger.log("train", it, metrics)
            window_start, window_iters = time.perf_counter(), 0

        start = time.perf_counter()
        valid: dict[str, Any] = {}
        last = it == t.train_iters
        saving = checkpointer.due(progress, t.global_batch_size) or (
            last and config.checkpoint.save and checkpointer.last_saved != it
        )
        merging = saving and online is not None and online.due(progress)
        if merging or (t.eval_interval and (it % t.eval_interval == 0 or last)):
            valid["loss"] = result.val_losses[it] = _validate(session, state)
            logger.print(f"  validation loss at iteration {it}: {valid['loss']:.4f}")
        if saving:
            save_start = time.perf_counter()
            checkpointer.save(progress)
            logger.print(
                f"  saved checkpoint iteration {it} to {config.checkpoint.save} "
                f"({time.perf_counter() - save_start:.1f} s"
                f"{', writing asynchronously' if checkpointer.async_save else ''})"
            )
            if online is not None:
                online.on_save(progress)
        if merging:
            valid.update(_merge_point(session, state, online, checkpointer, progress, logger))
            if "merged_loss" in valid:
                result.merged_losses[it] = valid["merged_loss"]
            result.merge_points[it] = online.last_point
        if valid:
            logger.log("valid", it, {**valid, "tokens": it * config.tokens_per_iteration})
        window_start += time.perf_counter() - start  # not training throughput

    checkpointer.finalize(blocking=True)
    logger.close()
    return result


def _resume(
    config: WSMConfig,
    checkpointer: Checkpointer,
    online: OnlineMerge | None,
    logger: Any,
    result: TrainResult,
) -> Progress:
    """Resume from the newest checkpoint, first rebuilding the online merge's ring from the
    window's checkpoints on disk."""
    c = config.checkpoint
    root = c.load_dir
    found = resume_checkpoint(config)
    if online is not None and found is not None and not c.finetune:
        resume_iteration = found[1]
        rebuilt, missing = result.ring_rebuild = online.rebuild(root, resume_iteration)
        logger.print(
            f"  online merge: ring rebuilt from {root} (iterations {rebuilt + [resume_iteration]})"
        )
        if missing:
            logger.print(
                f"  WARNING: online merge: the window's checkpoints {missing} are not under "
                f"{root}; merges use the {len(rebuilt) + 1} present until the window refills"
            )
    progress = checkpointer.load() or Progress()
    if progress.iteration:
        logger.print(
            f"  resumed from {c.load_dir} at iteration {progress.iteration} "
            f"({progress.consumed_train_samples} samples consumed)"
        )
        if online is not None:
            online.on_resume(progress)
    return progress


def _validate(session: _Session, state: TrainState) -> float:
    """The validation loss of the model as it is."""
    with params_synced(state):
        return evaluate(
            state.model, session.valid_batches(), session.config, session.num_microbatches
        )


def _merge_point(
    session: _Session,
    state: TrainState,
    online: OnlineMerge,
    checkpointer: Checkpointer,
    progress: Progress,
    logger: MetricsLogger,
) -> dict[str, Any]:
    """Merge the ring into the model, evaluate (and save) the merged model, restore the live
    values; returns what to log beside the raw validation loss."""
    from wsm_megatron.merge.provenance import input_entries, merge_info

    config = session.config
    start = time.perf_counter()
    with online.merged(progress.iteration) as point:
        metrics: dict[str, Any] = {
            "merge_first": point.iterations[0],
            "merge_last": point.iterations[-1],
            "merge_checkpoints": len(point.iterations),
            "merge_schedule": point.schedule,
        }
        window = (
            f"{len(point.iterations)} checkpoints {point.iterations[0]}..{point.iterations[-1]}"
            f", {point.schedule}"
        )
        if point.nonfinite is not None:
            logger.print(
                f"  online merge at iteration {progress.iteration} ({window}) skipped: "
                f"{point.nonfinite}; training continues"
            )
            metrics["merge_nonfinite"] = point.nonfinite
            return metrics
        metrics["merged_loss"] = _validate(session, state)
        if config.merge.save_dir is not None:
            info = merge_info(
                tool="wsm-train online merge",
                input_root=config.checkpoint.save,
                inputs=input_entries(
                    config.checkpoint.save,
                    point.iterations,
                    point.positions,
                    point.weights.coefficients,
                ),
                weighting=online.weighting,
                weights=point.weights,
                accumulate_dtype="fp32",
                output_dtype=None,
                selection={
                    "mode": f"online, the newest {online.ring.capacity}",
                    "position_unit": "tokens",
                    "position_source": "consumed_train_samples x seq_length",
                },
            )
            checkpointer.save_merged(progress, config.merge.save_dir, info)
    logger.print(
        f"  merged model at iteration {progress.iteration} ({window}): validation loss "
        f"{metrics['merged_loss']:.4f} ({time.perf_counter() - start:.1f} s)"
    )
    return metrics


def eval_session(config: WSMConfig) -> tuple[_Session, list[torch.nn.Module]]:
    """Start the processes for evaluation only: the session (validation data, layout) and the
    model as evaluations hold it (no optimizer; fp16/bf16 through ``Float16Module``)."""
    session = _start(config, need_train=False)
    model: list[torch.nn.Module] = list(session.built.chunks)
    if mixed_precision(session.config):
        model = [Float16Module(session.built.config, chunk) for chunk in model]
    return session, model


def evaluate_checkpoints(config: WSMConfig, paths: list[str]) -> dict[str, dict[str, float]]:
    """Validation loss of each checkpoint (root or ``iter_*`` dir), weights only, in order."""
    for path in paths:  # a bad path fails before any start-up work
        resolve_checkpoint(path)
    session, model = eval_session(config)
    config = session.config
    # An evaluation logs next to what it evaluates, not next to the config's training run.
    logger = MetricsLogger(
        config, is_main=session.runtime.is_main, job_type="eval", default_dir=Path(paths[0]).parent
    )
    results = {}
    try:
        for path in paths:
            iteration = load_model_only(model, path)
            loss = evaluate(model, session.valid_batches(), config, session.num_microbatches)
            results[path] = {"iteration": iteration, "val_loss": loss}
            logger.print(f"{path} (iteration {iteration}): validation loss {loss:.4f}")
            logger.log("eval", iteration, {"loss": loss, "checkpoint": str(Path(path))})
            # one summary entry per checkpoint (the summary keeps only a key's last value)
            name = Path(path).name
            logger.summary({f"eval/{name}/loss": loss, f"eval/{name}/iteration": iteration})
    finally:
        logger.close()
    return results
