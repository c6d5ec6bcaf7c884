"""Benchmark wsm-eval's adapter: log-likelihoods, generation, data parallelism, and lm-eval's hf.

    python tools/bench_eval.py --model tiny-cpu --model gpt-125m --out bench-eval.json

For each model shape (``tiny-cpu``, and ``gpt-125m``'s 12 x 768 LayerNorm/GeLU GPT on the same
stdlib corpus) it trains two iterations into a checkpoint, then measures on this machine, one
thread per process (``OMP_NUM_THREADS=1``, so DP=2 has two cores where DP=1 has one):

- log-likelihood requests/s at batch size 1 and 16 (DP=1), and at 16 with DP=2;
- generation tokens/s, 128 new tokens per prompt, with megatron-core's KV cache and without;
- the same log-likelihood and generation requests through lm-eval's ``hf`` backend on the
  model exported by ``wsm-export`` (GPT-NeoX; ``tiny-cpu``'s RMSNorm + GeLU maps to no
  transformers architecture, so it has no hf row), batch size 16.

Prints a table and writes the numbers as JSON. Minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.runs import TINY_CONFIG

SHAPES = {
    "tiny-cpu": ["data.seq_length=256"],  # room for a prompt and 128 new tokens
    "gpt-125m": [
        "model.num_layers=12",
        "model.hidden_size=768",
        "model.num_attention_heads=12",
        "model.ffn_hidden_size=3072",
        "model.normalization=LayerNorm",
        "data.seq_length=256",
    ],
}
RUN = [
    "parallel.tensor_model_parallel_size=1",
    "train.train_iters=2",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
    "train.lr_warmup_iters=1",
    "train.eval_interval=null",
    "checkpoint.save_interval=2",
    "merge.online=false",
    "logging.wandb_mode=disabled",
]
NEW_TOKENS = 128


def _requests(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, continuation) pairs cut from the standard library's source."""
    import random

    text = Path(os.__file__).read_text() + Path(argparse.__file__).read_text()
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        i = rng.randrange(0, len(text) - 400)
        n = rng.randrange(80, 300)
        pairs.append((text[i : i + n], text[i + n : i + n + 12]))
    return pairs


def _prompts(count: int) -> list[tuple[str, dict]]:
    kwargs = {"until": [], "max_gen_toks": NEW_TOKENS}
    return [(context, dict(kwargs)) for context, _ in _requests(count, seed=1)]


def _train(overrides: list[str]) -> None:
    from wsm_megatron.training.config import load_config
    from wsm_megatron.training.trainer import pretrain

    pretrain(load_config(TINY_CONFIG, overrides))


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _ours(overrides: list[str], ckpt: str, n_ll: int, n_gen: int, generate: bool) -> dict:
    """Requests/s and tokens/s of the adapter on this rank's layout."""
    from wsm_megatron.eval.harness import model_lm
    from wsm_megatron.eval.options import EvalOptions
    from wsm_megatron.training.checkpointing import load_model_only
    from wsm_megatron.training.config import load_config
    from wsm_megatron.training.trainer import eval_session

    session, model = eval_session(load_config(TINY_CONFIG, overrides), validation=False)
    load_model_only(model, ckpt)
    requests = [SimpleNamespace(args=a) for a in _requests(n_ll)]
    out = {}
    for batch in (1, 16) if not generate else ():
        lm = model_lm(session, model, EvalOptions(batch_size=batch))
        _, seconds = _timed(lm.loglikelihood, requests)
        out[f"ll_bs{batch}"] = n_ll / seconds
    prompts = [SimpleNamespace(args=a) for a in _prompts(n_gen)]
    for cache in (True, False) if generate else ():
        lm = model_lm(session, model, EvalOptions(batch_size=n_gen, kv_cache=cache))
        texts, seconds = _timed(lm.generate_until, prompts)
        tokens = sum(len(lm.encode(t)) for t in texts)
        out["gen_cache" if cache else "gen_nocache"] = tokens / seconds
    return out


def _hf(folder: Path, n_ll: int, n_gen: int) -> dict:
    """The same requests through lm-eval's hf backend (one thread)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(1)
    lm = HFLM(pretrained=str(folder), batch_size=16, dtype="float32", device="cpu")
    requests = [SimpleNamespace(args=a) for a in _requests(n_ll)]
    _, seconds = _timed(lm.loglikelihood, requests)
    out = {"ll_bs16": n_ll / seconds}
    lm = HFLM(pretrained=str(folder), batch_size=n_gen, dtype="float32", device="cpu")
    prompts = [SimpleNamespace(args=a) for a in _prompts(n_gen)]
    texts, seconds = _timed(lm.generate_until, prompts)
    out["gen_cache"] = sum(len(lm.tok_encode(t)) for t in texts) / seconds
    return out


def _bench(name: str, work: Path, n_ll: int, n_gen: int) -> dict:
    overrides = [*SHAPES[name], *RUN, f"checkpoint.save={work / 'ckpt'}"]
    overrides.append(f"corpus.cache_dir={work.parent / 'corpus'}")
    run_distributed(_train, 1, overrides)
    ckpt = str(work / "ckpt")
    result = {"ours_dp1": run_distributed(_ours, 1, overrides, ckpt, n_ll, n_gen, False)[0]}
    result["ours_dp1"] |= run_distributed(_ours, 1, overrides, ckpt, n_ll, n_gen, True)[0]
    result["ours_dp2"] = run_distributed(_ours, 2, overrides, ckpt, n_ll, n_gen, False)[0]
    if name != "tiny-cpu":
        from wsm_megatron.cli.export import main as export

        folder = work / "hf"
        argv = ["--config", str(TINY_CONFIG), *overrides, "--checkpoint", ckpt, "--output"]
        assert export([*argv, str(folder)]) == 0
        result["hf"] = _hf(folder, n_ll, n_gen)
    return result


def _table(results: dict[str, dict]) -> str:
    head = "| model | ll req/s bs1 | bs16 | bs16 DP2 | hf bs16 | gen tok/s cache | no cache | hf |"
    rows = [head, "|---" * 8 + "|"]
    for name, r in results.items():
        ours, dp2, hf = r["ours_dp1"], r["ours_dp2"], r.get("hf", {})
        cells = [ours["ll_bs1"], ours["ll_bs16"], dp2["ll_bs16"], hf.get("ll_bs16"),
                 ours["gen_cache"], ours["gen_nocache"], hf.get("gen_cache")]  # fmt: skip
        shown = ["-" if c is None else f"{c:.1f}" for c in cells]
        rows.append(f"| {name} | " + " | ".join(shown) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=sorted(SHAPES))
    p.add_argument("--requests", type=int, default=64, help="log-likelihood requests (64)")
    p.add_argument("--prompts", type=int, default=2, help="generation prompts (2)")
    p.add_argument("--out", type=Path, default=Path("bench-eval.json"))
    args = p.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="wsm-bench-eval-") as tmp:
        for name in args.model or ["tiny-cpu"]:
            work = Path(tmp) / name
            results[name] = _bench(name, work, args.requests, args.prompts)
            print(name, json.dumps(results[name]), flush=True)
    print(_table(results))
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
