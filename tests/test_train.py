"""wsm-train on CPU over gloo: TP=2 x PP=2 (4 processes) trains and checkpoints in Megatron-LM's
layout; a run resumed in fresh processes matches an uninterrupted one bitwise; retention prunes
what the merge window no longer needs; the checkpoint merges with wsm-merge and the merged model
loads back for evaluation. A data-parallel MoE run saves on a token interval."""

from __future__ import annotations

import numpy as np
import pytest
from megatron.core import dist_checkpointing

from wsm_megatron.cli.merge import main as merge_main
from wsm_megatron.layout import iteration_dir, list_iterations, read_tracker
from wsm_megatron.testing.distributed import run_distributed
from wsm_megatron.testing.runs import SMALL_RUN, TINY_CONFIG, TINY_MOE, train_summary


def _resume_then_evaluate(overrides: list[str], checkpoints: list[str]) -> dict:
    from wsm_megatron.training.config import load_config
    from wsm_megatron.training.trainer import evaluate_checkpoints

    trained = train_summary(overrides)
    trained["evaluated"] = evaluate_checkpoints(load_config(TINY_CONFIG, overrides), checkpoints)
    return trained


# What Megatron-LM's load_checkpoint reads from a checkpoint's args (megatron/training/
# checkpointing.py: check_checkpoint_args, load_checkpoint, load_args_from_checkpoint; read
# from its source, 2026): a missing one is an AttributeError there or a silent default.
MEGATRON_LM_READS = (
    # check_checkpoint_args (getattr without a default)
    "num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
    "max_position_embeddings", "make_vocab_size_divisible_by", "tokenizer_type",
    "padded_vocab_size",
    # load_checkpoint
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "world_size",
    "data_parallel_size", "no_save_rng", "no_save_optim", "consumed_train_samples",
    "skipped_train_samples", "consumed_valid_samples", "ckpt_fully_parallel_save", "async_save",
    # load_args_from_checkpoint
    "ffn_hidden_size", "seq_length", "kv_channels", "num_query_groups", "group_query_attention",
    "position_embedding_type", "use_rotary_position_embeddings", "rotary_base", "rotary_percent",
    "rotary_interleaved", "add_bias_linear", "add_qkv_bias", "squared_relu", "swiglu",
    "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization",
    "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout", "spec",
    "num_experts", "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk",
    "moe_router_pre_softmax", "moe_grouped_gemm", "moe_shared_expert_intermediate_size",
    "moe_router_score_function", "moe_router_enable_expert_bias",
    "moe_router_topk_scaling_factor", "tokenizer_model", "ckpt_format",
    "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
)  # fmt: skip


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_tp2_pp2_train_resume_retention_merge_evaluate(corpus_dir, tmp_path):
    common = [
        *SMALL_RUN,
        f"corpus.cache_dir={corpus_dir}",
        "parallel.pipeline_model_parallel_size=2",
    ]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run = [
        "checkpoint.save_interval=2",
        "merge.quantity=2",  # retention keeps the newest 2 checkpoints
        "train.eval_interval=6",
        "checkpoint.async_save=true",  # the GPU default, exercised on CPU
    ]

    # 1. Six iterations straight: checkpoints at 2, 4, 6; iteration 2 is pruned after 6 lands.
    a = run_distributed(
        train_summary, 4, [*common, *run, f"checkpoint.save={straight}", "train.train_iters=6"]
    )
    assert sorted(r["grid"] for r in a) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    losses = a[0]["losses"]
    assert list(losses) == [1, 2, 3, 4, 5, 6] and all(r["losses"] == losses for r in a)
    assert losses[6] < losses[1] < 7.0  # it learns (ln 512 = 6.24 at the start)
    assert list_iterations(straight) == [4, 6] and read_tracker(straight) == 6

    common_state = dist_checkpointing.load_common_state_dict(str(iteration_dir(straight, 6)))
    assert common_state["checkpoint_version"] == 3.0 and common_state["iteration"] == 6
    args = common_state["args"]
    assert (args.seq_length, args.global_batch_size, args.consumed_train_samples) == (32, 8, 48)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert {"opt_param_scheduler", "optimizer", "num_floating_point_operations_so_far"} <= set(
        common_state
    )
    assert common_state["opt_param_scheduler"]["num_steps"] == 48  # samples, as Megatron-LM
    missing = [name for name in MEGATRON_LM_READS if not hasattr(args, name)]
    assert not missing, f"Megatron-LM's load_checkpoint reads args.{missing}"
    assert (args.ffn_hidden_size, args.add_position_embedding, args.no_save_optim) == (
        128,
        False,
        False,
    )

    # 2. Four iterations, then a fresh set of processes resumes to six.
    run_distributed(
        train_summary, 4, [*common, *run, f"checkpoint.save={split}", "train.train_iters=4"]
    )
    merged = tmp_path / "merged"
    assert merge_main(["--input", straight, "--output", str(merged), "--last", "2"]) == 0
    assert read_tracker(merged) == 6
    c = run_distributed(
        _resume_then_evaluate,
        4,
        [*common, *run, f"checkpoint.save={split}", "train.train_iters=6"],
        [straight, str(merged)],
    )
    by_grid = {r["grid"]: r for r in a}
    for resumed in c:
        assert resumed["resumed_from"] == 4 and list(resumed["losses"]) == [5, 6]
        assert resumed["losses"] == {i: losses[i] for i in (5, 6)}  # bitwise equal floats
        assert _same_weights(resumed["weights"], by_grid[resumed["grid"]]["weights"])

    # 3. Weights-only evaluation at the training layout: the newest checkpoint gives the loss the
    # trainer measured at that iteration; the merged model (mean of 4 and 6) another one.
    evaluated = c[0]["evaluated"]
    assert all(r["evaluated"] == evaluated for r in c)
    newest, mean = evaluated[straight], evaluated[str(merged)]
    assert newest == {"iteration": 6, "val_loss": pytest.approx(a[0]["val_losses"][6], abs=1e-6)}
    assert mean["iteration"] == 6 and np.isfinite(mean["val_loss"])
    assert mean["val_loss"] != newest["val_loss"]


