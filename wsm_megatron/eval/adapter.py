"""lm-evaluation-harness's model interface on the Megatron model in place, under TP/PP.

:class:`MegatronLM` answers lm-eval's requests (log-likelihoods, rolling log-likelihoods, greedy
generation) one sequence at a time with the run's tokenizer. Every model-parallel rank runs the
same requests in the same order (lm-eval builds them deterministically); the forward pass goes
through Megatron's pipeline schedule, the last stage gathers the vocabulary-parallel logits over
TP, scores the targets, and broadcasts the few numbers each request needs to every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from wsm_megatron.runtime import cpu_compat


@dataclass(frozen=True)
class Scored:
    """For each input position i: log p(targets[i] | tokens[:i+1]) and whether it is the
    argmax; ``next_token``: the argmax after the last input token."""

    logprobs: list[float]
    greedy: list[bool]
    next_token: int


def _device() -> torch.device:
    return torch.device("cpu") if cpu_compat.is_active() else torch.device("cuda")


def score_tokens(
    model: list[torch.nn.Module], tokens: Sequence[int], targets: Sequence[int], vocab_size: int
) -> Scored:
    """One forward pass of ``tokens`` (at most the model's sequence length); the same result on
    every rank. Logits beyond ``vocab_size`` (the padding of the embedding) are left out."""
    n = len(tokens)
    device = _device()
    batch = {
        "tokens": torch.tensor([list(tokens)], dtype=torch.long, device=device),
        "position_ids": torch.arange(n, device=device).unsqueeze(0),
        "targets": torch.tensor(list(targets), dtype=torch.long, device=device),
    }

    def forward_step(data: Iterator[Any] | None, chunk: torch.nn.Module) -> tuple:
        first = parallel_state.is_pipeline_first_stage()
        output = chunk(
            batch["tokens"] if first else None, batch["position_ids"] if first else None, None
        )
        return output, _collect

    def _collect(output: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
        logits = gather_from_tensor_model_parallel_region(output)[0, :, :vocab_size].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        argmax = logits.argmax(dim=-1)
        picked = logprobs[torch.arange(len(targets)), batch["targets"]]
        greedy = (argmax[: len(targets)] == batch["targets"]).float()
        return torch.cat([picked.double(), greedy.double(), argmax[-1:].double()])

    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=model,
            num_microbatches=1,
            seq_length=n,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    k = len(targets)
    result = torch.empty(2 * k + 1, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        result.copy_(collected[0])
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(result, src, group=parallel_state.get_pipeline_model_parallel_group())
    values = result.tolist()
    return Scored(values[:k], [v == 1.0 for v in values[k : 2 * k]], int(values[-1]))


class MegatronLM(LM):
    """lm-eval's ``LM`` on a Megatron model (a list of model chunks, in eval mode)."""

    def __init__(
        self,
        model: list[torch.nn.Module],
        tokenizer: Any,
        max_length: int,
        *,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_gen_toks = max_gen_toks

    # ------------------------------------------------------------------ helpers
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.tokenize(text)) if text else []

    def _score(self, tokens: Sequence[int], targets: Sequence[int]) -> Scored:
        return score_tokens(self.model, tokens, targets, self.tokenizer.vocab_size)

    def _continuation(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Log-likelihood of ``continuation`` after ``context``, truncated on the left to the
        model's length; and whether greedy decoding would produce it."""
        whole = (context + continuation)[-(self.max_length + 1) :]
        scored = self._score(whole[:-1], whole[1:])
        k = len(continuation)
        return sum(scored.logprobs[-k:]), all(scored.greedy[-k:])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As lm-eval's HF model: trailing spaces of the context move to the continuation, and
        the continuation's tokens are those of the whole text after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx or [self.tokenizer.eod], whole[len(ctx) :]

    # ------------------------------------------------------------------ lm-eval's interface
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple]:
        return [self._continuation(*self._encode_pair(*r.args)) for r in requests]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        out = []
        for request in requests:
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.encode(text),
                prefix_token=self.tokenizer.eod,
                max_seq_len=self.max_length,
                context_len=1,
            )
            total = 0.0
            for window in map(make_disjoint_window, windows):
                total += self._continuation(list(window[0]), list(window[1]))[0]
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return [self._generate(*r.args) for r in requests]

    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """Greedy decoding until a stop string, the end of document or ``max_gen_toks``."""
        if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0.0) > 0:
            raise ValueError("wsm-eval: generation is greedy only (do_sample false, temperature 0)")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        tokens = self.encode(context) or [self.tokenizer.eod]
        generated: list[int] = []
        text = ""
        for _ in range(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))):
            window = tokens[-self.max_length :]
            token = self._score(window, window[1:]).next_token
            if token == self.tokenizer.eod:
                break
            tokens.append(token)
            generated.append(token)
            text = self.tokenizer.detokenize(generated)
            stops = [text.find(s) for s in until if s in text]
            if stops:
                return text[: min(stops)]
        return text
