"""Start torch.distributed and Megatron-Core's parallel state under torchrun, SLURM or alone.

One place decides rank, world size, local rank and rendezvous address:

- torchrun (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
  ``MASTER_PORT``) wins, also inside a SLURM allocation (``srun torchrun ...`` is common);
- otherwise SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, with the rendezvous host
  taken from ``MASTER_ADDR`` or else the first host of the job step's nodes
  (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``: a job with two steps on nodes of their
  own, training and ``wsm-watch``) and the port from ``MASTER_PORT`` or else a port derived
  from ``SLURM_JOB_ID``;
- otherwise a single process on localhost.

NCCL with one CUDA device per local rank when GPUs exist (the only visible one under a
one-GPU-per-task binding), gloo on CPU otherwise (and then the CPU compatibility layer of
:mod:`wsm_megatron.runtime.cpu_compat` is installed).
"""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from wsm_megatron.runtime import cpu_compat

T = TypeVar("T")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel sizes; the data-parallel size is what the world size leaves."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` processes; a clear error if it does not fit."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor"
                f" ({self.tensor_model_parallel_size}) x pipeline"
                f" ({self.pipeline_model_parallel_size})"
                f" x context ({self.context_parallel_size}) parallel sizes"
            )
        dp = world_size // self.model_parallel_size
        if (dp * self.context_parallel_size) % self.expert_model_parallel_size:
            raise ValueError(
                f"expert parallel size {self.expert_model_parallel_size} does not divide the "
                f"data x context parallel size {dp * self.context_parallel_size}"
            )
        return dp


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is empty")
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]

    def expand_first(match: re.Match[str]) -> str:
        return match.group(1).split(",")[0].split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", expand_first, first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    return host


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


# Linux hands out ports for bind(0) and outgoing connections from 32768-60999 by default, so a port
# chosen below that range cannot be taken by another process's automatic choice (gloo's pair
# sockets, say) between this check and the rendezvous store's bind.
RENDEZVOUS_PORTS = range(20000, 32768)


