"""The WSM pre-training loop on Megatron-Core, and evaluation of saved or merged checkpoints.

:func:`pretrain` runs inside a launched process (torchrun, SLURM's srun, or a test's
``run_distributed``): it starts the distributed runtime, builds data, model, optimizer and LR
schedule, resumes from the newest checkpoint if there is one, and trains with Megatron's pipeline
schedules, checkpointing on the configured interval (retention prunes in the save's
finalisation). The loop keeps the step, its bookkeeping and the saves; metrics logging,
evaluation and the online merge are callbacks (:mod:`wsm_megatron.training.callbacks`) whose
lifecycle hooks it calls on every rank in the same order, never naming them.
:func:`evaluate_checkpoints` loads checkpoints weights-only (a merged checkpoint has nothing else)
at the training layout and reports their validation loss.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
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
from wsm_megatron.runtime.termination import StopRequests
from wsm_megatron.training.callbacks import (
    Callback,
    Callbacks,
    EvaluationCallback,
    MetricsCallback,
    OnlineMergeCallback,
    StepInfo,
    ValidRecord,
)
from wsm_megatron.training.checkpointing import (
    Checkpointer,
    Progress,
    choose_resume_checkpoint,
    load_model_only,
    recover_roots,
    resolve_checkpoint,
)
from wsm_megatron.training.config import WSMConfig, resolve_corpus
from wsm_megatron.training.evaluate import ValidBatches, evaluate
from wsm_megatron.training.loggers import MetricsLogger
from wsm_megatron.training.metrics import flops_per_iteration
from wsm_megatron.training.model import BuiltModel, build_model, count_parameters, mixed_precision
from wsm_megatron.training.online_merge import MergePoint
from wsm_megatron.training.optimizer import TrainState, params_synced, setup_model_and_optimizer
from wsm_megatron.training.schedules import build_scheduler
from wsm_megatron.training.steps import Batch, run_microbatches


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
    stopped: str | None = None
    """Why the run stopped before ``train.train_iters`` (a signal's name, or
    ``train.exit_duration_in_mins``) after saving; None when it ran to the end."""
    state: TrainState | None = None


@dataclass
class _Session:
    config: WSMConfig
    runtime: Runtime
    built: BuiltModel
    vocab_size: int
    data: DataSplits | None
    """None for an evaluation on lm-eval tasks (no validation data)."""
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


def _start(config: WSMConfig, *, need_train: bool, need_data: bool = True) -> _Session:
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
    # lm-eval tasks bring their own batches: the training batch arithmetic does not apply.
    num_microbatches = microbatches_per_rank(config, dp) if need_data else 0
    _set_random_seed(t.seed)
    config = resolve_corpus(config, progress=runtime.is_main)
    tokenizer = build_tokenizer(config.data)
    built = build_model(config, tokenizer.vocab_size)
    if not need_data:
        data = None
    else:
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
    """Train (or resume training) as ``config`` says; returns the progress and losses.

    A signal of ``train.exit_signals`` or the end of ``train.exit_duration_in_mins`` makes
    it save a checkpoint of the iteration it is at and return early (``result.stopped``)."""
    stop = StopRequests(
        config.train.exit_signals,
        config.train.exit_duration_in_mins,
        is_main=lambda: not dist.is_initialized() or dist.get_rank() == 0,
    )
    with stop:
        return _pretrain(config, stop)


def _pretrain(config: WSMConfig, stop: StopRequests) -> TrainResult:
    session = _start(config, need_train=True)
    config = session.config
    state = setup_model_and_optimizer(session.built, config)
    scheduler = build_scheduler(state.optimizer, config.train)
    checkpointer = Checkpointer(
        config,
        state,
        scheduler,
        vocab_size=session.vocab_size,
        padded_vocab_size=session.built.vocab_size,
    )
    logger = MetricsLogger(config, is_main=session.runtime.is_main)
    logger.print(_describe(session, state))
    result = TrainResult(progress=Progress(), state=state)
    callbacks = _callbacks(session, state, checkpointer, logger, result)
    try:
        result.progress = _resume(config, checkpointer, callbacks, logger)
        if result.progress.iteration:
            result.resumed_from = result.progress.iteration
        _Loop(session, state, scheduler, checkpointer, logger, callbacks, result, stop).run()
    finally:
        callbacks.close()
        logger.close()
    return result


def _callbacks(
    session: _Session,
    state: TrainState,
    checkpointer: Checkpointer,
    logger: MetricsLogger,
    result: TrainResult,
) -> Callbacks:
    """The loop's parts: metrics logging, evaluation and (``merge.online``) the online merge."""
    config, t = session.config, session.config.train
    validate = partial(_validate, session, state)
    record = ValidRecord(logger, config.tokens_per_iteration)
    flops = flops_per_iteration(config, session.built.vocab_size)
    metrics = MetricsCallback(config, logger, result.losses, flops, session.runtime.world_size)
    evaluation = EvaluationCallback(
        validate, record, logger, result.val_losses, t.eval_interval, t.train_iters
    )
    parts: list[Callback] = [metrics, evaluation]
    if config.merge.online:
        online = OnlineMergeCallback.build(
            config,
            state.model,
            validate=validate,
            checkpointer=checkpointer,
            logger=logger,
            record=record,
            result=result,
        )
        evaluation.before_save = online.due  # a merge point's raw loss, before the save
        parts.append(online)
    return Callbacks(parts)


