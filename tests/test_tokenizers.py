"""Hugging Face tokenizer.json and GPT-2 BPE (vocab.json + merges.txt) tokenizers, built from
small files trained here: round trips, preprocessing into Megatron indexed datasets, one-line
config and CLI errors, and a short wsm-train run on data preprocessed with a tokenizer.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from wsm_megatron.data import DataConfig, build_tokenizer, tokenizer_args
from wsm_megatron.data.preprocess import preprocess
from wsm_megatron.testing.tools import load_tool

VOCAB = 300
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bards"
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "déjà vu 🚀 中文\tκόσμε\r\n",
    *(" ".join(WORDS.split()[i % 7 :: 2]) + f" {i}.\n" for i in range(40)),
]
UNSEEN = "unseen: ☃ 𝄞 <b>bold</b>\n\n    indented  twice\x00\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A byte-level BPE trained on TEXTS, saved as tokenizer.json and as GPT-2 files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = tmp_path_factory.mktemp("tokenizers")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS, trainer)
    for name in ("hf", "hf-config", "gpt2"):
        (base / name).mkdir()
    tokenizer.save(str(base / "hf" / "tokenizer.json"))
    tokenizer.save(str(base / "hf-config" / "tokenizer.json"))
    config = {"eos_token": {"content": "</s>"}}
    (base / "hf-config" / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer.model.save(str(base / "gpt2"))  # vocab.json + merges.txt
    return {
        "json": base / "hf" / "tokenizer.json",
        "dir": base / "hf-config",
        "vocab": base / "gpt2" / "vocab.json",
        "merges": base / "gpt2" / "merges.txt",
    }


def _args(files: dict[str, Path], kind: str):
    if kind == "gpt2":
        return tokenizer_args("GPT2BPETokenizer", None, str(files["vocab"]), str(files["merges"]))
    return tokenizer_args(None, str(files[kind]))  # type inferred: HuggingFaceTokenizer


@pytest.mark.parametrize(
    ("kind", "eod_token"), [("json", "<|endoftext|>"), ("dir", "</s>"), ("gpt2", "<|endoftext|>")]
)
def test_round_trip_vocab_and_eod(files, kind, eod_token):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(files["json"]))
    args = _args(files, kind)
    assert args.type == ("GPT2BPETokenizer" if kind == "gpt2" else "HuggingFaceTokenizer")
    tokenizer = build_tokenizer(args)
    for text in [*TEXTS, UNSEEN]:
        ids = tokenizer.tokenize(text)
        assert tokenizer.detokenize(ids) == text
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.vocab_size == reference.get_vocab_size() == VOCAB
    assert tokenizer.eod == reference.token_to_id(eod_token)
    assert tokenizer.tokenize(TEXTS[2]) == reference.encode(TEXTS[2]).ids
    # The same tokenizer through a data config (what wsm-train and wsm-eval build).
    config = DataConfig(
        train_data=["x"],
        seq_length=8,
        tokenizer_type=args.type,
        tokenizer_model=args.model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
    )
    assert build_tokenizer(config).tokenize(UNSEEN) == tokenizer.tokenize(UNSEEN)


def test_eval_adapter_encodes_with_a_gpt2_tokenizer(files):
    from wsm_megatron.eval.adapter import MegatronLM

    tokenizer = build_tokenizer(_args(files, "gpt2"))
    lm = MegatronLM([], tokenizer, 32)
    context, continuation = lm._encode_pair("the quick brown ", "fox")
    assert tokenizer.detokenize(context + continuation) == "the quick brown fox"
    assert lm._encode_pair("", "fox")[0] == [tokenizer.eod]


def _indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def test_preprocess_with_each_type(files, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*TEXTS, UNSEEN]))
    for kind in ("json", "dir", "gpt2"):
        args = _args(files, kind)
        tokenizer = build_tokenizer(args)
        dataset = _indexed(preprocess([docs], args, tmp_path / kind, progress=False))
        expected = [tokenizer.tokenize(t) + [tokenizer.eod] for t in [*TEXTS, UNSEEN]]
        assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    parallel = preprocess([docs], _args(files, "json"), tmp_path / "par", workers=2, progress=False)
    for suffix in (".bin", ".idx"):  # forked workers: the same files
        assert Path(parallel + suffix).read_bytes() == (tmp_path / f"json{suffix}").read_bytes()
    # tools/preprocess_data.py with Megatron-LM's flags writes the same files.
    tool = load_tool("preprocess_data")
    flags = {
        "gpt2": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(files["vocab"])]
        + ["--merge-file", str(files["merges"])],
        "json": ["--tokenizer-type", "HuggingFaceTokenizer"]
        + ["--tokenizer-model", str(files["json"])],
    }
    for kind, extra in flags.items():
        out = tmp_path / f"cli-{kind}"
        argv = ["--input", str(docs), "--output-prefix", str(out), "--no-progress", *extra]
        assert tool.main(argv) == 0
        for suffix in (".bin", ".idx"):
            written = Path(f"{out}{suffix}").read_bytes()
            assert written == (tmp_path / f"{kind}{suffix}").read_bytes()
    capsys.readouterr()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"tokenizer_type": "GPT2Tokenizer"},
            "data.tokenizer_type: unknown tokenizer type 'GPT2Tokenizer' (valid: "
            "SentencePieceTokenizer, HuggingFaceTokenizer, GPT2BPETokenizer)",
        ),
        (
            {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "v.json"},
            "data.merge_file: required by tokenizer type GPT2BPETokenizer",
        ),
        (
            {"tokenizer_type": "HuggingFaceTokenizer"},
            "data.tokenizer_model: required by tokenizer type HuggingFaceTokenizer",
        ),
        (
            {"tokenizer_model": "spm.model", "merge_file": "m.txt"},
            "data.merge_file: not used by tokenizer type SentencePieceTokenizer (it takes "
            "data.tokenizer_model)",
        ),
        (
            {"tokenizer_model": "t.json", "vocab_file": "v.json", "merge_file": "m.txt"},
            "data.vocab_file: not used by tokenizer type HuggingFaceTokenizer (it takes "
            "data.tokenizer_model)",
        ),
    ],
)
def test_config_errors_are_one_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        DataConfig(train_data=["a"], seq_length=8, **kwargs)
    assert str(err.value) == message


def test_missing_files_are_named(files, tmp_path, capsys):
    absent = str(tmp_path / "absent" / "merges.txt")
    for suffix in (".bin", ".idx"):  # check_paths looks for the data files first
        (tmp_path / f"data{suffix}").touch()
    config = DataConfig(
        train_data=[str(tmp_path / "data")],
        seq_length=8,
        vocab_file=str(files["vocab"]),
        merge_file=absent,
    )
    assert config.tokenizer.type == "GPT2BPETokenizer"
    for check in (config.check_paths, lambda: build_tokenizer(config)):
        with pytest.raises(ValueError) as err:
            check()
        assert str(err.value) == f"data.merge_file: no such file {absent!r}"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_json = r"^data.tokenizer_model: directory .* has no tokenizer.json$"
    with pytest.raises(ValueError, match=no_json):
        build_tokenizer(empty)

    # The CLI: exit code 2 and one line naming the flag.
    tool = load_tool("preprocess_data")
    docs = tmp_path / "d.txt"
    docs.write_text("x")
    missing_json = absent + ".json"
    for extra, line in [
        (
            ["--vocab-file", str(files["vocab"])],
            "--merge-file: required by tokenizer type GPT2BPETokenizer",
        ),
        (
            ["--tokenizer-type", "Nope", "--tokenizer-model", "x"],
            "--tokenizer-type: unknown tokenizer type 'Nope' (valid: SentencePieceTokenizer, "
            "HuggingFaceTokenizer, GPT2BPETokenizer)",
        ),
        (["--tokenizer-model", missing_json], f"--tokenizer-model: no such file {missing_json!r}"),
        ([], "--tokenizer-model: required (or --vocab-file and --merge-file)"),
    ]:
        code = tool.main(["--input", str(docs), "--output-prefix", str(tmp_path / "o"), *extra])
        assert code == 2
        assert capsys.readouterr().err.splitlines() == [f"preprocess_data.py: error: {line}"]


def test_corpus_runs_take_no_tokenizer_keys():
    from wsm_megatron.testing.runs import TINY_CONFIG
    from wsm_megatron.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^data.tokenizer_type: comes from corpus.name=stdlib"):
        load_config(TINY_CONFIG, ["data.tokenizer_type=HuggingFaceTokenizer"])


def test_train_on_data_preprocessed_with_a_tokenizer_json(files, tmp_path):
    from wsm_megatron.testing.distributed import run_distributed
    from wsm_megatron.testing.runs import SMALL_RUN, train_summary

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    args = _args(files, "json")
    train = preprocess([docs], args, tmp_path / "train", progress=False)
    valid = preprocess([docs], args, tmp_path / "valid", progress=False)
    overrides = [
        *SMALL_RUN,
        "corpus.name=null",
        f"data.train_data=[{train}]",
        f"data.valid_data=[{valid}]",
        "data.tokenizer_type=HuggingFaceTokenizer",
        f"data.tokenizer_model={files['json']}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.make_vocab_size_divisible_by=1",
        "parallel.tensor_model_parallel_size=1",
        "train.train_iters=3",
        "checkpoint.save=null",
        "checkpoint.save_interval=null",
    ]
    (summary,) = run_distributed(train_summary, 1, overrides)
    assert list(summary["losses"]) == [1, 2, 3]
    assert all(math.isfinite(loss) for loss in summary["losses"].values())
    embedding = summary["weights"]["embedding.word_embeddings.weight"]
    assert embedding.shape[0] == VOCAB  # the tokenizer's vocabulary, unpadded (divisible by 1)
