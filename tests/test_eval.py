"""The lm-eval adapter (``wsm-eval``) at TP=2 on CPU over gloo, on a checkpoint of a real run.

- Its log-likelihoods equal a direct forward pass of the same model on the same tokens (logits
  gathered over TP by hand, log-softmax in fp64: equal to ~1e-5, the adapter works in fp32), and
  its greedy flags the argmax of those logits; at TP=2 x PP=2 it gives what it gives at TP=2.
- A local multiple-choice task (a JSONL and a task YAML written here) scores end to end through
  ``wsm-eval`` (lm-eval); its accuracy is the one the adapter's own log-likelihoods give, and
  ``wsm-tune --tasks lm-eval:TASK,val`` reports the same for the newest checkpoint.
- Unknown tasks and tasks whose data is not local fail with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.runs import SMALL_RUN, TINY_CONFIG, TINY_MOE, train_summary  # noqa: E402
from wsm_megatron.training.config import load_config  # noqa: E402

DOCS = [
    {"question": "def f(x):\n    return", "choices": ["x", "import", "(("], "answer": 0},
    {"question": "for i in", "choices": ["range(10):", "return", "))"], "answer": 0},
    {"question": "import", "choices": ["os", "while", "=="], "answer": 0},
    {"question": "class A(object):\n   ", "choices": ["def", "1 +", "]"], "answer": 0},
]
TASK_YAML = """task: wsm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
PAIRS = [("def f(x):\n    return", " x"), ("import os\n", "import sys"), ("", "for i in")]
GENERATE = ("def f(x):\n", {"until": ["\n\n"], "max_gen_toks": 5})
PPL_YAML = """task: wsm_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
HUB_YAML = """task: wsm_hub_only
dataset_path: wsm-nonexistent-org/no-such-dataset
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
"""


@pytest.fixture(scope="module")
def run(shared_tmp, tmp_path_factory) -> tuple[list[str], Path, Path]:
    """A 4-iteration TP=2 run's checkpoints (2 and 4) and a directory of local task YAMLs."""
    root = tmp_path_factory.mktemp("eval-run")
    overrides = [
        *SMALL_RUN,
        "checkpoint.save_interval=2",
        "train.train_iters=4",
        f"corpus.cache_dir={shared_tmp / 'wsm-train-corpus'}",
        f"checkpoint.save={root / 'ckpts'}",
    ]
    run_distributed(train_summary, 2, overrides)
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "mc.yaml").write_text(TASK_YAML.format(data=data))
    (tasks / "hub.yaml").write_text(HUB_YAML)
    texts = tasks / "ppl.jsonl"
    texts.write_text("".join(json.dumps({"text": d["question"] + " x\n"}) + "\n" for d in DOCS))
    (tasks / "ppl.yaml").write_text(PPL_YAML.format(data=texts))
    return overrides, root / "ckpts", tasks


