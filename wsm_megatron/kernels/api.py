"""Public API: fused weighted sums of checkpoints, with backend dispatch.

All functions compute in an fp32 (default) or fp64 accumulator with one fixed order::

    acc = x_0 * w_0;  acc = acc + x_j * w_j  (j = 1 .. k-1);  out = round(acc)

each product and sum rounded separately, so both backends give bit-identical results.

``found_nonfinite`` (optional 1-element float32/int32/int64 tensor on the tensors' device,
like AMP's ``found_inf``) is set to 1 when an output element is NaN/Inf and is never reset.
A non-finite input element always yields a non-finite output, whatever its weight: a NaN
propagates, ``w * inf`` is +-inf for ``w != 0`` and NaN for ``w == 0``, and once the
accumulator is NaN/Inf no finite addend brings it back. So checking the result (inside the
Triton kernel, before the store; one read of the just-written outputs on the torch path)
detects every non-finite input without a second pass over the inputs. It also reports an
overflow of the output type (e.g. a sum above 65504 stored as fp16).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import torch_backend, triton_backend
from .validation import (
    ACC_DTYPES,
    SUPPORTED_DTYPES,
    check_acc_dtype,
    check_backend,
    check_dtype,
    check_flag,
    check_multi,
    normalize_weights,
)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` (CUDA tensors, triton importable, not interpreting) or
    ``"torch"``; check that an explicit ``"triton"`` can run on ``device``."""
    check_backend(backend)
    if backend == "auto":
        usable = device.type == "cuda" and triton_backend.unusable_reason(device) is None
        return "triton" if usable else "torch"
    if backend == "triton":
        reason = triton_backend.unusable_reason(device)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run: {reason}")
    return backend


def _round_weights(weights: list[float], acc_dtype: torch.dtype) -> list[float]:
    """Round to the accumulator type, so every backend multiplies by the same value."""
    return torch.tensor(weights, dtype=torch.float64).to(acc_dtype).tolist()


def weighted_sum_multi(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float] | torch.Tensor,
    *,
    acc_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    found_nonfinite: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``outputs[t] = sum_j weights[j] * inputs[j][t]`` for many tensors in a few launches.

    ``inputs[j]`` is the list of tensors of input (checkpoint) ``j``, aligned with
    ``outputs``: ``inputs[j][t]`` has the shape of ``outputs[t]``. Dtypes may differ per
    tensor and per input. An output may be one of its own inputs (``outputs[t] is
    inputs[j][t]``), but must not otherwise overlap an input. Returns ``list(outputs)``.
    """
    device = check_multi(outputs, inputs)
    check_acc_dtype(acc_dtype)
    check_flag(found_nonfinite, device)
    w = _round_weights(normalize_weights(weights, len(inputs)), acc_dtype)
    chosen = resolve_backend(backend, device)
    impl = triton_backend if chosen == "triton" else torch_backend
    impl.weighted_sum_(list(outputs), [list(xs) for xs in inputs], w, acc_dtype, found_nonfinite)
    return list(outputs)


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    acc_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    found_nonfinite: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``sum_j weights[j] * tensors[j]`` over k same-shaped tensors.

    The output dtype is ``out.dtype``, else ``out_dtype``, else ``tensors[0].dtype``.
    """
    if isinstance(tensors, torch.Tensor) or len(tensors) == 0:
        raise ValueError("tensors must be a non-empty list of tensors")
    check_dtype(tensors[0], "tensors[0]", SUPPORTED_DTYPES)
    if out is None:
        dtype = out_dtype if out_dtype is not None else tensors[0].dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported out_dtype {dtype}; expected one of {SUPPORTED_DTYPES}")
        out = torch.empty(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    elif out_dtype is not None and out_dtype != out.dtype:
        raise ValueError(f"out_dtype={out_dtype} contradicts out.dtype={out.dtype}")
    weighted_sum_multi(
        [out], [[x] for x in tensors], weights,
        acc_dtype=acc_dtype, backend=backend, found_nonfinite=found_nonfinite,
    )  # fmt: skip
    return out


def accumulate_(
    acc: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    weight: float,
    *,
    backend: str = "auto",
    found_nonfinite: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Streaming step ``acc[t] += weight * tensors[t]`` (``weight * x`` rounded first).

    ``acc`` holds fp32 (or fp64) accumulators, all of one dtype; ``tensors`` any supported
    dtype. Starting from zeros, k steps give ``weighted_sum`` exactly (up to the sign of
    zero). Returns ``list(acc)``.
    """
    if isinstance(acc, torch.Tensor) or isinstance(tensors, torch.Tensor):
        raise ValueError("acc and tensors must be lists of tensors")
    if len(acc) != len(tensors):
        raise ValueError(f"got {len(acc)} accumulators for {len(tensors)} tensors")
    device = check_multi(acc, [tensors], out_dtypes=ACC_DTYPES)
    acc_dtype = acc[0].dtype
    if any(a.dtype != acc_dtype for a in acc):
        raise ValueError("all accumulators must have the same dtype (float32 or float64)")
    check_flag(found_nonfinite, device)
    (w,) = _round_weights(normalize_weights([weight], 1), acc_dtype)
    chosen = resolve_backend(backend, device)
    impl = triton_backend if chosen == "triton" else torch_backend
    impl.accumulate_(list(acc), list(tensors), w, found_nonfinite)
    return list(acc)
