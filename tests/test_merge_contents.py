"""What a merge averages, end to end: model weights under Megatron's roots are averaged, a MoE
router's ``expert_bias`` is copied from the newest, an unknown floating root is refused until
``--average`` or ``--copy-from-newest`` decides."""

from __future__ import annotations

import torch

from wsm_megatron.cli.merge import main
from wsm_megatron.layout import iteration_dir
from wsm_megatron.testing.checkpoints import load_dcp_tensors, write_dcp_checkpoint

BIAS = "decoder.layers.mlp.router.expert_bias"


def _inputs(root):
    for it in (100, 200):
        tensors = {
            "decoder.layers.mlp.linear_fc1.weight": torch.full((2, 3), float(it)),
            BIAS: torch.full((4,), float(it)),
            "foo.scale": torch.full((2,), float(it)),
        }
        write_dcp_checkpoint(root, it, tensors)


def test_unknown_root_refused_then_decided(tmp_path, capsys):
    root = tmp_path / "in"
    _inputs(root)
    base = ["--input", str(root), "--last", "2", "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'foo.scale'" in err[0], err
    assert "--average 'foo.*'" in err[0] and "--copy-from-newest 'foo.*'" in err[0]
    assert not (tmp_path / "refused").exists()

    assert main([*base, "--output", str(tmp_path / "avg"), "--average", "foo.*"]) == 0
    merged = load_dcp_tensors(iteration_dir(tmp_path / "avg", 200))
    assert torch.equal(merged["foo.scale"], torch.full((2,), 150.0))
    assert torch.equal(merged["decoder.layers.mlp.linear_fc1.weight"], torch.full((2, 3), 150.0))
    assert torch.equal(merged[BIAS], torch.full((4,), 200.0))  # balancing state: the newest's

    argv = [*base, "--output", str(tmp_path / "copy"), "--copy-from-newest", "foo.*"]
    assert main([*argv, "--average", "*.expert_bias"]) == 0
    merged = load_dcp_tensors(iteration_dir(tmp_path / "copy", 200))
    assert torch.equal(merged["foo.scale"], torch.full((2,), 200.0))
    assert torch.equal(merged[BIAS], torch.full((4,), 150.0))


def test_nan_weight_is_named(tmp_path, capsys):
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--last", "2"]
    assert main([*argv, "--weights", "nan,1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finite" in err[0] and "nan" in err[0], err
