"""The training loop's parts that plug in (OLMo-core's callbacks): metrics logging, evaluation
and the online merge, each a :class:`Callback` with no-op lifecycle hooks; the loop calls the
hooks through :class:`Callbacks` and never names the parts."""

from wsm_megatron.training.callbacks.base import Callback, Callbacks, StepInfo
from wsm_megatron.training.callbacks.evaluation import EvaluationCallback, ValidRecord
from wsm_megatron.training.callbacks.metrics import MetricsCallback
from wsm_megatron.training.callbacks.online_merge import OnlineMergeCallback

__all__ = [
    "Callback",
    "Callbacks",
    "EvaluationCallback",
    "MetricsCallback",
    "OnlineMergeCallback",
    "StepInfo",
    "ValidRecord",
]
