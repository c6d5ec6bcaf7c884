"""Data for WSM runs: tokenizer, preprocessing, the default corpus, datasets and batch iterators.

Everything underneath is megatron-core's own machinery (``MegatronTokenizer``,
``IndexedDatasetBuilder``, ``BlendedMegatronDatasetBuilder``/``GPTDataset``), so Megatron data
prefixes and weighted blends work unchanged.
"""

from wsm_megatron.data.config import Blend, DataConfig, parse_blend, parse_split
from wsm_megatron.data.corpus import CorpusFiles, default_corpus, split_train_valid, stdlib_files
from wsm_megatron.data.datasets import (
    BATCH_KEYS,
    DataSplits,
    TrainBatches,
    build_datasets,
    build_train_iterator,
    build_valid_iterator,
)
from wsm_megatron.data.preprocess import (
    iter_documents,
    preprocess,
    token_dtype,
    write_indexed_dataset,
)
from wsm_megatron.data.tokenizer import Tokenizer, build_tokenizer, train_tokenizer

__all__ = [
    "BATCH_KEYS",
    "Blend",
    "CorpusFiles",
    "DataConfig",
    "DataSplits",
    "Tokenizer",
    "TrainBatches",
    "build_datasets",
    "build_tokenizer",
    "build_train_iterator",
    "build_valid_iterator",
    "default_corpus",
    "iter_documents",
    "parse_blend",
    "parse_split",
    "preprocess",
    "split_train_valid",
    "stdlib_files",
    "token_dtype",
    "train_tokenizer",
    "write_indexed_dataset",
]
