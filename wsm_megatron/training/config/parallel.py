"""``parallel``: how the model is split over the ranks."""

from __future__ import annotations

from dataclasses import dataclass

from wsm_megatron.training.config.errors import ConfigError, _positive


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
