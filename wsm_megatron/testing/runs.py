"""Small real training runs for tests: ``tiny-cpu`` made smaller still, and the trainer run in a
test's processes (``run_distributed(train_summary, N, overrides)``) returning what tests compare."""

from __future__ import annotations

import fcntl
import importlib.resources
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from wsm_megatron.atomic import atomic_write_bytes

T = TypeVar("T")

TINY_CONFIG = Path(str(importlib.resources.files("wsm_megatron.configs") / "tiny-cpu.yaml"))
SMALL_RUN = [  # tiny-cpu, smaller still: 4 layers of width 64 on 32-token sequences
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "data.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.lr_warmup_iters=2",
    "train.eval_iters=2",
    "logging.log_interval=2",
    "logging.wandb_mode=disabled",
    "corpus.vocab_size=512",
    "corpus.max_files=30",
    "merge.online=false",  # tests that want the online merge say so
]

TINY_MOE = [  # SMALL_RUN's model as an MoE: 2 layers, the second of 4 experts (top-2) + 1 shared
    "parallel.tensor_model_parallel_size=1",
    "model.num_layers=2",
    "model.num_experts=4",
    "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=32",
    "model.moe_shared_expert_intermediate_size=32",
    "model.moe_layer_freq=[0, 1]",
    "model.swiglu=true",
    "model.add_bias_linear=false",
    "model.moe_token_dispatcher_type=allgather",  # alltoall needs CUDA streams
]


def built_once(directory: Path, build: Callable[[], T]) -> T:
    """``build()``'s result, built once for all pytest-xdist workers of a session (pass a
    folder of the session's shared temporary directory): the first caller builds it under a
    file lock, the others wait for it and read it back (pickled)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / "built.pkl"
    with open(directory / "built.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            atomic_write_bytes(done, pickle.dumps(build()))
        return pickle.loads(done.read_bytes())


def train_summary(overrides: list[str]) -> dict[str, Any]:
    """Train ``tiny-cpu`` with ``overrides`` in this process; what the run and the model hold."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from wsm_megatron.training.config import load_config
    from wsm_megatron.training.trainer import pretrain

    result = pretrain(load_config(TINY_CONFIG, overrides))
    chunks = unwrap_model(result.state.model)
    weights = {}
    for i, chunk in enumerate(chunks):  # interleaved pipeline: "model1.decoder..." and so on
        prefix = "" if len(chunks) == 1 else f"model{i}."
        weights.update(
            (prefix + k, v.detach().numpy().copy())
            for k, v in chunk.state_dict().items()
            if isinstance(v, torch.Tensor)
        )
    return {
        "grid": (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
        ),
        "losses": result.losses,
        "val_losses": result.val_losses,
        "lrs": result.lrs,
        "resumed_from": result.resumed_from,
        "stopped": result.stopped,
        "iteration": result.progress.iteration,
        "merged_losses": result.merged_losses,
        "windows": {it: p.iterations for it, p in result.merge_points.items()},
        "coefficients": {it: p.weights.coefficients for it, p in result.merge_points.items()},
        "ring_rebuild": result.ring_rebuild,
        "weights": weights,
    }
