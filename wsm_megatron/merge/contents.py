"""What the merged checkpoint contains: which stored items are averaged, which are copied from
the newest input, which are left out, and the common (non-sharded) state.

- Averaged: floating-point tensors of the model (fp32, bf16, fp16, fp64).
- Copied from the newest input: non-floating tensors (integer buffers, counters), Transformer
  Engine ``_extra_state`` (FP8 scaling metadata, stored as objects), every other stored object,
  and tensors matched by ``copy_from_newest`` patterns (e.g. a MoE router's ``expert_bias``).
- Left out by default: optimizer state (keys ``optimizer.*``, ``chained_N.optimizer.*``) and run
  state (``rng_state``, ``rerun_state_machine_state``); the saved args then say
  ``no_save_optim``/``no_save_rng``, as Megatron-LM's own model-only checkpoints do.
  ``keep_optimizer`` averages the optimizer's tensors (fp32 main weights and moments) with the
  same coefficients; ``keep_rng`` copies the run state from the newest input.
- The common state (args, iteration, ...) is never a merged item: megatron-core >= 0.17 embeds
  it as the object ``common_state``, <= 0.16 saves ``common.pt``. The output always gets a
  ``common.pt`` (every version loads it; newer ones prefer it to an embedded copy), built from
  the newest input's by :meth:`ContentPolicy.common_state`.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from wsm_megatron.merge.errors import MergeError
from wsm_megatron.merge.plan import AVERAGE, COPY, averageable
from wsm_megatron.merge.selection import EMBEDDED_COMMON_KEY

MODEL, OPTIMIZER, RUN_STATE, COMMON = "model", "optimizer", "run_state", "common"
_OPTIMIZER_RE = re.compile(r"^(chained_\d+\.)?optimizer\.")
_RUN_STATE_PREFIXES = ("rng_state", "rerun_state_machine_state")
_OPTIMIZER_COMMON = ("optimizer", "opt_param_scheduler")
_RUN_STATE_COMMON = ("rng_state", "rerun_state_machine")
PROVENANCE_KEY = "wsm_merge"


def key_group(fqn: str) -> str:
    """``optimizer``, ``run_state`` (RNG, rerun machine), ``common`` (the embedded common
    state) or ``model`` (everything else: Megatron keys model tensors without a prefix)."""
    if _OPTIMIZER_RE.match(fqn):
        return OPTIMIZER
    if fqn.split("/", 1)[0] in _RUN_STATE_PREFIXES:
        return RUN_STATE
    if fqn == EMBEDDED_COMMON_KEY:
        return COMMON
    return MODEL


def is_extra_state(fqn: str) -> bool:
    """Transformer Engine's ``..._extra_state`` (FP8 metadata), stored per shard as
    ``<module>._extra_state/shard_...``."""
    return fqn.split("/", 1)[0].endswith("_extra_state")


@dataclass(frozen=True)
class ContentPolicy:
    keep_optimizer: bool = False
    keep_rng: bool = False
    copy_from_newest: Sequence[str] = ()

    def include(self, fqn: str) -> bool:
        group = key_group(fqn)
        return (
            group == MODEL
            or (group == OPTIMIZER and self.keep_optimizer)
            or (group == RUN_STATE and self.keep_rng)
        )

    def tensor_kind(self, fqn: str, dtype: torch.dtype) -> str:
        """AVERAGE or COPY for a stored tensor; a floating dtype the kernels cannot average
        (e.g. an FP8 dtype) must be named in ``copy_from_newest``."""
        if (
            not dtype.is_floating_point
            or is_extra_state(fqn)
            or key_group(fqn) == RUN_STATE
            or any(fnmatch.fnmatchcase(fqn, pat) for pat in self.copy_from_newest)
        ):
            return COPY
        if not averageable(dtype):
            raise MergeError(
                f"tensor {fqn!r} has dtype {dtype}, which cannot be averaged; pass "
                f"--copy-from-newest '{fqn}' to copy it from the newest checkpoint"
            )
        return AVERAGE

    def check_object(self, fqn: str) -> None:
        if key_group(fqn) == OPTIMIZER:
            raise MergeError(
                f"--keep-optimizer: optimizer state {fqn!r} is stored as an object (the "
                "distributed optimizer's dp_zero_gather_scatter format) and cannot be averaged; "
                "merge without --keep-optimizer, or save with --ckpt-fully-parallel-save"
            )

    def common_state(self, newest: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
        """The output's ``common.pt``: the newest input's, less the left-out state, plus
        provenance under ``wsm_merge``."""
        state = dict(newest)
        args = copy.copy(state.get("args"))
        if not self.keep_optimizer:
            for key in _OPTIMIZER_COMMON:
                state.pop(key, None)
            if args is not None:
                args.no_save_optim = True
        if not self.keep_rng:
            for key in _RUN_STATE_COMMON:
                state.pop(key, None)
            if args is not None:
                args.no_save_rng = True
        if args is not None:
            state["args"] = args
        state[PROVENANCE_KEY] = provenance
        return state
