"""Batched generation on the Megatron model: megatron-core's static KV cache, or re-scoring.

With the KV cache (:class:`StaticInferenceContext`, megatron-core's own attention path) a batch
of prompts is encoded once up to its shortest prompt, then one token per step for every row:
rows still inside their prompt feed their next prompt token, the others their last generated
one (megatron-core's static-batching controller does the same). Under a pipeline the stages pass
the step's hidden states point to point and the last stage broadcasts the chosen tokens. Without
the cache (interleaved pipelines, sequence parallelism, or ``kv_cache=False``) every step
re-scores the whole sequences through :mod:`wsm_megatron.eval.scoring` (greedy only).
Every rank makes the same stop decisions from the same tokens, so all leave the loop together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from wsm_megatron.eval.batching import Packing, plan_calls
from wsm_megatron.eval.scoring import Row, device, score_calls

GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


@dataclass(frozen=True)
class GenerationSpec:
    """One request's stopping and sampling (lm-eval's ``gen_kwargs``)."""

    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_gen_kwargs(cls, kwargs: dict, max_gen_toks: int, seed: int) -> GenerationSpec:
        """lm-eval's ``gen_kwargs`` (``temperature 0`` is greedy, as in lm-eval's ``hf``)."""
        unknown = sorted(set(kwargs) - GEN_KWARGS)
        if unknown:
            raise ValueError(
                f"--gen-kwargs: {unknown[0]} is not supported (known: {sorted(GEN_KWARGS)})"
            )
        until = kwargs.get("until") or ()
        temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0))
        do_sample = bool(kwargs.get("do_sample", False)) and temperature > 0
        if temperature > 0 and "do_sample" not in kwargs:
            do_sample = True  # lm-eval's hf: a temperature > 0 samples
        return cls(
            until=(until,) if isinstance(until, str) else tuple(until),
            max_gen_toks=int(kwargs.get("max_gen_toks", max_gen_toks)),
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            seed=seed,
        )


@dataclass
class _Stream:
    """One row's generated tokens and whether it has stopped."""

    prompt: list[int]
    spec: GenerationSpec
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    generator: torch.Generator | None = None


def _choose(logits: torch.Tensor, streams: Sequence[_Stream]) -> torch.Tensor:
    """The next token of every row from its ``[V]`` logits: argmax, or a seeded sample."""
    chosen = logits.argmax(dim=-1)
    for r, stream in enumerate(streams):
        spec = stream.spec
        if not spec.do_sample or stream.done:
            continue
        if stream.generator is None:
            stream.generator = torch.Generator().manual_seed(spec.seed)
        chosen[r] = _sample(logits[r].float().cpu(), spec, stream.generator)
    return chosen


