"""A run's configuration: typed sections, YAML files, dot-notation overrides, one clear error.

``load_config("configs/tiny-cpu.yaml", ["model.num_layers=4", "train.lr=3e-3"])`` reads the YAML
file, applies the overrides (values parsed as YAML: ``3e-3``, ``true``, ``null``, ``[1, 2]``) and
builds a :class:`WSMConfig`. An unknown key, a value of the wrong type or an inconsistent setting
raises :class:`ConfigError` (a ``ValueError``) naming the key, e.g.
``train.lr: expected a number, got 'fast' (str)``.

Only what does not depend on the world size is checked here; the trainer checks the rest
(data-parallel size, global batch divisibility) when it knows how many processes there are.

One file per component (every name is re-exported here):

- ``errors.py``: :class:`ConfigError` and the shared validators;
- ``model.py``, ``parallel.py``, ``train.py``, ``checkpoint.py``, ``merge.py``, ``logging.py``,
  ``corpus.py``: one section each (``data`` is :mod:`wsm_megatron.data.config`); ``corpus.py``
  also builds the corpus (:func:`resolve_corpus`);
- ``run.py``: :class:`WSMConfig`, the sections composed; ``validation.py``: its cross-section
  checks;
- ``loading.py``: building from dicts, YAML files and overrides; dumping.
"""

from wsm_megatron.data.config import DataConfig
from wsm_megatron.training.config.checkpoint import CheckpointConfig, interval_unset
from wsm_megatron.training.config.corpus import (
    CORPUS_PENDING,
    CorpusConfig,
    default_cache_dir,
    resolve_corpus,
)
from wsm_megatron.training.config.errors import ConfigError
from wsm_megatron.training.config.loading import (
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
)
from wsm_megatron.training.config.logging import LoggingConfig
from wsm_megatron.training.config.merge import MergeConfig
from wsm_megatron.training.config.model import ModelConfig
from wsm_megatron.training.config.parallel import ParallelismConfig
from wsm_megatron.training.config.run import WSMConfig
from wsm_megatron.training.config.train import TrainConfig
from wsm_megatron.training.config.validation import context_parallel_needs_te

__all__ = [
    "CORPUS_PENDING",
    "CheckpointConfig",
    "ConfigError",
    "CorpusConfig",
    "DataConfig",
    "LoggingConfig",
    "MergeConfig",
    "ModelConfig",
    "ParallelismConfig",
    "TrainConfig",
    "WSMConfig",
    "apply_overrides",
    "config_from_dict",
    "context_parallel_needs_te",
    "default_cache_dir",
    "dump_config",
    "interval_unset",
    "load_config",
    "resolve_corpus",
]
