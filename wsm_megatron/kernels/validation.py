"""Argument checking shared by the public kernels API (clear ``ValueError`` messages)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Element types accepted for inputs and outputs.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
)
#: Accumulator types (``acc_dtype``); fp32 is the default, fp64 for the offline merge.
ACC_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
#: Element types accepted for the ``found_nonfinite`` flag tensor.
FLAG_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.int32, torch.int64)
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def _where(name: str, j: int | None, t: int | None) -> str:
    idx = "".join(f"[{i}]" for i in (j, t) if i is not None)
    return f"{name}{idx}"


def check_dtype(tensor: torch.Tensor, what: str, allowed: Sequence[torch.dtype]) -> None:
    """Raise if ``tensor.dtype`` is not one of ``allowed``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{what} has unsupported dtype {tensor.dtype}; expected one of {names}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_acc_dtype(acc_dtype: torch.dtype) -> None:
    if acc_dtype not in ACC_DTYPES:
        raise ValueError(f"acc_dtype must be torch.float32 or torch.float64, got {acc_dtype}")


def normalize_weights(weights: Sequence[float] | torch.Tensor, k: int) -> list[float]:
    """Return the weights as ``k`` finite Python floats (a tensor is read with ``.tolist()``)."""
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"weights tensor must be 1-D, got shape {tuple(weights.shape)}")
        weights = weights.detach().cpu().tolist()
    values = [float(w) for w in weights]
    if len(values) != k:
        raise ValueError(f"got {len(values)} weights for {k} inputs")
    bad = [w for w in values if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite, got {bad}")
    return values


def check_flag(found: torch.Tensor | None, device: torch.device) -> None:
    """``found_nonfinite`` must be a 1-element tensor of a flag dtype on ``device``."""
    if found is None:
        return
    check_dtype(found, "found_nonfinite", FLAG_DTYPES)
    if found.numel() != 1:
        raise ValueError(f"found_nonfinite must have exactly 1 element, got {found.numel()}")
    if found.device != device:
        raise ValueError(f"found_nonfinite is on {found.device}, tensors are on {device}")


def check_multi(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[Sequence[torch.Tensor]],
    *,
    out_dtypes: Sequence[torch.dtype] = SUPPORTED_DTYPES,
) -> torch.device:
    """Check ``outputs[t]`` / ``inputs[j][t]`` (k inputs, T tensors); return the common device."""
    if len(inputs) == 0:
        raise ValueError("inputs is empty: need at least one input (k >= 1)")
    if len(outputs) == 0:
        raise ValueError("outputs is empty: need at least one tensor")
    for t, out in enumerate(outputs):
        check_dtype(out, _where("outputs", None, t), out_dtypes)
    device = outputs[0].device
    n = len(outputs)
    for j, xs in enumerate(inputs):
        if isinstance(xs, torch.Tensor) or len(xs) != n:
            got = "a tensor" if isinstance(xs, torch.Tensor) else f"{len(xs)} tensors"
            raise ValueError(
                f"inputs[{j}] must be a list of {n} tensors (one per output), got {got}"
            )
        for t, x in enumerate(xs):
            check_dtype(x, _where("inputs", j, t), SUPPORTED_DTYPES)
            if x.shape != outputs[t].shape:
                raise ValueError(
                    f"shape mismatch: inputs[{j}][{t}] has shape {tuple(x.shape)}, "
                    f"outputs[{t}] has shape {tuple(outputs[t].shape)}"
                )
    for name, tensors in (("outputs", [outputs]), ("inputs", inputs)):
        for j, xs in enumerate(tensors):
            for t, x in enumerate(xs):
                if x.device != device:
                    where = _where(name, j if name == "inputs" else None, t)
                    raise ValueError(
                        f"device mismatch: {where} is on {x.device}, outputs[0] is on {device}"
                    )
    return device