def _train_then_branch(overrides: list[str], branch: list[str]) -> list[dict]:
    return [train_summary(overrides), train_summary(overrides + branch)]


def test_data_parallel_moe_token_interval_and_wsd_branch(corpus_dir, tmp_path):
    wsm, wsd = str(tmp_path / "wsm"), str(tmp_path / "wsd")
    moe = [
        *SMALL_RUN,
        f"corpus.cache_dir={corpus_dir}",
        *TINY_MOE,
        "train.train_iters=3",
        f"checkpoint.save={wsm}",
        "checkpoint.save_interval=null",
        "checkpoint.save_interval_tokens=500",  # 256 tokens per iteration
        "merge.quantity=null",
    ]
    # The paper's baseline: branch from the constant-LR checkpoint into a 1-sqrt decay.
    branch = [
        f"checkpoint.load={wsm}",
        f"checkpoint.save={wsd}",
        "train.train_iters=5",
        "train.lr_schedule=wsd",
        "train.lr_wsd_decay_iters=2",
        "train.min_lr=3.0e-4",  # the run saved min_lr 0: the branch's config decides
    ]
    results = run_distributed(_train_then_branch, 2, moe, branch)
    (first, branched), (first_1, branched_1) = results
    # Two data-parallel replicas see different data but keep identical weights.
    assert [first["grid"], first_1["grid"]] == [(0, 0, 0), (0, 0, 1)]
    assert _same_weights(first["weights"], first_1["weights"])
    assert _same_weights(branched["weights"], branched_1["weights"])
    assert any("experts" in key for key in first["weights"])
    assert list_iterations(wsm) == [2, 3]  # 512 tokens crossed 500; the final iteration
    # The branch resumes at 3 and decays over the last 2 iterations, 1-sqrt: Megatron's LR for
    # iteration i is the schedule at i - 1 of 5 (it reaches min_lr after the last update). The
    # range is the branch's config (min_lr 3e-4), not the checkpoint's param groups (min_lr 0).
    assert branched["resumed_from"] == 3 and list(branched["lrs"]) == [4, 5]
    assert first["lrs"][3] == branched["lrs"][4] == 3e-3
    assert branched["lrs"][5] == pytest.approx(3e-4 + (3e-3 - 3e-4) * (1 - 0.5**0.5))
    assert list_iterations(wsd) == [4, 5] and list_iterations(wsm) == [2, 3]


def _train_branch_refuse(overrides: list[str], branch: list[str], same_dir: list[str]) -> dict:
    first, second = train_summary(overrides), train_summary(overrides + branch)
    try:
        train_summary(overrides + same_dir)
    except ValueError as err:
        second["refused"] = str(err)
    return {"first": first, "branch": second}


def test_load_iteration_branches_from_an_older_checkpoint(corpus_dir, tmp_path):
    run, branch = str(tmp_path / "run"), str(tmp_path / "branch")
    overrides = [
        *SMALL_RUN,
        f"corpus.cache_dir={corpus_dir}",
        "parallel.tensor_model_parallel_size=1",
        f"checkpoint.save={run}",
        "checkpoint.save_interval=2",
        "merge.quantity=null",
        "train.train_iters=4",
    ]
    (result,) = run_distributed(
        _train_branch_refuse,
        1,
        overrides,
        [f"checkpoint.load={run}", f"checkpoint.save={branch}", "checkpoint.load_iteration=2"],
        ["checkpoint.load_iteration=2", "train.train_iters=6"],
    )
    first, second = result["first"], result["branch"]
    assert list_iterations(run) == [2, 4] and read_tracker(run) == 4
    # From iteration 2, not the tracker's 4: iterations 3 and 4 again, bitwise the same.
    assert second["resumed_from"] == 2 and second["losses"] == {
        i: first["losses"][i] for i in (3, 4)
    }
    assert _same_weights(second["weights"], first["weights"])
    assert list_iterations(branch) == [4]
    assert second["refused"].startswith("checkpoint.load_iteration: 2 is older than [4] in ")


