"""wsm_megatron.data on real files: tokenizer, preprocessing, the default corpus, datasets,
T_switch, resumable Megatron-order iterators, config errors and the tools/ CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from wsm_megatron.data import (
    BATCH_KEYS,
    DataConfig,
    DataSplits,
    build_datasets,
    build_tokenizer,
    build_train_iterator,
    build_valid_iterator,
    default_corpus,
    split_train_valid,
    stdlib_files,
    train_tokenizer,
)
from wsm_megatron.data.datasets import index_cache_lock
from wsm_megatron.data.preprocess import preprocess
from wsm_megatron.testing.tools import load_tool

REPO = Path(__file__).resolve().parents[1]
MAX_FILES = 60  # a small, evenly spread subset of the stdlib keeps the module fast
VOCAB = 1024


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return default_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=VOCAB, max_files=MAX_FILES, progress=False
    )


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return build_tokenizer(corpus.tokenizer_model)


def _indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _cfg(corpus, tmp_path: Path, **kwargs) -> DataConfig:
    base = {
        "train_data": [corpus.train_prefix],
        "valid_data": [corpus.valid_prefix],
        "seq_length": 32,
        "cache_dir": str(tmp_path / "index-cache"),
    }
    return DataConfig(**{**base, **kwargs})


def test_tokenizer_round_trips_any_text(corpus, tokenizer, tmp_path):
    train_files, valid_files = split_train_valid(stdlib_files(MAX_FILES))
    for path in valid_files:  # held-out files: unseen by the tokenizer
        text = path.read_text(encoding="utf-8")
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    unseen = "déjà vu 🚀 中文\tκόσμε\r\n    indented  twice\x00\n"
    ids = tokenizer.tokenize(unseen)
    assert tokenizer.detokenize(ids) == unseen
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.vocab_size <= VOCAB and tokenizer.eod == 2

    # Deterministic: the same documents and seed give a byte-identical model, also in another
    # process (SentencePiece's own sampling is not) and when lines are sampled (max_sentences).
    docs = [p.read_text(encoding="utf-8") for p in train_files[:8]]
    a = train_tokenizer(docs, tmp_path / "a", 400, max_sentences=500)
    script = (
        "import sys; from pathlib import Path; from wsm_megatron.data import train_tokenizer; "
        "docs = [Path(p).read_text(encoding='utf-8') for p in sys.argv[2:]]; "
        "train_tokenizer(docs, sys.argv[1], 400, max_sentences=500)"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "b"), *map(str, train_files[:8])],
        check=True,
    )
    assert a.read_bytes() == (tmp_path / "b.model").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]  # no temporary files left


def test_preprocess_writes_tokens_plus_eod(tokenizer, tmp_path):
    texts = ["def f(x):\n    return x\n", "", "class A:\n\tpass  # ☃\n"]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"doc{i}.py")
        files[-1].write_text(text, encoding="utf-8")
    prefix = preprocess(files, tokenizer, tmp_path / "out" / "docs", progress=False)
    dataset = _indexed(prefix)
    expected = [tokenizer.tokenize(t) + [tokenizer.eod] for t in texts if t]  # empty: skipped
    assert len(dataset) == len(expected)
    for i, ids in enumerate(expected):
        assert dataset[i].tolist() == ids
    assert dataset[0].dtype == np.uint16
    assert sorted(os.listdir(tmp_path / "out")) == ["docs.bin", "docs.idx"]

    no_eod = _indexed(
        preprocess(files, tokenizer, tmp_path / "noeod", append_eod=False, progress=False)
    )
    assert no_eod[0].tolist() == tokenizer.tokenize(texts[0])
    parallel = preprocess(files, tokenizer, tmp_path / "par", workers=2, progress=False)
    for suffix in (".bin", ".idx"):
        assert Path(parallel + suffix).read_bytes() == Path(prefix + suffix).read_bytes()


def test_preprocess_jsonl_key(tokenizer, tmp_path):
    records = [{"content": "import os\n", "id": 1}, {"content": "x = 1\n"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    dataset = _indexed(
        preprocess([path], tokenizer, tmp_path / "j", json_key="content", progress=False)
    )
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        tokenizer.tokenize(r["content"]) + [tokenizer.eod] for r in records
    ]
    with pytest.raises(ValueError, match=r"docs\.jsonl:1: no string field 'text'"):
        preprocess([path], tokenizer, tmp_path / "k", progress=False)
    assert not list(tmp_path.glob("*k.*"))  # a failed run leaves nothing behind


def test_default_corpus_is_cached_and_validation_is_by_file(corpus, tokenizer, tmp_path):
    cache = Path(corpus.train_prefix).parent
    again = default_corpus(cache.parent, vocab_size=VOCAB, max_files=MAX_FILES)
    assert again == corpus
    manifest = json.loads((cache / "manifest.json").read_text())
    train_files, valid_files = manifest["train_files"], manifest["valid_files"]
    assert len(train_files) + len(valid_files) == MAX_FILES and len(valid_files) >= 1
    assert not set(train_files) & set(valid_files)
    assert not any(
        part in ("test", "tests", "site-packages") for f in train_files for part in f.split("/")
    )
    # The validation dataset is exactly the held-out files, one document each.
    root = Path(manifest["source"])
    valid = _indexed(corpus.valid_prefix)
    assert len(valid) == len(valid_files)
    for i, rel in enumerate(valid_files):
        text = (root / rel).read_text(encoding="utf-8")
        assert valid[i].tolist() == tokenizer.tokenize(text) + [tokenizer.eod]
    assert len(_indexed(corpus.train_prefix)) == len(train_files)


def test_weighted_blend_counts(corpus, tokenizer, tmp_path):
    cfg = _cfg(corpus, tmp_path, train_data=["3", corpus.train_prefix, "1", corpus.valid_prefix])
    splits = build_datasets(
        cfg, tokenizer, global_batch_size=8, train_samples=400, valid_samples=16
    )
    counts = np.bincount(splits.train.dataset_index, minlength=2)
    assert len(splits.train) == 400 and counts.tolist() == [300, 100]
    assert len(splits.valid) >= 16 and splits.anneal is None
    # Megatron's split string when no valid_data: validation from the train prefix's tail.
    split_cfg = _cfg(corpus, tmp_path, valid_data=None, split="90,10,0")
    split = build_datasets(
        split_cfg, tokenizer, global_batch_size=8, train_samples=64, valid_samples=8
    )
    assert set(split.train.indices).isdisjoint(split.valid.indices)


def _stream(train, anneal, *, consumed=0, start=None, dp_size=2, gbs=8, mbs=2, batches=6):
    """Per global batch, every dp rank's microbatches concatenated in Megatron's sample order."""
    iters = [
        build_train_iterator(
            train,
            anneal,
            global_batch_size=gbs,
            micro_batch_size=mbs,
            dp_rank=r,
            dp_size=dp_size,
            consumed_samples=consumed,
            anneal_start_sample=start,
        )
        for r in range(dp_size)
    ]
    out = []
    for _ in range(batches):
        # Megatron order: microbatch m takes mbs * dp_size consecutive samples, rank r its slice.
        parts = [next(it)["tokens"] for _m in range(iters[0].num_microbatches) for it in iters]
        out.append(torch.cat(parts))
    return out, iters[0].consumed_samples


def test_anneal_switch_and_megatron_order(corpus, tokenizer, tmp_path):
    cfg = _cfg(corpus, tmp_path, anneal_data=[corpus.valid_prefix], anneal_start_iteration=3)
    switch = cfg.anneal_start_sample(8)
    assert switch == 24
    splits = build_datasets(cfg, tokenizer, global_batch_size=8, train_samples=48, valid_samples=8)
    batches, consumed = _stream(splits.train, splits.anneal, start=switch)
    assert consumed == 48
    samples = torch.cat(batches)
    expected = [splits.train[s]["tokens"] for s in range(switch)]
    expected += [splits.anneal[s]["tokens"] for s in range(48 - switch)]
    assert torch.equal(samples, torch.stack(expected))
    # T_switch in tokens rounds up to a whole global batch.
    by_tokens = _cfg(
        corpus, tmp_path, anneal_data=[corpus.valid_prefix], anneal_start_tokens=2 * 8 * 32 + 1
    )
    assert by_tokens.anneal_start_sample(8) == 24


def test_resume_continues_the_stream_exactly(corpus, tokenizer, tmp_path):
    cfg = _cfg(corpus, tmp_path, anneal_data=[corpus.valid_prefix], anneal_start_iteration=4)
    splits = build_datasets(cfg, tokenizer, global_batch_size=8, train_samples=64, valid_samples=8)
    switch = cfg.anneal_start_sample(8)
    full, _ = _stream(splits.train, splits.anneal, start=switch, batches=8)
    for resume_at in (2, 5):  # before and after the switch
        rest, consumed = _stream(
            splits.train, splits.anneal, start=switch, consumed=resume_at * 8, batches=8 - resume_at
        )
        assert consumed == 64
        assert all(torch.equal(a, b) for a, b in zip(full[resume_at:], rest, strict=True))
    mb = next(
        build_train_iterator(
            splits.train, None, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1
        )
    )
    assert set(mb) == set(BATCH_KEYS)
    assert mb["tokens"].shape == (2, 32) and mb["tokens"].dtype == torch.int64
    assert mb["loss_mask"].dtype == torch.float32
    assert torch.equal(mb["tokens"][:, 1:], mb["labels"][:, :-1])
    with pytest.raises(ValueError, match="multiple of global_batch_size"):
        build_train_iterator(
            splits.train,
            None,
            global_batch_size=8,
            micro_batch_size=2,
            dp_rank=0,
            dp_size=1,
            consumed_samples=12,
        )


def test_valid_iterator_repeats_the_same_batches(corpus, tokenizer, tmp_path):
    splits = build_datasets(
        _cfg(corpus, tmp_path), tokenizer, global_batch_size=4, train_samples=8, valid_samples=12
    )

    def evaluate():
        return [
            b["tokens"]
            for b in build_valid_iterator(
                splits.valid,
                global_batch_size=4,
                micro_batch_size=1,
                dp_rank=1,
                dp_size=2,
                num_batches=3,
            )
        ]

    first, second = evaluate(), evaluate()
    assert len(first) == 3 * 2 and all(
        torch.equal(a, b) for a, b in zip(first, second, strict=True)
    )
    with pytest.raises(ValueError, match="fewer than num_batches"):
        build_valid_iterator(
            splits.valid,
            global_batch_size=4,
            micro_batch_size=1,
            dp_rank=0,
            dp_size=1,
            num_batches=10**6,
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_data": ["0.5", "a", "x", "b"]}, r"train_data: entry 2 should be a weight"),
        ({"train_data": ["-1", "a"]}, r"train_data: weight '-1' at entry 0 must be > 0"),
        ({"train_data": ["0.5", "a", "0.5"]}, r"train_data: .*odd number"),
        ({"train_data": []}, r"train_data: the blend is empty"),
        ({"split": "90;10"}, r"data.split"),
        (
            {"anneal_data": ["a"], "anneal_start_iteration": 1, "anneal_start_tokens": 5},
            r"at most one of anneal_start_iteration and anneal_start_tokens",
        ),
        ({"anneal_data": ["a"]}, r"anneal_data: set anneal_start_iteration or"),
        ({"anneal_start_tokens": 5}, r"anneal_start_tokens: set anneal_data too"),
        ({"seq_length": 0}, r"data.seq_length"),
        ({"num_workers": -1}, r"data.num_workers: must be an integer >= 0, got -1"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{"train_data": ["a"], "seq_length": 8, **kwargs})


def test_missing_or_too_small_data_is_named(corpus, tokenizer, tmp_path):
    missing = str(tmp_path / "nowhere" / "data")
    cfg = _cfg(corpus, tmp_path, train_data=["1", corpus.train_prefix, "1", missing])
    with pytest.raises(ValueError, match=rf"train_data: .*{missing}\.bin"):
        build_datasets(cfg, tokenizer, global_batch_size=4, train_samples=8, valid_samples=4)
    # megatron-core would loop forever on a split with no documents: fail instead.
    tiny = _cfg(corpus, tmp_path, train_data=[corpus.valid_prefix], valid_data=None)
    with pytest.raises(ValueError, match=r"leaves no documents of .*valid.* validation set"):
        build_datasets(tiny, tokenizer, global_batch_size=4, train_samples=8, valid_samples=4)


def _run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tools_cli(tokenizer, tmp_path, capsys):
    doc = tmp_path / "doc.jsonl"
    doc.write_text(json.dumps({"text": "print('hello')\n" * 20}) + "\n", encoding="utf-8")
    # Successful runs in process (a subprocess would spend seconds importing megatron-core).
    args = ["--input", str(doc), "--output-prefix", str(tmp_path / "tok"), "--vocab-size", "300"]
    assert load_tool("train_tokenizer").main(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tok.model")
    args = ["--input", str(doc), "--tokenizer-model", tokenizer.path]
    args += ["--output-prefix", str(tmp_path / "d"), "--no-progress"]
    assert load_tool("preprocess_data").main(args) == 0
    dataset = _indexed(str(tmp_path / "d"))  # keep it: its items are views of its mmap
    assert dataset[0].tolist()[-1] == tokenizer.eod
    # As scripts, a missing input: exit code 2 and one line, no traceback.
    absent = str(tmp_path / "absent.txt")
    for tool, extra in [
        ("train_tokenizer.py", ["--vocab-size", "300"]),
        ("preprocess_data.py", ["--tokenizer-model", tokenizer.path]),
    ]:
        failed = _run_tool(tool, "--input", absent, "--output-prefix", str(tmp_path / "x"), *extra)
        assert failed.returncode == 2
        assert failed.stderr.strip().splitlines() == [
            f"{tool}: error: input file {absent!r} does not exist"
        ]


def _blend_with_annealing(corpus, cache_dir: str, anneal_start_iteration: int) -> DataConfig:
    """A 3:1 blend of the corpus' train and valid sets, switching to annealing data."""
    return DataConfig(
        train_data=["3", corpus.train_prefix, "1", corpus.valid_prefix],
        valid_data=[corpus.valid_prefix],
        seq_length=32,
        cache_dir=cache_dir,
        anneal_data=[corpus.valid_prefix],
        anneal_start_iteration=anneal_start_iteration,
    )


