"""Data for WSM runs: tokenizer, preprocessing, the default corpus, datasets, batch iterators
and the loader that reads on tensor-parallel rank 0 and broadcasts.

Everything underneath is megatron-core's own machinery (``MegatronTokenizer``,
``IndexedDatasetBuilder``, ``BlendedMegatronDatasetBuilder``/``GPTDataset``), so Megatron data
prefixes and weighted blends work unchanged.
"""

import importlib
from typing import Any

_EXPORTS = {
    "config": (
        "TOKENIZER_TYPES",
        "Blend",
        "DataConfig",
        "TokenizerArgs",
        "parse_blend",
        "parse_split",
        "tokenizer_args",
    ),
    "corpus": ("CorpusFiles", "default_corpus", "split_train_valid", "stdlib_files"),
    "datasets": (
        "BATCH_KEYS",
        "DataSplits",
        "TrainBatches",
        "build_datasets",
        "build_train_iterator",
        "build_valid_iterator",
    ),
    "loader": (
        "LoaderConfig",
        "build_train_batches",
        "build_valid_batches",
        "reads_data",
    ),
    # (``preprocess``, the function, is imported from its module of the same name)
    "preprocess": ("iter_documents", "token_dtype", "write_indexed_dataset"),
    "tokenizer": ("Tokenizer", "build_tokenizer", "train_tokenizer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    """Exports load their module on first use: reading a config imports no megatron-core."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


__all__ = [
    "BATCH_KEYS",
    "TOKENIZER_TYPES",
    "Blend",
    "CorpusFiles",
    "DataConfig",
    "DataSplits",
    "LoaderConfig",
    "Tokenizer",
    "TokenizerArgs",
    "TrainBatches",
    "build_datasets",
    "build_tokenizer",
    "build_train_batches",
    "build_train_iterator",
    "build_valid_batches",
    "build_valid_iterator",
    "default_corpus",
    "iter_documents",
    "parse_blend",
    "parse_split",
    "reads_data",
    "split_train_valid",
    "stdlib_files",
    "token_dtype",
    "tokenizer_args",
    "train_tokenizer",
    "write_indexed_dataset",
]
