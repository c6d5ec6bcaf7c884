"""wsm-merge at the scale of real runs: a fast start (``--help`` and flag errors import neither
torch nor megatron-core), thousands of shard files under a small open-file limit, rank 0's
memory on huge metadata, and the output root's lock."""

from __future__ import annotations

import subprocess
import sys

import pytest

_IMPORTS = """
import sys
from wsm_megatron.cli.merge import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "megatron", "numpy") if m in sys.modules)
print("HEAVY", ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize(
    "argv, code, expected",
    [
        (["--help"], 0, "usage: wsm-merge"),
        (["--input", "a", "--output", "b"], 2, "one of --iterations"),  # a MergeError
        (["--input", "a", "--output", "b", "--last", "x"], 2, "invalid int value"),  # argparse
        (["--input", "a", "--output", "b", "--last", "4", "--output-dtype", "fp8"], 2, "choice"),
        (["--input", "a", "--output", "b", "--last", "4", "--memory-budget-mb", "0"], 2, "> 0"),
    ],
)
def test_help_and_flag_errors_import_neither_torch_nor_megatron(argv, code, expected):
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS, *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == code, proc.stderr
    assert expected in proc.stdout + proc.stderr
    assert "HEAVY \n" in proc.stdout, proc.stdout  # nothing heavy was imported