def _build_on_ranks(corpus, cache_dir: str) -> list[int]:
    from wsm_megatron.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(2, 2))
    tokenizer = build_tokenizer(corpus.tokenizer_model)
    cfg = _blend_with_annealing(corpus, cache_dir, anneal_start_iteration=1)
    splits = build_datasets(cfg, tokenizer, global_batch_size=4, train_samples=16, valid_samples=4)
    batches = build_train_iterator(
        splits.train,
        splits.anneal,
        global_batch_size=4,
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        anneal_start_sample=cfg.anneal_start_sample(4),
    )
    return [int(next(batches)["tokens"].sum()) for _ in range(4)]


def test_build_datasets_on_four_gloo_ranks(corpus, tmp_path):
    """TP=2, PP=2 over gloo: the collective build works and every rank sees the same data."""
    from wsm_megatron.testing.distributed import run_distributed

    results = run_distributed(_build_on_ranks, 4, corpus, str(tmp_path / "cache"))
    assert all(r == results[0] for r in results)


class _Counted(torch.utils.data.Dataset):
    """A dataset that counts its reads, also those of forked DataLoader workers."""

    def __init__(self, dataset) -> None:
        import multiprocessing

        self.dataset, self.reads = dataset, multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        with self.reads.get_lock():
            self.reads.value += 1
        return self.dataset[index]


