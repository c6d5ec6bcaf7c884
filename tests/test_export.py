"""``wsm-export`` on checkpoints of real tiny runs (CPU, gloo), read back with transformers.

- Llama (GQA, SwiGLU, RMSNorm) saved at TP=2, GPT-NeoX (LayerNorm, GeLU, biases) at PP=2 and
  Mixtral (4 experts, top-2) at EP=2 export to folders whose transformers model's fp32 logits
  equal a TP1/PP1 load of the same checkpoint within 1e-5, with the tokenizer encoding as the
  run's does; the Llama export is sharded (index) and records its provenance.
- lm-eval's ``hf`` backend on the export gives wsm-eval's metrics on the original (a
  multiple-choice and a perplexity task, local data).
- Refusals are one ``wsm-export: error:`` line: tiny-cpu's model, moe-small's, GQA in NeoX, an
  existing output (before the checkpoint is opened), a missing checkpoint, shapes that do not
  match. A ``kill -9`` while shards are written leaves no output; the rerun succeeds.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from wsm_megatron.cli.export import main  # noqa: E402
from wsm_megatron.testing.distributed import run_distributed  # noqa: E402
from wsm_megatron.testing.runs import SMALL_RUN, TINY_CONFIG, train_summary  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHORT = ["train.train_iters=2", "checkpoint.save_interval=2", "train.lr_warmup_iters=1",
         "train.eval_interval=1000"]  # fmt: skip
LLAMA = ["model.swiglu=true", "model.add_bias_linear=false", "model.num_query_groups=2"]
NEOX = ["model.normalization=LayerNorm", "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=2"]  # fmt: skip
MIXTRAL = [*LLAMA, "parallel.tensor_model_parallel_size=1", "parallel.expert_model_parallel_size=2",
           "model.num_layers=2", "model.num_experts=4", "model.moe_router_topk=2",
           "model.moe_ffn_hidden_size=32", "model.moe_token_dispatcher_type=allgather"]  # fmt: skip
SINGLE = [  # one process; the padded vocabulary of a TP=2 save
    "parallel.tensor_model_parallel_size=1",
    "parallel.pipeline_model_parallel_size=1",
    "parallel.expert_model_parallel_size=1",
    "model.make_vocab_size_divisible_by=128",
]
TOKENS = [[5, 17, 300, 42, 9, 111, 260, 3, 77, 401, 12, 8], [250, 1, 2, 90, 33, 480, 7, 7]]


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory) -> dict[str, tuple[list[str], Path]]:
    """Each architecture's overrides and a checkpoint root (iteration 2) of a 2-rank run."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("export-runs")
    out = {
        name: ([*SMALL_RUN, *SHORT, f"corpus.cache_dir={corpus_dir}", *arch], root / name)
        for name, arch in (("llama", LLAMA), ("neox", NEOX), ("mixtral", MIXTRAL))
    }
    run_distributed(train_summary, 2, [*out["llama"][0], f"checkpoint.save={root / 'llama'}"])
    with ThreadPoolExecutor(2) as pool:  # the corpus is built now; the runs wait on I/O a lot
        runs = [
            pool.submit(run_distributed, train_summary, 2, [*o, f"checkpoint.save={c}"])
            for o, c in (out["neox"], out["mixtral"])
        ]
        for run in runs:
            run.result()
    return out


def _reference(overrides: list[str], ckpt: str) -> dict:
    """A TP1/PP1 load of ``ckpt``: its logits on TOKENS (padded vocabulary) and encodings."""
    import torch

    from wsm_megatron.data import build_tokenizer
    from wsm_megatron.export.tokenizer import PROBES
    from wsm_megatron.training.checkpointing import load_model_only
    from wsm_megatron.training.config import load_config
    from wsm_megatron.training.trainer import eval_session

    session, model = eval_session(load_config(TINY_CONFIG, [*overrides, *SINGLE]))
    load_model_only(model, ckpt)
    logits = []
    with torch.no_grad():
        for tokens in TOKENS:
            inp = torch.tensor([tokens])
            logits.append(model[0].eval()(inp, torch.arange(len(tokens))[None], None)[0].numpy())
    tokenizer = build_tokenizer(session.config.data)
    return {"logits": logits, "encoded": [tokenizer.tokenize(t) for t in PROBES]}


def _export(overrides: list[str], ckpt: Path, out: Path, *extra: str) -> int:
    argv = ["--config", str(TINY_CONFIG), *overrides, "--checkpoint", str(ckpt)]
    return main([*argv, "--to", "hf", "--output", str(out), "--quiet", *extra])


