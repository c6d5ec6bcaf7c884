"""``EvalOptions``: lm-eval's run settings as ``wsm-eval`` and ``wsm-tune`` take them (its flags,
its meanings and defaults), checked before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_SEEDS = (0, 1234, 1234, 1234)
"""lm-eval's ``--seed`` default: Python's, NumPy's, torch's and the few-shot sampler's."""


def parse_seeds(text: str) -> tuple[int | None, ...]:
    """lm-eval's ``--seed``: one integer for all four seeds, or four (``None`` leaves one)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1:
        parts *= 4
    if len(parts) != 4:
        raise ValueError(f"--seed: one integer or four comma-separated values, got {text!r}")
    try:
        return tuple(None if p == "None" else int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--seed: integers or None, got {text!r}") from None


def parse_limit(text: str) -> float:
    """lm-eval's ``--limit``: a count of documents per task, or below 1 a fraction of them."""
    value = float(text)
    if value <= 0:
        raise ValueError(f"--limit: must be > 0, got {text}")
    return int(value) if value >= 1 else value


@dataclass(frozen=True)
class EvalOptions:
    """How lm-eval tasks run on the model (lm-eval's flags; ``None``: lm-eval's default)."""

    batch_size: int | str = 1
    """Rows per micro-batch, or ``auto``: the largest power of two up to 64 whose logits and
    activations fit half the free memory of the most loaded rank."""
    max_length: int | None = None
    """Tokens per sequence; default: the run's ``seq_length``."""
    max_gen_toks: int = 256
    limit: float | None = None
    num_fewshot: int | None = None
    seeds: tuple[int | None, ...] = DEFAULT_SEEDS
    gen_kwargs: str | None = None
    """lm-eval's ``--gen-kwargs`` (``key=value,...``), over every generation task's own."""
    bootstrap_iters: int = 100000
    log_samples: bool = False
    output_path: Path | None = None
    """lm-eval's results (``results_<time>.json``) and with ``log_samples`` its per-sample
    files, as lm-eval writes them."""
    include_path: Path | None = None
    prefix_token: int | None = None
    """The token before an empty context and each rolling window; default: BOS when the
    tokenizer has one, else the end of document (lm-eval's ``hf``)."""
    kv_cache: bool = True

    def __post_init__(self) -> None:
        if self.batch_size != "auto" and not (
            isinstance(self.batch_size, int) and self.batch_size >= 1
        ):
            raise ValueError(f"--batch-size: a positive integer or auto, got {self.batch_size!r}")
        for flag, value in (
            ("--max-length", self.max_length),
            ("--max-gen-toks", self.max_gen_toks),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{flag}: must be >= 1, got {value}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"--num-fewshot: must be >= 0, got {self.num_fewshot}")
        if self.bootstrap_iters < 0:
            raise ValueError(f"--bootstrap-iters: must be >= 0, got {self.bootstrap_iters}")
        if self.log_samples and self.output_path is None:
            raise ValueError("--log-samples: needs --output-path (where lm-eval writes samples)")
        if self.output_path is not None and self.output_path.is_file():
            raise ValueError(f"--output-path {self.output_path}: is a file, not a directory")
        if self.include_path is not None and not self.include_path.is_dir():
            raise ValueError(f"--include-path {self.include_path}: not a directory")
        if self.gen_kwargs is not None:
            self.parsed_gen_kwargs()  # unknown keys fail here, before any model loads

    def parsed_gen_kwargs(self) -> dict:
        """``gen_kwargs`` as lm-eval parses it, checked against what generation supports."""
        from lm_eval.utils import simple_parse_args_string

        from wsm_megatron.eval.generation import GenerationSpec

        kwargs = simple_parse_args_string(self.gen_kwargs or "")
        GenerationSpec.from_gen_kwargs(kwargs, self.max_gen_toks, 0)
        return kwargs
