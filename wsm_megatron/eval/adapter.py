"""lm-evaluation-harness's model interface on the Megatron model in place, under TP/PP/DP.

:class:`MegatronLM` answers lm-eval's requests (log-likelihoods, rolling log-likelihoods,
generation) with the run's tokenizer, in batches, as lm-eval's ``hf`` backend encodes and
truncates them: the continuation's tokens are those of the whole text after the context's; a
log-likelihood keeps the last ``max_length + 1`` tokens; a prompt keeps its last
``max_length - max_gen_toks``; an empty context and the rolling windows start with the prefix
token (BOS when the tokenizer has one, else the end of document). Every rank receives every
request (lm-eval builds them deterministically); the scoring splits them over the
data-parallel replicas and returns every answer to every rank, so lm-eval's metrics agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from megatron.core import parallel_state

from wsm_megatron.eval.batching import Packing
from wsm_megatron.eval.generation import GenerationSpec, generate
from wsm_megatron.eval.scoring import Row, score_rows


def bos_token(tokenizer: Any) -> int | None:
    """The tokenizer's beginning-of-sequence id, or None when it has none."""
    try:
        bos = tokenizer.bos
    except (AttributeError, NotImplementedError):
        return None
    return bos if isinstance(bos, int) and bos >= 0 else None


@dataclass(frozen=True)
class ModelLayout:
    """What the packing must respect of the model's parallel layout."""

    dp_size: int
    pp_size: int
    tp_size: int
    interleaved: bool
    sequence_parallel: bool
    expert_parallel: bool

    @classmethod
    def current(cls, sequence_parallel: bool, interleaved: bool) -> ModelLayout:
        ps = parallel_state
        return cls(
            dp_size=ps.get_data_parallel_world_size(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            interleaved=interleaved,
            sequence_parallel=sequence_parallel,
            expert_parallel=ps.get_expert_model_parallel_world_size() > 1,
        )

    def packing(self, batch_size: int) -> Packing:
        """Micro-batches of ``batch_size`` rows; with a pipeline, 4 x PP micro-batches per
        schedule call (the fill and drain bubble is (PP-1)/(5 PP-1) of a call)."""
        pp = self.pp_size
        return Packing(
            batch_size=batch_size,
            microbatches=4 * pp if pp > 1 else 1,
            length_multiple=self.tp_size if self.sequence_parallel else 1,
            microbatch_multiple=pp if self.interleaved else 1,
            dp_size=self.dp_size,
        )

    @property
    def kv_cache_runs(self) -> bool:
        """Whether megatron-core's static KV cache runs at this layout."""
        return not (self.interleaved or self.sequence_parallel)


SINGLE_PROCESS = ModelLayout(1, 1, 1, False, False, False)


class MegatronLM(LM):
    """lm-eval's ``LM`` on a Megatron model (a list of model chunks)."""

    def __init__(
        self,
        model: list[torch.nn.Module],
        tokenizer: Any,
        max_length: int,
        *,
        layout: ModelLayout | None = None,
        batch_size: int = 1,
        max_gen_toks: int = 256,
        prefix_token: int | None = None,
        kv_cache: bool = True,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.layout = layout or SINGLE_PROCESS
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        bos = bos_token(tokenizer)
        self.prefix_token = prefix_token if prefix_token is not None else (
            bos if bos is not None else tokenizer.eod
        )  # fmt: skip
        self.kv_cache = kv_cache and self.layout.kv_cache_runs
        self.seed = seed

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.tokenize(text)) if text else []

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As lm-eval's ``hf``: trailing spaces of the context move to the continuation, and
        the continuation's tokens are those of the whole text after the context's."""
        if not context:
            return [self.prefix_token], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx or [self.prefix_token], whole[len(ctx) :]

    def _row(self, context: list[int], continuation: list[int]) -> Row:
        """``continuation`` after ``context``, truncated on the left to ``max_length``."""
        whole = (context + continuation)[-(self.max_length + 1) :]
        return Row(tuple(whole[:-1]), tuple(whole[1:]), len(continuation))

    def _score(self, rows: Sequence[Row]) -> list[tuple[float, bool]]:
        packing = self.layout.packing(self.batch_size)
        scores = score_rows(self.model, rows, packing, self.tokenizer.vocab_size)
        return [(s.logprob, s.greedy) for s in scores]

    # ------------------------------------------------------------------ lm-eval's interface
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple]:
        return self._score([self._row(*self._encode_pair(*r.args)) for r in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        rows, owner = [], []
        for i, request in enumerate(requests):
            windows = get_rolling_token_windows(
                token_list=self.encode(request.args[0]),
                prefix_token=self.prefix_token,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                rows.append(self._row(list(context), list(continuation)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(rows), strict=True):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        specs, prompts = [], []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            spec = GenerationSpec.from_gen_kwargs(dict(kwargs), self.max_gen_toks, self.seed + i)
            keep = self.max_length - spec.max_gen_toks
            if keep < 1:
                raise ValueError(
                    f"max_gen_toks {spec.max_gen_toks} leaves no room for a prompt in "
                    f"--max-length {self.max_length}"
                )
            specs.append(spec)
            prompts.append((self.encode(context) or [self.prefix_token])[-keep:])
        return self._generate(prompts, specs)

    def _generate(self, prompts: list[list[int]], specs: list[GenerationSpec]) -> list[str]:
        """Split over data-parallel replicas, answers on every rank. With expert parallelism
        the replicas of one expert-parallel group exchange tokens at every step, so they run
        the same prompts (and stop together): the split is over the groups."""
        rank, size = parallel_state.get_data_parallel_rank(), self.layout.dp_size
        if self.layout.expert_parallel:
            rank = parallel_state.get_expert_data_parallel_rank()
            size = parallel_state.get_expert_data_parallel_world_size()
        split = size > 1
        mine = list(range(len(prompts)))
        if split:
            order = sorted(mine, key=lambda i: (-len(prompts[i]), i))
            mine = order[rank::size]
        texts = generate(
            self.model,
            [prompts[i] for i in mine],
            [specs[i] for i in mine],
            vocab_size=self.tokenizer.vocab_size,
            eod=self.tokenizer.eod,
            detokenize=self.tokenizer.detokenize,
            packing=self.layout.packing(self.batch_size),
            kv_cache=self.kv_cache,
        )
        if not split:
            return texts
        return _gather_texts(mine, texts, len(prompts))


def _gather_texts(mine: list[int], texts: list[str], total: int) -> list[str]:
    """Every replica's ``(index, text)`` on every rank, in request order."""
    import torch.distributed as dist

    parts: list[Any] = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(
        parts, list(zip(mine, texts, strict=True)), group=parallel_state.get_data_parallel_group()
    )
    out = [""] * total
    for part in parts:
        for i, text in part:
            out[i] = text
    return out