def _broadcast_batches(corpus, cache_dir: str, tp: int, pp: int, num_workers: int) -> dict:
    """This rank's batches from the TP-rank-0 loader and from the old per-rank reading."""
    from megatron.core import parallel_state as ps

    from wsm_megatron.data import (
        LoaderConfig,
        TrainBatches,
        build_train_batches,
        build_valid_batches,
        reads_data,
    )
    from wsm_megatron.runtime import ParallelConfig, init_distributed

    runtime = init_distributed(ParallelConfig(tp, pp))
    cfg = _blend_with_annealing(corpus, cache_dir, anneal_start_iteration=2)
    sizes = {"global_batch_size": 8, "train_samples": 5 * 8, "valid_samples": 2 * 8}
    tokenizer = build_tokenizer(corpus.tokenizer_model)
    own = build_datasets(cfg, tokenizer, **sizes, is_built_on_rank=reads_data)
    everyone = build_datasets(cfg, tokenizer, **sizes)  # before: every rank builds and reads
    counted = [None if ds is None else _Counted(ds) for ds in everyone]
    loader = LoaderConfig.for_this_rank(
        micro_batch_size=2, seq_length=32, device=runtime.device, num_workers=num_workers
    )
    grid = {
        "global_batch_size": 8,
        "dp_rank": ps.get_data_parallel_rank(),
        "dp_size": ps.get_data_parallel_world_size(),
    }
    stream = {"consumed_samples": 8, "anneal_start_sample": 2 * 8}  # resumed, over T_switch
    new = list(build_train_batches(counted[0], counted[2], loader, **stream, **grid))
    new_valid = list(build_valid_batches(counted[1], loader, num_batches=2, **grid))
    old = list(TrainBatches(everyone.train, everyone.anneal, micro_batch_size=2, **stream, **grid))
    old_valid = list(
        build_valid_iterator(everyone.valid, micro_batch_size=2, num_batches=2, **grid)
    )
    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "keys": loader.keys,
        "built": [ds is not None for ds in own],
        "reads": [0 if ds is None else ds.reads.value for ds in counted],
        "new": [new, new_valid],
        "old": [[{k: b[k] for k in loader.keys} for b in bs] for bs in (old, old_valid)],
    }