def _direct_loglikelihood(model, tokens: list[int], k: int, vocab: int) -> tuple[float, bool]:
    """The last ``k`` tokens' log-likelihood from a plain forward pass, logits gathered by hand."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    inp = torch.tensor([tokens[:-1]])
    with torch.no_grad():
        local = model[0](inp, torch.arange(inp.shape[1]).unsqueeze(0), None)[0]
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    logits = torch.cat(parts, dim=-1)[:, :vocab].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(tokens[1:])
    picked = logprobs[torch.arange(len(targets)), targets][-k:]
    greedy = bool((logits.argmax(-1) == targets)[-k:].all())
    return float(picked.sum()), greedy


def _adapter_checks(overrides: list[str], ckpt: str, tasks: str) -> dict:
    from wsm_megatron.eval.harness import model_lm, run_tasks, task_manager
    from wsm_megatron.training.checkpointing import load_model_only
    from wsm_megatron.training.trainer import eval_session

    session, model = eval_session(load_config(TINY_CONFIG, overrides))
    load_model_only(model, ckpt)
    lm = model_lm(session, model)
    vocab = lm.tokenizer.vocab_size
    adapter = lm.loglikelihood([SimpleNamespace(args=p) for p in PAIRS])
    direct = []
    for context, continuation in PAIRS:
        ctx, cont = lm._encode_pair(context, continuation)
        direct.append(_direct_loglikelihood(model, ctx + cont, len(cont), vocab))
    chosen = []  # the multiple-choice answers the adapter's own log-likelihoods give
    for doc in DOCS:
        lls = lm.loglikelihood(
            [SimpleNamespace(args=(doc["question"], " " + c)) for c in doc["choices"]]
        )
        chosen.append(max(range(len(lls)), key=lambda i: lls[i][0]) == doc["answer"])
    try:
        run_tasks(lm, ["wsm_hub_only"], task_manager(["wsm_hub_only"], Path(tasks)))
        offline = ""
    except ValueError as err:
        offline = str(err)
    return {
        "adapter": adapter,
        "direct": direct,
        "expected_acc": sum(chosen) / len(chosen),
        "offline": offline,
        "rolling": lm.loglikelihood_rolling([SimpleNamespace(args=("x = 1\n" * 20,))]),
        "generated": lm.generate_until([SimpleNamespace(args=GENERATE)]),
    }


def _adapter_pipeline(overrides: list[str], ckpt: str) -> dict:
    from wsm_megatron.eval.harness import model_lm
    from wsm_megatron.training.checkpointing import load_model_only
    from wsm_megatron.training.trainer import eval_session

    session, model = eval_session(load_config(TINY_CONFIG, overrides))
    load_model_only(model, ckpt)
    lm = model_lm(session, model)
    return {
        "adapter": lm.loglikelihood([SimpleNamespace(args=p) for p in PAIRS]),
        "generated": lm.generate_until([SimpleNamespace(args=GENERATE)]),
    }


def _wsm_eval(argv: list[str]) -> int:
    from wsm_megatron.cli.eval import main

    return main(argv)


def _wsm_tune(argv: list[str]) -> int:
    from wsm_megatron.cli.tune import main

    return main(argv)


def _tune_argv(ckpts, overrides: list[str]) -> list[str]:
    """wsm-tune's flags for one duration (2 checkpoints) of ``ckpts``, up to ``--tasks``."""
    return ["--config", str(TINY_CONFIG), *overrides, "--checkpoints", str(ckpts),
            "--durations", "2", "--tasks"]  # fmt: skip


def test_adapter_matches_a_direct_forward_and_scores_a_local_task_at_tp2(run, tmp_path):
    overrides, ckpts, tasks = run
    ranks = run_distributed(_adapter_checks, 2, overrides, str(ckpts), str(tasks))
    out = ranks[0]
    assert all(r["adapter"] == out["adapter"] for r in ranks)
    for (ll, greedy), (ref, ref_greedy) in zip(out["adapter"], out["direct"], strict=True):
        assert ll == pytest.approx(ref, rel=1e-5, abs=1e-5) and ll < 0
        assert greedy == ref_greedy

    # wsm-eval end to end at TP=2: lm-eval's accuracy is the adapter's own choice.
    argv = ["--config", str(TINY_CONFIG), *overrides, "--checkpoint", str(ckpts), "--tasks"]
    argv += ["wsm_local_mc", "--include-path", str(tasks), "--output", str(tmp_path / "e.json")]
    assert run_distributed(_wsm_eval, 2, argv) == [0, 0]
    results = json.loads((tmp_path / "e.json").read_text())
    assert results["wsm_local_mc"]["acc,none"] == out["expected_acc"]

    # wsm-tune --tasks val,lm-eval:TASK: the newest checkpoint's row is wsm-eval's accuracy.
    argv = [*_tune_argv(ckpts, overrides), "lm-eval:wsm_local_mc,val", "--include-path", str(tasks)]
    assert run_distributed(_wsm_tune, 2, [*argv, "--output", str(tmp_path / "tune")]) == [0, 0]
    tuned = json.loads((tmp_path / "tune" / "tune.json").read_text())
    rows = {row["name"]: row for row in tuned["candidates"]}
    assert rows["newest"]["scores"]["lm-eval:wsm_local_mc"] == out["expected_acc"]
    assert set(rows["2:linear"]["scores"]) == {"lm-eval:wsm_local_mc", "val"}
    assert tuned["task"] == "lm-eval:wsm_local_mc"
    assert out["offline"].startswith("lm-eval tasks wsm_hub_only: the data is not local (")
    assert "dataset_path: json" in out["offline"] and "\n" not in out["offline"]
    assert len(out["rolling"]) == 1 and out["rolling"][0] < 0
    assert len(out["generated"]) == 1 and isinstance(out["generated"][0], str)

    # TP=2 x PP=2 (4 processes, the same checkpoint): the same log-likelihoods and generation.
    pipeline = run_distributed(
        _adapter_pipeline, 4, [*overrides, "parallel.pipeline_model_parallel_size=2"], str(ckpts)
    )
    for rank in pipeline:
        assert rank["generated"] == out["generated"]
        for (ll, greedy), (ref, ref_greedy) in zip(rank["adapter"], out["adapter"], strict=True):
            assert ll == pytest.approx(ref, rel=1e-6) and greedy == ref_greedy