def test_exports_match_megatron_logits_at_tp2_pp2_ep2(runs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wsm_megatron.export.tokenizer import PROBES

    for name, arch in (("llama", "LlamaForCausalLM"), ("neox", "GPTNeoXForCausalLM"),
                       ("mixtral", "MixtralForCausalLM")):  # fmt: skip
        overrides, ckpt = runs[name]
        out = tmp_path / name
        shard = ["--max-shard-size", "100KB"] if name == "llama" else []
        assert _export(overrides, ckpt, out, *shard) == 0
        ref = run_distributed(_reference, 1, overrides, str(ckpt))[0]
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(model).__name__ == arch
        with torch.no_grad():
            for tokens, want in zip(TOKENS, ref["logits"], strict=True):
                got = model(torch.tensor([tokens])).logits[0]
                assert (got - torch.from_numpy(want)).abs().max().item() < 1e-5, name
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert [tokenizer.encode(t, add_special_tokens=False) for t in PROBES] == ref["encoded"]
        assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
        provenance = json.loads((out / "wsm_export.json").read_text())
        assert provenance["iteration"] == 2 and provenance["architecture"] == arch
        assert provenance["source_checkpoint"] == str((ckpt / "iter_0000002").resolve())
    index = json.loads((tmp_path / "llama" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "lm_head.weight" not in index["weight_map"]  # tied: transformers ties it again
    assert not list(tmp_path.glob(".*"))  # no temporary folder left


def _wsm_eval(argv: list[str]) -> int:
    from wsm_megatron.cli.eval import main as eval_main

    return eval_main(argv)


TASKS = ["wsm_local_mc", "wsm_local_ppl"]


def test_lm_eval_hf_on_the_export_gives_wsm_evals_metrics(runs, tmp_path):
    from test_eval import DOCS, PPL_YAML, TASK_YAML

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "mc.yaml").write_text(TASK_YAML.format(data=tasks / "mc.jsonl"))
    texts = "".join(json.dumps({"text": d["question"] + " x\n"}) + "\n" for d in DOCS)
    (tasks / "ppl.jsonl").write_text(texts)
    (tasks / "ppl.yaml").write_text(PPL_YAML.format(data=tasks / "ppl.jsonl"))
    overrides, ckpt = runs["llama"]
    assert _export(overrides, ckpt, tmp_path / "hf") == 0
    argv = ["--config", str(TINY_CONFIG), *overrides, *SINGLE, "--checkpoint", str(ckpt),
            "--tasks", ",".join(TASKS), "--include-path", str(tasks), "--output",
            str(tmp_path / "ours.json")]  # fmt: skip
    assert run_distributed(_wsm_eval, 1, argv) == [0]
    ours = json.loads((tmp_path / "ours.json").read_text())

    os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tasks)),
        bootstrap_iters=0,
        log_samples=False,
        verbosity="ERROR",
    )
    theirs = out["results"]
    for task in TASKS:
        for metric, value in ours[task].items():
            if metric.split(",")[0] in ("acc", "word_perplexity", "byte_perplexity",
                                        "bits_per_byte"):  # fmt: skip
                assert theirs[task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    assert ours["wsm_local_ppl"]["word_perplexity,none"] > 1.0


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("wsm-export: error: ") and err.count("\n") == 1, err
    return err


def test_refusals_are_one_line(runs, tmp_path, capsys, monkeypatch):
    overrides, ckpt = runs["llama"]
    base = [o for o in overrides if not o.startswith("model.")]
    assert _export(base, ckpt, tmp_path / "a") == 1  # tiny-cpu: RMSNorm, GeLU MLP, biases
    err = _one_error_line(capsys)
    assert "LlamaForCausalLM" in err and "model.add_bias_linear true" in err
    assert "plain GeLU MLP (model.swiglu false)" in err
    argv = ["--config", str(CONFIGS / "moe-small.yaml"), "--checkpoint", str(ckpt)]
    assert main([*argv, "--output", str(tmp_path / "b")]) == 1
    err = _one_error_line(capsys)
    for what in ("MixtralForCausalLM", "qk_layernorm", "shared experts", "moe_layer_freq"):
        assert what in err
    assert _export([*overrides, "model.normalization=LayerNorm"], ckpt, tmp_path / "c") == 1
    assert "model.swiglu true" in _one_error_line(capsys)
    neox_gqa = [*runs["neox"][0], "model.num_query_groups=2"]
    assert _export(neox_gqa, runs["neox"][1], tmp_path / "c") == 1
    assert "GPTNeoXForCausalLM" in _one_error_line(capsys)
    assert _export([*overrides, "model.ffn_hidden_size=96"], ckpt, tmp_path / "d") == 1
    assert "'decoder.layers.mlp.linear_fc1.weight' has shape [4, 256, 64]" in _one_error_line(
        capsys
    )
    assert _export(overrides, tmp_path / "nothing", tmp_path / "e") == 1
    assert "--checkpoint: " in _one_error_line(capsys)
    assert not list(tmp_path.iterdir())

    # An existing output is refused before the checkpoint is even opened.
    from wsm_megatron.export import reader

    def opened(*args, **kwargs):
        raise AssertionError("the checkpoint was opened")

    monkeypatch.setattr(reader.CheckpointReader, "__init__", opened)
    (tmp_path / "exists").mkdir()
    assert _export(overrides, ckpt, tmp_path / "exists") == 1
    assert "already exists" in _one_error_line(capsys)
    assert main(["--config", str(TINY_CONFIG), "model.nonsense=1", "--checkpoint", "x",
                 "--output", "y"]) == 2  # fmt: skip
    _one_error_line(capsys)


def _export_killed(argv: list[str]) -> int:
    """``wsm-export`` that SIGKILLs itself right after writing its second shard file."""
    from wsm_megatron.export.writer import SafetensorsWriter

    flush = SafetensorsWriter._flush

    def flush_then_die(self) -> None:
        flush(self)
        if len(self.shards) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    SafetensorsWriter._flush = flush_then_die
    return main(argv)


def test_kill_during_write_leaves_no_output_and_a_rerun_succeeds(runs, tmp_path):
    overrides, ckpt = runs["mixtral"]
    out = tmp_path / "hf"
    argv = ["--config", str(TINY_CONFIG), *overrides, "--checkpoint", str(ckpt), "--output",
            str(out), "--max-shard-size", "64KB", "--quiet"]  # fmt: skip
    with pytest.raises(RuntimeError, match="died without reporting"):
        run_distributed(_export_killed, 1, argv)
    assert not out.exists()
    (left,) = tmp_path.iterdir()  # the dead export's temporary folder, with its shards
    assert left.name.startswith(".hf.wsm-export-tmp-") and len(list(left.iterdir())) == 2
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
