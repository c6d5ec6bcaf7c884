"""Portable backend built on ``torch._foreach_*`` ops (CPU, or GPU without Triton).

Arithmetic contract, shared bit for bit with the Triton backend: with ``A`` the accumulator
type and ``w_j`` rounded to ``A``,

    acc = A(x_0) * w_0;  acc = acc + A(x_j) * w_j  for j = 1 .. k-1;  out = acc rounded

where every product and sum is rounded to ``A`` separately (no FMA: ``add_(x, alpha=w)``
contracts to an FMA on CPU, so it is not used). fp64 accumulators are rounded to fp32 before
a bf16/fp16 output, as ``Tensor.to`` does.

Work is processed in buckets of at most ``_CHUNK`` elements (contiguous tensors are split),
so the fp32 temporaries stay small (cache resident on CPU, where they are also reused across
calls: at most 2 x ``_CHUNK`` accumulator elements kept per thread).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import torch

_CHUNK = {"cpu": 1 << 20}
_DEFAULT_CHUNK = 1 << 26


def _chunk_size(device: torch.device) -> int:
    return _CHUNK.get(device.type, _DEFAULT_CHUNK)


def _items(groups: Sequence[Sequence[torch.Tensor]], chunk: int) -> list[tuple[int, int, int]]:
    """Work items ``(t, start, stop)`` over ``groups[t]`` (tensors of one shape).

    A group is split into flat chunks only when all its tensors are contiguous.
    """
    items = []
    for t, group in enumerate(groups):
        n = group[0].numel()
        if n == 0:
            continue
        step = chunk if all(x.is_contiguous() for x in group) else n
        items.extend((t, a, min(a + step, n)) for a in range(0, n, step))
    return items


def _view(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return x if (a == 0 and b == x.numel()) else x.view(-1)[a:b]


def _buckets(items: list[tuple[int, int, int]], chunk: int) -> Iterator[list[tuple[int, int, int]]]:
    bucket: list[tuple[int, int, int]] = []
    size = 0
    for item in items:
        n = item[2] - item[1]
        if bucket and size + n > chunk:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += n
    if bucket:
        yield bucket


_CACHE = threading.local()


class _Scratch:
    """A flat buffer carved into views for each bucket (no allocation per bucket).

    On CPU, buffers up to ``_CHUNK`` elements are kept per thread and reused across calls:
    a fresh multi-MiB allocation is returned to the OS on free and page-faults again on
    every call, which costs more than the arithmetic. CUDA's caching allocator needs no help.
    """

    def __init__(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        reusable = device.type == "cpu" and numel <= _chunk_size(device)
        cache: dict = _CACHE.__dict__.setdefault("buffers", {}) if reusable else {}
        flat = cache.get((slot, dtype))
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=dtype, device=device)
            if reusable:
                cache[(slot, dtype)] = flat
        self.flat = flat

    def like(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [x.numel() for x in tensors]
        parts = torch.split(self.flat[: sum(sizes)], sizes)
        return [p.view(x.shape) for p, x in zip(parts, tensors, strict=True)]


def _shares_storage(x: torch.Tensor, others: Sequence[torch.Tensor]) -> bool:
    ptr = x.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == ptr for o in others)


def _flag_nonfinite(tensors: list[torch.Tensor], found: torch.Tensor) -> None:
    """Set ``found`` to 1 when any element of ``tensors`` is NaN/Inf (one read, no host sync)."""
    tensors = [x for x in tensors if x.numel() > 0]
    if not tensors:
        return
    # min and max are both finite iff every element is finite (both propagate NaN). aminmax reads
    # each tensor once and is far faster on CPU than _foreach_norm(inf).
    extremes = torch.stack([torch.stack(torch.aminmax(x)).double() for x in tensors])
    bad = ~torch.isfinite(extremes).all()
    found.masked_fill_(bad, 1)


def weighted_sum_(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    acc_dtype: torch.dtype,
    found: torch.Tensor | None,
) -> None:
    """``outputs[t] = sum_j weights[j] * inputs[j][t]`` (validated arguments)."""
    device = outputs[0].device
    chunk = _chunk_size(device)
    # Accumulate straight into an output that has the accumulator type and aliases no input.
    direct = [
        o.dtype == acc_dtype and not _shares_storage(o, [xs[t] for xs in inputs])
        for t, o in enumerate(outputs)
    ]
    groups = [[o, *(xs[t] for xs in inputs)] for t, o in enumerate(outputs)]
    buckets = list(_buckets(_items(groups, chunk), chunk))
    largest = max((sum(b - a for _, a, b in bucket) for bucket in buckets), default=0)
    tmp_pool = _Scratch("tmp", largest if len(inputs) > 1 else 0, acc_dtype, device)
    acc_pool = _Scratch("acc", 0 if all(direct) else largest, acc_dtype, device)
    for bucket in buckets:
        outs = [_view(outputs[t], a, b) for t, a, b in bucket]
        staged = iter(acc_pool.like([o for o, (t, _, _) in zip(outs, bucket, strict=True)
                                     if not direct[t]]))  # fmt: skip
        acc = [o if direct[t] else next(staged) for o, (t, _, _) in zip(outs, bucket, strict=True)]
        for j, (xs, w) in enumerate(zip(inputs, weights, strict=True)):
            x = [_view(xs[t], a, b) for t, a, b in bucket]
            if j == 0:
                torch._foreach_copy_(acc, x)
                torch._foreach_mul_(acc, w)
            else:
                tmp = tmp_pool.like(outs)
                torch._foreach_copy_(tmp, x)
                torch._foreach_mul_(tmp, w)
                torch._foreach_add_(acc, tmp)
        copy_back = [(o, a) for o, a in zip(outs, acc, strict=True) if o is not a]
        if copy_back:
            torch._foreach_copy_([o for o, _ in copy_back], [a for _, a in copy_back])
        if found is not None:
            _flag_nonfinite(outs, found)


def accumulate_(
    acc: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    weight: float,
    found: torch.Tensor | None,
) -> None:
    """``acc[t] += weight * tensors[t]`` with the product rounded to ``acc``'s type first."""
    device = acc[0].device
    chunk = _chunk_size(device)
    groups = list(zip(acc, tensors, strict=True))
    buckets = list(_buckets(_items(groups, chunk), chunk))
    largest = max((sum(b - a for _, a, b in bucket) for bucket in buckets), default=0)
    tmp_pool = _Scratch("tmp", largest, acc[0].dtype, device)
    for bucket in buckets:
        accs = [_view(acc[t], a, b) for t, a, b in bucket]
        tmp = tmp_pool.like(accs)
        torch._foreach_copy_(tmp, [_view(tensors[t], a, b) for t, a, b in bucket])
        torch._foreach_mul_(tmp, weight)
        torch._foreach_add_(accs, tmp)
        if found is not None:
            _flag_nonfinite(accs, found)
