"""Megatron-Core on CPU over gloo: TP=2, PP=2 GPTModel trains a step, round-trips a checkpoint."""

import os

import torch

from wsm_megatron.runtime import ParallelConfig, init_distributed
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.models import tiny_gpt

SEQ, MBS, VOCAB, MICROBATCHES = 16, 2, 128, 4


def _forward_backward(model):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    g = torch.Generator().manual_seed(0)
    batches = iter([torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g) for _ in range(4)])

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
        per_token = model(batch[:, :-1], positions, None, labels=batch[:, 1:])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return per_token, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=model,
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )


def _train_step_and_checkpoint(path):
    from megatron.core import dist_checkpointing, parallel_state

    runtime = init_distributed(ParallelConfig(2, 2))
    model = tiny_gpt(seed=1234)
    losses = _forward_backward(model)
    grads = [p.grad for p in model.parameters()]
    finite_grads = all(g is not None and torch.isfinite(g).all() for g in grads)
    nonzero_grads = sum(bool(g.abs().sum() > 0) for g in grads if g is not None)

    if runtime.rank == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)
    fresh = tiny_gpt(seed=99)
    differs_before = any(
        not torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), path))
    equal_after = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
        if isinstance(a, torch.Tensor)
    )
    return {
        "rank": runtime.rank,
        "tp": parallel_state.get_tensor_model_parallel_rank(),
        "pp": parallel_state.get_pipeline_model_parallel_rank(),
        "layers": len(model.decoder.layers),
        "losses": [float(x["lm loss"]) for x in losses],
        "finite_grads": finite_grads,
        "nonzero_grads": nonzero_grads,
        "num_params": len(grads),
        "qkv": model.decoder.layers[0].self_attention.linear_qkv.weight.detach().clone(),
        "differs_before": differs_before,
        "equal_after": equal_after,
    }


def test_tp2_pp2_gpt_forward_backward_and_checkpoint(tmp_path):
    results = run_distributed(_train_step_and_checkpoint, 4, str(tmp_path / "ckpt"))
    assert [(r["tp"], r["pp"]) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # Pipeline parallelism really splits the 4 layers over 2 stages.
    assert all(r["layers"] == 2 for r in results)
    # The loss comes out of the last stage only, the same on both tensor-parallel ranks.
    assert results[0]["losses"] == [] and results[1]["losses"] == []
    assert len(results[2]["losses"]) == MICROBATCHES
    assert results[2]["losses"] == results[3]["losses"]
    assert all(abs(x - torch.log(torch.tensor(VOCAB)).item()) < 1.0 for x in results[2]["losses"])
    # Backward reached every parameter on every stage.
    assert all(r["finite_grads"] and r["nonzero_grads"] == r["num_params"] for r in results)
    # The model-parallel RNG gives each tensor-parallel rank its own shard of the weights.
    assert not torch.equal(results[0]["qkv"], results[1]["qkv"])
    # The checkpoint round trip restores a differently initialised model exactly.
    assert all(r["differs_before"] and r["equal_after"] for r in results)
    assert (tmp_path / "ckpt" / ".metadata").is_file()
    assert len(list((tmp_path / "ckpt").glob("*.distcp"))) >= 4


def _killed_on_rank_1() -> int:
    import signal

    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return 0


def test_a_rank_killed_without_reporting_fails_the_run_at_once():
    """A rank that dies (the OOM killer, a crash in C) is reported within seconds, not after
    the whole timeout."""
    import time

    import pytest

    start = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"ranks died without reporting \(rank 1: exit code -9\)"
    ):
        run_distributed(_killed_on_rank_1, 2, timeout=300)
    assert time.monotonic() - start < 60
