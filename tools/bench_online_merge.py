"""Benchmark the trainer's online merge: its cost per merge point against the training step.

    python tools/bench_online_merge.py --config configs/tiny-cpu.yaml      # 1 process
    torchrun --nproc-per-node 2 tools/bench_online_merge.py --config configs/tiny-cpu.yaml
    torchrun --nproc-per-node 1 tools/bench_online_merge.py --config configs/gpt-125m.yaml \\
        --interval 1000                                                     # on a GPU

Builds the config's model and optimizer at its TP/PP layout (synthetic tokens, no data or
tokenizer), times training steps, then the online merge's pieces on a full ring: taking a
snapshot (copy of the rank's slice; on GPU asynchronous, so also the time until it is done),
forming the merged values in the model (slice combine + all-gather), restoring the live values
(all-gather of the newest slices). Prints each, the ring's memory per rank and per node (and
what an unsliced ring would hold), the bytes a ring rebuild reads from disk per rank and in all
(the window saved once, then loaded back as a restart does), and the merge point's share of the
training time of one save interval (``--interval`` iterations; default the config's), without
and with the merged model's evaluation (``train.eval_iters`` forward batches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warmup)")
    p.add_argument("--repeats", type=int, default=5, help="timed merge points")
    p.add_argument("--interval", type=int, help="save interval in iterations (default: config)")
    p.add_argument("--vocab-size", type=int, default=50257, help="synthetic vocabulary")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    return p.parse_args()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` (synchronised on GPU)."""
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batches(config, vocab: int) -> Iterator[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shape = (config.train.micro_batch_size, config.seq_length)
    while True:
        tokens = torch.randint(0, vocab, shape, generator=g)
        yield {
            "tokens": tokens,
            "labels": torch.roll(tokens, -1, 1),
            "loss_mask": torch.ones(shape),
            "position_ids": torch.arange(shape[1]).expand(shape),
        }


def main() -> int:
    args = _parse()
    from wsm_megatron.cli.train import _quiet_imports

    _quiet_imports()
    from megatron.core import parallel_state, tensor_parallel

    from wsm_megatron.runtime import ParallelConfig, init_distributed
    from wsm_megatron.snapshots.ring import ring_bytes
    from wsm_megatron.training.config import load_config
    from wsm_megatron.training.model import build_model
    from wsm_megatron.training.online_merge import OnlineMerge
    from wsm_megatron.training.optimizer import setup_model_and_optimizer
    from wsm_megatron.training.steps import run_microbatches

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            args.config,
            [
                f"checkpoint.save={tmp}",
                "merge.online=true",
                "corpus.name=null",
                "data.train_data=[synthetic]",
                *args.overrides,
            ],
        )
    p = config.parallel
    runtime = init_distributed(
        ParallelConfig(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    )
    tensor_parallel.model_parallel_cuda_manual_seed(config.train.seed)
    state = setup_model_and_optimizer(build_model(config, args.vocab_size), config)
    dp = parallel_state.get_data_parallel_world_size()
    microbatches = config.train.global_batch_size // (config.train.micro_batch_size * dp)
    batches = _batches(config, args.vocab_size)

    def step(forward_only: bool = False) -> None:
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        run_microbatches(
            state.model,
            batches,
            num_microbatches=microbatches,
            seq_length=config.seq_length,
            micro_batch_size=config.train.micro_batch_size,
            forward_only=forward_only,
        )
        if not forward_only:
            state.optimizer.step()

    _time(step, 2)
    step_s = _time(step, args.steps)
    eval_s = _time(lambda: [step(True) for _ in range(config.train.eval_iters)], 1)

    online = OnlineMerge(config, state.model)
    n = online.ring.capacity
    for i in range(n):
        online.ring.take(i + 1, i + 1)
    take_s = _time(lambda: online.ring.take(n + 1, n + 1), args.repeats)
    issue_s = _time(lambda: online.ring.take(n + 1, n + 1) or online.ring.fence(), args.repeats)
    online.ring.ready()
    entries = list(online.ring.entries)
    merge_s = _time(lambda: online.ring.merge_into_live(entries, (1 / n,) * n), args.repeats)
    restore_s = _time(online._restore, args.repeats)

    rebuild_s, read = _rebuild(online, state.model, config)
    whole = ring_bytes(online.values, n, shard=False)

    interval = args.interval or config.checkpoint.save_interval or 1000
    point = take_s + merge_s + restore_s
    train_s = interval * step_s
    if runtime.is_main:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(
            f"online merge benchmark: {args.config} on {runtime.world_size} rank(s), {device}\n"
            f"  training step               {step_s * 1e3:10.1f} ms\n"
            f"  ring                        {n} x {online.ring.snapshot_bytes / 2**20:.3f} MiB "
            f"= {online.ring.nbytes / 2**20:.3f} MiB per rank ({len(online.values)} tensors; "
            f"unsliced {whole / 2**20:.3f} MiB)\n"
            f"{online.describe()}\n"
            f"  rebuild of {n} checkpoints  {rebuild_s * 1e3:10.1f} ms, read {read[0] / 2**20:.2f} "
            f"MiB on rank 0, {read[1] / 2**20:.2f} MiB on all ranks\n"
            f"  snapshot (copy, done)       {take_s * 1e3:10.2f} ms"
            f"  (issue only: {issue_s * 1e3:.2f} ms)\n"
            f"  merge {n} snapshots          {merge_s * 1e3:10.2f} ms\n"
            f"  restore live values         {restore_s * 1e3:10.2f} ms\n"
            f"  merged evaluation           {eval_s * 1e3:10.1f} ms "
            f"({config.train.eval_iters} forward batches)\n"
            f"  share of a {interval}-iteration interval: {100 * point / train_s:.3f} % "
            f"(merge only), {100 * (point + eval_s) / train_s:.3f} % (with merged evaluation)"
        )
    return 0


def _rebuild(online, model, config) -> tuple[float, tuple[int, int]]:
    """Save the ring's window as model-only checkpoints, then time a rebuild that reads them
    back as a restart does; returns its seconds and the bytes read (this rank, all ranks)."""
    from argparse import Namespace

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import filesystem

    from wsm_megatron.layout import iteration_dir
    from wsm_megatron.snapshots.loading import load_snapshots
    from wsm_megatron.training.checkpointing import model_sharded_state_dict

    box = [tempfile.mkdtemp(prefix="wsm-bench-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box)  # one folder for every rank
    root = box[0]
    iterations = list(range(1, online.ring.capacity + 1))
    for it in iterations:
        ckpt = iteration_dir(root, it)
        if dist.get_rank() == 0:
            ckpt.mkdir(parents=True)
        dist.barrier()
        state = {"args": Namespace(consumed_train_samples=it), **model_sharded_state_dict(model)}
        dist_checkpointing.save(state, str(ckpt))
    read = [0]
    slice_file = filesystem.FileSystemReader._slice_file

    def counted(self, file, sinfo):
        read[0] += sinfo.length
        return slice_file(self, file, sinfo)

    filesystem.FileSystemReader._slice_file = counted
    _sync()
    start = time.perf_counter()
    load_snapshots(model, online.ring, root, iterations, config.seq_length)
    online.ring.ready()
    seconds = time.perf_counter() - start
    filesystem.FileSystemReader._slice_file = slice_file
    total = torch.tensor([read[0]], dtype=torch.float64, device=online.ring.compute)
    dist.all_reduce(total)
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return seconds, (read[0], int(total.item()))


if __name__ == "__main__":
    sys.exit(main())