def test_unknown_task_is_one_line(run, capsys):
    from wsm_megatron.cli.eval import main
    from wsm_megatron.cli.tune import main as tune_main

    _, ckpts, tasks = run
    argv = ["--config", str(TINY_CONFIG), "--checkpoint", str(ckpts), "--tasks", "no_such_task"]
    assert main([*argv, "--include-path", str(tasks)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wsm-eval: error: unknown lm-eval task 'no_such_task'")
    assert err.count("\n") == 1
    argv = _tune_argv(ckpts, [])
    assert tune_main([*argv, "lm-eval:no_such_task", "--include-path", str(tasks)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wsm-tune: error: unknown lm-eval task 'no_such_task'")
    assert err.count("\n") == 1


def test_wsm_tune_ranks_a_perplexity_task_lowest_first(run, tmp_path):
    # lm-eval says word perplexity is lower-is-better: the best merge is the lowest, not the
    # highest (and not sample_len, the same for every candidate).
    overrides, ckpts, tasks = run
    argv = [*_tune_argv(ckpts, overrides), "lm-eval:wsm_local_ppl", "--include-path", str(tasks)]
    argv += ["--schedules", "linear,minus-sqrt,ema", "--output", str(tmp_path / "tune")]
    argv += ["--batch-size", "4", "--limit", "3"]  # lm-eval's flags, as wsm-eval takes them
    assert run_distributed(_wsm_tune, 2, argv) == [0, 0]
    tuned = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert tuned["lower_is_better"] == {"val": True, "lm-eval:wsm_local_ppl": True}
    merges = {r["name"]: r["scores"]["lm-eval:wsm_local_ppl"] for r in tuned["candidates"][1:]}
    assert len(set(merges.values())) == 3 and min(merges.values()) > 1.0
    assert tuned["best"]["name"] == min(merges, key=merges.get)


def test_ranking_metric_takes_lm_evals_direction_and_the_asked_metric():
    from wsm_megatron.eval.harness import TaskResults, ranking_metric

    results = TaskResults(
        {
            "mc": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6},
            "ppl": {"word_perplexity,none": 40.0, "bits_per_byte,none": 1.2, "sample_len": 50.0},
        },
        {
            "mc": {"acc": True, "acc_norm": True},
            "ppl": {"word_perplexity": False, "bits_per_byte": False},
        },
    )
    assert ranking_metric(results, "mc") == ("acc_norm", 0.6, False)
    assert ranking_metric(results, "ppl") == ("word_perplexity", 40.0, True)
    assert ranking_metric(results, "ppl", "bits_per_byte") == ("bits_per_byte", 1.2, True)
    with pytest.raises(ValueError, match=r"--metric ppl=acc: lm-eval reports \['bits_per_byte'"):
        ranking_metric(results, "ppl", "acc")


# ---------------------------------------------------------------- batched, cached, DP-split
PROMPTS = [("def f(x):\n", {"until": ["\n\n"], "max_gen_toks": 6}),
           ("import os\nimport", {"until": ["\n"], "max_gen_toks": 4}),
           ("class A:\n    def __init__(self):\n        self.", {"max_gen_toks": 5})]  # fmt: skip
SAMPLED = ("def f(x):\n", {"do_sample": True, "temperature": 1.0, "top_k": 20, "max_gen_toks": 6})
ROLLING = ["x = 1\n" * 20, "def g():\n    return 2\n" * 6, "import os\n"]


def _requests(items) -> list[SimpleNamespace]:
    return [SimpleNamespace(args=a) for a in items]


def _mc_requests() -> list[SimpleNamespace]:
    return _requests((d["question"], " " + c) for d in DOCS for c in d["choices"])


def _answers(overrides: list[str], ckpt: str, *settings: tuple[int, bool]) -> list[dict]:
    """The adapter's answers to every kind of request at each (batch size, KV cache) of
    ``settings``, on this layout (one start-up, one checkpoint load)."""
    from wsm_megatron.eval.harness import model_lm
    from wsm_megatron.eval.options import EvalOptions
    from wsm_megatron.training.checkpointing import load_model_only
    from wsm_megatron.training.trainer import eval_session

    session, model = eval_session(load_config(TINY_CONFIG, overrides), validation=False)
    load_model_only(model, ckpt)
    out = []
    for batch_size, kv_cache in settings:
        lm = model_lm(session, model, EvalOptions(batch_size=batch_size, kv_cache=kv_cache))
        answers = {
            "kv_cache": lm.kv_cache,
            "loglikelihood": lm.loglikelihood(_requests(PAIRS) + _mc_requests()),
            "rolling": lm.loglikelihood_rolling(_requests((t,) for t in ROLLING)),
            "generated": lm.generate_until(_requests(PROMPTS)),
        }
        if lm.kv_cache:  # sampling needs the cache; twice, to see it reproduced
            answers["sampled"] = [lm.generate_until(_requests([SAMPLED] * 3)) for _ in range(2)]
        out.append(answers)
    return out


def _assert_same_scores(got: dict, ref: dict, rel: float) -> None:
    for (ll, greedy), (r_ll, r_greedy) in zip(
        got["loglikelihood"], ref["loglikelihood"], strict=True
    ):
        assert ll == pytest.approx(r_ll, rel=rel, abs=rel) and greedy == r_greedy
    assert got["rolling"] == pytest.approx(ref["rolling"], rel=rel)
    assert got["generated"] == ref["generated"]


def test_batched_scoring_and_the_kv_cache_equal_one_row_at_a_time_at_tp2(run):
    """Batch size 4 = batch size 1 within fp32 rounding (same greedy flags, so the same
    accuracies); generation with megatron-core's KV cache, batched, = re-scoring one prompt at
    a time; a seeded sample is reproducible and the same on both TP ranks."""
    overrides, ckpts, _ = run
    ranks = run_distributed(_answers, 2, overrides, str(ckpts), (1, False), (4, True))
    assert ranks[0] == ranks[1]
    one, four = ranks[0]
    assert not one["kv_cache"] and four["kv_cache"]
    _assert_same_scores(four, one, rel=1e-5)
    assert len(one["generated"]) == 3 and one["generated"][2]  # no stop string: 5 tokens
    first, again = four["sampled"]
    assert first == again and len(set(first)) > 1  # a seed per request, reproducible


def _dp_pipeline_answers(overrides: list[str], ckpt: str) -> dict:
    from megatron.core import parallel_state

    (out,) = _answers(overrides, ckpt, (2, True))
    out["grid"] = (parallel_state.get_pipeline_model_parallel_rank(),
                   parallel_state.get_data_parallel_rank())  # fmt: skip
    return out


def test_requests_split_over_data_parallelism_with_an_interleaved_pipeline(run):
    """4 ranks: PP 2 with 2 virtual stages each, DP 2, and a training batch (3) no DP layout
    could run: every rank returns every answer in request order, equal to one TP=2 replica's
    unbatched answers; generation re-scores (no KV cache with virtual stages)."""
    overrides, ckpts, _ = run
    layout = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
              "parallel.virtual_pipeline_model_parallel_size=2", "train.global_batch_size=3",
              "train.micro_batch_size=3"]  # fmt: skip
    ranks = run_distributed(_dp_pipeline_answers, 4, [*overrides, *layout], str(ckpts))
    assert sorted(r["grid"] for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    reference = run_distributed(_answers, 2, overrides, str(ckpts), (1, False))[0][0]
    for rank in ranks:
        assert not rank["kv_cache"]
        _assert_same_scores(rank, reference, rel=1e-5)
        assert rank["loglikelihood"] == ranks[0]["loglikelihood"]


def test_packing_puts_every_row_in_one_call_and_keeps_replicas_in_lockstep():
    import random

    from wsm_megatron.eval.batching import DUMMY, Packing, plan_calls

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 60))]
        packing = Packing(batch_size=rng.randint(1, 5), microbatches=4, length_multiple=2,
                          microbatch_multiple=2, dp_size=rng.randint(1, 4))  # fmt: skip
        plans = [plan_calls(lengths, packing, r) for r in range(packing.dp_size)]
        rows = sorted(i for plan in plans for call in plan for i in call.rows)
        assert rows == list(range(len(lengths)))
        for calls in zip(*plans, strict=True):  # one round: the same shape on every replica
            assert len({(c.length, len(c.microbatches)) for c in calls}) == 1
        for call in (c for plan in plans for c in plan):
            assert call.length % 2 == 0 and len(call.microbatches) % 2 == 0
            assert all(len(mb) == packing.batch_size for mb in call.microbatches)
            assert all(
                lengths[i] <= call.length for mb in call.microbatches for i in mb if i != DUMMY
            )


