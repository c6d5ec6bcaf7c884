"""Run Megatron-Core on a CPU-only torch (tests, the demo): one explicit compatibility layer.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the math. On a
machine without a GPU, :func:`install` adapts exactly those places so that real megatron-core
models, pipeline schedules and ``dist_checkpointing`` run on CPU over gloo. It is a no-op when
``torch.cuda.is_available()``: GPU behaviour is never changed. Each adaptation, and why:

1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. Tensor-parallel layers,
   mappings (all-gather/reduce-scatter buffers), attention masks, the GPT model and the
   ``dist_checkpointing`` savers allocate with ``device=torch.cuda.current_device()``; on CPU those
   buffers belong on the CPU.
2. ``torch.cuda.synchronize()`` is a no-op: with no device there is no stream to wait for
   (``dist_checkpointing.save`` and ``parallel_state`` call it). Likewise
   ``torch.cuda.current_stream()`` is ``torch.cpu.current_stream()``, whose ``wait_event`` and
   ``wait_stream`` do nothing: megatron-core 0.19's DDP asks for the current stream before every
   gradient reduction, to wait for CUDA-graph events that never exist on CPU.
3. The "CUDA" RNG is the CPU generator: ``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and
   Megatron's ``_get_cuda_rng_state/_set_cuda_rng_state`` read and write the CPU default
   generator. ``model_parallel_cuda_manual_seed`` and the RNG tracker's ``fork`` then swap CPU
   generator states exactly as they swap CUDA ones on a GPU, so tensor-parallel ranks initialise
   and drop out differently while data-parallel replicas agree. The tracker warns when the CPU
   RNG advances inside a fork, which on CPU is the intended behaviour, so that one warning is
   filtered.
4. Tensors created on ``"cuda"`` by name: the pipeline schedules count tokens in
   ``torch.zeros([], device="cuda")``, the checkpoint savers reduce flags in
   ``torch.tensor(..., device="cuda")`` and the default causal mask is built on ``"cuda"``.
   Only in the modules listed in ``_CUDA_LITERAL_MODULES``, the module's ``torch`` is replaced
   by a thin proxy whose tensor factories map a ``"cuda"`` device to the CPU; everything else is
   the real ``torch``. Other code is not touched, so a path we have not adapted fails loudly
   rather than silently.
5. Megatron's optimizer on CPU (``FP32Optimizer``; the distributed and mixed-precision optimizers
   stay GPU-only): ``megatron.core.optimizer.optimizer``/``clip_grads`` and the local
   multi-tensor fallbacks in ``megatron.core.utils`` create their scalars on ``"cuda"`` (item 4
   covers them), and ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() ==
   "torch.cuda.FloatTensor"``. In the optimizer module it is replaced by the same function with
   that assertion on the dtype (fp32) instead of the CUDA tensor type; the norm itself is still
   Megatron's ``get_grad_norm_fp32``.
6. Tied embeddings across pipeline stages: ``LanguageModule.setup_embeddings_and_output_layer``
   moves the last stage's copy of the word embeddings to the GPU (``weight.data.cuda()``) before
   all-reducing it with the first stage's. On CPU that method runs with ``Tensor.cuda`` returning
   the tensor unchanged, for the duration of that call only.
7. The fully parallel load (``FullyParallelLoadStrategyWrapper``: each data-parallel rank reads
   a share of the shards, then they exchange them): ``exchange_utils`` allocates its exchange
   buffers on ``"cuda"`` (item 4, with ``empty_like``), through ``ShardedTensor.init_data("cuda")``
   (mapped to the CPU) and with ``.cuda()`` on loaded tensors (the identity while ``load`` runs,
   as in item 6).

Also needed on CPU, without patching: ``psutil`` (a dependency of ``dist_checkpointing``), and a
``if __name__ == "__main__":`` guard in scripts, because ``dist_checkpointing`` may spawn worker
processes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

_INSTALLED = False

# Modules that create tensors with a literal "cuda" device on paths we use (megatron-core 0.16).
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.transformer.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.exchange_utils",
)
_FACTORIES = frozenset(
    {"zeros", "ones", "empty", "empty_like", "full", "tensor", "arange", "as_tensor"}
)


def _is_cuda(device: object) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda"
    )


class _CpuTorch:
    """Stands in for ``torch`` inside one module: tensor factories map ``device="cuda"`` to CPU."""

    def __getattr__(self, name: str) -> object:
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args: object, **kwargs: object) -> torch.Tensor:
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


class _ForkWarningFilter(logging.Filter):
    """Drops the RNG tracker's 'CPU RNG state changed' warning, expected when CPU is the device."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _noop(*args: object, **kwargs: object) -> None:
    return None


def _get_rng_state(*args: object, **kwargs: object) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, *args: object, **kwargs: object) -> None:
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(seed)


def _clip_grad_by_total_norm_fp32(
    parameters: list[torch.Tensor],
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Megatron's ``clip_grad_by_total_norm_fp32`` for CPU tensors (asserts fp32, not CUDA)."""
    from megatron.core.utils import to_local_if_dtensor

    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr, None) for p in parameters]
    grads = [to_local_if_dtensor(g).detach() for g in grads if g is not None]
    assert all(g.dtype == torch.float32 for g in grads), "gradients must be fp32"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def _cpu_tensor_cuda(method: Callable[..., object]) -> Callable[..., object]:
    """``method`` with ``Tensor.cuda`` as the identity while it runs (the tensor stays on CPU)."""

    @functools.wraps(method)
    def wrapper(*args: object, **kwargs: object) -> object:
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    return wrapper


def is_active() -> bool:
    """Whether the CPU compatibility layer is installed in this process."""
    return _INSTALLED


def install() -> bool:
    """Install the CPU adaptations when no GPU exists; returns whether they are active."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available():
        return False

    torch.cuda.current_device = _cpu_device
    torch.cuda.synchronize = _noop
    torch.cuda.current_stream = torch.cpu.current_stream
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.cuda.manual_seed = _manual_seed

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _get_rng_state
    mcore_random._set_cuda_rng_state = _set_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_ForkWarningFilter())

    import importlib

    from megatron.core.optimizer import optimizer as mcore_optimizer

    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _cpu_tensor_cuda(
        LanguageModule.setup_embeddings_and_output_layer
    )

    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    init_data = ShardedTensor.init_data

    def _init_data_on_cpu(self: ShardedTensor, device: object, *args: object, **kw: object) -> None:
        init_data(self, "cpu" if _is_cuda(device) else device, *args, **kw)

    ShardedTensor.init_data = _init_data_on_cpu
    FullyParallelLoadStrategyWrapper.load = _cpu_tensor_cuda(FullyParallelLoadStrategyWrapper.load)

    for module_name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(module_name)
        if module.torch is not torch:
            raise RuntimeError(f"{module_name} does not use torch as expected by cpu_compat")
        module.torch = _CpuTorch()

    _INSTALLED = True
    return True
