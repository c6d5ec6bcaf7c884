"""A run's configuration: typed sections, YAML files, dot-notation overrides, one clear error.

``load_config("configs/tiny-cpu.yaml", ["model.num_layers=4", "train.lr=3e-3"])`` reads the YAML
file, applies the overrides (values parsed as YAML: ``3e-3``, ``true``, ``null``, ``[1, 2]``) and
builds a :class:`WSMConfig`. An unknown key, a value of the wrong type or an inconsistent setting
raises :class:`ConfigError` (a ``ValueError``) naming the key, e.g.
``train.lr: expected a number, got 'fast' (str)``.

Only what does not depend on the world size is checked here; the trainer checks the rest
(data-parallel size, global batch divisibility) when it knows how many processes there are.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from wsm_megatron.data.config import DataConfig
from wsm_megatron.theory import MergeWeightsError, canonical_schedule


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the offending key."""


def _positive(section: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name}: must be > 0, got {value}")


@dataclass
class ModelConfig:
    """The GPT architecture (Megatron-LM argument names). ``num_experts`` makes it an MoE."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    kv_channels: int | None = None
    max_position_embeddings: int | None = None
    position_embedding_type: Literal["learned_absolute", "rope"] = "rope"
    rotary_base: int = 10000
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    swiglu: bool = False
    add_bias_linear: bool = True
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_layer_freq: int | list[int] = 1
    """MoE every N-th layer (from layer 0), or a 0/1 pattern over the layers (1: MoE)."""
    moe_aux_loss_coeff: float = 1e-3
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_token_dispatcher_type: Literal["allgather", "alltoall"] = "alltoall"
    moe_grouped_gemm: bool = False
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """``auto``: Transformer Engine when it is importable on a GPU, else the local spec."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation (Megatron-LM's ``--recompute-granularity``): ``selective``
    recomputes the attention core, ``full`` whole layers (with ``recompute_method``)."""
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    bias_activation_fusion: bool = False
    """Megatron's fused kernels (GPU only; Megatron-LM's ``--no-bias-gelu-fusion``... flags)."""
    bias_dropout_fusion: bool = False
    masked_softmax_fusion: bool = False
    apply_rope_fusion: bool = False
    cross_entropy_loss_fusion: bool = False
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 training through Transformer Engine (GPU only)."""

    def __post_init__(self) -> None:
        _positive(
            "model",
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.kv_channels,
            max_position_embeddings=self.max_position_embeddings,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
            num_experts=self.num_experts,
            moe_router_topk=self.moe_router_topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
        )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size: {self.hidden_size} is not divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}); set model.kv_channels"
            )
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_query_groups: {self.num_query_groups} does not divide "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.num_experts is None:
            moe_only = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
            for name in moe_only:
                if getattr(self, name) is not None:
                    raise ConfigError(f"model.{name}: needs model.num_experts (an MoE model)")
        elif self.moe_router_topk > self.num_experts:
            raise ConfigError(
                f"model.moe_router_topk: {self.moe_router_topk} exceeds "
                f"model.num_experts ({self.num_experts})"
            )
        if self.moe_shared_expert_intermediate_size and self.add_bias_linear:
            raise ConfigError(
                "model.moe_shared_expert_intermediate_size: Megatron's shared expert has no "
                "biases; set model.add_bias_linear=false"
            )
        self._check_recompute()
        freq = self.moe_layer_freq
        if isinstance(freq, int) and freq < 1:
            raise ConfigError(f"model.moe_layer_freq: must be >= 1, got {freq}")
        if isinstance(freq, list) and (len(freq) != self.num_layers or set(freq) - {0, 1}):
            raise ConfigError(
                f"model.moe_layer_freq: a pattern needs one 0 (dense) or 1 (MoE) per layer "
                f"({self.num_layers}), got {freq}"
            )

    def _check_recompute(self) -> None:
        full = self.recompute_granularity == "full"
        if full and (self.recompute_method is None or self.recompute_num_layers is None):
            raise ConfigError(
                "model.recompute_granularity: 'full' needs model.recompute_method "
                "(uniform or block) and model.recompute_num_layers"
            )
        if not full and (self.recompute_method or self.recompute_num_layers):
            raise ConfigError(
                "model.recompute_method: applies to recompute_granularity 'full' only"
            )
        if full and not 0 < self.recompute_num_layers <= self.num_layers:
            raise ConfigError(
                f"model.recompute_num_layers: must be in 1..{self.num_layers} (num_layers), "
                f"got {self.recompute_num_layers}"
            )

    @property
    def fused_kernels(self) -> list[str]:
        """The fusion switches that are on."""
        names = (
            "bias_activation_fusion",
            "bias_dropout_fusion",
            "masked_softmax_fusion",
            "apply_rope_fusion",
            "cross_entropy_loss_fusion",
        )
        return [n for n in names if getattr(self, n)]

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def moe_layers(self) -> list[bool]:
        """Which layers are MoE layers (Megatron's reading of ``moe_layer_freq``)."""
        if not self.is_moe:
            return [False] * self.num_layers
        if isinstance(self.moe_layer_freq, list):
            return [bool(x) for x in self.moe_layer_freq]
        return [i % self.moe_layer_freq == 0 for i in range(self.num_layers)]