@pytest.mark.parametrize(("tp", "pp", "num_workers"), [(2, 2, 0), (2, 1, 1)])
def test_tp_rank_0_reads_and_broadcasts_the_same_batches(corpus, tmp_path, tp, pp, num_workers):
    """4 gloo ranks (TP=2 x PP=2, or TP=2 x DP=2 with a loader worker): every rank gets bitwise
    the batches it read itself before, and only TP rank 0 builds or reads the datasets."""
    from wsm_megatron.testing.distributed import run_distributed

    results = run_distributed(
        _broadcast_batches, 4, corpus, str(tmp_path / "cache"), tp, pp, num_workers
    )
    for r in results:
        reader = r["tp_rank"] == 0
        assert r["built"] == [reader, reader, reader]
        assert r["keys"] == BATCH_KEYS if pp == 1 else len(r["keys"]) == 2
        for new, old in zip(r["new"], r["old"], strict=True):
            assert len(new) == len(old) > 0
            for a, b in zip(new, old, strict=True):
                assert list(a) == list(b) == list(r["keys"])
                assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        n_train, n_valid = (len(batches) * 2 for batches in r["old"])  # micro_batch_size 2
        # train + anneal reads, then validation reads: only on TP rank 0, each sample once
        train_reads, valid_reads, anneal_reads = r["reads"]
        expected = (n_train, n_valid) if reader else (0, 0)
        assert (train_reads + anneal_reads, valid_reads) == expected
    if pp == 2:  # the first stage gets tokens and positions, the last labels and loss mask
        assert {r["keys"] for r in results} == {
            ("tokens", "position_ids"),
            ("labels", "loss_mask"),
        }


def test_a_build_waits_while_another_job_writes_the_index_caches(corpus, tokenizer, tmp_path):
    """Two jobs on one corpus: megatron-core writes index caches in place, so a build waits for
    the lock that the other job's building rank holds, and writes nothing meanwhile."""
    cfg = _cfg(corpus, tmp_path)
    cache = Path(cfg.cache_dir)
    built: list[object] = []

    def build() -> None:
        try:
            built.append(build_datasets(cfg, tokenizer, global_batch_size=4, train_samples=8,
                                        valid_samples=4))  # fmt: skip
        except BaseException as err:  # reported by the assertion below
            built.append(err)

    with index_cache_lock([cache]):  # the other job, building
        thread = threading.Thread(target=build)
        thread.start()
        thread.join(3)
        assert thread.is_alive() and not built
        assert not list(cache.glob("*.npy"))
    thread.join(120)
    assert len(built) == 1 and isinstance(built[0], DataSplits), built
    assert len(list(cache.glob("*-shuffle_index.npy"))) == 2  # train and validation
