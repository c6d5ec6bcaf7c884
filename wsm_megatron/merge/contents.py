"""What the merged checkpoint contains: which stored items are averaged, which are copied from
the newest input, which are left out, and the common (non-sharded) state.

- Averaged: floating-point model tensors under the roots Megatron writes model weights under
  (:data:`MODEL_ROOTS`: ``embedding``, ``decoder``, ``output_layer``, ...), and those matched
  by ``average`` patterns.
- Copied from the newest input: non-floating tensors (integer buffers, counters), Transformer
  Engine ``_extra_state`` (FP8 scaling metadata, stored as objects), every other stored object,
  known non-weight state (:data:`STATE_PATTERNS`: a MoE router's ``expert_bias``, set by the
  load-balancing rule, not trained), and tensors matched by ``copy_from_newest`` patterns
  (which win over ``average``).
- Refused: a floating tensor under any other root (``foo.scale``): the user decides with
  ``--average`` or ``--copy-from-newest``, as Megatron-LM's own merge tool refuses what it does
  not recognise; a floating dtype the kernels cannot average (FP8).
- Left out by default: optimizer state (keys ``optimizer.*``, ``chained_N.optimizer.*``) and run
  state (``rng_state``, ``rerun_state_machine_state``); the saved args then say
  ``no_save_optim``/``no_save_rng``, as Megatron-LM's own model-only checkpoints do.
  ``keep_optimizer`` averages the optimizer's tensors (fp32 main weights and moments; the
  distributed optimizer's flat per-bucket buffers in the ``dp_reshardable`` format) with the
  same coefficients and copies its objects (the per-group ``optimizer.distributed.
  dp_group_idx_N.*`` state) from the newest; the ``dp_zero_gather_scatter`` format (the whole
  state as one object per group) is refused. ``keep_rng`` copies the run state from the newest.
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
MODEL_ROOTS = frozenset(
    {
        "embedding",
        "decoder",
        "encoder",
        "output_layer",
        "mtp",
        "lm_head",
        "pooler",
        "binary_head",
        "encoder_relative_pos_emb",
        "decoder_relative_pos_emb",
        "language_model",
        "vision_model",
        "vision_projection",
        "modality_submodules",
    }
)
"""First key components under which megatron-core's models (GPT, Mamba, BERT, T5, LLaVA,
MIMO) keep their trained weights."""
STATE_PATTERNS = ("*.expert_bias",)
"""Floating model state that is not a trained weight, copied from the newest by default."""
_GATHERED_OPTIMIZER_RE = re.compile(
    r"^(chained_\d+\.)?optimizer\.distributed\.dp_group_idx_\d+\.param_state/"
)


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


def _matches(fqn: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(fqn, pat) for pat in patterns)


@dataclass(frozen=True)
class ContentPolicy:
    keep_optimizer: bool = False
    keep_rng: bool = False
    copy_from_newest: Sequence[str] = ()
    average: Sequence[str] = ()

    def include(self, fqn: str) -> bool:
        group = key_group(fqn)
        return (
            group == MODEL
            or (group == OPTIMIZER and self.keep_optimizer)
            or (group == RUN_STATE and self.keep_rng)
        )

    def tensor_kind(self, fqn: str, dtype: torch.dtype) -> str:
        """AVERAGE or COPY for a stored tensor (see the module docstring); raises for a floating
        tensor under an unknown root and for a floating dtype the kernels cannot average."""
        group = key_group(fqn)
        if (
            not dtype.is_floating_point
            or is_extra_state(fqn)
            or group == RUN_STATE
            or _matches(fqn, self.copy_from_newest)
        ):
            return COPY
        explicit = _matches(fqn, self.average)
        if not explicit and group == MODEL and _matches(fqn, STATE_PATTERNS):
            return COPY
        root = fqn.split(".", 1)[0]
        if not (explicit or group == OPTIMIZER or root in MODEL_ROOTS):
            raise MergeError(
                f"tensor {fqn!r} ({dtype}) is under {root!r}, not a root Megatron keeps model "
                f"weights under (embedding, decoder, output_layer, ...): pass --average "
                f"'{root}.*' to average it or --copy-from-newest '{root}.*' to take it from the "
                "newest checkpoint"
            )
        if not averageable(dtype):
            raise MergeError(
                f"tensor {fqn!r} has dtype {dtype}, which the merge cannot average (FP8 "
                "weights): convert the checkpoints to bf16/fp32 weights first to merge it; "
                f"--copy-from-newest '{fqn}' would instead take it from the newest checkpoint, "
                "leaving that tensor unmerged"
            )
        return AVERAGE

    def check_object(self, fqn: str) -> None:
        """Objects are copied from the newest; the distributed optimizer's gathered state (the
        ``dp_zero_gather_scatter`` format) would be, silently unaveraged: refused."""
        if _GATHERED_OPTIMIZER_RE.match(fqn):
            raise MergeError(
                f"--keep-optimizer: optimizer state {fqn!r} is the distributed optimizer's "
                "whole state in one object (the dp_zero_gather_scatter format), which cannot "
                "be averaged; merge without --keep-optimizer, or save the run with Megatron-LM's "
                "--dist-ckpt-optim-fully-reshardable (or its default dp_reshardable format)"
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
