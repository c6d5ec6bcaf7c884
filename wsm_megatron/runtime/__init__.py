"""Distributed runtime: torchrun/SLURM start-up, Megatron parallel state, CPU compatibility."""

from wsm_megatron.runtime.distributed import (
    LaunchEnv,
    ParallelConfig,
    Runtime,
    decided_on_rank0,
    destroy_distributed,
    detect_launch_env,
    first_slurm_host,
    init_distributed,
)

__all__ = [
    "LaunchEnv",
    "ParallelConfig",
    "Runtime",
    "decided_on_rank0",
    "destroy_distributed",
    "detect_launch_env",
    "first_slurm_host",
    "init_distributed",
]
