"""Configs: the shipped YAML files validate; bad keys, types and settings fail with one clear
error naming the key; dot-notation overrides; ``wsm-train --print-config``; launch scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsm_megatron.cli.train import main as train_main
from wsm_megatron.training.config import (
    CORPUS_PENDING,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = REPO / "configs" / "tiny-cpu.yaml"


def _raw() -> dict:
    return yaml.safe_load(TINY.read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate_and_round_trip(path):
    config = load_config(path)
    assert config.train.lr_schedule == "wsm"
    assert config.merge_quantity and config.merge_quantity >= 2
    again = config_from_dict(yaml.safe_load(dump_config(config)))
    assert again == config


def test_the_four_configs_exist_and_moe_is_shaped_like_the_paper():
    assert {p.stem for p in CONFIGS} >= {"tiny-cpu", "gpt-125m", "dense-1b", "moe-small"}
    moe = load_config(REPO / "configs" / "moe-small.yaml").model
    assert moe.num_experts >= 32 and moe.moe_router_topk == 8
    assert moe.moe_shared_expert_intermediate_size == moe.moe_ffn_hidden_size
    assert moe.moe_layers[0] is False and all(moe.moe_layers[1:])


def test_overrides_parse_as_yaml_and_nest():
    config = load_config(
        TINY,
        [
            "model.num_layers=2",
            "train.lr=3e-3",  # PyYAML reads this as a string; a float field accepts it
            "train.eval_interval=null",
            "checkpoint.keep_every=100",
            "merge.schedule=1-sqrt",
            "data.split=98,2,0",
        ],
    )
    assert config.model.num_layers == 2 and config.train.lr == 3e-3
    assert config.train.eval_interval is None and config.checkpoint.keep_every == 100
    assert config.merge.schedule == "minus-sqrt"
    assert config.data.train_data == CORPUS_PENDING  # filled in by resolve_corpus at run time
    assert apply_overrides({}, ["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_layer=4"], "model.num_layer: unknown key (valid keys: "),
        (["trian.lr=1"], "trian: unknown section"),
        (["train.lr=fast"], "train.lr: expected a number, got 'fast' (str)"),
        (["train.train_iters=1.5"], "train.train_iters: expected an integer, got 1.5"),
        (["train.bf16=yes please"], "train.bf16: expected true or false"),
        (["train.lr_schedule=cosine-ish"], "train.lr_schedule: expected one of 'wsm', 'wsd'"),
        (["model.num_experts=4", "model.moe_router_topk=8"], "model.moe_router_topk: 8 exceeds"),
        (
            ["model.num_experts=4", "model.moe_shared_expert_intermediate_size=64"],
            "Megatron's shared expert has no biases; set model.add_bias_linear=false",
        ),
        (["model.hidden_size=130"], "model.hidden_size: 130 is not divisible by"),
        (["parallel.tensor_model_parallel_size=3"], "does not divide model.num_attention_heads"),
        (["parallel.pipeline_model_parallel_size=3"], "does not divide model.num_layers (4)"),
        (["train.global_batch_size=12"], "train.global_batch_size: 12 is not a multiple of"),
        (["train.lr_warmup_iters=5000"], "train.lr_warmup_iters: 5000 must be smaller"),
        (["train.lr_schedule=wsd"], "train.lr_wsd_decay_iters: the wsd schedule needs"),
        (["train.lr_wsd_decay_iters=10"], "only the wsd schedule decays"),
        (["train.min_lr=1"], "train.lr: the peak LR 0.003 is below min_lr"),
        (["checkpoint.save_interval_tokens=1000"], "set either save_interval (iterations)"),
        (["merge.window=120"], "merge.window: set either merge.quantity or merge.window"),
        (["merge.quantity=null", "merge.window=120"], "not a multiple of the save interval"),
        (["merge.schedule=median"], "merge.schedule: "),
        (["data.train_data=[x]"], "data.train_data: comes from corpus.name=stdlib"),
        (["corpus.name=null"], "data.train_data: required, not set"),
        (["data.seq_length=0"], "data.seq_length: must be an integer >= 1"),
        (["train.lr"], "train.lr: an override is section.key=value"),
        (["lr=1e-3"], "lr: not a section.key; did you mean train.lr=1e-3?"),
        (["train=1"], "train: not a section.key; train is a section: set one of its keys"),
        (["typo=1"], "typo: not a section.key; overrides are section.key=value, sections: model"),
        (["model.num_layers.x=1"], "model.num_layers: is a value, not a section"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)


def test_missing_sections_and_files():
    raw = _raw()
    del raw["train"]
    with pytest.raises(ConfigError, match="^train: required section"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


def test_cli_print_config_and_errors(capsys):
    assert train_main(["--config", str(TINY), "--print-config", "train.lr=0.01"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.01 and printed["parallel"]["tensor_model_parallel_size"] == 2
    assert train_main(["--config", str(TINY), "--print-config", "train.lr=-1"]) == 2
    assert capsys.readouterr().err == "wsm-train: error: train.lr: must be > 0, got -1.0\n"


def test_world_size_that_does_not_fit_is_a_clear_error(capsys, monkeypatch):
    # tiny-cpu wants TP=2; one process cannot hold it. Fails before building anything.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert train_main(["--config", str(TINY)]) == 2
    err = capsys.readouterr().err
    assert "world size 1 is not divisible by tensor (2)" in err
    assert "torchrun --nproc-per-node N" in err


@pytest.mark.parametrize("script", ["torchrun.sh", "slurm.sbatch"])
def test_launch_scripts_print_the_resolved_command(script):
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "CONFIG": "configs/dense-1b.yaml",
        "TP": "2",
        "PP": "2",
        "VPP": "2",
        "CP": "2",
        "NPROC": "8",
        "NODES": "16",
        "GPUS_PER_NODE": "8",
        "SLURM_JOB_ID": "4242",
    }
    out = subprocess.run(
        ["bash", str(REPO / "launch" / script), "train.lr=1e-4"],
        env=env,
        cwd=REPO,  # CONFIG is relative to the repository, as in the README
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("+ ")
    expected = (
        "-m wsm_megatron.cli.train --config configs/dense-1b.yaml "
        "parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2 "
        "parallel.virtual_pipeline_model_parallel_size=2 parallel.context_parallel_size=2 "
        "train.lr=1e-4"
    )
    assert expected in out
    if script == "torchrun.sh":
        assert "torchrun --standalone --nproc-per-node 8 " in out
    else:
        assert "srun --nodes 16 --ntasks-per-node 8 --kill-on-bad-exit=1 python" in out
        assert "MASTER_PORT=24242" in out


def test_slurm_script_runs_the_watcher_as_a_second_step():
    env = {**os.environ, "DRY_RUN": "1", "WATCH": "1", "CONFIG": "configs/dense-1b.yaml"}
    env.update(NODES="16", GPUS_PER_NODE="8", SLURM_JOB_ID="4242", SLURM_JOB_NAME="run1")
    env.pop("MASTER_ADDR", None)
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "train.lr=1e-4", "--plan-memory"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    watch, train = out.splitlines()
    assert watch == (
        "+ srun --nodes 1 --ntasks-per-node 8 --exact env MASTER_PORT=24243 python -m "
        "wsm_megatron.cli.watch --config configs/dense-1b.yaml train.lr=1e-4 "
        "parallel.tensor_model_parallel_size=8 parallel.pipeline_model_parallel_size=1 "
        "--durations 4,8 --schedules linear,minus-sqrt --output watch-run1 &"
    )  # the overrides but not wsm-train's flags; one node at TP=8
    assert "srun --nodes 16 --ntasks-per-node 8" in train and train.endswith("--plan-memory")


def test_launch_scripts_check_the_config_first(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "CONFIG": str(TINY)}
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), "train.lrr=1e-4"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stdout == ""  # nothing launched, not even printed
    assert done.stderr.splitlines() == [done.stderr.splitlines()[0]] and done.stderr.startswith(
        "wsm-train: error: train.lrr: unknown key"
    )


def test_corpus_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    from wsm_megatron.training.config import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "wsm-megatron"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "wsm-megatron"


def test_config_errors_and_print_config_import_neither_torch_nor_megatron(tmp_path):
    probe = (
        "import sys\n"
        "from wsm_megatron.cli.train import main\n"
        "codes = [main(['--config', sys.argv[1], 'train.lr=fast']),\n"
        "         main(['--config', sys.argv[1], '--print-config'])]\n"
        "heavy = sorted(m for m in ('torch', 'megatron') if m in sys.modules)\n"
        "print(codes, heavy, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(TINY)], capture_output=True, text=True, check=True
    )
    assert done.stderr.splitlines()[-1] == "[2, 0] []"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_state_every_default_that_differs_from_megatron_lm(path):
    from wsm_megatron.training.config.megatron_defaults import DIFFERENCES, stated_keys

    raw, config = yaml.safe_load(path.read_text()), load_config(path)
    for key in stated_keys(config.model.is_moe):
        section, name = key.split(".")
        assert name in (raw.get(section) or {}), f"{path.name} does not state {key}"
    # and the table is true of our defaults: each differs from Megatron-LM's
    for key, difference in DIFFERENCES.items():
        section, name = key.split(".")
        ours = getattr(getattr(config, section), name)
        assert ours != difference.megatron_lm, key