def _resume(
    config: WSMConfig, checkpointer: Checkpointer, callbacks: Callbacks, logger: MetricsLogger
) -> Progress:
    """Resume from the newest checkpoint (``pre_resume`` first: the online merge rebuilds its
    ring from the window's checkpoints on disk)."""
    c = config.checkpoint
    recover_roots(config)
    found = choose_resume_checkpoint(config, logger.print)
    if found is not None and not c.finetune:
        callbacks.pre_resume(found[1])
    progress = checkpointer.load(found) or Progress()
    if progress.iteration:
        logger.print(
            f"  resumed from {c.load_dir} at iteration {progress.iteration} "
            f"({progress.consumed_train_samples} samples consumed)"
        )
        callbacks.post_checkpoint_loaded(progress)
    return progress


def _validate(session: _Session, state: TrainState) -> float:
    """The validation loss of the model as it is."""
    with params_synced(state):
        return evaluate(
            state.model, session.valid_batches(), session.config, session.num_microbatches
        )


@dataclass
class _Loop:
    """The training loop: the step, its bookkeeping and the saves; the rest are ``callbacks``."""

    session: _Session
    state: TrainState
    scheduler: OptimizerParamScheduler
    checkpointer: Checkpointer
    logger: MetricsLogger
    callbacks: Callbacks
    result: TrainResult
    stop: StopRequests

    def run(self) -> None:
        config, progress = self.session.config, self.result.progress
        t = config.train
        batches = self._train_batches()
        flops = flops_per_iteration(config, self.session.built.vocab_size)
        self.callbacks.pre_train(progress)
        first = progress.iteration
        while progress.iteration < t.train_iters:
            reason = self.stop.poll()  # every rank at the same boundary
            if reason is not None:
                self._save_and_stop(progress, reason, ran=progress.iteration > first)
                break
            info = self._step(batches)
            progress.iteration += 1
            progress.consumed_train_samples += t.global_batch_size
            progress.floating_point_operations += flops
            self.result.lrs[progress.iteration] = info.lr
            self.checkpointer.finalize(blocking=False)
            info.saves = self._saves(progress)
            self.callbacks.post_step(progress, info)
            if info.saves:
                self._save(progress)
        self.checkpointer.finalize(blocking=True)
        if self.result.stopped is None:
            self.callbacks.post_train(progress)

    def _save_and_stop(self, progress: Progress, reason: str, *, ran: bool) -> None:
        """The checkpoint of the iteration the run is at, unless one exists (synchronous; a
        stop save: no merge point, no snapshot), and the line that says so."""
        self.result.stopped = reason
        it, save = progress.iteration, self.session.config.checkpoint.save
        head = f"  stopping at iteration {it} ({reason})"
        if save is None:
            self.logger.print(f"{head}: checkpoint.save is not set, nothing saved")
        elif not ran:
            held = f"the checkpoint of iteration {it}" if it else "nothing (no step ran)"
            self.logger.print(f"{head} before its first step: {held} stays the resume point")
        elif self.checkpointer.last_saved == it:
            self.logger.print(f"{head}: its checkpoint is saved")
        else:
            start = time.perf_counter()
            self.checkpointer.save(progress, stop_reason=reason)
            self.logger.print(
                f"{head}: saved checkpoint iteration {it} to {save} "
                f"({time.perf_counter() - start:.1f} s); run the same command to resume"
            )

    def _train_batches(self) -> Iterator[Batch] | None:
        """This rank's training microbatches from where ``progress`` left off."""
        s, config = self.session, self.session.config
        t = config.train
        return build_train_batches(
            s.data.train,
            s.data.anneal,
            s.loader(),
            global_batch_size=t.global_batch_size,
            dp_rank=s.dp_rank,
            dp_size=s.dp_size,
            consumed_samples=self.result.progress.consumed_train_samples,
            anneal_start_sample=config.data.anneal_start_sample(t.global_batch_size),
        )

    def _step(self, batches: Iterator[Batch] | None) -> StepInfo:
        """One iteration's forward, backward and optimizer step."""
        started = time.perf_counter()
        state, config = self.state, self.session.config
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        lr = state.optimizer.param_groups[0]["lr"]
        loss = run_microbatches(
            state.model,
            batches,
            num_microbatches=self.session.num_microbatches,
            seq_length=config.seq_length,
            micro_batch_size=config.train.micro_batch_size,
            forward_only=False,
        )
        self.callbacks.pre_optim_step()
        updated, grad_norm, _ = state.optimizer.step()
        if updated:
            self.scheduler.step(increment=config.train.global_batch_size)
        return StepInfo(loss=loss, lr=lr, grad_norm=grad_norm, updated=updated, started=started)

    def _saves(self, progress: Progress) -> bool:
        """Whether the iteration just finished saves: a save interval, or the end of training."""
        config, it = self.session.config, progress.iteration
        last = it == config.train.train_iters
        return self.checkpointer.due(progress, config.train.global_batch_size) or (
            last and bool(config.checkpoint.save) and self.checkpointer.last_saved != it
        )

    def _save(self, progress: Progress) -> None:
        self.callbacks.pre_checkpoint_save(progress)
        start = time.perf_counter()
        self.checkpointer.save(progress)
        self.logger.print(
            f"  saved checkpoint iteration {progress.iteration} to "
            f"{self.session.config.checkpoint.save} ({time.perf_counter() - start:.1f} s"
            f"{', writing asynchronously' if self.checkpointer.async_save else ''})"
        )
        self.callbacks.post_checkpoint_saved(progress)


def eval_session(
    config: WSMConfig, *, validation: bool = True
) -> tuple[_Session, list[torch.nn.Module]]:
    """Start the processes for evaluation only: the session (layout, and with ``validation``
    the validation data and its batch arithmetic) and the model as evaluations hold it (no
    optimizer; fp16/bf16 through ``Float16Module``)."""
    session = _start(config, need_train=False, need_data=validation)
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