def test_losses_reduced_per_log_interval_are_the_per_step_values(corpus_dir, tmp_path):
    common = [
        *SMALL_RUN,
        f"corpus.cache_dir={corpus_dir}",
        "parallel.tensor_model_parallel_size=1",
        "train.train_iters=5",
        "checkpoint.save=null",
        "checkpoint.save_interval=null",
    ]
    (every_step,) = run_distributed(train_summary, 1, [*common, "logging.log_interval=1"])
    (batched,) = run_distributed(train_summary, 1, [*common, "logging.log_interval=3"])
    assert list(batched["losses"]) == [1, 2, 3, 4, 5]
    assert batched["losses"] == every_step["losses"]  # bitwise equal floats


def _runs_then_evaluate(runs: list[list[str]], evaluate: list[str], checkpoints: list[str]):
    """Train each of ``runs`` in turn in these processes, then evaluate ``checkpoints`` at the
    layout of ``evaluate`` (weights only)."""
    from wsm_megatron.training.config import load_config
    from wsm_megatron.training.trainer import evaluate_checkpoints

    trained = [train_summary(overrides) for overrides in runs]
    evaluated = evaluate_checkpoints(load_config(TINY_CONFIG, evaluate), checkpoints)
    return trained, evaluated


def test_interleaved_pipeline_matches_the_plain_pipeline_and_its_checkpoints_load_at_both(
    corpus_dir, tmp_path
):
    plain_dir, vpp_dir, merged = (str(tmp_path / n) for n in ("plain", "vpp", "merged"))
    plain = [  # 4 ranks: TP 1 x PP 2 x DP 2, two microbatches per rank
        *SMALL_RUN,
        f"corpus.cache_dir={corpus_dir}",
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=2",
        "checkpoint.save_interval=2",
        "train.eval_interval=6",
    ]
    vpp = [*plain, "parallel.virtual_pipeline_model_parallel_size=2"]  # one layer per chunk

    # 1. The plain pipeline: 6 iterations, checkpoints at 2, 4, 6.
    a = run_distributed(
        train_summary, 4, [*plain, f"checkpoint.save={plain_dir}", "train.train_iters=6"]
    )[0]
    # 2. Interleaved, from the plain run's iteration 2 (initial weights differ between the
    # layouts: seeds are per pipeline rank and the layers are built in another order): 3 and 4
    # as the plain run; then resumed from its own (interleaved) checkpoint at 4: 5 and 6, and
    # the plain run's checkpoint evaluated at the interleaved layout.
    branch = [f"checkpoint.save={vpp_dir}", "train.train_iters=4"]
    results = run_distributed(
        _runs_then_evaluate,
        4,
        [
            [*vpp, *branch, f"checkpoint.load={plain_dir}", "checkpoint.load_iteration=2"],
            [*vpp, f"checkpoint.save={vpp_dir}", "train.train_iters=6", "merge.online=true"],
        ],
        vpp,
        [plain_dir],
    )
    (b, c), evaluated = results[0]
    assert b["resumed_from"] == 2 and c["resumed_from"] == 4
    assert any(k.startswith("model1.decoder.layers.0.") for k in c["weights"])  # two chunks
    expected = {i: pytest.approx(a["losses"][i], rel=1e-5) for i in (3, 4, 5, 6)}
    assert {**b["losses"], **c["losses"]} == expected
    val = a["val_losses"][6]
    assert c["val_losses"][6] == pytest.approx(val, rel=1e-5)
    assert evaluated[plain_dir] == {"iteration": 6, "val_loss": pytest.approx(val, rel=1e-5)}

    # 3. The interleaved checkpoints keep the global layer keys: they merge with wsm-merge, and
    # load at the plain layout with the validation losses the interleaved run measured, for the
    # model and for its online merge of the same window.
    assert list_iterations(vpp_dir) == [4, 6]
    assert merge_main(["--input", vpp_dir, "--output", merged, "--last", "2"]) == 0
    _, evaluated = run_distributed(_runs_then_evaluate, 4, [], plain, [vpp_dir, merged])[0]
    assert evaluated[vpp_dir]["val_loss"] == pytest.approx(c["val_losses"][6], rel=1e-5)
    assert c["windows"] == {6: (4, 6)}
    assert evaluated[merged]["val_loss"] == pytest.approx(c["merged_losses"][6], rel=1e-5)
    assert evaluated[merged]["val_loss"] != evaluated[vpp_dir]["val_loss"]
