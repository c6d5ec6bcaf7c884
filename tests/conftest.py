"""Shared pytest set-up: the ``gpu`` marker skips cleanly on CPU-only machines, and a temporary
directory shared by all xdist workers for expensive inputs built once under a file lock."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Matplotlib builds its font cache on first use under a lock that it gives up on after 5 s: two
# workers (or a test's subprocesses) starting together on a fresh machine could fail that way.
# Each worker gets a folder of its own, which its subprocesses inherit.
_MPL_DIR = tempfile.mkdtemp(prefix=f"mpl-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
os.environ["MPLCONFIGDIR"] = _MPL_DIR
atexit.register(shutil.rmtree, _MPL_DIR, True)


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This run's base temporary directory, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def corpus_dir(shared_tmp: Path) -> str:
    """One small stdlib corpus for every training test and xdist worker (locked, cached)."""
    return str(shared_tmp / "wsm-train-corpus")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
