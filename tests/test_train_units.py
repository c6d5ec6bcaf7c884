"""Trainer pieces without processes: LR schedules (WSM and baselines, the WSD branch), save
intervals in iterations and tokens, checkpoint retention, the FLOPs count."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from wsm_megatron.layout import TRACKER_FILENAME, iteration_dir, list_iterations, write_tracker
from wsm_megatron.training.checkpointing import Progress, resolve_checkpoint, save_due
from wsm_megatron.training.config import ConfigError, load_config
from wsm_megatron.training.metrics import flops_per_iteration
from wsm_megatron.training.retention import checkpoints_to_prune, prune_checkpoints
from wsm_megatron.training.schedules import lr_at

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-cpu.yaml"


def _train(*overrides: str):
    return load_config(TINY, ["train.lr=1.0", "train.min_lr=0.1", *overrides]).train


def test_wsm_is_linear_warmup_then_constant():
    train = _train("train.train_iters=100", "train.lr_warmup_iters=10")
    assert [lr_at(train, i) for i in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert all(lr_at(train, i) == 1.0 for i in (11, 50, 99, 100, 5000))


def test_baselines_decay_to_min_lr():
    cosine = _train("train.train_iters=100", "train.lr_warmup_iters=0", "train.lr_schedule=cosine")
    assert lr_at(cosine, 0) == 1.0 and lr_at(cosine, 100) == pytest.approx(0.1)
    assert lr_at(cosine, 50) == pytest.approx(0.1 + 0.9 * 0.5)
    linear = _train("train.train_iters=100", "train.lr_warmup_iters=0", "train.lr_schedule=linear")
    assert lr_at(linear, 25) == pytest.approx(0.1 + 0.9 * 0.75)


def test_wsd_branch_decays_over_the_last_iterations_only():
    # A WSM run at iteration 800 branches into a 200-iteration 1-sqrt decay (the paper's baseline).
    wsd = _train(
        "train.train_iters=1000",
        "train.lr_warmup_iters=10",
        "train.lr_schedule=wsd",
        "train.lr_wsd_decay_iters=200",
        "train.lr_wsd_decay_style=minus_sqrt",
    )
    wsm = _train("train.train_iters=1000", "train.lr_warmup_iters=10")
    assert all(lr_at(wsd, i) == lr_at(wsm, i) for i in (0, 5, 10, 500, 800))
    assert lr_at(wsd, 850) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(50 / 200)))
    assert lr_at(wsd, 1000) == pytest.approx(0.1)


def test_save_interval_in_iterations_and_tokens():
    config = load_config(TINY, ["checkpoint.save_interval=50"])
    assert [i for i in range(1, 201) if save_due(config, Progress(i, 16 * i), 16)] == [
        50,
        100,
        150,
        200,
    ]
    # 16 x 128 = 2048 tokens per iteration; save whenever another 5000 tokens are consumed.
    config = load_config(
        TINY, ["checkpoint.save_interval=null", "checkpoint.save_interval_tokens=5000"]
    )
    due = [i for i in range(1, 11) if save_due(config, Progress(i, 16 * i), 16)]
    assert due == [3, 5, 8, 10]  # tokens 6144, 10240, 16384, 20480
    assert not save_due(
        load_config(
            TINY, ["checkpoint.save=null", "checkpoint.save_interval=null", "merge.online=false"]
        ),
        Progress(50, 800),
        16,
    )


def test_retention_keeps_the_merge_window_and_the_record():
    on_disk = [100, 200, 300, 400, 500, 600, 700]
    assert checkpoints_to_prune(on_disk, 600, keep_last=3) == [100, 200, 300]
    # 700 is newer than the tracker (being written): never touched, and not counted as kept.
    assert checkpoints_to_prune(on_disk, 600, keep_last=3, keep_every=200) == [100, 300]
    assert checkpoints_to_prune(on_disk, 700, keep_last=10) == []
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        checkpoints_to_prune(on_disk, 700, keep_last=0)
    # Complete 10, 15, 20; 21 and 22 left incomplete by a kill; the save at 25 is the tracker's.
    on_disk, complete = [10, 15, 20, 21, 22, 25], {10, 15, 20, 25}
    assert checkpoints_to_prune(on_disk, 25, keep_last=3, complete=complete) == [10, 21, 22]


def test_prune_checkpoints_on_disk(tmp_path):
    for it in (10, 20, 30, 40):
        iteration_dir(tmp_path, it).mkdir()
        (iteration_dir(tmp_path, it) / "metadata.json").write_text("{}")
        (iteration_dir(tmp_path, it) / ".metadata").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    iteration_dir(tmp_path, 5).symlink_to(tmp_path / "elsewhere")
    write_tracker(tmp_path, 30)
    assert prune_checkpoints(tmp_path, keep_last=2) == [10]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == [
        "iter_0000005",
        "iter_0000020",
        "iter_0000030",
        "iter_0000040",
    ]
    assert resolve_checkpoint(tmp_path) == (iteration_dir(tmp_path, 30), 30)
    assert resolve_checkpoint(iteration_dir(tmp_path, 40)) == (iteration_dir(tmp_path, 40), 40)
    with pytest.raises(ValueError, match="neither a checkpoint root"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_retention_keeps_what_a_reader_pins(tmp_path, capfd):
    from wsm_megatron.training.retention import PINS_DIRNAME, release_pin, write_pin

    for it in (10, 20, 30, 40, 50):
        iteration_dir(tmp_path, it).mkdir()
        (iteration_dir(tmp_path, it) / "metadata.json").write_text("{}")
        (iteration_dir(tmp_path, it) / ".metadata").write_bytes(b"")
    write_tracker(tmp_path, 50)
    write_pin(tmp_path, "watch-a", [10, 20])
    write_pin(tmp_path, "watch-b", [20])
    (tmp_path / PINS_DIRNAME / "foreign.json").write_text("not json")
    assert prune_checkpoints(tmp_path, keep_last=1) == [30, 40]  # 10, 20 pinned
    err = capfd.readouterr().err
    assert "ignoring the pin" in err and "foreign.json" in err
    write_pin(tmp_path, "watch-a", [20])  # a pin moves on: 10 goes at the next prune
    assert prune_checkpoints(tmp_path, keep_last=1) == [10]
    release_pin(tmp_path, "watch-a")
    assert prune_checkpoints(tmp_path, keep_last=1) == []  # watch-b still pins 20
    release_pin(tmp_path, "watch-b")
    assert prune_checkpoints(tmp_path, keep_last=1) == [20]
    assert list_iterations(tmp_path) == [50]


def test_background_retention_does_not_hold_up_the_caller_and_a_failed_delete_is_a_warning(
    tmp_path, monkeypatch, capfd
):
    import shutil
    import threading
    import time

    from wsm_megatron.training import retention

    for it in (10, 20, 30):
        iteration_dir(tmp_path, it).mkdir()
    write_tracker(tmp_path, 30)
    release = threading.Event()
    real_rmtree = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):  # a terabyte of old checkpoints on a slow disk
        release.wait(30)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(retention.shutil, "rmtree", slow_rmtree)
    pruner = retention.BackgroundPruner()
    start = time.perf_counter()
    pruner.submit(tmp_path, keep_last=1)
    assert time.perf_counter() - start < 1.0  # the next step goes on at once
    time.sleep(0.2)
    # Renamed out of the iter_* namespace before the slow delete: never a half checkpoint.
    assert list_iterations(tmp_path) == [30]
    release.set()
    pruner.drain()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000030", TRACKER_FILENAME]

    def failing_rmtree(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(retention.shutil, "rmtree", failing_rmtree)
    iteration_dir(tmp_path, 40).mkdir()
    write_tracker(tmp_path, 40)
    pruner.submit(tmp_path, keep_last=1)
    pruner.drain()
    err = capfd.readouterr().err
    assert "WARNING: retention: could not delete an old checkpoint under" in err
    assert "Permission denied" in err and list_iterations(tmp_path) == [40]


def test_flops_match_the_6nd_rule_for_a_dense_gpt():
    config = load_config(REPO / "configs" / "gpt-125m.yaml")
    m, vocab = config.model, 50304
    flops = flops_per_iteration(config, vocab)
    non_embedding = 12 * m.num_layers * m.hidden_size**2
    six_nd = 6 * (non_embedding + vocab * m.hidden_size) * config.tokens_per_iteration
    attention = 12 * m.num_layers * m.hidden_size * config.seq_length * config.tokens_per_iteration
    assert flops == pytest.approx(six_nd + attention, rel=1e-9)
    moe = load_config(REPO / "configs" / "moe-small.yaml")
    dense_equivalent = load_config(
        REPO / "configs" / "moe-small.yaml",
        [
            "model.num_experts=null",
            "model.moe_ffn_hidden_size=null",
            "model.moe_shared_expert_intermediate_size=null",
            "model.moe_layer_freq=1",
            "model.moe_router_topk=2",
            "parallel.expert_model_parallel_size=1",
        ],
    )
    # 11 MoE layers route to 8 x 256 + 256 = 2304 wide MLPs instead of the dense 2816.
    assert flops_per_iteration(moe, vocab) < flops_per_iteration(dense_equivalent, vocab)


def test_cli_turns_only_our_own_value_errors_into_one_line(tmp_path, capsys):
    from wsm_megatron.cli import train as cli
    from wsm_megatron.layout import iteration_dirname

    with pytest.raises(ValueError) as ours:
        iteration_dirname(-1)
    assert cli._raised_by_us(ours.value)
    with pytest.raises(ValueError) as theirs:
        int("not a number")
    assert not cli._raised_by_us(theirs.value)

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config", str(TINY), "--eval-output", str(tmp_path / "e.json")])
    assert exit_.value.code == 2
    assert "--eval-output needs --evaluate" in capsys.readouterr().err
    # A bad checkpoint path is reported before any start-up work.
    assert cli.main(["--config", str(TINY), "--evaluate", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"wsm-train: error: '{tmp_path / 'none'}' is neither a checkpoint root with "
        "latest_checkpointed_iteration.txt nor a complete iter_XXXXXXX directory"
    ]
    assert not (tmp_path / "runs").exists()


def test_iteration_dirnames_round_trip():
    from wsm_megatron.layout import iteration_dirname, parse_iteration_dirname

    assert parse_iteration_dirname(iteration_dirname(1234)) == 1234
    assert parse_iteration_dirname("iter_foo") is None
    assert parse_iteration_dirname("iter_123") is None  # Megatron pads to 7 digits


def _gradients(overrides: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    from megatron.core import tensor_parallel

    from wsm_megatron.runtime import ParallelConfig, init_distributed
    from wsm_megatron.training.model import build_model

    init_distributed(ParallelConfig())
    config = load_config(TINY, ["parallel.tensor_model_parallel_size=1", *overrides])
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    torch.manual_seed(7)
    model = build_model(config, 500).module
    calls = []  # forward passes through the first layer's attention core: > 1 when recomputed
    core = model.decoder.layers[0].self_attention.core_attention
    core.register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, 32)
    model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize(
    "recompute",
    [
        ["model.recompute_granularity=selective"],
        [
            "model.recompute_granularity=full",
            "model.recompute_method=uniform",
            "model.recompute_num_layers=2",
        ],
    ],
)
def test_activation_recomputation_gives_the_same_gradients(recompute):
    from wsm_megatron.testing.distributed import run_distributed

    ((plain, once),) = run_distributed(_gradients, 1, [])
    ((recomputed, twice),) = run_distributed(_gradients, 1, recompute)
    assert (once, twice) == (1, 2)  # the recomputation happened
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.recompute_granularity=full"], "model.recompute_granularity: 'full' needs"),
        (["model.recompute_method=block"], "model.recompute_method: applies to"),
        (
            [
                "model.recompute_granularity=full",
                "model.recompute_method=block",
                "model.recompute_num_layers=9",
            ],
            "model.recompute_num_layers: must be in 1..4",
        ),
    ],
)
def test_recompute_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def _token_normalised(masks: list[list[float]]) -> dict:
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads

    from wsm_megatron.runtime import ParallelConfig, init_distributed
    from wsm_megatron.training.model import build_model
    from wsm_megatron.training.optimizer import setup_model_and_optimizer
    from wsm_megatron.training.steps import global_token_means, run_microbatches

    init_distributed(ParallelConfig())
    config = load_config(TINY, ["parallel.tensor_model_parallel_size=1", "data.seq_length=8"])
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    state = setup_model_and_optimizer(build_model(config, 300), config)
    ddp = state.model[0]
    g = torch.Generator().manual_seed(0)
    batches = []
    for mask in masks:  # microbatches of one sequence, each with its own loss mask
        tokens = torch.randint(0, 300, (1, 8), generator=g)
        batches.append(
            {
                "tokens": tokens,
                "labels": torch.roll(tokens, -1, 1),
                "loss_mask": torch.tensor([mask]),
                "position_ids": torch.arange(8).view(1, 8),
            }
        )
    ddp.zero_grad_buffer()
    totals = run_microbatches(
        state.model, iter(batches), num_microbatches=len(batches), seq_length=8,
        micro_batch_size=1, forward_only=False,
    )  # fmt: skip
    grads = {n: p.main_grad.clone() for n, p in ddp.named_parameters()}

    # By hand: sum of the masked token losses of all microbatches / all their tokens.
    ddp.zero_grad_buffer()
    loss = sum(
        (ddp(b["tokens"], b["position_ids"], None, labels=b["labels"]) * b["loss_mask"]).sum()
        for b in batches
    ) / sum(b["loss_mask"].sum() for b in batches)
    loss.backward()
    finalize_model_grads(state.model)
    hand = {n: p.main_grad.clone() for n, p in ddp.named_parameters()}
    return {
        "mean": global_token_means([totals])[0],
        "hand_loss": float(loss),
        "grads": grads,
        "hand": hand,
    }


def test_loss_is_normalised_by_the_global_token_count():
    from wsm_megatron.testing.distributed import run_distributed

    masks = [[1.0] * 8, [1.0, 1.0, 0, 0, 0, 0, 0, 0], [0, 1.0, 1.0, 1.0, 0, 0, 0, 0]]
    (r,) = run_distributed(_token_normalised, 1, masks)
    # 13 tokens in all: a mean of the three microbatch means (0.33 each) would weigh the
    # 2-token microbatch 4x more than its share.
    assert r["mean"] == pytest.approx(r["hand_loss"], rel=1e-6)
    assert r["grads"].keys() == r["hand"].keys()
    for name, grad in r["grads"].items():
        torch.testing.assert_close(
            grad, r["hand"][name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.virtual_pipeline_model_parallel_size=2"],
            "parallel.virtual_pipeline_model_parallel_size: the interleaved schedule needs "
            "pipeline_model_parallel_size > 1",
        ),
        (
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=1",
            ],
            "parallel.virtual_pipeline_model_parallel_size: must be >= 2 model chunks per "
            "pipeline rank, got 1 (null: no interleaving)",
        ),
        (
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=3",
            ],
            "parallel.virtual_pipeline_model_parallel_size: model.num_layers (4) is not "
            "divisible by pipeline x virtual pipeline size (2 x 3)",
        ),
        (
            ["parallel.context_parallel_size=2", "model.transformer_impl=local"],
            "parallel.context_parallel_size: context parallelism needs Transformer Engine "
            "attention (model.transformer_impl transformer_engine or auto, on a GPU); "
            "Megatron's local attention does not split sequences",
        ),
        (
            ["parallel.context_parallel_size=3"],
            "parallel.context_parallel_size: data.seq_length (128) is not divisible by "
            "2 x context_parallel_size (6; Megatron's load-balanced split)",
        ),
        (
            ["parallel.tp_comm_overlap=true"],
            "parallel.tp_comm_overlap: needs parallel.sequence_parallel=true",
        ),
        (
            ["parallel.tp_comm_overlap=true", "parallel.tensor_model_parallel_size=1"],
            "parallel.tp_comm_overlap: needs tensor_model_parallel_size > 1",
        ),
    ],
)
def test_parallel_settings_are_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value) == message


def test_interleaved_schedule_needs_microbatches_in_groups_of_the_pipeline_size():
    from wsm_megatron.training.trainer import microbatches_per_rank

    config = load_config(
        TINY,
        [
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "train.micro_batch_size=2",
            "train.global_batch_size=12",
        ],
    )
    assert microbatches_per_rank(config, 1) == 6
    with pytest.raises(ValueError) as err:
        microbatches_per_rank(config, 2)
    assert str(err.value) == (
        "parallel.virtual_pipeline_model_parallel_size: the interleaved schedule needs a "
        "multiple of pipeline_model_parallel_size (2) microbatches per rank, got 3 "
        "(train.global_batch_size 12 / (micro_batch_size 2 x data-parallel size 2))"
    )


def _gpu_refusals(override_sets: list[list[str]]) -> list[str]:
    from wsm_megatron.runtime import ParallelConfig, init_distributed
    from wsm_megatron.training.model import build_model

    init_distributed(ParallelConfig())  # on CPU: the compatibility layer, as a run has it
    refusals = []
    for overrides in override_sets:
        try:
            build_model(load_config(TINY, overrides), 500)
        except ValueError as err:
            refusals.append(str(err))
    return refusals


def test_context_parallelism_tp_comm_overlap_and_local_sequence_parallel_are_refused_on_cpu():
    from wsm_megatron.testing.distributed import run_distributed

    (refusals,) = run_distributed(
        _gpu_refusals,
        1,
        [
            ["parallel.context_parallel_size=2"],  # transformer_impl auto: local layers on CPU
            ["parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true"],
            ["parallel.sequence_parallel=true"],  # megatron-core: a bare AssertionError
        ],
    )
    assert refusals == [
        "parallel.context_parallel_size: context parallelism needs Transformer Engine attention "
        "(model.transformer_impl transformer_engine or auto, on a GPU); Megatron's local "
        "attention does not split sequences",
        "parallel.tp_comm_overlap: needs a GPU (Transformer Engine userbuffers)",
        "parallel.sequence_parallel: the local layer spec normalises with torch's RMSNorm here "
        "(apex's FusedLayerNorm: LayerNorm only, when installed), which megatron-core does not "
        "run with sequence parallelism; use Transformer Engine layers (a GPU) or "
        "parallel.sequence_parallel=false",
    ]


def _cp_share() -> dict[str, list[int]]:
    from wsm_megatron.runtime import ParallelConfig, init_distributed
    from wsm_megatron.training.steps import this_cp_rank_share

    init_distributed(ParallelConfig(context_parallel_size=2))
    tokens = torch.arange(16).view(2, 8)  # 2 sequences of 8 positions
    batch = {"tokens": tokens, "position_ids": torch.arange(8).expand(2, 8), "loss_mask": None}
    share = this_cp_rank_share(batch)
    assert share["loss_mask"] is None
    return {key: share[key].tolist() for key in ("tokens", "position_ids")}


def test_context_parallel_ranks_get_megatrons_load_balanced_share():
    """CP=2 over gloo: of 4 sequence chunks, rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and
    2 (whatever megatron-core's version calls the split)."""
    from wsm_megatron.testing.distributed import run_distributed

    first, second = run_distributed(_cp_share, 2)
    assert first["tokens"] == [[0, 1, 6, 7], [8, 9, 14, 15]]
    assert second["tokens"] == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert first["position_ids"] == [[0, 1, 6, 7]] * 2


def _fc1_rows(overrides: list[str]) -> int:
    from wsm_megatron.runtime import ParallelConfig, init_distributed
    from wsm_megatron.training.model import build_model

    init_distributed(ParallelConfig())
    built = build_model(load_config(TINY, overrides), 500)
    return built.module.decoder.layers[0].mlp.linear_fc1.weight.shape[0]


@pytest.mark.parametrize(
    ("hidden", "swiglu", "expected"),
    [(128, True, 320), (4096, True, 10880), (128, False, 512), (8192, True, 21824)],
)
def test_default_ffn_size_is_megatron_lms(hidden, swiglu, expected):
    # Megatron-LM (arguments.py): 4h, or with --swiglu int((4h * 2/3) / 64) * 64.
    config = load_config(
        TINY,
        [f"model.hidden_size={hidden}", "model.ffn_hidden_size=null", f"model.swiglu={swiglu}"],
    )
    assert config.model.ffn_size == expected


def test_a_swiglu_model_without_ffn_size_has_megatron_lms_mlp_shape():
    from wsm_megatron.testing.distributed import run_distributed

    overrides = ["parallel.tensor_model_parallel_size=1", "model.ffn_hidden_size=null"]
    # gated: fc1 holds both input projections, 2 x 320 rows at hidden 128
    assert run_distributed(_fc1_rows, 1, [*overrides, "model.swiglu=true"]) == [640]
    assert run_distributed(_fc1_rows, 1, overrides) == [512]
