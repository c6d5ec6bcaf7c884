"""Merged values from checkpoint values and merge coefficients: the one computation behind both
``wsm-merge`` (pieces of stored chunks) and the trainer's online merge (a rank's live shard).

``out = sum_j c_j * x_j`` with ``x_0`` the oldest checkpoint, accumulated in ``acc_dtype``
(fp32 by default) in that order, each product and sum rounded once, then rounded to each
output's dtype (:mod:`wsm_megatron.kernels`). Every operation is elementwise, so the bits of a
value do not depend on how tensors are cut into pieces, on the backend (Triton or torch) or on
the device: both tools give the same bits for the same checkpoints and coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wsm_megatron.kernels import weighted_sum_multi

DEFAULT_ACC_DTYPE = torch.float32


def combine(
    outputs: Sequence[torch.Tensor],
    checkpoints: Sequence[Sequence[torch.Tensor]],
    coefficients: Sequence[float],
    *,
    acc_dtype: torch.dtype = DEFAULT_ACC_DTYPE,
    found_nonfinite: torch.Tensor | None = None,
) -> None:
    """``outputs[t] = sum_j coefficients[j] * checkpoints[j][t]``, checkpoints oldest first.

    ``found_nonfinite`` (a 1-element tensor) is set to 1 when an output value is NaN/Inf: a
    non-finite input value, or an overflow of the output dtype.
    """
    assert len(checkpoints) == len(coefficients), (len(checkpoints), len(coefficients))
    weighted_sum_multi(
        outputs,
        checkpoints,
        list(coefficients),
        acc_dtype=acc_dtype,
        found_nonfinite=found_nonfinite,
    )