@dataclass
class ParallelismConfig:
    """How the model is split; the data-parallel size is what the world size leaves."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved pipeline: model chunks per pipeline rank (Megatron-LM's name); the global
    batch must give each rank a multiple of ``pipeline_model_parallel_size`` microbatches."""
    context_parallel_size: int = 1
    """Split each sequence over this many ranks (needs Transformer Engine attention, a GPU)."""
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with GEMMs (Megatron-LM's ``--tp-comm-overlap``;
    Transformer Engine on a GPU, with sequence parallelism)."""
    use_distributed_optimizer: bool = True
    """GPU only: Megatron's distributed optimizer (the CPU path uses Megatron's FP32 optimizer)."""
    overlap_grad_reduce: bool = True
    """GPU only: overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = True
    """GPU only, with the distributed optimizer: overlap the parameter all-gather."""

    def __post_init__(self) -> None:
        _positive(
            "parallel",
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            context_parallel_size=self.context_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
        )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel: needs tensor_model_parallel_size > 1")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp < 2:
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size: must be >= 2 model chunks per "
                f"pipeline rank, got {vpp} (null: no interleaving)"
            )
        if vpp is not None and self.pipeline_model_parallel_size == 1:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size: the interleaved schedule needs "
                "pipeline_model_parallel_size > 1"
            )
        if self.tp_comm_overlap and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.tp_comm_overlap: needs tensor_model_parallel_size > 1")
        if self.tp_comm_overlap and not self.sequence_parallel:
            raise ConfigError("parallel.tp_comm_overlap: needs parallel.sequence_parallel=true")

    @property
    def model_chunks(self) -> int:
        """Model chunks per pipeline rank (1 without interleaving)."""
        return self.virtual_pipeline_model_parallel_size or 1