def slurm_job_port(job_id: int, ports: range = RENDEZVOUS_PORTS) -> int:
    """The rendezvous port of SLURM job ``job_id``: ``20000 + job_id % 12768`` (20000-32767).

    ``launch/slurm.sbatch`` exports the same ``MASTER_PORT`` (the two must agree): every task of
    the job derives the same port without talking, below the ephemeral range.
    """
    return ports.start + job_id % len(ports)


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a process with ``local_rank`` that sees ``visible`` GPUs.

    One visible GPU is this task's own (srun ``--gpus-per-task=1``, or any binding that gives
    each task one GPU through ``CUDA_VISIBLE_DEVICES``): device 0. Otherwise every task sees the
    node's GPUs and the local rank picks one.
    """
    if visible < 1:
        raise ValueError("no GPU is visible to this process")
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise ValueError(
        f"local rank {local_rank} sees {visible} GPUs: bind one GPU per task "
        "(srun --gpus-per-task=1) or all of the node's GPUs to every task"
    )


def free_port(ports: range = RENDEZVOUS_PORTS) -> int:
    """A TCP port that nothing holds now on any address, chosen at random from ``ports``."""
    for port in random.SystemRandom().sample(ports, min(len(ports), 256)):
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every address, as the rendezvous store binds
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {ports.start}-{ports.stop - 1}")


def detect_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size, local rank and rendezvous address from torchrun or SLURM variables."""
    env = os.environ if env is None else env
    torchrun_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if any(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        missing = [name for name in torchrun_vars if name not in env]
        if missing:
            raise ValueError(
                "incomplete torchrun environment: " + ", ".join(missing) + " not set"
                " (launch with torchrun, or unset RANK/WORLD_SIZE/LOCAL_RANK)"
            )
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local_rank, port = _int_var(env, "LOCAL_RANK"), _int_var(env, "MASTER_PORT")
        launched = LaunchEnv(rank, world, local_rank, env["MASTER_ADDR"], port, "torchrun")
    elif "SLURM_PROCID" in env or "SLURM_NTASKS" in env:
        missing = [n for n in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID") if n not in env]
        if missing:
            raise ValueError(
                "incomplete SLURM environment: " + ", ".join(missing) + " not set"
                " (run the job step with srun)"
            )
        rank, world = _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_NTASKS")
        local_rank = _int_var(env, "SLURM_LOCALID")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_STEP_NODELIST" in env:
            addr = first_slurm_host(env["SLURM_STEP_NODELIST"])
        elif "SLURM_JOB_NODELIST" in env:
            addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
        elif world == 1:
            addr = "127.0.0.1"
        else:
            raise ValueError("SLURM job without MASTER_ADDR or SLURM_JOB_NODELIST")
        if "MASTER_PORT" in env:
            port = _int_var(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = slurm_job_port(_int_var(env, "SLURM_JOB_ID"))
        else:
            raise ValueError("SLURM job without MASTER_PORT or SLURM_JOB_ID")
        launched = LaunchEnv(rank, world, local_rank, addr, port, "slurm")
    else:
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
        launched = LaunchEnv(0, 1, 0, addr, port, "single")

    if launched.world_size < 1:
        raise ValueError(f"world size must be >= 1, got {launched.world_size}")
    if not 0 <= launched.rank < launched.world_size:
        raise ValueError(f"rank {launched.rank} is outside world size {launched.world_size}")
    if launched.local_rank < 0 or launched.local_rank > launched.rank:
        raise ValueError(
            f"local rank {launched.local_rank} is inconsistent with rank {launched.rank}"
        )
    return launched


@dataclass(frozen=True)
class Runtime:
    """What :func:`init_distributed` set up."""

    launch: LaunchEnv
    device: torch.device
    backend: str
    parallel: ParallelConfig
    data_parallel_size: int

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0


def init_distributed(
    parallel: ParallelConfig | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout_minutes: float = 30.0,
    megatron: bool = True,
    seed: int | None = None,
    backend: str | None = None,
) -> Runtime:
    """Initialise torch.distributed (NCCL on GPUs, gloo on CPU) and Megatron's parallel state.

    ``megatron=False`` sets up only the process group: no Megatron import, no CPU compatibility
    layer (the merge tool needs neither). ``backend="gloo"`` forces CPU processes over gloo even
    where GPUs exist, so that the number of ranks per node is not tied to the GPU count (CPU-side
    work such as merging). With ``seed``, Megatron's model-parallel RNG tracker is seeded too.
    """
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    parallel = parallel or ParallelConfig()
    launch = detect_launch_env(env)
    dp = parallel.data_parallel_size(launch.world_size)
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "gloo" and megatron and torch.cuda.is_available():
        raise ValueError("backend 'gloo' on a GPU machine is for megatron=False (CPU-side work)")
    if backend == "nccl" and not use_cuda:
        raise ValueError("backend 'nccl' needs CUDA, and no GPU is visible")

    if use_cuda:
        index = cuda_device_index(launch.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        if megatron:
            cpu_compat.install()
        device, backend = torch.device("cpu"), "gloo"

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )

    if megatron:
        from megatron.core import parallel_state, tensor_parallel

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
        )
        if seed is not None:
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Runtime(launch, device, backend, parallel, dp)


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    global _GLOO_WORLD
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _GLOO_WORLD = None


def decided_on_rank0(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 only, its result (or its ``ValueError``) given to every rank.

    For every decision made from a listing of a shared file system (the resume iteration, the
    ring's window, the candidates of ``wsm-tune``): on a network file system two ranks can see
    different listings, and ranks that decide differently wait in different collectives forever.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    box: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except ValueError as err:  # a user error: every rank stops with the same line
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def first_on_any_rank(found: T | None) -> T | None:
    """The first rank's non-None ``found`` (rank order), known on every rank: a problem that
    some ranks saw (a file only they read, an error only they raised), agreed on by all."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return found
    gathered: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, found)
    return next((g for g in gathered if g is not None), None)


_GLOO_WORLD: dist.ProcessGroup | None = None


def world_gloo_group() -> dist.ProcessGroup:
    """A gloo group over every rank for host-side object collectives: the world group itself
    under gloo, else one gloo group made the first time it is asked for (every rank asks at
    the same point) and reused for the life of the process."""
    global _GLOO_WORLD
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if _GLOO_WORLD is None:
        _GLOO_WORLD = dist.new_group(backend="gloo")
    return _GLOO_WORLD
