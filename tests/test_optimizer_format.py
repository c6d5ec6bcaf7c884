"""The distributed optimizer's checkpoint format and DDP's bucket layout.

megatron-core's own ``DistributedOptimizer`` (bf16 weights, fp32 main weights and Adam moments
sharded over 2 data-parallel gloo ranks; on CPU through ``cuda_type_names``), saved and resumed
by the trainer's :class:`~wsm_megatron.training.checkpointing.Checkpointer`:

- in Megatron-LM's format (``dp_reshardable``), resumed at DP 2 and at DP 1 under the same
  bucket layout: the next step gives bitwise the weights of the run that went on;
- resumed under another bucket layout (``overlap_grad_reduce`` changed, either way): one line
  that names the setting, not megatron-core's bare assertion;
- why not a bucket-independent format: megatron-core 0.16's ``fully_reshardable`` misplaces the
  state of a layout with several buckets (a canary: when it passes, switch), and
  ``fully_sharded_model_space`` is refused by its own validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsm_megatron.layout import iteration_dir
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.runs import TINY_CONFIG

SMALL_BUCKETS = 2000  # parameters per bucket: several buckets in the tiny model


def _grads(model: torch.nn.Module, step: int) -> None:
    """Seeded gradients per parameter name and step: the same on every rank and layout."""
    for name, param in model.named_parameters():
        seed = int.from_bytes(f"{name}/{step}".encode()[-8:], "little") % 2**31
        g = torch.Generator().manual_seed(seed)
        param.main_grad.copy_(torch.randn(param.shape, generator=g))


def _run(
    root: str,
    mode: str,
    overlap: bool,
    bucket_size: int | None,
    sharding: str,
    fixed: bool = True,
) -> dict:
    """``save``: two steps, a checkpoint at 2 (in ``sharding``), a third step. ``load``: resume
    the checkpoint at 2, the third step. Returns the weights after step 3 and the buckets.
    ``fixed``: with the trainer's fix of megatron-core's ``fully_reshardable`` offsets."""
    from wsm_megatron.testing.checkpoints import (
        cuda_type_names,
        distributed_optimizer_model,
        torch_adam_step_kept,
    )
    from wsm_megatron.training.checkpointing import Checkpointer, Progress
    from wsm_megatron.training.config import load_config
    from wsm_megatron.training.optimizer import TrainState, fix_fully_reshardable_offsets
    from wsm_megatron.training.schedules import build_scheduler

    model, ddp, optimizer = distributed_optimizer_model(
        overlap_grad_reduce=overlap, bucket_size=bucket_size, clip_grad=0.0
    )
    config = load_config(
        TINY_CONFIG, [f"checkpoint.save={root}", "parallel.tensor_model_parallel_size=1"]
    )
    if fixed:
        fix_fully_reshardable_offsets(optimizer)
    state = TrainState([ddp], optimizer, distributed_optimizer=True, overlap_param_gather=False)
    checkpointer = Checkpointer(
        config,
        state,
        build_scheduler(optimizer, config.train),
        vocab_size=128,
        padded_vocab_size=128,
    )
    checkpointer.metadata["distrib_optim_sharding_type"] = sharding
    if sharding == "fully_reshardable":  # its gather over gloo (the other one needs CUDA)
        checkpointer.metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
    with cuda_type_names():
        if mode == "save":
            for step in (1, 2):
                _grads(model, step)
                optimizer.step()
            checkpointer.save(Progress(iteration=2, consumed_train_samples=32))
        else:
            with torch_adam_step_kept():
                checkpointer.load((iteration_dir(root, 2), 2))
        _grads(model, 3)
        optimizer.step()
    checkpointer.finalize(blocking=True)
    weights = {k: p.detach().float().numpy().copy() for k, p in model.named_parameters()}
    return {"weights": weights, "buckets": sum(len(b.buckets) for b in ddp.buffers)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _resume_error(root: str, overlap: bool) -> str:
    try:
        run_distributed(_run, 2, root, "load", overlap, SMALL_BUCKETS if overlap else None, DP)
    except RuntimeError as err:
        return str(err)
    raise AssertionError("the resume under another bucket layout was not refused")


DP = "dp_reshardable"


def test_megatron_lms_format_resumes_bitwise_at_another_dp_size(tmp_path: Path):
    root = str(tmp_path / "ckpts")
    straight = run_distributed(_run, 2, root, "save", True, SMALL_BUCKETS, DP)
    assert straight[0]["buckets"] > 2
    resumed = run_distributed(_run, 2, root, "load", True, SMALL_BUCKETS, DP)
    for a, b in zip(straight, resumed, strict=True):
        assert _same(a["weights"], b["weights"])
    (alone,) = run_distributed(_run, 1, root, "load", True, SMALL_BUCKETS, DP)  # DP 2 -> 1
    assert _same(alone["weights"], straight[0]["weights"])


@pytest.mark.parametrize("saved_overlap", [True, False])
def test_another_bucket_layout_is_refused_in_one_line(tmp_path: Path, saved_overlap: bool):
    root = str(tmp_path / "ckpts")
    run_distributed(_run, 2, root, "save", saved_overlap, SMALL_BUCKETS, DP)
    error = _resume_error(root, not saved_overlap)
    saved = f"buckets of {SMALL_BUCKETS} parameters" if saved_overlap else "one bucket"
    here = "one bucket" if saved_overlap else f"buckets of {SMALL_BUCKETS} parameters"
    assert (
        f"is keyed by DDP bucket (dp_reshardable) and was saved with {saved} "
        f"(overlap_grad_reduce={saved_overlap}); this run has {here}: set "
        f"parallel.overlap_grad_reduce={saved_overlap} as it was saved, or "
        "checkpoint.no_load_optim=true to start the optimizer afresh"
    ) in error
    assert "checkpoint.optimizer_format=fully_reshardable saves state that any bucket" in error


@pytest.mark.parametrize("saved_overlap", [True, False])
def test_fully_reshardable_resumes_under_any_bucket_layout_and_dp_size(
    tmp_path: Path, saved_overlap: bool
):
    # Megatron-LM with its defaults (one bucket) resumes it as we do: by its content metadata.
    root, full = str(tmp_path / "ckpts"), "fully_reshardable"
    saved = SMALL_BUCKETS if saved_overlap else None
    straight = run_distributed(_run, 2, root, "save", saved_overlap, saved, full)
    here = None if saved_overlap else SMALL_BUCKETS
    resumed = run_distributed(_run, 2, root, "load", not saved_overlap, here, full)
    assert sorted([straight[0]["buckets"], resumed[0]["buckets"]])[0] == 1
    for a, b in zip(straight, resumed, strict=True):
        assert _same(a["weights"], b["weights"])
    (alone,) = run_distributed(_run, 1, root, "load", not saved_overlap, here, full)  # DP 2 -> 1
    assert _same(alone["weights"], straight[0]["weights"])


def test_canary_megatron_cores_fully_reshardable_misplaces_several_buckets(tmp_path: Path):
    one, several = str(tmp_path / "one"), str(tmp_path / "several")
    full = "fully_reshardable"
    straight = run_distributed(_run, 2, one, "save", False, None, full, False)
    resumed = run_distributed(_run, 2, one, "load", False, None, full, False)
    assert _same(straight[0]["weights"], resumed[0]["weights"])  # one bucket: right
    straight = run_distributed(_run, 2, several, "save", True, SMALL_BUCKETS, full, False)
    resumed = run_distributed(_run, 2, several, "load", True, SMALL_BUCKETS, full, False)
    assert not _same(straight[0]["weights"], resumed[0]["weights"]), (
        "megatron-core's fully_reshardable now survives several buckets: drop our fix"
    )
    with pytest.raises(RuntimeError, match="flattened_range is not supported"):
        run_distributed(
            _run, 2, str(tmp_path / "fs"), "save", False, None, "fully_sharded_model_space"
        )
