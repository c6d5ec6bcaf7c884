"""The checks that span sections, run by :class:`WSMConfig` once every section is valid.

Each raises :class:`ConfigError` naming the key to change; they run in this file's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from wsm_megatron.training.config.checkpoint import interval_unset
from wsm_megatron.training.config.errors import ConfigError

if TYPE_CHECKING:
    from wsm_megatron.training.config.run import WSMConfig


def context_parallel_needs_te() -> str:
    """The one-line refusal of context parallelism without Transformer Engine attention."""
    return (
        "parallel.context_parallel_size: context parallelism needs Transformer Engine attention "
        "(model.transformer_impl transformer_engine or auto, on a GPU); Megatron's local "
        "attention does not split sequences"
    )


def check_parallel_layout(config: WSMConfig) -> None:
    """The model's shape against tensor, pipeline, context and expert parallelism."""
    m, p = config.model, config.parallel
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
    check_context_parallel(config)
    if ep > 1 and (not m.is_moe or m.num_experts % ep):
        raise ConfigError(
            f"parallel.expert_model_parallel_size: {ep} must divide model.num_experts "
            f"({m.num_experts})"
        )


def check_context_parallel(config: WSMConfig) -> None:
    """Context parallelism: Transformer Engine attention and a sequence that splits evenly."""
    cp = config.parallel.context_parallel_size
    if cp == 1:
        return
    if config.model.transformer_impl == "local":
        raise ConfigError(context_parallel_needs_te())
    if config.seq_length % (2 * cp):
        raise ConfigError(
            f"parallel.context_parallel_size: data.seq_length ({config.seq_length}) is not "
            f"divisible by 2 x context_parallel_size ({2 * cp}; Megatron's load-balanced "
            f"split)"
        )


def check_position_embeddings(config: WSMConfig) -> None:
    """``model.max_position_embeddings`` covers ``data.seq_length``."""
    m = config.model
    if m.max_position_embeddings is not None and m.max_position_embeddings < config.seq_length:
        raise ConfigError(
            f"model.max_position_embeddings: {m.max_position_embeddings} is shorter than "
            f"data.seq_length ({config.seq_length})"
        )


def check_merge_window(config: WSMConfig) -> None:
    """The merge window against the checkpoint saves; the online merge's needs."""
    c = config.checkpoint
    if config.merge.window is not None:
        interval = c.save_interval or c.save_interval_tokens
        if interval is None:
            raise ConfigError("merge.window: needs checkpoint.save_interval(_tokens)")
        if config.merge.window % interval:
            raise ConfigError(
                f"merge.window: {config.merge.window} is not a multiple of the save interval "
                f"({interval})"
            )
    if config.merge.online:
        if config.checkpoint.save is None or interval_unset(c):
            raise ConfigError(
                "merge.online: merges at checkpoint saves; set checkpoint.save and "
                "checkpoint.save_interval (or save_interval_tokens)"
            )
        if config.merge_quantity is None or config.merge_quantity < 2:
            raise ConfigError(
                "merge.quantity: the online merge needs a window of at least 2 checkpoints "
                f"(merge.quantity or merge.window; got {config.merge_quantity})"
            )


def check_merged_outputs_apart(config: WSMConfig) -> None:
    """``merge.save_dir`` neither is, nor holds, nor lies inside a training checkpoint folder:
    a merged (model-only) checkpoint would replace the training checkpoint of its iteration."""
    if config.merge.save_dir is None:
        return
    merged = Path(config.merge.save_dir).expanduser().resolve()
    c = config.checkpoint
    for key, folder in (("checkpoint.save", c.save), ("checkpoint.load", c.load)):
        if folder is None:
            continue
        training = Path(folder).expanduser().resolve()
        if merged == training:
            where = "is"
        elif merged.is_relative_to(training):
            where = "is inside"
        elif training.is_relative_to(merged):
            where = "contains"
        else:
            continue
        raise ConfigError(
            f"merge.save_dir: {config.merge.save_dir} {where} {key} ({folder}); merged models "
            "would replace or mix with the training checkpoints: choose a folder apart"
        )


def check_evaluation(config: WSMConfig) -> None:
    """Periodic evaluation has validation data."""
    if config.train.eval_interval is not None and config.data.split_fractions[1] == 0:
        if config.data.valid_data is None:
            raise ConfigError(
                "train.eval_interval: there is no validation data (set data.valid_data "
                "or a validation share in data.split)"
            )