def _sample(logits: torch.Tensor, spec: GenerationSpec, generator: torch.Generator) -> int:
    logits = logits / spec.temperature
    if spec.top_k:
        kth = torch.topk(logits, min(spec.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if spec.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) > spec.top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def _advance(stream: _Stream, token: int, eod: int, detokenize: Callable) -> None:
    """Append ``token`` to a row that is past its prompt; stop on the end of document, a stop
    string (the text cut before it) or ``max_gen_toks``."""
    if token == eod:
        stream.done = True
        return
    stream.tokens.append(token)
    stream.text = detokenize(stream.tokens)
    stops = [stream.text.find(s) for s in stream.spec.until if s in stream.text]
    if stops:
        stream.text, stream.done = stream.text[: min(stops)], True
    elif len(stream.tokens) >= stream.spec.max_gen_toks:
        stream.done = True


class _PipelineStep:
    """One forward of the KV-cached model over the pipeline: the first stage embeds tokens,
    the others receive hidden states; the last stage returns the last position's logits."""

    def __init__(self, model: list[torch.nn.Module], batch: int, max_length: int, vocab: int):
        (self.chunk,) = model
        self.context = StaticInferenceContext(batch, max_length)
        self.vocab = vocab
        self.first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        config = _unwrap(self.chunk).config
        self.hidden, self.dtype = config.hidden_size, config.pipeline_dtype

    def __call__(self, tokens: torch.Tensor, start: int) -> torch.Tensor | None:
        b, s = tokens.shape
        if not self.first:
            hidden = torch.empty(s, b, self.hidden, dtype=self.dtype, device=tokens.device)
            dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
            self.chunk.set_input_tensor(hidden)
        positions = torch.arange(start, start + s, device=tokens.device).unsqueeze(0).expand(b, -1)
        out = self.chunk(
            tokens if self.first else None,
            positions if self.first else None,
            None,
            inference_context=self.context,
            runtime_gather_output=True,
        )
        self.context.sequence_len_offset += s
        if not self.last:
            dist.send(
                out.to(self.dtype).contiguous(),
                parallel_state.get_pipeline_model_parallel_next_rank(),
            )
            return None
        return out[:, -1, : self.vocab].float()


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _broadcast_from_last_stage(chosen: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(chosen, src, group=parallel_state.get_pipeline_model_parallel_group())
    return chosen


def _generate_cached(
    model: list[torch.nn.Module], streams: list[_Stream], vocab: int, eod: int, detok: Callable
) -> None:
    lengths = [len(s.prompt) for s in streams]
    total = max(n + s.spec.max_gen_toks for n, s in zip(lengths, streams, strict=True))
    tokens = torch.full((len(streams), total), eod, dtype=torch.long)
    for r, stream in enumerate(streams):
        tokens[r, : lengths[r]] = torch.tensor(stream.prompt)
    tokens = tokens.to(device())
    step = _PipelineStep(model, len(streams), total, vocab)
    start, t = 0, min(lengths)
    while True:
        logits = step(tokens[:, start:t], start)
        chosen = torch.zeros(len(streams), dtype=torch.long, device=tokens.device)
        if logits is not None:
            chosen = _choose(logits, streams)
        chosen = _broadcast_from_last_stage(chosen).tolist()
        for r, stream in enumerate(streams):
            if t >= lengths[r] and not stream.done:
                _advance(stream, chosen[r], eod, detok)
                if not stream.done:
                    tokens[r, t] = chosen[r]
        if all(s.done for s in streams) or t + 1 >= total:
            return
        start, t = t, t + 1


def _generate_rescored(
    model: list[torch.nn.Module], streams: list[_Stream], vocab: int, eod: int, detok: Callable,
    packing: Packing,
) -> None:  # fmt: skip
    if any(s.spec.do_sample for s in streams):
        raise ValueError(
            "--gen-kwargs: sampling needs the KV cache, which megatron-core's inference does "
            "not run with interleaved pipelines or sequence parallelism; sample greedily or "
            "evaluate at another layout"
        )
    while not all(s.done for s in streams):
        live = [s for s in streams if not s.done]
        rows = [Row(tuple(s.prompt + s.tokens), tuple(s.prompt + s.tokens), 0) for s in live]
        calls = plan_calls([len(r.tokens) for r in rows], packing, 0)
        out = score_calls(model, rows, calls, vocab)
        for stream, token in zip(live, out[:, 2].long().tolist(), strict=True):
            _advance(stream, token, eod, detok)


def generate(
    model: list[torch.nn.Module],
    prompts: Sequence[list[int]],
    specs: Sequence[GenerationSpec],
    *,
    vocab_size: int,
    eod: int,
    detokenize: Callable[[list[int]], str],
    packing: Packing,
    kv_cache: bool,
) -> list[str]:
    """Continuations of ``prompts`` (each already short enough for its ``max_gen_toks``), in
    batches of ``packing.batch_size``, longest prompt first; on every rank of this replica."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: list[str] = [""] * len(prompts)
    for chunk in model:
        chunk.eval()
    local = Packing(packing.batch_size, packing.microbatches, packing.length_multiple,
                    packing.microbatch_multiple)  # fmt: skip
    with torch.no_grad():
        for i in range(0, len(order), packing.batch_size):
            batch = order[i : i + packing.batch_size]
            streams = [_Stream(list(prompts[j]), specs[j]) for j in batch]
            if kv_cache:
                _generate_cached(model, streams, vocab_size, eod, detokenize)
            else:
                _generate_rescored(model, streams, vocab_size, eod, detokenize, local)
            for j, stream in zip(batch, streams, strict=True):
                out[j] = stream.text
    return out