@dataclass
class TrainConfig:
    """Iterations, batch sizes, AdamW, the LR schedule, precision and evaluation cadence.

    LR schedules (Megatron's ``OptimizerParamScheduler``; all start with a linear warmup):
    ``wsm`` constant after warmup (WSM's default: no decay, merge checkpoints instead);
    ``wsd`` constant, then a decay over the last ``lr_wsd_decay_iters`` of ``lr_decay_iters``
    in ``lr_wsd_decay_style``; ``cosine``/``linear`` decay to ``min_lr`` at ``lr_decay_iters``.
    """

    train_iters: int
    micro_batch_size: int
    global_batch_size: int
    lr: float
    min_lr: float = 0.0
    lr_schedule: Literal["wsm", "wsd", "cosine", "linear"] = "wsm"
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_iters: int | None = None
    """Where cosine/linear/WSD decays end (default: ``train_iters``)."""
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = "minus_sqrt"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = True
    """GPU only: bf16 weights and activations with fp32 main weights; the CPU path runs fp32."""
    seed: int = 1234
    eval_interval: int | None = None
    eval_iters: int = 10

    def __post_init__(self) -> None:
        _positive(
            "train",
            train_iters=self.train_iters,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            lr=self.lr,
            lr_decay_iters=self.lr_decay_iters,
            lr_wsd_decay_iters=self.lr_wsd_decay_iters,
            adam_eps=self.adam_eps,
            eval_interval=self.eval_interval,
            eval_iters=self.eval_iters,
        )
        for name in ("min_lr", "lr_warmup_iters", "lr_warmup_init", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        if self.min_lr > self.lr or self.lr_warmup_init > self.lr:
            raise ConfigError(
                f"train.lr: the peak LR {self.lr} is below min_lr ({self.min_lr}) "
                f"or lr_warmup_init ({self.lr_warmup_init})"
            )
        if self.lr_warmup_iters >= self.decay_iters:
            raise ConfigError(
                f"train.lr_warmup_iters: {self.lr_warmup_iters} must be smaller than "
                f"lr_decay_iters ({self.decay_iters}; default train_iters)"
            )
        if self.lr_schedule == "wsd":
            if self.lr_wsd_decay_iters is None:
                raise ConfigError(
                    "train.lr_wsd_decay_iters: the wsd schedule needs its decay length"
                )
            if self.lr_wsd_decay_iters > self.decay_iters - self.lr_warmup_iters:
                raise ConfigError(
                    f"train.lr_wsd_decay_iters: {self.lr_wsd_decay_iters} exceeds the "
                    f"{self.decay_iters - self.lr_warmup_iters} iterations after warmup"
                )
        elif self.lr_wsd_decay_iters is not None:
            raise ConfigError(
                f"train.lr_wsd_decay_iters: only the wsd schedule decays in a final phase "
                f"(lr_schedule is {self.lr_schedule!r})"
            )

    @property
    def decay_iters(self) -> int:
        """``lr_decay_iters``, defaulting to ``train_iters``."""
        return self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters


@dataclass
class CheckpointConfig:
    """Megatron-LM ``torch_dist`` checkpoints: where, how often, what to resume, what to keep.

    ``load`` defaults to ``save``: a run restarted with the same config resumes. Pruning keeps
    the newest checkpoints that the merge window needs (``merge.quantity``/``merge.window``) and
    every checkpoint whose iteration is a multiple of ``keep_every``; without a merge window
    nothing is pruned.
    """

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    """Save every this many iterations."""
    save_interval_tokens: int | None = None
    """Or: save whenever the consumed tokens cross a multiple of this."""
    async_save: bool | None = None
    """Write in the background (Megatron's async ``torch_dist`` save). ``null``: on GPU only."""
    keep_every: int | None = None
    prune: bool = True
    load_iteration: int | None = None
    """Resume from this iteration of ``load`` instead of the tracker's (Megatron's
    ``--ckpt-step``), e.g. to branch a WSD decay from a WSM checkpoint."""
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    """Load weights only and start at iteration 0 with fresh data position, optimizer and RNG."""

    def __post_init__(self) -> None:
        _positive(
            "checkpoint",
            save_interval=self.save_interval,
            save_interval_tokens=self.save_interval_tokens,
            keep_every=self.keep_every,
            load_iteration=self.load_iteration,
        )
        if self.save_interval is not None and self.save_interval_tokens is not None:
            raise ConfigError(
                "checkpoint.save_interval_tokens: set either save_interval (iterations) or "
                "save_interval_tokens, not both"
            )
        if self.save is None and (self.save_interval or self.save_interval_tokens):
            raise ConfigError("checkpoint.save: a save interval needs a checkpoint directory")
        if self.load_iteration is not None and self.load_dir is None:
            raise ConfigError("checkpoint.load_iteration: needs checkpoint.load (or save)")

    @property
    def load_dir(self) -> str | None:
        return self.save if self.load is None else self.load


@dataclass
class MergeConfig:
    """The merge window WSM uses, and the online merge that forms the merged model while training.

    ``quantity`` is the number of newest checkpoints merged; ``window`` is the merge duration in
    the save interval's unit (iterations or tokens), ``quantity = window / interval``. ``schedule``
    names the merge weights (see ``wsm-coeffs``; ``linear`` is the plain mean), with
    ``min_lr_ratio`` and ``ema_beta`` as in ``wsm-merge``. The window decides which checkpoints
    training keeps.

    ``online``: at every ``every``-th checkpoint save, each rank merges the values of its own shard
    from a ring of snapshots of the window's newest saves (on ``snapshot_device``: pinned host
    memory or GPU memory, at most ``snapshot_memory_gb`` per rank), evaluates the merged model
    on the validation batches, optionally saves it under ``save_dir`` in ``wsm-merge``'s format,
    and puts the live values back.
    """

    quantity: int | None = None
    window: int | None = None
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    ema_beta: float | None = None
    online: bool = False
    every: int = 1
    snapshot_device: Literal["cpu", "gpu"] = "cpu"
    snapshot_memory_gb: float = 64.0
    save_dir: str | None = None

    def __post_init__(self) -> None:
        _positive(
            "merge",
            quantity=self.quantity,
            window=self.window,
            every=self.every,
            snapshot_memory_gb=self.snapshot_memory_gb,
        )
        if self.quantity is not None and self.window is not None:
            raise ConfigError("merge.window: set either merge.quantity or merge.window, not both")
        try:
            self.schedule = canonical_schedule(self.schedule)
        except MergeWeightsError as err:
            raise ConfigError(f"merge.schedule: {err}") from None
        try:
            self.weighting()
        except ValueError as err:  # the flag names of wsm-merge, as keys of this section
            message = str(err).replace("--min-lr-ratio", "merge.min_lr_ratio")
            message = message.replace("--ema-beta", "merge.ema_beta")
            message = message.replace("--schedule", "merge.schedule")
            message = message if message.startswith("merge.") else f"merge: {message}"
            raise ConfigError(message) from None
        if self.save_dir is not None and not self.online:
            raise ConfigError("merge.save_dir: saving merged models needs merge.online=true")

    def weighting(self) -> Any:
        """The merge weights, as ``wsm-merge`` resolves them (one rule for both)."""
        from wsm_megatron.merge.config import Weighting

        return Weighting(
            schedule=self.schedule, min_lr_ratio=self.min_lr_ratio, ema_beta=self.ema_beta
        )


def interval_unset(c: CheckpointConfig) -> bool:
    return c.save_interval is None and c.save_interval_tokens is None


@dataclass
class LoggingConfig:
    """Console every ``log_interval`` iterations; wandb (offline by default); TensorBoard."""

    log_interval: int = 10
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "wsm-megatron"
    wandb_name: str | None = None
    wandb_dir: str | None = None
    """Default: the parent of ``checkpoint.save`` (or the current directory)."""
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    """A JSON-lines record of every logged iteration and evaluation."""

    def __post_init__(self) -> None:
        _positive("logging", log_interval=self.log_interval)


CORPUS_PENDING = "<built from the corpus section>"
"""What ``data.train_data``/``valid_data`` hold until :func:`resolve_corpus` builds the corpus."""


@dataclass
class CorpusConfig:
    """The embedded corpus (Python's standard library source) in place of ``data.*_data``.

    With ``name: stdlib`` the run builds (once; cached under ``cache_dir``) a SentencePiece
    tokenizer and train/validation datasets from this interpreter's standard library, so a first
    run needs no data at all.
    """

    name: Literal["stdlib"] | None = None
    vocab_size: int = 8192
    max_files: int | None = None
    cache_dir: str | None = None
    """Default: ``$XDG_CACHE_HOME/wsm-megatron`` (``~/.cache/wsm-megatron``)."""

    def __post_init__(self) -> None:
        _positive("corpus", vocab_size=self.vocab_size, max_files=self.max_files)


@dataclass
class WSMConfig:
    """A whole run. Sections: model, parallel, train, data, corpus, checkpoint, merge, logging."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    parallel: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        tp, pp, ep = (
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            p.expert_model_parallel_size,
        )
        if m.num_attention_heads % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size: {tp} does not divide "
                f"model.num_attention_heads ({m.num_attention_heads})"
            )
        if m.num_query_groups and m.num_query_groups % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size: {tp} does not divide "
                f"model.num_query_groups ({m.num_query_groups})"
            )
        if m.num_layers % pp:
            raise ConfigError(
                f"parallel.pipeline_model_parallel_size: {pp} does not divide "
                f"model.num_layers ({m.num_layers})"
            )
        if m.num_layers % (pp * p.model_chunks):
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size: model.num_layers "
                f"({m.num_layers}) is not divisible by pipeline x virtual pipeline size "
                f"({pp} x {p.model_chunks})"
            )
        self._check_context_parallel()
        if ep > 1 and (not m.is_moe or m.num_experts % ep):
            raise ConfigError(
                f"parallel.expert_model_parallel_size: {ep} must divide model.num_experts "
                f"({m.num_experts})"
            )
        if m.max_position_embeddings is not None and m.max_position_embeddings < self.seq_length:
            raise ConfigError(
                f"model.max_position_embeddings: {m.max_position_embeddings} is shorter than "
                f"data.seq_length ({self.seq_length})"
            )
        c = self.checkpoint
        if self.merge.window is not None:
            interval = c.save_interval or c.save_interval_tokens
            if interval is None:
                raise ConfigError("merge.window: needs checkpoint.save_interval(_tokens)")
            if self.merge.window % interval:
                raise ConfigError(
                    f"merge.window: {self.merge.window} is not a multiple of the save interval "
                    f"({interval})"
                )
        if self.merge.online:
            if self.checkpoint.save is None or interval_unset(c):
                raise ConfigError(
                    "merge.online: merges at checkpoint saves; set checkpoint.save and "
                    "checkpoint.save_interval (or save_interval_tokens)"
                )
            if self.merge_quantity is None or self.merge_quantity < 2:
                raise ConfigError(
                    "merge.quantity: the online merge needs a window of at least 2 checkpoints "
                    f"(merge.quantity or merge.window; got {self.merge_quantity})"
                )
        if self.train.eval_interval is not None and self.data.split_fractions[1] == 0:
            if self.data.valid_data is None:
                raise ConfigError(
                    "train.eval_interval: there is no validation data (set data.valid_data "
                    "or a validation share in data.split)"
                )

    def _check_context_parallel(self) -> None:
        cp = self.parallel.context_parallel_size
        if cp == 1:
            return
        if self.model.transformer_impl == "local":
            raise ConfigError(context_parallel_needs_te())
        if self.seq_length % (2 * cp):
            raise ConfigError(
                f"parallel.context_parallel_size: data.seq_length ({self.seq_length}) is not "
                f"divisible by 2 x context_parallel_size ({2 * cp}; Megatron's load-balanced "
                f"split)"
            )

    @property
    def seq_length(self) -> int:
        return self.data.seq_length

    @property
    def tokens_per_iteration(self) -> int:
        return self.train.global_batch_size * self.data.seq_length

    @property
    def merge_quantity(self) -> int | None:
        """How many newest checkpoints the merge window spans (None: no window configured)."""
        if self.merge.quantity is not None:
            return self.merge.quantity
        if self.merge.window is not None:
            c = self.checkpoint
            return self.merge.window // (c.save_interval or c.save_interval_tokens)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building from dicts

_SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelismConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "corpus": CorpusConfig,
    "checkpoint": CheckpointConfig,
    "merge": MergeConfig,
    "logging": LoggingConfig,
}


def context_parallel_needs_te() -> str:
    """The one-line refusal of context parallelism without Transformer Engine attention."""
    return (
        "parallel.context_parallel_size: context parallelism needs Transformer Engine attention "
        "(model.transformer_impl transformer_engine or auto, on a GPU); Megatron's local "
        "attention does not split sequences"
    )


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` as type ``tp`` (YAML-level conversions only), or ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _coerce(arm, value, key)
            except ConfigError:
                continue
        expected = " or ".join(_type_name(a) for a in arms)
        raise ConfigError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        # PyYAML reads "3e-3" (no dot) as a string; accept any finite number written out.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # "1e6" written for an integer
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if number.is_integer() and abs(number) < 2**53:
                    return int(number)
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    else:
        raise AssertionError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"{prefix}.{key}: unknown key (valid keys: {', '.join(sorted(fields))})"
            )
    missing = [
        name
        for name, f in fields.items()
        if name not in raw
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}: required, not set")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}.{name}") for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a section's own validation (the data section's)
        message = str(err)
        own = f"{cls.__name__}."  # keys named by class: data.split, not DataConfig.split
        if message.startswith(own):
            raise ConfigError(f"{prefix}.{message[len(own) :]}") from None
        raise ConfigError(f"{prefix}: {message}") from None


def config_from_dict(raw: Mapping[str, Any]) -> WSMConfig:
    """Build and validate a :class:`WSMConfig` from nested mappings (a parsed YAML file)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {raw!r}")
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"{key}: unknown section (valid sections: {', '.join(_SECTIONS)})")
    for name in ("model", "train", "data"):
        if name not in raw:
            raise ConfigError(f"{name}: required section, not set")
    corpus = _build_section(CorpusConfig, raw.get("corpus"), "corpus")
    sections = {
        name: _build_section(cls, raw[name], name)
        for name, cls in _SECTIONS.items()
        if name in raw and name not in ("data", "corpus")
    }
    data = dict(raw["data"] or {})
    if corpus.name is not None:
        for key in (
            "train_data",
            "valid_data",
            "tokenizer_type",
            "tokenizer_model",
            "vocab_file",
            "merge_file",
        ):
            if data.get(key) not in (None, CORPUS_PENDING):
                raise ConfigError(
                    f"data.{key}: comes from corpus.name={corpus.name}; "
                    f"set corpus.name=null to use your own data"
                )
        data.update(train_data=CORPUS_PENDING, valid_data=CORPUS_PENDING)
    return WSMConfig(data=_build_section(DataConfig, data, "data"), corpus=corpus, **sections)


