"""Triton backend: host side of the multi-tensor kernel in ``triton_kernel``.

Triton is imported lazily. On CUDA tensors the kernel is compiled; on CPU tensors it runs
only under the Triton interpreter (``TRITON_INTERPRET=1``, read when the kernel is first
built, so it may be set at any time before the first call). The address tables hold raw
host or device pointers, so the interpreter is restricted to CPU tensors.

Non-contiguous inputs are copied with ``.contiguous()``; a non-contiguous output is computed
into a contiguous temporary and copied back. Pass contiguous tensors for full bandwidth.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float64: 3,
}
MIXED = -1
_DENSE = torch.contiguous_format

#: Elements per program and warps per program on GPU (4096 x bf16 = 8 KiB per input).
BLOCK = 4096
NUM_WARPS = 8
#: Block size under the interpreter (small blocks keep tests fast and cover many blocks).
INTERPRET_BLOCK = 256


@functools.cache
def is_available() -> bool:
    """True when ``import triton`` works."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpret_mode() -> bool:
    """True when the Triton interpreter is requested (``TRITON_INTERPRET``)."""
    if is_available():
        import triton

        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _kernel(interpret: bool) -> Any:
    """``triton.jit``-wrapped kernel; one object per mode (``interpret`` is the cache key)."""
    import triton

    from . import triton_kernel

    return triton.jit(triton_kernel.weighted_sum_kernel)


def unusable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device`` now, or None when it can."""
    if not is_available():
        return "triton is not installed"
    interpret = interpret_mode()
    if device.type == "cpu" and not interpret:
        return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1"
    if device.type != "cpu" and interpret:
        return (
            f"TRITON_INTERPRET=1 is set: the interpreter only runs this kernel on CPU "
            f"tensors, got {device.type} tensors"
        )
    return None


def _aligned(x: torch.Tensor) -> bool:
    return x.data_ptr() % 16 == 0


def _launch(
    outputs: list[torch.Tensor],
    inputs: list[list[torch.Tensor]],
    weights: Sequence[float],
    acc_dtype: torch.dtype,
    found: torch.Tensor | None,
    in_codes: tuple[int, ...],
    out_code: int,
) -> None:
    """One group: same input dtypes per j, same output dtype; contiguous, non-empty tensors."""
    device = outputs[0].device
    interpret = device.type == "cpu"
    block = INTERPRET_BLOCK if interpret else BLOCK
    k, n = len(inputs), len(outputs)
    numels = [o.numel() for o in outputs]
    n_full = [m // block for m in numels]
    tails = [t for t, m in enumerate(numels) if m % block]
    aligned = all(_aligned(o) for o in outputs) and all(_aligned(x) for xs in inputs for x in xs)
    # One host buffer, one copy to the device: [addr | out_addr | numel | code | w | tails].
    addrs = [inputs[j][t].data_ptr() for t in range(n) for j in range(k)]
    weight_bits = torch.tensor(weights, dtype=torch.float64).view(torch.int64).tolist()
    host = addrs + [o.data_ptr() for o in outputs] + numels + list(in_codes) + weight_bits
    host += tails + [n_full[t] for t in tails]
    table = torch.tensor(host, dtype=torch.int64).to(device)
    parts = torch.split(table, [n * k, n, n, k, k, len(tails), len(tails)])
    addr, out_addr, numel, code, w, tail_t, tail_i = parts
    w = w.view(torch.float64)
    flag = found if found is not None else numel  # any pointer; unused when CHECK is False
    uniform = in_codes[0] if all(c == in_codes[0] for c in in_codes) else MIXED
    kernel = _kernel(interpret)
    launches = []
    total_full = sum(n_full)
    if total_full:
        counts = torch.tensor(n_full, dtype=torch.int64).to(device)
        starts = torch.cumsum(counts, 0) - counts
        full_t = torch.repeat_interleave(
            torch.arange(n, dtype=torch.int64, device=device), counts, output_size=total_full
        )
        full_i = torch.arange(total_full, dtype=torch.int64, device=device)
        full_i -= torch.repeat_interleave(starts, counts, output_size=total_full)
        launches.append((full_t, full_i, False))
    if tails:
        launches.append((tail_t, tail_i, True))
    extra = {} if interpret else {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
    # The interpreter computes with NumPy: silence its warnings on NaN/Inf (a GPU does not warn).
    with np.errstate(all="ignore") if interpret else contextlib.nullcontext():
        for blk_t, blk_i, masked in launches:
            kernel[(blk_t.numel(),)](
                addr, out_addr, numel, code, w, blk_t, blk_i, flag, k,
                IN_CODE=uniform, OUT_CODE=out_code, ACC_FP64=acc_dtype == torch.float64,
                MASKED=masked, ALIGNED=aligned, CHECK=found is not None, BLOCK=block, **extra,
            )  # fmt: skip


def weighted_sum_(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    acc_dtype: torch.dtype,
    found: torch.Tensor | None,
) -> None:
    """``outputs[t] = sum_j weights[j] * inputs[j][t]`` (validated arguments)."""
    reason = unusable_reason(outputs[0].device)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run: {reason}")
    groups: dict[tuple[tuple[int, ...], int], list[int]] = defaultdict(list)
    for t, out in enumerate(outputs):
        if out.numel():
            key = (tuple(DTYPE_CODES[xs[t].dtype] for xs in inputs), DTYPE_CODES[out.dtype])
            groups[key].append(t)
    with _device_guard(outputs[0].device):
        for (in_codes, out_code), ts in groups.items():
            outs = [outputs[t] for t in ts]
            dense = [o if o.is_contiguous() else torch.empty_like(o, memory_format=_DENSE)
                     for o in outs]  # fmt: skip
            xs = [[x[t].contiguous() for t in ts] for x in inputs]
            _launch(dense, xs, weights, acc_dtype, found, in_codes, out_code)
            for o, d in zip(outs, dense, strict=True):
                if o is not d:
                    o.copy_(d)


def accumulate_(
    acc: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    weight: float,
    found: torch.Tensor | None,
) -> None:
    """``acc[t] += weight * tensors[t]``: the kernel with inputs ``(acc, x)``, weights ``(1, w)``.

    ``1 * acc`` is exact, so this is ``acc + w * x`` with the same rounding as the torch path.
    """
    weighted_sum_(acc, [list(acc), list(tensors)], [1.0, weight], acc[0].dtype, found)


def _device_guard(device: torch.device) -> Any:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
