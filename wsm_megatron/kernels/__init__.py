"""Fused weighted-average kernels for checkpoint merging (Triton on GPU, torch foreach on CPU).

Public API (see ``api`` for the arithmetic contract and NaN/Inf reporting):

* ``weighted_sum(tensors, weights, *, out, out_dtype, acc_dtype, backend, found_nonfinite)``
* ``weighted_sum_multi(outputs, inputs, weights, ...)`` with ``inputs[j][t]`` = tensor t of
  input j
* ``accumulate_(acc, tensors, weight, ...)``: streaming ``acc += weight * x``

``backend`` is ``"auto"`` (Triton for CUDA tensors when triton imports, else torch),
``"triton"`` or ``"torch"``. Triton is imported lazily; this package imports without it.
"""

from .api import accumulate_, resolve_backend, weighted_sum, weighted_sum_multi
from .triton_backend import interpret_mode
from .triton_backend import is_available as triton_available
from .validation import ACC_DTYPES, BACKENDS, SUPPORTED_DTYPES

__all__ = [
    "ACC_DTYPES",
    "BACKENDS",
    "SUPPORTED_DTYPES",
    "accumulate_",
    "interpret_mode",
    "resolve_backend",
    "triton_available",
    "weighted_sum",
    "weighted_sum_multi",
]