def default_cache_dir() -> Path:
    """Where built corpora are cached: ``$XDG_CACHE_HOME/wsm-megatron``, else
    ``~/.cache/wsm-megatron``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wsm-megatron"


def resolve_corpus(config: WSMConfig, *, progress: bool = True) -> WSMConfig:
    """``config`` with ``data.*`` pointing at the built corpus (building it once, cached).

    Safe to call on every rank at once (the corpus build is locked); a no-op without a corpus.
    """
    if config.corpus.name is None:
        return config
    from wsm_megatron.data.corpus import default_corpus

    c = config.corpus
    files = default_corpus(
        Path(c.cache_dir).expanduser() if c.cache_dir else default_cache_dir(),
        vocab_size=c.vocab_size,
        max_files=c.max_files,
        progress=progress,
    )
    data = dataclasses.replace(
        config.data,
        train_data=files.train_prefix,
        valid_data=files.valid_prefix,
        tokenizer_model=files.tokenizer_model,
    )
    return dataclasses.replace(config, data=data)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            raise ConfigError(f"{item}: an override is section.key=value, e.g. train.lr=3e-3")
        if len(parts) < 2:
            raise ConfigError(f"{key}: not a section.key; {_where_is(key, text)}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{key}: cannot parse value {text!r}: {problem}") from None
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _where_is(key: str, value: str) -> str:
    """A hint for an override without its section: the sections that have ``key``."""
    if key in _SECTIONS:
        return f"{key} is a section: set one of its keys, e.g. {key}.<key>={value}"
    owners = [
        name for name, cls in _SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}
    ]
    if owners:
        return "did you mean " + " or ".join(f"{o}.{key}={value}" for o in owners) + "?"
    return f"overrides are section.key=value, sections: {', '.join(_SECTIONS)}"


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> WSMConfig:
    """Read a YAML config (or start empty), apply dot-notation overrides and validate."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(raw, overrides))


def dump_config(config: WSMConfig) -> str:
    """The resolved configuration as YAML (what a run records next to its checkpoints)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