def test_wsm_eval_takes_lm_evals_flags_and_writes_its_files(run, tmp_path, capfd):
    """--limit as a fraction, --num-fewshot, --seed, --batch-size auto, standard errors by
    bootstrap, --log-samples into --output-path: lm-eval's results and samples files, as its
    own CLI writes them, and nothing half-written beside them."""
    overrides, ckpts, tasks = run
    out = tmp_path / "lm-eval"
    argv = ["--config", str(TINY_CONFIG), *overrides, "parallel.tensor_model_parallel_size=1",
            "--checkpoint", str(ckpts), "--tasks", "wsm_local_mc", "--include-path", str(tasks),
            "--limit", "0.5", "--num-fewshot", "1", "--seed", "7", "--batch-size", "auto",
            "--bootstrap-iters", "20", "--log-samples", "--output-path", str(out)]  # fmt: skip
    assert run_distributed(_wsm_eval, 1, argv) == [0]
    (results_file,) = out.rglob("results_*.json")
    (samples_file,) = out.rglob("samples_wsm_local_mc_*.jsonl")
    assert results_file.parent == samples_file.parent != out  # lm-eval's folder per model
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    results = json.loads(results_file.read_text())
    metrics = results["results"]["wsm_local_mc"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and isinstance(metrics["acc_stderr,none"], float)
    assert results["n-shot"]["wsm_local_mc"] == 1
    assert results["config"]["random_seed"] == 7 and results["config"]["fewshot_seed"] == 7
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 2  # half of the 4 documents
    assert {"doc", "target", "resps", "filtered_resps", "acc"} <= set(samples[0])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gen-kwargs", "num_beams=4"], "--gen-kwargs: num_beams is not supported"),
        (["--batch-size", "0"], "--batch-size: a positive integer or auto, got 0"),
        (["--log-samples"], "--log-samples: needs --output-path"),
        (["--seed", "1,2"], "argument --seed: one integer or four comma-separated values"),
        (["--max-length", "999"], "--max-length 999: the model has 32 positions"),
    ],
)
def test_bad_lm_eval_flags_are_one_line_before_any_model_loads(run, capsys, flags, message):
    from wsm_megatron.cli.eval import main

    overrides, ckpts, tasks = run
    argv = ["--config", str(TINY_CONFIG), *overrides, "--checkpoint", str(ckpts), "--tasks",
            "wsm_local_mc", "--include-path", str(tasks), *flags]  # fmt: skip
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own: the usage, then one error line
        status = exit_.code
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("wsm-eval: error: ") and message in last
    assert status == 2


def test_an_moe_at_expert_parallel_2_over_4_replicas_answers_as_one_process(
    run, shared_tmp, tmp_path
):
    """Expert parallelism ties the replicas' forward passes together: scoring runs in lockstep
    rounds over 4 replicas (2 expert-parallel groups, which split the generation prompts), and
    every answer equals one process's (EP 1) within fp32 rounding."""
    overrides = [*SMALL_RUN, *TINY_MOE, "train.train_iters=3", "checkpoint.save_interval=3",
                 "parallel.expert_model_parallel_size=2",
                 f"corpus.cache_dir={shared_tmp / 'wsm-train-corpus'}",
                 f"checkpoint.save={tmp_path / 'moe'}"]  # fmt: skip
    run_distributed(_train_only, 2, overrides)
    ranks = run_distributed(_answers, 4, overrides, str(tmp_path / "moe"), (2, True))
    single = [*overrides, "parallel.expert_model_parallel_size=1"]
    (reference,) = run_distributed(_answers, 1, single, str(tmp_path / "moe"), (1, False))[0]
    for (rank,) in ranks:
        assert rank["kv_cache"] and rank == ranks[0][0]
        _assert_same_scores(rank, reference, rel=1e-5)


def _train_only(overrides: list[str]) -> None:
    from wsm_megatron.training.trainer import pretrain

    pretrain(load_config(TINY_CONFIG, overrides))
